"""Compiled CPU operators (core/csrc/*.cc), built on first use with Paddle's C++ extension tooling.

An operator is compiled once per machine, Paddle version and source into
``$ORTHOAD_KERNEL_DIR`` (default ``~/.cache/orthoad/kernels``), under a folder keyed by all three, so
a cache shared between different CPUs never runs code built for another one. Loading registers
the operator with Paddle, so a Paddle Inference graph that holds it can then be created in this
process. Building needs a C++ compiler (g++); without one the caller gets one line saying so.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import platform
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import paddle

from core.errors import ConfigError

CSRC = Path(__file__).resolve().parent / "csrc"
MAHALANOBIS_HEAD = "orthoad_mahalanobis_head"
"""Fused Mahalanobis distance over a packed triangular factor (core/csrc/mahalanobis_head.cc)."""
SOURCES = {MAHALANOBIS_HEAD: "mahalanobis_head.cc"}
CFLAGS = ["-O3", "-march=native", "-fopenmp"]
_loaded: dict[str, ModuleType] = {}


def kernel_dir() -> Path:
    """Where compiled operators are kept: $ORTHOAD_KERNEL_DIR or ~/.cache/orthoad/kernels."""
    return Path(os.environ.get("ORTHOAD_KERNEL_DIR") or Path.home() / ".cache" / "orthoad" / "kernels")


def _cpu_signature() -> str:
    """The CPU's instruction-set flags (Linux), else the processor name."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    return platform.processor() or platform.machine()


def _link_flags() -> list[str]:
    """Link against Paddle's own OpenMP runtime when it ships one, so the operator's threads are
    the predictor's (``cpu_math_library_num_threads``) instead of a second thread pool."""
    libs = Path(paddle.__file__).parent / "libs"
    if (libs / "libiomp5.so").is_file():
        return [f"-L{libs}", "-liomp5", f"-Wl,-rpath,{libs}"]
    return ["-fopenmp"]


@contextlib.contextmanager
def _captured_output() -> Iterator[list[str]]:
    """Send this process's stdout and stderr (the compiler subprocess's too) to a file; the list
    yielded receives its last line that says "error" (or its last line) when the block ends."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    tail: list[str] = []
    with tempfile.TemporaryFile(mode="w+") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield tail
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            log.seek(0)
            lines = [line.strip() for line in log.read().splitlines() if line.strip()]
            errors = [line for line in lines if "error" in line.lower()]
            tail.extend((errors or lines)[-1:])


def load_kernel(name: str) -> ModuleType:
    """The Python module of operator ``name`` (compiled if needed); its function ``name`` runs it."""
    if name in _loaded:
        return _loaded[name]
    source = CSRC / SOURCES[name]
    ldflags = _link_flags()
    key = hashlib.sha256("\0".join([source.read_text(), paddle.__version__, _cpu_signature(),
                                    *CFLAGS, *ldflags]).encode()).hexdigest()[:16]
    folder = kernel_dir() / f"{name}-{key}"
    from paddle.utils import cpp_extension  # imported here: only the compiled head needs it

    output: list[str] = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / ".lock", "w") as lock:  # one build at a time (test workers, processes)
            fcntl.flock(lock, fcntl.LOCK_EX)
            with _captured_output() as output:  # Paddle's and the compiler's progress and warnings
                module = cpp_extension.load(
                    name=name, sources=[str(source)], extra_cxx_cflags=CFLAGS,
                    extra_ldflags=ldflags, build_directory=str(folder))
    except Exception as exc:  # compiler missing or failing, unwritable folder: Paddle raises various types
        reason = " ".join((output[0] if output else str(exc)).split())[:200]
        raise ConfigError(f"{source}: cannot build the compiled CPU head in {folder} "
                          f"({type(exc).__name__}: {reason}); install a C++ compiler (apt install "
                          "g++), set ORTHOAD_KERNEL_DIR to a writable folder, or export with --head "
                          "matmul") from exc
    _loaded[name] = module
    return module
