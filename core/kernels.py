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
import re
import shutil
import stat
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import paddle

from core.errors import ConfigError

CSRC = Path(__file__).resolve().parent / "csrc"
MAHALANOBIS_HEAD = "orthoad_mahalanobis_head"
"""Fused Mahalanobis distance over a packed triangular factor (core/csrc/mahalanobis_head.cc)."""
NEAREST_ROW = "orthoad_nearest_row"
"""Exact nearest bank row of every query in one sweep pruned by lower bounds (core/csrc/nearest_row.cc)."""
SOURCES = {MAHALANOBIS_HEAD: "mahalanobis_head.cc", NEAREST_ROW: "nearest_row.cc"}
FACTOR_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
"""How the compiled head may store its packed factor (export_model.py --head_precision): 16 bits
halve the bytes it reads per image; the operator widens them and computes in float32."""
HALF_KERNELS = frozenset({MAHALANOBIS_HEAD})
"""The operators that can read their statistics in 16 bits (``--head_precision fp16|bf16``)."""
LANES = 8
"""Rows per tile of the operators' tiled inputs (kLanes in core/csrc/*.cc: one AVX2 register of
float32): positions for the Mahalanobis head, bank rows for the nearest-row search."""
CFLAGS = ["-O3", "-march=native", "-fopenmp"]
_loaded: dict[str, ModuleType] = {}
_lock = threading.Lock()
_SAFE_PATH = re.compile(r"[A-Za-z0-9_./+-]+")


def check_precision(precision: str) -> None:
    """One line for a ``--head_precision`` that is not a key of :data:`FACTOR_DTYPES`."""
    if precision not in FACTOR_DTYPES:
        raise ConfigError(f"--head_precision {precision}: use {', '.join(FACTOR_DTYPES)}")


def packed_tiles(values: np.ndarray) -> np.ndarray:
    """Rows (P, m) as tiles of :data:`LANES` rows: float32 (ceil(P / LANES), m, LANES), tile t
    holding rows LANES t .. LANES t + LANES - 1 column by column. The padding rows of the last tile
    hold zeros."""
    rows, width = values.shape
    tiles = -(-rows // LANES)
    padded = np.zeros((tiles * LANES, width), dtype=np.float32)
    padded[:rows] = values
    return np.ascontiguousarray(padded.reshape(tiles, LANES, width).transpose(0, 2, 1))


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
def _captured_output(tail: list[str]) -> Iterator[None]:
    """Send this process's stdout and stderr (the compiler subprocess's too) to a file; ``tail``
    receives its last line that says "error" (or its last line) when the block ends."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile(mode="w+") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
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
    with _lock:
        if name not in _loaded:
            _loaded[name] = _build(name)
        return _loaded[name]


def _build(name: str) -> ModuleType:
    """Build (or reuse the cached build of) operator ``name`` and register it with Paddle.

    A cached build that no longer loads (a build killed half-way) is removed and built again once.
    """
    source = CSRC / SOURCES[name]
    ldflags = _link_flags()
    key = hashlib.sha256("\0".join([source.read_text(), paddle.__version__, sys.version, _cpu_signature(),
                                    *CFLAGS, *ldflags]).encode()).hexdigest()[:16]
    root = kernel_dir()
    folder = root / f"{name}-{key}"
    fixes = ("install a C++ compiler (apt install g++), set ORTHOAD_KERNEL_DIR to a writable folder of "
             "yours, or export with --head matmul")
    _check_root(root, source, fixes)
    cached = folder.is_dir()
    output: list[str] = []
    try:
        return _compile(name, source, ldflags, folder, output)
    except (RuntimeError, OSError, ImportError) as exc:  # compiler missing or failing, bad folder
        if not cached:
            raise _build_error(source, folder, output, exc, fixes) from exc
    shutil.rmtree(folder, ignore_errors=True)  # a cached build that no longer loads: build it again
    try:
        return _compile(name, source, ldflags, folder, output)
    except (RuntimeError, OSError, ImportError) as exc:
        raise _build_error(source, folder, output, exc, fixes) from exc


def _build_error(source: Path, folder: Path, output: list[str], exc: Exception, fixes: str) -> ConfigError:
    """One line: the compiler's error line (or the exception's text) and what to do."""
    reason = " ".join((output[0] if output else str(exc)).split())[:200]
    return ConfigError(f"{source}: cannot build the compiled CPU head in {folder} "
                       f"({type(exc).__name__}: {reason}); {fixes}")


def _compile(name: str, source: Path, ldflags: list[str], folder: Path, output: list[str]) -> ModuleType:
    """``cpp_extension.load`` into ``folder`` under a file lock; ``output`` gets the build's error line."""
    from paddle.utils import cpp_extension  # imported here: only the compiled head needs it

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:  # one build at a time (test workers, processes)
        fcntl.flock(lock, fcntl.LOCK_EX)
        with _captured_output(output):  # Paddle's and the compiler's progress and warnings
            return cpp_extension.load(name=name, sources=[str(source)], extra_cxx_cflags=CFLAGS,
                                      extra_ldflags=ldflags, build_directory=str(folder))


def _check_root(root: Path, source: Path, fixes: str) -> None:
    """Refuse a kernel folder that others may write to (they could plant a library that we would
    load) or whose path Paddle's build command (a shell line) cannot take."""
    if not _SAFE_PATH.fullmatch(str(root)):
        raise ConfigError(f"{source}: cannot build the compiled CPU head in {root}: the path holds "
                          "spaces or shell characters; set ORTHOAD_KERNEL_DIR to a plain path")
    try:
        root.mkdir(parents=True, exist_ok=True)
        info = root.stat()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot build the compiled CPU head in {root} "
                          f"({type(exc).__name__}: {exc.strerror}); {fixes}") from exc
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(f"{root}: kernel folder is writable by other users (or not yours), so a "
                          "library found there may not be ours; set ORTHOAD_KERNEL_DIR to a folder "
                          "only you can write")
