"""Streaming, mergeable Gaussian statistics: one Gaussian per feature-map position.

Features arrive image by image as (P, k) float32 rows and are copied, minus a per-position shift
``c``, into a block buffer (B, P, k). When the block is full its shifted sum and scatter are folded
into float64 totals (DSYRK per position, one triangle)::

    s1 += sum_b (z_b - c)          s2 += sum_b (z_b - c)(z_b - c)^T

``c`` is the mean of the first block, so the shifted values are centred and the sums lose no
precision to a large mean. The products stay float64: float32 ones (about 1e-7 relative each)
are amplified by the covariance's conditioning (max variance / eps) and missed a float64 reference
by 1e-3 on an ortho fit, while a float64 DSYRK on one triangle costs no more than a float32 GEMM
on both plus the additions into the totals.
A fold runs in the caller's thread, its positions split over ``threads`` threads (each on one
BLAS thread): running it on a background thread beside the backbone's oneDNN threads was slower,
since the two fight for the same cores. The canonical state is (n, mean, M2) with
``mean = c + s1 / n`` and ``M2 = s2 - s1 s1^T / n``; states of disjoint image sets merge with the
pairwise rule of Chan et al. (``M2 = M2_a + M2_b + d d^T na nb / n``, d the difference of means), so
fits on shards combine exactly. Memory does not depend on the number of images.

s2 is symmetric, so only a triangle is kept: two accumulators (the two folds of a model) share one
(P, k+1, k) float64 array, the first keeping its lower triangle, the second its upper one.

:func:`gaussian_of` and :func:`squared_distances` turn the totals of one or more accumulators into
the Gaussian of their union a slice of positions at a time (never the whole float64 scatter):
Cholesky factors, then a triangular inversion or triangular solves, with the small-matrix LAPACK
calls on one BLAS thread each and the slices spread over ``threads`` threads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy.linalg import blas, lapack
from threadpoolctl import threadpool_limits

from core.distributed import Collective
from core.errors import ConfigError

_ELEMENTS = 1 << 21  # float64 elements of a slice's (c, k, k) temporaries (16 MB)
_folders: dict[int, ThreadPoolExecutor] = {}


def _fold_pool(threads: int) -> ThreadPoolExecutor:
    """The process's pool of ``threads`` worker threads (one per thread count, made once)."""
    if threads not in _folders:
        _folders[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gaussian-fold")
    return _folders[threads]


def slice_size(dims: int) -> int:
    """Positions per slice of the per-position passes: bounds their (c, k, k) temporaries."""
    return max(1, min(256, _ELEMENTS // (dims * dims)))


def over_slices(work: Callable[[int, int], None], positions: int, dims: int, threads: int) -> None:
    """Call ``work(start, stop)`` for consecutive slices of positions, on ``threads`` threads.

    Each slice runs on one BLAS thread: batched small-matrix LAPACK/BLAS calls are several times
    faster that way than with OpenBLAS's threads fighting over busy cores.
    """
    step = slice_size(dims)
    bounds = [(start, min(start + step, positions)) for start in range(0, positions, step)]
    with threadpool_limits(1, user_api="blas"):
        if threads <= 1:
            for start, stop in bounds:
                work(start, stop)
        else:
            list(_fold_pool(threads).map(lambda b: work(*b), bounds))


def outer(vectors: np.ndarray) -> np.ndarray:
    """v v^T for each row v of ``vectors`` (c, k): (c, k, k)."""
    return vectors[:, :, None] * vectors[:, None, :]


class GaussianAccumulator:
    """Per-position mean and scatter of k-dim features over P positions.

    A full block is folded at once, its positions split over ``threads`` threads (the GEMMs
    release the GIL); each position is folded by one thread, so results do not depend on timing or
    on ``threads``. Memory stays bounded: one block x P x k float32 buffer plus the float64 totals.
    With ``partner`` (an accumulator without a partner yet) the two share one triangle store.
    """

    def __init__(self, positions: int, dims: int, block: int = 64, threads: int = 1,
                 partner: GaussianAccumulator | None = None) -> None:
        self.positions = positions
        self.dims = dims
        self.block = block
        self.threads = max(1, threads)
        self.count = 0
        self.shift: np.ndarray | None = None  # (P, k) float32
        self.s1 = np.zeros((positions, dims))
        if partner is None:
            self._store = np.zeros((positions, dims + 1, dims))
            self._side = 0
        else:
            if partner._side != 0 or partner._paired or (partner.positions, partner.dims) != (
                    positions, dims):
                raise ValueError("a partner must be an unpaired accumulator of the same shape")
            self._store, self._side = partner._store, 1
            partner._paired = True
        self._paired = partner is not None
        self._buffer: np.ndarray | None = None
        self._filled = 0

    @property
    def seen(self) -> int:
        """Images added so far, buffered ones included."""
        return self.count + self._filled

    # -- the triangle store ---------------------------------------------------------------------
    def _rows(self) -> list[tuple[int, slice]]:
        """For each row r of s2: (row of the store, columns) holding this side's triangle."""
        k = self.dims
        if self._side == 0:
            return [(r + 1, slice(0, r + 1)) for r in range(k)]
        return [(r, slice(r, k)) for r in range(k)]

    def _put_lower(self, start: int, lower: np.ndarray) -> None:
        """Set s2[start : start + c] to the symmetric matrices whose lower triangle is ``lower``."""
        values = lower if self._side == 0 else lower.transpose(0, 2, 1)
        part = self._store[start : start + len(values)]
        for r, (row, cols) in enumerate(self._rows()):
            part[:, row, cols] = values[:, r, cols]

    def _triangle(self, position: int) -> np.ndarray:
        """(k, k) Fortran-ordered view of s2[position]: its upper triangle (side 0) or its lower one
        (side 1) is this side's, as BLAS's ``lower`` flag = side expects."""
        if self._side == 0:
            return self._store[position, 1:, :].T
        return self._store[position, :-1, :].T

    def _raw_lower(self, start: int, stop: int) -> np.ndarray:
        """View (c, k, k) whose lower triangle (diagonal included) is s2[start:stop]."""
        if self._side == 0:
            return self._store[start:stop, 1:, :]
        return self._store[start:stop, :-1, :].transpose(0, 2, 1)

    def scatter_lower(self, start: int, stop: int) -> np.ndarray:
        """M2 of positions start:stop, (c, k, k) float64; only the lower triangle is meaningful."""
        lower = np.array(self._raw_lower(start, stop), order="C")
        if self.count:
            lower -= outer(self.s1[start:stop]) / self.count
        return lower

    def mean(self) -> np.ndarray:
        """Mean (P, k) float64 of the images folded so far."""
        if not self.count:
            return np.zeros((self.positions, self.dims))
        return self.shift.astype(np.float64) + self.s1 / self.count

    # -- streaming ------------------------------------------------------------------------------
    def update(self, z: np.ndarray) -> None:
        """Add features ``z`` of shape (B, P, k) (B images)."""
        if z.ndim != 3 or z.shape[1:] != (self.positions, self.dims):
            raise ValueError(f"expected features (B, {self.positions}, {self.dims}), got {z.shape}")
        if self._buffer is None:
            self._buffer = np.empty((self.block, self.positions, self.dims), dtype=np.float32)
        for row in z:
            target = self._buffer[self._filled]
            if self.shift is None:
                target[...] = row
            else:
                np.subtract(row, self.shift, out=target)
            self._filled += 1
            if self._filled == self.block:
                self.flush()

    def flush(self) -> None:
        """Fold everything buffered into the totals."""
        if not self._filled:
            return
        block = self._buffer[: self._filled]
        if self.shift is None:
            self.shift = block.mean(axis=0)
            block -= self.shift

        def fold(start: int, stop: int) -> None:
            part = np.ascontiguousarray(block[:, start:stop, :].transpose(1, 0, 2), dtype=np.float64)
            for i, rows in enumerate(part):  # rows (B, k): s2 triangle += rows^T rows, in place
                target = self._triangle(start + i)
                out = blas.dsyrk(1.0, rows.T, beta=1.0, c=target, lower=self._side, overwrite_c=1)
                if not np.shares_memory(out, target):
                    target[...] = out

        over_slices(fold, self.positions, self.dims, self.threads)
        self.s1 += block.sum(axis=0, dtype=np.float64)
        self.count += self._filled
        self._filled = 0

    def release(self) -> None:
        """Flush, then free the block buffer (it is allocated again if more data comes)."""
        self.flush()
        self._buffer = None

    # -- canonical state ------------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        """Canonical totals: count (), mean (P, k) float64, scatter M2 (P, k, k) float64."""
        self.flush()
        scatter = np.empty((self.positions, self.dims, self.dims))

        def symmetric(start: int, stop: int) -> None:
            lower = self.scatter_lower(start, stop)
            scatter[start:stop] = np.tril(lower) + np.tril(lower, -1).transpose(0, 2, 1)

        over_slices(symmetric, self.positions, self.dims, self.threads)
        return {"count": np.array(self.count, dtype=np.int64), "mean": self.mean(), "scatter": scatter}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Replace the totals by canonical ``state`` (as returned by :meth:`state`); it is not changed."""
        scatter = np.asarray(state["scatter"], dtype=np.float64)
        self._set_state(int(state["count"]), state["mean"],
                        lambda start, stop: np.array(scatter[start:stop]))

    def _set_state(self, count: int, mean: np.ndarray,
                   scatter: Callable[[int, int], np.ndarray]) -> None:
        """Set the totals to ``count`` images of mean (P, k) and M2 given slice by slice.

        ``scatter(start, stop)`` returns a new (c, k, k) float64 array whose lower triangle is M2 of
        those positions; it is called before this accumulator's own slice is overwritten.
        """
        mean = np.asarray(mean, dtype=np.float64)
        if mean.shape != (self.positions, self.dims):
            raise ValueError(f"state of shape {mean.shape}, expected ({self.positions}, {self.dims})")
        self.flush()
        # re-centre exactly on the mean: a float32 shift, the small residual kept in s1
        shift = mean.astype(np.float32) if count else None
        residual = mean - shift if count else np.zeros_like(mean)

        def write(start: int, stop: int) -> None:
            lower = scatter(start, stop)
            lower += count * outer(residual[start:stop])
            self._put_lower(start, lower)

        over_slices(write, self.positions, self.dims, self.threads)
        self.count, self.shift, self.s1 = count, shift, residual * count

    def merge(self, other: GaussianAccumulator) -> None:
        """Merge the totals of ``other`` (fitted on disjoint images) into this accumulator."""
        if (other.positions, other.dims) != (self.positions, self.dims):
            raise ValueError("cannot merge statistics of different shapes")
        self.flush()
        other.flush()
        if not other.count:
            return
        n_a, n_b = self.count, other.count
        total = n_a + n_b
        mean_a, mean_b = self.mean(), other.mean()
        delta = mean_b - mean_a

        def merged(start: int, stop: int) -> np.ndarray:
            lower = other.scatter_lower(start, stop)
            if n_a:
                lower += self.scatter_lower(start, stop)
                lower += outer(delta[start:stop]) * (n_a * n_b / total)
            return lower

        self._set_state(total, mean_a + delta * (n_b / total), merged)

    def reduce_across(self, collective: Collective) -> None:
        """Replace the totals by those of the union of all processes' images.

        Each process expresses its state as sums about a common reference (process 0's mean):
        ``n``, ``s1 = n (mean - c)``, ``s2 = M2 + n (mean - c)(mean - c)^T``; these add up, so one
        all-reduce of each gives the totals, which are turned back into (n, mean, M2).
        """
        state = self.state()
        reference = collective.broadcast(state["mean"])
        offset = state["mean"] - reference
        count = float(state["count"])
        s2 = state["scatter"]
        s2 += count * outer(offset)
        s1 = collective.all_reduce_sum(count * offset)
        s2 = collective.all_reduce_sum(s2)
        total = int(round(float(collective.all_reduce_sum(np.array([count]))[0])))
        mean_offset = s1 / total if total else np.zeros_like(s1)

        def centred(start: int, stop: int) -> np.ndarray:
            return s2[start:stop] - total * outer(mean_offset[start:stop])

        self._set_state(total, reference + mean_offset, centred)

    def covariance(self, eps: float) -> np.ndarray:
        """Unbiased covariance + eps*I per position, (P, k, k) float64 (a full copy: for checks)."""
        _check_count(self.seen)
        cov = self.state()["scatter"]
        cov /= self.count - 1
        cov[:, np.arange(self.dims), np.arange(self.dims)] += eps
        return cov

    def finalize(self, eps: float, basis: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Mean (P, k) and inverse covariance (P, k, k), float32: :func:`gaussian_of` of this alone."""
        return gaussian_of([self], eps, basis)


def _check_count(count: int) -> None:
    if count < 2:
        raise ConfigError(
            f"a Gaussian needs at least 2 training images, got {count}; add images to train/good"
        )


class _Union:
    """The Gaussian of the union of accumulators ``parts`` (disjoint images), in the fit basis.

    Features were fed as z' = basis z (basis (k, k), None for z' = z). The covariance of z plus
    eps*I is, in the fit basis, ``S' = M2 / (n - 1) + eps * basis basis^T``; Mahalanobis distances
    are the same in both bases, so its Cholesky factors L (S' = L L^T) serve both the inverse
    covariance of z, ``(L^-1 basis)^T (L^-1 basis)``, and distances of fit-basis features.
    """

    def __init__(self, parts: Sequence[GaussianAccumulator], eps: float,
                 basis: np.ndarray | None) -> None:
        for part in parts:
            part.flush()
        self.parts = list(parts)
        self.count = sum(part.count for part in parts)
        _check_count(self.count)
        self.means = [part.mean() for part in parts]
        self.mean = sum(part.count * mean for part, mean in zip(parts, self.means, strict=True))
        self.mean /= self.count
        self.basis = basis
        self.eps = eps
        dims = parts[0].dims
        self.regulariser = eps * (np.eye(dims) if basis is None else basis @ basis.T)

    def factors(self, start: int, stop: int) -> np.ndarray:
        """Cholesky factors L of S' at positions start:stop: (c, k, k) float64 whose lower
        triangles are the factors (their strict upper triangles hold leftovers: read each as a
        lower-triangular matrix only, e.g. as the upper factor L^T of its transpose).

        With s2_f the raw scatter of part f, s1_f its shifted sum, n_f its count and d_f its mean
        minus the union's, ``(n - 1) (S' - eps basis basis^T) = sum_f s2_f + v_f v_f^T - u_f u_f^T``
        with u_f = s1_f / sqrt(n_f), v_f = sqrt(n_f) d_f; the rank-one terms of all parts are one
        ``dsyr2k`` per position (``(a b^T + b a^T) / 2`` with a = v - u, b = v + u), then LAPACK
        ``dpotrf``, both in place on the transposed (Fortran-ordered) view: few passes over memory.
        """
        parts = [(part, mean) for part, mean in zip(self.parts, self.means, strict=True) if part.count]
        lower = np.array(parts[0][0]._raw_lower(start, stop), order="C")
        for part, _ in parts[1:]:
            lower += part._raw_lower(start, stop)
        scale = 1.0 / (self.count - 1)
        lower *= scale
        if self.basis is None:
            lower[:, np.arange(lower.shape[1]), np.arange(lower.shape[1])] += self.eps
        else:
            lower += self.regulariser
        u = np.stack([part.s1[start:stop] / np.sqrt(part.count) for part, _ in parts], axis=2)
        v = np.stack([np.sqrt(part.count) * (mean[start:stop] - self.mean[start:stop])
                      for part, mean in parts], axis=2)  # (c, k, parts)
        for matrix, minus, plus in zip(lower, v - u, v + u, strict=True):
            updated = blas.dsyr2k(0.5 * scale, minus, plus, beta=1.0, c=matrix.T, lower=0, overwrite_c=1)
            factor, info = lapack.dpotrf(updated, lower=0, overwrite_a=1, clean=0)
            if not np.shares_memory(factor, matrix):
                matrix.T[...] = factor
            if info:
                raise ConfigError(f"--eps {self.eps}: a covariance plus eps*I is not positive definite "
                                  "(too few or too similar training images for k); pass a larger "
                                  "--eps (default 0.01) or a smaller --k")
        return lower

    def inverse(self, start: int, stop: int, out: np.ndarray) -> None:
        """Inverse covariance of z at positions start:stop into ``out`` (c, k, k) float32.

        Without a basis: LAPACK ``dpotri`` on each factor (float64, in place). With one:
        H = L^-1 basis (``dtrsm``), then H^T H as a float32 ``ssyrk`` (half a full product). Both
        give one triangle, mirrored at the end.
        """
        factors = self.factors(start, stop)
        for i, factor in enumerate(factors):
            if self.basis is None:
                inverse, _ = lapack.dpotri(factor.T, lower=0, overwrite_c=1)
                out[i] = np.triu(inverse).T  # the inverse's lower triangle
            else:
                half = blas.dtrsm(1.0, factor.T, self.basis, lower=0, trans_a=1).astype(np.float32)
                out[i] = blas.ssyrk(1.0, half, trans=1, lower=1)
        out += np.tril(out, -1).transpose(0, 2, 1)


def gaussian_of(parts: Sequence[GaussianAccumulator], eps: float,
                basis: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean (P, k) and inverse of covariance + eps*I (P, k, k), float32, of the union of ``parts``.

    ``parts``: accumulators of disjoint images (fed z' = basis z, see :class:`_Union`); the result
    is about z. Works a slice of positions at a time, so the float64 temporaries stay small.
    """
    union = _Union(parts, eps, basis)
    first = parts[0]
    inv_cov = np.empty((first.positions, first.dims, first.dims), dtype=np.float32)
    over_slices(lambda start, stop: union.inverse(start, stop, inv_cov[start:stop]),
                first.positions, first.dims, first.threads)
    return _in_z(union.mean, basis), inv_cov


def _in_z(mean: np.ndarray, basis: np.ndarray | None) -> np.ndarray:
    """Fit-basis means (P, k) as means of z = basis^-1 z', float32."""
    return (mean if basis is None else mean @ np.linalg.inv(basis).T).astype(np.float32)


def mean_of(parts: Sequence[GaussianAccumulator], basis: np.ndarray | None = None) -> np.ndarray:
    """The mean (P, k) float32 of :func:`gaussian_of`, alone (no inverse formed)."""
    return _in_z(_Union(parts, 0.0, basis).mean, basis)


def squared_distances(parts: Sequence[GaussianAccumulator], eps: float, basis: np.ndarray | None,
                      features: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distances (N, P) float32 of fit-basis ``features`` (N, P, k).

    The Gaussian is that of the union of ``parts`` (see :func:`gaussian_of`); each position takes
    one Cholesky factorisation and one triangular solve with the N images as right-hand sides, so
    no inverse covariance is ever formed.
    """
    union = _Union(parts, eps, basis)
    first = parts[0]
    out = np.empty(features.shape[:2], dtype=np.float32)

    def solve(start: int, stop: int) -> None:
        factors = union.factors(start, stop)
        diffs = features[:, start:stop, :] - union.mean[start:stop]  # (N, c, k) float64
        for i, factor in enumerate(factors):
            whitened = blas.dtrsm(1.0, factor.T, diffs[:, i, :].T, lower=0, trans_a=1)  # L^-1 d: (k, N)
            out[:, start + i] = np.einsum("kn,kn->n", whitened, whitened)

    over_slices(solve, first.positions, first.dims, first.threads)
    return out
