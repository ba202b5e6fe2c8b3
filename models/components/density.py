"""One Gaussian over whole-image embeddings, with Ledoit-Wolf shrinkage (CutPaste, PUAD).

The per-position Gaussians of PaDiM and OrthoAD live in :mod:`models.components.gaussian`; this
module holds the single Gaussian that CutPaste and PUAD fit to one embedding vector per image. With
few images and many dimensions the sample covariance is singular, so it is shrunk towards a
multiple of the identity by the amount Ledoit and Wolf (2004) derive from the data:

    S = X_c^T X_c / n,   mu = tr(S) / d,   delta = ||S - mu I||_F^2 / d,
    beta = min(delta, sum_i ||x_i x_i^T - S||_F^2 / (d n^2)),   shrinkage = beta / delta,
    covariance = (1 - shrinkage) S + shrinkage mu I

(X_c the centred embeddings, n of them, d dimensions). The score of an embedding is its Mahalanobis
distance sqrt((x - mean)^T P (x - mean)), P the inverse covariance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import paddle
from paddle import nn

from core.errors import InputError
from models.components.static_ops import non_negative, reduce_sum, sqrt


def ledoit_wolf(embeddings: np.ndarray) -> tuple[np.ndarray, float]:
    """The shrunk covariance (d, d) float64 and the shrinkage in [0, 1] of ``embeddings`` (n, d)."""
    x = np.asarray(embeddings, dtype=np.float64)
    n, d = x.shape
    x = x - x.mean(axis=0)
    sample = x.T @ x / n
    mu = np.trace(sample) / d
    delta = (np.sum(sample * sample) - 2 * mu * np.trace(sample) + d * mu * mu) / d
    squares = x * x
    # sum_i ||x_i x_i^T - S||_F^2 = sum_i ||x_i||^4 - n ||S||_F^2, with sum_i ||x_i||^4 = sum (X^2)^T X^2
    spread = (np.sum(squares.T @ squares) - n * np.sum(sample * sample)) / (d * n * n)
    beta = min(spread, delta)
    shrinkage = 0.0 if beta == 0 else float(beta / delta)
    covariance = (1 - shrinkage) * sample
    covariance[np.diag_indices(d)] += shrinkage * mu
    return covariance, shrinkage


@dataclass
class GaussianDensity:
    """Mean (d,) and inverse covariance (d, d) of image embeddings, both float64."""

    mean: np.ndarray
    precision: np.ndarray
    shrinkage: float

    @classmethod
    def fit(cls, embeddings: np.ndarray, what: str = "embeddings") -> GaussianDensity:
        """Fit on ``embeddings`` (n, d), n >= 2; ``what`` names them in errors."""
        x = np.asarray(embeddings, dtype=np.float64)
        if x.ndim != 2 or len(x) < 2:
            raise InputError(f"{what}: a Gaussian needs at least 2 images, got array of shape {x.shape}; "
                             "add training images")
        if not np.isfinite(x).all():
            raise InputError(f"{what}: not finite (NaN or infinity); check the images and the network")
        covariance, shrinkage = ledoit_wolf(x)
        return cls(x.mean(axis=0), np.linalg.pinv(covariance, hermitian=True), shrinkage)

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        """Mahalanobis distances (n,) of ``embeddings`` (n, d)."""
        diff = np.asarray(embeddings, dtype=np.float64) - self.mean
        return np.sqrt(np.maximum(np.einsum("nd,de,ne->n", diff, self.precision, diff), 0.0))

    def layer(self) -> MahalanobisScore:
        """The same score as a Paddle layer, for fused exports."""
        return MahalanobisScore(self.mean, self.precision)


class MahalanobisScore(nn.Layer):
    """Embeddings (N, d) -> Mahalanobis distances (N,) to one Gaussian, in float32."""

    def __init__(self, mean: np.ndarray, precision: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("mean", paddle.to_tensor(mean.astype(np.float32)), persistable=True)
        self.register_buffer("precision", paddle.to_tensor(precision.astype(np.float32)), persistable=True)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        diff = x - self.mean
        return sqrt(non_negative(reduce_sum((diff @ self.precision) * diff, axis=1)))
