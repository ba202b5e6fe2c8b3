"""Exact threshold-free anomaly-detection metrics: ROC curve, ROC AUC, PRO AUC and sPRO AUC.

Every metric sorts the scores once (O(N log N)), computes in float64 and evaluates the curves at
every distinct score, merging tied scores into a single curve point.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

_RULES = ("trapezoid", "midpoint")
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _binary(values: np.ndarray, name: str) -> np.ndarray:
    """Return ``values`` as a bool array, raising unless every value is 0 or 1."""
    values = np.asarray(values)
    if values.dtype == bool:
        return values
    positive = values == 1
    if np.count_nonzero(positive) + np.count_nonzero(values == 0) != values.size:
        raise ValueError(f"{name} must contain only 0 and 1 (or bools)")
    return positive


def _finite_scores(scores: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Return ``scores`` as float64, raising on a shape mismatch or any NaN or infinity."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != shape:
        raise ValueError(f"scores have shape {scores.shape} but labels/masks have shape {shape}")
    bad = scores.size - np.count_nonzero(np.isfinite(scores))
    if bad:
        raise ValueError(f"scores contain {bad} non-finite value(s) (NaN or infinity)")
    return scores


def _descending(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort flat scores once, descending.

    Returns ``(order, ends)``: ``order`` (N,) indexes the scores from highest to lowest and
    ``ends`` (D,) holds, for each of the D distinct scores, the position in that order of the last
    element of its tie group.
    """
    order = np.argsort(scores)[::-1]
    ranked = scores[order]
    is_end = np.ones(ranked.size, dtype=bool)
    np.not_equal(ranked[1:], ranked[:-1], out=is_end[:-1])
    return order, np.flatnonzero(is_end)


def _from_origin(counts: np.ndarray, total: float) -> np.ndarray:
    """``counts / total`` (D,) with a leading 0, as float64 (D + 1,)."""
    rates = np.zeros(counts.size + 1)
    np.divide(counts, total, out=rates[1:])
    return rates


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve with one point per distinct score.

    ``labels`` (any shape, 0/1 or bool; 1 = anomalous) and ``scores`` (same shape; higher = more
    anomalous) are flattened. Returns ``(fpr, tpr)``, both float64 (D + 1,) for D distinct scores,
    non-decreasing, starting at (0, 0) and ending at (1, 1).
    """
    positive = _binary(labels, "labels")
    flat = _finite_scores(scores, positive.shape).ravel()
    positive = positive.ravel()
    n_pos = int(np.count_nonzero(positive))
    if n_pos in (0, positive.size):
        raise ValueError("ROC needs both classes, but labels contain only one class")
    order, ends = _descending(flat)
    del flat  # per-pixel arrays are freed as soon as possible to bound peak memory
    true_pos = np.cumsum(positive[order])[ends]
    del order
    tpr = _from_origin(true_pos, n_pos)
    np.subtract(ends + 1, true_pos, out=true_pos)
    return _from_origin(true_pos, positive.size - n_pos), tpr


def _curve(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate a curve: 1-D, same length, at least one point, non-decreasing ``x``."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or x.size == 0:
        raise ValueError(f"x and y must be non-empty 1-D arrays of one length: {x.shape} {y.shape}")
    if np.any(np.diff(x) < 0):
        raise ValueError("x must be non-decreasing")
    return x, y


def auc_trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    """Area under the polyline through the points (x, y), both (P,), by the trapezoid rule."""
    x, y = _curve(x, y)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2.0)


def auc_midpoint(x: np.ndarray, y: np.ndarray) -> float:
    """Non-partial AUC of the reference Paddle reproduction, for x, y (P,) with x within [0, 1].

    Point i gets a rectangle of height y[i] from the midpoint with its left neighbour to the
    midpoint with its right neighbour; the first rectangle starts at x = 0, the last ends at x = 1.
    This equals the trapezoid area plus ``y[0] * x[0] + y[-1] * (1 - x[-1])``, so on a curve that
    starts at x = 0 and ends at x = 1 (as every :func:`roc_curve` does) both rules agree.
    """
    x, y = _curve(x, y)
    padded = np.concatenate(([-x[0]], x, [2.0 - x[-1]]))
    return float(np.sum(y * (padded[2:] - padded[:-2])) / 2.0)


def roc_auc(labels: np.ndarray, scores: np.ndarray, rule: str = "trapezoid") -> float:
    """Area under :func:`roc_curve` (labels, scores: same shape, any) by ``rule``.

    ``"trapezoid"`` matches ``sklearn.metrics.roc_auc_score``; ``"midpoint"`` applies
    :func:`auc_midpoint` to the same curve points.
    """
    if rule not in _RULES:
        raise ValueError(f"rule must be one of {_RULES}, got {rule!r}")
    fpr, tpr = roc_curve(labels, scores)
    return auc_trapezoid(fpr, tpr) if rule == "trapezoid" else auc_midpoint(fpr, tpr)


def _label_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Label 8-connected regions image by image; ids are unique across the stack.

    masks: bool (N, H, W). Returns ``(regions, count)``: int32 (N, H, W) with 0 on normal pixels
    and 1..count on the regions.
    """
    regions = np.zeros(masks.shape, dtype=np.int32)
    count = 0
    for image_mask, image_regions in zip(masks, regions, strict=True):
        found = ndimage.label(image_mask, structure=_EIGHT_CONNECTED, output=image_regions)
        np.add(image_regions, count, out=image_regions, where=image_mask)
        count += found
    return regions, count


def _check_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")


