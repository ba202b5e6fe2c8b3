"""A test-only trained method, ``--method toyae``, registered through ORTHOAD_PLUGINS=toy_method.

A 1x1-convolution autoencoder over the frozen trunk's layer1 features, trained with Adam and a
learning rate halved every epoch. The anomaly map is the root mean squared reconstruction error
at each position, upsampled and blurred like the other methods' maps; the image score is its
maximum. It drives the trained-network interface (models.components.trained) through train.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import paddle
from paddle import nn

from core.errors import ConfigError
from core.script import int_at_least, positive_float, positive_int
from models import register_method
from models.base import option
from models.components.layers import AnomalyMapHead
from models.components.static_ops import sqrt
from models.components.trained import TrainedModel, TrainingOptions

WIDTHS = {"small": 4, "wide": 16}


@dataclass(frozen=True)
class ToyOptions(TrainingOptions):
    """The toy's options: the training options with its own defaults, and the bottleneck."""

    name_fields: ClassVar[tuple[str, ...]] = ("variant",)
    epochs: int = option(2, "passes over the training images", positive_int)
    lr: float = option(0.01, "learning rate of the first epoch (halved every epoch)", positive_float)
    variant: str = option("small", "bottleneck: small (4 channels) or wide (16)")
    steps: int = option(0, "stop after this many optimizer steps (0: run --epochs)", int_at_least(0))

    def check(self) -> None:
        super().check()
        if self.variant not in WIDTHS:
            raise ConfigError(f"--variant {self.variant}: use {' or '.join(WIDTHS)}")


class Reconstruction(nn.Layer):
    """Images (N, 3, S, S) -> (anomaly map (N, 1, S, S), image score (N,))."""

    def __init__(self, trunk: nn.Layer, network: nn.Layer, grid: tuple[int, int], size: int,
                 sigma: float) -> None:
        super().__init__()
        self.trunk, self.network = trunk, network
        self.head = AnomalyMapHead(grid, (size, size), sigma)

    def forward(self, x: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        features = self.trunk(x)[0]
        error = (self.network(features) - features) ** 2
        return self.head(sqrt(paddle.mean(error, axis=1, keepdim=True)))


@register_method
class ToyAutoencoder(TrainedModel):
    """``--method toyae``."""

    method = "toyae"
    layers = ("layer1",)
    Options = ToyOptions

    @property
    def max_steps(self) -> int | None:
        return self.options.steps or None

    def build_network(self) -> nn.Layer:
        channels, width = self.trunk.channels[0], WIDTHS[self.options.variant]
        return nn.Sequential(nn.Conv2D(channels, width, 1), nn.ReLU(), nn.Conv2D(width, channels, 1))

    def make_optimizer(self) -> tuple[paddle.optimizer.Optimizer, paddle.optimizer.lr.LRScheduler]:
        schedule = paddle.optimizer.lr.StepDecay(self.options.lr, step_size=1, gamma=0.5)
        return paddle.optimizer.Adam(schedule, parameters=self.network.parameters()), schedule

    def loss(self, images: paddle.Tensor) -> paddle.Tensor:
        with paddle.no_grad():
            features = self.trunk(images)[0]
        return paddle.mean((self.network(features) - features) ** 2)

    def fused_layer(self) -> nn.Layer:
        return Reconstruction(self.trunk, self.network, self.grid, self.config.image_size,
                              self.config.sigma)
