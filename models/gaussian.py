"""Streaming, mergeable Gaussian statistics: one Gaussian per feature-map position.

Features arrive image by image as (P, k) float32 rows and are copied, minus a per-position shift
``c``, into a block buffer (B, P, k). When the block is full its shifted sum and scatter are folded
into float64 totals with batched GEMMs::

    s1 += sum_b (z_b - c)          s2 += sum_b (z_b - c)(z_b - c)^T

``c`` is the mean of the first block, so the shifted values are centred and the sums lose no
precision to a large mean; products and sums are float64. A fold runs in the caller's thread,
its positions split over ``threads`` threads (each on one BLAS thread): running it on a
background thread beside the backbone's oneDNN threads was slower, since the two fight for the
same cores. The canonical state is (n, mean, M2) with
``mean = c + s1 / n`` and ``M2 = s2 - s1 s1^T / n``; states of disjoint image sets merge with the
pairwise rule of Chan et al. (``M2 = M2_a + M2_b + d d^T na nb / n``, d the difference of means), so
fits on shards combine exactly. Memory does not depend on the number of images.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import threadpool_limits

from engine.distributed import Collective
from engine.errors import ConfigError

_CHUNK = 256  # positions per slice in the float64 passes: bounds their temporaries
_folders: dict[int, ThreadPoolExecutor] = {}


def _fold_pool(threads: int) -> ThreadPoolExecutor:
    """The process's pool of ``threads`` fold threads (one per thread count, made once)."""
    if threads not in _folders:
        _folders[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gaussian-fold")
    return _folders[threads]


def add_outer(target: np.ndarray, vectors: np.ndarray, weight: float) -> np.ndarray:
    """target (P, k, k) += weight * v v^T for each row v of ``vectors`` (P, k); in place, sliced."""
    for start in range(0, len(vectors), _CHUNK):
        v = vectors[start : start + _CHUNK]
        target[start : start + _CHUNK] += weight * (v[:, :, None] * v[:, None, :])
    return target


class GaussianAccumulator:
    """Per-position mean and scatter of k-dim features over P positions.

    A full block is folded at once, its positions split over ``threads`` threads (the GEMMs
    release the GIL); each position is folded by one thread, so results do not depend on timing or
    on ``threads``. Memory stays bounded: one block x P x k float32 buffer plus the float64 totals.
    """

    def __init__(self, positions: int, dims: int, block: int = 64, threads: int = 1) -> None:
        self.positions = positions
        self.dims = dims
        self.block = block
        self.threads = max(1, threads)
        self.count = 0
        self.shift: np.ndarray | None = None  # (P, k) float32
        self.s1 = np.zeros((positions, dims))
        self.s2 = np.zeros((positions, dims, dims))
        self._buffer: np.ndarray | None = None
        self._filled = 0

    @property
    def seen(self) -> int:
        """Images added so far, buffered ones included."""
        return self.count + self._filled

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
        starts = range(0, self.positions, _CHUNK)
        with threadpool_limits(1, user_api="blas"):
            if self.threads == 1:
                for start in starts:
                    self._fold_slice(block, start)
            else:
                list(_fold_pool(self.threads).map(lambda start: self._fold_slice(block, start), starts))
        self.s1 += block.sum(axis=0, dtype=np.float64)
        self.count += self._filled
        self._filled = 0

    def release(self) -> None:
        """Flush, then free the block buffer (it is allocated again if more data comes)."""
        self.flush()
        self._buffer = None

    def _fold_slice(self, block: np.ndarray, start: int) -> None:
        """Add the products of one slice of positions of a shifted block (B, P, k) to s2."""
        part = block[:, start : start + _CHUNK, :].astype(np.float64)
        self.s2[start : start + _CHUNK] += np.matmul(part.transpose(1, 2, 0), part.transpose(1, 0, 2))

    def state(self) -> dict[str, np.ndarray]:
        """Canonical totals: count (), mean (P, k) float64, scatter M2 (P, k, k) float64."""
        self.flush()
        if not self.count:
            return {"count": np.array(0, dtype=np.int64),
                    "mean": np.zeros((self.positions, self.dims)),
                    "scatter": np.zeros((self.positions, self.dims, self.dims))}
        offset = self.s1 / self.count
        scatter = add_outer(self.s2.copy(), offset, -self.count)
        return {"count": np.array(self.count, dtype=np.int64),
                "mean": self.shift.astype(np.float64) + offset, "scatter": scatter}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Replace the totals by canonical ``state`` (as returned by :meth:`state`).

        ``state`` is left unchanged.
        """
        self._set_state(state["count"], state["mean"], np.array(state["scatter"], dtype=np.float64))

    def _set_state(self, count: np.ndarray, mean: np.ndarray, scatter: np.ndarray) -> None:
        """Like :meth:`load_state`, but takes over (and changes) ``scatter`` instead of copying."""
        mean = np.asarray(mean, dtype=np.float64)
        if mean.shape != (self.positions, self.dims):
            raise ValueError(f"state of shape {mean.shape}, expected ({self.positions}, {self.dims})")
        self.flush()
        self.count = int(count)
        # re-centre exactly on the mean: s1 = 0, s2 = M2 (float32 shift, offset kept in s1)
        self.shift = mean.astype(np.float32) if self.count else None
        residual = mean - self.shift if self.count else np.zeros_like(mean)
        self.s1 = residual * self.count
        self.s2 = add_outer(scatter, residual, self.count)

    def merge(self, other: GaussianAccumulator) -> None:
        """Merge the totals of ``other`` (fitted on disjoint images) into this accumulator."""
        if (other.positions, other.dims) != (self.positions, self.dims):
            raise ValueError("cannot merge statistics of different shapes")
        self.flush()
        b = other.state()
        n_b = int(b["count"])
        if not n_b:
            return
        if not self.count:
            self._set_state(b["count"], b["mean"], b["scatter"])
            return
        a = self.state()
        n_a = int(a["count"])
        total = n_a + n_b
        delta = b["mean"] - a["mean"]
        scatter = a["scatter"]
        scatter += b.pop("scatter")
        add_outer(scatter, delta, n_a * n_b / total)
        mean = a["mean"] + delta * (n_b / total)
        self._set_state(np.array(total), mean, scatter)

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
        s1 = collective.all_reduce_sum(count * offset)
        s2 = collective.all_reduce_sum(add_outer(state["scatter"], offset, count))
        total = int(round(float(collective.all_reduce_sum(np.array([count]))[0])))
        if not total:
            self._set_state(np.array(0), reference, s2)
            return
        mean_offset = s1 / total
        self._set_state(np.array(total), reference + mean_offset, add_outer(s2, mean_offset, -total))

    def moments(self, basis: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Mean (P, k) and scatter M2 (P, k, k), float64, of z = basis^-1 z' (z' what was fed).

        ``basis`` (k, k): the features were fed as z' = basis z; None means z' = z.
        """
        state = self.state()
        mean, scatter = state["mean"], state["scatter"]
        if basis is not None:
            back = np.linalg.inv(basis)
            mean = mean @ back.T
            for start in range(0, self.positions, _CHUNK):
                part = scatter[start : start + _CHUNK]
                part[...] = back @ part @ back.T
        return mean, scatter

    def covariance(self, eps: float, basis: np.ndarray | None = None) -> np.ndarray:
        """Unbiased covariance + eps*I per position, (P, k, k) float64 (of z, see :meth:`moments`)."""
        if self.seen < 2:
            raise ConfigError(
                f"a Gaussian needs at least 2 training images, got {self.seen}; "
                "add images to train/good"
            )
        cov = self.moments(basis)[1]
        cov /= self.count - 1
        cov[:, np.arange(self.dims), np.arange(self.dims)] += eps
        return cov

    def finalize(self, eps: float, basis: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Mean (P, k) and inverse covariance (P, k, k), both float32, via Cholesky factors.

        Inverts a slice of positions at a time, so the float64 temporaries stay small.
        """
        cov = self.covariance(eps, basis)
        inv_cov = np.empty(cov.shape, dtype=np.float32)
        for start in range(0, self.positions, _CHUNK):
            try:
                chol_inv = np.linalg.inv(np.linalg.cholesky(cov[start : start + _CHUNK]))
            except np.linalg.LinAlgError as exc:
                raise ConfigError(f"--eps {eps}: a covariance plus eps*I is not positive definite "
                                  "(too few or too similar training images for k); pass a larger "
                                  "--eps (default 0.01) or a smaller --k") from exc
            inv_cov[start : start + _CHUNK] = np.matmul(chol_inv.transpose(0, 2, 1), chol_inv)
        return self.moments(basis)[0].astype(np.float32), inv_cov
