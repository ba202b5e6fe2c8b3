"""Convert torchvision ResNet weights (``.pth``) to a Paddle ``.pdparams`` file, without torch.

    python -m models.convert_weights resnet18-f37072fd.pth resnet18.pdparams --arch resnet18

The ``.pth`` is read as the zip archive ``torch.save`` writes (PyTorch >= 1.6): ``<name>/data.pkl``
pickles the state dict; each tensor is a call ``torch._utils._rebuild_tensor_v2(storage, offset,
size, stride, requires_grad, hooks)`` whose storage is the persistent id ``('storage', storage
type, key, location, numel)`` of the raw little-endian bytes in ``<name>/data/<key>``. Files of the
older format (one stream: pickles of a magic number, version and sizes, the state dict, the storage
keys, then the storages) are read too. A restricted unpickler emulates only those calls, the storage
types and ``collections.OrderedDict``; a file that asks for anything else is refused, never run.
Names become paddle.vision's (BatchNorm ``running_mean``/``running_var`` -> ``_mean``/``_variance``,
``num_batches_tracked`` dropped, Linear weights transposed from (out, in) to (in, out)), are checked
against ``paddle.vision.models.<arch>()``, and the result is written to a temporary name, then renamed.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import pickle
import zipfile
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from paddle import nn
from paddle.vision.models import resnet

from core.errors import CheckpointError
from models.components.backbone import ARCHS, TORCH_LEGACY_MAGIC, check_numeric, check_size

_STORAGE_DTYPES = {
    "FloatStorage": "f4", "DoubleStorage": "f8", "HalfStorage": "f2", "LongStorage": "i8",
    "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1", "ByteStorage": "u1",
    "BoolStorage": "?", "UntypedStorage": "u1",
}
"""numpy dtype of the elements of each torch storage type (an UntypedStorage holds bytes)."""
_BN_LEAVES = {"running_mean": "_mean", "running_var": "_variance"}


@dataclass(frozen=True)
class _StorageType:
    """A ``torch.<X>Storage`` global of the pickle: the element type of a storage."""

    name: str
    dtype: np.dtype


@dataclass
class _Storage:
    """A storage named by a persistent id; its elements (numel,) are read after the pickle."""

    kind: _StorageType
    numel: int
    values: np.ndarray | None = None


@dataclass(frozen=True)
class _TensorRef:
    """A tensor as ``_rebuild_tensor_v2`` describes it: a strided view of a storage."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage: object, offset: object, size: object, stride: object,
                    requires_grad: object = False, hooks: object = None,
                    metadata: object = None) -> _TensorRef:
    """``torch._utils._rebuild_tensor_v2``: only records the view, read once the storages are."""
    if not (isinstance(storage, _Storage) and _int_tuple(size) and _int_tuple(stride)
            and len(size) == len(stride) and isinstance(offset, int) and offset >= 0):
        raise pickle.UnpicklingError(f"has a tensor of size {size!r}, stride {stride!r}, offset {offset!r}")
    return _TensorRef(storage, offset, size, stride)


def _rebuild_parameter(data: object, requires_grad: object = False, hooks: object = None) -> _TensorRef:
    """``torch._utils._rebuild_parameter``: a Parameter is its tensor here."""
    if not isinstance(data, _TensorRef):
        raise pickle.UnpicklingError("rebuilds a parameter from something other than a tensor")
    return data


def _int_tuple(values: object) -> bool:
    return isinstance(values, tuple) and all(isinstance(n, int) and n >= 0 for n in values)


def _tensor(ref: _TensorRef) -> np.ndarray:
    """The elements of ``ref`` (size) copied out of its storage, after checking they lie inside it."""
    values = ref.storage.values
    dtype = values.dtype.newbyteorder("=")
    if math.prod(ref.size) == 0:
        return np.zeros(ref.size, dtype)
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True))
    if last >= values.size:
        raise pickle.UnpicklingError(f"has a tensor reaching element {last} of a storage of {values.size}")
    strides = tuple(s * values.dtype.itemsize for s in ref.stride)
    view = np.lib.stride_tricks.as_strided(values[ref.offset:], shape=ref.size, strides=strides,
                                           writeable=False)
    return view.astype(dtype)


class _TorchUnpickler(pickle.Unpickler):
    """Unpickler of torch's pickles that only records tensors and the storages they view."""

    def __init__(self, file: BinaryIO, path: str) -> None:
        super().__init__(file)
        self.path = path
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> object:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name, np.dtype(_STORAGE_DTYPES[name]))
        raise pickle.UnpicklingError(f"refers to {module}.{name}")

    def persistent_load(self, pid: object) -> _Storage:
        """('storage', type, key, location, numel), with a sixth item None in the pre-1.6 format."""
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
                and isinstance(pid[4], int) and pid[4] >= 0):
            raise pickle.UnpicklingError(f"has an unknown persistent id {pid!r}")
        if len(pid) == 6 and pid[5] is not None:
            raise pickle.UnpicklingError("views a storage (a torch < 0.4 file)")
        _, kind, key, _, numel = pid[:5]
        check_size(self.path, numel * kind.dtype.itemsize, os.path.getsize(self.path))
        return self.storages.setdefault(key, _Storage(kind, numel))


