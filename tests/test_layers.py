"""Tests of the layers and core.resample against Paddle's ops, scipy.ndimage and numpy loops."""

from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from scipy import ndimage

from core.resample import bilinear_matrix, gaussian_blur_matrix, nearest_indices
from models.components.layers import (
    AnomalyMapHead,
    MahalanobisMap,
    NearestResize,
    SmoothUpsample,
    ToRows,
    block_edges,
)

# (size_in, size_out) pairs: integer factors, non-integer up-sizing and down-sizing
NEAREST_SIZES = [(8, 16), (4, 16), (7, 16), (5, 13), (13, 16), (16, 7), (25, 25)]


def random_maps(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def paddle_interpolate(x, size, mode):
    """Reference: Paddle's own F.interpolate on a numpy array (align_corners=False)."""
    with paddle.no_grad():
        out = F.interpolate(paddle.to_tensor(x), size=list(size), mode=mode, align_corners=False)
    return out.numpy()


# -- nearest -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("size_in", "size_out"), NEAREST_SIZES)
def test_nearest_indices_equal_paddle_interpolate(size_in, size_out):
    x = random_maps((2, 3, size_in, size_in), seed=size_in * 100 + size_out)
    expected = paddle_interpolate(x, (size_out, size_out), "nearest")
    index = nearest_indices(size_in, size_out)
    assert index.dtype == np.int64 and index.shape == (size_out,)
    assert index.min() >= 0 and index.max() < size_in
    np.testing.assert_array_equal(x[:, :, index][:, :, :, index], expected)


def test_nearest_indices_hand_computed():
    # floor(i * 5 / 13) for i = 0..12
    np.testing.assert_array_equal(nearest_indices(5, 13), [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 4, 4])
    np.testing.assert_array_equal(nearest_indices(4, 8), [0, 0, 1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(nearest_indices(8, 4), [0, 2, 4, 6])


@pytest.mark.parametrize(
    ("size_in", "size_out"),
    [*[((a, a), (b, b)) for a, b in NEAREST_SIZES], ((4, 8), (16, 16)), ((7, 5), (16, 13))],
)
def test_nearest_resize_equals_paddle_interpolate(size_in, size_out):
    x = random_maps((2, 5, *size_in), seed=1)
    layer = NearestResize(size_in, size_out)
    integer = size_out[0] % size_in[0] == 0 and size_out[1] % size_in[1] == 0
    assert (layer.factors is not None) == integer
    with paddle.no_grad():
        out = layer(paddle.to_tensor(x)).numpy()
    assert out.shape == (2, 5, *size_out)
    np.testing.assert_array_equal(out, paddle_interpolate(x, size_out, "nearest"))


# -- bilinear ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("size_in", "size_out"), [(16, 64), (7, 20), (8, 32), (20, 7), (64, 16), (13, 13)])
def test_bilinear_matrix_equals_paddle_interpolate(size_in, size_out):
    x = random_maps((2, 3, size_in, size_in), seed=size_in + size_out)
    mat = bilinear_matrix(size_in, size_out)
    assert mat.shape == (size_out, size_in)
    np.testing.assert_allclose(mat.sum(axis=1), 1.0, atol=1e-12)  # interpolation preserves constants
    ours = np.einsum("ip,ncpq,jq->ncij", mat, x.astype(np.float64), mat)
    expected = paddle_interpolate(x, (size_out, size_out), "bilinear")
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_bilinear_matrix_non_square_axes():
    x = random_maps((1, 2, 7, 16), seed=3)
    rows, cols = bilinear_matrix(7, 20), bilinear_matrix(16, 64)
    ours = np.einsum("ip,ncpq,jq->ncij", rows, x.astype(np.float64), cols)
    np.testing.assert_allclose(ours, paddle_interpolate(x, (20, 64), "bilinear"), rtol=1e-5, atol=1e-5)


def test_bilinear_matrix_hand_computed():
    # 2 -> 4 with half-pixel centres: sources -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1)
    expected = np.array([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
    np.testing.assert_allclose(bilinear_matrix(2, 4), expected, atol=1e-15)


# -- Gaussian blur -----------------------------------------------------------------------------
@pytest.mark.parametrize("size", [1, 2, 5, 16, 17, 33, 64])
@pytest.mark.parametrize("sigma", [4.0, 1.5])
def test_gaussian_blur_matrix_equals_scipy(size, sigma):
    # sigma 4 has radius 16, so sizes up to 16 need several reflections of the line
    vectors = np.random.default_rng(size).standard_normal((3, size))
    mat = gaussian_blur_matrix(size, sigma)
    assert mat.shape == (size, size)
    np.testing.assert_allclose(mat.sum(axis=1), 1.0, atol=1e-12)
    for v in vectors:
        expected = ndimage.gaussian_filter1d(v, sigma, mode="reflect")
        np.testing.assert_allclose(mat @ v, expected, rtol=1e-10, atol=1e-12)


def test_gaussian_blur_matrix_truncate():
    v = np.random.default_rng(7).standard_normal(40)
    mat = gaussian_blur_matrix(40, 2.0, truncate=2.0)
    np.testing.assert_allclose(mat @ v, ndimage.gaussian_filter1d(v, 2.0, truncate=2.0, mode="reflect"),
                               rtol=1e-10, atol=1e-12)
    # radius int(2 * 2 + 0.5) = 4: row 20 reaches columns 16..24 only
    assert np.count_nonzero(mat[20]) == 9


# -- SmoothUpsample / AnomalyMapHead -----------------------------------------------------------
def smooth_reference(x, size_out, sigma):
    """F.interpolate bilinear, then scipy's Gaussian filter over the two image axes, in float64."""
    up = paddle_interpolate(x, size_out, "bilinear").astype(np.float64)
    return ndimage.gaussian_filter(up, sigma=(0, 0, sigma, sigma), mode="reflect")


@pytest.mark.parametrize(
    ("size_in", "size_out", "sigma"),
    [((16, 16), (64, 64), 4.0), ((8, 8), (32, 32), 4.0), ((7, 7), (20, 20), 2.0), ((16, 8), (64, 32), 4.0)],
)
def test_smooth_upsample_equals_interpolate_then_gaussian_filter(size_in, size_out, sigma):
    x = np.abs(random_maps((3, 1, *size_in), seed=5)) + 1.0  # distance maps are positive
    layer = SmoothUpsample(size_in, size_out, sigma)
    with paddle.no_grad():
        out = layer(paddle.to_tensor(x)).numpy()
    expected = smooth_reference(x, size_out, sigma)
    assert out.shape == expected.shape == (3, 1, *size_out)
    np.testing.assert_allclose(out, expected, rtol=1e-5)


def test_anomaly_map_head_score_is_map_maximum():
    x = np.abs(random_maps((4, 1, 16, 16), seed=6))
    x[2, 0, 3, 11] += 25.0  # one hot spot
    head = AnomalyMapHead((16, 16), (64, 64), 4.0)
    with paddle.no_grad():
        amap, score = (t.numpy() for t in head(paddle.to_tensor(x)))
    np.testing.assert_allclose(amap, smooth_reference(x, (64, 64), 4.0), rtol=1e-5)
    assert score.shape == (4,)
    np.testing.assert_array_equal(score, amap.max(axis=(1, 2, 3)))
    assert int(np.argmax(score)) == 2
    # the hot spot at grid (3, 11) lands near pixel (3.5 * 4, 11.5 * 4) after upsampling
    row, col = np.unravel_index(np.argmax(amap[2, 0]), (64, 64))
    assert abs(row - 14) <= 1 and abs(col - 46) <= 1


# -- Mahalanobis -------------------------------------------------------------------------------
def random_gaussians(positions, k, seed):
    rng = np.random.default_rng(seed)
    mean = rng.standard_normal((positions, k))
    factors = rng.standard_normal((positions, k, k))
    inv_cov = factors @ factors.transpose(0, 2, 1) / k + 0.5 * np.eye(k)
    return mean, inv_cov


@pytest.mark.parametrize(("grid", "k", "blocks"),
                         [((4, 4), 5, 2), ((3, 5), 8, 1), ((3, 5), 8, 3), ((2, 2), 7, 7), ((1, 1), 1, 2),
                          ((3, 5), 8, 0)])
def test_mahalanobis_map_equals_numpy_loop(grid, k, blocks):
    h, w = grid
    mean, inv_cov = random_gaussians(h * w, k, seed=k)
    z = random_maps((3, k, h, w), seed=k + 1)
    layer = MahalanobisMap(mean, inv_cov, grid, blocks=blocks)
    assert len(layer.starts) == min(k, blocks)  # factor blocks; 0 = the full matrices
    with paddle.no_grad():
        out = layer(paddle.to_tensor(z)).numpy()
    assert out.shape == (3, 1, h, w)
    mean32, inv32 = mean.astype(np.float32).astype(np.float64), inv_cov.astype(np.float32).astype(np.float64)
    expected = np.zeros((3, 1, h, w))
    for n in range(3):
        for i in range(h):
            for j in range(w):
                p = i * w + j  # positions are row-major over the grid
                d = z[n, :, i, j].astype(np.float64) - mean32[p]
                expected[n, 0, i, j] = np.sqrt(d @ inv32[p] @ d)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_mahalanobis_map_zero_at_mean_and_identity_is_euclidean():
    h, w, k = 2, 3, 4
    mean = random_maps((h * w, k), seed=9).astype(np.float64)
    layer = MahalanobisMap(mean, np.broadcast_to(np.eye(k), (h * w, k, k)).copy(), (h, w))
    at_mean = mean.T.reshape(1, k, h, w).astype(np.float32)
    offset = at_mean + np.float32(0.5)  # every position 0.5 away in each of k dims: distance 0.5 * sqrt(k)
    with paddle.no_grad():
        out = layer(paddle.to_tensor(np.concatenate([at_mean, offset]))).numpy()
    np.testing.assert_allclose(out[0], 0.0, atol=1e-6)
    np.testing.assert_allclose(out[1], 0.5 * np.sqrt(k), rtol=1e-6)


def test_mahalanobis_map_stores_only_the_factor_blocks():
    """k=100 in 2 blocks: columns 0-49 keep all 100 rows, columns 50-99 the last 50: 3/4 of k^2."""
    mean, inv_cov = random_gaussians(3, 100, seed=4)
    layer = MahalanobisMap(mean, inv_cov, (1, 3), blocks=2)
    shapes = [tuple(buf.shape) for name, buf in layer.named_buffers() if name.startswith("factor")]
    assert shapes == [(3, 100, 50), (3, 50, 50)]
    assert "inv_cov" not in dict(layer.named_buffers())
    assert block_edges(100, 4) == [0, 25, 50, 75, 100]
    assert block_edges(3, 5) == [0, 1, 2, 3]


def test_mahalanobis_map_without_a_cholesky_factor_uses_the_matrices():
    """A matrix that is not positive definite (a 0 eigenvalue) keeps the full-matrix formula."""
    mean = np.zeros((2, 2))
    inv_cov = np.array([np.eye(2), [[1.0, 1.0], [1.0, 1.0]]])
    layer = MahalanobisMap(mean, inv_cov, (1, 2))
    assert layer.starts == []
    z = np.array([[[[3.0, 1.0]], [[4.0, -1.0]]]], dtype=np.float32)  # (1, 2, 1, 2)
    with paddle.no_grad():
        out = layer(paddle.to_tensor(z)).numpy()
    np.testing.assert_allclose(out[0, 0, 0], [5.0, 0.0], atol=1e-6)  # |(3, 4)|; (1, -1) in the null space


# -- ToRows ------------------------------------------------------------------------------------
def test_to_rows_layout():
    n, k, h, w = 2, 3, 4, 5
    z = np.arange(n * k * h * w, dtype=np.float32).reshape(n, k, h, w)
    with paddle.no_grad():
        rows = ToRows()(paddle.to_tensor(z)).numpy()
    assert rows.shape == (n, h * w, k)
    for b in range(n):
        for i in range(h):
            for j in range(w):
                np.testing.assert_array_equal(rows[b, i * w + j], z[b, :, i, j])
    np.testing.assert_array_equal(rows, z.reshape(n, k, h * w).transpose(0, 2, 1))
