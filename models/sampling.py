"""Greedy k-center coreset selection (PatchCore's memory-bank subsampling) on projected features.

The greedy rule: start from one point, then repeatedly add the point farthest from the points
chosen so far, keeping every point's distance to its nearest chosen point up to date. It is a
2-approximation of the smallest covering radius. Each step reads every point once, so the
selection runs over row chunks with one matrix-vector product each: its temporaries are a few
chunk-sized vectors, and besides the points it keeps only two (N,) vectors (squared norms and the
current distances). The features are projected block by block (:func:`project`) and the chosen
rows gathered from the blocks (:func:`take_rows`), so they are never stacked into one copy.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm

CHUNK = 1 << 16
"""Rows per matrix-vector product (a 65536-vector of temporaries)."""


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
                   desc: str | None = None) -> np.ndarray:
    """Indices (count,) int64 of a greedy k-center selection from ``points`` (N, d), in order.

    ``start`` is the first index; each next one is the point whose distance to the chosen set is
    largest (the lowest index on ties). Distances are computed in the dtype of ``points``. With
    ``desc``, a tqdm bar on stderr counts the chosen points. The matrix-vector products run on
    one BLAS thread: they are memory-bound, and threads only add synchronisation per chunk.
    """
    total = len(points)
    if not 1 <= count <= total:
        raise ValueError(f"cannot choose {count} of {total} points")
    if not 0 <= start < total:
        raise ValueError(f"start index {start} is not one of the {total} points")
    norms = np.einsum("ij,ij->i", points, points)
    nearest = np.full(total, np.inf, dtype=norms.dtype)
    chosen = np.empty(count, dtype=np.int64)
    chosen[0] = start
    with threadpool_limits(limits=1), tqdm(total=count, desc=desc, unit="pt", file=sys.stderr,
                                           leave=False, disable=desc is None) as bar:
        bar.update(1)
        for step in range(1, count):
            center = points[chosen[step - 1]]
            center_sq = norms[chosen[step - 1]]
            for lo in range(0, total, chunk):
                hi = min(lo + chunk, total)
                squared = points[lo:hi] @ center
                squared *= -2.0
                squared += norms[lo:hi]
                squared += center_sq
                np.minimum(nearest[lo:hi], squared, out=nearest[lo:hi])
            chosen[step] = int(np.argmax(nearest))
            bar.update(1)
    return chosen
