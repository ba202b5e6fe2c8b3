"""EfficientAD (Batzner et al., WACV 2024): ``--method efficientad``.

A distilled teacher PDN (``--teacher``, frozen), a student PDN with 768 output channels and an
autoencoder, trained on normal images:

    t = (T(x) - mu) / sigma                      teacher output, per-channel statistics of the
                                                 training images (mu, sigma (384,))
    L_hard = mean of d where d >= q_0.999(d),    d = (t - S_st(x))^2 over every channel and position
    L_pen  = mean S_st(p)^2                      p: --penalty_images (ImageNet); off without them
    x' = jitter(x)                               brightness, contrast or saturation x U(0.8, 1.2)
    L_ae   = mean (T_n(x') - A(x'))^2,  L_stae = mean (A(x') - S_ae(x'))^2
    loss   = L_hard + L_pen + L_ae + L_stae      Adam 1e-4, weight decay 1e-5, --steps steps

Scoring: M_st = mean_c (t - S_st)^2, M_ae = mean_c (A - S_ae)^2 on the PDN grid (g x g), each
normalised with quantiles qa = q0.9, qb = q0.995 of its values over the validation images:
0.1 (M - qa) / (qb - qa); the map is 0.5 M_st + 0.5 M_ae, zero-padded by 4 and resized bilinearly
to the image; the image score is the map's maximum on the grid.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import numpy as np
import paddle
from paddle import nn

from core.errors import ConfigError
from core.resample import bilinear_matrix
from core.script import non_negative_int, positive_float, positive_int
from models.base import Batch, ModelConfig, option, unpack_batch
from models.checkpoint import ArraySpec
from models.components.color import adjust, to_inputs, to_pixels
from models.components.layers import SeparableResize
from models.components.static_ops import reduce_sum
from models.components.trained import TrainedModel, TrainingOptions
from models.efficientad.images import ImageFolder
from models.efficientad.networks import CHANNELS, Autoencoder, check_size, pdn, pdn_grid
from models.efficientad.teacher import ChannelMoments, make_adam, read_teacher

QUANTILES = (0.9, 0.995)
HARD_QUANTILE = 0.999
JITTER = (0.8, 1.2)
PAD = 4
DISTILL_COMMAND = "python -m models.efficientad.distill --images DIR --arch ARCH --pretrained imagenet|PATH"


@dataclass(frozen=True)
class EfficientADOptions(TrainingOptions):
    """EfficientAD's options: PDN size, teacher file, step budget, penalty images."""

    name_fields: ClassVar[tuple[str, ...]] = ("size",)
    lr: float = option(1e-4, "learning rate (Adam, weight decay 1e-5)", positive_float)
    epochs: int = option(1, "unused by efficientad/puad: the fit runs --steps steps", positive_int)
    size: str = option("s", "efficientad/puad: PDN size s or m")
    teacher: str = option("", "efficientad/puad: distilled teacher file (models.efficientad.distill)")
    steps: int = option(70000, "optimizer steps (the paper: 70000)", non_negative_int)
    penalty_images: str = option("", "efficientad/puad: folder of ImageNet images for the student's "
                                     "penalty term (off when empty)")

    def check(self) -> None:
        super().check()
        check_size(self.size)
        if self.steps < 1:
            raise ConfigError(f"--steps {self.steps}: efficientad needs at least 1 step")


