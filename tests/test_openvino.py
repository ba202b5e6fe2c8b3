"""Paddle Inference's OpenVINO engine (``infer.py --use_openvino True``) and the split export
(``export_model.py --split``) that lets it run the features of a ``--head kernel`` export.

The engine ships inside the paddlepaddle CPU wheel: these tests run the real engine on exports
made by export_model.py as users type it, and check that it was the engine that ran (its CPU
plugin is loaded into the process only when it builds).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest
from test_deploy import (
    RTOL,
    SIZE,
    K,
    assert_one_line_error,
    assert_rel_close,
    check_infer_outputs,
    dynamic_references,
    export_with_script,
    fit_checkpoint,
    fit_checkpoints,
    read_results,
    run,
)
from test_kernels import needs_compiler, previous_version, run_previous  # noqa: F401 - a fixture

from core.errors import ConfigError, InputError
from core.inference import PredictorOptions, make_config
from core.runtime import Runtime
from datasets import AnomalyDataset, Preprocess, list_samples
from deploy import DeployedModel, export_model, read_manifest
from deploy.manifest import SPLIT_FORMAT_VERSION
from deploy.runner import _paddle_runner, load_kernels
from models import build_model, load_model, model_config
from models.components.gaussian_model import Pipeline

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = "libopenvino_intel_cpu_plugin"
"""OpenVINO's CPU plugin: mapped into a process only once an OpenVINO engine has been built."""


@pytest.fixture(scope="module")
def fitted(demo_root, images_dir, tmp_path_factory):
    """method -> (checkpoint fitted on the demo images, (images, maps, scores) of its dynamic graph)."""
    root = tmp_path_factory.mktemp("openvino")
    checkpoints = fit_checkpoints(("ortho", "padim"), demo_root, root)
    references = dynamic_references(checkpoints, images_dir)
    return {method: (path, references[method]) for method, path in checkpoints.items()}


@pytest.fixture(scope="module")
def padim(fitted):
    return fitted["padim"]


def engine_loaded(folder: Path, images: np.ndarray, openvino: bool, tmp_path: Path) -> bool:
    """Whether a fresh process that loads ``folder`` with ``--use_openvino openvino`` and scores
    ``images`` has OpenVINO's CPU plugin mapped; its maps are saved to ``tmp_path/maps.npy``."""
    np.save(tmp_path / "images.npy", images)
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
            "import numpy as np; from core.inference import PredictorOptions; "
            "from deploy import DeployedModel; "
            f"m = DeployedModel.load({str(folder)!r}, options=PredictorOptions(use_openvino={openvino})); "
            f"x = np.load({str(tmp_path / 'images.npy')!r}); "
            f"np.save({str(tmp_path / 'maps.npy')!r}, m.score(x)[0]); "
            f"print({PLUGIN!r} in open('/proc/self/maps').read())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert not list(cwd.iterdir())  # the engine's compiled-model cache (./__cache__) is not left behind
    return proc.stdout.strip().splitlines()[-1] == "True"


@needs_compiler
@pytest.mark.parametrize(("method", "head", "fmt"),
                         [("ortho", "kernel", "json"), ("padim", "matmul", "pdmodel")])
def test_split_export_runs_in_the_openvino_engine(method, head, fmt, fitted, images_dir, tmp_path):
    """export_model.py --split as users type it: the features graph in the legacy IR, the head in
    --format; infer.py and the Python API give the dynamic graph's maps and scores with the
    OpenVINO engine (oneDNN on and off for the head graph) and without it. A fused export written
    over it afterwards leaves no head files behind."""
    checkpoint, (images, maps, scores) = fitted[method]
    folder = export_with_script(checkpoint, tmp_path / "export", method, fmt, "--head", head, "--split")
    manifest = read_manifest(folder)
    assert manifest.format_version == SPLIT_FORMAT_VERSION and manifest.fused
    assert (manifest.model_file, manifest.head_file) == ("model.pdmodel", f"head.{fmt}")
    assert sorted(manifest.files) == sorted(["model.pdmodel", "model.pdiparams", f"head.{fmt}",
                                             "head.pdiparams"])
    assert sorted(p.name for p in folder.iterdir()) == sorted([*manifest.files, "deploy.json"])
    assert manifest.verified["paddle_max_rel_diff"] < 1e-5
    assert manifest.kernels == (["orthoad_mahalanobis_head"] if head == "kernel" else [])
    for openvino, mkldnn, batch in ((True, True, 2), (True, False, 3), (False, True, 3)):
        save = tmp_path / f"openvino_{openvino}_{mkldnn}"
        proc = run("infer.py", "--model_file", folder, "--input_file", images_dir, "--save_path", save,
                   "--use_openvino", openvino, "--enable_mkldnn", mkldnn, "--batch_size", batch,
                   "--enable_benchmark", True)
        check_infer_outputs(proc, save, images_dir, scores, manifest.threshold)
        assert f"enable_openvino: {openvino}" in proc.stdout
        assert engine_loaded(folder, images, openvino, tmp_path) == openvino
        assert_rel_close(np.load(tmp_path / "maps.npy"), maps, f"maps, OpenVINO engine {openvino}")
    fused = export_with_script(checkpoint, folder, method, fmt)
    assert sorted(p.name for p in fused.iterdir()) == sorted([*read_manifest(fused).files, "deploy.json"])
    assert not list(fused.glob("head.*"))


