"""export_model.py and infer.py on CutPaste: one fused graph (network + Gaussian density).

A random-initialised resnet18 (64 px) is trained one step and calibrated on the 8 demo "tiles"
images, as an image-level model (constant map) and as a patch-level model (32 px windows on a
16 px stride, receptive-field map); each is exported fused by export_model.py in both formats
(and to ONNX), and infer.py and the Python API (oneDNN on and off) must reproduce the dynamic
graph's maps and scores within 1e-4 relative. Helpers are tests/test_deploy.py's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from test_deploy import (
    SIZE,
    check_export,
    check_onnx_export,
    dynamic_references,
    export_with_script,
    fit_checkpoint,
)
from test_deploy_bank import onnx_installed

from deploy import read_manifest
from models import model_config

SETTINGS = {"image": {}, "patch": {"patch_size": 32, "patch_stride": 16}}
CASES = [(kind, fmt) for kind in SETTINGS for fmt in ("json", "pdmodel")]


@pytest.fixture(scope="module")
def checkpoints(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cutpaste-checkpoints")
    return {kind: fit_checkpoint(model_config("cutpaste", image_size=SIZE, resize=SIZE, pretrained="none",
                                              epochs=1, **settings), demo_root, root / kind / "tiles.npz")
            for kind, settings in SETTINGS.items()}


@pytest.fixture(scope="module")
def references(checkpoints, images_dir) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    return dynamic_references(checkpoints, images_dir)


@pytest.fixture(scope="module")
def exports(checkpoints, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Path]:
    root = tmp_path_factory.mktemp("cutpaste-exports")
    made: dict[tuple[str, str], Path] = {}

    def export(kind: str, fmt: str) -> Path:
        if (kind, fmt) not in made:
            onnx = fmt == "json" and onnx_installed()
            made[kind, fmt] = export_with_script(checkpoints[kind], root / f"{kind}_{fmt}", "cutpaste", fmt,
                                                 *(["--onnx"] * onnx))
        return made[kind, fmt]

    return export


@pytest.mark.parametrize(("kind", "fmt"), CASES, ids=[f"{k}-{f}" for k, f in CASES])
def test_infer_equals_dynamic_graph(kind, fmt, exports, references, images_dir, tmp_path):
    folder = exports(kind, fmt)
    manifest = read_manifest(folder)
    assert (manifest.method, manifest.category, manifest.fused, manifest.format) == ("cutpaste", "tiles",
                                                                                   True, fmt)
    check_export(folder, images_dir, references[kind], tmp_path)
    _, maps, scores = references[kind]
    spread = maps.reshape(len(maps), -1).std(axis=1)
    if kind == "image":  # the image score at every pixel
        np.testing.assert_allclose(maps.reshape(len(maps), -1).max(axis=1), scores, rtol=1e-6)
        assert spread.max() < 1e-4 * scores.max()
    else:
        assert spread.min() > 0


@pytest.mark.parametrize("kind", list(SETTINGS))
def test_onnx_export_runs_in_onnxruntime(kind, exports, references, images_dir, tmp_path):
    if not onnx_installed():
        pytest.skip("paddle2onnx or onnxruntime not installed")
    check_onnx_export(exports(kind, "json"), images_dir, references[kind], tmp_path)
