"""The four methods side by side on the magnetic-tile data: speed, memory, bank size, accuracy.

    python -m datasets.magnetic_tile --src ../shared/data/magnetic_tile --dst data/mtd
    python bench/bench_methods.py [--data_path data/mtd] [--quick]

resnet18 (random init, seed 0), 256 px, 2 CPU threads, Paddle Inference with oneDNN: ortho
(k=100), padim (k=100), spade (k=50), patchcore (coreset ratio 0.01 and 0.1). Each run is its own
process (``--run``), so its peak RSS is its own: it fits on train/good (images read from disk),
sets the threshold (200 training images, held out), scores the test split and reports fit and
threshold time, the peak RSS of the fit, the latency of scoring one image (images in memory),
the size of the fitted arrays (bank, gallery or statistics), image AUROC, pixel AUROC and PRO.
Results are printed and written to docs/benchmarks.md. ``--quick`` (128 px, 60 training and 40
test images) only checks that the script works: it prints and writes nothing to the docs.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import machine, update_section  # noqa: E402
from datasets import AnomalyDataset, BatchLoader, Preprocess, list_samples  # noqa: E402
from engine.evaluate import metrics, score_batches  # noqa: E402
from engine.workflow import calibration_indices  # noqa: E402
from models import Runtime, build_model, model_config  # noqa: E402

CATEGORY = "magnetic_tile"
RUNS = (
    ("ortho", {"k": 100}),
    ("padim", {"k": 100}),
    ("spade", {"k": 50}),
    ("patchcore", {"coreset_ratio": 0.01}),
    ("patchcore", {"coreset_ratio": 0.1}),
)
LATENCY_IMAGES = 10


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def spread(items: list, count: int) -> list:
    """``count`` items spread evenly over ``items`` (all of them for 0)."""
    return [items[i] for i in calibration_indices(len(items), count)]


def measure(spec: dict) -> dict:
    """Fit, threshold and evaluate one configuration in this process; the report as a dict."""
    size, threads = spec["size"], spec["threads"]
    config = model_config(spec["method"], image_size=size, resize=size, pretrained="none",
                          seed=0, **spec["settings"])
    model = build_model(config, Runtime(engine="inference", cpu_threads=threads))
    model.category = CATEGORY
    preprocess = Preprocess(size)
    train = AnomalyDataset(spread(list_samples(spec["data_path"], CATEGORY, "train"), spec["train"]),
                           preprocess)
    start = time.perf_counter()
    model.fit(BatchLoader(train, 32, 2))
    fit_seconds = time.perf_counter() - start
    fit_rss = peak_rss_mb()
    start = time.perf_counter()
    model.calibrate(BatchLoader(train, 32, 2, indices=calibration_indices(len(train), 200)))
    threshold_seconds = time.perf_counter() - start
    test = AnomalyDataset(spread(list_samples(spec["data_path"], CATEGORY, "test"), spec["test"]),
                          preprocess)
    row = metrics(score_batches(model, BatchLoader(test, 32, 2)), CATEGORY, True, "trapezoid")
    images = np.stack([test[i]["image"] for i in range(LATENCY_IMAGES)])
    times = []
    for image in images:
        start = time.perf_counter()
        model.score(image[None])
        times.append(time.perf_counter() - start)
    arrays = model._arrays()  # the method's fitted arrays, as the checkpoint stores them
    return {
        "method": spec["method"], "settings": spec["settings"], "train_images": model.n_train,
        "test_images": len(test), "fit_seconds": fit_seconds,
        "threshold_seconds": threshold_seconds, "fit_peak_rss_mb": fit_rss,
        "ms_per_image": 1000.0 * float(np.median(times)),
        "fitted_mb": sum(a.nbytes for a in arrays.values()) / 2**20,
        "bank_rows": int(len(arrays["bank"])) if "bank" in arrays else None,
        **{key: row[key] for key in ("image_auroc", "pixel_auroc", "pro")},
    }


def spawn(spec: dict, script: str = __file__, first_key: str = "method") -> dict:
    """``script --run SPEC`` (its :func:`measure`) in a new process (its own peak RSS); the result
    is the last stdout line holding a JSON object that starts with ``first_key``."""
    cmd = [sys.executable, str(Path(script).resolve()), "--run", json.dumps(spec)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith(f'{{"{first_key}"')]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"run failed: {' '.join(cmd)}\n{out.stdout}\n{out.stderr}")
    return json.loads(lines[-1])


def label(result: dict) -> str:
    settings = ", ".join(f"{key}={value}" for key, value in result["settings"].items())
    return f"{result['method']} ({settings})"


def table(results: list[dict]) -> list[str]:
    lines = [
        "| method | fit s | threshold s | fit peak RSS MB | ms / image | fitted arrays MB | "
        "image AUROC | pixel AUROC | PRO |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows = f" ({r['bank_rows']:,} patches)" if r["bank_rows"] is not None else ""
        lines.append(
            f"| {label(r)} | {r['fit_seconds']:.1f} | {r['threshold_seconds']:.1f} | "
            f"{r['fit_peak_rss_mb']:.0f} | {r['ms_per_image']:.0f} | {r['fitted_mb']:.1f}{rows} | "
            f"{r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} | {r['pro']:.4f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_path", default="data/mtd")
    parser.add_argument("--quick", action="store_true",
                        help="128 px, 60 training and 40 test images: checks the script only")
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        print(json.dumps(measure(json.loads(args.run))))
        return
    size, train, test = (128, 60, 40) if args.quick else (256, 0, 0)
    results = []
    for method, settings in RUNS:
        spec = {"data_path": args.data_path, "method": method, "settings": settings, "size": size,
                "train": train, "test": test, "threads": 2}
        results.append(spawn(spec))
        print(f"{label(results[-1])}: done", file=sys.stderr)
    first = results[0]
    lines = [
        "## Methods side by side (bench/bench_methods.py)",
        "",
        f"Command: `python bench/bench_methods.py{' --quick' if args.quick else ''}` on {machine()}.",
        f"resnet18 (random init, seed 0), {size} px, magnetic-tile data: {first['train_images']} "
        f"training images (read from disk), {first['test_images']} test images; Paddle Inference + "
        "oneDNN, 2 CPU threads; each run in its own process.",
        "",
        *table(results),
        "",
        "fit = features of every training image + finalize (statistics, gallery, or coreset "
        "selection); threshold = held-out scores of up to 200 training images; fit peak RSS = the "
        "process's maximum resident set at the end of the fit; ms / image = median time to score "
        f"one image held in memory ({LATENCY_IMAGES} images); fitted arrays = what the checkpoint "
        "stores besides the backbone.",
    ]
    report = "\n".join(lines)
    print(report)
    if not args.quick:
        update_section("bench_methods", report)


if __name__ == "__main__":
    main()
