"""Tests of the memory-bank methods (SPADE, PatchCore) and of their kNN and coreset code.

Models are resnet18 with random weights on 64 px inputs; references are slow numpy versions of the
published definitions (scipy cdist, zoom, uniform and Gaussian filters).
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import paddle
import pytest
from helpers import assert_served_matches_dynamic, rel_close
from scipy import ndimage
from scipy.spatial.distance import cdist

import train
from core.distributed import World
from core.errors import CheckpointError, ConfigError, InputError
from core.inference import Predictor, PredictorOptions
from core.runtime import compile_layer, save_static
from datasets import AnomalyDataset, BatchLoader, Preprocess, list_samples, read_image
from datasets.synthetic import generate
from engine.cli import config_from
from engine.evaluate import metrics, score_batches
from engine.workflow import DataPlan, FitPlan, fit_category
from models import METHODS, Runtime, build_model, load_model, model_config
from models.components.knn import BankSearch, PreparedBank
from models.components.layers import SmoothUpsample
from models.components.sampling import kcenter_greedy, project, take_rows

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
SETTINGS = {"spade": {"k": 3}, "patchcore": {"coreset_ratio": 0.25, "num_neighbors": 4}}


def dynamic():
    return Runtime(engine="dynamic")


def new_model(method, runtime=None, **overrides):
    fields = {"method": method, "arch": "resnet18", "image_size": SIZE, "resize": SIZE,
              "pretrained": "none", "seed": 0, **SETTINGS[method], **overrides}
    return build_model(model_config(**fields), runtime or dynamic())


def images(count, seed):
    """Smooth random images (count, 3, 64, 64) float32."""
    rng = np.random.default_rng(seed)
    coarse = ndimage.zoom(rng.standard_normal((count, 3, 8, 8)), (1, 1, 8, 8), order=1)
    return (coarse + 0.3 * rng.standard_normal((count, 3, SIZE, SIZE))).astype(np.float32)


def batches(x, names):
    """Loader-style batches of 4 with paths."""
    return [{"images": x[i : i + 4], "paths": names[i : i + 4]} for i in range(0, len(x), 4)]


@pytest.fixture(scope="module")
def train_images():
    return images(12, seed=1)


@pytest.fixture(scope="module")
def train_names():
    return [f"train/good/{i:03d}.png" for i in range(12)]


@pytest.fixture(scope="module")
def test_images():
    x = images(4, seed=2)
    x[1] *= 3.0
    x[3, :, 20:36, 8:24] += 4.0
    return x


@pytest.fixture(scope="module", params=list(SETTINGS))
def fitted(request, train_images, train_names):
    """A model of each method fitted with paths (do not mutate)."""
    return new_model(request.param).fit(batches(train_images, train_names))


# -- kNN ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 4, 53])
@pytest.mark.parametrize("block", [64, 1 << 22])
def test_knn_equals_cdist(k, block):
    rng = np.random.default_rng(k)
    queries, bank = rng.standard_normal((37, 12)), rng.standard_normal((53, 12)) + 0.5
    dist, index = PreparedBank(bank).search(queries, k, block=block)
    ref = cdist(queries, bank)
    expected = np.argsort(ref, axis=1)[:, :k]
    np.testing.assert_array_equal(index, expected)
    np.testing.assert_allclose(dist, np.take_along_axis(ref, expected, axis=1), rtol=1e-10)


def test_knn_leaves_out_excluded_rows_and_checks_k():
    rng = np.random.default_rng(3)
    queries, bank = rng.standard_normal((9, 5)), rng.standard_normal((20, 5))
    exclude = np.zeros(20, dtype=bool)
    exclude[[0, 3, 4, 19]] = True
    dist, index = PreparedBank(bank).search(queries, 5, exclude, block=16)
    kept = np.flatnonzero(~exclude)
    ref = cdist(queries, bank[kept])
    order = np.argsort(ref, axis=1)[:, :5]
    np.testing.assert_array_equal(index, kept[order])
    np.testing.assert_allclose(dist, np.take_along_axis(ref, order, axis=1), rtol=1e-10)
    with pytest.raises(ValueError):
        PreparedBank(bank).search(queries, 17, exclude)


def test_knn_float32_is_accurate_on_features_with_a_large_mean():
    # ReLU features share a large positive mean; the search centres them, so float32 keeps
    # small distances accurate.
    rng = np.random.default_rng(4)
    bank = (50.0 + rng.standard_normal((300, 64))).astype(np.float32)
    queries = bank[:20] + np.float32(0.05) * rng.standard_normal((20, 64)).astype(np.float32)
    dist, index = PreparedBank(bank).search(queries, 1)
    ref = cdist(queries.astype(np.float64), bank.astype(np.float64))
    np.testing.assert_array_equal(index[:, 0], np.arange(20))
    np.testing.assert_allclose(dist[:, 0], ref.min(axis=1), rtol=1e-3)


def brute_force(queries, bank, k, exclude=None):
    """The search written out as before the prepared bank: the bank's mean, centred rows and norms
    taken for this call, one (Q, M) block, float32 like the held-out scores."""
    center = bank.mean(axis=0, dtype=np.float64)
    centred_q = (queries - center).astype(np.float32)
    centred_b = bank.astype(np.float32) - center.astype(np.float32)
    squared = (np.einsum("ij,ij->i", centred_q, centred_q)[:, None] - 2.0 * (centred_q @ centred_b.T)
               + np.einsum("ij,ij->i", centred_b, centred_b)[None])
    if exclude is not None:
        squared[:, exclude] = np.inf
    index = np.argsort(squared, axis=1, kind="stable")[:, :k]
    return np.sqrt(np.maximum(np.take_along_axis(squared, index, axis=1), 0.0)), index


@pytest.mark.parametrize("k", [1, 6])
def test_prepared_bank_reused_equals_the_per_call_search(k):
    """One PreparedBank searched many times (blocks of bank rows and of queries, rows left out or
    not) gives the per-call formula's indices and distances to float32 rounding."""
    rng = np.random.default_rng(10 + k)
    bank = (3.0 + rng.standard_normal((700, 24))).astype(np.float32)
    prepared = PreparedBank(bank)
    assert prepared.rows.dtype == np.float32 and prepared.squared.shape == (700,)
    np.testing.assert_allclose(prepared.rows.mean(axis=0), 0.0, atol=1e-5)
    for seed in range(3):
        queries = (3.0 + rng.standard_normal((40, 24))).astype(np.float32)
        exclude = (np.arange(700) // 100 == seed) if seed else None
        dist, index = prepared.search(queries, k, exclude, block=24 * 64)
        ref_dist, ref_index = brute_force(queries, bank, k, exclude)
        np.testing.assert_array_equal(index, ref_index)
        np.testing.assert_allclose(dist, ref_dist, rtol=2e-6)
        if exclude is not None:
            assert not exclude[index].any()
    half = PreparedBank(bank.astype(np.float16))  # --half banks search in float32
    assert half.dtype == np.float32
    np.testing.assert_array_equal(half.search(bank[:5], 1)[1][:, 0], np.arange(5))


def float64_nearest(queries, bank, exclude=None):
    """Index and distance of the nearest bank row of each query by float64 differences, lowest
    index on ties."""
    ref = cdist(queries.astype(np.float64), bank.astype(np.float64))
    if exclude is not None:
        ref[:, exclude] = np.inf
    index = np.argmin(ref, axis=1)
    return ref[np.arange(len(ref)), index], index


def low_rank_rows(rng, count, dims=48, shift=5.0):
    """Rows whose variance decays like real patch features' (most of it in a few directions)."""
    scales = 3.0 * 0.8 ** np.arange(dims)
    return (shift + rng.standard_normal((count, dims)) * scales).astype(np.float32)


@pytest.mark.parametrize("head", [4, 16, 47])
def test_head_bounds_search_equals_float64_brute_force(head):
    """Nearest rows through the lower bounds: the float64 nearest, distances to float32
    rounding; with rows left out, only allowed rows; and far fewer rows measured than searched."""
    rng = np.random.default_rng(head)
    bank = low_rank_rows(rng, 3000)
    queries = low_rank_rows(rng, 300)
    prepared = PreparedBank(bank, head=head)
    dist, index = prepared.search(queries, 1, block=48 * 512)
    ref_dist, ref_index = float64_nearest(queries, bank)
    np.testing.assert_array_equal(index[:, 0], ref_index)
    np.testing.assert_allclose(dist[:, 0], ref_dist, rtol=1e-5)
    assert prepared.bounds.measured < 0.1 * 300 * 3000
    exclude = rng.random(3000) < 0.5
    dist, index = prepared.search(queries, 1, exclude)
    ref_dist, ref_index = float64_nearest(queries, bank, exclude)
    np.testing.assert_array_equal(index[:, 0], ref_index)
    np.testing.assert_allclose(dist[:, 0], ref_dist, rtol=1e-5)


def test_head_bounds_search_on_network_features(fitted, test_images):
    """The patch features of a random-initialised resnet18 (PatchCore's bank and 4 images'
    patches): the same nearest rows as float64 brute force."""
    if fitted.method != "patchcore":
        pytest.skip("PatchCore's patch features")
    queries = np.concatenate([p[0].reshape(-1, fitted.dims) for _, p in fitted.extract(test_images)])
    prepared = PreparedBank(fitted.bank, head=8)
    dist, index = prepared.search(queries, 1)
    ref_dist, ref_index = float64_nearest(queries, fitted.bank)
    np.testing.assert_array_equal(index[:, 0], ref_index)
    np.testing.assert_allclose(dist[:, 0], ref_dist, rtol=1e-5)


def test_head_bounds_search_when_the_bounds_prove_nothing():
    """Adversarial banks: the bounds' first candidate is not the nearest row, or every row is
    as near as every other, so rows beyond the first are measured; results stay exact."""
    rng = np.random.default_rng(7)
    iso = rng.standard_normal((2000, 32)).astype(np.float32)  # no leading directions at all
    queries = rng.standard_normal((64, 32)).astype(np.float32)
    prepared = PreparedBank(iso, head=2)
    dist, index = prepared.search(queries, 1)
    ref_dist, ref_index = float64_nearest(queries, iso)
    np.testing.assert_array_equal(index[:, 0], ref_index)
    np.testing.assert_allclose(dist[:, 0], ref_dist, rtol=1e-5)
    assert prepared.bounds.measured > 10 * 64  # the first candidate rarely proves itself here
    # rows on circles about the queries' axis: a third of them tie (to float32 rounding, which the
    # rotation decides) as each query's nearest, and all have the same leading coordinate
    angles = np.linspace(0.0, 2 * np.pi, 600, endpoint=False)
    circle = np.zeros((600, 6), dtype=np.float32)
    circle[:, 0], circle[:, 1] = 4.0 * np.cos(angles), 4.0 * np.sin(angles)
    circle[:, 2] = 10.0 * (np.arange(600) % 3)  # the direction the basis puts first
    centre = np.array([[0.0, 0.0, 10.0, 0.0, 0.0, 0.0], [0.0, 0.0, 20.0, 0.0, 0.0, 0.0]], np.float32)
    prepared = PreparedBank(circle, head=1)
    dist, index = prepared.search(centre, 1)
    np.testing.assert_array_equal(index[:, 0] % 3, [1, 2])
    np.testing.assert_allclose(dist[:, 0], 4.0, rtol=1e-6)
    assert prepared.bounds.measured >= 2 * 200  # every tied row measured


@pytest.mark.parametrize("size", [1, 2, 3])
def test_head_bounds_search_on_tiny_and_duplicated_banks(size):
    """Banks of one to three rows, and banks of repeated rows (exact ties: the lowest index)."""
    rng = np.random.default_rng(size)
    bank = rng.standard_normal((size, 5)).astype(np.float32)
    queries = rng.standard_normal((9, 5)).astype(np.float32)
    for rows in (bank, np.repeat(bank, 4, axis=0)):
        dist, index = PreparedBank(rows, head=1).search(queries, 1)
        ref_dist, ref_index = float64_nearest(queries, rows)
        np.testing.assert_array_equal(index[:, 0], ref_index)
        np.testing.assert_allclose(dist[:, 0], ref_dist, rtol=1e-5)
    exclude = np.zeros(4 * size, dtype=bool)
    exclude[: 4 * size - 1] = True  # one row left: every query gets it
    _, index = PreparedBank(np.repeat(bank, 4, axis=0), head=1).search(queries, 1, exclude)
    np.testing.assert_array_equal(index[:, 0], 4 * size - 1)


def test_bank_models_prepare_their_bank_once_per_fit(fitted, train_images, train_names):
    model = new_model(fitted.method).fit(batches(train_images, train_names))
    list(model.calibration_scores(batches(train_images[:4], train_names[:4])))
    prepared = model.prepared
    searched = model.bank if model.method == "patchcore" else model.vectors
    assert prepared.rows.shape == searched.shape
    list(model.calibration_scores(batches(train_images[4:8], train_names[4:8])))
    assert model.prepared is prepared
    model.fit(batches(train_images[:6], train_names[:6]))  # a new fit makes a new bank
    assert model.prepared is not prepared
    assert len(model.prepared) == len(model.bank if model.method == "patchcore" else model.vectors)


@pytest.mark.parametrize("head", [0, 2])
@pytest.mark.parametrize("slice_rows", [7, 50])
def test_bank_search_layer_equals_knn(slice_rows, head):
    rng = np.random.default_rng(slice_rows)
    bank = (20.0 + rng.standard_normal((50, 6))).astype(np.float32)
    queries = (20.0 + rng.standard_normal((13, 6))).astype(np.float32)
    layer = BankSearch(bank, slice_rows, head)
    assert len(layer.slices) == -(-50 // slice_rows)
    with paddle.no_grad():
        turned = layer.center(paddle.to_tensor(queries))
        dist, index = (t.numpy() for t in layer.nearest(turned))
        dist_k, index_k = (t.numpy() for t in layer.smallest(turned, 4))
        rows = layer.rows(paddle.to_tensor(np.arange(50))).numpy()
    np.testing.assert_array_equal(rows, PreparedBank(bank).rows)  # bit for bit
    ref_dist, ref_index = PreparedBank(bank.astype(np.float64)).search(queries.astype(np.float64), 4)
    np.testing.assert_array_equal(index, ref_index[:, 0])
    np.testing.assert_array_equal(index_k, ref_index)
    np.testing.assert_allclose(dist, ref_dist[:, 0], rtol=1e-4)
    np.testing.assert_allclose(dist_k, ref_dist, rtol=1e-4)


class NearestLayer(paddle.nn.Layer):
    """Query rows (Q, D) -> BankSearch.nearest of them: distances (Q,) and rows (Q,)."""

    def __init__(self, search):
        super().__init__()
        self.search = search

    def forward(self, x):
        return self.search.nearest(self.search.center(x))


def graph_nearest(layer, queries, tmp_path, legacy=False, mkldnn=True):
    """:class:`NearestLayer` traced (PIR, or the legacy IR), run by Paddle Inference."""
    prefix = str(tmp_path / ("legacy" if legacy else "pir"))
    if legacy:
        with paddle.pir_utils.DygraphOldIrGuard():
            model_file = save_static(NearestLayer(layer), [None, queries.shape[1]], prefix)
    else:
        model_file = save_static(NearestLayer(layer), [None, queries.shape[1]], prefix)
    options = PredictorOptions(enable_mkldnn=mkldnn)
    return Predictor(model_file, prefix + ".pdiparams", options).run(queries)


BANK_CASES = ("low rank", "isotropic", "duplicated", "tiny")


def bank_case(case: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A bank (M, 24) and queries (70, 24) of one of :data:`BANK_CASES`: low-rank rows (the bounds
    prove a few rows), isotropic rows (they prove little), rows repeated three times (exact ties),
    a bank of two rows."""
    bank = {"low rank": low_rank_rows(rng, 900, dims=24),
            "isotropic": rng.standard_normal((900, 24)).astype(np.float32),
            "duplicated": np.repeat(low_rank_rows(rng, 100, dims=24), 3, axis=0),
            "tiny": low_rank_rows(rng, 2, dims=24)}[case]
    queries = low_rank_rows(rng, 70, dims=24)
    if case == "isotropic":  # half of the queries close to a bank row, half anywhere
        queries = np.concatenate([bank[:35] + np.float32(0.01) * rng.standard_normal((35, 24)),
                                  rng.standard_normal((35, 24))]).astype(np.float32)
    return bank, queries


def rows_within(bounds: np.ndarray, nearest: np.ndarray) -> np.ndarray:
    """Per query, the bank rows whose lower bound (Q, M) is within its nearest distance (Q,), to
    float32 rounding: the rows any pruned search must measure."""
    return (bounds <= (nearest**2)[:, None] * (1 + 1e-5)).sum(axis=1)


@pytest.mark.parametrize("cap", [4, 64])
@pytest.mark.parametrize("case", BANK_CASES)
def test_pruned_graph_search_equals_float64_brute_force(case, cap, tmp_path):
    """The fused graph's pruned nearest-row search (eager, PIR + oneDNN, PIR without oneDNN,
    legacy IR): the float64 nearest rows (lowest index among duplicates), distances to float32
    rounding, whether the bounds prove the first candidate or many rows must be measured, and
    with the brute-force fallback of queries with more than ``cap`` rows to measure."""
    bank, queries = bank_case(case, np.random.default_rng(0))
    layer = BankSearch(bank, 128, head=3, cap=cap)
    ref_dist, ref_index = float64_nearest(queries, bank)
    with paddle.no_grad():
        eager = [t.numpy() for t in NearestLayer(layer)(paddle.to_tensor(queries))]
        turned = layer.center(paddle.to_tensor(queries))
        q_sq = (turned * turned).sum(axis=1)
        tail = turned[:, 3:]
        lifted = layer._with_ones(turned[:, :3], paddle.sqrt((tail * tail).sum(axis=1)))
        bounds = (lifted @ layer.bounds.T + q_sq.unsqueeze(1)).numpy()
    # how many rows the bounds leave (to float32 rounding): on the isotropic bank, cap 4 sends
    # some queries to the brute-force fallback and keeps others on the pruned search
    within = rows_within(bounds, ref_dist)
    assert within.min() >= 1
    if case == "isotropic":
        assert (within > 4).any() and (within <= 4).any()
    runs = {"eager": eager, "onednn": graph_nearest(layer, queries, tmp_path),
            "plain": graph_nearest(layer, queries, tmp_path, mkldnn=False),
            "legacy": graph_nearest(layer, queries, tmp_path, legacy=True)}
    for name, (dist, index) in runs.items():
        np.testing.assert_array_equal(index, ref_index, err_msg=name)
        np.testing.assert_allclose(dist, ref_dist, rtol=1e-5, err_msg=name)
    nan = queries.copy()
    nan[5, 2] = np.nan  # NaN stays NaN, the other queries keep their rows
    dist, index = graph_nearest(layer, nan, tmp_path)
    assert np.isnan(dist[5]) and not np.isnan(np.delete(dist, 5)).any()
    np.testing.assert_array_equal(np.delete(index, 5), np.delete(ref_index, 5))


class _Crop(paddle.nn.Layer):
    """Images (N, 3, 64, 64) -> SmoothUpsample of their (N, 1, 8, 12) corner."""

    def __init__(self):
        super().__init__()
        self.smooth = SmoothUpsample((8, 12), (SIZE, SIZE), 4.0)

    def forward(self, x):
        return self.smooth(x[:, :1, :8, :12])


def test_smooth_upsample_takes_batches_under_onednn():
    # a broadcast 2-D @ 4-D matmul gave NaN for the second image under oneDNN (Paddle 3.3)
    x = images(3, seed=5)
    (expected,) = compile_layer(_Crop(), SIZE, dynamic())(x)
    (served,) = compile_layer(_Crop(), SIZE, Runtime(engine="inference"))(x)
    assert expected.shape == (3, 1, SIZE, SIZE)
    rel_close(served, expected, 1e-5)


# -- k-center coreset --------------------------------------------------------------------------
def naive_kcenter(points, count, start):
    """Greedy k-center straight from the definition, with full cdist columns."""
    chosen = [start]
    nearest = cdist(points, points[[start]])[:, 0]
    while len(chosen) < count:
        chosen.append(int(np.argmax(nearest)))
        nearest = np.minimum(nearest, cdist(points, points[[chosen[-1]]])[:, 0])
    return np.array(chosen)


def covering_radius(points, chosen):
    return cdist(points, points[chosen]).min(axis=1).max()


def blobs(seed, count=600, dims=8):
    """Points around 12 centres of different spreads."""
    rng = np.random.default_rng(seed)
    centres = 6.0 * rng.standard_normal((12, dims))
    which = rng.integers(0, 12, count)
    spread = rng.uniform(0.2, 1.5, 12)[which, None]
    return centres[which] + spread * rng.standard_normal((count, dims))


@pytest.mark.parametrize(("count", "start"), [(1, 5), (10, 0), (60, 123), (600, 7)])
def test_kcenter_equals_naive_greedy(count, start):
    points = blobs(0) @ np.random.default_rng(1).standard_normal((8, 5))
    chosen = kcenter_greedy(points, count, start)
    np.testing.assert_array_equal(chosen, naive_kcenter(points, count, start))
    assert len(set(chosen.tolist())) == count


@pytest.mark.parametrize(("cells", "count"), [(1, 60), (2, 60), (9, 60), (60, 60), (100, 300),
                                             (4096, 500)])
def test_kcenter_bounded_steps_equal_naive_greedy(cells, count):
    # 64 full passes at most, then cells regrouped at 128, 256 chosen points (up to ``cells``)
    points = blobs(3, count=1000) @ np.random.default_rng(4).standard_normal((8, 6))
    before = points.copy()
    chosen = kcenter_greedy(points, count, 11, cells=cells)
    np.testing.assert_array_equal(chosen, naive_kcenter(points, count, 11))
    np.testing.assert_array_equal(points, before)  # rows regrouped while selecting, then restored
    points.flags.writeable = False  # e.g. a memory-mapped file: selected from a copy
    np.testing.assert_array_equal(kcenter_greedy(points, count, 11, cells=cells), chosen)


@pytest.mark.parametrize("cells", [1, 4, 30])
def test_kcenter_breaks_exact_ties_like_naive_greedy(cells):
    # small integer coordinates: every float32 distance is exact and ties abound (duplicates too),
    # so the bounded steps must pick the same lowest index as the definition at every step
    points = np.random.default_rng(5).integers(0, 4, (300, 3)).astype(np.float32)
    for count in (50, 64, 80):  # 64 distinct points at most: later steps choose among zeros
        np.testing.assert_array_equal(kcenter_greedy(points, count, 17, cells=cells, chunk=64),
                                      naive_kcenter(points.astype(np.float64), count, 17))


def test_kcenter_float32_steps_take_a_farthest_point():
    # continuous float32 data: each chosen point is farthest from the points chosen before it,
    # up to float32 rounding of the distances
    points = (blobs(6, count=3000, dims=16) * 7.0).astype(np.float32)
    chosen = kcenter_greedy(points, 400, 0, cells=300)
    assert len(set(chosen.tolist())) == 400
    exact = points.astype(np.float64)
    nearest = cdist(exact, exact[[0]])[:, 0]
    for index in chosen[1:]:
        assert nearest[index] >= nearest.max() * (1 - 1e-5)
        nearest = np.minimum(nearest, cdist(exact, exact[[index]])[:, 0])


def test_chunked_selection_equals_unchunked():
    points = blobs(1, count=1000).astype(np.float32)
    whole = kcenter_greedy(points, 80, 3, chunk=len(points))
    for chunk in (1, 7, 256):
        np.testing.assert_array_equal(kcenter_greedy(points, 80, 3, chunk=chunk), whole)
        np.testing.assert_array_equal(kcenter_greedy(points, 80, 3, chunk=chunk, cells=5), whole)


@pytest.mark.parametrize("seed", range(5))
def test_coreset_covers_better_than_random_sampling(seed):
    points = blobs(seed)
    rng = np.random.default_rng(seed)
    chosen = kcenter_greedy(points, 30, int(rng.integers(len(points))))
    random = rng.choice(len(points), 30, replace=False)
    assert covering_radius(points, chosen) <= covering_radius(points, random)


def test_blockwise_projection_and_gather_equal_stacked():
    rng = np.random.default_rng(2)
    blocks = [rng.standard_normal((n, 6)).astype(np.float32) for n in (5, 1, 9)]
    stacked = np.concatenate(blocks)
    matrix = rng.standard_normal((6, 3)).astype(np.float32)
    np.testing.assert_allclose(project(blocks, matrix), stacked @ matrix, rtol=1e-6)
    index = np.array([14, 0, 5, 7, 4, 13])
    np.testing.assert_array_equal(take_rows(blocks, index), stacked[index])


def test_kcenter_reports_progress_on_stderr(capsys):
    kcenter_greedy(blobs(0), 20, 0, desc="coreset test")
    captured = capsys.readouterr()
    assert "coreset test" in captured.err and captured.out == ""


def test_kcenter_checks_its_arguments():
    with pytest.raises(ValueError):
        kcenter_greedy(blobs(0, count=10), 11, 0)
    with pytest.raises(ValueError):
        kcenter_greedy(blobs(0, count=10), 3, 10)


# -- numpy references of the methods -----------------------------------------------------------
def trunk_features(model, x):
    with paddle.no_grad():
        return [f.numpy().astype(np.float64) for f in model.trunk(paddle.to_tensor(x))]


def smooth(dist_map, model):
    """Bilinear zoom (half-pixel centres) to the input size, then scipy's Gaussian filter."""
    size = model.config.image_size
    zoomed = ndimage.zoom(dist_map, size / dist_map.shape[0], order=1, grid_mode=True, mode="nearest")
    return ndimage.gaussian_filter(zoomed, model.config.sigma, mode="reflect")


def reference_spade(model, train, test):
    """SPADE by its definition: image kNN over layer4 averages, then per-layer pixel kNN."""
    k = model.options.k
    *train_maps, train_last = trunk_features(model, train)
    *test_maps, test_last = trunk_features(model, test)
    dist = cdist(test_last.mean(axis=(2, 3)), train_last.mean(axis=(2, 3)))
    nearest = np.argsort(dist, axis=1)[:, :k]
    scores = np.take_along_axis(dist, nearest, axis=1).mean(axis=1)
    maps = []
    for i in range(len(test)):
        total = 0.0
        for feats, gallery in zip(test_maps, train_maps, strict=True):
            per_image = np.sqrt(((gallery[nearest[i]] - feats[i]) ** 2).sum(axis=1))  # (k, h, w)
            total = total + smooth(per_image.min(axis=0), model)
        maps.append(total)
    return np.stack(maps), scores


def patch_rows(model, x):
    """PatchCore features (N, P, D): 3x3 zero-padded average (/ 9) of layer2 and layer3, layer3
    repeated to layer2's grid, concatenated."""
    pooled = [ndimage.uniform_filter(f, size=(1, 1, 3, 3), mode="constant") for f in trunk_features(model, x)]
    side = pooled[0].shape[2]
    up = [f.repeat(side // f.shape[2], axis=2).repeat(side // f.shape[3], axis=3) for f in pooled]
    cat = np.concatenate(up, axis=1)
    return cat.reshape(len(x), cat.shape[1], -1).transpose(0, 2, 1)


def reference_patchcore(model, train, test):
    """PatchCore by its definition: naive greedy coreset on the projected patches, nearest-bank
    distances, and the paper's reweighting exp(d / sqrt(D)) over the b neighbours of m*."""
    rows = patch_rows(model, train).reshape(-1, model.dims)
    count = int(model.options.coreset_ratio * len(rows))
    chosen = naive_kcenter(rows @ model.projection.astype(np.float64), count, int(model.start * len(rows)))
    bank = rows[chosen]
    side = model.grid[0]
    maps, scores = [], []
    for patches in patch_rows(model, test):
        dist = cdist(patches, bank)
        nearest = dist.min(axis=1)
        worst = int(np.argmax(nearest))
        anchor = int(np.argmin(dist[worst]))
        support = np.argsort(cdist(bank[[anchor]], bank)[0])[: model.options.num_neighbors]
        scale = 1.0 / math.sqrt(model.dims)
        weight = 1.0 - np.exp(scale * nearest[worst]) / np.exp(scale * dist[worst, support]).sum()
        scores.append(weight * nearest[worst])
        maps.append(smooth(nearest.reshape(side, side), model))
    return np.stack(maps), np.array(scores), bank


def test_spade_scores_equal_reference(train_images, test_images):
    model = new_model("spade").fit([train_images])
    maps, scores = model.score(test_images)
    ref_maps, ref_scores = reference_spade(model, train_images, test_images)
    assert maps.shape == (4, SIZE, SIZE) and maps.dtype == scores.dtype == np.float32
    rel_close(maps, ref_maps, 1e-4)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-4)
    assert np.ptp(ref_scores) > 0.05 * ref_scores.max()


def test_patchcore_scores_equal_reference(train_images, test_images):
    model = new_model("patchcore").fit([train_images])
    assert model.dims == 384 and model.grid == (8, 8)
    maps, scores = model.score(test_images)
    ref_maps, ref_scores, ref_bank = reference_patchcore(model, train_images, test_images)
    assert model.bank.shape == ref_bank.shape == (int(0.25 * 12 * 64), 384)
    rel_close(model.bank, ref_bank, 1e-5)
    rel_close(maps, ref_maps, 1e-4)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-4)
    assert np.ptp(ref_scores) > 0.05 * ref_scores.max()


# -- runtimes, checkpoints ---------------------------------------------------------------------
def test_inference_runtime_matches_dynamic(fitted, test_images, tmp_path):
    assert_served_matches_dynamic(fitted, test_images, tmp_path)
    maps, scores = fitted.score(test_images)
    # the traced graph takes any batch size ([None, 3, S, S]), not only the runtime's one image
    run = compile_layer(fitted.fused_layer(), SIZE, Runtime(engine="inference"))
    batch_maps, batch_scores = run(test_images[:3])
    rel_close(batch_maps[:, 0], maps[:3], 1e-4)
    np.testing.assert_allclose(batch_scores, scores[:3], rtol=1e-4)


def test_fused_layer_exports_under_the_legacy_ir(fitted, test_images, tmp_path):
    # export_model.py --format pdmodel traces under the legacy IR (models.components.static_ops)
    with paddle.pir_utils.DygraphOldIrGuard():
        model_file = save_static(fitted.fused_layer(), [None, 3, SIZE, SIZE], str(tmp_path / "model"))
    assert model_file.endswith(".pdmodel")
    predictor = Predictor(model_file, str(tmp_path / "model.pdiparams"), PredictorOptions())
    maps, scores = predictor.run(test_images[:3])
    expected_maps, expected_scores = fitted.score(test_images[:3])
    rel_close(maps[:, 0], expected_maps, 1e-4)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-4)


def test_patchcore_graph_searches_a_long_bank_in_slices(train_images, test_images, monkeypatch,
                                                        tmp_path):
    model = new_model("patchcore", runtime=Runtime(engine="inference")).fit([train_images])
    maps, scores = model.score(test_images)
    monkeypatch.setattr("models.patchcore.model.SLICE_ENTRIES", 50 * 64)  # 50-row slices
    monkeypatch.setattr("models.patchcore.model.BOUND_ENTRIES", 50 * 64)  # also for the bounds
    sliced = model.fused_layer()
    assert len(sliced.search.slices) == 4
    sliced_maps, sliced_scores = compile_layer(sliced, SIZE, Runtime(engine="inference"))(test_images)
    rel_close(sliced_maps[:, 0], maps, 1e-5)
    np.testing.assert_allclose(sliced_scores, scores, rtol=1e-5)
    # the slices' running minimum also traces under the legacy IR (--format pdmodel)
    with paddle.pir_utils.DygraphOldIrGuard():
        model_file = save_static(model.fused_layer(), [None, 3, SIZE, SIZE], str(tmp_path / "model"))
    legacy_maps, legacy_scores = Predictor(model_file, str(tmp_path / "model.pdiparams"),
                                           PredictorOptions()).run(test_images)
    rel_close(legacy_maps[:, 0], maps, 1e-5)
    np.testing.assert_allclose(legacy_scores, scores, rtol=1e-5)


def test_save_load_round_trip_gives_identical_scores(fitted, test_images, tmp_path):
    path = str(tmp_path / "sub" / "model.npz")
    fitted.save(path)
    loaded = load_model(path, expect=fitted.config, runtime=dynamic())
    assert type(loaded) is type(fitted) and loaded.config == fitted.config
    assert loaded.n_train == 12 and loaded.fitted
    for name, value in fitted._bank_arrays().items():
        np.testing.assert_array_equal(loaded._bank_arrays()[name], value, err_msg=name)
        assert value.dtype == np.float32
    for got, expected in zip(loaded.score(test_images), fitted.score(test_images), strict=True):
        np.testing.assert_array_equal(got, expected)


def test_half_bank_round_trip(fitted, train_images, train_names, test_images, tmp_path):
    half = new_model(fitted.method, half=True).fit(batches(train_images, train_names))
    path = str(tmp_path / "half.npz")
    half.save(path)
    loaded = load_model(path, runtime=dynamic())
    banks = [model._bank_arrays().values() for model in (loaded, fitted)]
    assert all(a.dtype == np.float16 for a in banks[0])
    assert sum(a.nbytes for a in banks[0]) == sum(a.nbytes for a in banks[1]) // 2
    maps, scores = loaded.score(test_images)
    for got, expected in zip((maps, scores), half.score(test_images), strict=True):
        np.testing.assert_array_equal(got, expected)
    full_maps, full_scores = fitted.score(test_images)
    rel_close(maps, full_maps, 2e-3)
    np.testing.assert_allclose(scores, full_scores, rtol=2e-3)


def test_fit_state_resumes(fitted, train_images, train_names, test_images, tmp_path):
    method = fitted.method
    partial = new_model(method)
    for batch in batches(train_images[:8], train_names[:8]):
        partial.partial_fit(batch["images"], batch["paths"])
    path = str(tmp_path / "state.npz")
    partial.save(path)
    resumed = load_model(path, runtime=dynamic())
    assert not resumed.fitted and resumed.n_train == 8 and resumed.train_paths == train_names[:8]
    with pytest.raises(ConfigError, match="not fitted"):
        resumed.score(test_images)
    for batch in batches(train_images[8:], train_names[8:]):
        resumed.partial_fit(batch["images"], batch["paths"])
    resumed.finalize()
    for name, value in fitted._bank_arrays().items():
        rel_close(resumed._bank_arrays()[name], value, 1e-6)
    rel_close(resumed.calibrate(batches(train_images, train_names)),
              fitted.calibrate(batches(train_images, train_names)), 1e-6)


@pytest.mark.bad_input
def test_checkpoint_of_another_method_fails_clearly(fitted, tmp_path):
    path = str(tmp_path / "m.npz")
    fitted.save(path)
    other = "patchcore" if fitted.method == "spade" else "spade"
    expect = {**fitted.config.identity(), "method": other}
    with pytest.raises(CheckpointError) as info:
        load_model(path, expect=expect, runtime=dynamic())
    assert str(info.value).startswith(f"{path}: checkpoint has ") and "was asked for" in str(info.value)
    assert f"method={fitted.method}" in str(info.value)


# -- calibration -------------------------------------------------------------------------------
def test_threshold_comes_from_held_out_scores(fitted, train_images, train_names):
    """Each training image is scored against the bank without its own entries: for SPADE (and for
    PatchCore with the whole bank kept) that is the model fitted on the other images."""
    method = fitted.method
    overrides = {"coreset_ratio": 1.0} if method == "patchcore" else {}
    model = new_model(method, **overrides).fit(batches(train_images, train_names))
    held_out = np.concatenate(list(model.calibration_scores(batches(train_images, train_names))))
    for i in (0, 5, 11):
        others = [j for j in range(12) if j != i]
        loo = new_model(method, **overrides).fit([train_images[others]])
        np.testing.assert_allclose(held_out[i], loo.score(train_images[i : i + 1])[1][0], rtol=1e-4)
    threshold = model.calibrate(batches(train_images, train_names))
    assert threshold == model.threshold == pytest.approx(held_out.max())
    assert threshold > 1.2 * model.score(train_images)[1].max()  # in-sample scores are ~0
    # without paths, the position in the batches identifies the training image
    positional = new_model(method, **overrides).fit([train_images[:5], train_images[5:]])
    assert positional.calibrate([train_images[:7], train_images[7:]]) == pytest.approx(threshold, rel=1e-6)


def test_new_images_are_scored_against_the_whole_bank(fitted, test_images, tmp_path):
    new = [{"images": test_images, "paths": [f"elsewhere/{i}.png" for i in range(4)]}]
    held_out = np.concatenate(list(fitted.calibration_scores(new)))
    np.testing.assert_allclose(held_out, fitted.score(test_images)[1], rtol=1e-4)
    path = str(tmp_path / "m.npz")
    fitted.save(path)
    loaded = load_model(path, runtime=dynamic())  # a checkpoint does not know its training images
    assert loaded.calibrate(new) == pytest.approx(held_out.max(), rel=1e-4)


# -- configuration -----------------------------------------------------------------------------
def test_k_defaults_folders_and_configs():
    assert [getattr(model_config(m).options, "k", None) for m in list(METHODS)[:4]] == [100, 100, 50, None]
    assert model_config("spade", k=7).options.k == 7
    assert model_config("spade").run_name == "spade_resnet18_50"
    assert model_config("ortho").run_name == "ortho_resnet18_100"
    assert model_config("patchcore", arch="resnet50").run_name == "patchcore_resnet50"
    assert "k" not in model_config("patchcore").identity()
    args = train.parse_args(["--method", "patchcore", "--coreset_ratio", "0.5", "--half", "--k", "30"])
    config = config_from(args)  # --k is not patchcore's: ignored, as in its folder name
    assert config.options == METHODS["patchcore"].Options(coreset_ratio=0.5, projection_dim=128,
                                                           num_neighbors=9, half=True)
    assert config.run_name == "patchcore_resnet18"
    assert config_from(train.parse_args(["--method", "spade"])).options.k == 50
    with pytest.raises(ConfigError, match="--method patchcore has no option k"):
        model_config("patchcore", k=100)  # the Python API is strict
    with pytest.raises(ConfigError, match="--method knn"):
        model_config("knn")


@pytest.mark.parametrize(("field", "value"), [("coreset_ratio", 0.0), ("coreset_ratio", 1.5),
                                              ("projection_dim", 0), ("num_neighbors", 0)])
@pytest.mark.bad_input
def test_bad_patchcore_arguments(field, value):
    with pytest.raises(ConfigError) as info:
        new_model("patchcore", **{field: value})
    assert str(info.value).startswith(f"--{field} {value}: must be")


@pytest.mark.parametrize("method", list(SETTINGS))
@pytest.mark.bad_input
def test_one_training_image_is_an_input_error(method, train_images):
    with pytest.raises(InputError) as info:
        new_model(method).fit([train_images[:1]])
    assert str(info.value).startswith(f"--method {method} got 1 training image(s) and needs at least 2")


@pytest.mark.parametrize("method", list(SETTINGS))
@pytest.mark.bad_input
def test_launched_fit_is_refused_before_fitting(method, demo_root, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the training images were read")

    monkeypatch.setattr("engine.workflow.list_samples", no_loading)
    args = train.parse_args(["--method", method, "--pretrained", "none", "--resize", "64"])
    plan = FitPlan(DataPlan(demo_root, Preprocess(64)), config_from(args))
    with pytest.raises(ConfigError, match=f"--method {method} cannot be fitted across processes"):
        fit_category(plan, "tiles", dynamic(), World(rank=0, size=2))
    # the same refusal if the fit state is ever combined across processes
    with pytest.raises(ConfigError, match="cannot be fitted across processes"):
        new_model(method).reduce_across(SimpleNamespace(world=World(rank=1, size=2)))
    METHODS["ortho"].check_world(2)  # the Gaussian methods combine their sums


def test_finalize_memory_stays_within_the_features(train_images):
    """PatchCore's finalize (projection, selection, bank) needs less than half the memory of
    the training features it selects from: the fit peaks below 1.5x the features."""
    model = new_model("patchcore", coreset_ratio=0.1)
    model.fit_parts["patches"] = [np.random.default_rng(i).random((400, 384), dtype=np.float32)[None]
                                  .repeat(8, axis=0) for i in range(6)]  # 48 images x 400 patches
    model.n_train = 48
    model.train_paths = [None] * 48
    features = sum(p.nbytes for p in model.fit_parts["patches"])
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        model.finalize()
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert model.bank.shape == (1920, 384)
    assert peak < 0.5 * features, f"finalize peak {peak / 2**20:.1f} MB, features {features / 2**20:.1f} MB"


# -- scripts end to end ------------------------------------------------------------------------
FAST = ["--pretrained", "none", "--arch", "resnet18", "--resize", "64", "--batch_size", "8",
        "--cpu_threads", "2"]
SCRIPT_ARGS = {"spade": [], "patchcore": ["--coreset_ratio", "0.25"]}


def run(script, *args):
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bank-e2e") / "demo"
    return generate(root, categories=("tiles",), n_train=12, n_test_good=3, n_test_defect=3,
                    size=64, seed=2)


@pytest.fixture(scope="module", params=list(SETTINGS))
def trained(request, data, tmp_path_factory):
    method = request.param
    out = tmp_path_factory.mktemp(f"bank-out-{method}")
    proc = run("train.py", "--data_path", str(data), "--category", "tiles", "--method", method,
               *SCRIPT_ARGS[method], *FAST, "--save_path", str(out), "--eval", "--eval_PRO")
    assert proc.returncode == 0, proc.stderr
    folder = out / ("spade_resnet18_50" if method == "spade" else "patchcore_resnet18")
    return method, folder, proc


def test_scripts_train_eval_predict(trained, data, tmp_path):
    method, folder, proc = trained
    if method == "spade":  # default k = 50 > 12 training images
        assert "--k 50 is more than the 12 training images" in proc.stderr
    rows = read_csv(folder / "results.csv")
    assert [r["category"] for r in rows] == ["tiles", "mean"]
    model = load_model(str(folder / "tiles.npz"), expect={"method": method})
    assert model.threshold > 0 and model.n_train == 12
    dataset = AnomalyDataset(list_samples(data, "tiles", "test"), Preprocess(64))
    row = metrics(score_batches(model, BatchLoader(dataset, 8, 0)), "tiles", True, "trapezoid")
    for key in ("image_auroc", "pixel_auroc", "pro"):
        assert float(rows[0][key]) == pytest.approx(row[key], abs=1e-5)
        assert 0.0 <= row[key] <= 1.0
    # eval.py finds the same folder from the same arguments and reproduces the table
    proc = run("eval.py", "--data_path", str(data), "--category", "tiles", "--method", method,
               *SCRIPT_ARGS[method], *FAST, "--save_path", str(tmp_path / "eval"), "--eval_PRO",
               "--model_path", str(folder))
    assert proc.returncode == 0, proc.stderr
    # with --save_path, eval.py writes SAVE_PATH/<run name>/results.csv (the reproduction's layout)
    assert read_csv(tmp_path / "eval" / folder.name / "results.csv") == rows
    # predict.py: scores and decisions of the Python API
    inputs = [str(data / "tiles" / "test" / "spot"), str(data / "tiles" / "test" / "good")]
    proc = run("predict.py", *inputs, "--model_path", str(folder), "--category", "tiles",
               "--save_path", str(tmp_path / "predict"))
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "predict" / "predict"  # predict.py writes into SAVE_PATH/predict
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 6
    x = np.stack([Preprocess(64)(read_image(Path(r["path"]))) for r in records])
    _, scores = model.score(x)
    for record, score in zip(records, scores, strict=True):
        assert record["score"] == pytest.approx(float(score), rel=1e-4)
        assert record["label"] == ("anomalous" if record["score"] > model.threshold else "normal")
        assert record["threshold"] == pytest.approx(model.threshold)
    # a checkpoint of another method stops eval.py with one line naming the file
    other = "patchcore" if method == "spade" else "spade"
    proc = run("eval.py", "--data_path", str(data), "--category", "tiles", "--method", other, *FAST,
               "--model_path", str(folder))
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(folder / "tiles.npz") in errors[0]
    assert f"method={method}" in errors[0]
