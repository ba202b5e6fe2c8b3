"""Backbone weights as the outside world writes them.

Files come from ``paddle.save`` of seeded full ``paddle.vision`` models (what Paddle's ImageNet
download holds), from Paddle's weights cache, and from ``.pth`` archives built here byte for byte
as ``torch.save`` writes them (torch is not installed: the pickle is made by the standard pickler
with stand-in ``torch`` globals, protocol 2, storages as ``archive/data/<key>``). The trunk's
features must equal paddle.vision's own forward; hostile or damaged files are refused.
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import pickle
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import paddle
import pytest
from paddle.utils import download
from paddle.vision.models import resnet

from core.errors import CheckpointError
from models import build_model, load_model, model_config
from models.checkpoint import read_npz, write_npz
from models.components.backbone import ARCHS, build_trunk, read_pdparams, weights_digest
from models.convert_weights import read_pth

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("layer1", "layer2", "layer3")
SIZE = 32
Saved = tuple[paddle.nn.Layer, str]
"""A seeded paddle.vision model and the path of its paddle.save'd state dict."""


def vision_model(arch: str, seed: int) -> paddle.nn.Layer:
    paddle.seed(seed)
    model = getattr(resnet, arch)()
    model.eval()
    return model


def vision_features(model: paddle.nn.Layer, x: np.ndarray) -> list[np.ndarray]:
    """layer1..3 outputs of a full paddle.vision ResNet, through its own modules."""
    with paddle.no_grad():
        h = model.maxpool(model.relu(model.bn1(model.conv1(paddle.to_tensor(x)))))
        out = []
        for layer in (model.layer1, model.layer2, model.layer3):
            h = layer(h)
            out.append(h.numpy())
    return out


def assert_same_features(trunk: paddle.nn.Layer, model: paddle.nn.Layer, seed: int = 0) -> None:
    x = np.random.default_rng(seed).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    with paddle.no_grad():
        got = [f.numpy() for f in trunk(paddle.to_tensor(x))]
    want = vision_features(model, x)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= 1e-6


