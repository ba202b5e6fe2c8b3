"""EfficientAD's networks: the patch description network (PDN, sizes S and M) and the autoencoder.

PDN-S: conv 4x4 128, avgpool 2, conv 4x4 256, avgpool 2, conv 3x3 256, conv 4x4 C (ReLU after
every conv but the last). PDN-M: conv 4x4 256, avgpool 2, conv 4x4 512, avgpool 2, conv 1x1 512,
conv 3x3 512, conv 4x4 C, conv 1x1 C. No padding: a 256 px image gives a 56 x 56 grid (each output
position sees a 33 x 33 patch). The teacher has C = 384, the student 768 (384 imitate the teacher,
384 the autoencoder).

The autoencoder encodes the whole image to a 64-d vector (six strided convs) and decodes it with
bilinear resizes and 4x4 convs back to the PDN's grid; the resizes are fixed matrices
(models.components.layers.bilinear_resize), so the graph exports and runs under oneDNN.
"""

from __future__ import annotations

import paddle
from paddle import nn

from core.errors import ConfigError
from models.components.layers import bilinear_resize

SIZES = ("s", "m")
CHANNELS = 384
MIN_SIDE = 64
"""Smallest input side: the autoencoder's five stride-2 convs need 32, the PDN 33; 64 keeps the
decoder's resize ladder distinct."""
_DECODER_SIZES = (3, 8, 15, 32, 63, 127)
"""The paper's decoder resize targets at 256 px; other inputs scale them."""


def check_size(size: str) -> None:
    """ConfigError unless ``size`` is "s" or "m"."""
    if size not in SIZES:
        raise ConfigError(f"--size {size}: choose s or m")


def pdn_grid(side: int) -> int:
    """Side of the PDN's output grid for an input side (256 -> 56)."""
    side = (side - 3) // 2  # conv 4x4, avgpool 2
    side = (side - 3) // 2  # conv 4x4, avgpool 2
    return side - 2 - 3  # conv 3x3, conv 4x4 (PDN-M's extra 1x1 convs keep the size)


def pdn(size: str, channels: int = CHANNELS) -> nn.Sequential:
    """A PDN of ``size`` "s" or "m": images (N, 3, S, S) -> features (N, channels, g, g)."""
    check_size(size)
    if size == "s":
        return nn.Sequential(
            nn.Conv2D(3, 128, 4), nn.ReLU(), nn.AvgPool2D(2, 2),
            nn.Conv2D(128, 256, 4), nn.ReLU(), nn.AvgPool2D(2, 2),
            nn.Conv2D(256, 256, 3), nn.ReLU(),
            nn.Conv2D(256, channels, 4),
        )
    return nn.Sequential(
        nn.Conv2D(3, 256, 4), nn.ReLU(), nn.AvgPool2D(2, 2),
        nn.Conv2D(256, 512, 4), nn.ReLU(), nn.AvgPool2D(2, 2),
        nn.Conv2D(512, 512, 1), nn.ReLU(),
        nn.Conv2D(512, 512, 3), nn.ReLU(),
        nn.Conv2D(512, channels, 4), nn.ReLU(),
        nn.Conv2D(channels, channels, 1),
    )


class Autoencoder(nn.Layer):
    """Images (N, 3, S, S) -> reconstructed teacher features (N, 384, g, g), g = pdn_grid(S)."""

    def __init__(self, side: int, channels: int = CHANNELS) -> None:
        super().__init__()
        if side < MIN_SIDE:
            raise ConfigError(f"--crop_size {side}: EfficientAD needs images of at least {MIN_SIDE} px")
        down = []
        for c_in, c_out in ((3, 32), (32, 32), (32, 64), (64, 64), (64, 64)):
            down += [nn.Conv2D(c_in, c_out, 4, stride=2, padding=1), nn.ReLU()]
        bottom = side // 32  # five stride-2 convs
        self.encoder = nn.Sequential(*down, nn.Conv2D(64, 64, bottom))
        sizes = [max(1, round(s * side / 256)) for s in _DECODER_SIZES]
        blocks, current = [], 1
        for target in sizes:
            blocks += [bilinear_resize((current, current), (target, target)),
                       nn.Conv2D(64, 64, 4, padding=2), nn.ReLU(), nn.Dropout(0.2)]
            current = target + 1  # a 4x4 conv with padding 2 adds one
        grid = pdn_grid(side)
        blocks += [bilinear_resize((current, current), (grid, grid)),
                   nn.Conv2D(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2D(64, channels, 3, padding=1)]
        self.decoder = nn.Sequential(*blocks)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.decoder(self.encoder(x))