def _integrate_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under (x, y), x (P,) non-decreasing from 0, over [0, limit].

    The curve is linearly interpolated at ``limit`` when it falls between two points.
    """
    last = int(np.searchsorted(x, limit, side="right")) - 1
    area = auc_trapezoid(x[: last + 1], y[: last + 1])
    if last + 1 < x.size and x[last] < limit:
        weight = (limit - x[last]) / (x[last + 1] - x[last])
        y_limit = y[last] + weight * (y[last + 1] - y[last])
        area += (limit - x[last]) * (y[last] + y_limit) / 2.0
    return area


def pro_curve(masks: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The per-region-overlap curve (MVTec AD) with one point per distinct score.

    masks: bool or 0/1 (N, H, W) ground truth; scores: float (N, H, W) anomaly maps. Regions are
    the 8-connected components of each image's mask (never joined across images). Lowering the
    threshold through every distinct score, the false-positive rate is the share of normal pixels
    at or above it, and PRO is the mean over all regions of the share of the region at or above it.
    Returns ``(fpr, pro)``, both float64 (D + 1,), starting at (0, 0) and ending at (1, 1).
    """
    masks = _binary(masks, "masks")
    if masks.ndim != 3:
        raise ValueError(f"masks must have shape (N, H, W), got {masks.shape}")
    flat = _finite_scores(scores, masks.shape).ravel()
    n_anomalous = np.count_nonzero(masks)
    if n_anomalous == 0:
        raise ValueError("PRO needs at least one anomalous region, but every mask is empty")
    if n_anomalous == masks.size:
        raise ValueError("PRO needs normal pixels, but every mask pixel is anomalous")
    order, ends = _descending(flat)
    del flat  # per-pixel arrays are freed as soon as possible to bound peak memory
    regions, count = _label_regions(masks)
    sizes = np.bincount(regions.ravel(), minlength=count + 1)
    step = np.zeros(count + 1)
    step[1:] = 1.0 / (sizes[1:] * count)
    ranked = regions.ravel()[order]
    del regions, order
    fpr = _from_origin(np.cumsum(ranked == 0)[ends], sizes[0])
    gain = step[ranked]
    del ranked
    return fpr, _from_origin(np.cumsum(gain, out=gain)[ends], 1.0)


def pro_auc(masks: np.ndarray, scores: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Normalised area under :func:`pro_curve` (masks, scores: (N, H, W)) up to ``fpr_limit``.

    The curve, starting at (0, 0), is integrated over [0, fpr_limit] by the trapezoid rule
    (interpolated at ``fpr_limit``) and divided by ``fpr_limit``; the result lies in [0, 1].
    """
    _check_limit(fpr_limit)
    fpr, pro = pro_curve(masks, scores)
    return _integrate_to(fpr, pro, fpr_limit) / fpr_limit


def spro_curve(scores: np.ndarray, normal: np.ndarray,
               regions: Sequence[tuple[int, np.ndarray, float]]) -> tuple[np.ndarray, np.ndarray]:
    """The saturated per-region-overlap curve (MVTec LOCO) with one point per distinct score.

    scores: float (N, H, W) anomaly maps; normal: bool or 0/1 (N, H, W), the pixels whose
    false-positive rate is the x axis (MVTec LOCO: every pixel of the good images); regions: one
    ``(image index, region (H, W) bool or 0/1, saturation area s > 0)`` per defect (regions may
    overlap). Lowering the threshold through every distinct score, x is the share of normal pixels
    at or above it and y the mean over all regions of min(region pixels at or above it / s, 1).
    With s = the region's area, y is the per-region overlap of :func:`pro_curve`.
    Returns ``(fpr, spro)``, both float64 (D + 1,), starting at (0, 0) and ending at fpr 1.
    """
    normal = _binary(normal, "normal")
    if normal.ndim != 3:
        raise ValueError(f"normal must have shape (N, H, W), got {normal.shape}")
    flat = _finite_scores(scores, normal.shape).ravel()
    n_normal = np.count_nonzero(normal)
    if n_normal == 0 or not regions:
        raise ValueError("sPRO needs normal pixels and at least one defect region")
    order, ends = _descending(flat)
    del flat  # per-pixel arrays are freed as soon as possible to bound peak memory
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.arange(order.size)
    pixels = normal.shape[1] * normal.shape[2]
    positions, gains = [], []
    for image, region, saturation in regions:
        inside = np.flatnonzero(_binary(region, "region"))
        if np.shape(region) != normal.shape[1:] or inside.size == 0 or not saturation > 0:
            raise ValueError(f"a region must be a non-empty {normal.shape[1:]} mask with saturation > 0")
        # the k-th pixel of the region to pass the threshold raises its overlap min(k / s, 1) by
        # min(k, s) - min(k - 1, s), over s
        ranked = np.sort(rank[image * pixels + inside])
        positions.append(ranked)
        gains.append(np.clip(saturation - np.arange(ranked.size), 0.0, 1.0) / (saturation * len(regions)))
    del rank
    gain = np.bincount(np.concatenate(positions), weights=np.concatenate(gains), minlength=order.size)
    fpr = _from_origin(np.cumsum(normal.ravel()[order])[ends], n_normal)
    return fpr, _from_origin(np.cumsum(gain)[ends], 1.0)


def spro_auc(scores: np.ndarray, normal: np.ndarray, regions: Sequence[tuple[int, np.ndarray, float]],
             fpr_limit: float = 0.05) -> float:
    """Normalised area under :func:`spro_curve` (same arguments) up to ``fpr_limit`` (MVTec LOCO's
    0.05), trapezoid rule interpolated at the limit, divided by it; in [0, 1]."""
    _check_limit(fpr_limit)
    fpr, spro = spro_curve(scores, normal, regions)
    return _integrate_to(fpr, spro, fpr_limit) / fpr_limit
