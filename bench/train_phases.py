"""Run train.py's main in this process and time its phases; prints one JSON line.

    python bench/train_phases.py -- --data_path data/mtd --pretrained none \
        --arch wide_resnet50_2 --k 300 --method padim

Everything after ``--`` goes to train.py unchanged. Phases, each as wall seconds and CPU seconds
of the whole process (all threads; the data loader runs on threads): ``fit`` from the start to
the call of ``finalize`` (graphs built, every training image read, embedded and folded),
``finalize``, ``threshold`` (``calibrate``), ``inverse`` (the Gaussian methods form their inverse
covariances when first needed, i.e. inside ``save``), ``save`` (the rest of it) and ``eval``. Peak RSS (the
process's maximum resident set) is read at the end of each phase, so the phase that set it shows.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402
from models.base import AnomalyModel  # noqa: E402
from models.components import gaussian_model  # noqa: E402

phases: list[dict[str, Any]] = []
_mark = {"wall": 0.0, "cpu": 0.0}


def close_phase(name: str) -> None:
    """End the current phase under ``name`` (from the previous mark to now)."""
    wall, cpu = time.perf_counter(), time.process_time()
    phases.append({"phase": name, "wall_s": wall - _mark["wall"], "cpu_s": cpu - _mark["cpu"],
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0})
    _mark.update(wall=wall, cpu=cpu)


def timed(before: str, after: str, function: Callable) -> Callable:
    """``function`` wrapped: the phase ``before`` ends when it is called, ``after`` when it returns."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        close_phase(before)
        result = function(*args, **kwargs)
        close_phase(after)
        return result

    return wrapper


def main() -> None:
    argv = sys.argv[sys.argv.index("--") + 1 :] if "--" in sys.argv else sys.argv[1:]
    AnomalyModel.calibrate = timed("between", "threshold", AnomalyModel.calibrate)
    AnomalyModel.save = timed("between", "save", AnomalyModel.save)
    gaussian_model.gaussian_of = timed("save", "inverse", gaussian_model.gaussian_of)
    for cls in AnomalyModel.__subclasses__():
        for sub in [cls, *cls.__subclasses__()]:
            if "finalize" in vars(sub):
                sub.finalize = timed("fit", "finalize", vars(sub)["finalize"])
    _mark.update(wall=time.perf_counter(), cpu=time.process_time())
    start = _mark["wall"]
    train.main(argv)
    close_phase("eval")
    merged: dict[str, dict[str, float]] = {}
    for row in phases:
        entry = merged.setdefault(row["phase"], {"wall_s": 0.0, "cpu_s": 0.0, "peak_rss_mb": 0.0})
        entry["wall_s"] += row["wall_s"]
        entry["cpu_s"] += row["cpu_s"]
        entry["peak_rss_mb"] = max(entry["peak_rss_mb"], row["peak_rss_mb"])
    print(json.dumps({"argv": argv, "total_wall_s": time.perf_counter() - start,
                      "total_cpu_s": time.process_time(), "phases": merged}))


if __name__ == "__main__":
    main()
