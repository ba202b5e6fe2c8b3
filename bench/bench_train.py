"""train.py end to end, phase by phase: the users' settings (wide_resnet50_2 k=300) and the quick start.

    python -m datasets.magnetic_tile --src ../shared/data/magnetic_tile --dst data/mtd
    python bench/bench_train.py [--data_path data/mtd] [--only NAME ...]

Each case runs train.py's main in its own process (bench/train_phases.py), random-initialised
backbones, default settings otherwise (threshold from 200 training images scored out of fold,
checkpoint written): wall and process CPU seconds of the fit pass, finalize, threshold and save,
and the process's peak RSS. Goals (issue #12): WRN50 k=300 on the 762 magnetic-tile images with
peak RSS <= 6 GB, flat in the number of images (100 images run too), finalize + threshold <= 25%
of the whole run; the quick start (``train.py --pretrained none --eval --eval_PRO`` on the demo
data) under 60 s. bench/bench_peers.py measures anomalib's PaDiM fit on the same images.
Results are printed and written to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import machine, update_section  # noqa: E402

WIDE = ["--arch", "wide_resnet50_2", "--k", "300"]
PHASES = ("fit", "finalize", "threshold", "inverse", "save")
POST = ("finalize", "threshold", "inverse")


def subset(data_path: str, count: int, where: Path) -> str:
    """A dataset root whose magnetic_tile/train/good holds links to the first ``count`` images."""
    source = Path(data_path).resolve() / "magnetic_tile" / "train" / "good"
    target = where / "magnetic_tile" / "train" / "good"
    target.mkdir(parents=True)
    for path in sorted(source.iterdir())[:count]:
        (target / path.name).symlink_to(path)
    return str(where)


def cases(data_path: str, scratch: Path) -> dict[str, list[str]]:
    """Name -> train.py arguments."""
    data = ["--data_path", data_path, "--category", "magnetic_tile", "--pretrained", "none"]
    small = ["--data_path", subset(data_path, 100, scratch / "mtd100"), "--category",
             "magnetic_tile", "--pretrained", "none"]
    return {
        "padim wide_resnet50_2 k=300, 762 images": [*data, "--method", "padim", *WIDE],
        "padim wide_resnet50_2 k=300, 100 images": [*small, "--method", "padim", *WIDE],
        "ortho wide_resnet50_2 k=300, 762 images": [*data, "--method", "ortho", *WIDE],
        "padim resnet18 k=100, 762 images": [*data, "--method", "padim"],
        "ortho resnet18 k=100, 762 images": [*data, "--method", "ortho"],
        "quick start (demo data, --eval --eval_PRO)": ["--pretrained", "none", "--eval", "--eval_PRO"],
    }


def run(args: list[str], save_path: Path) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / "train_phases.py"), "--", *args,
           "--save_path", str(save_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def row(name: str, result: dict) -> str:
    phases = result["phases"]
    cells = [f"{phases[p]['wall_s']:.1f} / {phases[p]['cpu_s']:.1f}" if p in phases else "–"
             for p in PHASES]
    post = sum(phases[p]["wall_s"] for p in POST if p in phases)
    peak = max(p["peak_rss_mb"] for p in phases.values())
    return (f"| {name} | {' | '.join(cells)} | {result['total_wall_s']:.1f} | "
            f"{100 * post / result['total_wall_s']:.0f}% | {peak:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_path", default="data/mtd")
    parser.add_argument("--only", nargs="*", default=None, help="run only cases whose name contains these")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        scratch = Path(tmp)
        for index, (name, train_args) in enumerate(cases(args.data_path, scratch).items()):
            if args.only and not any(part in name for part in args.only):
                continue
            result = run(train_args, scratch / f"out{index}")
            rows.append(row(name, result))
            print(rows[-1], flush=True)
    load_end = os.getloadavg()[0]
    command = " ".join(["python bench/bench_train.py", *(f'--only "{o}"' for o in args.only or [])])
    body = "\n".join([
        "## train.py phase by phase (bench/bench_train.py)",
        "",
        f"Command: `{command}` on {machine()}; load average {load:.1f} at the "
        f"start, {load_end:.1f} at the end (the machine was shared with other jobs: wall times "
        "are inflated, CPU seconds less so).",
        "Random-initialised backbones, 256 px, default settings (2 CPU threads, threshold from 200 "
        "training images scored out of fold, checkpoint written); each run in its own process.",
        "",
        "| run | fit pass s (wall / CPU) | finalize s | threshold s | inverse s | save s | "
        "whole run wall s | finalize + threshold + inverse | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ])
    update_section("bench_train", body)


if __name__ == "__main__":
    main()
