"""What train.py and eval.py do per category, driven by plans instead of parsed arguments.

    data = DataPlan(Path("data/mtd"), Preprocess(resize=256), batch_size=32, num_workers=2)
    plan = FitPlan(data, model_config("ortho", k=100, pretrained="none"), Path("output"),
                   save_every=5000, resume=True)
    model = train_category(plan, "magnetic_tile")          # fit, calibrate, save
    row = evaluate_category(EvalPlan(data, pro=True), "magnetic_tile", model)

A plan is built once per script (engine.cli builds them from the arguments) or by hand.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from core.distributed import Collective, World
from core.errors import CheckpointError, ConfigError
from core.runtime import Runtime
from datasets import (
    AnomalyDataset,
    BatchLoader,
    Preprocess,
    Sample,
    denormalize,
    list_samples,
    shard_indices,
    validation_split,
)
from datasets.mvtec_loco import is_loco
from deploy.visualize import four_panel, save_png
from engine.evaluate import ScoredSet, loco_metrics, metrics, score_batches
from engine.plots import write_plots
from models import AnomalyModel, ModelConfig, build_model, load_model, method_class


@dataclass(frozen=True)
class DataPlan:
    """Where the images are and how they are read: dataset root (MVTec layout), preprocessing,
    images per batch, loading threads (0 = the main thread)."""

    root: Path
    preprocess: Preprocess | None = None
    """None: each checkpoint's own (an evaluation); a fit needs it."""
    batch_size: int = 32
    num_workers: int = 2

    def loader(self, samples: Sequence[Sample], indices: Sequence[int] | None = None) -> BatchLoader:
        """Batches of ``samples`` (those at ``indices``, in that order; default all)."""
        dataset = AnomalyDataset(samples, self.preprocess)
        return BatchLoader(dataset, self.batch_size, self.num_workers, indices=indices)


@dataclass(frozen=True)
class FitPlan:
    """A fit: the data, the model configuration, where checkpoints go, the threshold's image count
    (0 = all training images), and saving every ``save_every`` images for ``resume``.

    Checkpoints are ``save_path/<run_name>/<category>.npz``; the fit state of an interrupted fit
    ``<category>.fitstate.npz`` beside them.
    """

    data: DataPlan
    config: ModelConfig
    save_path: Path = Path("output")
    calib_images: int = 200
    save_every: int = 0
    resume: bool = False

    def __post_init__(self) -> None:
        if self.data.preprocess is None:
            raise ConfigError("a FitPlan needs DataPlan.preprocess (the training images' resize and crop)")
        size, resize = self.data.preprocess.size, self.data.preprocess.resize
        if (self.config.image_size, self.config.resize) != (size, resize):
            raise ConfigError(f"the model config has image_size {self.config.image_size}, resize "
                              f"{self.config.resize} but the preprocessing gives {size} from {resize}; "
                              "build both from the same sizes")

    @property
    def folder(self) -> Path:
        """The folder of this configuration's checkpoints."""
        return Path(self.save_path) / self.config.run_name

    def checkpoint(self, category: str) -> Path:
        """Where the finished model of ``category`` is written."""
        return self.folder / f"{category}.npz"

    def fit_state(self, category: str) -> Path:
        """Where an unfinished fit of ``category`` is saved for ``resume``."""
        return self.folder / f"{category}.fitstate.npz"


@dataclass(frozen=True)
class EvalPlan:
    """An evaluation: the data (its root, workers and batch size; the preprocessing is each
    checkpoint's own), whether to compute PRO, the AUROC rule (trapezoid or midpoint, the
    reference reproduction's), the test batch size (None: the data's), whether to write a
    picture of every test image and whether to write the ROC/PRO/histogram plots."""

    data: DataPlan
    pro: bool = False
    rule: str = "trapezoid"
    test_batch_size: int | None = None
    save_pic: bool = False
    plots: bool = False


