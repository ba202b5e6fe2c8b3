"""Scoring a test set and turning the scores into the results table."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import InputError
from core.io import atomic_write_text
from datasets import AnomalyDataset
from datasets.mvtec_loco import ANOMALY_TYPES, defect_regions, read_defects_config
from engine.metrics import pro_auc, roc_auc, spro_auc

COLUMNS = ("category", "image_auroc", "pixel_auroc", "pro")
LOCO_COLUMNS = (*COLUMNS, "image_auroc_logical", "image_auroc_structural", "spro_logical",
                "spro_structural", "spro")
"""results.csv on an MVTec LOCO root: image AUROC of good vs logical and vs structural anomalies
(``image_auroc`` is good vs both), and sPRO of each type and of both (FPR limit 0.05)."""
SPRO_FPR_LIMIT = 0.05
_TYPE_NAMES = dict(zip(ANOMALY_TYPES, ("logical", "structural"), strict=True))


@dataclass
class ScoredSet:
    """A scored test set: image scores and labels (N,), maps (N, S, S), masks (N, S, S) or None."""

    scores: np.ndarray
    labels: np.ndarray
    maps: np.ndarray
    masks: np.ndarray | None


def score_batches(model: Any, batches: Iterable[dict[str, Any]]) -> ScoredSet:
    """Run ``model.score`` over loader batches and stack the results.

    Masks are kept only if every image has one (good images have all-zero masks).
    """
    scores, labels, maps, masks = [], [], [], []
    complete = True
    for batch in batches:
        amaps, image_scores = model.score(batch["images"], batch["paths"])
        bad = ~np.isfinite(image_scores)
        if bad.any():
            raise InputError(
                f"{batch['paths'][int(np.argmax(bad))]}: the anomaly score is NaN or inf; "
                "check the image and the checkpoint"
            )
        scores.append(image_scores)
        labels.append(batch["labels"])
        maps.append(amaps.astype(np.float32, copy=False))
        complete = complete and all(m is not None for m in batch["masks"])
        if complete:
            masks.append(np.stack(batch["masks"]))
    if not scores:
        raise InputError("no test images were scored")
    return ScoredSet(
        scores=np.concatenate(scores),
        labels=np.concatenate(labels),
        maps=np.concatenate(maps),
        masks=np.concatenate(masks) if complete else None,
    )


def metrics(scored: ScoredSet, category: str, eval_pro: bool, rule: str) -> dict[str, Any]:
    """Image AUROC, pixel AUROC and PRO of one category (None where not computable)."""
    row: dict[str, Any] = {"category": category, "image_auroc": None, "pixel_auroc": None,
                           "pro": None}
    if len(np.unique(scored.labels)) == 2:
        row["image_auroc"] = roc_auc(scored.labels, scored.scores, rule=rule)
    else:
        print(f"{category}: test set has only one class; image AUROC skipped", file=sys.stderr)
    if scored.masks is None or not scored.masks.any():
        print(f"{category}: some defective test images have no mask; pixel metrics skipped",
              file=sys.stderr)
        return row
    row["pixel_auroc"] = roc_auc(scored.masks, scored.maps, rule=rule)
    if eval_pro:
        row["pro"] = pro_auc(scored.masks.astype(bool), scored.maps)
    return row


def loco_metrics(dataset: AnomalyDataset, scored: ScoredSet, category_dir: Path, eval_spro: bool,
                 rule: str) -> dict[str, Any]:
    """The MVTec LOCO columns of one category (None where not computable).

    ``dataset`` (its samples and preprocessing) is the test split ``scored`` holds, in order.
    Image AUROC per anomaly type: the good images against that type's. sPRO (with ``eval_spro``):
    each defect mask of ``category_dir/ground_truth`` is a region with its saturation area from
    defects_config.json; the FPR is over the pixels of the good test images.
    """
    row: dict[str, Any] = dict.fromkeys(LOCO_COLUMNS[len(COLUMNS):])
    folders = np.array([sample.defect for sample in dataset.samples])
    good = scored.labels == 0
    picks = {name: good | (folders == kind) for kind, name in _TYPE_NAMES.items()}
    for name, chosen in picks.items():
        if good.any() and np.count_nonzero(chosen) > np.count_nonzero(good):
            row[f"image_auroc_{name}"] = roc_auc(scored.labels[chosen], scored.scores[chosen], rule=rule)
    defective = np.flatnonzero(~good)
    if not eval_spro or not good.any() or defective.size == 0:
        return row
    if any(dataset.samples[i].mask_path is None for i in defective):
        print(f"{category_dir.name}: some defective test images have no masks; sPRO skipped", file=sys.stderr)
        return row
    config = read_defects_config(category_dir)
    regions = {int(i): defect_regions(dataset.samples[i].mask_path, config, dataset.preprocess)
               for i in defective}
    for column, chosen in (("spro_logical", picks["logical"]), ("spro_structural", picks["structural"]),
                           ("spro", np.ones_like(good))):
        index = np.flatnonzero(chosen)
        kept = [(position, region, saturation) for position, i in enumerate(index)
                for region, saturation in regions.get(int(i), [])]
        if kept:
            normal = np.broadcast_to(good[index, None, None], (index.size, *scored.maps.shape[1:]))
            row[column] = spro_auc(scored.maps[index], normal, kept, SPRO_FPR_LIMIT)
    return row


def _columns(rows: Sequence[dict[str, Any]]) -> tuple[str, ...]:
    """LOCO_COLUMNS when a row has them (an MVTec LOCO category), else COLUMNS."""
    return LOCO_COLUMNS if any(LOCO_COLUMNS[-1] in row for row in rows) else COLUMNS


def with_mean(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows plus a last row ``mean`` (mean of each metric over the rows that have it)."""
    mean: dict[str, Any] = {"category": "mean"}
    for column in _columns(rows)[1:]:
        values = [row[column] for row in rows if row.get(column) is not None]
        mean[column] = float(np.mean(values)) if values else None
    return [*rows, mean]


def _cell(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value if isinstance(value, str) else f"{value:.{digits}f}"


def render_csv(rows: Sequence[dict[str, Any]]) -> str:
    """CSV text: header ``category,image_auroc,pixel_auroc,pro`` (plus the LOCO_COLUMNS when a row
    has them) and one line per row."""
    columns = _columns(rows)
    lines = [",".join(columns)]
    lines += [",".join(_cell(row.get(c), 6) for c in columns) for row in rows]
    return "\n".join(lines) + "\n"


def render_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The same table as Markdown, 4 decimals."""
    columns = _columns(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c), 4) or "-" for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_results(folder: Path, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Write results.csv and results.md (with the mean row) into ``folder`` and print the table."""
    table = with_mean(rows)
    atomic_write_text(folder / "results.csv", render_csv(table))
    atomic_write_text(folder / "results.md", render_markdown(table))
    print(render_markdown(table), end="")
    print(f"wrote {folder / 'results.csv'} and {folder / 'results.md'}")
    return table
