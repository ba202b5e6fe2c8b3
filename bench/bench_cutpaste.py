"""CutPaste on the magnetic-tile data: each variant trained for a time budget, then evaluated.

    python -m datasets.magnetic_tile --src ../shared/data/magnetic_tile --dst data/mtd
    python bench/bench_cutpaste.py --minutes 20            # the issue's run: 20 minutes per variant

resnet18 from random initialisation (seed 0), 256 px, backbone never frozen (a random backbone
has nothing to keep), batch ``--batch_size`` images (before augmentation), SGD at lr 0.03 with
the cosine schedule. Each variant (normal, scar, 3way, union) and the patch-level 3way model
(``--patch_size``, ``--patch_stride``) runs in its own process (its own peak RSS): two probe
steps measure the step time, the schedule is set to the number of steps that fit in
``--minutes``, the network trains that many steps, the Gaussian is fitted on the training images'
embeddings (``--calib_images``, 0 = all) and the test split (``--test_images``, 0 = all) is
scored. The same network untrained (random weights, the same density; image-level and patch-level)
is the baseline. ``--levels patch`` runs only the patch-level pair (its own section,
``bench_cutpaste_patch``), ``--levels image`` only the image-level runs. Figures:
image AUROC (pixel AUROC and PRO for the patch-level model), steps, steps/s, peak RSS; printed,
and with ``--write`` put into docs/benchmarks.md with the command.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_methods import peak_rss_mb, spawn, spread  # noqa: E402
from bench.report import load_note, machine, update_section  # noqa: E402
from datasets import AnomalyDataset, BatchLoader, Preprocess, list_samples  # noqa: E402
from engine.evaluate import metrics, score_batches  # noqa: E402
from models import Runtime, build_model, model_config  # noqa: E402
from models.cutpaste.model import DENSITY_ROWS  # noqa: E402

CATEGORY = "magnetic_tile"
VARIANTS = ("normal", "scar", "3way", "union")
PROBE_STEPS = 2


def build(spec: dict, steps: int):
    """A cutpaste model of ``spec`` whose schedule lasts ``steps`` steps."""
    config = model_config("cutpaste", image_size=spec["size"], resize=spec["size"], pretrained="none",
                          seed=0, variant=spec["variant"], epochs=max(steps, 1), freeze_backbone=0,
                          patch_size=spec["patch_size"], patch_stride=spec["patch_stride"])
    model = build_model(config, Runtime(engine="dynamic", cpu_threads=spec["threads"]))
    model.category = CATEGORY
    return model


def measure(spec: dict) -> dict:
    """Train (or not: the baseline), fit the density, evaluate; the report as a dict."""
    preprocess = Preprocess(spec["size"])
    train = AnomalyDataset(list_samples(spec["data_path"], CATEGORY, "train"), preprocess)
    loader = BatchLoader(train, spec["batch_size"], 2)
    steps, seconds = 0, 0.0
    if spec["variant"] != "untrained":
        probe = build(spec, PROBE_STEPS)
        start = time.perf_counter()
        probe.fit(loader)
        step_seconds = (time.perf_counter() - start) / PROBE_STEPS
        steps = max(1, int(spec["minutes"] * 60 / step_seconds))
        model = build(spec, steps)
        start = time.perf_counter()
        model.fit(loader)
        seconds = time.perf_counter() - start
    else:
        model = build({**spec, "variant": "3way"}, 1)
        model.finalize()
    train_rss = peak_rss_mb()
    start = time.perf_counter()
    model.calibrate(BatchLoader(train, spec["batch_size"], 2,
                                indices=spread(list(range(len(train))), spec["calib_images"])))
    density_seconds = time.perf_counter() - start
    test = AnomalyDataset(spread(list_samples(spec["data_path"], CATEGORY, "test"), spec["test_images"]),
                          preprocess)
    row = metrics(score_batches(model, BatchLoader(test, spec["batch_size"], 2)), CATEGORY,
                  bool(spec["patch_size"]), "trapezoid")
    losses = model.losses
    return {"label": spec["label"], "patch_size": spec["patch_size"], "steps": steps,
            "train_seconds": seconds,
            "steps_per_second": steps / seconds if seconds else None, "train_peak_rss_mb": train_rss,
            "density_seconds": density_seconds, "peak_rss_mb": peak_rss_mb(),
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "test_images": len(test),
            **{key: row[key] for key in ("image_auroc", "pixel_auroc", "pro")}}


def figure(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(results: list[dict]) -> list[str]:
    lines = ["| model | steps | training min | steps/s | first / last loss | image AUROC | pixel AUROC | PRO "
             "| peak RSS MB (training / all) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        patch = bool(r["patch_size"])
        lines.append(
            f"| {r['label']} | {r['steps']} | {r['train_seconds'] / 60:.1f} | "
            f"{figure(r['steps_per_second'], 3)} | "
            f"{figure(r['first_loss'], 3)} / {figure(r['last_loss'], 3)} | {r['image_auroc']:.4f} | "
            f"{figure(r['pixel_auroc'] if patch else None)} | {figure(r['pro'] if patch else None)} | "
            f"{r['train_peak_rss_mb']:.0f} / {r['peak_rss_mb']:.0f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_path", default="data/mtd")
    parser.add_argument("--minutes", type=float, default=20.0, help="training time per variant")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=32, help="images per step, before augmentation")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--levels", default="image,patch",
                        help="image: the untrained baseline and --variants; patch: the patch-level pair")
    parser.add_argument("--patch_size", type=int, default=64,
                        help="patch side of the patch-level pair (0: skip it)")
    parser.add_argument("--patch_stride", type=int, default=32)
    parser.add_argument("--calib_images", type=int, default=0, help="training images of the density (0: all)")
    parser.add_argument("--test_images", type=int, default=0, help="test images scored (0: all)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of each run")
    parser.add_argument("--parallel", type=int, default=1,
                        help="runs at a time (2 with --threads 1: each run has one of two cores)")
    parser.add_argument("--note", default="", help="said before the table (e.g. that the machine was loaded)")
    parser.add_argument("--write", action="store_true", help="put the section into docs/benchmarks.md")
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        print(json.dumps(measure(json.loads(args.run))))
        return
    base = {key: getattr(args, key) for key in ("data_path", "minutes", "size", "batch_size", "calib_images",
                                                "test_images", "threads")}
    levels = set(args.levels.split(","))
    if levels - {"image", "patch"}:
        parser.error(f"--levels {args.levels!r}: give image, patch or image,patch")
    if args.patch_size < 1:  # --patch_size 0: no patch-level pair
        if levels == {"patch"}:
            parser.error(f"--patch_size {args.patch_size}: the patch-level pair needs a patch side (e.g. 64)")
        levels.discard("patch")
    runs = []
    if "image" in levels:
        runs += [{**base, "variant": "untrained", "patch_size": 0, "patch_stride": 1,
                  "label": "untrained (random weights), same density"}]
        runs += [{**base, "variant": v, "patch_size": 0, "patch_stride": 1, "label": v}
                 for v in args.variants.split(",")]
    if "patch" in levels:
        patch = {"patch_size": args.patch_size, "patch_stride": args.patch_stride}
        where = f"patch {args.patch_size} px, stride {args.patch_stride}"
        runs += [{**base, **patch, "variant": "untrained", "label": f"untrained, {where}, same density"},
                 {**base, **patch, "variant": "3way", "label": f"3way, {where}"}]
    section_name = "bench_cutpaste" if "image" in levels else "bench_cutpaste_patch"
    load = os.getloadavg()[0]
    done: dict[int, dict] = {}
    with ThreadPoolExecutor(args.parallel) as pool:  # the trained runs first: they take longest
        order = sorted(range(len(runs)), key=lambda i: runs[i]["variant"] == "untrained")
        futures = {pool.submit(spawn, runs[i], __file__, "label"): i for i in order}
        for future in as_completed(futures):
            i = futures[future]
            done[i] = future.result()
            print(f"{runs[i]['label']}: {done[i]}", file=sys.stderr)
            report = section(args, [done[i] for i in sorted(done)], len(runs), load, "image" in levels)
            if args.write:  # after every run, so a stopped benchmark leaves the rows it measured
                update_section(section_name, report)
    print(report)


def section(args: argparse.Namespace, results: list[dict], total: int, load: float,
            image_level: bool) -> str:
    """The Markdown section of ``results`` (in run order), marked partial while runs are missing;
    ``image_level``: the runs include the image-level models (else only the patch-level pair)."""
    patch_level = any(r["patch_size"] for r in results)
    command = " ".join(["python bench/bench_cutpaste.py", *map(shlex.quote, sys.argv[1:])])
    partial = [f"**Partial: {len(results)} of {total} runs finished.**", ""] if len(results) < total else []
    lines = [
        "## CutPaste on the magnetic-tile data (bench/bench_cutpaste.py)" if image_level else
        "## CutPaste, patch-level, on the magnetic-tile data (bench/bench_cutpaste.py --levels patch)",
        "",
        f"Command: `{command}` on {machine()}; {load_note(load, os.getloadavg()[0])}.",
        "",
        *partial,
        *([args.note, ""] if args.note else []),
        f"resnet18 from random initialisation (seed 0), {args.size} px, {args.batch_size} images per step "
        f"before augmentation, backbone not frozen, SGD lr 0.03 with a cosine schedule over the steps "
        f"that fit in {args.minutes:g} minutes (timed by {PROBE_STEPS} probe steps); eager Paddle, "
        f"{args.threads} CPU thread(s) per run, {args.parallel} run(s) at a time, each in its own process. "
        f"Density: Ledoit-Wolf Gaussian of the L2-normalised embeddings of "
        f"{'all' if not args.calib_images else args.calib_images} training images (threshold out of fold); "
        + (f"a patch-level model's Gaussian is fitted on a seeded subset of at most {DENSITY_ROWS:,} of "
           "their patches; " if patch_level else "")
        + f"{results[0]['test_images']} test images scored."
        + (" The image-level models' maps are constant, so their pixel metrics are not given."
           if image_level else ""),
        "",
        *table(results),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
