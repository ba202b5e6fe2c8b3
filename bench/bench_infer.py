"""Inference latency on magnetic-tile images: infer.py's fused export vs the backbone vs predict.py.

    python -m datasets.magnetic_tile --src ../shared/data/magnetic_tile --dst data/mtd
    python bench/bench_infer.py [--data_path data/mtd] [--images 50] [--fit_images 40]

resnet18, k=100, 256 px, batch 1, 2 CPU threads, oneDNN, random-initialised backbone, ortho fitted
on --fit_images training images; --images test images timed after --warmup others:
- infer.py: the fused export (model.json; model.pdmodel too, for comparison) run by
  deploy.DeployedModel.results, the loop infer.py runs: preprocess (read, resize, normalise),
  inference, postprocess; end-to-end = their sum (writing the PNG and results.jsonl is infer.py's
  reporting, not timed);
- the backbone alone: the trunk (layer1..3) exported the same way, same predictor settings, on
  images already preprocessed;
- predict.py --engine dynamic: the same preprocess + model.score under Runtime(engine="dynamic").
Target of the deploy issue: end-to-end <= 1.3 x backbone (medians). Prints a Markdown table and
updates the bench_infer section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import machine, update_section  # noqa: E402
from core.inference import Predictor, PredictorOptions  # noqa: E402
from core.runtime import Runtime, save_static  # noqa: E402
from datasets import AnomalyDataset, BatchLoader, Preprocess, list_samples, read_image  # noqa: E402
from datasets.magnetic_tile import CATEGORY, convert  # noqa: E402
from deploy import DeployedModel, export_model  # noqa: E402
from deploy.benchmark import StageTimes  # noqa: E402
from models import build_model, load_model, model_config  # noqa: E402

SIZE, K, THREADS, TARGET = 256, 100, 2, 1.3
SECTION = "bench_infer"
SOURCE = ROOT.parent / "shared" / "data" / "magnetic_tile"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_path", default="data/mtd",
                        help="converted magnetic-tile root (made from ../shared/data if missing)")
    parser.add_argument("--images", type=int, default=50, help="timed test images (default 50)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed images first (default 5)")
    parser.add_argument("--fit_images", type=int, default=40,
                        help="training images the model is fitted on (default 40)")
    parser.add_argument("--no_doc", action="store_true", help="print only, leave docs/ alone")
    return parser.parse_args()


def fit(root: Path, count: int, folder: Path) -> Path:
    """Fit and calibrate ortho on ``count`` training images; returns the checkpoint path."""
    config = model_config("ortho", arch="resnet18", k=K, image_size=SIZE, resize=SIZE, pretrained="none")
    model = build_model(config, Runtime(cpu_threads=THREADS))
    model.category = CATEGORY
    dataset = AnomalyDataset(list_samples(root, CATEGORY, "train")[:count], Preprocess(SIZE))
    model.fit(BatchLoader(dataset, 8, 0))
    model.calibrate(BatchLoader(dataset, 8, 0))
    path = folder / f"{CATEGORY}.npz"
    model.save(str(path))
    return path


def per_call_ms(run: Callable[[int], object], count: int, warmup: int) -> np.ndarray:
    """Milliseconds of ``run(i)`` for i in range(warmup, warmup + count), after untimed warm-up."""
    for i in range(warmup):
        run(i)
    times = []
    for i in range(warmup, warmup + count):
        start = time.perf_counter()
        run(i)
        times.append((time.perf_counter() - start) * 1000.0)
    return np.asarray(times)


def infer_stages(deployed: DeployedModel, paths: list[Path],
                 warmup: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per-image milliseconds of each infer.py stage over ``paths[warmup:]`` (batch 1), scores."""
    for _ in deployed.results(paths[:warmup], 1, StageTimes()):
        pass
    timer = StageTimes()
    scores = [score for *_, score in deployed.results(paths[warmup:], 1, timer)]
    stages = {key.removesuffix("_time"): np.asarray(value) * 1000.0
              for key, value in timer.times.items()}
    return stages, np.asarray(scores)


def cell(values: np.ndarray | None) -> str:
    """'median (mean)' in ms, or a dash."""
    return "–" if values is None else f"{np.median(values):.1f} ({values.mean():.1f})"