def test_a_fused_legacy_export_runs_whole_in_the_openvino_engine(padim, images_dir, tmp_path):
    """A fused standard-op export in the legacy IR needs no --split: the whole graph goes to the
    engine, with the dynamic graph's maps."""
    checkpoint, (images, maps, _) = padim
    folder = export_with_script(checkpoint, tmp_path / "export", "padim", "pdmodel")
    assert engine_loaded(folder, images, True, tmp_path)
    assert_rel_close(np.load(tmp_path / "maps.npy"), maps, "maps of the whole graph in OpenVINO")


def test_two_exports_with_one_program_keep_their_own_engines(padim, demo_root, images_dir, tmp_path):
    """Two fused legacy-IR exports whose graph files are byte-identical (same method, backbone,
    k and seed, each written by its own export_model.py process) and whose statistics differ
    (fitted on all of the demo images and on half of them), loaded with the OpenVINO engine into
    one process: each keeps its own parameters (Paddle keys its engines by the graph's variable
    names and node ids)."""
    checkpoint, (images, maps, scores) = padim
    model = load_model(str(checkpoint), runtime=Runtime(engine="dynamic"))
    half = build_model(model.config, Runtime(engine="dynamic"))
    half.category = model.category
    dataset = AnomalyDataset(list_samples(demo_root, "tiles", "train"), Preprocess(SIZE))
    half.fit([np.stack([dataset[i]["image"] for i in range(0, len(dataset), 2)])])
    half.calibrate([np.stack([dataset[i]["image"] for i in range(len(dataset))])])
    half.save(str(tmp_path / "half.npz"))
    half_maps, half_scores = dynamic_references({"padim": tmp_path / "half.npz"}, images_dir)["padim"][1:]
    assert np.abs(half_scores - scores).max() > 1e-3 * np.abs(scores).max()
    first = export_with_script(checkpoint, tmp_path / "first", "padim", "pdmodel")
    second = export_with_script(tmp_path / "half.npz", tmp_path / "second", "padim", "pdmodel")
    assert (first / "model.pdmodel").read_bytes() == (second / "model.pdmodel").read_bytes()
    options = PredictorOptions(use_openvino=True)
    loaded = [DeployedModel.load(first, options=options), DeployedModel.load(second, options=options)]
    for deployed, (want_maps, want_scores) in zip(loaded, ((maps, scores), (half_maps, half_scores)),
                                                  strict=True):
        got_maps, got_scores = deployed.score(images)
        assert_rel_close(got_maps, want_maps, "maps of one of two exports in one process")
        np.testing.assert_allclose(got_scores, want_scores, rtol=RTOL)


def test_split_layer_composes_to_the_fused_layer(padim):
    """The two halves of split_layer, run one after the other, are the fused layer; a layer that
    is not the model's fused layer is refused."""
    checkpoint, (images, maps, scores) = padim
    model = load_model(str(checkpoint), runtime=Runtime(engine="dynamic"))
    features, head = model.split_layer(model.fused_layer())
    assert isinstance(features, Pipeline) and not features.tail
    with paddle.no_grad():
        z = features(paddle.to_tensor(images))
        assert z.shape == [len(images), K, *model.grid]
        amap, score = head(z)
    assert_rel_close(amap.numpy()[:, 0], maps, "maps of the two halves")
    np.testing.assert_allclose(score.numpy(), scores, rtol=RTOL)
    with pytest.raises(TypeError, match="split_layer cuts this model's fused_layer"):
        model.split_layer(features)


