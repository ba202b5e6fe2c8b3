"""Tests of the models package: projection, Gaussian statistics, embeddings, models, checkpoints, trunk.

Every model here is a resnet18 with random weights (``pretrained="none"``) on 64 px inputs (16x16
grid), so the suite needs neither a download nor a GPU.
"""

from __future__ import annotations

import os
import pickle
import zipfile

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from helpers import assert_served_matches_dynamic, rel_close
from scipy import ndimage

import models.ortho.model as ortho_module
from core.errors import CheckpointError, ConfigError, InputError
from core.resample import nearest_indices
from datasets import Preprocess, list_samples
from engine.workflow import DataPlan, FitPlan, calibration_indices, fit_category
from models import Runtime, build_model, load_model, model_config
from models.components import gaussian_model
from models.components.backbone import ResNetTrunk, build_trunk, layer_grid, read_pdparams
from models.components.gaussian import GaussianAccumulator, gaussian_of, squared_distances
from models.components.gaussian_model import GaussianModel
from models.components.projection import ChannelSubset, ProjectedEmbedding
from models.ortho import semi_orthogonal
from models.ortho.model import identity_first_basis

METHODS = ("ortho", "padim")
SIZE = 64
K = 8
LAYERS = ("layer1", "layer2", "layer3")
R18_CHANNELS = (64, 128, 256)


def dynamic():
    return Runtime(engine="dynamic")


def config(method, **overrides):
    fields = {"method": method, "arch": "resnet18", "k": K, "image_size": SIZE, "resize": SIZE,
              "pretrained": "none", "seed": 0}
    fields.update(overrides)
    return model_config(**fields)


def new_model(method, runtime=None, **overrides):
    return build_model(config(method, **overrides), runtime or dynamic())


def images(count, seed, size=SIZE):
    """Smooth random images (count, 3, size, size) float32: low-frequency noise plus fine noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.standard_normal((count, 3, -(-size // 8), -(-size // 8)))
    smooth = ndimage.zoom(coarse, (1, 1, 8, 8), order=1)[:, :, :size, :size]
    return (smooth + 0.3 * rng.standard_normal((count, 3, size, size))).astype(np.float32)


def random_parts(model):
    return model.weight if model.config.method == "ortho" else model.channels


@pytest.fixture(scope="module")
def train_images():
    return images(24, seed=1)


@pytest.fixture(scope="module")
def test_images():
    x = images(4, seed=2)
    x[1] *= 3.0  # out-of-distribution contrast and a bright square: scores that differ
    x[3, :, 20:36, 8:24] += 4.0
    return x


@pytest.fixture(scope="module", params=METHODS)
def fitted(request, train_images):
    """A model of each method fitted in one batch on the training images (do not mutate)."""
    return new_model(request.param).fit([train_images])


# -- semi-orthogonal projection ----------------------------------------------------------------
@pytest.mark.parametrize(("rows", "cols"), [(448, 20), (50, 50), (7, 3), (1792, 8)])
def test_semi_orthogonal_has_orthonormal_columns(rows, cols):
    w = semi_orthogonal(rows, cols, np.random.default_rng(0))
    assert w.shape == (rows, cols)
    assert w.dtype == np.float64
    np.testing.assert_allclose(w.T @ w, np.eye(cols), atol=1e-10)


def test_semi_orthogonal_is_seeded():
    a = semi_orthogonal(448, 10, np.random.default_rng(5))
    b = semi_orthogonal(448, 10, np.random.default_rng(5))
    c = semi_orthogonal(448, 10, np.random.default_rng(6))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_semi_orthogonal_manual_qr_with_positive_r_diagonal():
    rows, cols = 60, 12
    w = semi_orthogonal(rows, cols, np.random.default_rng(3))
    gaussian = np.random.default_rng(3).standard_normal((rows, cols))
    q, r = np.linalg.qr(gaussian)
    signs = np.sign(np.diag(r))
    np.testing.assert_allclose(w, q * signs, atol=1e-14)
    # gaussian = W R+ with R+ = W^T gaussian upper triangular with a positive diagonal
    r_plus = w.T @ gaussian
    np.testing.assert_allclose(np.tril(r_plus, -1), 0.0, atol=1e-10)
    assert (np.diag(r_plus) > 0).all()
    np.testing.assert_allclose(w @ r_plus, gaussian, atol=1e-10)


def test_semi_orthogonal_does_not_depend_on_qr_sign_convention(monkeypatch):
    rows, cols = 40, 9
    expected = semi_orthogonal(rows, cols, np.random.default_rng(11))
    real_qr = np.linalg.qr
    flips = np.where(np.random.default_rng(0).random(cols) < 0.5, -1.0, 1.0)
    assert (flips < 0).any() and (flips > 0).any()

    def other_convention(a):
        q, r = real_qr(a)
        return q * flips, r * flips[:, None]  # still a valid QR: (Q D)(D R) = Q R

    monkeypatch.setattr(ortho_module.np.linalg, "qr", other_convention)
    flipped = semi_orthogonal(rows, cols, np.random.default_rng(11))
    np.testing.assert_allclose(flipped, expected, atol=1e-14)


# -- Gaussian accumulator ----------------------------------------------------------------------
ACC_P, ACC_K = 6, 4


def gaussian_data(count, seed, offset=1e3):
    """Features (count, P, k) float32 around a large mean with correlated small noise."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((ACC_P, ACC_K, ACC_K))
    noise = np.einsum("pij,npj->npi", mix, rng.standard_normal((count, ACC_P, ACC_K)))
    base = offset + rng.standard_normal((ACC_P, ACC_K))
    return (base + 0.5 * noise).astype(np.float32)


