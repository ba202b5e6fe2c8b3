"""ResNet feature trunks from ``paddle.vision`` and the loading of their weights.

The trunk keeps only the stem and the layers a method reads, so an exported graph carries no unused
parameters. Weights come from Paddle's own ImageNet download and cache, from a local ``.pdparams``
file (read with a restricted unpickler that only rebuilds numpy arrays), or stay random.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
from collections.abc import Sequence

import numpy as np
import paddle
from paddle import nn
from paddle.vision.models import resnet

from engine.errors import CheckpointError, ConfigError

ARCHS = ("resnet18", "resnet50", "wide_resnet50_2")
_LAYER_CHANNELS = {
    "resnet18": {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512},
    "resnet50": {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048},
    "wide_resnet50_2": {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048},
}
_LAYER_STRIDES = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
_SAFE_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("collections", "OrderedDict"),
}


def layer_channels(arch: str, layers: Sequence[str]) -> tuple[int, ...]:
    """Channel count of each named layer of ``arch``."""
    check_arch(arch)
    return tuple(_LAYER_CHANNELS[arch][name] for name in layers)


def layer_grid(size: int, layer: str) -> int:
    """Side of a layer's feature grid for a square input of ``size`` pixels (conv arithmetic)."""
    side = size
    for _ in range(_LAYER_STRIDES[layer].bit_length() - 1):
        side = (side - 1) // 2 + 1  # every stride-2 step (conv1, maxpool, layer2..4) rounds up
    return side


def check_arch(arch: str) -> None:
    """Raise a ConfigError for an unsupported architecture name."""
    if arch not in ARCHS:
        raise ConfigError(f"--arch {arch}: unknown backbone; choose one of {', '.join(ARCHS)}")


class ResNetTrunk(nn.Layer):
    """Stem plus the requested residual stages of a paddle.vision ResNet.

    ``forward(x)`` takes images (N, 3, H, W) and returns one feature map per requested layer, e.g.
    for resnet18 at 256 px: layer1 (N, 64, 64, 64), layer2 (N, 128, 32, 32), layer3 (N, 256, 16, 16).
    """

    def __init__(self, arch: str, layers: Sequence[str] = ("layer1", "layer2", "layer3")) -> None:
        super().__init__()
        check_arch(arch)
        full = getattr(resnet, arch)(pretrained=False)
        self.arch = arch
        self.layer_names = tuple(layers)
        self.channels = layer_channels(arch, layers)
        self.stem = nn.Sequential(full.conv1, full.bn1, full.relu, full.maxpool)
        last = max(int(name[-1]) for name in layers)
        self.stages = nn.LayerList([getattr(full, f"layer{i}") for i in range(1, last + 1)])
        self.emit = tuple(f"layer{i}" in self.layer_names for i in range(1, last + 1))
        self.eval()

    def forward(self, x: paddle.Tensor) -> list[paddle.Tensor]:
        out = []
        x = self.stem(x)
        for index, stage in enumerate(self.stages):
            x = stage(x)
            if self.emit[index]:
                out.append(x)
        return out

    def weight_arrays(self) -> dict[str, np.ndarray]:
        """All parameters and buffers as float32 numpy arrays keyed by trunk names."""
        return {name: t.numpy().astype(np.float32) for name, t in self.state_dict().items()}

    def load_weight_arrays(self, arrays: dict[str, np.ndarray], source: str) -> None:
        """Set every trunk parameter from ``arrays``; ``source`` names the file in errors."""
        own = self.state_dict()
        missing = [name for name in own if name not in arrays]
        if missing:
            raise CheckpointError(
                f"{source}: has no weights for {len(missing)} {self.arch} trunk tensors "
                f"(first: {missing[0]}); is it a {self.arch} file?"
            )
        for name, tensor in own.items():
            value = np.asarray(arrays[name])
            if tuple(value.shape) != tuple(tensor.shape) or value.dtype.kind != "f":
                raise CheckpointError(
                    f"{source}: {name} has shape {value.shape} and dtype {value.dtype}, {self.arch} "
                    f"needs {tuple(tensor.shape)} floats; is it a {self.arch} file?"
                )
            if not np.isfinite(value).all():
                raise CheckpointError(f"{source}: {name} contains NaN or inf; the file is corrupt")
            tensor.set_value(value.astype(np.float32))


def weights_digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over the names and bytes of the arrays (identifies a trunk's weights)."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(arrays[name], dtype=np.float32).tobytes())
    return digest.hexdigest()


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds dicts of numpy arrays and refuses every other global."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refers to {module}.{name}")
        return super().find_class(module, name)


def read_pdparams(path: str) -> dict[str, np.ndarray]:
    """Read a ``.pdparams`` state dict without running code from the file.

    Paddle writes these with pickle; only numpy arrays (and dicts of them) are rebuilt here, so a
    file that asks for anything else is refused instead of executed.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: weights file not found; check the --pretrained path")
    try:
        with open(path, "rb") as f:
            state = _ArrayUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(
            f"{path}: not a plain Paddle state dict ({exc}); save it with "
            "paddle.save(model.state_dict(), path)"
        ) from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return {k: v for k, v in state.items() if isinstance(v, np.ndarray)}


def imagenet_weights_path(arch: str) -> str:
    """Path of Paddle's ImageNet weights for ``arch``, downloading them into Paddle's cache."""
    from paddle.utils.download import WEIGHTS_HOME, get_weights_path_from_url

    url, md5 = resnet.model_urls[arch]
    try:
        return get_weights_path_from_url(url, md5)
    except Exception as exc:  # any network or checksum failure ends the same way for the user
        target = os.path.join(WEIGHTS_HOME, os.path.basename(url))
        raise ConfigError(
            f"could not download ImageNet weights for {arch} from {url} ({type(exc).__name__}); "
            f"download that file on a connected machine and put it at {target}, "
            "or pass --pretrained PATH.pdparams"
        ) from exc


def build_trunk(arch: str, layers: Sequence[str], pretrained: str, seed: int) -> ResNetTrunk:
    """Trunk with weights from ``pretrained``: "imagenet", "none" or a ``.pdparams`` path.

    With "none" the weights are drawn from ``seed`` and a warning is printed.
    """
    paddle.seed(seed)
    trunk = ResNetTrunk(arch, layers)
    if pretrained == "none":
        print(
            f"warning: --pretrained none: {arch} is randomly initialised (seed {seed}); "
            "use it for tests, not for inspection",
            file=sys.stderr,
        )
        return trunk
    path = imagenet_weights_path(arch) if pretrained == "imagenet" else pretrained
    trunk.load_weight_arrays(read_pdparams(path), source=path)
    return trunk
