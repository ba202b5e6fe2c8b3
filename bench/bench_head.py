"""The fused export's Mahalanobis head: full inverses, Cholesky factor blocks, compiled CPU operator.

    python -m datasets.magnetic_tile --src ../shared/data/magnetic_tile --dst data/mtd
    python bench/bench_head.py [--data_path data/mtd] [--images 40] [--fit_images 100]

resnet18 (random init), k=100, 256 px, ortho fitted on --fit_images magnetic-tile training
images; 2 CPU threads, Paddle Inference + oneDNN. The same fused pipeline is saved with the
distance layer computing (z - mean)^T inv_cov (z - mean) from the full matrices (blocks=0, the
previous export) and ||(z - mean) @ L||^2 from 2 or 3 column blocks of the inverse's Cholesky
factor (models.layers.factor_blocks; 2 is the export's default), and with the compiled CPU
operator over the packed triangular factor (export_model.py --head kernel), stored in float32,
float16 or bfloat16 (--head_precision). Latency: --images
test images, every variant (and the trunk alone, and the trunk with the embedding: what a variant
adds to it is its distance and smoothing) run in turn on each image, at batch 1 and in batches of
8; medians. Error: every test image through each variant (batches of 8) against the full-matrix
graph: largest |map - full| / max|full| over the test set, and image AUROC / pixel AUROC / PRO.
Updates the bench_head section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_infer import SIZE, SOURCE, THREADS, fit  # noqa: E402
from bench.report import load_note, machine, update_section  # noqa: E402
from core.inference import Predictor, PredictorOptions  # noqa: E402
from core.runtime import Runtime, save_static  # noqa: E402
from datasets import AnomalyDataset, BatchLoader, Preprocess, list_samples, read_image  # noqa: E402
from datasets.magnetic_tile import CATEGORY, convert  # noqa: E402
from engine.evaluate import metrics, score_batches  # noqa: E402
from models import load_model  # noqa: E402
from models.components.gaussian_model import Pipeline  # noqa: E402
from models.components.layers import MahalanobisMap  # noqa: E402

SECTION = "bench_head"
VARIANTS = {"full inverse matrices (blocks=0, before)": {"blocks": 0},
            "Cholesky factor, 2 blocks (default)": {"blocks": 2},
            "Cholesky factor, 3 blocks": {"blocks": 3},
            "compiled CPU operator, packed factor (--head kernel)": {"kernel": True},
            "compiled operator, float16 factor (fp16)": {"kernel": True, "precision": "fp16"},
            "compiled operator, bfloat16 factor (bf16)": {"kernel": True, "precision": "bf16"}}
TRUNK, EMBEDDED = "trunk alone (layer1-3)", "trunk + embedding (no distance, no smoothing)"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_path", default="data/mtd",
                        help="converted magnetic-tile root (made from ../shared/data if missing)")
    parser.add_argument("--images", type=int, default=40, help="timed test images (default 40)")
    parser.add_argument("--fit_images", type=int, default=100,
                        help="training images the model is fitted on (default 100)")
    parser.add_argument("--no_doc", action="store_true", help="print only, leave docs/ alone")
    return parser.parse_args()


class GraphScorer:
    """A saved fused graph run by Paddle Inference, with ``model.score``'s signature."""

    def __init__(self, layer: object, folder: Path) -> None:
        model_file = save_static(layer, [None, 3, SIZE, SIZE], str(folder / "model"))
        self.params_mb = (folder / "model.pdiparams").stat().st_size / 2**20
        self.run = Predictor(model_file, str(folder / "model.pdiparams"),
                             PredictorOptions(cpu_threads=THREADS)).run

    def score(self, images: np.ndarray, paths: object = None) -> tuple[np.ndarray, np.ndarray]:
        """Maps (N, S, S) and image scores (N,) of images (N, 3, S, S)."""
        amaps, scores = self.run(images)
        return amaps[:, 0], scores


def graphs(checkpoint: Path, folder: Path) -> tuple[dict[str, GraphScorer], dict[str, Predictor]]:
    """The fused graph of each variant, and the parts before the distance: the trunk alone and the
    trunk with the embedding (same predictor settings)."""
    scorers = {}
    for index, (name, options) in enumerate(VARIANTS.items()):
        model = load_model(str(checkpoint), runtime=Runtime(engine="dynamic"))
        layer = model.fused_layer()
        layer.tail[0] = MahalanobisMap(model.mean, model.inv_cov, model.grid, **options)
        scorers[name] = GraphScorer(layer, folder / f"variant{index}")
    parts = {}
    for name, part in ((TRUNK, model.trunk), (EMBEDDED, Pipeline(model.trunk, model.embedding()))):
        part_folder = folder / f"part{len(parts)}"
        part_file = save_static(part, [None, 3, SIZE, SIZE], str(part_folder / "model"))
        parts[name] = Predictor(part_file, str(part_folder / "model.pdiparams"),
                                PredictorOptions(cpu_threads=THREADS))
    return scorers, parts


