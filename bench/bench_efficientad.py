"""EfficientAD vs PUAD on the magnetic-tile data (or a MVTec LOCO-style root), with our PaDiM export
as the inference reference.

    python -m datasets.magnetic_tile --src ../shared/data/magnetic_tile --dst data/mtd
    python bench/bench_efficientad.py [--data_path data/mtd --category magnetic_tile] [--steps 100]
        [--distill_steps 100] [--size s] [--image_size 256] [--batch_size 4] [--images 30]

No ImageNet here: the teacher PDN is distilled (``python -m models.efficientad.distill``,
``--distill_steps`` steps) from a random-initialised resnet18; the student and autoencoder train
``--steps`` steps through train.py's workflow (validation: validation/good, else 15 % of
train/good). Each method runs in its own process (``--run``) so that its peak RSS is its own:
fit (timed; steps/s counts the optimizer steps alone), image AUROC on the test split (and, on a
root whose evaluation reports them, every per-type image AUROC column, e.g. MVTec LOCO's logical
and structural ones), then the fused export timed as infer.py runs it (Paddle Inference, oneDNN,
batch 1, ``--threads`` threads (2), ``--images`` test images after 3 untimed). PaDiM (resnet18
random, k=100) is fitted and exported the same way for the latency comparison. Prints a Markdown
table and writes it to docs/benchmarks.md (section bench_efficientad, or
bench_efficientad_<category> for another category) unless ``--no_doc``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_infer import SOURCE, infer_stages  # noqa: E402
from bench.bench_methods import spread  # noqa: E402
from bench.report import load_note, machine, update_section  # noqa: E402
from core.inference import PredictorOptions  # noqa: E402
from datasets import Preprocess, list_samples  # noqa: E402
from datasets.magnetic_tile import CATEGORY, convert  # noqa: E402
from deploy import DeployedModel, export_model  # noqa: E402
from engine.workflow import DataPlan, EvalPlan, FitPlan, evaluate_category, train_category  # noqa: E402
from models import Runtime, method_class, model_config  # noqa: E402
from models.components.trained import TrainedModel  # noqa: E402

WARMUP = 3
SECTION = "bench_efficientad"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_path", default="data/mtd",
                        help="dataset root (the magnetic-tile one is made from ../shared/data if missing)")
    parser.add_argument("--category", default=CATEGORY, help=f"category (default {CATEGORY})")
    parser.add_argument("--size", default="s", help="PDN size s or m (default s)")
    parser.add_argument("--steps", type=int, default=100, help="student/autoencoder steps (default 100)")
    parser.add_argument("--distill_steps", type=int, default=100, help="teacher steps (default 100)")
    parser.add_argument("--image_size", type=int, default=256, help="input side (default 256)")
    parser.add_argument("--batch_size", type=int, default=4, help="images per step (default 4)")
    parser.add_argument("--images", type=int, default=30, help="timed test images (default 30)")
    parser.add_argument("--train_images", type=int, default=0,
                        help="use this many train/good images, spread by name (default 0: all)")
    parser.add_argument("--test_images", type=int, default=0,
                        help="use this many test images, spread by name over all folders (default 0: all)")
    parser.add_argument("--threads", type=int, default=2,
                        help="CPU threads of training and inference (default 2)")
    parser.add_argument("--no_doc", action="store_true", help="print only, leave docs/ alone")
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)  # one method, in a child
    return parser.parse_args()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_one(spec: dict) -> dict:
    """Fit, evaluate, export and time one method in this process; its report."""
    root, category, size = Path(spec["data_path"]), spec["category"], spec["image_size"]
    config = model_config(spec["method"], arch="resnet18", pretrained="none", image_size=size,
                          resize=size, seed=0, **spec["options"])
    data = DataPlan(root, Preprocess(size), batch_size=spec["batch_size"], num_workers=2)
    folder = Path(spec["folder"])
    cls = method_class(spec["method"])
    step_seconds: list[float] = []
    original = cls.partial_fit

    def timed_step(self: object, images: np.ndarray, paths: list[str] | None = None) -> None:
        start = time.perf_counter()
        original(self, images, paths)
        step_seconds.append(time.perf_counter() - start)

    cls.partial_fit = timed_step  # the bench's own timer around the optimizer step
    runtime = Runtime(engine="inference", cpu_threads=spec["threads"])
    start = time.perf_counter()
    model = train_category(FitPlan(data, config, folder, calib_images=200), category, runtime)
    fit_seconds = time.perf_counter() - start
    cls.partial_fit = original
    row = evaluate_category(EvalPlan(data), category, model)
    export_model(model, folder / "export", "json")
    deployed = DeployedModel.load(folder / "export" / "model.json",
                                  options=PredictorOptions(cpu_threads=spec["threads"], enable_mkldnn=True,
                                                           max_batch_size=1))
    tests = [s.path for s in list_samples(root, category, "test")]
    picked = [tests[i] for i in np.linspace(0, len(tests) - 1, spec["images"] + WARMUP).round().astype(int)]
    stages, _ = infer_stages(deployed, picked, WARMUP)
    total = sum(stages.values())
    return {"fit_s": fit_seconds, "steps": len(step_seconds),
            "steps_per_s": len(step_seconds) / sum(step_seconds) if issubclass(cls, TrainedModel) else None,
            "auroc": {key: value for key, value in row.items() if key.startswith("image_auroc")},
            "infer_ms": float(np.median(total)), "inference_ms": float(np.median(stages["inference"])),
            "rss_mb": peak_rss_mb()}


def child(spec: dict) -> dict:
    """:func:`run_one` in a fresh process."""
    proc = subprocess.run([sys.executable, __file__, "--run", json.dumps(spec)], capture_output=True,
                          text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{spec['method']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def distil(args: argparse.Namespace, root: Path, out: Path) -> tuple[float, float]:
    """The teacher from a random resnet18 on the category's training images: (seconds, peak MB)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "models.efficientad.distill", "--arch", "resnet18",
                    "--pretrained", "none", "--images", str(root / args.category / "train"),
                    "--size", args.size, "--image_size", str(args.image_size), "--steps",
                    str(args.distill_steps), "--batch_size", "8", "--norm_images", "200",
                    "--cpu_threads", str(args.threads),
                    "--out", str(out)], check=True, cwd=ROOT, capture_output=True)
    return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0


