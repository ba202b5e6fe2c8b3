"""CutPaste (Li et al., CVPR 2021): a ResNet trained to tell images from their CutPaste copies,
then a Gaussian density of its embeddings.

Training (``partial_fit``, one SGD step per batch of B images): the images are denormalised to
[0, 1], augmented by :func:`models.cutpaste.augment.training_batch` (draws from ``(seed, step)``),
normalised again and classified by trunk -> global average pool -> projection head (``head_layer``
x [Linear 512, BatchNorm, ReLU], Linear 128, BatchNorm, ReLU) -> Linear to 2 or 3 classes;
cross-entropy. SGD, momentum 0.9, weight decay 3e-5, cosine schedule over ``--epochs`` steps
(the re-implementation's meaning of epochs); the trunk is frozen for the first
``--freeze_backbone`` steps.

Scoring: the pooled trunk output (512-d for resnet18), L2-normalised, is scored by the Mahalanobis
distance to a Gaussian with Ledoit-Wolf shrunk covariance (:class:`GaussianDensity`) fitted on the
training images in :meth:`CutPasteModel.calibrate`. Image-level model: the anomaly map is the
image score at every pixel. Patch-level model (``--patch_size P``): trained on random P x P
windows; at test every window on a ``--patch_stride`` grid is scored, each score is spread
evenly over the pixels its window covers (pixels covered by several windows average them) and the
map is blurred with a Gaussian of sigma ``sigma``; the image score is the map's maximum.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn

from core.errors import ConfigError, InputError
from core.resample import gaussian_blur_matrix
from core.script import int_at_least, positive_float, positive_int
from models.base import Batch, ModelConfig, option, unpack_batch
from models.checkpoint import ArraySpec
from models.components.backbone import layer_channels
from models.components.color import to_inputs, to_pixels
from models.components.density import GaussianDensity
from models.components.layers import SmoothUpsample
from models.components.static_ops import reduce_sum, sqrt
from models.components.trained import TrainedModel, TrainingOptions
from models.cutpaste.augment import CLASSES, VARIANTS, training_batch

HEAD_WIDTH, PROJECTION = 512, 128
DENSITY_ROWS = 20000
"""At most this many patch embeddings (a seeded subset) fit a patch-level model's Gaussian."""


@dataclass(frozen=True)
class CutPasteOptions(TrainingOptions):
    """``--variant``, the training budget and the projection head; ``--patch_size`` for maps."""

    name_fields: ClassVar[tuple[str, ...]] = ("variant",)
    epochs: int = option(256, "UPDATE STEPS (the PyTorch re-implementation's 'epochs': one "
                         "batch per step), not passes over the training images", positive_int)
    lr: float = option(0.03, "SGD learning rate at the start of the cosine schedule", positive_float)
    variant: str = option("3way", "augmentation: normal, scar, 3way or union")
    head_layer: int = option(1, "number of 512-wide layers in the projection head", int_at_least(0))
    freeze_backbone: int = option(20, "steps with the backbone frozen (only the head trains)",
                                  int_at_least(0))
    patch_size: int = option(0, "train and score P x P patches for a localisation map "
                             "(0: image-level model, constant map)", int_at_least(0))
    patch_stride: int = option(16, "stride of the scored patches (with --patch_size)", positive_int)

    def check(self) -> None:
        super().check()
        if self.variant not in VARIANTS:
            raise ConfigError(f"--variant {self.variant}: use one of {', '.join(VARIANTS)}")


class CutPasteNet(nn.Layer):
    """Trunk -> pooled embedding (N, C) -> projection head (N, 128) -> class logits (N, classes)."""

    def __init__(self, trunk: nn.Layer, head_layers: int, classes: int) -> None:
        super().__init__()
        self.trunk = trunk
        width, layers = trunk.channels[-1], []
        for out in [HEAD_WIDTH] * head_layers + [PROJECTION]:
            layers += [nn.Linear(width, out), nn.BatchNorm1D(out), nn.ReLU()]
            width = out
        self.head = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, classes)

    def embed(self, x: paddle.Tensor) -> paddle.Tensor:
        """Images (N, 3, s, s) -> pooled last-layer features (N, C)."""
        return paddle.mean(self.trunk(x)[-1], axis=[2, 3])

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.classifier(self.head(self.embed(x)))


def l2_normalise(x: paddle.Tensor) -> paddle.Tensor:
    """Rows of (N, C) divided by their Euclidean norm (static-graph ops)."""
    return x / sqrt(reduce_sum(x * x, axis=1)).unsqueeze(1)


def patch_index(size: int, patch: int, stride: int) -> tuple[np.ndarray, int]:
    """Flat pixel indices (L * patch * patch,) int64 of the windows of a size x size image on a
    stride grid (row-major windows, each row-major), and the grid side g (L = g * g)."""
    starts = np.arange(0, size - patch + 1, stride)
    rows = starts[:, None, None, None] + np.arange(patch)[None, None, :, None]
    cols = starts[None, :, None, None] + np.arange(patch)[None, None, None, :]
    return (rows * size + cols).reshape(-1).astype(np.int64), len(starts)