@pytest.fixture(scope="module")
def r18(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    """(seeded paddle.vision resnet18, its paddle.save'd state dict)."""
    model = vision_model("resnet18", seed=7)
    path = str(tmp_path_factory.mktemp("r18") / "r18.pdparams")
    paddle.save(model.state_dict(), path)
    return model, path


# -- paddle.vision files ------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_paddle_vision_file_loads_with_its_own_names(arch: str, tmp_path: Path) -> None:
    model = vision_model(arch, seed=11)
    path = str(tmp_path / f"{arch}.pdparams")
    paddle.save(model.state_dict(), path)
    arrays = read_pdparams(path)
    assert "fc.weight" in arrays and "conv1.weight" in arrays  # extra keys are there, and ignored
    trunk = build_trunk(arch, LAYERS, path, seed=0)
    assert_same_features(trunk, model)
    random = build_trunk(arch, LAYERS, "none", seed=0)
    x = paddle.ones([1, 3, SIZE, SIZE])
    with paddle.no_grad():
        assert not np.allclose(random(x)[0].numpy(), trunk(x)[0].numpy())


def test_paddle_save_protocol_2_file_loads(r18: Saved, tmp_path: Path) -> None:
    model, _ = r18
    path = str(tmp_path / "r18_p2.pdparams")
    paddle.save(model.state_dict(), path, protocol=2)
    assert_same_features(build_trunk("resnet18", LAYERS, path, seed=0), model)


def test_imagenet_comes_from_paddles_weights_cache(r18: Saved, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # The file sits where Paddle's own download would put it; only the checksum is not known.
    model, path = r18
    url, _ = resnet.model_urls["resnet18"]
    cache = tmp_path / "weights"
    cache.mkdir()
    (cache / os.path.basename(url)).write_bytes(Path(path).read_bytes())
    monkeypatch.setattr(download, "WEIGHTS_HOME", str(cache))
    monkeypatch.setitem(resnet.model_urls, "resnet18", (url, None))
    trunk = build_trunk("resnet18", LAYERS, "imagenet", seed=0)
    assert_same_features(trunk, model)


def test_train_script_with_pdparams_from_paddle_save(r18: Saved, demo_root: Path,
                                                     tmp_path: Path) -> None:
    model, path = r18
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--data_path", str(demo_root), "--category", "tiles",
         "--method", "ortho", "--arch", "resnet18", "--k", "16", "--resize", "64", "--batch_size", "8",
         "--cpu_threads", "2", "--pretrained", path, "--save_path", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "randomly initialised" not in proc.stderr
    checkpoint = str(out / "ortho_resnet18_16" / "tiles.npz")
    meta, arrays = read_npz(checkpoint)
    assert meta["pretrained"] == path
    vision = model.state_dict()
    np.testing.assert_array_equal(arrays["backbone.stem.0.weight"], vision["conv1.weight"].numpy())
    np.testing.assert_array_equal(arrays["backbone.stages.2.1.bn2._variance"],
                                  vision["layer3.1.bn2._variance"].numpy())
    assert meta["backbone_sha256"] == weights_digest(build_trunk("resnet18", LAYERS, path, 0).weight_arrays())
    assert_same_features(load_model(checkpoint).trunk, model)


# -- checkpoints --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(r18: Saved, tmp_path_factory: pytest.TempPathFactory) -> str:
    """An unfitted ortho model with r18's weights, saved (the backbone is stored by trunk names)."""
    _, path = r18
    model = build_model(model_config("ortho", arch="resnet18", k=8, image_size=64, resize=64,
                                     pretrained=path))
    target = str(tmp_path_factory.mktemp("ckpt") / "model.npz")
    model.save(target)
    return target


def test_checkpoint_backbone_reloads_by_trunk_names(r18: Saved, checkpoint: str) -> None:
    model, _ = r18
    _, arrays = read_npz(checkpoint)
    assert "backbone.stem.0.weight" in arrays and "backbone.conv1.weight" not in arrays
    assert_same_features(load_model(checkpoint).trunk, model)


@pytest.mark.parametrize("name", ["backbone.stem.1._mean", "backbone.stages.2.0.conv1.weight"])
@pytest.mark.bad_input
def test_checkpoint_with_altered_backbone_is_refused(checkpoint: str, tmp_path: Path, name: str) -> None:
    meta, arrays = read_npz(checkpoint)
    arrays[name] = arrays[name].copy()
    arrays[name].flat[0] += 1e-3
    meta.pop("format_version")
    altered = str(tmp_path / "altered.npz")
    write_npz(altered, meta, arrays)
    with pytest.raises(CheckpointError, match="backbone_sha256") as info:
        load_model(altered)
    assert altered in str(info.value) and "\n" not in str(info.value)


# -- torchvision .pth archives ------------------------------------------------------------------
class _Storage:
    """Stands for a torch storage while pickling: the persistent id names its archive entry."""

    def __init__(self, key: str, values: np.ndarray, kind: type) -> None:
        self.key, self.values, self.kind = key, values, kind


class _Tensor:
    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple, rebuild: object) -> None:
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())
        self.rebuild = rebuild

    def __reduce__(self) -> tuple:
        return self.rebuild, self.args


@contextlib.contextmanager
def stand_in_torch():
    """Modules ``torch`` and ``torch._utils`` with the globals torch.save pickles, so that the
    standard pickler writes them as torch does (``GLOBAL 'torch._utils _rebuild_tensor_v2'``)."""
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args: object) -> None:
        raise AssertionError("never called while pickling")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    for name in ("FloatStorage", "LongStorage", "UntypedStorage"):
        setattr(torch, name, type(name, (), {"__module__": "torch"}))
    torch._utils = utils
    saved = {name: sys.modules.get(name) for name in ("torch", "torch._utils")}
    sys.modules.update({"torch": torch, "torch._utils": utils})
    try:
        yield torch
    finally:
        for name, module in saved.items():
            if module is None:
                del sys.modules[name]
            else:
                sys.modules[name] = module


