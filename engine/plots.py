"""Evaluation plots as PNG files (matplotlib, Agg): image ROC curve, PRO curve, score histogram.

Each function draws the curve the metrics module computes (engine.metrics), saves the figure
atomically and returns the data of what it drew, read back from the plotted artists.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from core.io import temp_path
from engine.evaluate import ScoredSet
from engine.metrics import auc_trapezoid, pro_curve, roc_curve

PRO_LIMIT = 0.3
"""FPR up to which PRO is integrated (marked on the PRO plot)."""
HIST_BINS = 30


def _save(figure: Figure, path: Path) -> None:
    """Write ``figure`` to ``path`` as PNG: temporary name in the same folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temp_path(str(path))
    try:
        figure.savefig(temporary, format="png", dpi=100)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _axes(title: str, xlabel: str, ylabel: str) -> tuple[Figure, Axes]:
    figure = Figure(figsize=(4.8, 4.0), layout="constrained")
    axes = figure.add_subplot()
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.grid(alpha=0.3)
    return figure, axes


def plot_roc(labels: np.ndarray, scores: np.ndarray, path: Path, title: str) -> tuple[np.ndarray, np.ndarray]:
    """Image ROC curve of ``labels`` (N,) 0/1 and ``scores`` (N,) to ``path``; (fpr, tpr) drawn."""
    fpr, tpr = roc_curve(labels, scores)
    figure, axes = _axes(title, "false-positive rate", "true-positive rate")
    (line,) = axes.plot(fpr, tpr, label=f"AUROC {auc_trapezoid(fpr, tpr):.4f}")
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axes.set(xlim=(0, 1), ylim=(0, 1.02))
    axes.legend(loc="lower right")
    _save(figure, path)
    return np.asarray(line.get_xdata()), np.asarray(line.get_ydata())


def plot_pro(masks: np.ndarray, maps: np.ndarray, path: Path, title: str) -> tuple[np.ndarray, np.ndarray]:
    """PRO curve of ``masks`` (N, H, W) and ``maps`` (N, H, W) to ``path``; (fpr, pro) drawn.

    The whole curve is drawn; the FPR limit of the PRO score (0.3) is a dashed line.
    """
    fpr, pro = pro_curve(masks, maps)
    figure, axes = _axes(title, "false-positive rate (pixels)", "per-region overlap")
    (line,) = axes.plot(fpr, pro)
    axes.axvline(PRO_LIMIT, color="grey", linestyle="--", linewidth=1, label=f"FPR {PRO_LIMIT}")
    axes.set(xlim=(0, 1), ylim=(0, 1.02))
    axes.legend(loc="lower right")
    _save(figure, path)
    return np.asarray(line.get_xdata()), np.asarray(line.get_ydata())


def plot_histogram(labels: np.ndarray, scores: np.ndarray, threshold: float | None, path: Path,
                   title: str) -> dict[str, np.ndarray]:
    """Histograms of the good (label 0) and defective (label 1) image scores (N,) to ``path``.

    Both use the same HIST_BINS bins over the range of the scores and the threshold; the
    threshold (if any) is a vertical line. Returns ``edges`` (B + 1,), ``good`` and
    ``defective`` (B,) counts as drawn.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    marks = scores if threshold is None else np.append(scores, threshold)
    edges = np.histogram_bin_edges(marks, bins=HIST_BINS)
    figure, axes = _axes(title, "image score", "images")
    drawn = {"edges": edges}
    for name, chosen, colour in (("good", ~labels, "tab:green"), ("defective", labels, "tab:red")):
        counts, _, _ = axes.hist(scores[chosen], bins=edges, alpha=0.6, color=colour,
                                 label=f"{name} ({int(chosen.sum())})")
        drawn[name] = np.asarray(counts)
    if threshold is not None:
        axes.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.4g}")
    axes.legend(loc="upper right")
    _save(figure, path)
    return drawn


def write_plots(folder: Path, category: str, scored: ScoredSet, threshold: float | None) -> list[Path]:
    """``<category>_roc.png``, ``<category>_pro.png`` and ``<category>_hist.png`` in ``folder``.

    The ROC plot needs good and defective images, the PRO plot masks of every defective image;
    a plot that cannot be drawn is skipped with a message. Returns the files written.
    """
    written = []
    if len(np.unique(scored.labels)) == 2:
        path = folder / f"{category}_roc.png"
        plot_roc(scored.labels, scored.scores, path, f"{category}: image ROC")
        written.append(path)
    else:
        print(f"{category}: test set has only one class; ROC plot skipped", file=sys.stderr)
    if scored.masks is not None and scored.masks.any():
        path = folder / f"{category}_pro.png"
        plot_pro(scored.masks.astype(bool), scored.maps, path, f"{category}: PRO curve")
        written.append(path)
    else:
        print(f"{category}: some defective test images have no mask; PRO plot skipped", file=sys.stderr)
    path = folder / f"{category}_hist.png"
    plot_histogram(scored.labels, scored.scores, threshold, path, f"{category}: image scores")
    written.append(path)
    return written