def jitter(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The autoencoder's augmentation of ImageNet-normalised images (B, 3, S, S): per image one of
    brightness, contrast or saturation, by a factor drawn from U(0.8, 1.2), on [0, 1] pixels
    (clipped), as torchvision's adjust_* do; returned normalised again."""
    pixels = to_pixels(images)
    kinds = rng.integers(0, 3, size=len(images))
    factors = rng.uniform(*JITTER, size=len(images)).astype(np.float32)
    out = [adjust(image, int(kind), f) for image, kind, f in zip(pixels, kinds, factors, strict=True)]
    return to_inputs(np.stack(out))


def hard_loss(distance: paddle.Tensor) -> paddle.Tensor:
    """Mean of the squared differences (any shape) at or above their 0.999 quantile."""
    limit = paddle.quantile(distance.flatten(), HARD_QUANTILE)
    return paddle.mean(paddle.masked_select(distance, distance >= limit))


def channel_mean(x: paddle.Tensor) -> paddle.Tensor:
    """Mean over the channels of (N, C, h, w) -> (N, 1, h, w), as a sum (oneDNN's mean kernel
    rejects this reduction and falls back with a message)."""
    return reduce_sum(x, axis=1).unsqueeze(1) * (1.0 / x.shape[1])


def grid_mean(x: paddle.Tensor) -> paddle.Tensor:
    """Mean over the positions of (N, C, h, w) -> (N, C), as a sum (see :func:`channel_mean`)."""
    n, c, h, w = x.shape
    return reduce_sum(paddle.reshape(x, [-1, c, h * w]), axis=2) * (1.0 / (h * w))


def pad_resize_matrix(grid: int, side: int) -> np.ndarray:
    """(side, grid): zero-pad the grid by PAD on both ends, then bilinear resize to ``side``."""
    pad = np.zeros((grid + 2 * PAD, grid))
    pad[PAD:PAD + grid] = np.eye(grid)
    return (bilinear_matrix(grid + 2 * PAD, side) @ pad).astype(np.float32)


class EfficientADNet(nn.Layer):
    """Teacher (frozen), student, autoencoder, and the statistics the scores need (buffers):
    teacher channel mean/std (1, 384, 1, 1), map quantiles (4,) = qa_st, qb_st, qa_ae, qb_ae."""

    def __init__(self, size: str, side: int) -> None:
        super().__init__()
        self.teacher = pdn(size)
        for param in self.teacher.parameters():
            param.stop_gradient = True
        self.student = pdn(size, 2 * CHANNELS)
        self.autoencoder = Autoencoder(side)
        self.register_buffer("teacher_mean", paddle.zeros([1, CHANNELS, 1, 1]), persistable=True)
        self.register_buffer("teacher_std", paddle.zeros([1, CHANNELS, 1, 1]), persistable=True)
        self.register_buffer("quantiles", paddle.zeros([4]), persistable=True)

    def trainable(self) -> list[paddle.Tensor]:
        """The student's and the autoencoder's parameters (the teacher stays fixed)."""
        return [*self.student.parameters(), *self.autoencoder.parameters()]

    def teacher_features(self, x: paddle.Tensor) -> paddle.Tensor:
        """Normalised teacher output (N, 384, g, g)."""
        return (self.teacher(x) - self.teacher_mean) / self.teacher_std

    def raw_maps(self, x: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor, paddle.Tensor]:
        """(M_st, M_ae) (N, 1, g, g) before normalisation, the teacher output and the student's
        teacher-imitating output (N, 384, g, g)."""
        teacher = self.teacher_features(x)
        student = self.student(x)
        imitation = student[:, :CHANNELS]
        map_st = channel_mean((teacher - imitation) ** 2)
        map_ae = channel_mean((self.autoencoder(x) - student[:, CHANNELS:]) ** 2)
        return map_st, map_ae, teacher, imitation

    def combined(self, map_st: paddle.Tensor, map_ae: paddle.Tensor) -> paddle.Tensor:
        """0.5 of each quantile-normalised map (N, 1, g, g)."""
        q = self.quantiles
        return 0.05 * (map_st - q[0]) / (q[1] - q[0]) + 0.05 * (map_ae - q[2]) / (q[3] - q[2])


class EfficientADScore(nn.Layer):
    """Images (N, 3, S, S) -> (anomaly map (N, 1, S, S), image score (N,) = max of the grid map)."""

    def __init__(self, network: EfficientADNet, grid: int, side: int) -> None:
        super().__init__()
        self.network = network
        matrix = pad_resize_matrix(grid, side)
        self.resize = SeparableResize(matrix, matrix)

    def forward(self, x: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        map_st, map_ae, teacher, imitation = self.network.raw_maps(x)
        amap = self.adjust(self.network.combined(map_st, map_ae), teacher, imitation)
        return self.resize(amap), paddle.max(amap, axis=[1, 2, 3])

    def adjust(self, amap: paddle.Tensor, teacher: paddle.Tensor, imitation: paddle.Tensor) -> paddle.Tensor:
        """The grid map (N, 1, g, g) whose maximum is the image score: EfficientAD's as it is."""
        return amap


class EfficientADModel(TrainedModel):
    """``--method efficientad``."""

    method = "efficientad"
    layers = ()
    Options = EfficientADOptions
    holds_out_validation = True
    schedule_per = "step"
    progress_names = ("loss", "hard", "ae", "stae", "penalty")

    # -- construction ------------------------------------------------------------------------
    @property
    def grid(self) -> tuple[int, int]:
        side = pdn_grid(self.config.image_size)
        return side, side

    @property
    def max_steps(self) -> int:
        return self.options.steps

    def build_network(self) -> EfficientADNet:
        return EfficientADNet(self.options.size, self.config.image_size)

    def make_optimizer(self) -> tuple[paddle.optimizer.Optimizer, paddle.optimizer.lr.LRScheduler]:
        """Adam over the student and the autoencoder; the rate drops tenfold after 95 % of the steps."""
        drop = max(1, int(0.95 * self.options.steps))
        schedule = paddle.optimizer.lr.MultiStepDecay(self.options.lr, [drop], 0.1)
        return make_adam(self.network.trainable(), schedule), schedule

    def _init_random(self, rng: np.random.Generator) -> None:
        """A new fit: the teacher's weights from ``--teacher`` (the rest is drawn in __init__)."""
        path = self.options.teacher
        if not path:
            raise ConfigError(f"--method {self.method} needs --teacher PATH, a distilled teacher PDN; "
                              f"make one with: {DISTILL_COMMAND} --size {self.options.size}")
        teacher = read_teacher(path)
        if (teacher.size, teacher.arch) != (self.options.size, self.config.arch):
            raise ConfigError(f"--teacher {path} is a PDN-{teacher.size.upper()} distilled from "
                              f"{teacher.arch}: pass --size {teacher.size} --arch {teacher.arch}")
        self.network.teacher.set_state_dict(teacher.network.state_dict())

    @cached_property
    def penalty_images(self) -> ImageFolder | None:
        """The penalty images (listed when first needed), or None without --penalty_images."""
        if not self.options.penalty_images:
            return None
        return ImageFolder(self.options.penalty_images, self.config.image_size, "--penalty_images")

    # -- the fit -----------------------------------------------------------------------------
    def prepare(self, batches: Iterable[Batch]) -> None:
        """The teacher's per-channel mean and std over the training images (every position)."""
        moments = ChannelMoments()
        with paddle.no_grad():
            for batch in batches:
                images, paths = unpack_batch(batch)
                self.check_finite(images, paths, "pixel values")
                moments.add(self.network.teacher(paddle.to_tensor(images)))
        mean, std = moments.result()
        self.network.teacher_mean.set_value(mean.reshape(1, -1, 1, 1))
        self.network.teacher_std.set_value(std.reshape(1, -1, 1, 1))

    def fit(self, batches: Iterable[Batch]) -> EfficientADModel:
        """The API fit: :meth:`prepare` on ``batches`` (a new fit), then the steps. Call
        :meth:`fit_validation` before scoring (train.py does)."""
        if self.n_train == 0:
            self.prepare(batches)
        super().fit(batches)
        return self

    def loss(self, images: paddle.Tensor) -> tuple[paddle.Tensor, ...]:
        """The four terms' sum, then the terms (hard, ae, stae, penalty) for the progress bar.
        Jitter, penalty images and dropout masks come from (seed, step): a resumed fit repeats them."""
        if not float(self.network.teacher_std.numpy().min()) > 0:
            raise ConfigError("efficientad: call prepare() with the training images before the first step")
        state = paddle.get_rng_state()
        paddle.seed(self.config.seed * 1_000_003 + len(self.losses))
        try:
            return self.step_loss(images, np.random.default_rng([self.config.seed, len(self.losses)]))
        finally:
            paddle.set_rng_state(state)

    def step_loss(self, images: paddle.Tensor, rng: np.random.Generator) -> tuple[paddle.Tensor, ...]:
        net = self.network
        with paddle.no_grad():
            teacher = net.teacher_features(images)
        hard = hard_loss((teacher - net.student(images)[:, :CHANNELS]) ** 2)
        penalty = paddle.zeros([])
        if self.penalty_images is not None:
            other = paddle.to_tensor(self.penalty_images.draw(rng, images.shape[0]))
            penalty = paddle.mean(net.student(other)[:, :CHANNELS] ** 2)
        augmented = paddle.to_tensor(jitter(images.numpy(), rng))
        with paddle.no_grad():
            teacher_aug = net.teacher_features(augmented)
        reconstruction = net.autoencoder(augmented)
        loss_ae = paddle.mean((teacher_aug - reconstruction) ** 2)
        loss_stae = paddle.mean((reconstruction - net.student(augmented)[:, CHANNELS:]) ** 2)
        return hard + penalty + loss_ae + loss_stae, hard, loss_ae, loss_stae, penalty

    # -- after training ----------------------------------------------------------------------
    def raw_outputs(self, batches: Iterable[Batch]) -> list[np.ndarray]:
        """[M_st (n, g, g), M_ae (n, g, g), teacher mean (n, 384), student mean (n, 384)] of
        ``batches``, eager and without dropout."""
        self.network.eval()
        parts: list[list[np.ndarray]] = [[], [], [], []]
        with paddle.no_grad():
            for batch in batches:
                images, paths = unpack_batch(batch)
                self.check_finite(images, paths, "pixel values")
                map_st, map_ae, teacher, imitation = self.network.raw_maps(paddle.to_tensor(images))
                outputs = (map_st[:, 0], map_ae[:, 0], grid_mean(teacher), grid_mean(imitation))
                for store, value in zip(parts, outputs, strict=True):
                    store.append(value.numpy())
        return [np.concatenate(store) for store in parts]

    def fit_validation(self, train: Iterable[Batch], validation: Iterable[Batch]) -> None:
        """Map quantiles q0.9 and q0.995 of M_st and M_ae over every validation position."""
        outputs = self.raw_outputs(validation)
        self.set_quantiles(outputs[0], outputs[1])
        print(f"{self.category or self.method}: map quantiles {np.round(self.quantiles, 5).tolist()} "
              f"from {len(outputs[0])} validation images", file=sys.stderr)
        self.fit_image_scores(train, outputs)

    def fit_image_scores(self, train: Iterable[Batch], validation: list[np.ndarray]) -> None:
        """After the quantiles: fit what the image score needs beyond the map (PUAD); nothing here.
        ``validation`` is :meth:`raw_outputs` of the validation images."""

    def grid_scores(self, map_st: np.ndarray, map_ae: np.ndarray) -> np.ndarray:
        """EfficientAD's image scores (n,) of raw maps (n, g, g): the normalised map's maximum."""
        q = self.quantiles.astype(np.float64)
        amap = 0.05 * (map_st - q[0]) / (q[1] - q[0]) + 0.05 * (map_ae - q[2]) / (q[3] - q[2])
        return amap.reshape(len(amap), -1).max(axis=1)

    def set_quantiles(self, map_st: np.ndarray, map_ae: np.ndarray) -> None:
        values = [np.quantile(m.astype(np.float64), q) for m in (map_st, map_ae) for q in QUANTILES]
        self.network.quantiles.set_value(np.asarray(values, dtype=np.float32))
        self._scorer = None

    @property
    def quantiles(self) -> np.ndarray:
        """qa_st, qb_st, qa_ae, qb_ae (4,)."""
        return self.network.quantiles.numpy()

    def fused_layer(self) -> nn.Layer:
        q = self.quantiles
        if not (q[1] > q[0] and q[3] > q[2]):
            raise ConfigError(f"{self.category or self.method}: the map quantiles are not set (or equal); "
                              "fit with train.py, or call fit_validation() with validation images")
        return self.score_layer()

    def score_layer(self) -> EfficientADScore:
        return EfficientADScore(self.network, self.grid[0], self.config.image_size)

    # -- checkpoints -------------------------------------------------------------------------
    @classmethod
    def array_specs(cls, config: ModelConfig, fitted: bool,
                    arrays: dict[str, np.ndarray]) -> dict[str, ArraySpec]:
        return {**super().array_specs(config, fitted, arrays),
                "net.quantiles": ArraySpec((4,)), "net.teacher_std": ArraySpec((1, CHANNELS, 1, 1))}