class _TorchPickler(pickle.Pickler):
    def persistent_id(self, obj: object) -> tuple | None:
        if isinstance(obj, _Storage):
            size = obj.values.nbytes if obj.kind.__name__ == "UntypedStorage" else obj.values.size
            return ("storage", obj.kind, obj.key, "cpu", size)
        return None


class _LegacyPickler(_TorchPickler):
    """torch < 1.6 added the storage view to the persistent id (None: the whole storage)."""

    def persistent_id(self, obj: object) -> tuple | None:
        pid = super().persistent_id(obj)
        return pid and (*pid, None)


def write_pth(path: Path, state: dict[str, np.ndarray], prefix: str = "archive",
              payload: object = None, legacy: bool = False) -> None:
    """Write ``state`` (torchvision names) as torch.save does: each array its own storage, except
    that bn1's running mean and variance share one storage (as views of one buffer do) and fc.weight
    is a transposed view (stride (1, out)). ``payload`` replaces the pickled object if given.

    ``legacy`` writes torch < 1.6's format instead of the zip archive: one stream of pickles (magic
    number, format version 1001, system info, the object, the storage keys), then each storage as
    its int64 element count and its little-endian elements."""
    with stand_in_torch() as torch:
        rebuild = torch._utils._rebuild_tensor_v2
        storages: list[_Storage] = []

        def storage(values: np.ndarray, kind: type) -> _Storage:
            storages.append(_Storage(str(len(storages)), values, kind))
            return storages[-1]

        pickled = collections.OrderedDict()
        pickled._metadata = collections.OrderedDict([("", {"version": 1})])
        for name, value in state.items():
            if name == "bn1.running_var":
                continue
            if name == "bn1.running_mean":
                both = storage(np.concatenate([value, state["bn1.running_var"]]), torch.FloatStorage)
                pickled[name] = _Tensor(both, 0, value.shape, (1,), rebuild)
                pickled["bn1.running_var"] = _Tensor(both, value.size, value.shape, (1,), rebuild)
            elif name == "fc.weight":
                values = np.ascontiguousarray(value.T).ravel()
                pickled[name] = _Tensor(storage(values, torch.FloatStorage), 0, value.shape,
                                        (1, value.shape[0]), rebuild)
            else:
                kind = torch.LongStorage if value.dtype == np.int64 else torch.FloatStorage
                strides = tuple(s // value.itemsize for s in value.strides)
                pickled[name] = _Tensor(storage(value.ravel(), kind), 0, value.shape, strides, rebuild)
        buffer = io.BytesIO()
        (_LegacyPickler if legacy else _TorchPickler)(buffer, protocol=2).dump(
            pickled if payload is None else payload)
    raw = {item.key: item.values.astype(item.values.dtype.newbyteorder("<")).tobytes() for item in storages}
    if legacy:
        sys_info = {"protocol_version": 1001, "little_endian": True,
                    "type_sizes": {"short": 2, "int": 4, "long": 8}}
        head = b"".join(pickle.dumps(v, protocol=2) for v in (0x1950A86A20F9469CFC6C, 1001, sys_info))
        keys = pickle.dumps([item.key for item in storages], protocol=2)
        body = b"".join(np.int64(item.values.size).astype("<i8").tobytes() + raw[item.key]
                        for item in storages)
        path.write_bytes(head + buffer.getvalue() + keys + body)
        return
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{prefix}/data.pkl", buffer.getvalue())
        archive.writestr(f"{prefix}/byteorder", "little")
        for key, data in raw.items():
            archive.writestr(f"{prefix}/data/{key}", data)
        archive.writestr(f"{prefix}/version", "3\n")
        archive.writestr(f"{prefix}/.data/serialization_id", "1234567890")


def torchvision_state(model: paddle.nn.Layer) -> dict[str, np.ndarray]:
    """A paddle.vision ResNet's weights under torchvision's names and layouts."""
    out = {}
    for name, tensor in model.state_dict().items():
        value = tensor.numpy()
        head, _, leaf = name.rpartition(".")
        if leaf == "_variance":
            out[f"{head}.running_var"] = value
            out[f"{head}.num_batches_tracked"] = np.array(100, dtype=np.int64)
        elif leaf == "_mean":
            out[f"{head}.running_mean"] = value
        else:
            out[name] = value.T if name == "fc.weight" else value
    return out


def convert(src: Path, dst: Path, arch: str = "resnet18") -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "models.convert_weights", str(src), str(dst), "--arch", arch]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.mark.parametrize("prefix", ["archive", "resnet18-f37072fd"])
def test_torchvision_pth_converts_to_the_same_weights(r18: Saved, tmp_path: Path,
                                                      prefix: str) -> None:
    model, _ = r18
    src, dst = tmp_path / "resnet18-f37072fd.pth", tmp_path / "r18.pdparams"
    write_pth(src, torchvision_state(model), prefix=prefix)
    proc = convert(src, dst)
    assert proc.returncode == 0, proc.stderr
    assert not list(tmp_path.glob("*.tmp-*"))
    # Paddle reads it, and a fresh paddle.vision model given it is the seeded one.
    fresh = vision_model("resnet18", seed=99)
    fresh.set_state_dict(paddle.load(str(dst)))
    for name, tensor in model.state_dict().items():
        np.testing.assert_array_equal(fresh.state_dict()[name].numpy(), tensor.numpy(), err_msg=name)
    assert_same_features(build_trunk("resnet18", LAYERS, str(dst), seed=0), model)


