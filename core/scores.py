"""The normalised anomaly score: a raw image score mapped to [0, 1] with the threshold at 0.5."""

from __future__ import annotations

import numpy as np

NO_MINIMUM_NOTE = ("note: {source} stores no minimum training score (made before it was recorded); "
                   "the normalised score takes 0 as the minimum: fit or export again to store it")


def normalized_score(score: np.ndarray | float, score_min: float, threshold: float) -> np.ndarray:
    """Raw scores (any shape) -> normalised scores in [0, 1], float64 of the same shape.

    Piecewise linear through three points: the lowest training score ``score_min`` -> 0, the
    ``threshold`` -> 0.5 and the reference maximum ``2 * threshold - score_min`` -> 1, clipped
    outside, i.e. ``clip(0.5 + 0.5 * (score - threshold) / (threshold - score_min), 0, 1)``.
    If ``threshold <= score_min`` there is no scale: scores above the threshold give 1, the
    threshold itself 0.5, lower scores 0.
    """
    score = np.asarray(score, dtype=np.float64)
    span = float(threshold) - float(score_min)
    if span <= 0:
        return np.where(score > threshold, 1.0, np.where(score == threshold, 0.5, 0.0))
    return np.clip(0.5 + 0.5 * (score - threshold) / span, 0.0, 1.0)