def with_progress(loader: BatchLoader, total: int, desc: str, show: bool = True,
                  note: Callable[[], dict[str, float]] | None = None) -> Iterator[dict[str, Any]]:
    """Yield the loader's batches while a tqdm bar counts images; ``note`` gives figures (a
    trained method's loss) to show after each batch."""
    with tqdm(total=total, desc=desc, unit="img", file=sys.stderr, leave=False,
              disable=not show) as bar:
        for batch in loader:
            yield batch
            if note is not None:
                bar.set_postfix({name: f"{value:.4g}" for name, value in note().items()}, refresh=False)
            bar.update(len(batch["paths"]))


def calibration_indices(count: int, limit: int) -> list[int]:
    """Up to ``limit`` indices spread evenly over range(count) (0 = all of them)."""
    if limit <= 0 or limit >= count:
        return list(range(count))
    return sorted(set(np.linspace(0, count - 1, limit).round().astype(int).tolist()))


def samples_digest(samples: Sequence[Sample]) -> str:
    """SHA-256 of the ordered training file list (a resumed fit must see the same list)."""
    return hashlib.sha256("\n".join(str(s.path) for s in samples).encode()).hexdigest()


def _start(plan: FitPlan, category: str, runtime: Runtime, digest: str) -> AnomalyModel:
    """A new model, or with ``plan.resume`` the saved fit state of an interrupted run."""
    path = plan.fit_state(category)
    if not plan.resume or not path.is_file():
        if plan.resume:
            print(f"{category}: no fit state at {path}; starting from the beginning", file=sys.stderr)
        model = build_model(plan.config, runtime)
        model.category = category
        return model
    model = load_model(str(path), expect=plan.config.identity(), runtime=runtime)
    # the method's options first (k, eps, ...), then the shared fields
    was = {**dataclasses.asdict(model.config.options), **model.config.to_meta()}
    now = {**dataclasses.asdict(plan.config.options), **plan.config.to_meta()}
    changed = [name for name, value in now.items() if was.get(name) != value]
    if changed:
        raise CheckpointError(
            f"{path}: this fit state was made with {', '.join(f'{n}={was.get(n)}' for n in changed)}, "
            f"this run asks for {', '.join(f'{n}={now[n]}' for n in changed)}; "
            "pass the same arguments to resume, or delete it to start over")
    if model.fitted or model.meta.get("train_images_sha256") != digest:
        raise CheckpointError(
            f"{path}: this fit state belongs to another list of training images (or is finished); "
            "delete it to start over, or restore the training folder"
        )
    print(f"{category}: resuming after {model.n_train} images from {path}", file=sys.stderr)
    return model


def fit_category(plan: FitPlan, category: str, runtime: Runtime | None = None,
                 world: World | None = None) -> AnomalyModel | None:
    """Fit one category on (this process's shard of) its train/good images.

    Runs the model's epochs (one for the statistics methods) in its :meth:`epoch_order`, saves
    the fit state every ``plan.save_every`` images and resumes from it; with several processes,
    combines their statistics. Returns the finalised and calibrated model on the main process,
    None on the others.
    """
    runtime, world = runtime or Runtime(), world or World()
    method_class(plan.config.method).check_world(world.size)
    if world.size > 1 and (plan.resume or plan.save_every):
        raise ConfigError("--resume and --save_every work in a single process; drop them or "
                          "run without paddle.distributed.launch")
    samples = list_samples(plan.data.root, category, "train")
    validation = None
    if method_class(plan.config.method).holds_out_validation:
        samples, validation = validation_split(plan.data.root, category, samples, plan.config.seed)
    digest = samples_digest(samples)
    model = _start(plan, category, runtime, digest)
    if model.n_train == 0:
        model.prepare(with_progress(plan.data.loader(samples), len(samples), f"prepare {category}"))
    picked = calibration_indices(len(samples), plan.calib_images)
    if world.is_main:  # only the main process calibrates
        model.keep_for_calibration([str(samples[i].path) for i in picked])
    shard = np.asarray(shard_indices(len(samples), world.rank, world.size), dtype=np.int64)
    first_epoch, done = model.fit_position()
    saved = model.n_train
    for epoch in range(first_epoch, model.epochs):
        order = shard[model.epoch_order(len(shard), epoch)][done:].tolist()
        desc = f"fit {category}" if model.epochs == 1 else f"fit {category} epoch {epoch + 1}"
        with closing(with_progress(plan.data.loader(samples, order), len(order), desc, world.is_main,
                                   model.progress)) as batches:
            for batch in batches:
                if model.fit_done():  # checked first: a fit state may be saved at the budget's last step
                    break
                model.partial_fit(batch["images"], batch["paths"])
                if plan.save_every and model.n_train - saved >= plan.save_every:
                    model.save(str(plan.fit_state(category)), extra={"train_images_sha256": digest})
                    saved = model.n_train
        model.end_epoch()
        done = 0
        if model.fit_done():
            break
    if world.size > 1:
        model.reduce_across(Collective(world))
    if not world.is_main:
        return None
    model.finalize()
    if validation is not None:  # the threshold comes from the validation images
        held = plan.data.loader(validation)
        model.fit_validation(with_progress(plan.data.loader(samples), len(samples), f"train {category}"),
                             with_progress(held, len(validation), f"validation {category}"))
        samples, picked = validation, list(range(len(validation)))
    calib = plan.data.loader(samples, picked)
    model.calibrate(with_progress(calib, len(picked), f"threshold {category}"))
    return model