def reference_stats(data):
    """np.mean / np.cov per position in float64 over all images of ``data`` (n, P, k)."""
    data = data.astype(np.float64)
    mean = data.mean(axis=0)
    cov = np.stack([np.cov(data[:, p].T, ddof=1) for p in range(data.shape[1])])
    return mean, cov


def feed(acc, data, chunk):
    for start in range(0, len(data), chunk):
        acc.update(data[start : start + chunk])


def assert_stats(acc, data, rtol=1e-6):
    mean, cov = reference_stats(data)
    state = acc.state()
    assert int(state["count"]) == len(data)
    np.testing.assert_allclose(state["mean"], mean, rtol=rtol)
    rel_close(acc.covariance(0.0), cov, rtol)
    rel_close(state["scatter"], cov * (len(data) - 1), rtol)


@pytest.mark.parametrize("chunk", [1, 3, 7])
@pytest.mark.parametrize("block", [2, 5, 64])
def test_accumulator_streaming_equals_batch_statistics(chunk, block):
    data = gaussian_data(23, seed=chunk * 10 + block)
    acc = GaussianAccumulator(ACC_P, ACC_K, block=block)
    feed(acc, data, chunk)
    assert acc.seen == 23
    assert_stats(acc, data)


def test_accumulator_without_offset_and_with_negative_offset():
    for offset in (0.0, -5e3):
        data = gaussian_data(17, seed=4, offset=offset)
        acc = GaussianAccumulator(ACC_P, ACC_K, block=4)
        feed(acc, data, 3)
        assert_stats(acc, data)


@pytest.mark.parametrize("block", [2, 5, 64])
def test_accumulator_merge_of_halves_equals_all(block):
    data = gaussian_data(21, seed=block)
    first = GaussianAccumulator(ACC_P, ACC_K, block=block)
    second = GaussianAccumulator(ACC_P, ACC_K, block=block)
    feed(first, data[:9], 2)
    feed(second, data[9:] + np.float32(3.0), 4)  # second half has another mean: exercises d d^T
    data = np.concatenate([data[:9], data[9:] + np.float32(3.0)])
    first.merge(second)
    assert_stats(first, data)
    whole = GaussianAccumulator(ACC_P, ACC_K, block=block)
    feed(whole, data, 5)
    rel_close(first.covariance(0.0), whole.covariance(0.0), 1e-6)
    # merged accumulators keep streaming correctly
    extra = gaussian_data(6, seed=99)
    feed(first, extra, 1)
    assert_stats(first, np.concatenate([data, extra]))


def test_accumulator_merge_with_empty():
    data = gaussian_data(10, seed=8)
    empty = GaussianAccumulator(ACC_P, ACC_K, block=3)
    full = GaussianAccumulator(ACC_P, ACC_K, block=3)
    feed(full, data, 4)
    full.merge(GaussianAccumulator(ACC_P, ACC_K))
    assert_stats(full, data)
    empty.merge(full)
    assert_stats(empty, data)
    with pytest.raises(ValueError):
        empty.merge(GaussianAccumulator(ACC_P, ACC_K + 1))


@pytest.mark.parametrize("block", [2, 5, 64])
def test_accumulator_state_round_trip_then_continue(block):
    data = gaussian_data(19, seed=20 + block)
    first = GaussianAccumulator(ACC_P, ACC_K, block=block)
    feed(first, data[:8], 3)
    state = first.state()
    resumed = GaussianAccumulator(ACC_P, ACC_K, block=block)
    resumed.load_state(state)
    again = resumed.state()
    assert int(again["count"]) == 8
    np.testing.assert_allclose(again["mean"], state["mean"], rtol=1e-12)
    rel_close(again["scatter"], state["scatter"], 1e-10)
    feed(resumed, data[8:], 2)
    assert_stats(resumed, data)
    uninterrupted = GaussianAccumulator(ACC_P, ACC_K, block=block)
    feed(uninterrupted, data, 1)
    np.testing.assert_allclose(resumed.state()["mean"], uninterrupted.state()["mean"], rtol=1e-6)
    rel_close(resumed.covariance(0.0), uninterrupted.covariance(0.0), 1e-6)
    with pytest.raises(ValueError):
        GaussianAccumulator(ACC_P + 1, ACC_K).load_state(state)


def test_accumulator_finalize_inverts_regularised_covariance():
    data = gaussian_data(40, seed=30, offset=10.0)
    acc = GaussianAccumulator(ACC_P, ACC_K, block=16)
    feed(acc, data, 5)
    eps = 0.01
    mean, inv_cov = acc.finalize(eps)
    assert mean.dtype == inv_cov.dtype == np.float32
    assert inv_cov.shape == (ACC_P, ACC_K, ACC_K)
    ref_mean, ref_cov = reference_stats(data)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-6)
    regularised = ref_cov + eps * np.eye(ACC_K)
    np.testing.assert_allclose(acc.covariance(eps), regularised, rtol=1e-6, atol=1e-6)
    product = inv_cov.astype(np.float64) @ regularised
    np.testing.assert_allclose(product, np.broadcast_to(np.eye(ACC_K), product.shape), atol=1e-4)
    np.testing.assert_allclose(inv_cov, inv_cov.transpose(0, 2, 1), rtol=1e-5, atol=1e-6)


