"""PUAD (Sugawara & Imamura, ICIP 2024): ``--method puad``, EfficientAD plus a score for
"unpicturable" (logical) anomalies.

The student's teacher-imitating output S_st(x) (or, with ``--feature_extractor teacher``, the
normalised teacher output), averaged over the grid, is a 384-d vector per image. A Gaussian with
Ledoit-Wolf covariance (models.components.density.GaussianDensity) is fitted on the training
images' vectors; the PUAD score is the Mahalanobis distance. Both EfficientAD's image score E and
the Mahalanobis distance D are standardised with their mean and standard deviation (ddof 1) over
the validation images and added:

    score = (E - m_E) / s_E + (D - m_D) / s_D

The anomaly map is EfficientAD's, standardised the same way and shifted by the image's
(D - m_D) / s_D, so that its maximum is the score and ``map > threshold`` outlines what is
anomalous (a logical anomaly raises the whole map).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import paddle

from core.errors import ConfigError, InputError
from models.base import Batch, ModelConfig, option
from models.checkpoint import ArraySpec
from models.components.density import GaussianDensity, MahalanobisScore
from models.efficientad.model import (
    EfficientADModel,
    EfficientADNet,
    EfficientADOptions,
    EfficientADScore,
    grid_mean,
)
from models.efficientad.networks import CHANNELS

EXTRACTORS = ("student", "teacher")


@dataclass(frozen=True)
class PuadOptions(EfficientADOptions):
    """EfficientAD's options and the network whose output feeds the Gaussian."""

    name_fields: ClassVar[tuple[str, ...]] = ("size", "feature_extractor")
    feature_extractor: str = option("student", "puad: student or teacher output, averaged over the "
                                               "grid, for the Gaussian")

    def check(self) -> None:
        super().check()
        if self.feature_extractor not in EXTRACTORS:
            raise ConfigError(f"--feature_extractor {self.feature_extractor}: choose student or teacher")


class PuadNet(EfficientADNet):
    """EfficientAD's networks and statistics plus the Gaussian (mean (384,), precision (384, 384))
    and the standardisation (4,) = m_E, s_E, m_D, s_D."""

    def __init__(self, size: str, side: int) -> None:
        super().__init__(size, side)
        self.register_buffer("gauss_mean", paddle.zeros([CHANNELS]), persistable=True)
        self.register_buffer("gauss_precision", paddle.zeros([CHANNELS, CHANNELS]), persistable=True)
        self.register_buffer("standard", paddle.ones([4]), persistable=True)


class PuadScore(EfficientADScore):
    """EfficientAD's scoring with the standardised Mahalanobis term added (see the module)."""

    def __init__(self, network: PuadNet, grid: int, side: int, use_teacher: bool) -> None:
        super().__init__(network, grid, side)
        self.use_teacher = use_teacher
        self.distance = MahalanobisScore(network.gauss_mean.numpy().astype(np.float64),
                                         network.gauss_precision.numpy().astype(np.float64))

    def adjust(self, amap: paddle.Tensor, teacher: paddle.Tensor, imitation: paddle.Tensor) -> paddle.Tensor:
        feature = grid_mean(teacher if self.use_teacher else imitation)
        s = self.network.standard
        logical = (self.distance(feature) - s[2]) / s[3]
        return (amap - s[0]) / s[1] + paddle.reshape(logical, [-1, 1, 1, 1])


class PuadModel(EfficientADModel):
    """``--method puad``."""

    method = "puad"
    Options = PuadOptions

    def build_network(self) -> PuadNet:
        return PuadNet(self.options.size, self.config.image_size)

    def features(self, outputs: list[np.ndarray]) -> np.ndarray:
        """The grid-averaged vectors (n, 384) of :meth:`raw_outputs`, of the chosen extractor."""
        return outputs[2] if self.options.feature_extractor == "teacher" else outputs[3]

    def fit_image_scores(self, train: Iterable[Batch], validation: list[np.ndarray]) -> None:
        """The Gaussian on the training images, then the validation means and deviations."""
        density = GaussianDensity.fit(self.features(self.raw_outputs(train)),
                                      f"{self.category or self.method} training vectors")
        scores = [self.grid_scores(validation[0], validation[1]), density.score(self.features(validation))]
        if len(scores[0]) < 2:
            raise InputError("puad: the standardisation needs at least 2 validation images")
        stats = [value for s in scores for value in (s.mean(), max(s.std(ddof=1), 1e-12))]
        net = self.network
        net.gauss_mean.set_value(density.mean.astype(np.float32))
        net.gauss_precision.set_value(density.precision.astype(np.float32))
        net.standard.set_value(np.asarray(stats, dtype=np.float32))
        self._scorer = None
        print(f"{self.category or self.method}: Gaussian shrinkage {density.shrinkage:.4f}; validation "
              f"EfficientAD score {stats[0]:.4g} +- {stats[1]:.3g}, Mahalanobis {stats[2]:.4g} +- "
              f"{stats[3]:.3g}", file=sys.stderr)

    def score_layer(self) -> PuadScore:
        if not float(np.abs(self.network.gauss_precision.numpy()).max()) > 0:
            raise ConfigError(f"{self.category or self.method}: the Gaussian is not fitted; fit with "
                              "train.py, or call fit_validation() with training and validation images")
        return PuadScore(self.network, self.grid[0], self.config.image_size,
                         self.options.feature_extractor == "teacher")

    @classmethod
    def array_specs(cls, config: ModelConfig, fitted: bool,
                    arrays: dict[str, np.ndarray]) -> dict[str, ArraySpec]:
        return {**super().array_specs(config, fitted, arrays), "net.standard": ArraySpec((4,)),
                "net.gauss_precision": ArraySpec((CHANNELS, CHANNELS))}