@needs_compiler
@pytest.mark.bad_input
def test_openvino_refusals_are_one_line(padim, images_dir, tmp_path):
    checkpoint, _ = padim
    kernel = export_with_script(checkpoint, tmp_path / "kernel", "padim", "json", "--head", "kernel")
    proc = run("infer.py", "--model_file", kernel, "--input_file", images_dir, "--use_openvino", "True",
               "--save_path", tmp_path / "out")
    assert_one_line_error(proc, "holds a compiled operator inside its graph, which OpenVINO cannot run",
                          "export it again with --split (ortho, padim)",
                          "or with --head matmul --format pdmodel")
    plain = export_with_script(checkpoint, tmp_path / "plain", "padim", "json")
    proc = run("infer.py", "--model_file", plain, "--input_file", images_dir, "--use_openvino", "True",
               "--save_path", tmp_path / "out")
    assert_one_line_error(proc, "Paddle Inference's OpenVINO engine reads legacy-IR graphs",
                          "export with --split (ortho, padim) or --format pdmodel")
    for extra, fragment in ((["--no-fuse"], "cannot go with --no-fuse"),
                            (["--onnx"], "cannot go with --onnx")):
        proc = run("export_model.py", "--model_path", checkpoint, "--save_dir", tmp_path / "x", "--split",
                   *extra)
        assert_one_line_error(proc, "--split: cuts the fused graph in two for Paddle Inference", fragment)
    assert not (tmp_path / "x").exists() and not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="--use_openvino runs on the CPU: drop --use_gpu True"):
        make_config(str(kernel / "model.json"), str(kernel / "model.pdiparams"),
                    PredictorOptions(use_gpu=True, use_openvino=True))
    split = export_with_script(checkpoint, tmp_path / "split", "padim", "json", "--split")
    with pytest.raises(ConfigError, match="--use_openvino and --precision fp16 or bf16 apply"):
        DeployedModel.load(split, options=PredictorOptions(use_openvino=True), backend="onnxruntime")
    # past those checks, the engine's own failure (OpenVINO cannot convert our operator) is one line too
    legacy = export_with_script(checkpoint, tmp_path / "legacy", "padim", "pdmodel", "--head", "kernel")
    options = PredictorOptions(use_openvino=True)
    load_kernels(read_manifest(legacy), legacy, options)
    with pytest.raises(ConfigError, match="could not build its OpenVINO engine .*run without --use_openvino"):
        _paddle_runner(legacy / "model.pdmodel", legacy / "model.pdiparams", options)


@pytest.mark.bad_input
def test_split_needs_a_gaussian_head(demo_root, tmp_path):
    config = model_config("spade", arch="resnet18", image_size=SIZE, resize=SIZE, pretrained="none")
    checkpoint = fit_checkpoint(config, demo_root, tmp_path / "spade.npz")
    proc = run("export_model.py", "--model_path", checkpoint, "--save_dir", tmp_path / "x", "--split")
    assert_one_line_error(proc, "--split: --method spade has no split layout (ortho and padim have)",
                          "drop --split")
    assert not (tmp_path / "x").exists()


@needs_compiler
@pytest.mark.bad_input
def test_a_split_export_with_a_foreign_part_is_refused(padim, tmp_path):
    """A head graph or params from another export, the head graph or params given as the first
    graph's, or a deploy.json whose version and head_file disagree or whose head_file is not a
    head graph's name, is one InputError before anything runs."""
    checkpoint, _ = padim
    split = export_with_script(checkpoint, tmp_path / "split", "padim", "json", "--head", "kernel", "--split")
    other = export_with_script(checkpoint, tmp_path / "other", "padim", "json", "--split")
    for name, what in (("head.pdiparams", "head params"), ("head.json", "head model")):
        copy = shutil.copytree(split, tmp_path / f"copy_{what}".replace(" ", "_"))
        shutil.copy(other / name, copy / name)
        with pytest.raises(InputError, match=f"{name}: not the {what} file exported with"):
            DeployedModel.load(copy)
    with pytest.raises(InputError, match="is a split export, whose first graph is model.pdmodel"):
        DeployedModel.load(split / "head.json")
    with pytest.raises(InputError, match="is a split export, whose first graph is model.pdiparams"):
        DeployedModel.load(split, params_file=split / "head.pdiparams")
    copy = shutil.copytree(split, tmp_path / "copy")
    record = json.loads((split / "deploy.json").read_text())
    for update, message in (({"format_version": 1}, "format_version 1 with head_file 'head.json'"),
                            ({"head_file": None}, "format_version 3 with head_file None"),
                            ({"head_file": 5}, "head_file 5, not head.json or head.pdmodel"),
                            ({"format_version": 4}, "format_version 4, this version reads 1, 2, 3")):
        (copy / "deploy.json").write_text(json.dumps({**record, **update}))
        with pytest.raises(InputError, match="deploy.json: not a deploy.json of this toolkit \\(" + message):
            DeployedModel.load(copy)


