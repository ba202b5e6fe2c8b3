"""The compiled CPU head (core/csrc/mahalanobis_head.cc, ``export_model.py --head kernel``).

The operator's distances are checked against sqrt((z - mean)^T inv (z - mean)) computed in float64
by numpy, in eager Paddle and inside Paddle Inference with oneDNN on and off (oneDNN hands ops its
blocked layouts: the first version of the graph fed the operator those and was off by 2x); an
export made by export_model.py as users type it must give infer.py the dynamic graph's scores.
Building the operator takes about 25 s once per machine (cached in ORTHOAD_KERNEL_DIR).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest
from test_deploy import (
    SIZE,
    K,
    assert_one_line_error,
    assert_rel_close,
    check_export,
    dynamic_references,
    export_with_script,
    fit_checkpoint,
    run,
)

from core.errors import ConfigError, InputError
from core.inference import Predictor, PredictorOptions
from core.kernels import MAHALANOBIS_HEAD
from core.runtime import save_static
from deploy import DeployedModel, read_manifest
from deploy.runner import load_kernels
from models import model_config
from models.components.layers import MahalanobisMap, packed_factor, packed_tiles

ROOT = Path(__file__).resolve().parents[1]
needs_compiler = pytest.mark.skipif(shutil.which("g++") is None,
                                    reason="no C++ compiler: apt install g++ (.ci/run does where apt works)")


def gaussian_case(k: int, grid: tuple[int, int], images: int, seed: int = 0):
    """Random positive-definite inverse covariances (P, k, k), means (P, k), features (N, k, h, w)."""
    rng = np.random.default_rng(seed)
    positions = grid[0] * grid[1]
    a = rng.standard_normal((positions, k, k))
    inv_cov = a @ a.transpose(0, 2, 1) / k + 0.5 * np.eye(k)
    mean = rng.standard_normal((positions, k))
    z = rng.standard_normal((images, k, *grid)).astype(np.float32)
    return mean, inv_cov, z


def reference_distance(mean, inv_cov, z) -> np.ndarray:
    """sqrt((z - mean)^T inv (z - mean)) in float64, (N, 1, h, w)."""
    n, k, h, w = z.shape
    d = z.reshape(n, k, h * w).transpose(0, 2, 1).astype(np.float64) - mean  # (N, P, k)
    squared = np.einsum("npi,pij,npj->np", d, inv_cov, d)
    return np.sqrt(squared).reshape(n, 1, h, w)


def test_packed_factor_and_tiles_by_hand():
    """inv = [[4, 2], [2, 5]] = L L^T with L = [[2, 0], [1, 2]]: packed column by column [2, 1, 2];
    9 positions make 2 tiles of 8, the 9th position is lane 0 of tile 1 and the rest is zeros."""
    inv = np.array([[4.0, 2.0], [2.0, 5.0]])
    np.testing.assert_allclose(packed_factor(inv[None]), [[2.0, 1.0, 2.0]], rtol=1e-7)
    values = np.arange(18, dtype=np.float32).reshape(9, 2)
    tiles = packed_tiles(values)
    assert tiles.shape == (2, 2, 8)
    np.testing.assert_array_equal(tiles[0, :, 3], values[3])
    np.testing.assert_array_equal(tiles[1, :, 0], values[8])
    assert not tiles[1, :, 1:].any()


@needs_compiler
@pytest.mark.parametrize(("k", "grid", "images"), [(1, (1, 1), 1), (3, (3, 5), 5), (17, (4, 4), 4),
                                                   (20, (5, 3), 2), (9, (2, 9), 9)])
def test_kernel_equals_the_float64_formula_and_the_matmul_head(k, grid, images):
    """Any k, positions that do not fill the last tile, batches of 1 to 9 (groups of 4 and the rest)."""
    mean, inv_cov, z = gaussian_case(k, grid, images)
    expected = reference_distance(mean, inv_cov, z)
    with paddle.no_grad():
        kernel = MahalanobisMap(mean, inv_cov, grid, kernel=True)(paddle.to_tensor(z)).numpy()
        matmul = MahalanobisMap(mean, inv_cov, grid)(paddle.to_tensor(z)).numpy()
    assert kernel.shape == expected.shape
    assert_rel_close(kernel, expected, "kernel vs float64")
    assert np.abs(kernel - expected).max() <= 1e-5 * expected.max()
    assert np.abs(kernel - matmul).max() <= 1e-5 * expected.max()


@needs_compiler
def test_kernel_at_the_mean_is_zero_and_nan_stays_nan():
    mean, inv_cov, _ = gaussian_case(4, (2, 5), 1)
    z = mean.T.reshape(1, 4, 2, 5).astype(np.float32).copy()
    z[0, 2, 1, 3] = np.nan
    with paddle.no_grad():
        out = MahalanobisMap(mean, inv_cov, (2, 5), kernel=True)(paddle.to_tensor(z)).numpy()[0, 0]
    assert np.isnan(out[1, 3])
    assert np.abs(np.delete(out.ravel(), 8)).max() <= 1e-3  # float32 rounding of z - mean only


@needs_compiler
@pytest.mark.parametrize("onednn", [True, False])
def test_kernel_in_paddle_inference(onednn, tmp_path):
    """The operator inside a saved graph, behind a oneDNN convolution as in the fused export."""
    k, grid = 12, (6, 7)
    mean, inv_cov, _ = gaussian_case(k, grid, 1)
    conv = paddle.nn.Conv2D(3, k, 1)
    head = MahalanobisMap(mean, inv_cov, grid, kernel=True)
    layer = paddle.nn.Sequential(conv, head)
    images = np.random.default_rng(1).standard_normal((3, 3, *grid)).astype(np.float32)
    with paddle.no_grad():
        z = conv(paddle.to_tensor(images)).numpy()
    model_file = save_static(layer, [None, 3, *grid], str(tmp_path / "model"))
    predictor = Predictor(model_file, str(tmp_path / "model.pdiparams"),
                          PredictorOptions(enable_mkldnn=onednn, cpu_threads=2))
    expected = reference_distance(mean, inv_cov, z)
    for batch in (images[:1], images):
        (out,) = predictor.run(batch)
        assert np.abs(out - expected[:len(batch)]).max() <= 1e-5 * expected.max()


def test_not_positive_definite_is_refused():
    inv_cov = np.array([[[1.0, 2.0], [2.0, 1.0]]])  # eigenvalues 3 and -1
    with pytest.raises(ConfigError, match="no Cholesky factor.*--head matmul"):
        packed_factor(inv_cov)


# -- export_model.py --head kernel, as users run it ----------------------------------------------
@pytest.fixture(scope="module")
def kernel_exports(demo_root, images_dir, tmp_path_factory):
    """method -> (export folder made with --head kernel, dynamic-graph reference)."""
    root = tmp_path_factory.mktemp("kernel")
    checkpoints = {method: fit_checkpoint(model_config(method, arch="resnet18", k=K, image_size=SIZE,
                                                       resize=SIZE, pretrained="none"),
                                          demo_root, root / f"{method}.npz")
                   for method in ("ortho", "padim")}
    references = dynamic_references(checkpoints, images_dir)
    return {method: (export_with_script(path, root / f"{method}_export", method, "json", "--head",
                                        "kernel"), references[method])
            for method, path in checkpoints.items()}


@needs_compiler
@pytest.mark.parametrize("method", ["ortho", "padim"])
def test_kernel_export_runs_in_infer(method, kernel_exports, images_dir, tmp_path):
    folder, reference = kernel_exports[method]
    manifest = read_manifest(folder)
    assert manifest.kernels == [MAHALANOBIS_HEAD] and manifest.fused and manifest.batched
    assert manifest.verified["paddle_max_rel_diff"] < 1e-5
    check_export(folder, images_dir, reference, tmp_path)


@needs_compiler
def test_kernel_export_loads_in_a_fresh_process(kernel_exports, images_dir):
    """A process that never built the layer (the deploy side only) registers the operator from
    deploy.json before Paddle Inference reads the graph."""
    folder, (images, maps, _) = kernel_exports["ortho"]
    np.save(folder.parent / "images.npy", images)
    code = ("import sys, numpy as np; from deploy import DeployedModel; "
            f"m = DeployedModel.load({str(folder)!r}); "
            f"print(float(m.score(np.load({str(folder.parent / 'images.npy')!r}))[0].max()))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout.strip().splitlines()[-1]) == pytest.approx(
        float(maps.max()), rel=1e-4)


@needs_compiler
@pytest.mark.bad_input
def test_kernel_head_with_other_options_is_one_line(kernel_exports, demo_root, tmp_path):
    checkpoint = kernel_exports["ortho"][0].parent / "ortho.npz"
    for extra, fragment in ((["--no-fuse"], "cannot go with --no-fuse"),
                            (["--onnx"], "cannot go with --onnx"), (["--head", "fused"], "invalid choice")):
        proc = run("export_model.py", "--model_path", checkpoint, "--save_dir", tmp_path / "x",
                   "--head", "kernel", *extra)
        if fragment == "invalid choice":  # argparse's own message, exit 2
            assert proc.returncode == 2 and "--head: invalid choice: 'fused'" in proc.stderr
            continue
        assert_one_line_error(proc, "--head kernel: a compiled CPU operator inside the fused graph", fragment,
                              "drop one of them")
    assert not (tmp_path / "x").exists()


@pytest.mark.bad_input
def test_kernel_head_of_a_bank_method_is_one_line(demo_root, tmp_path):
    config = model_config("patchcore", arch="resnet18", image_size=SIZE, resize=SIZE, pretrained="none")
    checkpoint = fit_checkpoint(config, demo_root, tmp_path / "patchcore.npz")
    proc = run("export_model.py", "--model_path", checkpoint, "--save_dir", tmp_path / "x",
               "--head", "kernel")
    assert_one_line_error(proc, "--head kernel: --method patchcore has no Mahalanobis head",
                          "export it with --head matmul")


@needs_compiler
@pytest.mark.bad_input
def test_kernel_export_on_a_gpu_or_with_an_unknown_operator(kernel_exports, tmp_path):
    folder, _ = kernel_exports["ortho"]
    manifest = read_manifest(folder)
    on_gpu = "exported with --head kernel, a compiled CPU operator; run it without --use_gpu"
    with pytest.raises(ConfigError, match=on_gpu):
        load_kernels(manifest, folder, PredictorOptions(use_gpu=True))
    copy = shutil.copytree(folder, tmp_path / "export")
    record = json.loads((copy / "deploy.json").read_text())
    record["kernels"] = ["os_system"]
    (copy / "deploy.json").write_text(json.dumps(record))
    with pytest.raises(InputError, match="needs the operator 'os_system', which this toolkit does not have"):
        DeployedModel.load(copy)


@needs_compiler
@pytest.mark.bad_input
def test_kernel_build_failure_is_one_line(kernel_exports, tmp_path):
    """No working C++ compiler (CC/CXX point at false) or an unwritable kernel folder."""
    checkpoint = kernel_exports["ortho"][0].parent / "ortho.npz"
    for env, fragment in (({"CC": "false", "CXX": "false", "ORTHOAD_KERNEL_DIR": str(tmp_path / "k")},
                           "install a C++ compiler (apt install g++)"),
                          ({"ORTHOAD_KERNEL_DIR": str(checkpoint / "sub")}, "Not a directory")):
        proc = subprocess.run([sys.executable, str(ROOT / "export_model.py"), "--model_path", checkpoint,
                               "--save_dir", tmp_path / "x", "--head", "kernel"], capture_output=True,
                              text=True, cwd=ROOT, timeout=600, env={**os.environ, **env})
        assert_one_line_error(proc, "mahalanobis_head.cc: cannot build the compiled CPU head", fragment,
                              "or export with --head matmul")
    assert not (tmp_path / "x").exists()
