"""PaDiM model: a random subset of k of the F feature channels, kept in ascending order."""

from __future__ import annotations

import numpy as np
from paddle import nn

from models.base import ModelConfig
from models.checkpoint import ArraySpec
from models.components.backbone import layer_grid
from models.components.gaussian_model import GaussianModel
from models.components.projection import ChannelSubset


class PadimModel(GaussianModel):
    """Per-position Gaussian on k randomly chosen channels (``--method padim``)."""

    method = "padim"

    def _init_random(self, rng: np.random.Generator) -> None:
        features = self.feature_channels()
        self.channels = np.sort(rng.choice(features, size=self.options.k, replace=False))

    def embedding(self) -> nn.Layer:
        grids = [layer_grid(self.config.image_size, name) for name in self.layers]
        return ChannelSubset(self.channels, self.trunk.channels, grids)

    def embedding_arrays(self) -> dict[str, np.ndarray]:
        return self._random_arrays()

    def _random_arrays(self) -> dict[str, np.ndarray]:
        return {"channels": self.channels.astype(np.int64)}

    @classmethod
    def random_specs(cls, config: ModelConfig, channels: tuple[int, ...]) -> dict[str, ArraySpec]:
        """The k channel indices."""
        return {"channels": ArraySpec((config.options.k,), "i")}

    def _restore_random(self, arrays: dict[str, np.ndarray]) -> None:
        channels = np.asarray(arrays["channels"], dtype=np.int64)
        features = sum(self.trunk.channels)
        if len(np.unique(channels)) != len(channels) or channels.min() < 0 or channels.max() >= features:
            raise ValueError(f"channels must be distinct indices below {features}")
        self.channels = channels
