"""The compiled CPU heads (core/csrc: mahalanobis_head.cc and PatchCore's nearest_row.cc,
``export_model.py --head kernel``).

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
from scipy.spatial.distance import cdist
from test_bank_methods import (
    BANK_CASES,
    NearestLayer,
    bank_case,
    float64_nearest,
    graph_nearest,
    low_rank_rows,
    rows_within,
)
from test_deploy import (
    RTOL,
    SIZE,
    K,
    assert_one_line_error,
    assert_rel_close,
    check_export,
    dynamic_references,
    export_with_script,
    fit_checkpoint,
    fit_checkpoints,
    read_results,
    run,
)

from core.errors import ConfigError, InputError
from core.inference import Predictor, PredictorOptions
from core.kernels import MAHALANOBIS_HEAD, NEAREST_ROW, packed_tiles
from core.runtime import Runtime, save_static
from deploy import DeployedModel, export_model, read_manifest
from deploy.manifest import HALF_FORMAT_VERSION
from deploy.runner import load_kernels
from models import load_model, model_config
from models.components.knn import BankSearch, float32_up, principal_axes
from models.components.layers import MahalanobisMap, packed_factor, stored_factor

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


# -- orthoad_nearest_row: PatchCore's nearest-patch search ---------------------------------------
def tied_across_the_seed(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A bank whose row 5 repeats row 130, which the operator's seed pass (pair of tiles 8: rows
    128-143) measures first; queries next to that row must still get row 5, the lowest index."""
    bank = low_rank_rows(rng, 300, dims=24)
    bank[5] = bank[130]
    return bank, (bank[130] + np.float32(0.05) * rng.standard_normal((7, 24))).astype(np.float32)


def float64_bounds(bank: np.ndarray, queries: np.ndarray, head: int) -> np.ndarray:
    """The lower bounds (Q, M) |q_h - b_h|^2 + (|q_t| - |b_t|)^2 in the bank's principal basis, float64."""
    mean = bank.mean(axis=0, dtype=np.float64)
    basis = principal_axes(bank - mean)
    rows, turned = (bank - mean) @ basis, (queries - mean) @ basis
    gap = np.linalg.norm(turned[:, head:], axis=1)[:, None] - np.linalg.norm(rows[:, head:], axis=1)[None]
    return cdist(turned[:, :head], rows[:, :head], "sqeuclidean") + gap**2


