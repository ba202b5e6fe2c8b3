"""What train.py and eval.py do per category: fit, calibrate, save, evaluate."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from datasets import (
    AnomalyDataset,
    BatchLoader,
    Preprocess,
    Sample,
    denormalize,
    list_samples,
    resolve_categories,
    shard_indices,
)
from datasets.synthetic import generate
from engine.cli import DEMO_ROOT, model_dir
from engine.device import parse_device, select_device
from engine.distributed import Collective, World
from engine.errors import CheckpointError, ConfigError
from engine.evaluate import ScoredSet, metrics, score_batches
from engine.runtime import Runtime
from engine.visualize import four_panel, save_png
from models import AnomalyModel, ModelConfig, build_model, load_model, method_class, resolve_k


def data_root(args: argparse.Namespace) -> Path:
    """The dataset root: --data_path, or the demo data (generated on first use)."""
    if args.data_path:
        return Path(args.data_path)
    if not (DEMO_ROOT / ".synthetic.json").is_file():
        print(f"no --data_path: generating the demo dataset in {DEMO_ROOT}", file=sys.stderr)
    return generate(DEMO_ROOT)


def categories(args: argparse.Namespace, root: Path) -> list[str]:
    """Categories named by --category under ``root``."""
    return resolve_categories(root, args.category)


def preprocess_from(args: argparse.Namespace) -> Preprocess:
    """Preprocessing from --resize / --crop_size."""
    return Preprocess(resize=args.resize, crop_size=args.crop_size)


def runtime_from(args: argparse.Namespace, world: World | None = None) -> Runtime:
    """Runtime from --device / --engine / --cpu_threads / --enable_mkldnn (device is checked).

    Launched on GPUs, each process takes the GPU the launcher selected for it.
    """
    device = args.device
    if world is not None and world.size > 1 and parse_device(device)[0] == "gpu":
        device = f"gpu:{os.environ.get('FLAGS_selected_gpus', world.local_rank)}"
    device = select_device(device)
    return Runtime(engine=args.engine, device=device, cpu_threads=args.cpu_threads,
                   enable_mkldnn=args.enable_mkldnn)


def config_from(args: argparse.Namespace) -> ModelConfig:
    """Model configuration from the model and data arguments."""
    return ModelConfig(method=args.method, arch=args.arch, k=resolve_k(args.method, args.k),
                       image_size=preprocess_from(args).size, resize=args.resize, eps=args.eps,
                       seed=args.seed, pretrained=args.pretrained,
                       coreset_ratio=args.coreset_ratio, projection_dim=args.projection_dim,
                       num_neighbors=args.num_neighbors, half=args.half)


def with_progress(loader: BatchLoader, total: int, desc: str,
                  show: bool = True) -> Iterator[dict[str, Any]]:
    """Yield the loader's batches while a tqdm bar counts images."""
    with tqdm(total=total, desc=desc, unit="img", file=sys.stderr, leave=False,
              disable=not show) as bar:
        for batch in loader:
            yield batch
            bar.update(len(batch["paths"]))


def calibration_indices(count: int, limit: int) -> list[int]:
    """Up to ``limit`` indices spread evenly over range(count) (0 = all of them)."""
    if limit <= 0 or limit >= count:
        return list(range(count))
    return sorted(set(np.linspace(0, count - 1, limit).round().astype(int).tolist()))


def fit_state_path(args: argparse.Namespace, category: str) -> Path:
    """Where an unfinished fit of ``category`` is saved for --resume."""
    return model_dir(args.save_path, args.method, args.arch, args.k) / f"{category}.fitstate.npz"


def samples_digest(samples: Sequence[Sample]) -> str:
    """SHA-256 of the ordered training file list (a resumed fit must see the same list)."""
    return hashlib.sha256("\n".join(str(s.path) for s in samples).encode()).hexdigest()


def _start(args: argparse.Namespace, category: str, runtime: Runtime,
           digest: str) -> AnomalyModel:
    """A new model, or with --resume the saved fit state of an interrupted run."""
    path = fit_state_path(args, category)
    if not args.resume or not path.is_file():
        if args.resume:
            print(f"{category}: no fit state at {path}; starting from the beginning", file=sys.stderr)
        model = build_model(config_from(args), runtime)
        model.category = category
        return model
    config = config_from(args)
    model = load_model(str(path), expect=config.identity(), runtime=runtime)
    changed = [name for name, value in dataclasses.asdict(config).items()
               if getattr(model.config, name) != value]
    if changed:
        was = ", ".join(f"{name}={getattr(model.config, name)}" for name in changed)
        now = ", ".join(f"{name}={getattr(config, name)}" for name in changed)
        raise CheckpointError(f"{path}: this fit state was made with {was}, this run asks for {now}; "
                              "pass the same arguments to resume, or delete it to start over")
    if model.fitted or model.meta.get("train_images_sha256") != digest:
        raise CheckpointError(
            f"{path}: this fit state belongs to another list of training images (or is finished); "
            "delete it to start over, or restore the training folder"
        )
    print(f"{category}: resuming after {model.n_train} images from {path}", file=sys.stderr)
    return model


