"""Device selection with one clear error when the build or the device is missing."""

from __future__ import annotations

import paddle

from core.errors import ConfigError


def parse_device(spec: str) -> tuple[str, int]:
    """Split ``cpu``, ``gpu`` or ``gpu:N`` into (kind, index)."""
    kind, _, index = spec.strip().lower().partition(":")
    if kind not in ("cpu", "gpu") or (index and not index.isdigit()) or (kind == "cpu" and index):
        raise ConfigError(f"--device {spec}: use cpu, gpu or gpu:N")
    return kind, int(index or 0)


def check_gpu(index: int = 0) -> None:
    """Raise a ConfigError unless this Paddle build can use GPU ``index``."""
    if not paddle.is_compiled_with_cuda():
        raise ConfigError(
            "a GPU was requested but this Paddle build is CPU-only; install the GPU build "
            "(pip install -r requirements-gpu.txt, see README 'GPU') or run on the CPU "
            "(--device cpu / --use_gpu False)"
        )
    count = paddle.device.cuda.device_count()
    if index >= count:
        choice = f"pick gpu:0 to gpu:{count - 1} (--device / --gpu_id) or " if count else ""
        raise ConfigError(f"GPU {index} was requested but this machine has {count} GPU(s); "
                          f"{choice}run on the CPU (--device cpu / --use_gpu False)")


def set_cpu_threads(count: int) -> None:
    """Threads of eager Paddle's CPU kernels (oneDNN, MKL) in this process: Paddle starts with one,
    so training on the CPU left every other core idle until this was called."""
    paddle.base.core.set_num_threads(count)


def select_device(spec: str) -> str:
    """Validate ``spec``, make it Paddle's current device and return Paddle's name for it."""
    kind, index = parse_device(spec)
    if kind == "gpu":
        check_gpu(index)
    name = "cpu" if kind == "cpu" else f"gpu:{index}"
    paddle.set_device(name)
    return name