@needs_compiler
def test_the_previous_infer_refuses_a_split_export(previous_version, padim, images_dir,  # noqa: F811
                                                   tmp_path):
    """The version before --head_precision (test_kernels.PREVIOUS) reads format_version 1 only; a
    version that reads 1 or 2 would have taken the embedding for the anomaly map. It refuses a
    split export in one line instead, writing nothing."""
    checkpoint, _ = padim
    split = export_with_script(checkpoint, tmp_path / "split", "padim", "pdmodel", "--split")
    proc = run_previous(previous_version, "infer.py", "--model_file", split / "model.pdmodel",
                        "--params_file", split / "model.pdiparams", "--input_file", images_dir,
                        "--save_path", tmp_path / "out")
    assert_one_line_error(proc, "deploy.json: not a deploy.json of this toolkit (format_version 3, "
                                "this version reads 1)", "export again with export_model.py")
    assert not (tmp_path / "out").exists()


def test_export_model_api_splits_too(padim, tmp_path):
    """export_model(split=True) from Python writes the same layout as the script."""
    checkpoint, (images, maps, _) = padim
    model = load_model(str(checkpoint), runtime=Runtime(engine="dynamic"))
    manifest = export_model(model, tmp_path / "api", "pdmodel", split=True)
    assert manifest.head_file == "head.pdmodel"
    assert_rel_close(DeployedModel.load(tmp_path / "api").score(images)[0], maps, "maps of the API export")


needs_bf16 = pytest.mark.skipif(not paddle.base.core.supports_bfloat16_fast_performance(),
                                reason="this CPU has no bfloat16 instructions (AVX512-BF16 or AMX)")


def bf16_deviation(maps: np.ndarray, reference: np.ndarray) -> float:
    """The largest deviation of ``maps`` from ``reference`` as a fraction of its largest value."""
    return float(np.abs(maps - reference).max() / np.abs(reference).max())


@needs_compiler
@needs_bf16
def test_bf16_runs_the_features_in_bfloat16_and_the_head_in_float32(padim, images_dir, tmp_path):
    """infer.py --precision bf16 on a split export as users type it, with the OpenVINO engine and
    with oneDNN: the maps move from the same export's float32 run by bfloat16's rounding of the
    features (more than 1e-3 of the largest map value, which float32 and the 16-bit statistics
    stay far below; less than 5e-2), and all of that comes from the features graph: the same maps,
    to float32 rounding, come out of that graph in bfloat16 fed image by image to the head graph
    run at float32."""
    checkpoint, (images, maps, scores) = padim
    folder = export_with_script(checkpoint, tmp_path / "split", "padim", "json", "--head", "kernel",
                                "--head_precision", "fp16", "--split")
    manifest = read_manifest(folder)
    for openvino in (True, False):
        save = tmp_path / f"bf16_{openvino}"
        proc = run("infer.py", "--model_file", folder, "--input_file", images_dir, "--save_path", save,
                   "--use_openvino", openvino, "--precision", "bf16", "--enable_benchmark", True)
        assert proc.returncode == 0, proc.stderr
        assert "precision: bf16" in proc.stdout and f"enable_openvino: {openvino}" in proc.stdout
        fp32 = DeployedModel.load(folder, options=PredictorOptions(use_openvino=openvino))
        fp32_maps, fp32_scores = fp32.score(images)
        assert bf16_deviation(fp32_maps, maps) < 1e-3  # the fp16 statistics alone
        options = PredictorOptions(use_openvino=openvino, precision="bf16")
        deployed = DeployedModel.load(folder, options=options)
        got, got_scores = deployed.score(images)
        assert 1e-3 < bf16_deviation(got, fp32_maps) < 5e-2, bf16_deviation(got, fp32_maps)
        assert 1e-5 < bf16_deviation(got_scores, fp32_scores) < 5e-2
        np.testing.assert_allclose([row["score"] for row in read_results(save)], got_scores, rtol=1e-5)
        load_kernels(manifest, folder, options)
        features = _paddle_runner(folder / "model.pdmodel", folder / "model.pdiparams", options)
        head = _paddle_runner(folder / "head.json", folder / "head.pdiparams", PredictorOptions())
        for image in images:
            by_hand = head.run(features.run(image[None])[0])[0]
            assert bf16_deviation(deployed.forward(image[None])[0], by_hand) < 1e-6


