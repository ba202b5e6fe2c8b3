"""Paddle layers shared by the methods, written so that they export to static graphs.

Resizing and blurring are linear maps along each image axis, so they are precomputed as matrices
(or gather indices) and applied with ``matmul``/``index_select``. That gives the same numbers as
``F.interpolate`` + ``scipy.ndimage.gaussian_filter`` and runs under oneDNN in Paddle Inference,
where a PIR graph holding ``F.interpolate`` fails on Paddle 3.3.

Every op also traces under the legacy static IR (``@``, ``paddle.max`` and static_ops instead
of ``paddle.matmul``/``amax``/``sum``/``sqrt``), so the layers export to ``model.pdmodel`` as well
as to ``model.json``; ``paddle.max`` rather than ``amax`` also lets paddle2onnx convert the graph.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import paddle
from paddle import nn

from core.errors import ConfigError
from core.kernels import FACTOR_DTYPES, MAHALANOBIS_HEAD, check_precision, load_kernel, packed_tiles
from core.resample import bilinear_matrix, nearest_indices, smoothing_matrix
from models.components.static_ops import non_negative, reduce_sum, sqrt


class NearestResize(nn.Layer):
    """Nearest-neighbour resize of (N, C, h, w) maps to (N, C, H, W).

    Integer factors repeat each value with ``expand`` (cheapest under oneDNN); other sizes gather
    rows and columns with ``index_select``. Both equal ``F.interpolate(mode="nearest")``.
    """

    def __init__(self, size_in: tuple[int, int], size_out: tuple[int, int]) -> None:
        super().__init__()
        (h, w), (height, width) = size_in, size_out
        self.size_in, self.size_out = (h, w), (height, width)
        self.factors = (height // h, width // w) if height % h == 0 and width % w == 0 else None
        if self.factors is None:
            self.register_buffer("rows", paddle.to_tensor(nearest_indices(h, height)))
            self.register_buffer("cols", paddle.to_tensor(nearest_indices(w, width)))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if self.size_in == self.size_out:
            return x
        if self.factors is None:
            return paddle.index_select(paddle.index_select(x, self.rows, axis=2), self.cols, axis=3)
        (h, w), (fh, fw) = self.size_in, self.factors
        channels = x.shape[1]
        x = paddle.reshape(x, [-1, channels, h, 1, w, 1])
        x = paddle.expand(x, [-1, channels, h, fh, w, fw])
        return paddle.reshape(x, [-1, channels, h * fh, w * fw])


class ToRows(nn.Layer):
    """(N, k, h, w) maps -> (N, h*w, k) rows, the layout the Gaussian accumulator reads."""

    def forward(self, z: paddle.Tensor) -> paddle.Tensor:
        return paddle.transpose(paddle.flatten(z, start_axis=2), [0, 2, 1])


class SeparableResize(nn.Layer):
    """(N, C, h, w) maps -> (N, C, H, W) as ``rows @ X @ cols^T`` per map, ``rows`` (H, h) and
    ``cols`` (W, w) fixed matrices (a bilinear resize, a blur, or both).

    Both products are plain 2-D matmuls over the stacked maps: under oneDNN (Paddle 3.3) the
    broadcast ``rows @ X`` of a 2-D by a 4-D tensor gives NaN or crashes for batches of more than
    one image, and a PIR graph holding ``F.interpolate`` fails there.
    """

    def __init__(self, rows: np.ndarray, cols: np.ndarray) -> None:
        super().__init__()
        self.size_in = (rows.shape[1], cols.shape[1])
        self.size_out = (rows.shape[0], cols.shape[0])
        self.register_buffer("rows", paddle.to_tensor(rows), persistable=True)
        self.register_buffer("cols_t", paddle.to_tensor(np.ascontiguousarray(cols.T)), persistable=True)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        (h, w), (height, width) = self.size_in, self.size_out
        channels = x.shape[1]
        wide = paddle.reshape(x, [-1, w]) @ self.cols_t  # (N C h, W)
        wide = paddle.reshape(paddle.transpose(paddle.reshape(wide, [-1, h, width]), [1, 0, 2]), [h, -1])
        tall = paddle.reshape(self.rows @ wide, [height, -1, width])  # (H, N C, W)
        return paddle.reshape(paddle.transpose(tall, [1, 0, 2]), [-1, channels, height, width])


def bilinear_resize(size_in: tuple[int, int], size_out: tuple[int, int]) -> SeparableResize:
    """``F.interpolate(mode="bilinear", align_corners=False)`` from ``size_in`` to ``size_out`` as
    fixed matrices (exports under oneDNN)."""
    return SeparableResize(bilinear_matrix(size_in[0], size_out[0]).astype(np.float32),
                           bilinear_matrix(size_in[1], size_out[1]).astype(np.float32))


class SmoothUpsample(SeparableResize):
    """Bilinear upsampling of (N, 1, h, w) distance maps to (N, 1, H, W) followed by a Gaussian blur.

    Both steps are linear along each axis, so the layer computes ``A_h @ D @ A_w^T`` with
    ``A = blur @ bilinear`` of shape (H, h) and (W, w): one pair of small matmuls.
    """

    def __init__(self, size_in: tuple[int, int], size_out: tuple[int, int], sigma: float) -> None:
        super().__init__(smoothing_matrix(size_in[0], size_out[0], sigma),
                         smoothing_matrix(size_in[1], size_out[1], sigma))


def factor_blocks(inv_cov: np.ndarray, blocks: int) -> list[np.ndarray] | None:
    """Column blocks of the Cholesky factor L of each inverse covariance (inv = L L^T), lower part only.

    ``inv_cov`` (P, k, k). Block c covers columns [a, b) of L and holds rows a..k-1 only (above the
    diagonal L is zero): float32 (P, k - a, b - a). The squared distance is
    ``sum_c ||(z - mean)[a:] @ L_c||^2``; the blocks hold ``sum_c (k - a_c)(b_c - a_c)`` values per
    position instead of k^2 (3/4 of them for 2 blocks, see :func:`block_edges`), so a graph reads
    that much less memory.
    None if ``blocks`` is 0 or a matrix is not positive definite in float64 (its float32 rounding
    can be): the caller keeps the full matrices then.
    """
    if blocks < 1:
        return None
    positions, k = inv_cov.shape[:2]
    edges = block_edges(k, blocks)
    factors = [np.empty((positions, k - a, b - a), dtype=np.float32)
               for a, b in zip(edges[:-1], edges[1:], strict=True)]
    try:
        for start, part in _cholesky_slices(inv_cov):
            for factor, a, b in zip(factors, edges[:-1], edges[1:], strict=True):
                factor[start:start + len(part)] = part[:, a:, a:b]
    except np.linalg.LinAlgError:
        return None
    return factors


def _cholesky_slices(inv_cov: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(first position, float64 lower Cholesky factors (S, k, k)) of ``inv_cov`` (P, k, k), a slice
    of positions at a time (float64 temporaries of one slice only); LinAlgError if one has none."""
    for start in range(0, inv_cov.shape[0], _SLICE):
        yield start, np.linalg.cholesky(inv_cov[start:start + _SLICE].astype(np.float64))


