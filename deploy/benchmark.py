"""``--enable_benchmark``: stage times, memory and predictor settings in auto_log's report format.

auto_log (PaddlePaddle's AutoLog, used by TIPC; not on PyPI) reports when it is installed;
otherwise :class:`StageLog` prints the same fields in the same ``[date] root INFO: key: value``
lines, so TIPC's log parsers read either. Both time stages the auto_log way: ``start()`` before
reading a batch, ``stamp()`` after preprocessing and after inference, ``end(stamp=True)`` after
postprocessing. auto_log reports means per batch; StageLog reports means per image (the same at
the default --batch_size 1).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import resource
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import paddle

TIME_KEYS = ("preprocess_time", "inference_time", "postprocess_time")
T = TypeVar("T")


class Timer(Protocol):
    """auto_log's ``Times`` protocol."""

    def start(self) -> None: ...
    def stamp(self) -> None: ...
    def end(self, stamp: bool = False) -> None: ...


@dataclass
class RunInfo:
    """What the report describes: model, precision, batch, input shape, predictor settings."""

    model_name: str
    precision: str
    batch_size: int
    input_shape: list[int]
    status: dict[str, Any]
    gpu_id: int | None = None


def timed(batches: Iterable[T], timer: Timer) -> Iterator[T]:
    """Yield from ``batches``, calling ``timer.start()`` before and ``stamp()`` after each read."""
    items = iter(batches)
    while True:
        timer.start()
        try:
            item = next(items)
        except StopIteration:
            return
        timer.stamp()
        yield item


@dataclass
class StageTimes:
    """Seconds spent in each stage of each batch (``times[key]``), the auto_log way."""

    times: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in TIME_KEYS})
    _stamps: list[float] = field(default_factory=list)

    def start(self) -> None:
        self._stamps = [time.perf_counter()]

    def stamp(self) -> None:
        now = time.perf_counter()
        self.times[TIME_KEYS[len(self._stamps) - 1]].append(now - self._stamps[-1])
        self._stamps.append(now)

    def end(self, stamp: bool = False) -> None:
        if stamp:
            self.stamp()


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB (ru_maxrss is KiB on Linux)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def gpu_memory(gpu_id: int | None) -> tuple[float | None, float | None]:
    """(used MB, utilisation %) of a GPU from nvidia-smi; (None, None) without GPU or tool."""
    tool = shutil.which("nvidia-smi")
    if gpu_id is None or tool is None:
        return None, None
    query = [tool, "--query-gpu=memory.used,utilization.gpu", "--format=csv,noheader,nounits",
             "-i", str(gpu_id)]
    try:
        used, util = subprocess.run(query, capture_output=True, text=True, timeout=10,
                                    check=True).stdout.split(",")[:2]
        return float(used), float(util)
    except (OSError, ValueError, subprocess.SubprocessError):
        return None, None


class StageLog:
    """The project's own benchmark log, printing auto_log's fields (used without auto_log)."""

    def __init__(self, info: RunInfo) -> None:
        self.info = info
        self.times = StageTimes()

    def _lines(self, images: int) -> list[str]:
        info, times = self.info, self.times.times
        per_image = {k: round(sum(v) * 1000.0 / max(images, 1), 4) for k, v in times.items()}
        gpu_mb, gpu_util = gpu_memory(info.gpu_id)
        status = info.status
        # Keys and spelling as auto_log prints them (TIPC's parsers match them).
        return [
            "---------------------- Env info ----------------------",
            f" OS_version: {platform.platform()}",
            f" CUDA_version: {paddle.version.cuda()}",
            f" CUDNN_version: {paddle.version.cudnn()}",
            " drivier_version: None",
            "---------------------- Paddle info ----------------------",
            f" paddle_version: {paddle.__version__}",
            f" paddle_commit: {paddle.__git_commit__}",
            " log_api_version: 1.0",
            "----------------------- Conf info -----------------------",
            *(f" {key}: {value}" for key, value in status.items()),
            "----------------------- Model info ----------------------",
            f" model_name: {info.model_name}",
            f" precision: {info.precision}",
            "----------------------- Data info -----------------------",
            f" batch_size: {info.batch_size}",
            f" input_shape: {info.input_shape}",
            f" data_num: {images}",
            "----------------------- Perf info -----------------------",
            f" cpu_rss(MB): {peak_rss_mb()}, gpu_rss(MB): {gpu_mb}, gpu_util: {gpu_util}%",
            f" total time spent(s): {round(sum(sum(v) for v in times.values()), 4)}",
            f" preprocess_time(ms): {per_image['preprocess_time']}, "
            f"inference_time(ms): {per_image['inference_time']}, "
            f"postprocess_time(ms): {per_image['postprocess_time']}",
        ]

    def report(self, images: int) -> None:
        """Print the report for ``images`` timed images."""
        stamp = time.strftime("%Y/%m/%d %H:%M:%S")
        for line in self._lines(images):
            print(f"[{stamp}] root INFO: {line}", flush=True)


class AutoLog:
    """auto_log's AutoLogger behind the same interface; its report() exits, which is caught."""

    def __init__(self, info: RunInfo) -> None:
        auto_log = importlib.import_module("auto_log")
        self.logger = auto_log.AutoLogger(
            model_name=info.model_name, model_precision=info.precision,
            batch_size=info.batch_size, data_shape=info.input_shape, save_path=None,
            inference_config=info.status, pids=os.getpid(), process_name=None,
            gpu_ids=info.gpu_id, time_keys=list(TIME_KEYS), warmup=0,
        )
        self.times = self.logger.times

    def report(self, images: int) -> None:
        """Print auto_log's report (it counts images itself)."""
        try:
            self.logger.report()
        except SystemExit:
            pass


def open_log(info: RunInfo) -> StageLog | AutoLog:
    """auto_log's logger when auto_log is installed, else the project's own."""
    if importlib.util.find_spec("auto_log") is not None:
        return AutoLog(info)
    return StageLog(info)