def test_partners_share_one_store_and_keep_their_own_statistics():
    first_data, second_data = gaussian_data(13, seed=40), gaussian_data(9, seed=41, offset=-7.0)
    first = GaussianAccumulator(ACC_P, ACC_K, block=4)
    second = GaussianAccumulator(ACC_P, ACC_K, block=3, partner=first)
    assert second._store is first._store and first._store.shape == (ACC_P, ACC_K + 1, ACC_K)
    for row_a, row_b in zip(first_data, second_data, strict=False):  # interleaved folds
        first.update(row_a[None])
        second.update(row_b[None])
    feed(first, first_data[len(second_data):], 2)
    assert_stats(first, first_data)
    assert_stats(second, second_data)
    second.merge(first)  # writes only its own triangle
    assert_stats(second, np.concatenate([second_data, first_data]))
    assert_stats(first, first_data)
    with pytest.raises(ValueError, match="partner"):
        GaussianAccumulator(ACC_P, ACC_K, partner=first)


@pytest.mark.parametrize("with_basis", [False, True])
def test_gaussian_and_distances_equal_float64_reference(with_basis):
    """gaussian_of / squared_distances (fit basis z' = B z, two folds) against plain float64 numpy."""
    data = gaussian_data(30, seed=50, offset=20.0).astype(np.float64)
    rng = np.random.default_rng(51)
    basis = rng.standard_normal((ACC_K, ACC_K)) + 3 * np.eye(ACC_K) if with_basis else None
    fed = data if basis is None else data @ basis.T
    folds = [GaussianAccumulator(ACC_P, ACC_K, block=8)]
    folds.append(GaussianAccumulator(ACC_P, ACC_K, block=8, partner=folds[0]))
    feed(folds[0], fed[:17].astype(np.float32), 5)
    feed(folds[1], fed[17:].astype(np.float32), 5)
    eps = 0.05
    mean, inv_cov = gaussian_of(folds, eps, basis)
    ref_mean, ref_cov = reference_stats(data)
    ref_inv = np.linalg.inv(ref_cov + eps * np.eye(ACC_K))
    rel_close(mean, ref_mean, 1e-5)
    rel_close(inv_cov, ref_inv, 1e-5)
    queries = data[:3] + rng.standard_normal(data[:3].shape)
    fed_queries = queries if basis is None else queries @ basis.T
    squared = squared_distances(folds, eps, basis, fed_queries.astype(np.float32))
    diff = queries - ref_mean
    rel_close(squared, np.einsum("npi,pij,npj->np", diff, ref_inv, diff), 1e-5)
    one_fold = squared_distances(folds[1:], eps, basis, fed_queries.astype(np.float32))
    mean_1, cov_1 = reference_stats(data[17:])
    diff = queries - mean_1
    rel_close(one_fold, np.einsum("npi,pij,npj->np", diff, np.linalg.inv(cov_1 + eps * np.eye(ACC_K)),
                                  diff), 1e-5)


@pytest.mark.parametrize("count", [0, 1])
def test_accumulator_needs_two_images(count):
    acc = GaussianAccumulator(ACC_P, ACC_K, block=4)
    feed(acc, gaussian_data(2, seed=0)[:count], 1)
    with pytest.raises(ConfigError, match="at least 2"):
        acc.finalize(0.01)


def test_accumulator_rejects_wrong_shape():
    acc = GaussianAccumulator(ACC_P, ACC_K)
    with pytest.raises(ValueError):
        acc.update(np.zeros((2, ACC_P, ACC_K + 1), dtype=np.float32))


# -- embeddings --------------------------------------------------------------------------------
def random_features(grids, seed, channels=R18_CHANNELS, count=2):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((count, c, g, g)).astype(np.float32)
            for c, g in zip(channels, grids, strict=True)]


def concatenated(feats):
    """Explicit [f1; up(f2); up(f3)] with Paddle's nearest F.interpolate onto f1's grid, (N, F, h, w)."""
    side = feats[0].shape[2]
    parts = []
    with paddle.no_grad():
        for f in feats:
            parts.append(F.interpolate(paddle.to_tensor(f), size=[side, side], mode="nearest").numpy())
    return np.concatenate(parts, axis=1)


def run_layer(layer, feats):
    with paddle.no_grad():
        return layer([paddle.to_tensor(f) for f in feats]).numpy()


@pytest.mark.parametrize("grids", [(16, 8, 4), (25, 13, 7), (8, 4, 2)])
def test_projected_embedding_equals_explicit_formula(grids):
    feats = random_features(grids, seed=grids[0])
    weight = semi_orthogonal(sum(R18_CHANNELS), 12, np.random.default_rng(1))
    z = run_layer(ProjectedEmbedding(weight, R18_CHANNELS, grids), feats)
    cat = concatenated(feats).astype(np.float64)
    expected = np.einsum("nfhw,fk->nkhw", cat, weight)
    assert z.shape == (2, 12, grids[0], grids[0])
    rel_close(z, expected, 1e-5)


@pytest.mark.parametrize("grids", [(16, 8, 4), (25, 13, 7)])
@pytest.mark.parametrize(
    "index",
    [
        np.sort(np.random.default_rng(0).choice(448, size=20, replace=False)),
        np.array([0, 5, 63, 64, 191, 192, 447]),  # both ends of every block
        np.array([3, 200, 300]),  # nothing from layer2
        np.array([100, 150]),  # layer2 only
    ],
)
def test_channel_subset_equals_indexed_concatenation(grids, index):
    feats = random_features(grids, seed=7)
    z = run_layer(ChannelSubset(index, R18_CHANNELS, grids), feats)
    np.testing.assert_array_equal(z, concatenated(feats)[:, index])


# -- models: fitting ---------------------------------------------------------------------------
def stats(model):
    return model.mean.astype(np.float64), model.inv_cov.astype(np.float64)