def fit_category(args: argparse.Namespace, root: Path, category: str, runtime: Runtime,
                 world: World) -> AnomalyModel | None:
    """Fit one category on (this process's shard of) its train/good images.

    Saves the fit state every --save_every images, resumes from it with --resume; with several
    processes, combines their statistics. Returns the finalised and calibrated model on the main
    process, None on the others.
    """
    method_class(args.method).check_world(world.size)
    samples = list_samples(root, category, "train")
    dataset = AnomalyDataset(samples, preprocess_from(args))
    if world.size > 1 and (args.resume or args.save_every):
        raise ConfigError("--resume and --save_every work in a single process; drop them or "
                          "run without paddle.distributed.launch")
    digest = samples_digest(samples)
    model = _start(args, category, runtime, digest)
    collective = Collective(world) if world.size > 1 else None
    shard = shard_indices(len(dataset), world.rank, world.size)[model.n_train:]
    loader = BatchLoader(dataset, args.batch_size, args.num_workers, indices=shard)
    saved = model.n_train
    for batch in with_progress(loader, len(shard), f"fit {category}", world.is_main):
        model.partial_fit(batch["images"], batch["paths"])
        if args.save_every and model.n_train - saved >= args.save_every:
            model.save(str(fit_state_path(args, category)),
                       extra={"train_images_sha256": digest})
            saved = model.n_train
    if collective is not None:
        model.reduce_across(collective)
    if not world.is_main:
        return None
    model.finalize()
    picked = calibration_indices(len(dataset), args.calib_images)
    calib = BatchLoader(dataset, args.batch_size, args.num_workers, indices=picked)
    model.calibrate(with_progress(calib, len(picked), f"threshold {category}"))
    return model


def model_preprocess(model: AnomalyModel) -> Preprocess:
    """The preprocessing a checkpoint was fitted with (its resize and input side)."""
    return Preprocess(resize=model.config.resize, crop_size=model.config.image_size)


def save_test_pictures(folder: Path, dataset: AnomalyDataset, scored: ScoredSet,
                       threshold: float) -> None:
    """Write ``folder/<defect>_<name>.png`` for every test image: image, ground truth (when the
    image has a mask), heat map (0 to 1.5 x threshold, as predict.py), mask ``map > threshold``
    and its boundary. ``scored`` holds the maps (N, S, S) and scores (N,) of ``dataset``, in order."""
    for index, sample in enumerate(dataset.samples):
        item = dataset[index]
        score = float(scored.scores[index])
        flag = "yes" if score > threshold else "no"
        title = f"{sample.defect} score={score:.4f} threshold={threshold:.4f} anomalous={flag}"
        panel = four_panel(denormalize(item["image"]), scored.maps[index], threshold, 0.0,
                           1.5 * threshold, title=title, ground_truth=item["mask"])
        save_png(folder / f"{sample.defect}_{sample.path.stem}.png", panel)


def evaluate_category(args: argparse.Namespace, root: Path, category: str,
                      model: AnomalyModel, out: Path) -> dict[str, Any]:
    """Score the test split of ``category`` and compute the metrics row.

    Images are preprocessed as the checkpoint was fitted; batches hold --test_batch_size images
    (default --batch_size); with --save_pic the pictures go to ``out/<category>/``.
    """
    samples = list_samples(root, category, "test")
    dataset = AnomalyDataset(samples, model_preprocess(model))
    loader = BatchLoader(dataset, args.test_batch_size or args.batch_size, args.num_workers)
    scored = score_batches(model, with_progress(loader, len(samples), f"test {category}"))
    if args.save_pic:
        if model.threshold is None:
            raise CheckpointError(f"{category}: the checkpoint holds no threshold (never calibrated), "
                                  "so --save_pic has no mask to draw; train it again")
        save_test_pictures(out / category, dataset, scored, model.threshold)
        print(f"{category}: wrote {len(samples)} pictures to {out / category}", file=sys.stderr)
    rule = "midpoint" if args.non_partial_AUC else "trapezoid"
    return metrics(scored, category, args.eval_PRO, rule)
