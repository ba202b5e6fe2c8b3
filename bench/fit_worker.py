"""One timed fit, as one process or as a rank of ``paddle.distributed.launch``; prints JSON.

    python bench/fit_worker.py --data_path data/mtd --images 762 --method ortho --threads 2
    python -m paddle.distributed.launch --nproc_per_node 2 bench/fit_worker.py --threads 1 ...

The training list is repeated to reach --images (no files are copied). Timing starts after the
graphs are built and one image has run, and ends when the statistics of all processes are
combined; finalising is timed separately. Peak RSS is the maximum resident set, summed over
the processes of a launched job.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.distributed import Collective, current_world  # noqa: E402
from core.runtime import Runtime  # noqa: E402
from datasets import AnomalyDataset, BatchLoader, Preprocess, list_samples, shard_indices  # noqa: E402
from models import build_model, model_config  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_path", default="data/mtd")
    parser.add_argument("--category", default="magnetic_tile")
    parser.add_argument("--images", type=int, default=0, help="0 = the training set once")
    parser.add_argument("--method", default="ortho")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_workers", type=int, default=2)
    args = parser.parse_args()
    world = current_world()
    samples = list_samples(args.data_path, args.category, "train")
    dataset = AnomalyDataset(samples, Preprocess(args.size))
    total = args.images or len(samples)
    order = [i % len(samples) for i in range(total)]
    shard = [order[i] for i in shard_indices(total, world.rank, world.size)]
    runtime = Runtime(engine="inference", cpu_threads=args.threads)
    config = model_config(args.method, k=args.k, image_size=args.size, resize=args.size,
                          pretrained="none")
    model = build_model(config, runtime)
    collective = Collective(world) if world.size > 1 else None
    warm = dataset[0]["image"][None]
    for _ in model.embed(warm):  # build the predictor outside the timed part
        pass
    start = time.perf_counter()
    for batch in BatchLoader(dataset, args.batch_size, args.num_workers, indices=shard):
        model.partial_fit(batch["images"])
    if collective is not None:
        model.reduce_across(collective)
    else:
        for fold in model.folds:  # fold what is still buffered
            fold.flush()
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    if world.is_main:
        model.finalize()
    finalize_seconds = time.perf_counter() - start
    if collective is not None:
        rss = float(collective.all_reduce_sum(np.array([peak_rss_mb()]))[0])
    else:
        rss = peak_rss_mb()
    if world.is_main:
        print(json.dumps({"images": total, "processes": world.size, "threads": args.threads,
                          "method": args.method, "fit_seconds": fit_seconds,
                          "images_per_second": total / fit_seconds,
                          "finalize_seconds": finalize_seconds, "peak_rss_mb": rss,
                          "n_train": model.n_train}))


if __name__ == "__main__":
    main()
