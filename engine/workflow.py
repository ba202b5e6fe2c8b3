"""What train.py and eval.py do per category: fit, calibrate, save, evaluate."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from datasets import AnomalyDataset, BatchLoader, Preprocess, list_samples, resolve_categories
from datasets.synthetic import generate
from engine.cli import DEMO_ROOT
from engine.device import select_device
from engine.evaluate import metrics, score_batches
from engine.runtime import Runtime
from models import AnomalyModel, ModelConfig, build_model


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


def runtime_from(args: argparse.Namespace) -> Runtime:
    """Runtime from --device / --engine / --cpu_threads / --enable_mkldnn (device is checked)."""
    select_device(args.device)
    return Runtime(engine=args.engine, device=args.device, cpu_threads=args.cpu_threads,
                   enable_mkldnn=args.enable_mkldnn)


def config_from(args: argparse.Namespace) -> ModelConfig:
    """Model configuration from the model and data arguments."""
    return ModelConfig(method=args.method, arch=args.arch, k=args.k,
                       image_size=preprocess_from(args).size, resize=args.resize, eps=args.eps,
                       seed=args.seed, pretrained=args.pretrained)


def with_progress(loader: BatchLoader, total: int, desc: str) -> Iterator[dict[str, Any]]:
    """Yield the loader's batches while a tqdm bar counts images."""
    with tqdm(total=total, desc=desc, unit="img", file=sys.stderr, leave=False) as bar:
        for batch in loader:
            yield batch
            bar.update(len(batch["paths"]))


def calibration_indices(count: int, limit: int) -> list[int]:
    """Up to ``limit`` indices spread evenly over range(count) (0 = all of them)."""
    if limit <= 0 or limit >= count:
        return list(range(count))
    return sorted(set(np.linspace(0, count - 1, limit).round().astype(int).tolist()))


def fit_category(args: argparse.Namespace, root: Path, category: str,
                 runtime: Runtime) -> AnomalyModel:
    """Fit one category on its train/good images, set the threshold, return the model."""
    preprocess = preprocess_from(args)
    dataset = AnomalyDataset(list_samples(root, category, "train"), preprocess)
    model = build_model(config_from(args), runtime)
    model.category = category
    loader = BatchLoader(dataset, args.batch_size, args.num_workers)
    model.fit(with_progress(loader, len(dataset), f"fit {category}"))
    picked = calibration_indices(len(dataset), args.calib_images)
    calib = BatchLoader(dataset, args.batch_size, args.num_workers, indices=picked)
    model.calibrate(with_progress(calib, len(picked), f"threshold {category}"))
    return model


def evaluate_category(args: argparse.Namespace, root: Path, category: str,
                      model: AnomalyModel) -> dict[str, Any]:
    """Score the test split of ``category`` and compute the metrics row."""
    samples = list_samples(root, category, "test")
    dataset = AnomalyDataset(samples, preprocess_from(args))
    loader = BatchLoader(dataset, args.batch_size, args.num_workers)
    scored = score_batches(model, with_progress(loader, len(samples), f"test {category}"))
    rule = "midpoint" if args.non_partial_AUC else "trapezoid"
    return metrics(scored, category, args.eval_PRO, rule)