def coverage_matrix(size: int, patch: int, stride: int, sigma: float) -> np.ndarray:
    """(size, g) float32: along one axis, the mean of the windows covering each pixel, then the
    Gaussian blur (pixels no window covers take the nearest window's value)."""
    starts = np.arange(0, size - patch + 1, stride)
    pixels = np.arange(size)[:, None]
    cover = ((pixels >= starts) & (pixels < starts + patch)).astype(np.float64)
    empty = cover.sum(axis=1) == 0
    cover[empty, np.abs(pixels[empty] - (starts + patch / 2 - 0.5)).argmin(axis=1)] = 1.0
    return (gaussian_blur_matrix(size, sigma) @ (cover / cover.sum(axis=1, keepdims=True))).astype(np.float32)


class ReceptiveFieldSmooth(SmoothUpsample):
    """Patch scores (N, 1, g, g) -> map (N, 1, S, S) by :func:`coverage_matrix` along both axes."""

    def __init__(self, size: int, patch: int, stride: int, sigma: float) -> None:
        nn.Layer.__init__(self)
        matrix = coverage_matrix(size, patch, stride, sigma)
        self.size_in, self.size_out = (matrix.shape[1],) * 2, (size, size)
        self.register_buffer("rows", paddle.to_tensor(matrix), persistable=True)
        self.register_buffer("cols_t", paddle.to_tensor(np.ascontiguousarray(matrix.T)), persistable=True)


class Patches(nn.Layer):
    """Images (N, 3, S, S) -> the stride grid's windows (N * L, 3, P, P), image by image."""

    def __init__(self, size: int, patch: int, stride: int) -> None:
        super().__init__()
        index, self.side = patch_index(size, patch, stride)
        self.size, self.patch = size, patch
        self.register_buffer("index", paddle.to_tensor(index))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        flat = paddle.index_select(paddle.reshape(x, [-1, 3, self.size * self.size]), self.index, axis=2)
        windows = paddle.reshape(flat, [-1, 3, self.side * self.side, self.patch, self.patch])
        return paddle.reshape(paddle.transpose(windows, [0, 2, 1, 3, 4]), [-1, 3, self.patch, self.patch])


