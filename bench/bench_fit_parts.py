"""Where a fit's time goes, part by part, on the magnetic-tile training set (issue: core fit).

    python -m datasets.magnetic_tile --src ../shared/data/magnetic_tile --dst data/mtd
    python bench/bench_fit_parts.py [--data_path data/mtd] [--images N]

ortho, resnet18 (random init), k=100, 256 px, 2 CPU threads, batch 1 per predictor call. Each part
is timed alone, so its cost is not hidden by or mixed with the others: reading and preprocessing
images (one thread), the backbone (layer1-3 predictor, oneDNN), the fit embedding (backbone plus
projection to (P, k) rows, the graph the fit runs), the Gaussian accumulation (copy into the block
buffer and float64 block products, on one thread, after one warm-up block), then the fit of
in-memory images and the real fit (images read from disk by 2 loader threads). Core-ms = ms x the
cores the part keeps busy. Printed and written to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import machine, update_section  # noqa: E402
from core.runtime import Runtime, compile_layer  # noqa: E402
from datasets import AnomalyDataset, BatchLoader, Preprocess, list_samples  # noqa: E402
from models import build_model, model_config  # noqa: E402
from models.components.backbone import ResNetTrunk  # noqa: E402
from models.components.gaussian import GaussianAccumulator  # noqa: E402
from models.components.gaussian_model import GaussianModel  # noqa: E402

SIZE, K, THREADS = 256, 100, 2


def ms_per_image(work: Callable[[], None], count: int) -> float:
    """Wall milliseconds per image of ``work`` (which handles ``count`` images), best of two."""
    best = np.inf
    for _ in range(2):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return 1000.0 * best / count


def new_model() -> GaussianModel:
    config = model_config("ortho", k=K, image_size=SIZE, resize=SIZE, pretrained="none")
    return build_model(config, Runtime(engine="inference", cpu_threads=THREADS))


def measure(data_path: str, count: int) -> tuple[list[tuple[str, float, int]], int]:
    """(part, ms per image, cores it keeps busy) for each part, and the number of images."""
    samples = list_samples(data_path, "magnetic_tile", "train")
    dataset = AnomalyDataset(samples[: count or len(samples)], Preprocess(SIZE))
    count = len(dataset)
    images = np.stack([dataset[i]["image"] for i in range(count)])
    rows: list[tuple[str, float, int]] = []

    def read() -> None:
        for _ in BatchLoader(dataset, 32, 0):
            pass

    rows.append(("read + preprocess (one thread)", ms_per_image(read, count), 1))
    trunk = compile_layer(ResNetTrunk("resnet18"), SIZE, Runtime(cpu_threads=THREADS))
    trunk(images[:2])
    rows.append(("backbone alone, layer1-3 predictor",
                 ms_per_image(lambda: [trunk(images[i : i + 1]) for i in range(count)], count), 2))
    model = new_model()
    features = np.concatenate([z for _, z in model.embed(images)])  # (count, P, k); builds the graph
    rows.append(("fit embedding: backbone + projection to (P, k) rows",
                 ms_per_image(lambda: [None for _ in model.embed(images)], count), 2))
    accumulator = GaussianAccumulator(features.shape[1], K)
    accumulator.update(features[: accumulator.block])  # first block: shift, page faults
    accumulator.flush()

    def accumulate() -> None:
        for row in features:
            accumulator.update(row[None])
        accumulator.flush()

    rows.append((f"Gaussian accumulation, float64 blocks of {accumulator.block} (one thread)",
                 ms_per_image(accumulate, count), 1))

    rows.append(("fit, images in memory (embedding + accumulation)",
                 fit_ms(lambda: ((images[i : i + 32], None) for i in range(0, count, 32)), count), 2))
    for workers in (2, 1, 0):
        rows.append((f"fit, images read from disk (--num_workers {workers})",
                     fit_ms(lambda w=workers: ((b["images"], b["paths"])
                                               for b in BatchLoader(dataset, 32, w)), count), 2))
    return rows, count


def fit_ms(batches: Callable[[], Iterator[tuple[np.ndarray, list[str] | None]]], count: int) -> float:
    """Milliseconds per image of the statistics pass of a new model over ``batches()``, after its
    graph is built (the one-off build is not part of the per-image cost)."""
    model = new_model()
    warm = next(batches())[0][:1]
    for _ in model.embed(warm):
        pass
    start = time.perf_counter()
    for images, paths in batches():
        model.partial_fit(images, paths)
    for fold in model.folds:
        fold.flush()
    return 1000.0 * (time.perf_counter() - start) / count


def report(rows: list[tuple[str, float, int]], count: int, command: str) -> str:
    parts = {name: ms for name, ms, _ in rows}
    backbone = parts["backbone alone, layer1-3 predictor"]
    goal_ms = backbone / 0.8
    embed = parts["fit embedding: backbone + projection to (P, k) rows"]
    extra = [(name, ms * cores) for name, ms, cores in rows if cores == 1]
    lines = [
        "## Fit time by part (bench/bench_fit_parts.py)",
        "",
        f"Command: `{command}` on {machine()}.",
        f"ortho, resnet18 (random init), k={K}, {SIZE} px, {THREADS} CPU threads, batch 1 per "
        f"predictor call; {count} magnetic-tile training images; each part timed alone.",
        "",
        "| part | ms / image | cores busy | core-ms / image |",
        "|---|---|---|---|",
        *(f"| {name} | {ms:.2f} | {cores} | {ms * cores:.2f} |" for name, ms, cores in rows),
        "",
        f"The fit-throughput goal (0.8x the backbone alone) allows {goal_ms:.2f} ms per image, "
        f"{2 * goal_ms:.1f} core-ms on the 2 cores. The fit embedding alone uses "
        f"{2 * embed:.1f} of them, which leaves {2 * (goal_ms - embed):.1f} core-ms for "
        + " and ".join(f"{name.split(' (')[0]} ({core_ms:.2f})" for name, core_ms in extra)
        + f", {sum(c for _, c in extra):.1f} core-ms together even if the parts overlapped "
        "perfectly.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_path", default="data/mtd")
    parser.add_argument("--images", type=int, default=0,
                        help="training images to time with (default 0: all of them)")
    args = parser.parse_args()
    command = "python bench/bench_fit_parts.py" + (f" --images {args.images}" if args.images else "")
    text = report(*measure(args.data_path, args.images), command)
    print(text)
    update_section("bench_fit_parts", text)


if __name__ == "__main__":
    main()
