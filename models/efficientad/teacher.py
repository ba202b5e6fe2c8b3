"""A distilled teacher file: reading it, its weights and target statistics, and the pieces the
distillation (models.efficientad.distill) and the student's training share.

The file is an npz (no pickle, see models.checkpoint): the PDN's weights ``net.*``, the targets'
``mean``/``std`` (384,) and metadata (kind, stage, size, arch, pretrained, image_size, steps).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import paddle
from paddle import nn

from core.errors import CheckpointError
from models.checkpoint import read_npz
from models.components.backbone import ARCHS
from models.efficientad.networks import CHANNELS, SIZES, pdn

KIND = "efficientad_teacher"
WEIGHT_PREFIX = "net."


@dataclass
class Teacher:
    """A distilled teacher: the PDN and the normalisation of its targets (mean, std (384,))."""

    size: str
    arch: str
    network: nn.Sequential
    mean: np.ndarray
    std: np.ndarray
    meta: dict


TEACHER_FIX = "distil one with: python -m models.efficientad.distill --images DIR --arch ARCH"


def target_stats(arrays: dict[str, np.ndarray], source: str, fix: str) -> tuple[np.ndarray, np.ndarray]:
    """The targets' channel mean and std (384,) float32 stored in ``arrays``; CheckpointError
    naming ``source`` unless both are finite and std > 0."""
    stats = [np.asarray(arrays.get(name, np.zeros(0)), dtype=np.float32) for name in ("mean", "std")]
    if any(s.shape != (CHANNELS,) or not np.isfinite(s).all() for s in stats) or not (stats[1] > 0).all():
        raise CheckpointError(f"{source}: mean/std must be {CHANNELS} finite values (std > 0); "
                              f"the file was changed; {fix}")
    return stats[0], stats[1]


def read_teacher(path: str) -> Teacher:
    """The teacher at ``path`` (a file models.efficientad.distill wrote); CheckpointError naming
    it otherwise."""
    fix = TEACHER_FIX
    if not Path(path).is_file():
        raise CheckpointError(f"--teacher {path}: no such file; {fix}")
    meta, arrays = read_npz(path)
    if meta.get("kind") != KIND:
        raise CheckpointError(f"--teacher {path}: not an EfficientAD teacher file; {fix}")
    if meta.get("stage") != "final":
        raise CheckpointError(f"--teacher {path}: an unfinished distillation; finish it with "
                              "python -m models.efficientad.distill ... --resume")
    size = meta.get("size")
    if size not in SIZES or meta.get("arch") not in ARCHS:
        raise CheckpointError(f"--teacher {path}: metadata size={size!r}, arch={meta.get('arch')!r} "
                              f"are not a PDN size and backbone; the file was changed; {fix}")
    network = pdn(size)
    load_weights(network, arrays, f"--teacher {path}")
    mean, std = target_stats(arrays, f"--teacher {path}", fix)
    return Teacher(size, meta["arch"], network, mean, std, meta)


def load_weights(network: nn.Layer, arrays: dict[str, np.ndarray], source: str) -> None:
    """Set ``network``'s weights from ``arrays[net.<name>]``; CheckpointError naming ``source``."""
    state = {}
    for name, tensor in network.state_dict().items():
        value = arrays.get(WEIGHT_PREFIX + name)
        if value is None or tuple(value.shape) != tuple(tensor.shape) or not np.isfinite(value).all():
            raise CheckpointError(f"{source}: weight {name} is missing, has another shape than "
                                  f"{tuple(tensor.shape)} or is not finite; distil the teacher again")
        state[name] = paddle.to_tensor(np.asarray(value, dtype=np.float32))
    network.set_state_dict(state)


class ChannelMoments:
    """Per-channel mean and standard deviation of feature batches (N, C, h, w), every position
    counted, summed in float64."""

    def __init__(self, channels: int = CHANNELS) -> None:
        self.total = np.zeros(channels)
        self.squares = np.zeros(channels)
        self.count = 0

    def add(self, features: paddle.Tensor) -> None:
        values = features.numpy().astype(np.float64)
        self.total += values.sum(axis=(0, 2, 3))
        self.squares += (values * values).sum(axis=(0, 2, 3))
        self.count += values.shape[0] * values.shape[2] * values.shape[3]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) (C,) float32; std at least 1e-6 (it divides)."""
        mean = self.total / self.count
        std = np.sqrt(np.maximum(self.squares / self.count - mean * mean, 0.0))
        return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)


def make_adam(params: list[paddle.Tensor],
              lr: float | paddle.optimizer.lr.LRScheduler) -> paddle.optimizer.Adam:
    """Adam with the paper's weight decay 1e-5 (L2 added to the gradient, as torch's Adam does)."""
    return paddle.optimizer.Adam(lr, parameters=params, weight_decay=1e-5)


def teacher_arrays(network: nn.Layer, mean: np.ndarray, std: np.ndarray) -> dict[str, np.ndarray]:
    """The arrays of a teacher file: the PDN's weights ``net.*`` and the targets' mean and std."""
    arrays = {WEIGHT_PREFIX + name: value.numpy() for name, value in network.state_dict().items()}
    return {**arrays, "mean": mean, "std": std}