def latencies(scorers: dict[str, GraphScorer], parts: dict[str, Predictor],
              images: np.ndarray) -> dict[str, dict[int, float]]:
    """Median ms per image of every graph at batch 1 and 8; the graphs take turns on each input."""
    runs = {**{name: p.run for name, p in parts.items()}, **{name: s.run for name, s in scorers.items()}}
    times: dict[str, dict[int, list[float]]] = {name: {1: [], 8: []} for name in runs}
    for batch in (1, 8):
        inputs = [images[i:i + batch] for i in range(0, len(images) - batch + 1, batch)]
        for run in runs.values():  # warm-up: oneDNN primitives of this batch size
            run(inputs[0])
        for step, x in enumerate(inputs):
            names = list(runs)
            for name in names[step % len(names):] + names[:step % len(names)]:
                start = time.perf_counter()
                runs[name](x)
                times[name][batch].append((time.perf_counter() - start) * 1000.0 / batch)
    return {name: {b: float(np.median(v)) for b, v in by.items()} for name, by in times.items()}


def errors(scorers: dict[str, GraphScorer], root: Path) -> dict[str, dict[str, float]]:
    """Map error against the full-matrix graph and the test-set metrics of every variant."""
    dataset = AnomalyDataset(list_samples(root, CATEGORY, "test"), Preprocess(SIZE))
    out, reference = {}, None
    for name, scorer in scorers.items():
        scored = score_batches(scorer, BatchLoader(dataset, 8, 0))
        row = metrics(scored, CATEGORY, eval_pro=True, rule="trapezoid")
        reference = scored.maps if reference is None else reference
        row["map_error"] = float(np.abs(scored.maps - reference).max() / np.abs(reference).max())
        out[name] = row
    return out


def table(times: dict[str, dict[int, float]], rows: dict[str, dict[str, float]],
          scorers: dict[str, GraphScorer]) -> str:
    lines = ["| graph | params MB | batch 1 ms/image | batch 8 ms/image | batch 1 / batch 8 "
             "| map error vs full | image AUROC | pixel AUROC | PRO |", "|---" * 9 + "|"]
    for name, by in times.items():
        row, scorer = rows.get(name), scorers.get(name)
        size = f"{scorer.params_mb:.0f}" if scorer else "–"
        quality = (f"{row['map_error']:.1e} | {row['image_auroc']:.4f} | {row['pixel_auroc']:.4f} "
                   f"| {row['pro']:.4f}") if row else "– | – | – | –"
        lines.append(f"| {name} | {size} | {by[1]:.1f} | {by[8]:.1f} | {by[1] / by[8]:.2f} | {quality} |")
    return "\n".join(lines)


def main() -> int:
    args = parse_args()
    root = Path(args.data_path)
    if not (root / CATEGORY).is_dir():
        convert(SOURCE, root)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-head-") as tmp:
        scorers, parts = graphs(fit(root, args.fit_images, Path(tmp)), Path(tmp))
        samples = list_samples(root, CATEGORY, "test")
        picks = np.linspace(0, len(samples) - 1, args.images).round().astype(int)
        images = np.stack([Preprocess(SIZE)(read_image(samples[i].path)) for i in picks])
        times = latencies(scorers, parts, images)
        rows = errors(scorers, root)
    body = "\n".join([
        "## Mahalanobis head: full matrices, Cholesky factor blocks, compiled operator, 16-bit factor "
        "(bench/bench_head.py)", "",
        f"Command: `python bench/bench_head.py --data_path {args.data_path} --images {args.images} "
        f"--fit_images {args.fit_images}` on {machine()}; {load_note(load, os.getloadavg()[0])}; "
        f"the graphs took turns on each input. resnet18 (random init), k=100, {SIZE} px, ortho fitted on "
        f"{args.fit_images} magnetic-tile training images; fused graphs in Paddle Inference + oneDNN, "
        f"{THREADS} threads; latency = median over {args.images} test images; errors and metrics over "
        "the whole test set (load-independent).", "",
        table(times, rows, scorers),
    ])
    print(body)
    if not args.no_doc:
        update_section(SECTION, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