def block_edges(k: int, blocks: int) -> list[int]:
    """Column edges [0, ..., k] of ``blocks`` equal-width column blocks of a k x k factor.

    Equal widths store the fewest values: k^2 (blocks + 1) / (2 blocks) per position.
    """
    return sorted({int(e) for e in np.linspace(0, k, min(blocks, k) + 1).round()})


_SLICE = 256  # positions per float64 Cholesky slice
FACTOR_BLOCKS = 2
"""Column blocks of the packed Cholesky factor: 2 reads 3/4 of the full matrices' bytes with one
extra matmul; more blocks read less but each small matmul costs a oneDNN call (measured in
docs/benchmarks.md)."""


class MahalanobisMap(nn.Layer):
    """Distance of every position's feature to that position's Gaussian.

    ``mean`` (P, k) and ``inv_cov`` (P, k, k) with P = h * w; ``forward(z)`` takes (N, k, h, w) and
    returns sqrt((z - mean)^T inv_cov (z - mean)) as (N, 1, h, w), computed as ||(z - mean) @ L||
    from the lower-triangular column blocks of :func:`factor_blocks` (or from ``inv_cov`` itself if
    ``blocks`` is 0 or a matrix has no Cholesky factor). ``kernel=True`` computes it instead with
    the compiled CPU operator of core/csrc/mahalanobis_head.cc over :func:`core.kernels.packed_tiles` of the
    whole factor: one op reading k(k+1)/2 values per position (CPU only), stored as ``precision``
    (a key of core.kernels.FACTOR_DTYPES, see :func:`stored_factor`).
    """

    def __init__(self, mean: np.ndarray, inv_cov: np.ndarray, grid: tuple[int, int],
                 blocks: int = FACTOR_BLOCKS, kernel: bool = False, precision: str = "fp32") -> None:
        super().__init__()
        self.grid = tuple(grid)
        self.k = mean.shape[1]
        self.starts: list[int] = []
        if kernel:  # pack first: a matrix without a factor is refused before the ~25 s build
            factor_tiles = stored_factor(packed_tiles(packed_factor(inv_cov)), precision)
            self.op = getattr(load_kernel(MAHALANOBIS_HEAD), MAHALANOBIS_HEAD)
            self.register_buffer("mean_tiles", paddle.to_tensor(packed_tiles(mean)), persistable=True)
            self.register_buffer("factor_tiles", factor_tiles, persistable=True)
            return
        self.op = None
        self.register_buffer("mean", paddle.to_tensor(mean.astype(np.float32)), persistable=True)
        factors = factor_blocks(inv_cov, blocks)
        self.starts = [] if factors is None else [inv_cov.shape[-1] - f.shape[1] for f in factors]
        if factors is None:
            self.register_buffer("inv_cov", paddle.to_tensor(inv_cov.astype(np.float32)), persistable=True)
        for index, factor in enumerate(factors or []):
            self.register_buffer(f"factor{index}", paddle.to_tensor(factor), persistable=True)

    def forward(self, z: paddle.Tensor) -> paddle.Tensor:
        k = self.k
        h, w = self.grid
        if self.op is not None:  # the operator reads plain row-major features, not oneDNN's blocked ones
            dist = self.op(paddle.reshape(z, [-1, k, h * w]), self.mean_tiles, self.factor_tiles)
            return paddle.reshape(dist, [-1, 1, h, w])
        diff = paddle.transpose(paddle.reshape(z, [-1, k, h * w]), [2, 0, 1]) - self.mean.unsqueeze(1)
        if not self.starts:
            squared = reduce_sum((diff @ self.inv_cov) * diff, axis=2)  # (P, N)
        for index, start in enumerate(self.starts):
            y = diff[:, :, start:] @ getattr(self, f"factor{index}")  # (P, N, block)
            part = reduce_sum(y * y, axis=2)
            squared = part if index == 0 else squared + part
        dist = sqrt(non_negative(squared))  # rounding can make squared < 0; NaN stays NaN
        return paddle.reshape(paddle.transpose(dist, [1, 0]), [-1, 1, h, w])


