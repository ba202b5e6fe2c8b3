"""Where PatchCore's per-image scoring time goes, on a bank of the size of coreset ratio 0.1.

    python -m datasets.magnetic_tile --src ../shared/data/magnetic_tile --dst data/mtd
    python bench/bench_bank.py [--data_path data/mtd] [--images 8] [--no_doc]

PatchCore (resnet18, random init, seed 0, 256 px, 2 threads) fitted with coreset ratio 1 on 76
magnetic-tile training images: a bank of 77,824 real patch features (384 wide), the size of the
ratio-0.1 bank of the full training set (78,028) without its minutes of coreset selection. Times,
per image (median of ``--images`` test images, wall and process CPU time):

- the fused scoring graph under Paddle Inference (``model.score``: train.py --eval, predict.py);
- its parts: the patch features alone (trunk + local average), and the distance product alone (one
  numpy float32 matrix product of the 1,024 patches by the bank, the arithmetic floor of a brute-force
  search);
- the held-out score of a training image (threshold calibration, numpy), and the preparation of
  the bank it searches (centred rows and norms), paid once per fit; before the prepared bank it was
  paid on each of the two searches per image.

Writes the bench_bank section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import machine, update_section  # noqa: E402
from datasets import AnomalyDataset, Preprocess, list_samples  # noqa: E402
from datasets.magnetic_tile import CATEGORY, convert  # noqa: E402
from models import Runtime, build_model, model_config  # noqa: E402
from models.components.knn import PreparedBank  # noqa: E402

SIZE, THREADS, FIT_IMAGES = 256, 2, 76
SOURCE = ROOT.parent / "shared" / "data" / "magnetic_tile"


def clocked(run: Callable[[int], object], count: int) -> tuple[float, float]:
    """Median wall and process-CPU milliseconds of ``run(i)``, i < count, after one untimed call."""
    run(0)
    wall, cpu = [], []
    for i in range(count):
        start, start_cpu = time.perf_counter(), time.process_time()
        run(i)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return 1000.0 * float(np.median(wall)), 1000.0 * float(np.median(cpu))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_path", default="data/mtd")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--no_doc", action="store_true", help="print only, leave docs/ alone")
    args = parser.parse_args()
    root = Path(args.data_path)
    if not (root / CATEGORY).is_dir():
        convert(SOURCE, root)
    load = os.getloadavg()[0]
    preprocess = Preprocess(SIZE)
    train = AnomalyDataset(list_samples(root, CATEGORY, "train")[:FIT_IMAGES], preprocess)
    test = AnomalyDataset(list_samples(root, CATEGORY, "test")[: args.images + 1], preprocess)
    images = np.stack([test[i]["image"] for i in range(len(test))])
    config = model_config("patchcore", arch="resnet18", image_size=SIZE, resize=SIZE, pretrained="none",
                         seed=0, coreset_ratio=1.0)
    model = build_model(config, Runtime(cpu_threads=THREADS))
    model.fit([np.stack([train[i]["image"] for i in range(j, min(j + 32, len(train)))])
               for j in range(0, len(train), 32)])
    patches = [next(model.extract(images[i : i + 1]))[1][0][0] for i in range(len(images))]
    bank = model.bank
    rows = {
        "fused scoring graph, Paddle Inference (model.score)": clocked(
            lambda i: model.score(images[i : i + 1]), args.images),
        "  patch features alone (trunk + 3x3 average)": clocked(
            lambda i: next(model.extract(images[i : i + 1])), args.images),
        "  distance product alone (numpy, 1,024 x 384 by 384 x M)": clocked(
            lambda i: patches[i] @ bank.T, args.images),
        "held-out score of a training image (threshold, numpy)": clocked(
            lambda i: model._image_score(patches[i], model.bank_owner == i), args.images),
        "bank preparation (once per fit; per search before)": clocked(
            lambda i: PreparedBank(bank), 3),
    }
    lines = [
        "## PatchCore scoring time by part (bench/bench_bank.py)", "",
        f"Command: `python bench/bench_bank.py --images {args.images}` on {machine()}; load average "
        f"{load:.1f} at the start (**the machine was shared with other jobs**: wall times are "
        "inflated, CPU times less so). PatchCore, resnet18 (random init), 256 px, 2 threads, bank of "
        f"{len(bank):,} x {bank.shape[1]} real patch features (coreset ratio 1 on {FIT_IMAGES} "
        "training images: the size of the ratio-0.1 bank of all 762); medians over "
        f"{args.images} test images.", "",
        "| part | wall ms / image | process CPU ms / image |", "|---|---|---|",
        *[f"| {name} | {wall:.0f} | {cpu:.0f} |" for name, (wall, cpu) in rows.items()],
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_doc:
        update_section("bench_bank", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