def assert_same_fit(a, b, rtol=1e-5):
    mean_a, inv_a = stats(a)
    mean_b, inv_b = stats(b)
    rel_close(mean_a, mean_b, rtol)
    rel_close(inv_a, inv_b, rtol)


@pytest.mark.parametrize(("method", "k"), [("padim", 40), ("ortho", 72)])
def test_fitted_statistics_equal_float64_reference(method, k):
    """mean / inv_cov of a fit equal plain float64 numpy on the same embedding z (ortho with
    k >= 64 fits in another basis: the statistics are turned back into z's)."""
    data = images(40, seed=12)
    model = new_model(method, k=k).fit([data[:13], data[13:]])
    assert (model.fit_basis() is not None) == (method == "ortho")
    with paddle.no_grad():
        z = model.embedding()(model.trunk(paddle.to_tensor(data))).numpy().astype(np.float64)
    z = z.reshape(len(data), k, -1).transpose(0, 2, 1)  # (N, P, k)
    mean = z.mean(axis=0)
    diff = z - mean
    cov = np.einsum("npi,npj->pij", diff, diff) / (len(data) - 1) + model.options.eps * np.eye(k)
    rel_close(model.mean, mean, 1e-5)
    rel_close(model.inv_cov, np.linalg.inv(cov), 1e-5)


