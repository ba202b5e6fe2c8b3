"""ResNet feature trunks from ``paddle.vision`` and the loading of their weights.

The trunk keeps only the stem and the layers a method reads, so an exported graph carries no unused
parameters. Weights come from Paddle's own ImageNet download and cache, from a local ``.pdparams``
file (read with a restricted unpickler that only rebuilds numeric numpy arrays), or stay random.
A weights file may name the tensors as ``paddle.vision.models.<arch>()`` does (``conv1``, ``bn1``,
``layer1`` ...; extra keys such as ``fc.*`` are ignored) or as the trunk does (``stem.0``,
``stem.1``, ``stages.0`` ..., the names checkpoints store).
"""

from __future__ import annotations

import collections
import hashlib
import math
import os
import pickle
import sys
from collections.abc import Sequence
from typing import BinaryIO

import numpy as np
import paddle
from paddle import nn
from paddle.vision.models import resnet

from core.errors import CheckpointError, ConfigError

ARCHS = ("resnet18", "resnet50", "wide_resnet50_2")
_LAYER_CHANNELS = {
    "resnet18": {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512},
    "resnet50": {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048},
    "wide_resnet50_2": {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048},
}
_LAYER_STRIDES = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
_NUMPY_CORE = ("numpy.core.multiarray", "numpy._core.multiarray")
_NP_RECONSTRUCT = np.zeros(0).__reduce__()[0]
_NP_SCALAR = np.float32(0).__reduce__()[0]
"""numpy's own rebuild functions (numpy.core or numpy._core, depending on the numpy version)."""
_NUMERIC_KINDS = "biuf"
"""dtype kinds a weights array may have: bool, signed and unsigned integers, floats."""
_ZIP_MAGIC = b"PK\x03\x04"
TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
"""The first value pickled into a PyTorch file of the pre-1.6 (non-zip) format."""
_CONVERT_HINT = "convert it with: python -m models.convert_weights SRC.pth DST.pdparams --arch ARCH"


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

    def load_weight_arrays(self, arrays: dict[str, np.ndarray], source: str,
                           digest: str | None = None) -> None:
        """Set every trunk parameter from ``arrays``; ``source`` names the file in errors.

        ``arrays`` is keyed by trunk names or by ``paddle.vision`` names (see :func:`paddle_name`);
        other keys are ignored. ``digest`` (a checkpoint's ``backbone_sha256``), if given, must be
        the :func:`weights_digest` of the weights found.
        """
        own = self.state_dict()
        keys = {name: name if name in arrays else paddle_name(name) for name in own}  # name in the file
        found = {name: arrays.get(key) for name, key in keys.items()}
        missing = [name for name, value in found.items() if value is None]
        if missing:
            raise CheckpointError(
                f"{source}: has no weights for {len(missing)} {self.arch} trunk tensors "
                f"(first: {paddle_name(missing[0])}, trunk name {missing[0]}); "
                f"is it a {self.arch} file?"
            )
        for name, tensor in own.items():
            value = np.asarray(found[name])
            if tuple(value.shape) != tuple(tensor.shape) or value.dtype.kind != "f":
                raise CheckpointError(
                    f"{source}: {keys[name]} has shape {value.shape} and dtype {value.dtype}, "
                    f"{self.arch} needs {tuple(tensor.shape)} floats; is it a {self.arch} file?"
                )
            if not np.isfinite(value).all():
                raise CheckpointError(
                    f"{source}: {keys[name]} contains NaN or inf; the file is corrupt"
                )
        if digest is not None and weights_digest(found) != digest:
            raise CheckpointError(
                f"{source}: the backbone weights differ from their stored SHA-256 (backbone_sha256); "
                "the file was altered or damaged: train it again"
            )
        for name, tensor in own.items():
            tensor.set_value(np.asarray(found[name], dtype=np.float32))


def paddle_name(trunk_name: str) -> str:
    """The name ``paddle.vision.models.<arch>()`` gives a trunk tensor.

    ``stem.0`` is ``conv1``, ``stem.1`` is ``bn1``, ``stages.i`` is ``layer{i + 1}``; e.g.
    ``stages.1.0.downsample.1._mean`` -> ``layer2.0.downsample.1._mean``.
    """
    head, index, rest = trunk_name.split(".", 2)
    if head == "stem":
        return f"{('conv1', 'bn1')[int(index)]}.{rest}"
    return f"layer{int(index) + 1}.{rest}"