@needs_compiler
@pytest.mark.parametrize("case", [*BANK_CASES, "long", "tied across the seed"])
def test_nearest_row_operator_equals_float64_brute_force(case, tmp_path):
    """The compiled search (eager, PIR + oneDNN, PIR without it, legacy IR) returns the float64
    nearest row (lowest index among repeated rows, also when the seed pass meets the later one
    first) and its distance to float32 rounding, whether the bounds prove a few rows or many must
    be measured; on a bank of 113 tiles (56 pairs and a last tile whose pair is a seed pair), of
    one tile, and of 20,000 rows (3 chunks of the seed pass); a NaN query gets NaN and row 0 and
    changes no other query's row."""
    rng = np.random.default_rng(1)
    if case == "long":
        bank, queries = low_rank_rows(rng, 20_000, dims=24), low_rank_rows(rng, 70, dims=24)
    elif case == "tied across the seed":
        bank, queries = tied_across_the_seed(rng)
    else:
        bank, queries = bank_case(case, rng)
    layer = BankSearch(bank, 128, head=3, kernel=True)
    assert layer.tiles.shape == [-(-len(bank) // 8), 5, 8] and not hasattr(layer, "bounds")
    ref_dist, ref_index = float64_nearest(queries, bank)
    if case == "isotropic":  # some queries have dozens of rows that no bound rules out
        assert rows_within(float64_bounds(bank, queries, 3), ref_dist).max() > 50
    with paddle.no_grad():
        eager = [t.numpy() for t in NearestLayer(layer)(paddle.to_tensor(queries))]
    runs = {"eager": eager, "onednn": graph_nearest(layer, queries, tmp_path),
            "plain": graph_nearest(layer, queries, tmp_path, mkldnn=False),
            "legacy": graph_nearest(layer, queries, tmp_path, legacy=True)}
    for name, (dist, index) in runs.items():
        assert index.dtype == np.int64, name
        np.testing.assert_array_equal(index, ref_index, err_msg=name)
        np.testing.assert_allclose(dist, ref_dist, rtol=1e-5, err_msg=name)
    if case == "tied across the seed":
        assert (ref_index == 5).all()
    nan = queries.copy()
    nan[5, 2] = np.nan
    dist, index = graph_nearest(layer, nan, tmp_path)
    assert np.isnan(dist[5]) and index[5] == 0
    np.testing.assert_array_equal(np.delete(index, 5), np.delete(ref_index, 5))
    assert not np.isnan(np.delete(dist, 5)).any()


@needs_compiler
def test_nearest_row_operator_on_any_number_of_queries():
    """0 to 13 queries (register groups of 1 to 6 queries whether eager Paddle gives the operator
    one thread or two), and a query holding an infinity (NaN and row 0, like NaN)."""
    rng = np.random.default_rng(2)
    bank, queries = low_rank_rows(rng, 500, dims=24), low_rank_rows(rng, 13, dims=24)
    layer = BankSearch(bank, 128, head=3, kernel=True)
    ref_dist, ref_index = float64_nearest(queries, bank)
    with paddle.no_grad():
        for count in (0, 1, 2, 3, 5, 7, 11, 13):
            dist, index = (t.numpy() for t in NearestLayer(layer)(paddle.to_tensor(queries[:count])))
            assert dist.shape == index.shape == (count,)
            np.testing.assert_array_equal(index, ref_index[:count])
            np.testing.assert_allclose(dist, ref_dist[:count], rtol=1e-5)
        far = queries.copy()
        far[3, 0] = np.inf
        dist, index = (t.numpy() for t in NearestLayer(layer)(paddle.to_tensor(far)))
    assert np.isnan(dist[3]) and index[3] == 0
    np.testing.assert_array_equal(np.delete(index, 3), np.delete(ref_index, 3))


@needs_compiler
def test_nearest_row_operator_needs_its_rounding_margin():
    """Rows 1,000 from the bank's mean whose distances to a query differ by less than the float32
    rounding of their bounds (the bounds are otherwise exact: the rows lie in the 3 leading
    coordinates). With its margin the operator returns the float64 nearest rows; without it (a
    negative control) the rounding rules out some of them."""
    rng = np.random.default_rng(3)
    centres = np.array([[1000.0, 0, 0, 0], [-1000.0, 0, 0, 0]])
    spread = np.array([1.0, 1.0, 1.0, 0.0])
    bank = (np.repeat(centres, 400, axis=0) + rng.standard_normal((800, 4)) * spread).astype(np.float32)
    queries = (centres[0] + rng.standard_normal((400, 4)) * spread).astype(np.float32)
    exact = cdist(queries.astype(np.float64), bank.astype(np.float64), "sqeuclidean")
    nearest_two = np.sort(exact, axis=1)[:, :2]
    queries = queries[nearest_two[:, 1] - nearest_two[:, 0] > 1e-2]  # no tie within the turn's rounding
    ref_dist, ref_index = float64_nearest(queries, bank)
    layer = BankSearch(bank, 128, head=3, kernel=True)
    with paddle.no_grad():
        turned = layer.center(paddle.to_tensor(queries))
        index = layer.nearest(turned)[1].numpy()
        unsafe = layer.op(turned, layer.tiles, layer.lifted, 0.0, layer.radius)[1].numpy()
    assert len(queries) > 300
    np.testing.assert_array_equal(index, ref_index)
    wrong = np.flatnonzero(unsafe != ref_index)
    assert len(wrong)
    exact = cdist(queries.astype(np.float64), bank.astype(np.float64), "sqeuclidean")
    farther = exact[wrong, unsafe[wrong]] - exact[wrong, ref_index[wrong]]
    assert (farther > 0).all() and (farther < 1.0).all()  # near rows lost to the bounds' rounding


def test_float32_attributes_are_rounded_up():
    """The compiled search's margin and radius go to the operator as float32 at or above the
    float64 values (one float32 step at most), so the margin stays a bound."""
    for value in (1e-6, 3.0000001, 0.1, 1234.5678901, 2.0):
        up = float32_up(value)
        assert up >= value and float(np.float32(up)) == up
        assert float(np.nextafter(np.float32(up), np.float32(0.0))) < value or up == value


def test_compiled_search_needs_bounds():
    with pytest.raises(ValueError, match="0 < head < 6"):
        BankSearch(np.zeros((4, 6), np.float32), 8, head=0, kernel=True)


UNIT_ROUNDING = {"fp16": 2.0**-11, "bf16": 2.0**-8}
"""Largest relative rounding of one value to the 16-bit storages (half a unit in the last place)."""


def assert_rounded_to_nearest(stored: np.ndarray, values: np.ndarray, precision: str) -> None:
    """Each stored value (widened to float32) is a value of the 16-bit format, and no farther from
    the float32 value than half the format's spacing there: the nearest of the format's values."""
    # a value below a power of two that rounded up to it is held to the spacing below that power
    below = np.abs(values) < np.abs(stored)
    if precision == "fp16":
        np.testing.assert_array_equal(stored, stored.astype(np.float16).astype(np.float32))
        magnitude = np.abs(stored).astype(np.float16)
        magnitude = np.where(below, np.nextafter(magnitude, np.float16(0)), magnitude)
        spacing = np.spacing(magnitude).astype(np.float64)
    else:  # bfloat16: the upper 16 bits of a float32, 2^16 of its spacings apart
        np.testing.assert_array_equal(stored.view(np.uint32) & np.uint32(0xFFFF), 0)
        magnitude = np.where(below, np.nextafter(np.abs(stored), np.float32(0)), np.abs(stored))
        spacing = np.spacing(magnitude).astype(np.float64) * 2.0**16
    assert (np.abs(stored.astype(np.float64) - values) <= 0.5 * spacing).all()


def distance_from_tiles(tiles: np.ndarray, mean: np.ndarray, z: np.ndarray) -> np.ndarray:
    """sqrt(||L^T (z - mean)||^2) in float64 from packed factor tiles (T, k(k+1)/2, 8): (N, 1, h, w)."""
    n, k, h, w = z.shape
    packed = tiles.transpose(0, 2, 1).reshape(-1, tiles.shape[1])[:h * w].astype(np.float64)
    rows, cols = np.tril_indices(k)
    order = np.lexsort((rows, cols))
    factor = np.zeros((h * w, k, k))
    factor[:, rows[order], cols[order]] = packed
    d = z.reshape(n, k, h * w).transpose(0, 2, 1).astype(np.float64) - mean  # (N, P, k)
    y = np.einsum("npi,pij->npj", d, factor)
    return np.sqrt((y * y).sum(axis=2)).reshape(n, 1, h, w)


@needs_compiler
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_16_bit_factor_is_the_rounded_factor_read_exactly(precision):
    """--head_precision: the stored factor is the float32 factor rounded to the nearest 16-bit value
    (checked by the format's spacing, not by a rounding routine), the operator's distances equal
    the float64 formula on those rounded values to float32 accumulation (1e-5), and they move from
    the float32 head's by no more than the storage's rounding unit allows (k = 20: batches of 1
    and of 6 images)."""
    k, grid = 20, (5, 3)
    mean, inv_cov, z = gaussian_case(k, grid, 6)
    tiles = packed_tiles(packed_factor(inv_cov))
    stored = stored_factor(tiles, precision)
    assert stored.dtype == (paddle.float16 if precision == "fp16" else paddle.bfloat16)
    widened = stored.astype("float32").numpy()
    assert_rounded_to_nearest(widened, tiles, precision)
    assert np.abs(widened - tiles).max() > 0  # the test data do not fit 16 bits exactly
    exact = distance_from_tiles(widened, mean, z)
    float32 = reference_distance(mean, inv_cov, z)
    layer = MahalanobisMap(mean, inv_cov, grid, kernel=True, precision=precision)
    with paddle.no_grad():
        for batch in (z[:1], z):
            out = layer(paddle.to_tensor(batch)).numpy()
            assert np.abs(out - exact[:len(batch)]).max() <= 1e-5 * exact.max()
    moved = np.abs(out - float32).max() / float32.max()
    assert 0 < moved <= 2 * UNIT_ROUNDING[precision]


@pytest.mark.bad_input
def test_16_bit_factor_out_of_range_is_refused():
    tiles = np.full((1, 3, 8), 7.0e4, dtype=np.float32)  # beyond float16's 65,504
    refused = "--head_precision fp16: the Cholesky factor holds values up to 7e\\+04, beyond float16's 65504"
    with pytest.raises(ConfigError, match=refused + ".*bf16 or fp32"):
        stored_factor(tiles, "fp16")
    assert float(stored_factor(tiles, "bf16").astype("float32").max()) == pytest.approx(7.0e4, rel=2**-8)


@needs_compiler
@pytest.mark.bad_input
def test_16_bit_export_of_a_factor_that_does_not_fit_is_one_line(kernel_exports, tmp_path):
    """export_model.py --head_precision fp16 of checkpoints whose inverse covariances are scaled by
    1e10 (factor values beyond float16's range) and by 1e-16 (values below its smallest normal
    number, 6e-5, which keep few bits): each stops with one line and writes nothing; bf16 (float32's
    range) exports both."""
    source = kernel_exports["ortho"][0].parent / "ortho.npz"
    model = load_model(str(source), runtime=Runtime(engine="dynamic"))
    inv_cov = model.inv_cov
    cases = ((1e10, ["--head_precision fp16: the Cholesky factor holds values up to",
                     "beyond float16's 65504", "export with --head_precision bf16 or fp32"]),
             (1e-16, ["--head_precision fp16: the 16-bit head's outputs differ from the float32 head's by",
                      "export with the other 16-bit precision (fp16 keeps more bits, bf16 a wider range)"]))
    for scale, fragments in cases:
        model.inv_cov = inv_cov * scale
        checkpoint = tmp_path / f"scaled{scale:g}.npz"
        model.save(str(checkpoint))
        proc = run("export_model.py", "--model_path", checkpoint, "--save_dir", tmp_path / "x",
                   "--head", "kernel", "--head_precision", "fp16")
        assert_one_line_error(proc, *fragments)
        assert not (tmp_path / "x").exists()
        export_with_script(checkpoint, tmp_path / f"bf16-{scale:g}", "ortho", "json", "--head", "kernel",
                           "--head_precision", "bf16")


def test_not_positive_definite_is_refused():
    inv_cov = np.array([[[1.0, 2.0], [2.0, 1.0]]])  # eigenvalues 3 and -1
    with pytest.raises(ConfigError, match="no Cholesky factor.*--head matmul"):
        packed_factor(inv_cov)


# -- export_model.py --head kernel, as users run it ----------------------------------------------
@pytest.fixture(scope="module")
def kernel_exports(demo_root, images_dir, tmp_path_factory):
    """method -> (export folder made with --head kernel, dynamic-graph reference)."""
    root = tmp_path_factory.mktemp("kernel")
    checkpoints = fit_checkpoints(("ortho", "padim"), demo_root, root)
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
def test_kernel_export_loads_in_a_fresh_process(kernel_exports, tmp_path):
    """A process that never built the layer (the deploy side only) registers the operator from
    deploy.json before Paddle Inference reads the graph, and gives the dynamic graph's maps."""
    folder, (images, maps, _) = kernel_exports["ortho"]
    np.save(tmp_path / "images.npy", images)
    code = ("import numpy as np; from deploy import DeployedModel; "
            f"m = DeployedModel.load({str(folder)!r}); "
            f"np.save({str(tmp_path / 'maps.npy')!r}, m.score(np.load({str(tmp_path / 'images.npy')!r}))[0])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert_rel_close(np.load(tmp_path / "maps.npy"), maps, "maps of a fresh deploy-side process")


@needs_compiler
@pytest.mark.parametrize(("precision", "fmt"), [("fp16", "json"), ("bf16", "pdmodel")])
def test_16_bit_export_runs_in_infer(precision, fmt, kernel_exports, images_dir, tmp_path):
    """export_model.py --head kernel --head_precision as users type it (PIR and legacy IR): deploy.json
    records the storage and the deviation from the float32 head, the params shrink by half the
    factor's bytes, and infer.py's scores and the deployed maps stay within the storage's rounding
    of the float32 dynamic graph's."""
    folder, (images, maps, scores) = kernel_exports["padim"]
    checkpoint = folder.parent / "padim.npz"
    export = export_with_script(checkpoint, tmp_path / "export", "padim", fmt, "--head", "kernel",
                                "--head_precision", precision)
    manifest = read_manifest(export)
    assert manifest.head_precision == precision and manifest.kernels == [MAHALANOBIS_HEAD]
    assert manifest.format_version == HALF_FORMAT_VERSION  # an earlier toolkit refuses it in one line
    tolerance = 2 * UNIT_ROUNDING[precision]
    assert 0 < manifest.verified["fp32_max_rel_diff"] <= tolerance
    assert manifest.verified["paddle_max_rel_diff"] < 1e-5  # the graph reproduces its own layer
    grid = load_model(str(checkpoint), runtime=Runtime(engine="dynamic")).grid
    factor_values = -(-grid[0] * grid[1] // 8) * 8 * K * (K + 1) // 2
    saved = (folder / "model.pdiparams").stat().st_size - (export / "model.pdiparams").stat().st_size
    assert abs(saved - 2 * factor_values) <= 4096  # 2 of 4 bytes per value, give or take headers
    proc = run("infer.py", "--model_file", export / manifest.model_file, "--params_file",
               export / "model.pdiparams", "--input_file", images_dir, "--save_path", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_allclose([row["score"] for row in read_results(tmp_path / "out")], scores,
                               rtol=tolerance)
    deployed = DeployedModel.load(export)
    worst = np.abs(deployed.score(images)[0] - maps).max() / np.abs(maps).max()
    assert 0 < worst <= tolerance


@pytest.mark.bad_input
def test_kernel_head_with_other_options_is_one_line(demo_root, tmp_path):
    config = model_config("ortho", arch="resnet18", k=K, image_size=SIZE, resize=SIZE, pretrained="none")
    checkpoint = fit_checkpoint(config, demo_root, tmp_path / "ortho.npz")
    for extra, fragment in ((["--no-fuse"], "cannot go with --no-fuse"),
                            (["--onnx"], "cannot go with --onnx"), (["--head", "fused"], "invalid choice")):
        proc = run("export_model.py", "--model_path", checkpoint, "--save_dir", tmp_path / "x",
                   "--head", "kernel", *extra)
        if fragment == "invalid choice":  # argparse's own message, exit 2
            assert proc.returncode == 2 and "--head: invalid choice: 'fused'" in proc.stderr
            continue
        assert_one_line_error(proc, "--head kernel: a compiled CPU operator inside the fused graph", fragment,
                              "drop one of them")
    proc = run("export_model.py", "--model_path", checkpoint, "--save_dir", tmp_path / "x",
               "--head_precision", "bf16")
    assert_one_line_error(proc, "--head_precision bf16: stores the compiled head's statistics in 16 bits",
                          "needs --head kernel")
    model = load_model(str(checkpoint), runtime=Runtime(engine="dynamic"))
    with pytest.raises(ConfigError, match="--head fused: use matmul or kernel"):
        export_model(model, tmp_path / "x", head="fused")
    with pytest.raises(ConfigError, match="--head_precision fp8: use fp32, fp16, bf16"):
        export_model(model, tmp_path / "x", head="kernel", head_precision="fp8")
    assert not (tmp_path / "x").exists()


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
    unknown = "needs the operator 'os_system', which this toolkit does not have"
    for names, message in ((["os_system"], unknown), ("abc", "kernels must be a list of operator names"),
                           ([["x"]], "kernels must be a list of operator names")):
        (copy / "deploy.json").write_text(json.dumps({**record, "kernels": names}))
        with pytest.raises(InputError, match=message):
            DeployedModel.load(copy)
    for update, message in (({"head_precision": "fp8"}, "head_precision 'fp8', not one of fp32, fp16, bf16"),
                            ({"head_precision": "fp16", "kernels": []},
                             "head_precision fp16 without the compiled head"),
                            ({"head_precision": "fp16", "kernels": [NEAREST_ROW]},
                             f"head_precision fp16 without the compiled head \\({MAHALANOBIS_HEAD}\\)"),
                            ({"format_version": 4}, "format_version 4, this version reads 1, 2, 3")):
        (copy / "deploy.json").write_text(json.dumps({**record, **update}))
        with pytest.raises(InputError, match="deploy.json: not a deploy.json of this toolkit \\(" + message):
            DeployedModel.load(copy)


@needs_compiler
def test_a_deploy_json_without_kernels_loads_as_before(kernel_exports, tmp_path):
    """deploy.json of an export made before --head existed has no "kernels" (nor "head_precision"):
    it loads, builds nothing and scores as the dynamic graph."""
    folder, (images, maps, _) = kernel_exports["ortho"]
    old = export_with_script(folder.parent / "ortho.npz", tmp_path / "old", "ortho", "json")
    record = json.loads((old / "deploy.json").read_text())
    del record["kernels"], record["head_precision"]
    (old / "deploy.json").write_text(json.dumps(record))
    assert read_manifest(old).kernels == [] and read_manifest(old).head_precision == "fp32"
    deployed = DeployedModel.load(old)
    assert_rel_close(deployed.score(images)[0], maps, "maps of an export without kernels")


PREVIOUS = "0c08948"
"""The toolkit's last commit before --head_precision: its deploy.json has no head_precision and it
reads format_version 1 only."""


@pytest.fixture(scope="module")
def previous_version(tmp_path_factory):
    """The toolkit as it was at :data:`PREVIOUS`, unpacked with ``git archive`` (the checkout's
    .git is only read)."""
    if shutil.which("git") is None or subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e",
                                                      f"{PREVIOUS}^{{commit}}"]).returncode:
        pytest.skip(f"needs a git checkout holding commit {PREVIOUS}")
    folder = tmp_path_factory.mktemp("previous")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", PREVIOUS], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


def run_previous(folder: Path, script: str, *args: object) -> subprocess.CompletedProcess:
    """``python script args`` of the previous version unpacked in ``folder``."""
    return subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True,
                          cwd=folder, timeout=600)


@needs_compiler
def test_exports_of_the_previous_version_and_to_it(previous_version, kernel_exports, images_dir, tmp_path):
    """The previous version's export_model.py --head kernel (a deploy.json without head_precision,
    its own build of the operator) runs in this infer.py with the dynamic graph's scores; this
    version's fp16 export, given to the previous infer.py, is refused there in one line."""
    folder, (_, _, scores) = kernel_exports["ortho"]
    checkpoint = folder.parent / "ortho.npz"
    old = tmp_path / "old"
    proc = run_previous(previous_version, "export_model.py", "--method", "ortho", "--img_size", SIZE,
                        "--model_path", checkpoint, "--save_dir", old, "--head", "kernel")
    assert proc.returncode == 0, proc.stderr
    record = json.loads((old / "deploy.json").read_text())
    assert "head_precision" not in record and record["format_version"] == 1
    proc = run("infer.py", "--model_file", old / "model.json", "--params_file", old / "model.pdiparams",
               "--input_file", images_dir, "--save_path", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_allclose([row["score"] for row in read_results(tmp_path / "out")], scores, rtol=RTOL)
    new = export_with_script(checkpoint, tmp_path / "new", "ortho", "json", "--head", "kernel",
                             "--head_precision", "fp16")
    proc = run_previous(previous_version, "infer.py", "--model_file", new / "model.json", "--params_file",
                        new / "model.pdiparams", "--input_file", images_dir,
                        "--save_path", tmp_path / "out_previous")
    assert_one_line_error(proc, "deploy.json: not a deploy.json of this toolkit (format_version 2, "
                                "this version reads 1)", "export again with export_model.py")
    assert not (tmp_path / "out_previous").exists()


@needs_compiler
def test_patchcore_kernel_export_across_versions(previous_version, demo_root, images_dir, tmp_path):
    """A PatchCore checkpoint written by the previous version's train.py, run as users type it,
    exports with this export_model.py --head kernel and runs in this infer.py with the dynamic
    graph's maps and scores; that export keeps format_version 1, and the previous infer.py refuses
    it in one line naming the operator it does not have, writing nothing."""
    trained = tmp_path / "trained"
    proc = run_previous(previous_version, "train.py", "--data_path", demo_root, "--category", "tiles",
                        "--method", "patchcore", "--coreset_ratio", "0.5", "--pretrained", "none",
                        "--arch", "resnet18", "--resize", SIZE, "--batch_size", 8, "--cpu_threads", 2,
                        "--save_path", trained)
    assert proc.returncode == 0, proc.stderr
    checkpoint = trained / "patchcore_resnet18" / "tiles.npz"
    reference = dynamic_references({"patchcore": checkpoint}, images_dir)["patchcore"]
    new = export_with_script(checkpoint, tmp_path / "new", "patchcore", "json", "--head", "kernel")
    assert read_manifest(new).kernels == [NEAREST_ROW]
    assert json.loads((new / "deploy.json").read_text())["format_version"] == 1
    check_export(new, images_dir, reference, tmp_path)
    proc = run_previous(previous_version, "infer.py", "--model_file", new / "model.json", "--params_file",
                        new / "model.pdiparams", "--input_file", images_dir, "--save_path", tmp_path / "out")
    assert_one_line_error(proc, "needs the operator 'orthoad_nearest_row', which this toolkit does not have",
                          "export the model again with this version")
    assert not (tmp_path / "out").exists()


@needs_compiler
@pytest.mark.bad_input
def test_kernel_build_failure_is_one_line(kernel_exports, tmp_path):
    """No working C++ compiler (CC/CXX point at false), a kernel folder that is a file's child,
    writable by others, or a path Paddle's shell build line cannot take."""
    checkpoint = kernel_exports["ortho"][0].parent / "ortho.npz"
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    cases = (({"CC": "false", "CXX": "false", "ORTHOAD_KERNEL_DIR": str(tmp_path / "k")},
              ["mahalanobis_head.cc: cannot build the compiled CPU head", "failed with exit code",
               "install a C++ compiler (apt install g++)", "or export with --head matmul"]),
             ({"ORTHOAD_KERNEL_DIR": str(checkpoint / "sub")},
              ["mahalanobis_head.cc: cannot build the compiled CPU head", "Not a directory"]),
             ({"ORTHOAD_KERNEL_DIR": str(shared)},
              ["kernel folder is writable by other users", "set ORTHOAD_KERNEL_DIR to a folder only you"]),
             ({"ORTHOAD_KERNEL_DIR": str(tmp_path / "a b")}, ["the path holds spaces or shell characters"]))
    for env, fragments in cases:
        proc = subprocess.run([sys.executable, str(ROOT / "export_model.py"), "--model_path", checkpoint,
                               "--save_dir", tmp_path / "x", "--head", "kernel"], capture_output=True,
                              text=True, cwd=ROOT, timeout=600, env={**os.environ, **env})
        assert_one_line_error(proc, *fragments)
    assert not (tmp_path / "x").exists()
    assert not (tmp_path / "a b").exists()


@needs_compiler
def test_a_broken_cached_build_is_built_again(tmp_path):
    """A cached library cut short (a build killed while linking) is removed and built again. Each
    step is its own process, as a process registers an operator once."""
    mean, inv_cov, z = gaussian_case(5, (3, 3), 2)
    np.savez(tmp_path / "case.npz", mean=mean, inv_cov=inv_cov, z=z)
    code = ("import numpy as np, paddle; from models.components.layers import MahalanobisMap; "
            f"c = np.load({str(tmp_path / 'case.npz')!r}); "
            "layer = MahalanobisMap(c['mean'], c['inv_cov'], (3, 3), kernel=True); "
            f"np.save({str(tmp_path / 'out.npy')!r}, layer(paddle.to_tensor(c['z'])).numpy())")
    env = {**os.environ, "ORTHOAD_KERNEL_DIR": str(tmp_path / "kernels")}
    for step in ("build", "rebuild"):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                              timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr
        assert_rel_close(np.load(tmp_path / "out.npy"), reference_distance(mean, inv_cov, z), step)
        (library,) = [p for p in (tmp_path / "kernels").rglob(f"{MAHALANOBIS_HEAD}*.so")
                      if "build" not in p.relative_to(tmp_path / "kernels").parts[1:]]
        if step == "build":
            library.write_bytes(library.read_bytes()[:1000])
            (tmp_path / "out.npy").unlink()
    assert library.stat().st_size > 1000
