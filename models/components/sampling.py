"""Greedy k-center coreset selection (PatchCore's memory-bank subsampling) on projected features.

The greedy rule: start from one point, then repeatedly add the point farthest from the points
chosen so far, keeping every point's distance to its nearest chosen point up to date. It is a
2-approximation of the smallest covering radius. The first few thousand steps read every point
(row chunks, one matrix-vector product each). Then the points are grouped into the cells of the
points chosen so far, and each later step computes distances only for the points that the
triangle inequality cannot rule out (a few percent of them on the magnetic-tile patches): the same
selection, several times faster. Besides the points the selection keeps a few (N,) vectors
(squared norms, current distances, distance to the cell's seed, the grouping order), and its
temporaries are chunk-sized. The features are projected block by block (:func:`project`) and the
chosen rows gathered from the blocks (:func:`take_rows`), so they are never stacked into one copy.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm

CHUNK = 1 << 16
"""Rows per matrix-vector product (a 65536-vector of temporaries)."""
FIRST_CELLS = 64
"""Points chosen with full passes before the points are grouped into cells."""
CELLS = 16384
"""Most cells: the grouping is redone each time the chosen points double, up to this many."""


def random_projection(dims: int, out_dims: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian random projection (dims, out_dims) float32 with entries N(0, 1 / out_dims).

    Distances between projected rows approximate the original ones (Johnson-Lindenstrauss).
    """
    return (rng.standard_normal((dims, out_dims)) / np.sqrt(out_dims)).astype(np.float32)


def project(blocks: Sequence[np.ndarray], matrix: np.ndarray) -> np.ndarray:
    """The row blocks (n_i, D) stacked and multiplied by ``matrix`` (D, d): (sum n_i, d) float32.

    Each block's product is written into place, so no stacked copy of the blocks is made.
    """
    out = np.empty((sum(len(b) for b in blocks), matrix.shape[1]), dtype=np.float32)
    start = 0
    for block in blocks:
        np.matmul(block, matrix, out=out[start : start + len(block)])
        start += len(block)
    return out


def take_rows(blocks: Sequence[np.ndarray], index: np.ndarray) -> np.ndarray:
    """Rows ``index`` (K,) of the row blocks (n_i, D) stacked, in that order: (K, D)."""
    bounds = np.cumsum([0, *(len(b) for b in blocks)])
    block_of = np.searchsorted(bounds, index, side="right") - 1
    out = np.empty((len(index), blocks[0].shape[1]), dtype=blocks[0].dtype)
    for i, block in enumerate(blocks):
        mine = block_of == i
        out[mine] = block[index[mine] - bounds[i]]
    return out


def kcenter_greedy(points: np.ndarray, count: int, start: int, chunk: int = CHUNK,
                   desc: str | None = None, cells: int = CELLS) -> np.ndarray:
    """Indices (count,) int64 of a greedy k-center selection from ``points`` (N, d), in order.

    ``start`` is the first index; each next one is the point whose distance to the chosen set is
    largest (the lowest index on ties). Squared distances are computed as |p|^2 - 2 p.c + |c|^2 in
    the dtype of ``points``. The first points are found with full passes; then the points are
    grouped into the cells of the points chosen so far, regrouped each time their number doubles
    (up to ``cells`` cells), and triangle-inequality bounds skip what a new point cannot change
    (:class:`_Cells`): the same selection, except that among near-ties (within rounding of the
    distances) either may be taken. The rows of ``points`` are reordered in place while that runs
    and restored before returning (a read-only ``points`` is copied first). With ``desc``, a tqdm
    bar on stderr counts the chosen points. Everything runs on one BLAS thread: the work is
    memory-bound, and threads only add synchronisation per chunk.
    """
    total = len(points)
    if not 1 <= count <= total:
        raise ValueError(f"cannot choose {count} of {total} points")
    if not 0 <= start < total:
        raise ValueError(f"start index {start} is not one of the {total} points")
    if count > min(cells, FIRST_CELLS) and not points.flags.writeable:
        points = points.copy()  # the cells reorder its rows in place
    norms = np.einsum("ij,ij->i", points, points)
    nearest = np.full(total, np.inf, dtype=norms.dtype)
    owner = np.zeros(total, dtype=np.int32)  # index in ``chosen`` of each point's nearest
    chosen = np.empty(count, dtype=np.int64)
    seeded = min(count, max(1, min(cells, FIRST_CELLS)))
    with threadpool_limits(limits=1), tqdm(total=count, desc=desc, unit="pt", file=sys.stderr,
                                           leave=False, disable=desc is None) as bar:
        for step in range(seeded):
            chosen[step] = start if step == 0 else int(np.argmax(nearest))
            bar.update(1)
            if step + 1 < count:
                _full_pass(points, norms, nearest, owner, chosen[step], step, chunk)
        while seeded < count:
            stop = count if seeded >= cells else min(count, 2 * seeded)
            _grouped_steps(points, norms, nearest, owner, chosen, range(seeded, stop), chunk, bar)
            seeded = stop
    return chosen