def test_fit_does_not_depend_on_batch_size(train_images, fitted):
    method = fitted.config.method
    sizes = [1, 5, 7, 11]
    bounds = np.cumsum([0, *sizes])
    batches = [train_images[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    streamed = new_model(method).fit(batches)
    assert streamed.n_train == fitted.n_train == 24
    assert streamed.mean.shape == (16 * 16, K) and streamed.inv_cov.shape == (16 * 16, K, K)
    assert_same_fit(streamed, fitted)


def test_fit_accepts_loader_dicts(fitted, train_images):
    method = fitted.config.method
    batches = [{"images": train_images[:10], "paths": [f"a{i}.png" for i in range(10)]},
               {"images": train_images[10:], "paths": [f"b{i}.png" for i in range(14)]}]
    assert_same_fit(new_model(method).fit(batches), fitted)


def test_fit_with_inference_runtime_matches_dynamic(fitted, train_images):
    model = new_model(fitted.config.method, runtime=Runtime(engine="inference"))
    model.fit([train_images[:13], train_images[13:]])
    rel_close(model.mean, fitted.mean, 1e-4)
    z_dyn = np.concatenate([z for _, z in fitted.embed(train_images[:3])])
    z_inf = np.concatenate([z for _, z in model.embed(train_images[:3])])
    rel_close(z_inf, z_dyn, 1e-4)


# -- models: scoring ---------------------------------------------------------------------------
def reference_rows(model, x):
    """z (N, P, k) float64 from the eager trunk and the explicit embedding of the paper."""
    with paddle.no_grad():
        feats = [f.numpy().astype(np.float64) for f in model.trunk(paddle.to_tensor(x))]
    side = feats[0].shape[2]
    cat = np.concatenate([f.repeat(side // f.shape[2], axis=2).repeat(side // f.shape[3], axis=3)
                          for f in feats], axis=1)
    if model.config.method == "ortho":
        z = np.einsum("nfhw,fk->nkhw", cat, model.weight)
    else:
        z = cat[:, model.channels]
    n, k = z.shape[:2]
    return z.reshape(n, k, side * side).transpose(0, 2, 1)


@pytest.mark.parametrize(("method", "k"), [("ortho", 8), ("ortho", 72), ("padim", 8)])
def test_statistics_equal_mean_and_covariance_of_the_paper_embedding(method, k, train_images):
    # With k >= 64, ortho fits in another basis (layer1 added without a GEMM); the stored
    # statistics must still be those of z = W^T x.
    model = new_model(method, k=k).fit([train_images])
    assert (getattr(model, "basis", None) is not None) == (method == "ortho" and k >= 64)
    rows = reference_rows(model, train_images)
    np.testing.assert_allclose(model.mean, rows.mean(axis=0), rtol=1e-4, atol=1e-4)
    eye = np.eye(k)
    for p in (0, 7, rows.shape[1] - 1):
        cov = np.cov(rows[:, p].T, ddof=1) + model.options.eps * eye
        rel_close(model.inv_cov[p], np.linalg.inv(cov), 1e-3)


def test_identity_first_basis_makes_layer1_block_the_identity():
    weight = semi_orthogonal(448, 100, np.random.default_rng(5))
    basis = identity_first_basis(weight, 64)
    fitted_weight = weight @ basis.T
    np.testing.assert_allclose(fitted_weight[:64], np.eye(64, 100), atol=1e-10)
    assert np.linalg.cond(basis) < 1e3
    assert identity_first_basis(weight[:, :50], 64) is None


def reference_scores(model, x):
    """Slow numpy pipeline from the model's parts: eager trunk, explicit embedding, Mahalanobis,
    scipy bilinear zoom (half-pixel centres) and scipy Gaussian filter, max over the map."""
    rows = reference_rows(model, x)
    n, side = len(x), int(np.sqrt(rows.shape[1]))
    diff = rows - model.mean.astype(np.float64)[None]
    dist = np.sqrt(np.einsum("npi,pij,npj->np", diff, model.inv_cov.astype(np.float64), diff))
    dist = dist.reshape(n, side, side)
    size = model.config.image_size
    maps = np.stack([
        ndimage.gaussian_filter(
            ndimage.zoom(d, size / side, order=1, grid_mode=True, mode="nearest"),
            model.config.sigma, mode="reflect")
        for d in dist
    ])
    return maps, maps.max(axis=(1, 2))


def test_score_equals_numpy_reference(fitted, test_images):
    maps, scores = fitted.score(test_images)
    assert maps.shape == (4, SIZE, SIZE) and scores.shape == (4,)
    assert maps.dtype == scores.dtype == np.float32
    ref_maps, ref_scores = reference_scores(fitted, test_images)
    rel_close(maps, ref_maps, 1e-4)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-4)
    np.testing.assert_array_equal(scores, maps.max(axis=(1, 2)))
    # the test images are not all alike: the reference is not trivially met by a constant
    assert np.ptp(ref_scores) > 0.05 * ref_scores.max()


def test_training_images_score_lower_than_altered_ones(fitted, train_images):
    altered = train_images[:4] * 3.0
    assert (fitted.score(altered)[1] > fitted.score(train_images[:4])[1]).all()


def test_inference_runtime_scores_match_dynamic(fitted, test_images, tmp_path):
    assert_served_matches_dynamic(fitted, test_images, tmp_path)


def test_calibrate_takes_highest_out_of_fold_score(fitted, train_images, tmp_path):
    method = fitted.config.method
    model = new_model(method).fit([train_images[:10], train_images[10:]])
    threshold = model.calibrate([train_images[:7], train_images[7:]])
    # without paths, image i of the fit is in fold i % 2 and is scored by the other fold's Gaussian
    even = new_model(method).fit([train_images[0::2]])
    odd = new_model(method).fit([train_images[1::2]])
    expected = max(odd.score(train_images[0::2])[1].max(), even.score(train_images[1::2])[1].max())
    assert model.threshold == threshold
    np.testing.assert_allclose(threshold, expected, rtol=1e-5)
    in_sample = model.score(train_images)[1].max()
    assert threshold > in_sample  # out-of-fold scores of training images are higher
    # a loaded checkpoint has no folds: the full model scores the calibration images
    path = str(tmp_path / "m.npz")
    model.save(path)
    loaded = load_model(path, runtime=dynamic())
    assert loaded.threshold == threshold
    np.testing.assert_allclose(loaded.calibrate([train_images]), in_sample, rtol=1e-6)


def named_batches(images_, cut=10):
    """Loader-like batches of ``images_`` with paths ``good/000.png`` ... (two batches)."""
    names = [f"good/{i:03d}.png" for i in range(len(images_))]
    return names, [{"images": images_[:cut], "paths": names[:cut]},
                   {"images": images_[cut:], "paths": names[cut:]}]


def counting_embed(model, monkeypatch):
    """Make ``model.embed`` count the images it embeds; returns the list of counts."""
    counts, original = [], model.embed
    monkeypatch.setattr(model, "embed", lambda x: (counts.append(len(x)), original(x))[1])
    return counts


@pytest.mark.parametrize("method", METHODS)
def test_calibration_from_kept_features_equals_embedding_again(method, train_images, monkeypatch):
    names, batches = named_batches(train_images)
    plain = new_model(method).fit(batches)
    expected = np.sort(np.concatenate(list(plain.calibration_scores(batches))))
    model = new_model(method)
    model.keep_for_calibration(names[3:20])  # the others are embedded again by the threshold
    model.fit(batches)
    counts = counting_embed(model, monkeypatch)
    scores = np.sort(np.concatenate(list(model.calibration_scores(batches))))
    np.testing.assert_allclose(scores, expected, rtol=1e-5)
    assert sum(counts) == 24 - 17
    assert model._kept is None  # the temporary file is gone once the threshold is set
    # a second calibration (nothing kept any more) embeds every image and agrees
    counts.clear()
    np.testing.assert_allclose(np.sort(np.concatenate(list(model.calibration_scores(batches)))),
                               expected, rtol=1e-5)
    assert sum(counts) == 24


def test_kept_features_fall_back_to_embedding_when_the_disk_fails(train_images, monkeypatch, capsys):
    names, batches = named_batches(train_images)
    expected = new_model("ortho").fit(batches).calibrate(batches)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gaussian_model.tempfile, "TemporaryFile", full_disk)
    model = new_model("ortho")
    model.keep_for_calibration(names)
    model.fit(batches)
    assert "could not be kept on disk" in capsys.readouterr().err
    counts = counting_embed(model, monkeypatch)
    np.testing.assert_allclose(model.calibrate(batches), expected, rtol=1e-5)
    assert sum(counts) == 24


def test_train_category_runs_the_backbone_once_per_image(demo_root, tmp_path, monkeypatch):
    """The threshold's calibration images are scored from the fit pass's features."""
    plan = FitPlan(DataPlan(demo_root, Preprocess(64), batch_size=3, num_workers=0),
                   config("padim"), tmp_path, calib_images=5)
    embedded = []
    original = GaussianModel.embed

    def embed(self, x):
        embedded.append(len(x))
        return original(self, x)

    monkeypatch.setattr(GaussianModel, "embed", embed)
    model = fit_category(plan, "tiles", dynamic())
    assert sum(embedded) == model.n_train == 8
    monkeypatch.setattr(GaussianModel, "embed", original)
    again = new_model("padim").fit(plan.data.loader(list_samples(demo_root, "tiles", "train")))
    picked = calibration_indices(8, 5)
    loader = plan.data.loader(list_samples(demo_root, "tiles", "train"), picked)
    np.testing.assert_allclose(model.threshold, again.calibrate(loader), rtol=1e-5)


@pytest.mark.bad_input
def test_score_before_fit_is_an_error():
    with pytest.raises(ConfigError, match="the model is not fitted yet"):
        new_model("padim").score(images(1, seed=0))


# -- models: checkpoints -----------------------------------------------------------------------
def test_save_load_gives_identical_scores(fitted, test_images, train_images, tmp_path):
    model = new_model(fitted.config.method).fit([train_images])
    threshold = model.calibrate([train_images[:5], train_images[5:]])
    model.category = "bottle"
    path = str(tmp_path / "sub" / "model.npz")
    model.save(path)
    loaded = load_model(path, runtime=dynamic())
    assert type(loaded) is type(model)
    assert loaded.config == model.config
    assert loaded.fitted and loaded.threshold == threshold and loaded.category == "bottle"
    assert loaded.n_train == 24
    np.testing.assert_array_equal(random_parts(loaded), random_parts(model))
    np.testing.assert_array_equal(loaded.mean, model.mean)
    np.testing.assert_array_equal(loaded.inv_cov, model.inv_cov)
    for name, value in model.trunk.weight_arrays().items():
        np.testing.assert_array_equal(loaded.trunk.weight_arrays()[name], value, err_msg=name)
    maps, scores = model.score(test_images)
    maps_loaded, scores_loaded = loaded.score(test_images)
    np.testing.assert_array_equal(maps_loaded, maps)
    np.testing.assert_array_equal(scores_loaded, scores)
    assert not [f for f in os.listdir(tmp_path / "sub") if "tmp" in f]  # no temporary left over


@pytest.mark.parametrize("method", METHODS)
def test_fit_state_checkpoint_resumes(method, train_images, test_images, tmp_path):
    partial = new_model(method)
    partial.partial_fit(train_images[:10])
    partial.partial_fit(train_images[10:15])
    path = str(tmp_path / "state.npz")
    partial.save(path)
    resumed = load_model(path, runtime=dynamic())
    assert not resumed.fitted and resumed.n_train == 15
    with pytest.raises(ConfigError):
        resumed.score(test_images)
    resumed.partial_fit(train_images[15:])
    resumed.finalize()
    whole = new_model(method).fit([train_images])
    assert resumed.n_train == 24
    assert_same_fit(resumed, whole)
    rel_close(resumed.score(test_images)[0], whole.score(test_images)[0], 1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_merge_of_disjoint_halves_equals_full_fit(method, train_images, test_images):
    first, second = new_model(method), new_model(method)
    first.partial_fit(train_images[:11])
    second.partial_fit(train_images[11:])
    first.merge(second)
    first.finalize()
    whole = new_model(method).fit([train_images])
    assert first.n_train == 24
    assert_same_fit(first, whole)
    rel_close(first.score(test_images)[0], whole.score(test_images)[0], 1e-5)


def test_merge_refuses_other_seed_or_config():
    model = new_model("ortho")
    with pytest.raises(CheckpointError):
        model.merge(new_model("ortho", seed=1))
    with pytest.raises(CheckpointError):
        model.merge(new_model("ortho", k=K + 1))


@pytest.mark.parametrize("method", METHODS)
def test_builds_are_deterministic_per_seed(method):
    a, b, c = new_model(method), new_model(method), new_model(method, seed=1)
    np.testing.assert_array_equal(random_parts(a), random_parts(b))
    weights_a, weights_b, weights_c = (m.trunk.weight_arrays() for m in (a, b, c))
    assert weights_a.keys() == weights_b.keys() == weights_c.keys()
    for name in weights_a:
        np.testing.assert_array_equal(weights_a[name], weights_b[name], err_msg=name)
    assert not np.array_equal(random_parts(a), random_parts(c))
    conv = "stem.0.weight"
    assert not np.array_equal(weights_a[conv], weights_c[conv])
    if method == "padim":
        assert len(np.unique(a.channels)) == K and (np.diff(a.channels) > 0).all()
        assert a.channels.min() >= 0 and a.channels.max() < sum(R18_CHANNELS)
    else:
        assert a.weight.shape == (sum(R18_CHANNELS), K)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, train_images):
    """A fitted ortho checkpoint on disk (path as str)."""
    path = str(tmp_path_factory.mktemp("ckpt") / "ortho.npz")
    new_model("ortho").fit([train_images]).save(path)
    return path


@pytest.mark.parametrize(
    ("key", "value"),
    [("method", "padim"), ("arch", "resnet50"), ("k", K + 1), ("image_size", 128), ("resize", 72)],
)
@pytest.mark.bad_input
def test_load_model_checks_expected_identity(checkpoint, key, value):
    expect = config("ortho").identity()
    expect[key] = value
    with pytest.raises(CheckpointError) as info:
        load_model(checkpoint, expect=expect, runtime=dynamic())
    assert str(info.value).startswith(f"{checkpoint}: checkpoint has ")
    assert f"{key}={value}" in str(info.value) and "was asked for" in str(info.value)


def test_load_model_accepts_matching_identity(checkpoint):
    model = load_model(checkpoint, expect=config("ortho"), runtime=dynamic())
    assert model.config.identity() == config("ortho").identity()
    model = load_model(checkpoint, expect=config("ortho").identity(), runtime=dynamic())
    assert model.fitted


def rewrite_npz(src, dst, drop=(), meta_update=None):
    """Copy a checkpoint leaving out ``drop`` arrays and changing meta fields."""
    import json

    with np.load(src, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files if name not in drop}
    meta = json.loads(str(arrays["__meta__"]))
    meta.update(meta_update or {})
    arrays["__meta__"] = np.array(json.dumps(meta))
    np.savez(dst, **arrays)


DAMAGE_MESSAGES = {
    **dict.fromkeys(["empty", "truncated_half", "truncated_tail", "garbage", "flipped_bytes", "no_meta"],
                    "not a readable checkpoint ("),
    "format_2": "checkpoint format 2 but this version reads 1",
    "no_mean": "has no array mean",
    "no_trunk_tensor": "has no weights for 1 resnet18 trunk tensors",
    "unknown_method": "unknown method 'knn' in checkpoint",
    "missing": "checkpoint not found",
}


@pytest.mark.parametrize(
    "damage",
    ["empty", "truncated_half", "truncated_tail", "garbage", "flipped_bytes", "no_meta", "format_2",
     "no_mean", "no_trunk_tensor", "unknown_method", "missing"],
)
@pytest.mark.bad_input
def test_damaged_checkpoint_is_a_checkpoint_error(checkpoint, tmp_path, damage):
    path = str(tmp_path / f"{damage}.npz")
    blob = open(checkpoint, "rb").read()
    if damage == "empty":
        open(path, "wb").close()
    elif damage == "truncated_half":
        open(path, "wb").write(blob[: len(blob) // 2])
    elif damage == "truncated_tail":
        open(path, "wb").write(blob[:-10])
    elif damage == "garbage":
        open(path, "wb").write(np.random.default_rng(0).bytes(1000))
    elif damage == "flipped_bytes":
        middle = len(blob) // 2
        open(path, "wb").write(blob[:middle] + bytes(b ^ 0xFF for b in blob[middle : middle + 64])
                               + blob[middle + 64 :])
    elif damage == "no_meta":
        with np.load(checkpoint, allow_pickle=False) as data:
            np.savez(path, **{name: data[name] for name in data.files if name != "__meta__"})
    elif damage == "format_2":
        rewrite_npz(checkpoint, path, meta_update={"format_version": 2})
    elif damage == "no_mean":
        rewrite_npz(checkpoint, path, drop=("mean",))
    elif damage == "no_trunk_tensor":
        rewrite_npz(checkpoint, path, drop=("backbone.stem.0.weight",))
    elif damage == "unknown_method":
        rewrite_npz(checkpoint, path, meta_update={"method": "knn"})
    with pytest.raises(CheckpointError) as info:
        load_model(path, runtime=dynamic())
    assert str(info.value).startswith(f"{path}: {DAMAGE_MESSAGES[damage]}")


# -- models: bad inputs and arguments ----------------------------------------------------------
@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("engine", ["dynamic", "inference"])
@pytest.mark.bad_input
def test_non_finite_image_is_an_input_error_naming_its_path(train_images, engine, value):
    model = new_model("padim", runtime=Runtime(engine=engine))
    x = train_images[:4].copy()
    x[2, 1, 5, 7] = value
    paths = [f"train/good/{i:03d}.png" for i in range(4)]
    with pytest.raises(InputError) as info:
        model.fit([{"images": x, "paths": paths}])
    assert str(info.value).startswith(f"{paths[2]}: ") and "contain NaN or inf" in str(info.value)
    assert paths[0] not in str(info.value)


@pytest.mark.parametrize("where", ["stem_conv_nan", "layer3_bn_inf"])
@pytest.mark.bad_input
def test_non_finite_trunk_weights_are_refused_before_running(train_images, where):
    # A NaN stem weight would vanish in the ReLUs (features 0, scores silently wrong), so the
    # weights themselves are checked when the layers are compiled.
    model = new_model("ortho")
    trunk = model.trunk
    param = trunk.stem[0].weight if where == "stem_conv_nan" else trunk.stages[2][-1].bn2.bias
    param.set_value(np.full(param.shape, np.nan if where == "stem_conv_nan" else np.inf, dtype=np.float32))
    name = "stem.0.weight" if where == "stem_conv_nan" else "bn2.bias"
    with pytest.raises(CheckpointError, match=name) as info:
        model.partial_fit(train_images[:2], ["x/first.png", "x/second.png"])
    assert str(info.value).startswith("backbone weight ") and "contains NaN or inf" in str(info.value)


@pytest.mark.bad_input
def test_non_finite_features_are_an_input_error_naming_the_image(train_images, monkeypatch):
    model = new_model("padim")
    real = model.embed

    def poisoned(images):
        for part, z in real(images):
            z = z.copy()
            z[1, 3, 0] = np.inf
            yield part, z

    monkeypatch.setattr(model, "embed", poisoned)
    with pytest.raises(InputError, match="x/second.png"):
        model.partial_fit(train_images[:2], ["x/first.png", "x/second.png"])
    with pytest.raises(InputError, match="image 1 of the batch"):
        model.partial_fit(train_images[:2])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.bad_input
def test_k_larger_than_feature_channels_is_a_config_error(method):
    with pytest.raises(ConfigError, match="--k 449: resnet18 has 448 feature channels"):
        new_model(method, k=449)
    with pytest.raises(ConfigError):
        new_model(method, k=0)
    assert new_model(method, k=448).options.k == 448


@pytest.mark.bad_input
def test_unknown_method_or_arch_is_a_config_error():
    with pytest.raises(ConfigError, match="--method knn: choose one of"):
        new_model("knn")
    with pytest.raises(ConfigError):
        new_model("ortho", arch="resnet7")


# -- backbone ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trunk_file(tmp_path_factory):
    """(trunk, path): a resnet18 trunk from seed 3 and its paddle.save'd state dict."""
    paddle.seed(3)
    trunk = ResNetTrunk("resnet18", LAYERS)
    path = str(tmp_path_factory.mktemp("weights") / "r18.pdparams")
    paddle.save(trunk.state_dict(), path)
    return trunk, path


def test_read_pdparams_round_trips_paddle_save(trunk_file):
    trunk, path = trunk_file
    arrays = read_pdparams(path)
    own = trunk.state_dict()
    assert set(arrays) == set(own)
    for name, tensor in own.items():
        np.testing.assert_array_equal(arrays[name], tensor.numpy(), err_msg=name)


def test_build_trunk_loads_pdparams_path(trunk_file):
    trunk, path = trunk_file
    loaded = build_trunk("resnet18", LAYERS, path, seed=5)
    random = build_trunk("resnet18", LAYERS, "none", seed=5)
    expected = trunk.weight_arrays()
    got = loaded.weight_arrays()
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    assert not np.array_equal(random.weight_arrays()["stem.0.weight"], expected["stem.0.weight"])
    x = images(2, seed=4)
    with paddle.no_grad():
        for a, b in zip(trunk(paddle.to_tensor(x)), loaded(paddle.to_tensor(x)), strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy())


class _Exploit:
    """Pickles to a call of os.system: a weights file must never run it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _EvalExploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({self.marker!r}, 'w').close()",)


@pytest.mark.parametrize("exploit", [_Exploit, _EvalExploit])
@pytest.mark.bad_input
def test_read_pdparams_refuses_code_in_pickle(tmp_path, exploit):
    marker = tmp_path / "pwned"
    path = str(tmp_path / "evil.pdparams")
    payload = {"stem.0.weight": np.zeros(3, dtype=np.float32), "x": exploit(str(marker))}
    with open(path, "wb") as f:
        pickle.dump(payload, f, protocol=4)
    with pytest.raises(CheckpointError) as info:
        read_pdparams(path)
    assert str(info.value).startswith(f"{path}: not a plain Paddle state dict (")
    with pytest.raises(CheckpointError):
        build_trunk("resnet18", LAYERS, path, seed=0)
    assert not marker.exists()


@pytest.mark.bad_input
def test_read_pdparams_other_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match="weights file not found"):
        read_pdparams(str(tmp_path / "absent.pdparams"))
    listed = str(tmp_path / "list.pdparams")
    with open(listed, "wb") as f:
        pickle.dump([np.zeros(2)], f)
    with pytest.raises(CheckpointError, match="list"):
        read_pdparams(listed)
    truncated = str(tmp_path / "truncated.pdparams")
    with open(truncated, "wb") as f:
        f.write(pickle.dumps({"a": np.zeros(100)})[:40])
    with pytest.raises(CheckpointError):
        read_pdparams(truncated)


def save_arrays(path, arrays):
    paddle.save({name: paddle.to_tensor(value) for name, value in arrays.items()}, path)


@pytest.mark.parametrize("damage", ["wrong_shape", "missing", "nan"])
@pytest.mark.bad_input
def test_build_trunk_rejects_bad_weights(trunk_file, tmp_path, damage):
    trunk, _ = trunk_file
    arrays = trunk.weight_arrays()
    name = "stages.1.0.conv1.weight"
    if damage == "wrong_shape":
        arrays[name] = np.zeros((3, 3), dtype=np.float32)
    elif damage == "missing":
        del arrays[name]
    else:
        arrays[name] = np.full_like(arrays[name], np.nan)
    path = str(tmp_path / f"{damage}.pdparams")
    save_arrays(path, arrays)
    with pytest.raises(CheckpointError) as info:
        build_trunk("resnet18", LAYERS, path, seed=0)
    assert str(info.value).startswith(f"{path}: ") and name in str(info.value)
    assert {"wrong_shape": "has shape", "missing": "has no weights for",
            "nan": "contains NaN or inf"}[damage] in str(info.value)


@pytest.mark.parametrize("size", [64, 100, 224, 256])
def test_layer_grid_matches_trunk_output(size):
    paddle.seed(0)
    trunk = ResNetTrunk("resnet18", ("layer1", "layer2", "layer3", "layer4"))
    with paddle.no_grad():
        outs = trunk(paddle.zeros([1, 3, size, size]))
    for name, out, channels in zip(("layer1", "layer2", "layer3", "layer4"), outs, (64, 128, 256, 512),
                                   strict=True):
        side = layer_grid(size, name)
        assert tuple(out.shape) == (1, channels, side, side), (size, name)


def test_model_grid_and_embedding_at_non_multiple_size():
    # 100 px: grids 25, 13, 7; nearest resizing there is the non-integer gather path
    model = new_model("padim", k=12, image_size=100, resize=100)
    assert model.grid == (25, 25)
    z = np.concatenate([z for _, z in model.embed(images(2, seed=6, size=100))])
    with paddle.no_grad():
        feats = [f.numpy() for f in model.trunk(paddle.to_tensor(images(2, seed=6, size=100)))]
    cat = np.concatenate([f[:, :, nearest_indices(f.shape[2], 25)][:, :, :, nearest_indices(f.shape[3], 25)]
                          for f in feats], axis=1)
    expected = cat[:, model.channels].reshape(2, 12, 625).transpose(0, 2, 1)
    np.testing.assert_array_equal(z, expected)


def test_checkpoint_is_a_plain_npz(checkpoint):
    # a checkpoint opens as a zip of .npy members without pickles (allow_pickle=False in read)
    with zipfile.ZipFile(checkpoint) as archive:
        names = archive.namelist()
    assert "__meta__.npy" in names and "mean.npy" in names and "projection.npy" in names
    with np.load(checkpoint, allow_pickle=False) as data:
        assert data["projection"].shape == (sum(R18_CHANNELS), K)
