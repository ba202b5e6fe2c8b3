"""SPADE (Cohen & Hoshen 2020): kNN over whole-image vectors, then pixel kNN in the nearest images."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn

from core.script import positive_int
from models.base import ModelConfig, option, positive
from models.checkpoint import ArraySpec
from models.components.backbone import layer_channels, layer_grid
from models.components.bank_model import BankOptions, MemoryBankModel, concatenate_released
from models.components.knn import BankSearch
from models.components.layers import SmoothUpsample
from models.components.static_ops import reduce_sum, sqrt

MAP_LAYERS = ("layer1", "layer2", "layer3")


@dataclass(frozen=True)
class SpadeOptions(BankOptions):
    """SPADE's options: k nearest training images."""

    name_fields: ClassVar[tuple[str, ...]] = ("k",)
    k: int = option(50, "nearest training images", positive_int)

    def check(self) -> None:
        positive("k", self.k)


class SpadeFeatures(nn.Layer):
    """Trunk (layer1..4) -> layer1, layer2, layer3 maps (N, C_i, g_i, g_i) and the image vector
    (N, C_4): layer4 averaged over its positions."""

    def __init__(self, trunk: nn.Layer) -> None:
        super().__init__()
        self.trunk = trunk

    def forward(self, x: paddle.Tensor) -> tuple[paddle.Tensor, ...]:
        *maps, last = self.trunk(x)
        return (*maps, paddle.flatten(F.adaptive_avg_pool2d(last, 1), start_axis=1))


class SpadeScorer(nn.Layer):
    """Images (N, 3, S, S) -> (anomaly map (N, 1, S, S), image score (N,)).

    Image score: mean distance of the image vector to its k nearest training vectors. Map: for each
    layer, the distance of every position's feature to the same position in those k training
    images, minimum over them; bilinear upsampling and Gaussian blur, summed over the layers.
    ``vectors`` (G, C_4) and ``maps`` [(G, C_i, g_i, g_i)] are the training gallery.
    """

    def __init__(self, features: SpadeFeatures, vectors: np.ndarray, maps: Sequence[np.ndarray],
                 k: int, image_size: int, sigma: float) -> None:
        super().__init__()
        self.features = features
        self.search = BankSearch(vectors, slice_rows=len(vectors))
        self.k = k
        self.shapes = [tuple(m.shape[1:]) for m in maps]
        for i, gallery in enumerate(maps):
            self.register_buffer(f"gallery{i}", paddle.to_tensor(gallery.astype(np.float32)),
                                 persistable=True)
        self.smooth = nn.LayerList([SmoothUpsample(shape[1:], (image_size, image_size), sigma)
                                    for shape in self.shapes])

    def forward(self, x: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        *maps, vector = self.features(x)
        dist, nearest = self.search.smallest(self.search.center(vector), self.k)  # (N, k)
        flat = paddle.flatten(nearest)
        amap = None
        for i, feature in enumerate(maps):  # zip(): dy2static does not take strict=
            gallery = getattr(self, f"gallery{i}")
            near = paddle.reshape(paddle.gather(gallery, flat), [-1, self.k, *self.shapes[i]])
            diff = near - feature.unsqueeze(1)  # (N, k, C, h, w)
            closest = sqrt(paddle.min(reduce_sum(diff * diff, axis=2), axis=1, keepdim=True))
            part = self.smooth[i](closest)
            amap = part if amap is None else amap + part
        return amap, reduce_sum(dist, axis=1) / self.k


class SpadeModel(MemoryBankModel):
    """SPADE (``--method spade``): the gallery is every training image's vector and layer1-3 maps."""

    method = "spade"
    layers = ("layer1", "layer2", "layer3", "layer4")
    Options = SpadeOptions
    fit_outputs = (*MAP_LAYERS, "vector")

    def _init_random(self, rng: np.random.Generator) -> None:
        """SPADE has no random parts besides a random-initialised trunk."""

    def fit_layer(self) -> nn.Layer:
        return SpadeFeatures(self.trunk)

    @property
    def neighbours(self) -> int:
        """k, at most the number of training images."""
        return min(self.options.k, len(self.vectors))

    def _build(self, parts: dict[str, list[np.ndarray]]) -> None:
        self.vectors = self.stored(concatenate_released(parts["vector"]))
        self.maps = [self.stored(concatenate_released(parts[name])) for name in MAP_LAYERS]
        if self.options.k > self.n_train:
            self.warn(f"--k {self.options.k} is more than the {self.n_train} training images: "
                      f"scores use all {self.n_train} (held-out threshold scores {self.n_train - 1})")

    def fused_layer(self) -> nn.Layer:
        return SpadeScorer(SpadeFeatures(self.trunk), self.vectors, self.maps, self.neighbours,
                           self.config.image_size, self.config.sigma)

    def _held_out_scores(self, images: np.ndarray, owners: list[int | None]) -> np.ndarray:
        """Training images use their stored vector: mean distance to the k nearest *other*
        training vectors (k at most n_train - 1); other images go through :meth:`score`."""
        scores = np.empty(len(images))
        new = [i for i, owner in enumerate(owners) if owner is None]
        if new:
            scores[new] = self.score(images[new])[1]
        k = min(self.options.k, len(self.vectors) - 1)
        for i, owner in enumerate(owners):
            if owner is not None:
                exclude = np.arange(len(self.vectors)) == owner
                scores[i] = self.prepared.search(self.vectors[owner][None], k, exclude)[0].mean()
        return scores

    def _searched(self) -> np.ndarray:
        return self.vectors

    @classmethod
    def fit_shapes(cls, config: ModelConfig) -> dict[str, tuple[int, ...]]:
        """layer1..3 maps (C_i, g_i, g_i) and the image vector (C_4,)."""
        channels = dict(zip(cls.layers, layer_channels(config.arch, cls.layers), strict=True))
        shapes = {}
        for name in MAP_LAYERS:
            side = layer_grid(config.image_size, name)
            shapes[name] = (channels[name], side, side)
        return {**shapes, "vector": (channels["layer4"],)}

    @classmethod
    def bank_specs(cls, config: ModelConfig, n_train: int) -> dict[str, ArraySpec]:
        """The gallery: every training image's vector and maps."""
        return {f"gallery_{name}": ArraySpec((n_train, *shape))
                for name, shape in cls.fit_shapes(config).items()}

    def _bank_arrays(self) -> dict[str, np.ndarray]:
        arrays = {"gallery_vector": self.vectors}
        arrays.update({f"gallery_{name}": m for name, m in zip(MAP_LAYERS, self.maps, strict=True)})
        return arrays

    def _restore_bank(self, arrays: dict[str, np.ndarray]) -> None:
        self.vectors = arrays["gallery_vector"]
        self.maps = [arrays[f"gallery_{name}"] for name in MAP_LAYERS]
