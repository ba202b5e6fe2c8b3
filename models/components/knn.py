"""Nearest-neighbour search of a bank of rows, shared by SPADE and PatchCore.

Squared distances are ``||a||^2 - 2 a.b + ||b||^2``: one GEMM per block instead of a (Q, M, D)
difference tensor. The bank is centred on its mean and turned into its principal axes (no distance
changes; the float32 cancellation in the formula does). Nearest rows of many queries are found
exactly with less arithmetic by the lower bounds of :class:`HeadBounds`. Two implementations of the
same search:

* :class:`PreparedBank` (numpy) prepares the bank once, then searches it over blocks of queries
  and bank rows, so its temporaries stay at ``block`` floats whatever the sizes; it can leave bank
  rows out (held-out scoring).
* :class:`BankSearch` (Paddle) is the static-graph version used inside the fused scoring layers:
  the bank is a buffer, and long banks are searched in fixed slices, or (``kernel=True``,
  ``export_model.py --head kernel``) in one pruned sweep by the compiled CPU operator of
  core/csrc/nearest_row.cc.
"""

from __future__ import annotations

import numpy as np
import paddle
from paddle import nn

from core.kernels import NEAREST_ROW, load_kernel, packed_tiles
from models.components.static_ops import arg_min, non_negative, reduce_sum, sqrt

BLOCK = 1 << 22
"""Entries of the distance block (and of the bank block) :meth:`PreparedBank.search` computes at once."""

HEAD = 64
"""Leading principal coordinates of :class:`HeadBounds`' lower bounds."""

CAP = 64
"""Rows within the limit above which :meth:`BankSearch.nearest` searches a query by brute force."""