@needs_compiler
@pytest.mark.bad_input
def test_bf16_refusals_are_one_line(padim, images_dir, tmp_path, monkeypatch):
    checkpoint, _ = padim
    fused = export_with_script(checkpoint, tmp_path / "fused", "padim", "pdmodel")
    proc = run("infer.py", "--model_file", fused, "--input_file", images_dir, "--precision", "bf16",
               "--save_path", tmp_path / "out")
    assert_one_line_error(proc, "--precision bf16: runs the features graph of a --split export in",
                          "export it with --split (ortho, padim) or drop --precision bf16")
    assert not (tmp_path / "out").exists()
    split = export_with_script(checkpoint, tmp_path / "split", "padim", "json", "--split")
    proc = run("infer.py", "--model_file", split, "--input_file", images_dir, "--precision", "bf16",
               "--use_gpu", True, "--save_path", tmp_path / "out")
    assert_one_line_error(proc, "--precision bf16 runs on the CPU: use --precision fp16 on a GPU")
    if paddle.base.core.supports_bfloat16_fast_performance():  # else the CPU's own line comes first
        proc = run("infer.py", "--model_file", split, "--input_file", images_dir, "--precision", "bf16",
                   "--enable_mkldnn", False, "--save_path", tmp_path / "out")
        assert_one_line_error(proc, "--precision bf16 runs through oneDNN or the OpenVINO engine")
    assert not (tmp_path / "out").exists()
    model, params = str(split / "model.pdmodel"), str(split / "model.pdiparams")
    monkeypatch.setattr(paddle.base.core, "supports_bfloat16_fast_performance", lambda: True)
    with pytest.raises(ConfigError, match="--precision bf16 runs through oneDNN or the OpenVINO engine"):
        make_config(model, params, PredictorOptions(enable_mkldnn=False, precision="bf16"))
    monkeypatch.setattr(paddle.base.core, "supports_bfloat16_fast_performance", lambda: False)
    with pytest.raises(ConfigError, match="this CPU has no bfloat16 instructions .AVX512-BF16 or AMX.; "
                                          "use --precision fp32"):
        make_config(model, params, PredictorOptions(use_openvino=True, precision="bf16"))


@needs_compiler
def test_a_checkpoint_of_the_previous_version_splits(previous_version, demo_root, images_dir,  # noqa: F811
                                                     tmp_path):
    """A padim checkpoint written by the previous version's train.py, run as users type it, exports
    with this export_model.py --head kernel --head_precision fp16 --split and runs in this infer.py
    in the OpenVINO engine with the dynamic graph's scores (to the fp16 rounding of the
    statistics), and with --precision bf16 (where the CPU has it) within bfloat16's rounding."""
    trained = tmp_path / "trained"
    proc = run_previous(previous_version, "train.py", "--data_path", demo_root, "--category", "tiles",
                        "--method", "padim", "--k", K, "--pretrained", "none", "--arch", "resnet18",
                        "--resize", SIZE, "--batch_size", 8, "--cpu_threads", 2, "--save_path", trained)
    assert proc.returncode == 0, proc.stderr
    checkpoint = trained / f"padim_resnet18_{K}" / "tiles.npz"
    scores = dynamic_references({"padim": checkpoint}, images_dir)["padim"][2]
    folder = export_with_script(checkpoint, tmp_path / "split", "padim", "json", "--head", "kernel",
                                "--head_precision", "fp16", "--split")
    has_bf16 = paddle.base.core.supports_bfloat16_fast_performance()
    bounds = {"fp32": 1e-3, **({"bf16": 5e-2} if has_bf16 else {})}
    for precision, bound in bounds.items():
        save = tmp_path / precision
        proc = run("infer.py", "--model_file", folder, "--input_file", images_dir, "--save_path", save,
                   "--use_openvino", True, "--precision", precision)
        assert proc.returncode == 0, proc.stderr
        assert bf16_deviation(np.array([row["score"] for row in read_results(save)]), scores) < bound
