"""OrthoAD model: features projected by a Haar-random semi-orthogonal W (F x k), z = W^T x."""

from __future__ import annotations

import numpy as np
from paddle import nn

from models.base import ModelConfig
from models.checkpoint import ArraySpec
from models.components.backbone import layer_grid
from models.components.gaussian_model import GaussianModel
from models.components.projection import ProjectedEmbedding


def semi_orthogonal(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """A (rows, cols) matrix with orthonormal columns, Haar distributed (rows >= cols).

    QR of a standard Gaussian matrix, each column multiplied by the sign of R's diagonal entry so
    the result does not depend on the QR routine's sign convention.
    """
    q, r = np.linalg.qr(rng.standard_normal((rows, cols)))
    signs = np.sign(np.diag(r))
    signs[signs == 0] = 1.0
    return q * signs


def identity_first_basis(weight: np.ndarray, rows: int) -> np.ndarray | None:
    """Basis A (k, k) with (W A^T)[:rows] = [I | 0], or None when k < rows.

    Fitting z' = A z = (W A^T)^T x makes layer1's contribution its own channels (no GEMM): with
    W1 = W[:rows] = R^T Q1^T (QR of W1^T, Q = [Q1 Q2] complete), A^T = [Q1 R^-T | Q2].
    """
    k = weight.shape[1]
    if k < rows:
        return None
    q, r = np.linalg.qr(weight[:rows].T, mode="complete")
    a_t = np.concatenate([q[:, :rows] @ np.linalg.inv(r[:rows].T), q[:, rows:]], axis=1)
    return a_t.T


class OrthoModel(GaussianModel):
    """Per-position Gaussian on z = W^T x, W semi-orthogonal (``--method ortho``)."""

    method = "ortho"

    def _init_random(self, rng: np.random.Generator) -> None:
        features = self.feature_channels()
        self.weight = semi_orthogonal(features, self.options.k, rng)
        self.basis = identity_first_basis(self.weight, self.trunk.channels[0])

    def _grids(self) -> list[int]:
        return [layer_grid(self.config.image_size, name) for name in self.layers]

    def embedding(self) -> nn.Layer:
        return ProjectedEmbedding(self.weight, self.trunk.channels, self._grids())

    def fit_embedding(self) -> nn.Layer:
        if self.basis is None:
            return self.embedding()
        weight = self.weight @ self.basis.T
        return ProjectedEmbedding(weight, self.trunk.channels, self._grids(), identity_first=True)

    def fit_basis(self) -> np.ndarray | None:
        return self.basis

    def embedding_arrays(self) -> dict[str, np.ndarray]:
        return {"projection": self.weight}

    def _random_arrays(self) -> dict[str, np.ndarray]:
        arrays = {"projection": self.weight}
        if self.basis is not None:
            arrays["fit_basis"] = self.basis
        return arrays

    @classmethod
    def random_specs(cls, config: ModelConfig, channels: tuple[int, ...]) -> dict[str, ArraySpec]:
        """W (F, k), and the fit basis (k, k) when k >= layer1's channels."""
        specs = {"projection": ArraySpec((sum(channels), config.options.k))}
        if config.options.k >= channels[0]:
            specs["fit_basis"] = ArraySpec((config.options.k, config.options.k))
        return specs

    def _restore_random(self, arrays: dict[str, np.ndarray]) -> None:
        self.weight = np.asarray(arrays["projection"], dtype=np.float64)
        basis = arrays.get("fit_basis")
        self.basis = None if basis is None else np.asarray(basis, dtype=np.float64)
