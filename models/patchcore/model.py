"""PatchCore (Roth et al. 2022): a coreset of locally aware patch features, nearest-neighbour scores."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn

from core.errors import ConfigError
from core.kernels import NEAREST_ROW
from core.script import fraction, positive_int
from models.base import ModelConfig, option, positive
from models.checkpoint import ArraySpec
from models.components.backbone import layer_channels, layer_grid
from models.components.bank_model import BankOptions, MemoryBankModel
from models.components.knn import HEAD, BankSearch
from models.components.layers import SmoothUpsample, ToRows
from models.components.projection import FeatureConcat
from models.components.sampling import kcenter_greedy, project, random_projection, take_rows
from models.components.static_ops import arg_max, exp, reduce_sum, sqrt

SLICE_ENTRIES = 1 << 24
"""Entries of one (bank slice x patches) distance block of the brute-force search (64 MB float32)."""

BOUND_ENTRIES = 1 << 22
"""Entries of one (bank slice x patches) block of lower bounds (16 MB: 4,096 rows at 1,024 patches;
the bound product is narrow, so its blocks are kept small enough to stay in the CPU's cache)."""


@dataclass(frozen=True)
class PatchCoreOptions(BankOptions):
    """PatchCore's options; it has no k, so its folder is ``patchcore_<arch>``."""

    coreset_ratio: float = option(0.1, "fraction of training patches kept in the bank, 1 = all", fraction)
    projection_dim: int = option(128, "random-projection size for the coreset selection", positive_int)
    num_neighbors: int = option(9, "bank patches in the image-score reweighting", positive_int)

    def check(self) -> None:
        if not 0.0 < self.coreset_ratio <= 1.0:
            raise ConfigError(f"--coreset_ratio {self.coreset_ratio}: must be in (0, 1] "
                              "(1 keeps every patch)")
        positive("projection_dim", self.projection_dim)
        positive("num_neighbors", self.num_neighbors)


class LocalAverage(nn.Layer):
    """3x3 average of every feature map of a list, stride 1, same size.

    The zero padding counts in the average (always / 9), as PyTorch's ``AvgPool2d(3, 1, 1)`` of the
    reference implementations does: Paddle's ``exclusive=False``.
    """

    def forward(self, feats: list[paddle.Tensor]) -> list[paddle.Tensor]:
        return [F.avg_pool2d(f, kernel_size=3, stride=1, padding=1, exclusive=False) for f in feats]


def reweighted(score: paddle.Tensor, gaps: paddle.Tensor, scale: float) -> paddle.Tensor:
    """PatchCore's image score w * s*, w = 1 - exp(scale s*) / sum_j exp(scale gaps_j).

    ``score`` s* (N,) is the largest patch distance; ``gaps`` (N, b) are the distances of that patch
    to the b bank rows nearest (in the bank) its nearest bank row m*, m* included. Computed as
    w = (t - 1) / t, t = sum_j exp(scale (gaps_j - s*)): every gap is >= s* (m* is the nearest row),
    so t >= 1; exponents are capped at 80 (w is then 1 to float precision). (1 - 1 / t would put a
    scalar-by-tensor division in the graph, which paddle2onnx 2.1 cannot convert.)
    """
    excess = paddle.clip(scale * (gaps - score.unsqueeze(1)), max=80.0)
    total = reduce_sum(exp(excess), axis=1)
    return (total - 1.0) / total * score


class PatchCoreScorer(nn.Layer):
    """Images (N, 3, S, S) -> (anomaly map (N, 1, S, S), image score (N,)).

    Map: each patch's distance to its nearest bank row, bilinear upsampling, Gaussian blur. Image
    score: the largest patch distance s*, reweighted (:func:`reweighted`) with the b rows nearest
    (in the bank) to the bank row m* nearest that patch. ``bank`` (M, D). ``head``: leading principal
    coordinates of the exact pruned nearest-row search (:class:`BankSearch`), 0 = brute force;
    ``kernel``: that search as the compiled CPU operator (``--head kernel``, the same rows).
    """

    def __init__(self, features: nn.Layer, bank: np.ndarray, neighbours: int,
                 grid: tuple[int, int], image_size: int, sigma: float, head: int = HEAD,
                 kernel: bool = False) -> None:
        super().__init__()
        self.features = features
        self.patches = grid[0] * grid[1]
        self.grid = grid
        self.dims = bank.shape[1]
        entries = BOUND_ENTRIES if head else SLICE_ENTRIES
        self.search = BankSearch(bank, max(1, entries // self.patches), head, kernel=kernel)
        self.neighbours = neighbours
        self.smooth = SmoothUpsample(grid, (image_size, image_size), sigma)

    def forward(self, x: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        rows = self.search.center(self.features(x))  # (N, P, D)
        dist, nearest = self.search.nearest(paddle.reshape(rows, [-1, self.dims]))
        dist = paddle.reshape(dist, [-1, self.patches])
        nearest = paddle.reshape(nearest, [-1, self.patches])
        worst = arg_max(dist, axis=1).unsqueeze(1)  # (N, 1)
        anchor = paddle.flatten(paddle.take_along_axis(nearest, worst, axis=1))  # m*, (N,)
        query = paddle.take_along_axis(rows, worst.unsqueeze(2), axis=1, broadcast=True)  # (N, 1, D)
        _, support = self.search.smallest(self.search.rows(anchor), self.neighbours)  # (N, b)
        near = paddle.reshape(self.search.rows(paddle.flatten(support)), [-1, self.neighbours, self.dims])
        gaps = sqrt(reduce_sum((near - query) * (near - query), axis=2))
        score = reweighted(paddle.max(dist, axis=1), gaps, 1.0 / math.sqrt(self.dims))
        return self.smooth(paddle.reshape(dist, [-1, 1, *self.grid])), score


class PatchCoreModel(MemoryBankModel):
    """PatchCore (``--method patchcore``): the bank is a k-center coreset of training patches."""

    method = "patchcore"
    layers = ("layer2", "layer3")
    Options = PatchCoreOptions
    fit_outputs = ("patches",)
    kernels = (NEAREST_ROW,)

    @property
    def dims(self) -> int:
        """Patch feature size D (384 for resnet18, 1536 for resnet50 / wide_resnet50_2)."""
        return sum(self.trunk.channels)

    def _init_random(self, rng: np.random.Generator) -> None:
        self.projection = random_projection(self.dims, self.options.projection_dim, rng)
        self.start = float(rng.random())

    def fit_layer(self) -> nn.Layer:
        grids = [layer_grid(self.config.image_size, name) for name in self.layers]
        return nn.Sequential(self.trunk, LocalAverage(), FeatureConcat(grids), ToRows())

    def _build(self, parts: dict[str, list[np.ndarray]]) -> None:
        blocks = [batch.reshape(-1, self.dims) for batch in parts["patches"]]  # (b_j P, D) each
        total = sum(len(b) for b in blocks)
        per_image = total // self.n_train
        count = max(1, int(self.options.coreset_ratio * total))
        if count == total:
            chosen = np.arange(total)
        else:
            chosen = kcenter_greedy(project(blocks, self.projection), count,
                                    start=int(self.start * total),
                                    desc=f"coreset {self.category}".rstrip())
        self.bank = self.stored(take_rows(blocks, chosen))
        self.bank_owner = chosen // per_image
        if self.options.num_neighbors > count:
            self.warn(f"--num_neighbors {self.options.num_neighbors} is more than the {count} "
                      f"bank patches: the score uses {count}")

    def fused_layer(self) -> nn.Layer:
        return self._scorer_layer(kernel=False)

    def kernel_layer(self, precision: str = "fp32") -> nn.Layer:
        """:meth:`fused_layer` with its nearest-patch search as one compiled CPU operator (the same
        rows and distances); the bank stays float32, so ``precision`` must be fp32."""
        self.check_kernel_head(precision)
        return self._scorer_layer(kernel=True)

    def _scorer_layer(self, kernel: bool) -> PatchCoreScorer:
        return PatchCoreScorer(self.fit_layer(), self.bank, min(self.options.num_neighbors, len(self.bank)),
                               self.grid, self.config.image_size, self.config.sigma, kernel=kernel)

    def _held_out_scores(self, images: np.ndarray, owners: list[int | None]) -> np.ndarray:
        """The scoring layer's image score computed in numpy, without the bank rows taken from
        training image ``owners[i]`` (none of them if it would leave the bank empty)."""
        scores = []
        for part, (patches,) in self.extract(images):
            for rows, owner in zip(patches, owners[part], strict=True):
                exclude = None if owner is None else self.bank_owner == owner
                if exclude is not None and exclude.all():
                    exclude = None
                scores.append(self._image_score(rows, exclude))
        return np.array(scores)

    def _image_score(self, rows: np.ndarray, exclude: np.ndarray | None) -> float:
        """Image score of one image's patch features (P, D) against the bank minus ``exclude``."""
        dist, nearest = self.prepared.search(rows, 1, exclude)
        worst = int(np.argmax(dist[:, 0]))
        left = len(self.bank) - (0 if exclude is None else int(exclude.sum()))
        neighbours = min(self.options.num_neighbors, left)
        _, support = self.prepared.search(self.bank[nearest[worst]], neighbours, exclude)
        gaps = np.linalg.norm(self.bank[support[0]].astype(np.float64) - rows[worst], axis=1)
        score = reweighted(paddle.to_tensor(dist[worst].astype(np.float64)), paddle.to_tensor(gaps[None]),
                           1.0 / math.sqrt(self.dims))
        return float(score.numpy()[0])

    def _searched(self) -> np.ndarray:
        return self.bank

    @classmethod
    def fit_shapes(cls, config: ModelConfig) -> dict[str, tuple[int, ...]]:
        """Patch features (P, D) on layer2's grid."""
        side = layer_grid(config.image_size, cls.layers[0])
        return {"patches": (side * side, sum(layer_channels(config.arch, cls.layers)))}

    @classmethod
    def bank_specs(cls, config: ModelConfig, n_train: int) -> dict[str, ArraySpec]:
        """The coreset (M, D)."""
        return {"bank": ArraySpec((None, cls.fit_shapes(config)["patches"][1]))}

    @classmethod
    def random_specs(cls, config: ModelConfig) -> dict[str, ArraySpec]:
        """The coreset selection's projection (D, projection_dim) and start ()."""
        dims = cls.fit_shapes(config)["patches"][1]
        return {"projection": ArraySpec((dims, config.options.projection_dim)),
                "coreset_start": ArraySpec(())}

    def _random_arrays(self) -> dict[str, np.ndarray]:
        return {"projection": self.projection, "coreset_start": np.array(self.start)}

    def _restore_random(self, arrays: dict[str, np.ndarray]) -> None:
        self.projection = arrays["projection"]
        self.start = float(arrays["coreset_start"])

    def _bank_arrays(self) -> dict[str, np.ndarray]:
        return {"bank": self.bank}

    def _restore_bank(self, arrays: dict[str, np.ndarray]) -> None:
        self.bank = arrays["bank"]
