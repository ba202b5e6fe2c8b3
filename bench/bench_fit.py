"""Fit speed and memory on the magnetic-tile training set (issues: core fit, scale).

    python -m datasets.magnetic_tile --src ../shared/data/magnetic_tile --dst data/mtd
    python bench/bench_fit.py [--data_path data/mtd] [--quick]

Measures, resnet18, k=100, 256 px, 2 CPU threads, random-initialised backbone:
- the backbone alone (layer1..3 as a Paddle Inference predictor with oneDNN, best of batch 1/2/4,
  images already in memory): its images/s is the reference "fastest mode";
- the fit (statistics pass, images read from disk) of ortho and padim: images/s and its ratio to
  the backbone (goal >= 0.8), peak RSS over all training images vs over 100 (goal <= 1.15x);
- the fit over the training set repeated to 5,000 images vs 500 (goal: RSS <= 1.1x), images/s;
- 2 processes x 1 thread vs 1 process x 2 threads (paddle.distributed.launch, gloo).
Each fit runs in its own process (bench/fit_worker.py) so peak RSS is its own. Results are printed
and written to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import machine, update_section  # noqa: E402
from core.runtime import Runtime, compile_layer  # noqa: E402
from datasets import AnomalyDataset, Preprocess, list_samples  # noqa: E402
from models.components.backbone import ResNetTrunk  # noqa: E402


def backbone_images_per_second(data_path: str, threads: int) -> tuple[float, int]:
    """Best images/s of the trunk alone over batch sizes 1, 2, 4 (64 images in memory)."""
    dataset = AnomalyDataset(list_samples(data_path, "magnetic_tile", "train")[:64], Preprocess(256))
    images = np.stack([dataset[i]["image"] for i in range(len(dataset))])
    run = compile_layer(ResNetTrunk("resnet18"), 256, Runtime(cpu_threads=threads))
    best = (0.0, 1)
    for batch in (1, 2, 4):
        for i in range(0, 8, batch):
            run(images[i : i + batch])
        start = time.perf_counter()
        for i in range(0, len(images), batch):
            run(images[i : i + batch])
        best = max(best, (len(images) / (time.perf_counter() - start), batch))
    return best


def worker(data_path: str, images: int, method: str = "ortho", threads: int = 2,
           processes: int = 1) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / "fit_worker.py"), "--data_path", data_path,
           "--images", str(images), "--method", method, "--threads", str(threads)]
    if processes > 1:
        cmd[1:1] = ["-m", "paddle.distributed.launch", "--nproc_per_node", str(processes),
                    "--log_dir", "/tmp/orthoad-bench-launch"]
    logs = Path("/tmp/orthoad-bench-launch")
    shutil.rmtree(logs, ignore_errors=True)
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    text = out.stdout
    if processes > 1:  # rank 0 prints into the launcher's log
        text += "".join(p.read_text() for p in sorted(logs.glob("workerlog.0")))
    lines = [line for line in text.splitlines() if line.startswith('{"images"')]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"worker failed: {' '.join(cmd)}\n{out.stdout}\n{out.stderr}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_path", default="data/mtd")
    parser.add_argument("--quick", action="store_true", help="skip the 5,000-image runs")
    args = parser.parse_args()
    backbone, batch = backbone_images_per_second(args.data_path, 2)
    rows, notes = [], []
    for method in ("ortho", "padim"):
        full = worker(args.data_path, 0, method)
        small = worker(args.data_path, 100, method)
        ratio = full["images_per_second"] / backbone
        rss = full["peak_rss_mb"] / small["peak_rss_mb"]
        rows.append(f"| {method} fit, {full['images']} images | {full['images_per_second']:.1f} | "
                    f"{ratio:.2f} (goal >= 0.8) | {full['peak_rss_mb']:.0f} | "
                    f"{rss:.3f} vs 100 images (goal <= 1.15) | {full['finalize_seconds']:.1f} |")
        notes.append(f"{method}: 100 images peak RSS {small['peak_rss_mb']:.0f} MB")
    if not args.quick:
        big = worker(args.data_path, 5000)
        base = worker(args.data_path, 500)
        rss = big["peak_rss_mb"] / base["peak_rss_mb"]
        rows.append(f"| ortho fit, 5,000 images (train set repeated) | {big['images_per_second']:.1f} "
                    f"| {big['images_per_second'] / backbone:.2f} | {big['peak_rss_mb']:.0f} | "
                    f"{rss:.3f} vs 500 images (goal <= 1.1) | {big['finalize_seconds']:.1f} |")
        notes.append(f"ortho: 500 images peak RSS {base['peak_rss_mb']:.0f} MB")
    one = worker(args.data_path, 0, threads=2)
    two = worker(args.data_path, 0, threads=1, processes=2)
    lines = [
        "## Fit speed and memory (bench/bench_fit.py)",
        "",
        f"Command: `python bench/bench_fit.py{' --quick' if args.quick else ''}` on {machine()}.",
        "resnet18 (random init), k=100, 256 px, magnetic-tile train set (762 images read from disk),",
        f"2 CPU threads. Backbone alone (layer1-3, Paddle Inference + oneDNN, images in memory, best "
        f"batch = {batch}): **{backbone:.1f} images/s**.",
        "",
        "| run | images/s | vs backbone | peak RSS MB | RSS ratio | finalize s |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "Processes vs threads on the same 762 images (ortho; RSS summed over processes):",
        "",
        "| layout | images/s | peak RSS MB |",
        "|---|---|---|",
        f"| 1 process x 2 threads | {one['images_per_second']:.1f} | {one['peak_rss_mb']:.0f} |",
        f"| 2 processes x 1 thread (gloo) | {two['images_per_second']:.1f} | "
        f"{two['peak_rss_mb']:.0f} |",
        "",
        "; ".join(notes) + ".",
    ]
    report = "\n".join(lines)
    print(report)
    update_section("bench_fit", report)


if __name__ == "__main__":
    main()
