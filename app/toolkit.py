"""Everything the web app needs from the toolkit, in one place (the app imports nothing else of it).

Model-level API only: build_model / fit / calibrate / score / save, and the deploy export.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import InputError, ToolkitError
from core.scores import normalized_score
from datasets import AnomalyDataset, BatchLoader, Preprocess, denormalize, list_samples, read_image
from datasets.mvtec import IMAGE_SUFFIXES, Sample, resolve_categories
from datasets.synthetic import DEMO_ROOT, generate
from deploy.export import export_model
from deploy.visualize import heat_overlay, outline_overlay
from engine.workflow import calibration_indices
from models import METHODS, AnomalyModel, build_model, model_config
from models.components.trained import TrainedModel

__all__ = ["METHODS", "AnomalyModel", "ToolkitError"]  # re-exported for the page

ARCHS = ("resnet18", "resnet50", "wide_resnet50_2")
CALIB_IMAGES = 200
Progress = Callable[[int, int, str], None]
"""Called with (images done, images in all, a note: the epoch and a trained method's last loss)
while fitting."""


@dataclass
class FitSettings:
    """What the page asks for. ``k`` None = the method's default."""

    method: str = "ortho"
    arch: str = "resnet18"
    k: int | None = None
    image_size: int = 256
    pretrained: str = "imagenet"
    seed: int = 0
    batch_size: int = 8
    options: dict[str, Any] = field(default_factory=dict)
    """Further method options by field name (a trained method's ``epochs``, ``lr``, ...)."""


@dataclass
class Scored:
    """One scored image: the network input, heat map overlay and outline, uint8 (S, S, 3) each."""

    image: np.ndarray
    heatmap: np.ndarray
    outline: np.ndarray
    score: float
    normalized: float
    threshold: float
    anomalous: bool


def demo_data() -> Path:
    """The generated demo dataset (written on first use), as train.py uses it."""
    return generate(DEMO_ROOT)


def categories(root: str | Path) -> list[str]:
    """Categories (folders with train/good) under a dataset root in MVTec layout."""
    return resolve_categories(Path(root), "all")


def train_samples(root: str | Path, category: str) -> list[Sample]:
    """The train/good images of ``root/category``."""
    return list_samples(Path(root), category, "train")


def test_images(root: str | Path, category: str) -> list[Path]:
    """The test images of ``root/category`` (good first, then each defect folder)."""
    return [sample.path for sample in list_samples(Path(root), category, "test")]


def check_image(path: str | Path) -> Path:
    """``path`` if it has an image suffix and decodes as an image; else one InputError."""
    path = Path(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise InputError(f"{path.name}: not an image file (allowed: {', '.join(IMAGE_SUFFIXES)})")
    read_image(path)
    return path


def upload_samples(paths: Sequence[str | Path]) -> list[Sample]:
    """Uploaded good images as training samples; each must be an image (InputError otherwise)."""
    if not paths:
        raise InputError("no good images uploaded")
    return [Sample(check_image(p), 0, "good", None) for p in paths]


def planned_images(model: AnomalyModel, count: int, batch_size: int) -> int:
    """Images a fit of ``count`` training images in batches of ``batch_size`` visits: every epoch's,
    or those of a trained method's step budget (full epochs, then the budget's last batches)."""
    budget = model.max_steps if isinstance(model, TrainedModel) else None
    if budget is None:
        return model.epochs * count
    full, rest = divmod(budget, -(-count // batch_size))
    return full * count + min(rest * batch_size, count)


def fit(samples: Sequence[Sample], settings: FitSettings, progress: Progress,
        category: str = "") -> AnomalyModel:
    """A model of ``category`` fitted on ``samples``, calibrated on (up to 200 of) them.

    Runs the model's epochs (one for the statistics methods) in its epoch order, as train.py does,
    and stops when a trained method's step budget is spent; ``progress`` is called after every
    batch with the images done over the whole fit and a note (epoch, last loss). ``settings.k``
    is skipped for a method without ``k``."""
    config = model_config(settings.method, strict=False, k=settings.k, arch=settings.arch,
                          image_size=settings.image_size, resize=settings.image_size,
                          pretrained=settings.pretrained, seed=settings.seed, **settings.options)
    model = build_model(config)
    model.category = category
    dataset = AnomalyDataset(list(samples), Preprocess(resize=settings.image_size))
    total = planned_images(model, len(dataset), settings.batch_size)
    done = 0
    progress(done, total, "")
    for epoch in range(model.epochs):
        order = model.epoch_order(len(dataset), epoch).tolist()
        for batch in BatchLoader(dataset, settings.batch_size, num_workers=0, indices=order):
            model.partial_fit(batch["images"], batch["paths"])
            done += len(batch["paths"])
            note = [f"epoch {epoch + 1}"] if model.epochs > 1 else []
            note += [f"{name} {value:.4g}" for name, value in model.progress().items()]
            progress(done, total, ", ".join(note))
            if model.fit_done():
                break
        model.end_epoch()
        if model.fit_done():
            break
    model.finalize()
    picked = calibration_indices(len(dataset), CALIB_IMAGES)
    model.calibrate(BatchLoader(dataset, settings.batch_size, num_workers=0, indices=picked))
    return model


def score_image(model: AnomalyModel, path: str | Path) -> Scored:
    """Score one image file; heat map colours span 0 to 1.5 x threshold (as predict.py's)."""
    pre = Preprocess(resize=model.config.resize, crop_size=model.config.image_size)
    images = pre(read_image(check_image(path)))[None]
    amaps, scores = model.score(images, [str(path)])
    threshold = float(model.threshold)
    score_min = 0.0 if model.score_min is None else model.score_min
    rgb = denormalize(images[0])
    return Scored(image=rgb, heatmap=heat_overlay(rgb, amaps[0], 0.0, 1.5 * threshold),
                  outline=outline_overlay(rgb, amaps[0] > threshold), score=float(scores[0]),
                  normalized=float(normalized_score(scores[0], score_min, threshold)),
                  threshold=threshold, anomalous=bool(scores[0] > threshold))


def export_zip(model: AnomalyModel, work: Path) -> Path:
    """Export ``model`` (fused, PIR json) into ``work`` and return a zip of the export folder."""
    name = f"{model.config.method}_{model.config.arch}_{model.category or 'model'}"
    folder = Path(tempfile.mkdtemp(dir=work)) / name
    export_model(model, folder, source="web app")
    return Path(shutil.make_archive(str(folder), "zip", root_dir=folder.parent, base_dir=name))
