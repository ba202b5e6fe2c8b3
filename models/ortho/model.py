"""OrthoAD model: features projected by a Haar-random semi-orthogonal W (F x k), z = W^T x."""

from __future__ import annotations

import numpy as np
from paddle import nn

from engine.errors import ConfigError
from models.backbone import layer_grid
from models.gaussian_model import GaussianModel
from models.projection import ProjectedEmbedding


def semi_orthogonal(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """A (rows, cols) matrix with orthonormal columns, Haar distributed (rows >= cols).

    QR of a standard Gaussian matrix, each column multiplied by the sign of R's diagonal entry so
    the result does not depend on the QR routine's sign convention.
    """
    q, r = np.linalg.qr(rng.standard_normal((rows, cols)))
    signs = np.sign(np.diag(r))
    signs[signs == 0] = 1.0
    return q * signs


class OrthoModel(GaussianModel):
    """Per-position Gaussian on z = W^T x, W semi-orthogonal (``--method ortho``)."""

    method = "ortho"

    def _init_random(self, rng: np.random.Generator) -> None:
        features = sum(self.trunk.channels)
        if self.config.k > features:
            raise ConfigError(
                f"--k {self.config.k}: {self.config.arch} has {features} feature channels; "
                f"use k <= {features}"
            )
        self.weight = semi_orthogonal(features, self.config.k, rng)

    def embedding(self) -> nn.Layer:
        grids = [layer_grid(self.config.image_size, name) for name in self.layers]
        return ProjectedEmbedding(self.weight, self.trunk.channels, grids)

    def _random_arrays(self) -> dict[str, np.ndarray]:
        return {"projection": self.weight}

    def _restore_random(self, arrays: dict[str, np.ndarray]) -> None:
        self.weight = np.asarray(arrays["projection"], dtype=np.float64)