class CutPasteScorer(nn.Layer):
    """Images (N, 3, S, S) -> (anomaly map (N, 1, S, S), image score (N,)): the fused graph."""

    def __init__(self, net: CutPasteNet, density: GaussianDensity, size: int, patch: int, stride: int,
                 sigma: float) -> None:
        super().__init__()
        self.net, self.distance, self.size = net, density.layer(), size
        self.patches = Patches(size, patch, stride) if patch else None
        self.smooth = ReceptiveFieldSmooth(size, patch, stride, sigma) if patch else None
        self.register_buffer("ones", paddle.ones([1, 1, size, size]), persistable=True)

    def forward(self, x: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        if self.patches is None:
            score = self.distance(l2_normalise(self.net.embed(x)))
            return paddle.reshape(score, [-1, 1, 1, 1]) * self.ones, score
        side = self.patches.side
        scores = self.distance(l2_normalise(self.net.embed(self.patches(x))))
        amap = self.smooth(paddle.reshape(scores, [-1, 1, side, side]))
        return amap, paddle.max(amap, axis=[1, 2, 3])


class CutPasteModel(TrainedModel):
    """``--method cutpaste``."""

    method = "cutpaste"
    layers = ("layer4",)
    Options = CutPasteOptions
    schedule_per = "step"
    progress_names = ("loss", "accuracy")

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.density: GaussianDensity | None = None
        patch = self.options.patch_size
        if patch and patch > self.config.image_size:
            raise ConfigError(f"--patch_size {patch}: larger than the {self.config.image_size} px "
                              "input; use at most the crop size")

    @property
    def max_steps(self) -> int:
        return self.options.epochs

    def build_network(self) -> nn.Layer:
        return CutPasteNet(self.trunk, self.options.head_layer, CLASSES[self.options.variant])

    def make_optimizer(self) -> tuple[paddle.optimizer.Optimizer, paddle.optimizer.lr.LRScheduler]:
        # lr (1 + cos(pi t / T)) / 2 at step t of T, the closed form the re-implementation's
        # CosineAnnealingWarmRestarts(T_0=T) gives (Paddle's CosineAnnealingDecay is recursive and drifts)
        steps = self.options.epochs
        schedule = paddle.optimizer.lr.LambdaDecay(self.options.lr,
                                                   lambda t: (1 + math.cos(math.pi * t / steps)) / 2)
        optimizer = paddle.optimizer.Momentum(schedule, momentum=0.9, parameters=self.network.parameters(),
                                              weight_decay=3e-5)
        return optimizer, schedule

    def loss(self, images: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        step = len(self.losses)
        rng = np.random.default_rng([self.config.seed, step])
        pixels = to_pixels(images.numpy())
        samples, labels = training_batch(np.clip(pixels, 0.0, 1.0), self.options.variant, rng,
                                         self.options.patch_size)
        for param in self.trunk.parameters():
            param.stop_gradient = step < self.options.freeze_backbone
        logits = self.network(paddle.to_tensor(to_inputs(samples)))
        target = paddle.to_tensor(labels)
        accuracy = paddle.mean((paddle.argmax(logits, axis=1) == target).astype("float32"))
        return F.cross_entropy(logits, target), accuracy

    # -- density -----------------------------------------------------------------------------
    def embeddings(self, images: np.ndarray) -> np.ndarray:
        """L2-normalised embeddings (B, L, C) float32 of images (B, 3, S, S): L = 1, or the windows."""
        self.network.eval()
        x = paddle.to_tensor(np.asarray(images, dtype=np.float32))
        patch = self.options.patch_size
        if patch:
            x = Patches(self.config.image_size, patch, self.options.patch_stride)(x)
        with paddle.no_grad():
            out = l2_normalise(self.network.embed(x)).numpy()
        return out.reshape(len(images), -1, out.shape[-1])

    def fit_density(self, embeddings: np.ndarray) -> GaussianDensity:
        """The Gaussian of embeddings (B, L, C) (a seeded subset of at most DENSITY_ROWS rows)."""
        rows = embeddings.reshape(-1, embeddings.shape[-1])
        if len(rows) > DENSITY_ROWS:
            pick = np.random.default_rng(self.config.seed).choice(len(rows), DENSITY_ROWS, replace=False)
            rows = rows[np.sort(pick)]
        return GaussianDensity.fit(rows, f"{self.category or self.method}: training embeddings")

    def image_scores(self, density: GaussianDensity, embeddings: np.ndarray) -> np.ndarray:
        """Image scores (B,) of embeddings (B, L, C) under ``density``, as the fused graph gives them."""
        scores = density.score(embeddings.reshape(-1, embeddings.shape[-1])).reshape(len(embeddings), -1)
        patch = self.options.patch_size
        if not patch:
            return scores[:, 0]
        matrix = coverage_matrix(self.config.image_size, patch, self.options.patch_stride, self.config.sigma)
        side = matrix.shape[1]
        maps = matrix @ scores.reshape(-1, side, side) @ matrix.T
        return maps.reshape(len(maps), -1).max(axis=1)

    def calibrate(self, batches: Iterable[Batch]) -> float:
        """Fit the density on the embeddings of ``batches`` (normal training images), and set the
        threshold out of fold: each half of the images (alternating) is scored by the Gaussian of
        the other half, the threshold is the highest of those scores (``score_min`` the lowest)."""
        parts = [self.embeddings(unpack_batch(batch)[0]) for batch in batches]
        if sum(len(part) for part in parts) < 4:
            raise InputError(f"{self.category or self.method}: CutPaste's density needs at least 4 "
                             "training images (2 per calibration fold); add images or raise --calib_images")
        embeddings = np.concatenate(parts)
        folds = (embeddings[0::2], embeddings[1::2])
        held_out = np.concatenate([self.image_scores(self.fit_density(fit), other)
                                   for fit, other in (folds, folds[::-1])])
        self.density = self.fit_density(embeddings)
        self._scorer = None
        self.threshold, self.score_min = float(held_out.max()), float(held_out.min())
        return self.threshold

    def fused_layer(self) -> nn.Layer:
        if self.density is None:
            raise ConfigError("the CutPaste model has no density yet: call calibrate() with the "
                              "training images after fit()")
        return CutPasteScorer(self.network, self.density, self.config.image_size, self.options.patch_size,
                              self.options.patch_stride, self.config.sigma)

    # -- checkpoints -------------------------------------------------------------------------
    @classmethod
    def array_specs(cls, config: ModelConfig, fitted: bool,
                    arrays: dict[str, np.ndarray]) -> dict[str, ArraySpec]:
        specs = super().array_specs(config, fitted, arrays)
        if fitted:
            dim = cls.layer_dim(config)
            specs.update(density_mean=ArraySpec((dim,)), density_precision=ArraySpec((dim, dim)),
                         density_shrinkage=ArraySpec(()))
        return specs

    @classmethod
    def layer_dim(cls, config: ModelConfig) -> int:
        """Embedding length of ``config``'s architecture."""
        return layer_channels(config.arch, cls.layers)[-1]

    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = super()._arrays()
        if self.fitted:
            if self.density is None:
                raise ConfigError("the CutPaste model has no density yet: call calibrate() before save()")
            arrays.update(density_mean=self.density.mean, density_precision=self.density.precision,
                          density_shrinkage=np.array(self.density.shrinkage))
        return arrays

    def _restore(self, arrays: dict[str, np.ndarray], fitted: bool) -> None:
        super()._restore(arrays, fitted)
        if fitted:
            self.density = GaussianDensity(arrays["density_mean"], arrays["density_precision"],
                                           float(arrays["density_shrinkage"]))
