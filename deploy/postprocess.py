"""The unfused export's tail in numpy: embedding x (N, F, h, w) -> anomaly maps and image scores.

The same steps as the fused graph (models.components.gaussian_model): z = W^T x (or k channels of x) at every
position, the Mahalanobis distance to that position's Gaussian, bilinear upsampling to the input
size followed by a Gaussian blur (the matrices of models.components.layers), and image score = max of the map.
"""

from __future__ import annotations

import numpy as np

from core.resample import smoothing_matrix
from deploy.stats import Stats


class GaussianHead:
    """Maps embeddings x (N, F, h, w) float32 to (anomaly maps (N, S, S), image scores (N,))."""

    def __init__(self, stats: Stats) -> None:
        meta, arrays = stats.meta, stats.arrays
        self.grid = tuple(meta["grid"])
        self.mean = arrays["mean"]
        self.inv_cov = arrays["inv_cov"]
        self.projection = arrays.get("projection")
        self.channels = arrays.get("channels")
        size, sigma = meta["image_size"], meta["sigma"]
        self.rows = smoothing_matrix(self.grid[0], size, sigma)
        self.cols_t = smoothing_matrix(self.grid[1], size, sigma).T

    def embed(self, x: np.ndarray) -> np.ndarray:
        """z (P, N, k) of x (N, F, h, w): projected (ortho) or selected channels (padim)."""
        rows = x.reshape(x.shape[0], x.shape[1], -1).transpose(2, 0, 1)  # (P, N, F)
        if self.projection is not None:
            return rows @ self.projection
        return rows[:, :, self.channels]

    def distance(self, z: np.ndarray) -> np.ndarray:
        """Mahalanobis distance maps (N, h, w) of z (P, N, k)."""
        diff = z - self.mean[:, None, :]
        squared = np.sum((diff @ self.inv_cov) * diff, axis=2)  # (P, N)
        return np.sqrt(np.maximum(squared, 0.0)).T.reshape(-1, *self.grid)

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps = self.rows @ self.distance(self.embed(x)) @ self.cols_t
        return maps, maps.max(axis=(1, 2))
