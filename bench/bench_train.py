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
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import load_note, machine, update_section  # noqa: E402

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


def cases(data_path: str, scratch: Path, images: int) -> dict[str, list[str]]:
    """Name -> train.py arguments; ``images`` training images for the magnetic-tile runs (0 = all)."""
    root = data_path if not images else subset(data_path, images, scratch / f"mtd{images}")
    count = images or len(list((Path(data_path) / "magnetic_tile" / "train" / "good").iterdir()))
    data = ["--data_path", root, "--category", "magnetic_tile", "--pretrained", "none"]
    small = ["--data_path", subset(data_path, 100, scratch / "mtd100"), "--category",
             "magnetic_tile", "--pretrained", "none"]
    return {
        f"padim wide_resnet50_2 k=300, {count} images": [*data, "--method", "padim", *WIDE],
        "padim wide_resnet50_2 k=300, 100 images": [*small, "--method", "padim", *WIDE],
        f"ortho wide_resnet50_2 k=300, {count} images": [*data, "--method", "ortho", *WIDE],
        "ortho wide_resnet50_2 k=300, 100 images": [*small, "--method", "ortho", *WIDE],
        f"padim resnet18 k=100, {count} images": [*data, "--method", "padim"],
        f"ortho resnet18 k=100, {count} images": [*data, "--method", "ortho"],
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
    post_wall = sum(phases[p]["wall_s"] for p in POST if p in phases)
    post_cpu = sum(phases[p]["cpu_s"] for p in POST if p in phases)
    peak = max(p["peak_rss_mb"] for p in phases.values())
    return (f"| {name} | {' | '.join(cells)} | {result['total_wall_s']:.1f} / "
            f"{result['total_cpu_s']:.1f} | {100 * post_wall / result['total_wall_s']:.0f}% / "
            f"{100 * post_cpu / result['total_cpu_s']:.0f}% | {peak:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_path", default="data/mtd")
    parser.add_argument("--only", nargs="*", default=None, help="run only cases whose name contains these")
    parser.add_argument("--images", type=int, default=0,
                        help="magnetic-tile training images of the large runs (default 0: all 762)")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        scratch = Path(tmp)
        for index, (name, train_args) in enumerate(cases(args.data_path, scratch, args.images).items()):
            if args.only and not any(part in name for part in args.only):
                continue
            result = run(train_args, scratch / f"out{index}")
            rows.append(row(name, result))
            print(rows[-1], flush=True)
    load_end = os.getloadavg()[0]
    command = " ".join(["python bench/bench_train.py", *([f"--images {args.images}"] if args.images else []),
                        *(["--only", *map(shlex.quote, args.only)] if args.only else [])])
    body = "\n".join([
        "## train.py phase by phase (bench/bench_train.py)",
        "",
        f"Command: `{command}` on {machine()}; {load_note(load, load_end)}.",
        "Random-initialised backbones, 256 px, default settings (2 CPU threads, threshold from 200 "
        "training images scored out of fold, checkpoint written); each run in its own process.",
        "",
        "| run | fit pass s (wall / CPU) | finalize s | threshold s | inverse s | save s | "
        "whole run s (wall / CPU) | finalize + threshold + inverse (of wall / of CPU) | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ])
    update_section("bench_train", body)


if __name__ == "__main__":
    main()