def _grouped_steps(points: np.ndarray, norms: np.ndarray, nearest: np.ndarray, owner: np.ndarray,
                   chosen: np.ndarray, steps: range, chunk: int, bar: tqdm) -> None:
    """Fill ``chosen[steps]`` with the points grouped into the cells of ``chosen[:steps.start]``
    (the grouping is freed on return, before the next one is made)."""
    with _Cells(points, norms, nearest, owner, chosen[: steps.start], chunk) as search:
        for step in steps:
            chosen[step] = search.take_farthest(step if step + 1 < len(chosen) else None)
            bar.update(1)


def _squared(rows: np.ndarray, row_norms: np.ndarray, center: np.ndarray,
             center_norm: float) -> np.ndarray:
    """Squared distances (n,) of ``rows`` (n, d), squared norms ``row_norms``, to ``center`` (d,)."""
    squared = rows @ center
    squared *= -2.0
    squared += row_norms
    squared += center_norm
    return squared


def _full_pass(points: np.ndarray, norms: np.ndarray, nearest: np.ndarray, owner: np.ndarray,
               center: int, label: int, chunk: int) -> None:
    """Lower ``nearest`` (N,) to the squared distances to ``points[center]``; ``owner`` = ``label``
    where that point is strictly nearer than any before."""
    for lo in range(0, len(points), chunk):
        part = slice(lo, lo + chunk)
        squared = _squared(points[part], norms[part], points[center], norms[center])
        owner[part][squared < nearest[part]] = label
        np.minimum(nearest[part], squared, out=nearest[part])


def _permute_rows(rows: np.ndarray, order: np.ndarray) -> None:
    """``rows[i] = old rows[order[i]]`` for every row, in place, with one row of scratch."""
    source = array("q", order.astype(np.int64).tobytes())  # fast item access, 8 bytes a row
    placed = bytearray(len(source))
    for first, origin in enumerate(source):
        if placed[first] or origin == first:
            continue
        saved = rows[first].copy()
        row = first
        while source[row] != first:
            rows[row] = rows[source[row]]
            placed[row] = 1
            row = source[row]
        rows[row] = saved
        placed[row] = 1