def table(rows: list[tuple[str, dict[str, np.ndarray]]], backbone: float) -> str:
    """Markdown table of stage latencies; the last column is the end-to-end median / backbone."""
    lines = ["| path (batch 1, 2 threads) | preprocess | inference | postprocess | end-to-end "
             "| x backbone |", "|---|---|---|---|---|---|"]
    for name, stages in rows:
        total = sum(stages.values())
        cells = [cell(stages.get(key)) for key in ("preprocess", "inference", "postprocess")]
        lines.append(f"| {name} | {' | '.join(cells)} | {cell(total)} "
                     f"| {np.median(total) / backbone:.2f} |")
    return "\n".join(lines)


Row = tuple[str, dict[str, np.ndarray]]


def measure(root: Path, paths: list[Path], args: argparse.Namespace,
            folder: Path) -> tuple[list[Row], float, float]:
    """Table rows (backbone, infer.py json and pdmodel, dynamic), fused params MB, score deviation.

    The deviation is the largest relative difference between infer.py's (model.json) and the
    dynamic graph's image scores.
    """
    model = load_model(str(fit(root, args.fit_images, folder)), runtime=Runtime(engine="dynamic"))
    options = PredictorOptions(cpu_threads=THREADS, enable_mkldnn=True, max_batch_size=1)
    rows, scores = [], {}
    for fmt in ("json", "pdmodel"):
        export_model(model, folder / fmt, fmt)
        deployed = DeployedModel.load(folder / fmt / f"model.{fmt}", options=options)
        stages, scores[fmt] = infer_stages(deployed, paths, args.warmup)
        rows.append((f"infer.py, fused model.{fmt} (Paddle Inference)", stages))
    params_mb = (folder / "json" / "model.pdiparams").stat().st_size / 2**20
    images = [deployed.preprocess(read_image(p))[None] for p in paths]
    dynamic_scores: list[float] = []
    dynamic = per_call_ms(lambda i: dynamic_scores.append(float(model.score(images[i])[1][0])),
                          args.images, args.warmup)
    reference = np.asarray(dynamic_scores[args.warmup:])
    deviation = float(np.max(np.abs(scores["json"] - reference) / np.abs(reference)))
    # Last: tracing makes model.trunk static, which would change the dynamic figures.
    trunk_file = save_static(model.trunk, [None, 3, SIZE, SIZE], str(folder / "trunk" / "model"))
    trunk = Predictor(trunk_file, str(folder / "trunk" / "model.pdiparams"), options)
    backbone = per_call_ms(lambda i: trunk.run(images[i]), args.images, args.warmup)
    rows = [("backbone alone (layer1-3, Paddle Inference)", {"inference": backbone}), *rows,
            ("predict.py --engine dynamic (model.score)",
             {"preprocess": rows[0][1]["preprocess"], "inference": dynamic})]
    return rows, params_mb, deviation


def main() -> int:
    args = parse_args()
    root = Path(args.data_path)
    if not (root / CATEGORY).is_dir():
        convert(SOURCE, root)
    samples = list_samples(root, CATEGORY, "test")
    picks = np.linspace(0, len(samples) - 1, args.warmup + args.images).round().astype(int)
    paths = [samples[i].path for i in picks]
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-infer-") as tmp:
        rows, params_mb, deviation = measure(root, paths, args, Path(tmp))
    backbone = float(np.median(rows[0][1]["inference"]))
    ratio = float(np.median(sum(rows[1][1].values()))) / backbone
    verdict = "met" if ratio <= TARGET else "missed"
    body = "\n".join([
        "## Inference latency (bench/bench_infer.py)", "",
        f"Command: `python bench/bench_infer.py --data_path {args.data_path} --images {args.images} "
        f"--warmup {args.warmup} --fit_images {args.fit_images}` on {machine()}; load average "
        f"{load:.2f} at the start. resnet18, k={K}, {SIZE} px, ortho "
        f"fitted on {args.fit_images} magnetic-tile training images (random-initialised backbone), "
        f"{args.images} test images timed after {args.warmup} warm-up images; fused params "
        f"{params_mb:.0f} MB. Milliseconds per image, median (mean).", "",
        table(rows, backbone), "",
        f"Target end-to-end (model.json) <= {TARGET} x backbone: {verdict} ({ratio:.2f} x). The "
        "predict.py row uses infer.py's preprocess times (the same code). Largest relative "
        f"difference between infer.py's and the dynamic graph's image scores: {deviation:.1e}.",
    ])
    print(body)
    if not args.no_doc:
        update_section(SECTION, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