def _read_zip(path: str) -> tuple[object, dict[str, _Storage]]:
    """(unpickled object, storages filled) of a torch.save zip archive."""
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointError(f"{path}: has no <name>/data.pkl; it was not written by torch.save")
        prefix = pickles[0].split("/")[0]
        check_size(path, archive.getinfo(pickles[0]).file_size, os.path.getsize(path))
        with archive.open(pickles[0]) as f:
            unpickler = _TorchUnpickler(f, path)
            state = unpickler.load()
        order = "<"
        if f"{prefix}/byteorder" in archive.namelist():
            order = ">" if archive.read(f"{prefix}/byteorder").strip() == b"big" else "<"
        for key, storage in unpickler.storages.items():
            entry = f"{prefix}/data/{key}"
            nbytes = storage.numel * storage.kind.dtype.itemsize
            if archive.getinfo(entry).file_size != nbytes:
                raise pickle.UnpicklingError(f"{entry} does not hold {storage.numel} {storage.kind.name} "
                                             "items")
            storage.values = np.frombuffer(archive.read(entry), storage.kind.dtype.newbyteorder(order))
    return state, unpickler.storages


def _read_legacy(path: str) -> tuple[object, dict[str, _Storage]]:
    """(unpickled object, storages filled) of the pre-1.6 format: pickles of the magic number,
    the format version and the system's sizes, the object, the list of storage keys, then each
    storage as an int64 element count followed by its elements."""
    with open(path, "rb") as f:
        header = [_TorchUnpickler(f, path).load() for _ in range(3)]
        if header[:2] != [TORCH_LEGACY_MAGIC, 1001] or not isinstance(header[2], dict):
            raise CheckpointError(f"{path}: neither a torch.save zip archive nor a torch file of the "
                                  "pre-1.6 format; give the .pth file torchvision downloaded")
        order = "<" if header[2].get("little_endian", True) else ">"
        unpickler = _TorchUnpickler(f, path)
        state = unpickler.load()
        keys = _TorchUnpickler(f, path).load()
        if not isinstance(keys, list) or set(keys) != set(unpickler.storages):
            raise pickle.UnpicklingError("lists other storages than its tensors use")
        for key in keys:
            storage = unpickler.storages[key]
            count = np.frombuffer(f.read(8), order + "i8")
            nbytes = storage.numel * storage.kind.dtype.itemsize
            raw = f.read(nbytes)
            if count.tolist() != [storage.numel] or len(raw) != nbytes:
                raise pickle.UnpicklingError(f"storage {key} does not hold {storage.numel} items")
            storage.values = np.frombuffer(raw, storage.kind.dtype.newbyteorder(order))
    return state, unpickler.storages


def read_pth(path: str) -> dict[str, np.ndarray]:
    """The tensors of a ``.pth`` state dict by name, as numpy arrays; no code from it is run.

    Reads the zip archive of ``torch.save`` (PyTorch >= 1.6) and the format before it.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found; give the .pth file torchvision downloaded")
    try:
        state, _ = _read_zip(path) if zipfile.is_zipfile(path) else _read_legacy(path)
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict")
        arrays = {name: _tensor(ref) for name, ref in state.items() if isinstance(ref, _TensorRef)}
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, TypeError,
            AttributeError, KeyError) as exc:
        raise CheckpointError(f"{path}: not a plain torch state dict ({exc}); give the .pth file "
                              "torchvision downloaded") from exc
    check_numeric(path, arrays)
    return arrays


def to_paddle(arrays: dict[str, np.ndarray], arch: str, source: str) -> dict[str, np.ndarray]:
    """torchvision ResNet tensors renamed and laid out as ``paddle.vision.models.<arch>()`` wants.

    Every tensor the Paddle model has must be there with its shape; others are refused, so a file
    of another architecture fails here rather than when it is loaded.
    """
    model = getattr(resnet, arch)(pretrained=False)
    linear = {f"{name}.weight" for name, layer in model.named_sublayers() if isinstance(layer, nn.Linear)}
    renamed = {}
    for name, value in arrays.items():
        head, _, leaf = name.rpartition(".")
        if leaf == "num_batches_tracked":
            continue
        key = f"{head}.{_BN_LEAVES.get(leaf, leaf)}"
        renamed[key] = (value.T if key in linear else value).astype(np.float32)
    expected = model.state_dict()
    missing = [name for name in expected if name not in renamed]
    extra = [name for name in renamed if name not in expected]
    if missing or extra:
        first = f"no {missing[0]}" if missing else f"an unknown tensor {extra[0]}"
        raise CheckpointError(
            f"{source}: has {first} ({len(missing)} missing, {len(extra)} unknown); "
            f"is it a torchvision {arch} file?"
        )
    for name, tensor in expected.items():
        if renamed[name].shape != tuple(tensor.shape):
            raise CheckpointError(f"{source}: {name} has shape {renamed[name].shape}, {arch} needs "
                                  f"{tuple(tensor.shape)}; is it a torchvision {arch} file?")
    return {name: np.ascontiguousarray(renamed[name]) for name in expected}


def write_pdparams(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Write a state dict of numpy arrays as Paddle does (a pickled dict), atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            pickle.dump(dict(arrays), f, protocol=4)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="torchvision weights, e.g. resnet18-f37072fd.pth")
    parser.add_argument("dst", help="the .pdparams to write (for --pretrained DST)")
    parser.add_argument("--arch", required=True, choices=ARCHS, help="architecture of SRC")
    args = parser.parse_args(argv)
    arrays = to_paddle(read_pth(args.src), args.arch, args.src)
    write_pdparams(args.dst, arrays)
    print(f"wrote {args.dst}: {len(arrays)} {args.arch} tensors from {args.src}")
    return 0


if __name__ == "__main__":
    from core.script import run_main

    run_main(main)