def test_read_pth_rebuilds_views_and_drops_nothing(r18: Saved, tmp_path: Path) -> None:
    model, _ = r18
    state = torchvision_state(model)
    src = tmp_path / "r18.pth"
    write_pth(src, state)
    arrays = read_pth(str(src))
    assert set(arrays) == set(state)
    for name, value in state.items():
        assert arrays[name].dtype == value.dtype
        np.testing.assert_array_equal(arrays[name], value, err_msg=name)


def torch_made_state() -> dict[str, np.ndarray]:
    """tests/data/make_torch_files.py's ``state()``, recomputed with numpy."""
    weight = (np.arange(54, dtype=np.float32) / np.float32(7)).reshape(2, 3, 3, 3)
    return {"conv1.weight": weight, "tail": weight.reshape(-1)[40:50],
            "fc.weight": weight.reshape(6, 9).T,
            "half": np.array([-2, -1, 0, 1, 2], dtype=np.float16),
            "double": np.array([[1e-300, 3.5], [-0.25, 1e300]]),
            "index": np.array([3, -1, 2**40]), "bn1.num_batches_tracked": np.array(17)}


@pytest.mark.parametrize("name", ["torch_saved.pth", "torch_saved_legacy.pth"])
def test_files_written_by_torch_save_are_read_exactly(name: str) -> None:
    # Written by torch 2.14's torch.save (zip archive, and the pre-1.6 format), not by this repo.
    arrays = read_pth(str(ROOT / "tests" / "data" / name))
    expected = torch_made_state()
    assert list(arrays) == list(expected)
    for key, value in expected.items():
        assert arrays[key].dtype == value.dtype and arrays[key].shape == value.shape, key
        np.testing.assert_array_equal(arrays[key], value, err_msg=key)


@pytest.mark.bad_input
def test_convert_refuses_another_architecture(r18: Saved, tmp_path: Path) -> None:
    model, _ = r18
    src = tmp_path / "r18.pth"
    write_pth(src, torchvision_state(model))
    proc = convert(src, tmp_path / "out.pdparams", arch="resnet50")
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {src}: has no layer1.0.conv3.weight")
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "out.pdparams").exists()