def weights_digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over the names and bytes of the arrays (identifies a trunk's weights)."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(arrays[name], dtype=np.float32).tobytes())
    return digest.hexdigest()


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds dicts of numpy arrays and refuses every other global.

    Arrays are only made through numpy's ``_reconstruct`` (as numpy pickles them), and only as
    large as the file (``limit`` bytes) could fill: a few bytes cannot ask for terabytes.
    """

    def __init__(self, file: BinaryIO, path: str, limit: int) -> None:
        super().__init__(file)
        self.path = path
        self.limit = limit

    def find_class(self, module: str, name: str) -> object:
        if (module, name) == ("numpy", "ndarray"):
            return _ARRAY_TYPE
        if module in _NUMPY_CORE and name == "_reconstruct":
            return self._reconstruct
        if module in _NUMPY_CORE and name == "scalar":
            return _NP_SCALAR
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("_codecs", "encode"):  # protocol 2 writes array bytes as latin-1 text
            return _latin1
        raise pickle.UnpicklingError(f"refers to {module}.{name}")

    def _reconstruct(self, subtype: object, shape: object, dtype: object) -> np.ndarray:
        if subtype is not _ARRAY_TYPE:
            raise pickle.UnpicklingError("rebuilds something other than a numpy array")
        if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise pickle.UnpicklingError(f"asks for an array of shape {shape!r}")
        dtype = np.dtype(dtype)
        check_size(self.path, math.prod(shape) * dtype.itemsize, self.limit)
        return _NP_RECONSTRUCT(np.ndarray, shape, dtype)


class _ArrayType:
    """Stands for ``numpy.ndarray`` in a pickle: accepted as ``_reconstruct``'s subtype, never called."""

    def __call__(self, *args: object) -> None:
        raise pickle.UnpicklingError("calls numpy.ndarray directly")


_ARRAY_TYPE = _ArrayType()


def _latin1(text: str, encoding: str) -> bytes:
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"asks for _codecs.encode with {encoding!r}")
    return text.encode("latin1")


def check_size(path: str, nbytes: int, limit: int) -> None:
    """Raise a CheckpointError if an array of ``nbytes`` cannot come from a file of ``limit`` bytes."""
    if nbytes > limit:
        raise CheckpointError(
            f"{path}: asks for an array of {nbytes} bytes but the file holds only {limit}; "
            "it is damaged or not a weights file"
        )


def check_numeric(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Raise a CheckpointError naming the first array whose values are not numbers."""
    for name, value in arrays.items():
        if value.dtype.kind not in _NUMERIC_KINDS:
            raise CheckpointError(
                f"{path}: {name} holds {value.dtype} values, not numbers; it is not a weights file"
            )


def read_pdparams(path: str) -> dict[str, np.ndarray]:
    """Read a ``.pdparams`` state dict without running code from the file.

    Paddle writes these with pickle; only numeric numpy arrays (and dicts of them) are rebuilt here,
    so a file that asks for anything else is refused instead of executed. Returns the arrays by
    name; other entries (e.g. Paddle's ``StructuredToParameterName@@`` table) are left out.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: weights file not found; check the --pretrained path")
    with open(path, "rb") as f:
        if f.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC:
            raise CheckpointError(f"{path}: is a zip archive (a PyTorch .pth?), not a .pdparams; "
                                  + _CONVERT_HINT)
        f.seek(0)
        try:
            state = _ArrayUnpickler(f, path, os.path.getsize(path)).load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
            raise CheckpointError(
                f"{path}: not a plain Paddle state dict ({exc}); save it with "
                "paddle.save(model.state_dict(), path)"
            ) from exc
    if isinstance(state, int) and state == TORCH_LEGACY_MAGIC:
        raise CheckpointError(f"{path}: is a PyTorch file (pre-1.6 format), not a .pdparams; "
                              + _CONVERT_HINT)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict")
    arrays = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
    check_numeric(path, arrays)
    return arrays


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