def _ranges(starts: np.ndarray, stops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All integers of the ranges [starts_i, stops_i) in order (n,), and where each range begins
    in that list (r,)."""
    lengths = stops - starts
    offsets = np.cumsum(lengths) - lengths
    return np.repeat(starts - offsets, lengths) + np.arange(int(lengths.sum())), offsets


class _Cells:
    """The rest of a greedy selection, on the points grouped by their nearest seed.

    The seeds are the points chosen so far. On entry the rows of ``points`` are reordered in place
    so that each seed's cell is one contiguous range (their order is restored on exit). For a new
    chosen point c, a seed g and a point p of g's cell, |c - p| >= | |c - g| - |p - g| |: p cannot
    come nearer to c than it is to the chosen set when that bound is already larger, and a whole
    cell is skipped when |c - g| minus the cell's radius is. The bounds are computed in float64 and
    a point is skipped only with a margin over the rounding of its squared distance
    (d x machine epsilon x (|p|^2 + |c|^2)), so a skipped point would not have changed.
    Arrays (N = points, G = non-empty cells): positions are row numbers after the reordering.
    """

    def __init__(self, points: np.ndarray, norms: np.ndarray, nearest: np.ndarray,
                 owner: np.ndarray, seeds: np.ndarray, chunk: int) -> None:
        self.points = points
        self.gather_rows = max(1, chunk // points.shape[1])  # rows copied at a time: chunk floats
        self.order = np.argsort(owner, kind="stable")  # (N,) original index of each position
        labels = owner[self.order]
        bounds = np.searchsorted(labels, np.arange(len(seeds) + 1))
        filled = np.flatnonzero(bounds[1:] > bounds[:-1])  # a duplicate seed has no points
        self.starts, self.stops = bounds[filled], bounds[filled + 1]  # (G,)
        self.seeds = points[seeds[filled]].astype(np.float64)  # (G, d)
        self.seed_norms = np.einsum("ij,ij->i", self.seeds, self.seeds)
        self.norms = norms[self.order]
        self.nearest = nearest[self.order]
        self.owner = labels
        self.write_back = (nearest, owner)  # the caller's arrays, in the original order
        self.rounding = points.shape[1] * float(np.finfo(norms.dtype).eps)
        self.largest_norm = float(norms.max())
        _permute_rows(points, self.order)
        seed_of = np.searchsorted(filled, labels)  # (N,) cell of each position
        self.to_seed = np.empty(len(points))  # (N,) |p - g|
        rows = self.gather_rows
        for lo in range(0, len(points), rows):
            diff = points[lo : lo + rows].astype(np.float64) - self.seeds[seed_of[lo : lo + rows]]
            self.to_seed[lo : lo + rows] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
        self.radius = np.maximum.reduceat(self.to_seed, self.starts)  # (G,)
        self.largest = np.maximum.reduceat(self.nearest, self.starts)  # (G,) per cell

    def __enter__(self) -> _Cells:
        return self

    def __exit__(self, *exc: object) -> None:
        _permute_rows(self.points, np.argsort(self.order))
        nearest, owner = self.write_back
        nearest[self.order] = self.nearest
        owner[self.order] = self.owner

    def take_farthest(self, label: int | None) -> int:
        """Original index of the point farthest from the chosen set (lowest index on ties). With a
        ``label`` (its index in the selection), the distances are then lowered to that point's."""
        cells = np.flatnonzero(self.largest == self.largest.max())
        positions = _ranges(self.starts[cells], self.stops[cells])[0]
        tied = positions[self.nearest[positions] == self.largest[cells[0]]]
        best = int(tied[np.argmin(self.order[tied])])
        if label is not None:
            self._add(best, label)
        return int(self.order[best])

    def _add(self, best: int, label: int) -> None:
        """Lower the distances to those to the point at position ``best`` (owner ``label`` where it
        is strictly nearer), skipping what the bounds rule out."""
        center, center_norm = self.points[best], self.norms[best]
        c64 = center.astype(np.float64)
        to_center = np.sqrt(np.maximum(self.seed_norms - 2.0 * (self.seeds @ c64) + c64 @ c64, 0.0))
        slack = self.rounding * (self.largest_norm + float(center_norm))
        gap = to_center - self.radius
        cells = np.flatnonzero((gap <= 0.0) | (gap * gap < self.largest + slack))
        positions, offsets = _ranges(self.starts[cells], self.stops[cells])
        bound = np.repeat(to_center[cells], self.stops[cells] - self.starts[cells])
        bound -= self.to_seed[positions]
        near = positions[bound * bound < self.nearest[positions] + slack]
        for lo in range(0, len(near), self.gather_rows):
            rows = near[lo : lo + self.gather_rows]
            squared = _squared(self.points[rows], self.norms[rows], center, center_norm)
            closer = squared < self.nearest[rows]
            self.nearest[rows[closer]] = squared[closer]
            self.owner[rows[closer]] = label
        self.largest[cells] = np.maximum.reduceat(self.nearest[positions], offsets)