def subset(root: Path, category: str, train: int, test: int, dst: Path) -> Path:
    """A root at ``dst`` whose ``category`` links ``train`` train/good and ``test`` test images of
    ``root`` (spread evenly by name; 0 = all), their masks, and validation/good if present."""
    source = root / category
    picks = [*spread(list_samples(root, category, "train"), train),
             *spread(list_samples(root, category, "test"), test)]
    for sample in picks:
        for path in (sample.path, sample.mask_path):
            if path is not None:
                link = dst / category / path.relative_to(source)
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(path.resolve())
    if (source / "validation").is_dir():
        (dst / category / "validation").symlink_to((source / "validation").resolve())
    for extra in source.glob("*.json"):  # defects_config.json of a LOCO root
        (dst / category / extra.name).symlink_to(extra.resolve())
    return dst


def table(reports: dict[str, dict]) -> str:
    columns = sorted({key for report in reports.values() for key in report["auroc"]})
    lines = [f"| method | {' | '.join(columns)} | fit s | steps/s | infer.py ms/image (inference) "
             "| peak RSS MB |", "|---" * (len(columns) + 5) + "|"]
    for name, r in reports.items():
        aurocs = " | ".join(f"{r['auroc'][c]:.4f}" if r["auroc"].get(c) is not None else "–" for c in columns)
        rate = f"{r['steps_per_s']:.2f}" if r["steps_per_s"] else "–"
        lines.append(f"| {name} | {aurocs} | {r['fit_s']:.0f} | {rate} | {r['infer_ms']:.1f} "
                     f"({r['inference_ms']:.1f}) | {r['rss_mb']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    args = parse_args()
    if args.run:
        print(json.dumps(run_one(json.loads(args.run))))
        return 0
    load = os.getloadavg()[0]
    root = Path(args.data_path)
    if args.category == CATEGORY and not (root / CATEGORY).is_dir():
        convert(SOURCE, root)
    with tempfile.TemporaryDirectory() as tmp:
        if args.train_images or args.test_images:
            root = subset(root, args.category, args.train_images, args.test_images, Path(tmp) / "data")
        teacher = Path(tmp) / "teacher.npz"
        distil_seconds, distil_mb = distil(args, root, teacher)
        base = {"data_path": str(root), "category": args.category, "image_size": args.image_size,
                "images": args.images, "threads": args.threads}
        trained = {"teacher": str(teacher), "steps": args.steps, "size": args.size}
        runs = {
            f"efficientad PDN-{args.size.upper()}": {"method": "efficientad", "options": trained},
            f"puad PDN-{args.size.upper()} (student features)":
                {"method": "puad", "options": {**trained, "feature_extractor": "student"}},
            "padim resnet18 k=100 (reference)": {"method": "padim", "options": {"k": 100}},
        }
        reports = {}
        for index, (name, spec) in enumerate(runs.items()):
            batch = args.batch_size if spec["method"] != "padim" else 32
            reports[name] = child({**base, **spec, "batch_size": batch, "folder": f"{tmp}/run{index}"})
            print(f"{name}: {reports[name]}", file=sys.stderr)
    command = ("python bench/bench_efficientad.py " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items() if k not in ("no_doc", "run") and v is not None))
    used = (f"{args.train_images or 'all'} train/good and {args.test_images or 'all'} test images of "
            f"`{args.category}` ({args.data_path})")
    body = (f"## EfficientAD vs PUAD on `{args.category}` (bench/bench_efficientad.py)\n\n"
            f"Command: `{command}` on {machine()}; "
            f"{load_note(load, os.getloadavg()[0])}.\n\n"
            f"EfficientAD and PUAD on {used}, {args.image_size} px, teacher PDN-"
            f"{args.size.upper()} distilled {args.distill_steps} steps from a random resnet18 "
            f"({distil_seconds:.0f} s, peak {distil_mb:.0f} MB), student/autoencoder {args.steps} steps at "
            f"batch {args.batch_size}; no ImageNet weights or penalty images, so the AUROCs say the chain "
            f"works, not what the paper's weights reach. Inference: the fused export as infer.py runs it, "
            f"batch 1, {args.threads} thread(s), oneDNN, median over {args.images} images.\n\n"
            f"{table(reports)}\n")
    if not args.no_doc:
        section = SECTION if args.category == CATEGORY else f"{SECTION}_{args.category}"
        update_section(section, body)
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