class PreparedBank:
    """A bank of rows made ready once for any number of :meth:`search` calls.

    ``bank`` (M, D) is kept as ``rows`` (M, D): its rows minus their mean ``center`` (D,) float64,
    turned by ``basis`` (D, D) float64, the eigenvectors of their covariance, largest variance
    first, in the search type (float64 for a float64 bank, else float32), and ``squared`` (M,) their
    squared norms. A rotation changes no distance; it puts most of each row's length in its first
    coordinates, which :meth:`search` uses to prune (see :class:`HeadBounds`). The old per-call mean,
    centred copy and norms of the bank (about 55 ms a call on a 78,000 x 384 bank) are paid once.
    Costs one copy of the bank in the search type and ``head`` + 2 columns more.

    ``head`` is the number of leading coordinates of the lower bounds; 0 searches by brute force.
    """

    def __init__(self, bank: np.ndarray, head: int = HEAD) -> None:
        self.dtype = np.result_type(bank, np.float32)
        self.center = bank.mean(axis=0, dtype=np.float64)
        centred = np.subtract(bank, self.center, dtype=np.float64)
        self.basis = principal_axes(centred)
        self.rows = (centred @ self.basis).astype(self.dtype)
        del centred
        self.squared = np.einsum("ij,ij->i", self.rows, self.rows)
        self.bounds = HeadBounds(self.rows, head) if 0 < head < self.rows.shape[1] else None

    def __len__(self) -> int:
        return len(self.rows)

    def search(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None,
               block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest bank rows of every query row (Q, D), nearest first.

        ``exclude`` (M,) bool marks bank rows that may not be returned. Returns L2 distances (Q, k)
        in the search type and bank indices (Q, k) int64. ``k`` must not exceed the rows left.
        Nearest neighbours (k = 1) of several queries are found through :class:`HeadBounds`
        (the same rows; distances taken from coordinate differences), others by brute force.
        """
        allowed = len(self) - (0 if exclude is None else int(exclude.sum()))
        if not 1 <= k <= allowed:
            raise ValueError(f"k={k} but {allowed} bank rows can be returned")
        queries = ((queries - self.center) @ self.basis).astype(self.dtype)
        if k == 1 and self.bounds is not None and len(queries) > 1:
            return self.bounds.nearest(queries, exclude, block)
        rows = max(1, min(len(queries), block // max(k, 1024)))
        cols = max(k, min(block // rows, block // self.rows.shape[1]))
        dist = np.empty((len(queries), k), dtype=self.dtype)
        index = np.empty((len(queries), k), dtype=np.int64)
        for start in range(0, len(queries), rows):
            part = slice(start, start + rows)
            dist[part], index[part] = self._block(queries[part], k, exclude, cols)
        return np.sqrt(np.maximum(dist, 0.0)), index

    def _block(self, queries: np.ndarray, k: int, exclude: np.ndarray | None,
               cols: int) -> tuple[np.ndarray, np.ndarray]:
        """Squared distances (q, k) and indices of the k nearest of centred ``queries`` (q, D),
        scanning ``cols`` bank rows at a time."""
        q_sq = np.einsum("ij,ij->i", queries, queries)[:, None]
        best = np.empty((len(queries), 0), dtype=self.dtype)
        best_index = np.empty((len(queries), 0), dtype=np.int64)
        for start in range(0, len(self), cols):
            squared = queries @ self.rows[start : start + cols].T
            squared *= -2.0  # in place, the same roundings as q_sq - 2 q.b + |b|^2
            squared += q_sq
            squared += self.squared[None, start : start + cols]
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


def principal_axes(centred: np.ndarray) -> np.ndarray:
    """Eigenvectors (D, D) float64 of the scatter of centred rows (M, D), largest eigenvalue first."""
    _, vectors = np.linalg.eigh(centred.T @ centred)
    return np.ascontiguousarray(vectors[:, ::-1])


def rounding_margin(terms: int) -> float:
    """A bound, relative to (|q| + |b|)^2, of the float32 rounding error of a squared distance or
    lower bound computed as a sum of ``terms`` products (Higham's gamma_n, twice)."""
    unit = 2.0**-24
    return 2.0 * terms * unit / (1.0 - terms * unit)


class HeadBounds:
    """Exact nearest-neighbour search of rotated rows that does less arithmetic than brute force.

    For rows b and a query q in the principal basis, with h the first ``head`` coordinates and t
    the rest, ``|q - b|^2 = |q_h - b_h|^2 + |q_t - b_t|^2 >= |q_h - b_h|^2 + (|q_t| - |b_t|)^2``
    (reverse triangle inequality on the tail): a lower bound that one product of width head + 2
    gives for every row, the bank lifted as [-2 b_h, |b|^2, -2 |b_t|] against [q_h, 1, |q_t|].
    Per query, the row of the smallest bound is measured exactly (coordinate differences); every
    row whose bound is within that distance plus the rounding margin is measured too, and the
    nearest of those measured (lowest index on ties) is the answer: any other row is provably
    farther. Nothing is approximate; only the number of rows measured depends on the data (a few
    dozen of 78,000 on PatchCore's patch features, all of them in the worst case).
    """

    def __init__(self, rows: np.ndarray, head: int) -> None:
        wide = rows.astype(np.float64)
        tail = np.sqrt(np.einsum("ij,ij->i", wide[:, head:], wide[:, head:]))
        squared = np.einsum("ij,ij->i", wide, wide)
        self.rows = rows
        self.head = head
        self.lifted = np.concatenate([-2.0 * wide[:, :head], squared[:, None], -2.0 * tail[:, None]],
                                     axis=1).astype(np.float32)
        self.radius = float(np.sqrt(squared.max()))
        self.margin = rounding_margin(head + 3) + rounding_margin(rows.shape[1] + 1)
        self.searched = 0
        """Queries searched so far."""
        self.measured = 0
        """Rows measured exactly so far, over all queries (brute force measures len(rows) each)."""

    def nearest(self, queries: np.ndarray, exclude: np.ndarray | None,
                block: int) -> tuple[np.ndarray, np.ndarray]:
        """Distances (Q, 1) and indices (Q, 1) int64 of the nearest row of each rotated query
        (Q, D), rows marked in ``exclude`` (M,) left out."""
        wide = queries.astype(np.float64)
        q_sq = np.einsum("ij,ij->i", wide, wide)
        tail = np.sqrt(np.einsum("ij,ij->i", wide[:, self.head :], wide[:, self.head :]))
        lifted = np.concatenate([wide[:, : self.head], np.ones((len(wide), 1)), tail[:, None]],
                                axis=1).astype(np.float32)
        slack = self.margin * (np.sqrt(q_sq) + self.radius) ** 2
        step = max(1, block // len(self.rows))
        dist = np.empty(len(queries), dtype=queries.dtype)
        index = np.empty(len(queries), dtype=np.int64)
        for start in range(0, len(queries), step):
            part = slice(start, start + step)
            dist[part], index[part] = self._block(queries[part], lifted[part], q_sq[part],
                                                  slack[part], exclude, block)
        return np.sqrt(np.maximum(dist, 0.0))[:, None], index[:, None]

    def _block(self, queries: np.ndarray, lifted: np.ndarray, q_sq: np.ndarray, slack: np.ndarray,
               exclude: np.ndarray | None, block: int) -> tuple[np.ndarray, np.ndarray]:
        """Squared distances (q,) and indices (q,) of the nearest rows of a block of queries."""
        partial = lifted @ self.lifted.T  # lower bound - |q|^2, (q, M)
        if exclude is not None:
            partial[:, exclude] = np.inf
        owner, row = np.arange(len(queries)), np.argmin(partial, axis=1)
        first = self.measure(queries, owner, row)
        near = np.nonzero(partial <= (first - q_sq + slack)[:, None].astype(np.float32))
        dist = np.empty(len(near[0]), dtype=queries.dtype)
        size = max(1, block // queries.shape[1])
        for start in range(0, len(dist), size):
            part = slice(start, start + size)
            dist[part] = self.measure(queries, near[0][part], near[1][part])
        owner, row = np.concatenate([owner, near[0]]), np.concatenate([row, near[1]])
        dist = np.concatenate([first, dist])
        self.searched += len(queries)
        self.measured += len(dist)
        order = np.lexsort((row, dist, owner))  # by query, then distance, then index
        lead = order[np.r_[True, owner[order][1:] != owner[order][:-1]]]
        return dist[lead], row[lead]

    def measure(self, queries: np.ndarray, owner: np.ndarray, row: np.ndarray) -> np.ndarray:
        """Squared distances (n,) from ``queries[owner]`` to ``rows[row]``, by coordinate
        differences (no cancellation)."""
        diff = queries[owner] - self.rows[row]
        return np.einsum("ij,ij->i", diff, diff)


def float32_up(value: float) -> float:
    """The float32 at or above ``value`` (the compiled search's float attributes)."""
    rounded = np.float32(value)
    if float(rounded) < value:  # compared as Python floats: numpy 2 would cast value to float32
        rounded = np.nextafter(rounded, np.float32(np.inf))
    return float(rounded)


def _smallest(values: np.ndarray, k: int) -> np.ndarray:
    """Column indices (rows, min(k, cols)) of the k smallest values of each row, in no order."""
    if k == 1:
        return np.argmin(values, axis=1)[:, None]
    keep = min(k, values.shape[1])
    return np.argpartition(values, keep - 1, axis=1)[:, :keep]


class BankSearch(nn.Layer):
    """Distances from query rows to a bank of rows, inside a static graph.

    The bank (M, D) is centred on its mean ``mean`` (D,) and turned into its principal basis
    ``basis`` (D, D) (:func:`principal_axes`; queries must be moved the same way with
    :meth:`center` first; no distance changes) and stored *lifted*: ``lifted`` (M, D + 1) =
    [-2 b, |b|^2] per turned row b. A query q lifted to [q, 1] then gives |b|^2 - 2 q.b for every
    bank row in one matrix product, and the nearest row is the arg-min of that product: no pass
    adds the norms, doubles or clips the (R, M) block, and the minimum is gathered at the arg-min
    instead of a second reduction. |q|^2 is added to the R minima alone. (-2 and -1/2 are exact in
    binary floats, so :meth:`rows` gives back the turned rows bit for bit.) Distance blocks are
    (R, slice), so the reductions run along contiguous rows (3x faster under oneDNN than down
    columns); ``slice_rows`` bounds them. (Storing the bank transposed would save the per-slice
    transpose, which measured slower here, and gathering its rows along axis 1 came out wrong in a
    legacy-IR ``model.pdmodel`` under Paddle Inference's graph optimisation, Paddle 3.3.)

    With ``head`` > 0, :meth:`nearest` prunes with the lower bounds of :class:`HeadBounds`
    (``bounds`` (M, head + 2) = [-2 b_h, |b|^2, -2 |b_t|]): the same rows, found with a product
    head + 2 wide instead of D + 1, twice, plus the exact distances of the few rows the bounds
    cannot rule out (at most ``cap`` per query: queries with more get the brute-force search).

    ``kernel=True`` (with ``head`` > 0) runs :meth:`nearest` as one compiled CPU operator instead
    (core/csrc/nearest_row.cc, CPU only): the same bounds, stored as tiles of 8 rows (``tiles``
    (ceil(M / 8), head + 2, 8), :func:`core.kernels.packed_tiles`), computed
    for a few queries and rows at a time and compared with each query's nearest distance so far,
    so no (R, slice) block is written and the bank is swept once; the same rule, so the same rows.
    """

    def __init__(self, bank: np.ndarray, slice_rows: int, head: int = 0, cap: int = CAP,
                 kernel: bool = False) -> None:
        super().__init__()
        bank = np.asarray(bank, dtype=np.float64)
        mean = bank.mean(axis=0)
        basis = principal_axes(bank - mean)
        turned = ((bank - mean) @ basis).astype(np.float32).astype(np.float64)
        squared = np.einsum("ij,ij->i", turned, turned)
        lifted = np.concatenate([-2.0 * turned, squared[:, None]], axis=1).astype(np.float32)
        self.register_buffer("mean", paddle.to_tensor(mean.astype(np.float32)), persistable=True)
        self.register_buffer("basis", paddle.to_tensor(basis.astype(np.float32)), persistable=True)
        self.register_buffer("lifted", paddle.to_tensor(lifted), persistable=True)
        self.size, self.dims = bank.shape
        self.head = head if 0 < head < self.dims else 0
        self.cap = cap
        self.op = None
        if kernel and not self.head:
            raise ValueError(f"the compiled search prunes with 0 < head < {self.dims} leading "
                             f"coordinates, got head={head}")
        if self.head:
            bounds = HeadBounds(turned.astype(np.float32), self.head)
            if kernel:
                self.op = getattr(load_kernel(NEAREST_ROW), NEAREST_ROW)
                self.register_buffer("tiles", paddle.to_tensor(packed_tiles(bounds.lifted)), persistable=True)
            else:
                self.register_buffer("bounds", paddle.to_tensor(bounds.lifted), persistable=True)
            # the graph forms |q|^2 and |q_t| in float32 (numpy and the operator: float64): widen the
            # margin by their rounding (for the operator it only measures a few rows more)
            self.radius = bounds.radius
            self.margin = bounds.margin + rounding_margin(2 * self.dims)
        self.slices = [(s, min(s + slice_rows, self.size)) for s in range(0, self.size, slice_rows)]

    def center(self, queries: paddle.Tensor) -> paddle.Tensor:
        """Queries (..., D) moved into the bank's centred, turned coordinates."""
        return (queries - self.mean) @ self.basis

    def rows(self, index: paddle.Tensor) -> paddle.Tensor:
        """Turned bank rows (R, D) at ``index`` (R,) int64."""
        return paddle.gather(self.lifted, index)[:, : self.dims] * -0.5

    @staticmethod
    def _product(queries: paddle.Tensor, table: paddle.Tensor, start: int, stop: int) -> paddle.Tensor:
        """``queries`` (R, w) times rows start:stop of ``table`` (M, w), transposed: (R, stop - start)."""
        return queries @ paddle.transpose(table[start:stop], [1, 0])

    @staticmethod
    def _with_ones(queries: paddle.Tensor, *columns: paddle.Tensor) -> paddle.Tensor:
        """[queries, 1, columns...] (R, w + 1 + len(columns)) for queries (R, w), columns (R,)."""
        ones = queries[:, :1] * 0.0 + 1.0  # paddle.ones_like warns while tracing under PIR
        return paddle.concat([queries, ones, *[c.unsqueeze(1) for c in columns]], axis=1)

    @staticmethod
    def _distance(partial: paddle.Tensor, queries: paddle.Tensor) -> paddle.Tensor:
        """L2 distances from lifted-product values (R, ...) of turned queries (R, D)."""
        q_sq = reduce_sum(queries * queries, axis=1)
        if len(partial.shape) == 2:
            q_sq = q_sq.unsqueeze(1)
        return sqrt(non_negative(partial + q_sq))

    def _lowest(self, queries: paddle.Tensor, table: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        """Per query row (R, w), the smallest product with a row of ``table`` (M, w) and its index,
        slice by slice."""
        best, best_index = None, None
        for start, stop in self.slices:
            partial = self._product(queries, table, start, stop)
            low_index = arg_min(partial, axis=1)
            low = paddle.take_along_axis(partial, low_index.unsqueeze(1), axis=1).squeeze(1)
            low_index = low_index + start
            if best is None:
                best, best_index = low, low_index
            else:
                best_index = paddle.where(low < best, low_index, best_index)
                best = paddle.where(low < best, low, best)  # paddle.minimum: no legacy IR
        return best, best_index

    def nearest(self, queries: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        """Distance (R,) of each turned query (R, D) to its nearest bank row, and that row (R,)."""
        if not self.head:
            best, best_index = self._lowest(self._with_ones(queries), self.lifted)
            return self._distance(best, queries), best_index
        if self.op is not None:  # its float attributes rounded up, so that the margin stays a bound
            return self.op(queries, self.tiles, self.lifted, float32_up(self.margin), float32_up(self.radius))
        return self._pruned(queries)

    def _measure(self, queries: paddle.Tensor, owner: paddle.Tensor, row: paddle.Tensor) -> paddle.Tensor:
        """Squared distances (n,) from queries[owner] to bank rows ``row``, by differences."""
        diff = paddle.gather(queries, owner) - self.rows(row)
        return reduce_sum(diff * diff, axis=1)

    def _listed(self, counts: paddle.Tensor, owner: paddle.Tensor) -> paddle.Tensor:
        """Positions (n',) of the pairs whose query (``owner`` (n,)) has at most ``cap`` rows
        within its limit (``counts`` (R,))."""
        return paddle.flatten(paddle.nonzero(paddle.gather(counts, owner) <= self.cap))

    def _pruned(self, queries: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        """:meth:`nearest` through the head bounds (:class:`HeadBounds`, the same rule in Paddle):
        the row of the smallest bound is measured, then every row whose bound is within its
        distance plus the rounding margin; the nearest of those measured, lowest index on ties.
        A query with more than ``cap`` such rows is searched by brute force instead, so the rows
        gathered stay below R (cap + 2) whatever the bank."""
        q_sq = reduce_sum(queries * queries, axis=1)
        tail = queries[:, self.head :]
        lifted = self._with_ones(queries[:, : self.head], sqrt(reduce_sum(tail * tail, axis=1)))
        _, first_index = self._lowest(lifted, self.bounds)
        count = paddle.shape(queries)[0]
        own = paddle.arange(count, dtype="int64")  # arange(end=Tensor) traces under both IRs
        first = self._measure(queries, own, first_index)
        slack = sqrt(q_sq) + self.radius
        limit = (first - q_sq + self.margin * slack * slack).unsqueeze(1)
        owners, rows, counts = [], [], None
        for start, stop in self.slices:
            within = self._product(lifted, self.bounds, start, stop) <= limit  # (R, slice)
            found = reduce_sum(paddle.cast(within, "float32"), axis=1)
            counts = found if counts is None else counts + found
            near = paddle.nonzero(within)  # (n, 2), by query then row
            near = paddle.gather(near, self._listed(counts, near[:, 0]))  # few per query
            owners.append(near[:, 0])
            rows.append(near[:, 1] + start)
        owner, row = paddle.concat(owners), paddle.concat(rows)
        keep = self._listed(counts, owner)
        crowded = paddle.concat([paddle.flatten(paddle.nonzero(counts > self.cap)), own[:1]])
        _, brute = self._lowest(self._with_ones(paddle.gather(queries, crowded)), self.lifted)
        # pairs: the rows within the limit (queries with at most ``cap`` of them), every query's
        # first row, and the brute-force row of the others (and of query 0, so none is empty)
        owner = paddle.concat([paddle.gather(owner, keep), own, crowded])
        row = paddle.concat([paddle.gather(row, keep), first_index, brute])
        dist = self._measure(queries, owner, row)
        order = paddle.argsort(dist, stable=True)  # pairs come by ascending row within a query
        order = paddle.gather(order, paddle.argsort(paddle.gather(owner, order), stable=True))
        owner = paddle.gather(owner, order)
        lead = paddle.concat([own[:1] * 0 + 1, paddle.cast(owner[1:] != owner[:-1], "int64")])
        lead = paddle.gather(order, paddle.flatten(paddle.nonzero(lead)))  # (R,): one per query
        return sqrt(paddle.gather(dist, lead)), paddle.gather(row, lead)

    def smallest(self, queries: paddle.Tensor, k: int) -> tuple[paddle.Tensor, paddle.Tensor]:
        """Distances (R, k) of each turned query (R, D) to its k nearest bank rows, and the rows.

        The whole (R, M) block is built: use it for few queries (R images, not patches).
        """
        partial = self._product(self._with_ones(queries), self.lifted, 0, self.size)
        low, index = paddle.topk(partial, k, axis=1, largest=False)
        return self._distance(low, queries), index
