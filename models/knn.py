"""Nearest-neighbour search by matrix products, shared by SPADE and PatchCore.

Squared distances are ``||a||^2 - 2 a.b + ||b||^2``: one GEMM per block instead of a (Q, M, D)
difference tensor. Two implementations of the same search:

* :func:`knn` (numpy) runs over blocks of queries and bank rows, so its temporaries stay at
  ``block`` floats whatever the sizes; it can leave bank rows out (held-out scoring).
* :class:`BankSearch` (Paddle) is the static-graph version used inside the fused scoring layers:
  the bank is a buffer, centred on its mean (distances do not change, the float32 cancellation in
  the formula does), and long banks are searched in fixed slices.
"""

from __future__ import annotations

import numpy as np
import paddle
from paddle import nn

from models.static_ops import arg_min, non_negative, reduce_sum, sqrt

BLOCK = 1 << 22
"""Entries of the distance block (and of the bank block) :func:`knn` computes at once."""


def knn(queries: np.ndarray, bank: np.ndarray, k: int, exclude: np.ndarray | None = None,
        block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest bank rows of every query row, nearest first.

    ``queries`` (Q, D), ``bank`` (M, D); ``exclude`` (M,) bool marks bank rows that may not be
    returned. Returns L2 distances (Q, k) and bank indices (Q, k) int64. Computed in float64 for
    float64 inputs, else in float32, on rows centred on the bank's mean (which leaves distances
    unchanged and keeps the cancellation in the formula small). ``k`` must not exceed the number
    of rows left.
    """
    allowed = len(bank) - (0 if exclude is None else int(exclude.sum()))
    if not 1 <= k <= allowed:
        raise ValueError(f"k={k} but {allowed} bank rows can be returned")
    dtype = np.result_type(queries, bank, np.float32)
    center = bank.mean(axis=0, dtype=np.float64)
    queries = (queries - center).astype(dtype)
    rows = max(1, min(len(queries), block // max(k, 1024)))
    cols = max(k, min(block // rows, block // bank.shape[1]))
    dist = np.empty((len(queries), k), dtype=dtype)
    index = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), rows):
        part = slice(start, start + rows)
        dist[part], index[part] = _knn_block(queries[part], bank, center, k, exclude, cols)
    return np.sqrt(np.maximum(dist, 0.0)), index


def _knn_block(queries: np.ndarray, bank: np.ndarray, center: np.ndarray, k: int,
               exclude: np.ndarray | None, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Squared distances (q, k) and indices of the k nearest of centred ``queries`` (q, D),
    scanning ``cols`` bank rows (centred here) at a time."""
    center = center.astype(queries.dtype)
    q_sq = np.einsum("ij,ij->i", queries, queries)[:, None]
    best = np.empty((len(queries), 0), dtype=queries.dtype)
    best_index = np.empty((len(queries), 0), dtype=np.int64)
    for start in range(0, len(bank), cols):
        part = bank[start : start + cols].astype(queries.dtype) - center
        squared = q_sq - 2.0 * (queries @ part.T) + np.einsum("ij,ij->i", part, part)[None]
        if exclude is not None:
            squared[:, exclude[start : start + cols]] = np.inf
        pick = _smallest(squared, k)
        best = np.concatenate([best, np.take_along_axis(squared, pick, axis=1)], axis=1)
        best_index = np.concatenate([best_index, pick + start], axis=1)
        keep = _smallest(best, k)
        best = np.take_along_axis(best, keep, axis=1)
        best_index = np.take_along_axis(best_index, keep, axis=1)
    order = np.argsort(best, axis=1, kind="stable")
    return np.take_along_axis(best, order, axis=1), np.take_along_axis(best_index, order, axis=1)


def _smallest(values: np.ndarray, k: int) -> np.ndarray:
    """Column indices (rows, min(k, cols)) of the k smallest values of each row, in no order."""
    if k == 1:
        return np.argmin(values, axis=1)[:, None]
    keep = min(k, values.shape[1])
    return np.argpartition(values, keep - 1, axis=1)[:, :keep]


class BankSearch(nn.Layer):
    """Distances from query rows to a bank of rows, inside a static graph.

    ``bank`` (M, D) is stored in float32 minus its mean ``center`` (D,); queries must be centred
    with :meth:`center` first. Distance blocks are (R, slice) for R query rows, so the reductions
    run along contiguous rows (3x faster under oneDNN than down columns); ``slice_rows`` bounds
    them. (Storing the bank transposed would save the per-slice transpose, which costs nothing
    measurable, but gathering its rows along axis 1 came out wrong in a legacy-IR ``model.pdmodel``
    under Paddle Inference's graph optimisation, Paddle 3.3.)
    """

    def __init__(self, bank: np.ndarray, slice_rows: int) -> None:
        super().__init__()
        bank = np.asarray(bank, dtype=np.float64)
        mean = bank.mean(axis=0)
        centred = bank - mean
        squared = np.einsum("ij,ij->i", centred, centred)[None].astype(np.float32)
        self.register_buffer("mean", paddle.to_tensor(mean.astype(np.float32)), persistable=True)
        self.register_buffer("bank", paddle.to_tensor(centred.astype(np.float32)), persistable=True)
        self.register_buffer("bank_sq", paddle.to_tensor(squared), persistable=True)
        self.size = len(bank)
        self.bounds = [(s, min(s + slice_rows, self.size)) for s in range(0, self.size, slice_rows)]

    def center(self, queries: paddle.Tensor) -> paddle.Tensor:
        """Queries (R, D) moved into the bank's centred coordinates."""
        return queries - self.mean

    def rows(self, index: paddle.Tensor) -> paddle.Tensor:
        """Centred bank rows (R, D) at ``index`` (R,) int64."""
        return paddle.gather(self.bank, index)

    def _squared(self, queries: paddle.Tensor, q_sq: paddle.Tensor, start: int,
                 stop: int) -> paddle.Tensor:
        """Squared distances (R, stop - start) of queries (R, D) to bank rows start:stop."""
        cross = queries @ paddle.transpose(self.bank[start:stop], [1, 0])
        return non_negative(q_sq - 2.0 * cross + self.bank_sq[:, start:stop])

    def nearest(self, queries: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        """Distance (R,) of each centred query (R, D) to its nearest bank row, and that row (R,)."""
        q_sq = reduce_sum(queries * queries, axis=1).unsqueeze(1)
        best, best_index = None, None
        for start, stop in self.bounds:
            squared = self._squared(queries, q_sq, start, stop)
            low = paddle.min(squared, axis=1)
            low_index = arg_min(squared, axis=1) + start
            if best is None:
                best, best_index = low, low_index
            else:
                best_index = paddle.where(low < best, low_index, best_index)
                best = paddle.where(low < best, low, best)  # paddle.minimum: no legacy IR
        return sqrt(best), best_index

    def smallest(self, queries: paddle.Tensor, k: int) -> tuple[paddle.Tensor, paddle.Tensor]:
        """Distances (R, k) of each centred query (R, D) to its k nearest bank rows, and the rows.

        The whole (R, M) distance matrix is built: use it for few queries (R images, not patches).
        """
        q_sq = reduce_sum(queries * queries, axis=1).unsqueeze(1)
        low, index = paddle.topk(self._squared(queries, q_sq, 0, self.size), k, axis=1, largest=False)
        return sqrt(low), index
