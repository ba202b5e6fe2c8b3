"""Tests of export_model.py, infer.py and the deploy package.

A random-initialised resnet18 (k=16, 64 px) of each Gaussian method (ortho, padim) is fitted on
the demo data; every export layout (fused / --no-fuse) and format (json / pdmodel) runs through
infer.py with oneDNN on and off, and its scores and maps must equal the dynamic graph's (what
``predict.py --engine dynamic`` computes) within 1e-4 relative. Scripts run as subprocesses, as
users run them.
The helpers (fitting, exporting, checking an export) serve tests/test_deploy_bank.py too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import paddle
import pytest

from core.inference import PredictorOptions
from core.runtime import Runtime
from datasets import AnomalyDataset, BatchLoader, Preprocess, list_samples, read_image
from deploy import DeployedModel, export_model, read_manifest
from models import ModelConfig, build_model, load_model, model_config

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("ortho", "padim")
SIZE, K = 64, 16
RTOL = 1e-4
CASES = [(method, fuse, fmt) for method in METHODS for fuse in (True, False)
         for fmt in ("json", "pdmodel")]

Exporter = Callable[..., Path]


def run(script: str, *args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit status 2 and exactly one stderr line ``error: ...`` containing ``fragments``."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def assert_rel_close(actual, expected, what):
    """|actual - expected| <= RTOL * max|expected| (the array's scale)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, what
    worst = np.abs(actual - expected).max() / np.abs(expected).max()
    assert worst <= RTOL, f"{what}: relative deviation {worst:.2e}"


def fit_checkpoint(config: ModelConfig, demo_root: Path, path: Path) -> Path:
    """Fit and calibrate ``config`` on the demo category "tiles" and save the checkpoint at ``path``."""
    dataset = AnomalyDataset(list_samples(demo_root, "tiles", "train"), Preprocess(SIZE))
    model = build_model(config, Runtime(engine="dynamic"))
    model.category = "tiles"
    model.fit(BatchLoader(dataset, 8, 0))
    model.calibrate(BatchLoader(dataset, 8, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(str(path))
    return path


def fit_checkpoints(methods: tuple[str, ...], demo_root: Path, folder: Path) -> dict[str, Path]:
    """method -> ``folder/<method>.npz``: resnet18 (random), k=K, SIZE px, by :func:`fit_checkpoint`."""
    return {method: fit_checkpoint(model_config(method, arch="resnet18", k=K, image_size=SIZE,
                                               resize=SIZE, pretrained="none"),
                                   demo_root, folder / f"{method}.npz")
            for method in methods}


@pytest.fixture(scope="module")
def checkpoints(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """method -> checkpoint fitted and calibrated on the demo category "tiles"."""
    return fit_checkpoints(METHODS, demo_root, tmp_path_factory.mktemp("checkpoints"))


def dynamic_references(checkpoints: dict[str, Path],
                       images_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """method -> (images, maps, scores) of the dynamic graph (predict.py --engine dynamic)."""
    paths = sorted(images_dir.iterdir())
    images = np.stack([Preprocess(SIZE)(read_image(p)) for p in paths])
    out = {}
    for method, path in checkpoints.items():
        maps, scores = load_model(str(path), runtime=Runtime(engine="dynamic")).score(images)
        out[method] = (images, maps, scores)
    return out


@pytest.fixture(scope="module")
def references(checkpoints: dict[str, Path],
               images_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    return dynamic_references(checkpoints, images_dir)


def export_with_script(checkpoint: Path, folder: Path, method: str, fmt: str, *extra: object) -> Path:
    """Run export_model.py on a 64 px ``checkpoint`` into ``folder``; the test fails unless it works."""
    proc = run("export_model.py", "--method", method, "--img_size", SIZE, "--model_path", checkpoint,
               "--save_dir", folder, "--format", fmt, *extra)
    assert proc.returncode == 0, proc.stderr
    return folder


@pytest.fixture(scope="module")
def exports(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Exporter:
    """export(method, fuse, fmt, onnx=False) -> export folder, made once by export_model.py."""
    root = tmp_path_factory.mktemp("exports")
    made: dict[tuple, Path] = {}

    def export(method: str, fuse: bool, fmt: str, onnx: bool = False) -> Path:
        key = (method, fuse, fmt, onnx)
        if key not in made:
            folder = root / "_".join([method, "fused" if fuse else "unfused", fmt, *(["onnx"] * onnx)])
            made[key] = export_with_script(checkpoints[method], folder, method, fmt, "--arch", "resnet18",
                                           "--k", K, "--fuse" if fuse else "--no-fuse",
                                           *(["--onnx"] * onnx))
        return made[key]

    return export


def read_results(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


def check_infer_outputs(proc: subprocess.CompletedProcess, out: Path, images_dir: Path,
                        scores: np.ndarray, threshold: float) -> None:
    """infer.py's lines, results.jsonl and PNGs are predict.py's, its scores the reference's."""
    assert proc.returncode == 0, proc.stderr
    rows = read_results(out)
    paths = sorted(images_dir.iterdir())
    assert [row["path"] for row in rows] == [str(p) for p in paths]
    np.testing.assert_allclose([row["score"] for row in rows], scores, rtol=RTOL)
    for row in rows:
        assert row["threshold"] == pytest.approx(threshold)
        assert row["label"] == ("anomalous" if row["score"] > threshold else "normal")
        assert Path(row["image"]).is_file()
    lines = [line for line in proc.stdout.splitlines() if " score=" in line]
    assert [line.split(" score=")[0] for line in lines] == [str(p) for p in paths]
    assert all(line.endswith((" anomalous=yes", " anomalous=no")) for line in lines)


def check_export(folder: Path, images_dir: Path, reference: tuple, out: Path) -> None:
    """infer.py (subprocess) and DeployedModel run the export in ``folder`` with oneDNN on (batch 2)
    and off (batch 3) and reproduce ``reference``: (images, maps, scores) of the dynamic graph."""
    manifest = read_manifest(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*manifest.files, "deploy.json"])
    model_file = folder / manifest.model_file
    images, maps, scores = reference
    for mkldnn, batch in ((True, 2), (False, 3)):
        save = out / f"mkldnn{mkldnn}"
        proc = run("infer.py", "--model_file", model_file,
                   "--params_file", folder / "model.pdiparams", "--input_file", images_dir,
                   "--save_path", save, "--enable_mkldnn", mkldnn, "--batch_size", batch)
        check_infer_outputs(proc, save, images_dir, scores, manifest.threshold)
        deployed = DeployedModel.load(model_file, options=PredictorOptions(enable_mkldnn=mkldnn))
        api_maps, api_scores = deployed.score(images)
        assert_rel_close(api_maps, maps, f"maps, oneDNN {mkldnn}")
        np.testing.assert_allclose(api_scores, scores, rtol=RTOL)


@pytest.mark.parametrize(("method", "fuse", "fmt"), CASES,
                         ids=[f"{m}-{'fused' if f else 'unfused'}-{x}" for m, f, x in CASES])
def test_infer_equals_dynamic_graph(method, fuse, fmt, exports, references, images_dir, tmp_path):
    folder = exports(method, fuse, fmt)
    manifest = read_manifest(folder)
    assert (manifest.method, manifest.k, manifest.category, manifest.fused, manifest.format) == (
        method, K, "tiles", fuse, fmt)
    check_export(folder, images_dir, references[method], tmp_path)


@pytest.mark.parametrize("method", METHODS)
def test_batch_of_eight_equals_one_image_per_call(method, exports, images_dir):
    """The fused export runs 8 images in one oneDNN call (the export checked that it may) and gives
    what it gives one image at a time, to 1e-5 of the maps' scale."""
    folder = exports(method, True, "json")
    assert read_manifest(folder).batched
    five = np.stack([Preprocess(SIZE)(read_image(p)) for p in sorted(images_dir.iterdir())])
    images = np.concatenate([five, five[:3, :, ::-1]])  # 8 images, 3 of them flipped upside down
    deployed = DeployedModel.load(folder, options=PredictorOptions(enable_mkldnn=True))
    assert deployed.chunk == 0
    maps, scores = deployed.score(images)
    singles = [deployed.score(image[None]) for image in images]
    one_maps, one_scores = np.concatenate([m for m, _ in singles]), np.concatenate([s for _, s in singles])
    assert np.abs(maps - one_maps).max() <= 1e-5 * np.abs(one_maps).max()
    np.testing.assert_allclose(scores, one_scores, rtol=1e-5)


def test_export_without_batch_check_runs_one_image_per_call(exports, tmp_path):
    """deploy.json of an export made before the batch check (no "batched"): oneDNN gets one image
    per call, as then."""
    folder = shutil.copytree(exports("ortho", True, "json"), tmp_path / "old")
    record = json.loads((folder / "deploy.json").read_text())
    del record["batched"]
    (folder / "deploy.json").write_text(json.dumps(record))
    assert DeployedModel.load(folder, options=PredictorOptions(enable_mkldnn=True)).chunk == 1
    assert DeployedModel.load(folder, options=PredictorOptions(enable_mkldnn=False)).chunk == 0


def test_unfused_stats_file_is_plain_arrays(exports):
    folder = exports("padim", False, "json")
    with np.load(folder / "stats.npz", allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        assert data["channels"].shape == (K,) and data["mean"].shape == (256, K)
        assert data["inv_cov"].shape == (256, K, K)
    assert (meta["method"], meta["grid"], meta["features"]) == ("padim", [16, 16], 448)


def test_benchmark_report_has_auto_log_fields(exports, images_dir, tmp_path):
    folder = exports("ortho", True, "json")
    proc = run("infer.py", "--model_file", folder / "model.json", "--input_file", images_dir,
               "--save_path", tmp_path, "--enable_benchmark", "True")
    assert proc.returncode == 0, proc.stderr
    for field in ("preprocess_time(ms)", "inference_time(ms)", "postprocess_time(ms)",
                  "cpu_rss(MB)", "enable_mkldnn: True", "cpu_math_library_num_threads: 2",
                  "data_num: 5"):
        assert field in proc.stdout


FAKE_AUTO_LOG = """
import sys


class Times:
    def start(self):
        pass

    def stamp(self):
        pass

    def end(self, stamp=False):
        pass


class AutoLogger:
    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.times = Times()

    def report(self):
        print("fake auto_log report", sorted(self.kwargs["inference_config"]))
        sys.exit(0)
"""


def test_benchmark_uses_auto_log_when_installed(exports, images_dir, tmp_path):
    (tmp_path / "lib" / "auto_log").mkdir(parents=True)
    (tmp_path / "lib" / "auto_log" / "__init__.py").write_text(FAKE_AUTO_LOG)
    folder = exports("ortho", True, "json")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "infer.py"), "--model_file", str(folder / "model.json"),
         "--input_file", str(images_dir), "--save_path", str(tmp_path / "out"),
         "--enable_benchmark", "True"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
        env={**os.environ, "PYTHONPATH": str(tmp_path / "lib")})
    assert proc.returncode == 0, proc.stderr
    assert "fake auto_log report" in proc.stdout and "'enable_mkldnn'" in proc.stdout
    assert len(read_results(tmp_path / "out")) == 5


def check_onnx_export(folder: Path, images_dir: Path, reference: tuple, out: Path) -> None:
    """infer.py --backend onnxruntime reproduces the scores of ``reference`` (images, maps, scores),
    and DeployedModel's ONNX maps and scores equal Paddle Inference's on the same export."""
    images, _, scores = reference
    proc = run("infer.py", "--model_file", folder / "model.onnx", "--backend", "onnxruntime",
               "--input_file", images_dir, "--save_path", out)
    check_infer_outputs(proc, out, images_dir, scores, read_manifest(folder).threshold)
    onnx_maps, onnx_scores = DeployedModel.load(folder, backend="onnxruntime").score(images)
    paddle_maps, paddle_scores = DeployedModel.load(folder).score(images)
    assert_rel_close(onnx_maps, paddle_maps, "ONNX maps")
    np.testing.assert_allclose(onnx_scores, paddle_scores, rtol=RTOL)


def test_onnx_export_runs_in_onnxruntime(exports, references, images_dir, tmp_path):
    pytest.importorskip("paddle2onnx")
    pytest.importorskip("onnxruntime")
    for fuse, fmt in ((True, "json"), (False, "pdmodel")):
        check_onnx_export(exports("ortho", fuse, fmt, onnx=True), images_dir, references["ortho"],
                          tmp_path / fmt)


def test_export_replaces_a_previous_layout(checkpoints, tmp_path):
    model = load_model(str(checkpoints["ortho"]), runtime=Runtime(engine="dynamic"))
    export_model(model, tmp_path, "json", fuse=False)
    assert (tmp_path / "stats.npz").is_file()
    manifest = export_model(model, tmp_path, "pdmodel", fuse=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "deploy.json", "model.pdiparams", "model.pdmodel"]
    assert manifest.verified["paddle_max_rel_diff"] < 1e-3
    assert not list(tmp_path.parent.glob(f".{tmp_path.name}.export-*"))


# -- bad input: one line, exit status 2 ----------------------------------------------------------
@pytest.mark.skipif(paddle.is_compiled_with_cuda(), reason="needs a CPU-only Paddle build")
@pytest.mark.bad_input
def test_gpu_on_cpu_build(exports, images_dir, tmp_path):
    folder = exports("ortho", True, "json")
    proc = run("infer.py", "--model_file", folder / "model.json", "--input_file", images_dir,
               "--use_gpu", "True", "--save_path", tmp_path)
    assert_one_line_error(proc, "CPU-only")


@pytest.mark.bad_input
def test_stats_of_another_model(exports, images_dir, tmp_path):
    folder = exports("ortho", False, "json")
    other = exports("padim", False, "json") / "stats.npz"
    proc = run("infer.py", "--model_file", folder / "model.json", "--stats", other,
               "--input_file", images_dir, "--save_path", tmp_path)
    assert_one_line_error(proc, str(other), "method=padim")


@pytest.mark.bad_input
def test_params_of_another_model(exports, images_dir, tmp_path):
    folder = exports("ortho", True, "json")
    other = exports("padim", True, "json") / "model.pdiparams"
    proc = run("infer.py", "--model_file", folder / "model.json", "--params_file", other,
               "--input_file", images_dir, "--save_path", tmp_path)
    assert_one_line_error(proc, f"{other}: not the params file exported with", "(its SHA-256 differs")


@pytest.mark.bad_input
def test_missing_params_file(exports, images_dir, tmp_path):
    copy = tmp_path / "export"
    shutil.copytree(exports("ortho", True, "json"), copy)
    (copy / "model.pdiparams").unlink()
    proc = run("infer.py", "--model_file", copy / "model.json", "--input_file", images_dir,
               "--save_path", tmp_path / "out")
    assert_one_line_error(proc, f"{copy / 'model.pdiparams'}: params file not found")


@pytest.mark.bad_input
def test_missing_deploy_json(exports, images_dir, tmp_path):
    copy = tmp_path / "export"
    shutil.copytree(exports("ortho", True, "json"), copy)
    (copy / "deploy.json").unlink()
    proc = run("infer.py", "--model_file", copy / "model.json", "--input_file", images_dir,
               "--save_path", tmp_path / "out")
    assert_one_line_error(proc, f"{copy / 'deploy.json'}: not found; infer.py needs the deploy.json that "
                          "export_model.py writes")


@pytest.mark.bad_input
def test_corrupt_image(exports, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    proc = run("infer.py", "--model_file", exports("ortho", True, "json") / "model.json",
               "--input_file", tmp_path / "broken.png", "--save_path", tmp_path / "out")
    assert_one_line_error(proc, "broken.png", "cannot read image")


@pytest.mark.parametrize(("flag", "value", "asked"), [("--k", 32, "k=32"),
                                                      ("--img_size", 256, "image_size=256"),
                                                      ("--method", "padim", "method=padim")])
@pytest.mark.bad_input
def test_export_of_a_mismatched_checkpoint(checkpoints, tmp_path, flag, value, asked):
    args = {"--method": "ortho", "--k": K, "--img_size": SIZE, flag: value}
    proc = run("export_model.py", *[x for item in args.items() for x in item],
               "--model_path", checkpoints["ortho"], "--save_dir", tmp_path / "export")
    assert_one_line_error(proc, f"{checkpoints['ortho']}: checkpoint has ", asked, "was asked for")
    assert not (tmp_path / "export").exists()