def packed_factor(inv_cov: np.ndarray) -> np.ndarray:
    """The lower Cholesky factor L of each inverse covariance (inv = L L^T), packed column by column.

    ``inv_cov`` (P, k, k) -> float32 (P, k(k+1)/2): L[j, j], L[j+1, j], ..., L[k-1, j] for j = 0..k-1.
    A matrix without a float64 Cholesky factor raises ConfigError (the matmul head takes it).
    """
    positions, k = inv_cov.shape[:2]
    rows, cols = np.tril_indices(k)
    order = np.lexsort((rows, cols))  # column-major: by column, then row
    rows, cols = rows[order], cols[order]
    packed = np.empty((positions, rows.size), dtype=np.float32)
    try:
        for start, part in _cholesky_slices(inv_cov):
            packed[start:start + len(part)] = part[:, rows, cols]
    except np.linalg.LinAlgError as exc:
        raise ConfigError("--head kernel: an inverse covariance has no Cholesky factor (not "
                          "positive definite in float64); export with --head matmul") from exc
    return packed


FLOAT16_MAX = float(np.finfo(np.float16).max)
"""Largest finite float16 (65,504)."""


def stored_factor(tiles: np.ndarray, precision: str) -> paddle.Tensor:
    """Packed factor tiles float32 (T, k(k+1)/2, 8) as the tensor the compiled head reads: the same
    shape in ``precision``'s dtype.

    16-bit values are rounded to nearest, ties to even, here in numpy, so they do not depend on how
    a Paddle version's cast rounds (the cast then only relabels values that fit exactly): relative
    error up to 2^-11 (float16) or 2^-8 (bfloat16). float16 keeps 3 more bits but only magnitudes
    up to 65,504, so a factor beyond that is refused.
    """
    check_precision(precision)
    if precision == "fp32":
        return paddle.to_tensor(tiles)
    if precision == "fp16":
        largest = max(float(tiles.max(initial=0.0)), -float(tiles.min(initial=0.0)))
        if not largest <= FLOAT16_MAX:
            raise ConfigError(f"--head_precision fp16: the Cholesky factor holds values up to "
                              f"{largest:.3g}, beyond float16's {FLOAT16_MAX:.0f}; export with "
                              "--head_precision bf16 or fp32")
        return paddle.to_tensor(tiles.astype(np.float16))
    bits = np.array(tiles, dtype=np.float32).view(np.uint32)  # one copy, rounded in place
    carry = bits >> 16
    carry &= np.uint32(1)  # ties to even: add 0x8000 when bit 16 is set, 0x7FFF when not
    carry += np.uint32(0x7FFF)
    bits += carry
    del carry
    bits &= np.uint32(0xFFFF0000)
    return paddle.to_tensor(bits.view(np.float32)).astype(FACTOR_DTYPES[precision])


class AnomalyMapHead(nn.Layer):
    """Distance map (N, 1, h, w) -> smoothed anomaly map (N, 1, H, W) and image score (N,) = its max."""

    def __init__(self, grid: tuple[int, int], image_size: tuple[int, int], sigma: float) -> None:
        super().__init__()
        self.smooth = SmoothUpsample(grid, image_size, sigma)

    def forward(self, dist: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        amap = self.smooth(dist)
        return amap, paddle.max(amap, axis=[1, 2, 3])