class _Exploit:
    """Pickles to a call of os.system: no weights file may run it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.bad_input
def test_pth_asking_for_os_system_is_refused_unrun(tmp_path: Path, legacy: bool) -> None:
    marker = tmp_path / "pwned"
    src = tmp_path / "evil.pth"
    write_pth(src, {}, payload=collections.OrderedDict(w=_Exploit(marker)), legacy=legacy)
    proc = convert(src, tmp_path / "out.pdparams")
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {src}: not a plain torch state dict (")
    assert "system" in proc.stderr and proc.stderr.count("\n") == 1
    assert not marker.exists() and not (tmp_path / "out.pdparams").exists()


def single_tensor_pth(path: Path, raw: np.ndarray, kind: str, offset: int, size: tuple,
                      stride: tuple) -> None:
    """A torch.save archive of one tensor ``w``: a (size, stride) view at ``offset`` of a storage of
    type ``torch.<kind>`` holding ``raw``."""
    with stand_in_torch() as torch:
        tensor = _Tensor(_Storage("0", raw, getattr(torch, kind)), offset, size, stride,
                         torch._utils._rebuild_tensor_v2)
        buffer = io.BytesIO()
        _TorchPickler(buffer, protocol=2).dump(collections.OrderedDict(w=tensor))
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/data/0", raw.tobytes())


@pytest.mark.bad_input
def test_pth_tensor_outside_its_storage_is_refused(tmp_path: Path) -> None:
    # stride 1000 over a storage of 4 floats: numpy would read memory outside the file's bytes
    src = tmp_path / "strided.pth"
    single_tensor_pth(src, np.zeros(4, np.float32), "FloatStorage", 0, (3,), (1000,))
    with pytest.raises(CheckpointError, match="reaching element 2000 of a storage of 4"):
        read_pth(str(src))


def test_pth_untyped_storage_is_read_as_bytes(tmp_path: Path) -> None:
    src = tmp_path / "bytes.pth"
    single_tensor_pth(src, np.arange(6, dtype=np.uint8), "UntypedStorage", 1, (2, 2), (2, 1))
    np.testing.assert_array_equal(read_pth(str(src))["w"], [[1, 2], [3, 4]])


class _ClaimingPickler(_TorchPickler):
    def persistent_id(self, obj: object) -> tuple | None:
        pid = super().persistent_id(obj)
        return pid and (*pid[:4], 2 ** 40)


@pytest.mark.bad_input
def test_pth_storage_larger_than_the_file_is_refused(tmp_path: Path) -> None:
    # the persistent id claims 2**40 floats; the archive holds 16 bytes
    src = tmp_path / "claims.pth"
    with stand_in_torch() as torch:
        tensor = _Tensor(_Storage("0", np.zeros(4, np.float32), torch.FloatStorage), 0, (4,), (1,),
                         torch._utils._rebuild_tensor_v2)
        buffer = io.BytesIO()
        _ClaimingPickler(buffer, protocol=2).dump(collections.OrderedDict(w=tensor))
    with zipfile.ZipFile(src, "w") as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/data/0", np.zeros(4, np.float32).tobytes())
    with pytest.raises(CheckpointError, match=f"asks for an array of {2 ** 42} bytes but the file holds"):
        read_pth(str(src))


@pytest.mark.bad_input
def test_pth_given_as_pretrained_says_how_to_convert(r18: Saved, tmp_path: Path) -> None:
    model, _ = r18
    src = tmp_path / "r18.pth"
    write_pth(src, torchvision_state(model))
    with pytest.raises(CheckpointError, match="models.convert_weights"):
        build_trunk("resnet18", LAYERS, str(src), seed=0)


@pytest.mark.bad_input
def test_legacy_torch_file_converts_too(r18: Saved, tmp_path: Path) -> None:
    # e.g. wide_resnet50_2-95faca4d.pth dates from before PyTorch 1.6
    model, _ = r18
    src, dst = tmp_path / "old.pth", tmp_path / "old.pdparams"
    state = torchvision_state(model)
    write_pth(src, state, legacy=True)
    assert not zipfile.is_zipfile(src)
    arrays = read_pth(str(src))
    assert set(arrays) == set(state)
    for name, value in state.items():
        np.testing.assert_array_equal(arrays[name], value, err_msg=name)
    with pytest.raises(CheckpointError, match="pre-1.6 format.*models.convert_weights"):
        read_pdparams(str(src))
    proc = convert(src, dst)
    assert proc.returncode == 0, proc.stderr
    assert_same_features(build_trunk("resnet18", LAYERS, str(dst), seed=0), model)


@pytest.mark.parametrize("content", [None, b"not a torch file at all"], ids=["missing", "garbage"])
@pytest.mark.bad_input
def test_convert_names_a_missing_or_foreign_source(tmp_path: Path, content: bytes | None) -> None:
    src = tmp_path / "r18.pth"
    if content is not None:
        src.write_bytes(content)
    proc = convert(src, tmp_path / "out.pdparams")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    start = "file not found" if content is None else "not a plain torch state dict"
    assert proc.stderr.startswith(f"error: {src}: {start}")


@pytest.mark.bad_input
def test_legacy_torch_file_cut_short_is_refused(r18: Saved, tmp_path: Path) -> None:
    model, _ = r18
    src = tmp_path / "old.pth"
    write_pth(src, torchvision_state(model), legacy=True)
    src.write_bytes(src.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="not a plain torch state dict .*does not hold"):
        read_pth(str(src))


# -- hostile or damaged .pdparams -----------------------------------------------------------------
@pytest.mark.parametrize("values", [np.array([1.0, "x"], dtype=object), np.array(["ab", "cd"])],
                         ids=["object", "str"])
@pytest.mark.bad_input
def test_pdparams_with_non_numeric_array_is_refused(tmp_path: Path, values: np.ndarray) -> None:
    path = str(tmp_path / "strings.pdparams")
    with open(path, "wb") as f:
        pickle.dump({"conv1.weight": values}, f, protocol=2)
    with pytest.raises(CheckpointError, match="conv1.weight holds .* values, not numbers") as info:
        build_trunk("resnet18", LAYERS, path, seed=0)
    assert path in str(info.value)


@pytest.mark.bad_input
def test_pdparams_holding_a_bare_array_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "bare.pdparams")
    with open(path, "wb") as f:
        pickle.dump(np.ones(3, np.float32), f, protocol=4)
    with pytest.raises(CheckpointError, match="holds a ndarray, not a state dict"):
        read_pdparams(path)


# A 16 TiB array asked for by a few bytes: numpy's _reconstruct(ndarray, (2**44,), b'b'),
# and numpy.ndarray((2**44,), dtype('u1')) called directly.
HUGE = {
    "reconstruct": b"\x80\x04cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
                   b"\x8a\x06\x00\x00\x00\x00\x00\x10\x85C\x01b\x87R.",
    "ndarray": b"\x80\x04cnumpy\nndarray\n\x8a\x06\x00\x00\x00\x00\x00\x10\x85"
               b"cnumpy\ndtype\n\x8c\x02u1\x85R\x86R.",
}


@pytest.mark.parametrize("kind", HUGE)
@pytest.mark.bad_input
def test_pdparams_asking_for_a_huge_array_is_refused(tmp_path: Path, kind: str) -> None:
    path = str(tmp_path / "huge.pdparams")
    Path(path).write_bytes(HUGE[kind])
    with pytest.raises(CheckpointError) as info:
        read_pdparams(path)
    message = str(info.value)
    assert message.startswith(path) and "\n" not in message
    if kind == "reconstruct":
        assert f"asks for an array of {2 ** 44} bytes but the file holds only {len(HUGE[kind])}" in message
    else:
        assert "calls numpy.ndarray directly" in message


@pytest.mark.bad_input
def test_pdparams_codecs_other_than_latin1_are_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "codec.pdparams")
    Path(path).write_bytes(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x04\x00\x00\x00zlib\x86R.")
    with pytest.raises(CheckpointError, match="_codecs.encode with 'zlib'"):
        read_pdparams(path)
