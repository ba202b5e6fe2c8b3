"""Tests of export_model.py and infer.py on the memory-bank methods (SPADE, PatchCore).

A random-initialised resnet18 (64 px) of each method is fitted on the 8 demo "tiles" images with
the method's default k (PatchCore keeps half the patches) and saved where train.py saves it; it is
exported fused, without --k, in both formats, and infer.py and the Python API (oneDNN on and off)
must reproduce the dynamic graph's maps and scores within 1e-4 relative. Helpers are
tests/test_deploy.py's.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from test_deploy import (
    SIZE,
    assert_one_line_error,
    check_export,
    check_onnx_export,
    dynamic_references,
    export_with_script,
    fit_checkpoint,
    run,
)

from core.kernels import NEAREST_ROW
from deploy import read_manifest
from deploy.manifest import FORMAT_VERSION
from models import model_config

SETTINGS = {"spade": {}, "patchcore": {"coreset_ratio": 0.5}}
FORMATS = ("json", "pdmodel")
CASES = [(method, fmt) for method in SETTINGS for fmt in FORMATS]


@pytest.fixture(scope="module")
def checkpoints(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """method -> output/<method>_resnet18[_k]/tiles.npz, fitted and calibrated with the default k."""
    root = tmp_path_factory.mktemp("bank-checkpoints")
    configs = {method: model_config(method, arch="resnet18", image_size=SIZE, resize=SIZE,
                                    pretrained="none", **settings)
               for method, settings in SETTINGS.items()}
    return {method: fit_checkpoint(config, demo_root, root / config.run_name / "tiles.npz")
            for method, config in configs.items()}


@pytest.fixture(scope="module")
def references(checkpoints: dict[str, Path],
               images_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    return dynamic_references(checkpoints, images_dir)


@pytest.fixture(scope="module")
def exports(checkpoints: dict[str, Path],
            tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Path]:
    """export(method, fmt) -> fused export folder made once by export_model.py (no --k, no --arch;
    json exports also write model.onnx when paddle2onnx and onnxruntime are installed)."""
    root = tmp_path_factory.mktemp("bank-exports")
    made: dict[tuple[str, str], Path] = {}

    def export(method: str, fmt: str) -> Path:
        if (method, fmt) not in made:
            onnx = fmt == "json" and onnx_installed()
            made[method, fmt] = export_with_script(checkpoints[method], root / f"{method}_{fmt}",
                                                   method, fmt, *(["--onnx"] * onnx))
        return made[method, fmt]

    return export


def onnx_installed() -> bool:
    """Whether --onnx can run: paddle2onnx and onnxruntime are installed."""
    return all(importlib.util.find_spec(name) for name in ("paddle2onnx", "onnxruntime"))


@pytest.mark.parametrize(("method", "fmt"), CASES, ids=[f"{m}-{f}" for m, f in CASES])
def test_infer_equals_dynamic_graph(method, fmt, exports, references, images_dir, tmp_path):
    folder = exports(method, fmt)
    manifest = read_manifest(folder)
    assert (manifest.method, manifest.k, manifest.category, manifest.fused, manifest.format) == (
        method, getattr(model_config(method).options, "k", 0), "tiles", True, fmt)
    assert [output["meaning"] for output in manifest.outputs] == ["anomaly_map", "image_score"]
    check_export(folder, images_dir, references[method], tmp_path)


@pytest.mark.parametrize("method", list(SETTINGS))
def test_onnx_export_runs_in_onnxruntime(method, exports, references, images_dir, tmp_path):
    if not onnx_installed():
        pytest.skip("paddle2onnx or onnxruntime not installed")
    check_onnx_export(exports(method, "json"), images_dir, references[method], tmp_path)


@pytest.mark.parametrize("method", list(SETTINGS))
@pytest.mark.bad_input
def test_no_fuse_is_refused(method, checkpoints, tmp_path):
    proc = run("export_model.py", "--method", method, "--img_size", SIZE, "--model_path",
               checkpoints[method], "--save_dir", tmp_path / "export", "--no-fuse")
    assert_one_line_error(proc, f"--no-fuse: --method {method} has no unfused layout (ortho and padim have)")
    assert not (tmp_path / "export").exists()


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler: apt install g++")
@pytest.mark.parametrize("fmt", FORMATS)
def test_patchcore_kernel_export_runs_in_infer(fmt, checkpoints, references, images_dir, tmp_path):
    """export_model.py --head kernel as users type it (PIR and legacy IR): the nearest-patch search
    as the compiled operator, listed in deploy.json (format 1: an earlier toolkit refuses it by its
    unknown operator), and infer.py and the Python API give the dynamic graph's maps and scores."""
    folder = export_with_script(checkpoints["patchcore"], tmp_path / "export", "patchcore", fmt,
                                "--head", "kernel")
    manifest = read_manifest(folder)
    assert manifest.kernels == [NEAREST_ROW] and manifest.format_version == FORMAT_VERSION
    assert manifest.head_precision == "fp32" and manifest.batched
    assert manifest.verified["paddle_max_rel_diff"] < 1e-5
    check_export(folder, images_dir, references["patchcore"], tmp_path)


@pytest.mark.bad_input
def test_kernel_head_of_spade_or_16_bit_patchcore_is_one_line(checkpoints, tmp_path):
    """Refused before anything is touched (not even the save folder's parent is made), SPADE's
    missing head first (with a 16-bit request too)."""
    save_dir = tmp_path / "new" / "x"
    no_head = "--head kernel: --method spade has no compiled scoring head (ortho, padim and patchcore have)"
    for extra in ([], ["--head_precision", "fp16"]):
        proc = run("export_model.py", "--model_path", checkpoints["spade"], "--save_dir", save_dir,
                   "--head", "kernel", *extra)
        assert_one_line_error(proc, no_head, "export it with --head matmul")
    proc = run("export_model.py", "--model_path", checkpoints["patchcore"], "--save_dir", save_dir,
               "--head", "kernel", "--head_precision", "fp16")
    half = "--head_precision fp16: only ortho's and padim's head stores its statistics in 16 bits"
    assert_one_line_error(proc, half, "not --method patchcore's; drop --head_precision")
    assert not (tmp_path / "new").exists()