def train_category(plan: FitPlan, category: str, runtime: Runtime | None = None,
                   world: World | None = None) -> AnomalyModel | None:
    """:func:`fit_category`, then (main process) write the checkpoint and drop the fit state."""
    model = fit_category(plan, category, runtime, world)
    if model is None:  # not the main process: its statistics went to rank 0
        return None
    path = plan.checkpoint(category)
    model.save(str(path))
    plan.fit_state(category).unlink(missing_ok=True)
    print(f"{category}: fitted on {model.n_train} images, threshold {model.threshold:.4f}, saved {path}")
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


def score_category(plan: EvalPlan, category: str, model: AnomalyModel) -> tuple[AnomalyDataset, ScoredSet]:
    """Score the test split of ``category``, preprocessed as the checkpoint was fitted: the dataset
    and its scores (N,), labels, maps (N, S, S) and masks, in the dataset's order."""
    samples = list_samples(plan.data.root, category, "test")
    dataset = AnomalyDataset(samples, model_preprocess(model))
    loader = BatchLoader(dataset, plan.test_batch_size or plan.data.batch_size, plan.data.num_workers)
    return dataset, score_batches(model, with_progress(loader, len(samples), f"test {category}"))


def evaluate_category(plan: EvalPlan, category: str, model: AnomalyModel,
                      out: Path | None = None) -> dict[str, Any]:
    """Score the test split of ``category`` and compute the metrics row.

    With ``plan.save_pic`` the pictures go to ``out/<category>/``; with ``plan.plots`` the ROC, PRO
    and histogram plots to ``out/<category>_{roc,pro,hist}.png``.
    """
    if (plan.save_pic or plan.plots) and out is None:
        raise ConfigError("EvalPlan.save_pic/plots: pass evaluate_category the folder for the pictures")
    dataset, scored = score_category(plan, category, model)
    if plan.save_pic:
        if model.threshold is None:
            raise CheckpointError(f"{category}: the checkpoint holds no threshold (never calibrated), "
                                  "so --save_pic has no mask to draw; train it again")
        save_test_pictures(out / category, dataset, scored, model.threshold)
        print(f"{category}: wrote {len(dataset.samples)} pictures to {out / category}", file=sys.stderr)
    if plan.plots:
        written = write_plots(out, category, scored, model.threshold)
        print(f"wrote {', '.join(str(p) for p in written)}")
    row = metrics(scored, category, plan.pro, plan.rule)
    if is_loco(plan.data.root / category):  # MVTec LOCO: per-type AUROC and sPRO columns
        row |= loco_metrics(dataset, scored, plan.data.root / category, plan.pro, plan.rule)
    return row
