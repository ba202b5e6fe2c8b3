"""The per-position Gaussian family (OrthoAD, PaDiM): project features to k dims, fit, score.

A method of this family only says how features of layer1..3 become k-dim vectors z at every
position of layer1's grid (:meth:`embedding`); fitting (streaming, mergeable), the Mahalanobis
distance, upsampling, blur and image score are shared here.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator, Sequence

import numpy as np
import paddle
from paddle import nn

from engine.errors import CheckpointError
from engine.runtime import RunFn, compile_layer, run_chunked
from models.base import AnomalyModel
from models.gaussian import GaussianAccumulator
from models.layers import AnomalyMapHead, MahalanobisMap, ToRows


class _Pipeline(nn.Layer):
    """Composition of layers: trunk -> embedding -> [distance -> map head]."""

    def __init__(self, trunk: nn.Layer, embedding: nn.Layer, *tail: nn.Layer) -> None:
        super().__init__()
        self.trunk = trunk
        self.embedding = embedding
        self.tail = nn.LayerList(tail)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor | tuple[paddle.Tensor, paddle.Tensor]:
        out = self.embedding(self.trunk(x))
        for layer in self.tail:
            out = layer(out)
        return out


class GaussianModel(AnomalyModel):
    """Base of methods that fit one Gaussian per position of a k-dim embedding."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        positions = self.grid[0] * self.grid[1]
        self.accumulator = GaussianAccumulator(positions, self.config.k)
        self.mean: np.ndarray | None = None
        self.inv_cov: np.ndarray | None = None
        self._embedder: RunFn | None = None

    @abstractmethod
    def embedding(self) -> nn.Layer:
        """Layer mapping the trunk's feature list to z (N, k, h, w) on layer1's grid."""

    def embed(self, images: np.ndarray) -> Iterator[tuple[slice, np.ndarray]]:
        """Features z (b, P, k) float32 (P = h*w) of consecutive slices of images (B, 3, S, S)."""
        if self._embedder is None:
            layer = _Pipeline(self.trunk, self.embedding(), ToRows())
            self._embedder = compile_layer(layer, self.config.image_size, self.runtime)
        for part, (z,) in run_chunked(self._embedder, images, self.runtime.chunk):
            yield part, z

    def partial_fit(self, images: np.ndarray, paths: Sequence[str] | None = None) -> None:
        for part, z in self.embed(images):
            self.check_finite(z, paths[part] if paths else None)
            self.accumulator.update(z)

    def finalize(self) -> None:
        self.mean, self.inv_cov = self.accumulator.finalize(self.config.eps)
        self.fitted = True
        self._scorer = None

    @property
    def n_train(self) -> int:
        """Images seen by the fit."""
        return self.accumulator.seen

    def merge(self, other: GaussianModel) -> None:
        """Add the fit state of ``other`` (same configuration, disjoint images) to this one."""
        if (
            other.config != self.config
            or any(not np.array_equal(a, other._random_arrays()[n])
                   for n, a in self._random_arrays().items())
        ):
            raise CheckpointError("cannot merge fit states of different configurations or seeds")
        self.accumulator.merge(other.accumulator)

    def fused_layer(self) -> nn.Layer:
        distance = MahalanobisMap(self.mean, self.inv_cov, self.grid)
        size = (self.config.image_size, self.config.image_size)
        head = AnomalyMapHead(self.grid, size, self.config.sigma)
        return _Pipeline(self.trunk, self.embedding(), distance, head)

    @abstractmethod
    def _random_arrays(self) -> dict[str, np.ndarray]:
        """The method's random parts (projection or channel subset)."""

    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = dict(self._random_arrays())
        if self.fitted:
            arrays.update(mean=self.mean, inv_cov=self.inv_cov,
                          n_train=np.array(self.accumulator.count))
        else:
            arrays.update({f"acc_{k}": v for k, v in self.accumulator.state().items()})
        return arrays

    def _restore(self, arrays: dict[str, np.ndarray], fitted: bool) -> None:
        self._restore_random(arrays)
        if fitted:
            self.mean = arrays["mean"]
            self.inv_cov = arrays["inv_cov"]
            self.accumulator.count = int(arrays["n_train"])
            self.fitted = True
        else:
            state = {k[4:]: v for k, v in arrays.items() if k.startswith("acc_")}
            self.accumulator.load_state(state)

    @abstractmethod
    def _restore_random(self, arrays: dict[str, np.ndarray]) -> None:
        """Inverse of :meth:`_random_arrays`."""
