"""Layers that turn the trunk's layer1..3 features into k-dim vectors on layer1's grid.

Both work layer by layer and only then resize to layer1's grid: a per-position linear map commutes
with nearest-neighbour resizing, so projecting layer2/layer3 at their own (coarser) resolution gives
the same z as projecting the upsampled concatenation, at a fraction of the cost, and the 448- or
1792-channel embedding is never materialised.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn

from models.components.layers import NearestResize


def _resizers(grids: Sequence[int]) -> nn.LayerList:
    target = (grids[0], grids[0])
    return nn.LayerList([NearestResize((g, g), target) for g in grids])


class ProjectedEmbedding(nn.Layer):
    """z = W^T [f1; up(f2); up(f3)] computed as sum_i up(W_i^T f_i).

    ``weight`` (F, k) with F = sum of ``channels``; input: the list of feature maps
    (N, C_i, g_i, g_i); output (N, k, g_1, g_1). With ``identity_first`` the first C_1 rows of
    ``weight`` must be [I | 0]: layer1 is then added to the first C_1 channels as it is, no GEMM.
    """

    def __init__(self, weight: np.ndarray, channels: Sequence[int], grids: Sequence[int],
                 identity_first: bool = False) -> None:
        super().__init__()
        bounds = np.cumsum([0, *channels])
        self.first = 1 if identity_first else 0
        self.lead = int(channels[0])
        for i in range(self.first, len(channels)):
            block = weight[bounds[i] : bounds[i + 1]].T[:, :, None, None]  # (k, C_i, 1, 1)
            self.register_buffer(f"w{i}", paddle.to_tensor(block.astype(np.float32)))
        self.count = len(channels)
        self.resize = _resizers(grids)

    def forward(self, feats: list[paddle.Tensor]) -> paddle.Tensor:
        out = None
        for i in range(self.first, self.count):
            part = self.resize[i](F.conv2d(feats[i], getattr(self, f"w{i}")))
            out = part if out is None else out + part
        if self.first:
            out = paddle.concat([out[:, : self.lead] + feats[0], out[:, self.lead :]], axis=1)
        return out


class ChannelSubset(nn.Layer):
    """z = the channels ``index`` (sorted, into the F-channel concatenation) of [f1; up(f2); up(f3)]."""

    def __init__(self, index: np.ndarray, channels: Sequence[int], grids: Sequence[int]) -> None:
        super().__init__()
        bounds = np.cumsum([0, *channels])
        self.parts: list[int] = []
        for i in range(len(channels)):
            local = index[(index >= bounds[i]) & (index < bounds[i + 1])] - bounds[i]
            if local.size:
                self.register_buffer(f"idx{i}", paddle.to_tensor(local.astype(np.int64)))
                self.parts.append(i)
        self.resize = _resizers(grids)

    def forward(self, feats: list[paddle.Tensor]) -> paddle.Tensor:
        picked = [
            self.resize[i](paddle.index_select(feats[i], getattr(self, f"idx{i}"), axis=1))
            for i in self.parts
        ]
        return paddle.concat(picked, axis=1) if len(picked) > 1 else picked[0]


class FeatureConcat(nn.Layer):
    """x = [f1; up(f2); up(f3)] without projection: the unfused export's embedding.

    Input: the list of feature maps (N, C_i, g_i, g_i); each is nearest-resized to g_1 x g_1 and
    they are concatenated along channels: output (N, F, g_1, g_1), F = sum of C_i.
    """

    def __init__(self, grids: Sequence[int]) -> None:
        super().__init__()
        self.resize = _resizers(grids)

    def forward(self, feats: list[paddle.Tensor]) -> paddle.Tensor:
        return paddle.concat([self.resize[i](feats[i]) for i in range(len(feats))], axis=1)
