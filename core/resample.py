"""Resampling along one image axis as numpy matrices: nearest indices, bilinear, Gaussian blur.

Shared by the model layers (models.components.layers, which apply them in Paddle graphs) and by
the numpy tail of unfused exports (deploy.postprocess), which must not import the models.
"""

from __future__ import annotations

import numpy as np


def nearest_indices(size_in: int, size_out: int) -> np.ndarray:
    """Source index of every output row for nearest resizing (Paddle's rule, align_corners=False).

    Returns int64 (size_out,): ``floor(i * size_in / size_out)``.
    """
    return np.floor(np.arange(size_out) * (size_in / size_out)).astype(np.int64)


def bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
    """Matrix (size_out, size_in) of 1-D bilinear resizing with half-pixel centres.

    Matches ``F.interpolate(mode="bilinear", align_corners=False, align_mode=0)`` along one axis.
    """
    scale = size_in / size_out
    src = np.maximum((np.arange(size_out) + 0.5) * scale - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
    hi = np.minimum(lo + 1, size_in - 1)
    frac = src - lo
    mat = np.zeros((size_out, size_in))
    rows = np.arange(size_out)
    np.add.at(mat, (rows, lo), 1.0 - frac)
    np.add.at(mat, (rows, hi), frac)
    return mat


def _reflect(index: np.ndarray, size: int) -> np.ndarray:
    """Fold indices into [0, size) with half-sample symmetry (scipy's "reflect": d c b a | a b c d)."""
    period = 2 * size
    index = np.mod(index, period)
    return np.where(index >= size, period - 1 - index, index)


def gaussian_blur_matrix(size: int, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """Matrix (size, size) of a 1-D Gaussian filter as ``scipy.ndimage.gaussian_filter1d`` applies it.

    Kernel radius ``int(truncate * sigma + 0.5)``, normalised weights, "reflect" borders. A sigma
    that is not a finite number > 0 raises ValueError (it would give a matrix of NaN or zeros).
    """
    if not 0 < sigma < np.inf:
        raise ValueError(f"blur sigma must be a finite number > 0, got {sigma}")
    radius = int(truncate * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    weights /= weights.sum()
    mat = np.zeros((size, size))
    rows = np.arange(size)
    for offset, weight in zip(offsets, weights, strict=True):
        np.add.at(mat, (rows, _reflect(rows + offset, size)), weight)
    return mat


def smoothing_matrix(size_in: int, size_out: int, sigma: float) -> np.ndarray:
    """Blur after bilinear upsampling along one axis as one float32 matrix (size_out, size_in)."""
    return (gaussian_blur_matrix(size_out, sigma) @ bilinear_matrix(size_in, size_out)).astype(np.float32)
