"""Finalize alone: per-position inverse covariances, batched LAPACK vs the slice-by-slice path.

    python bench/bench_finalize.py [--k 100 300] [--positions 4096]

For each k: random fold statistics (two accumulators sharing a triangle store, 2k images), then
- batched ``numpy.linalg.inv`` of the (P, k, k) covariances with OpenBLAS's default threads and
  with one thread (issue #11 item 13; the earlier finalize also converted the scatter back from
  the fitting basis and built the mean a second time);
- :func:`models.components.gaussian.gaussian_of` (the folds' rank-one terms as one ``dsyr2k``, Cholesky
  ``dpotrf`` and LAPACK's inverse ``dpotri``, in place; slices on 1 or 2 threads of one BLAS thread each);
- :func:`models.components.gaussian.squared_distances` for 100 images (the out-of-fold threshold's solve).
Wall and process CPU seconds; results printed and written to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import machine, update_section  # noqa: E402
from models.components.gaussian import GaussianAccumulator, gaussian_of, squared_distances  # noqa: E402


def timed(work: Callable[[], object]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    return time.perf_counter() - wall, time.process_time() - cpu


def folds(positions: int, k: int, threads: int) -> list[GaussianAccumulator]:
    rng = np.random.default_rng(k)
    first = GaussianAccumulator(positions, k, block=16, threads=threads)
    second = GaussianAccumulator(positions, k, block=16, threads=threads, partner=first)
    mix = rng.standard_normal((k, k)).astype(np.float32) / np.sqrt(k)
    for index in range(2 * k):
        z = rng.standard_normal((1, positions, k)).astype(np.float32) @ mix
        (first if index % 2 else second).update(z)
    first.flush()
    second.flush()
    return [first, second]


def batched_inv(covariance: np.ndarray, threads: int | None) -> None:
    if threads is None:
        np.linalg.inv(covariance)
        return
    with threadpool_limits(threads, user_api="blas"):
        np.linalg.inv(covariance)


def rows_for(k: int, positions: int) -> list[str]:
    parts = folds(positions, k, threads=2)
    covariance = parts[0].covariance(0.01)  # (P, k, k) float64, for the batched LAPACK rows
    queries = np.random.default_rng(1).standard_normal((100, positions, k)).astype(np.float32)
    cases: list[tuple[str, Callable[[], object]]] = [
        ("numpy.linalg.inv, batched, OpenBLAS default threads", lambda: batched_inv(covariance, None)),
        ("numpy.linalg.inv, batched, 1 BLAS thread", lambda: batched_inv(covariance, 1)),
    ]
    for threads in (1, 2):
        def run(threads: int = threads) -> None:
            for part in parts:
                part.threads = threads
            gaussian_of(parts, 0.01)

        cases.append((f"gaussian_of (dsyr2k + dpotrf + dpotri), {threads} thread(s)", run))
    cases.append(("squared_distances of 100 images, one fold, 2 threads",
                  lambda: squared_distances(parts[:1], 0.01, None, queries)))
    rows = []
    for name, work in cases:
        wall, cpu = timed(work)
        rows.append(f"| {k} | {name} | {wall:.2f} | {cpu:.2f} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, nargs="+", default=[100, 300])
    parser.add_argument("--positions", type=int, default=4096)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    rows = [row for k in args.k for row in rows_for(k, args.positions)]
    body = "\n".join([
        "## Finalize alone (bench/bench_finalize.py)",
        "",
        f"Command: `python bench/bench_finalize.py --k {' '.join(map(str, args.k))}` on {machine()}; "
        f"load average {load:.1f} at the start (shared machine). P = {args.positions} positions, "
        "random fold statistics; wall and process CPU seconds.",
        "",
        "| k | step | wall s | CPU s |",
        "|---|---|---|---|",
        *rows,
    ])
    update_section("bench_finalize", body)


if __name__ == "__main__":
    main()
