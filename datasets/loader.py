"""Batching with threaded, bounded prefetch, and index sharding for distributed fitting."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np

PREFETCH_BATCHES = 2


class ItemDataset(Protocol):
    """What :class:`BatchLoader` needs: ``len`` and items as dicts (see ``AnomalyDataset``)."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> dict[str, Any]: ...


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack item dicts into one batch dict (see :class:`BatchLoader`)."""
    return {
        "images": np.stack([item["image"] for item in items]).astype(np.float32, copy=False),
        "masks": [item["mask"] for item in items],
        "labels": np.asarray([item["label"] for item in items], dtype=np.int64),
        "paths": [str(item["path"]) for item in items],
    }


class BatchLoader:
    """Iterate over a dataset in batches, loading items on a thread pool ahead of the consumer.

    Each batch is a dict: ``images`` float32 (B, 3, S, S), ``masks`` list of B uint8 (S, S)
    arrays or None, ``labels`` int64 (B,), ``paths`` list of B str. Batches follow the order of
    ``indices`` (default: the whole dataset in order); the last one may be smaller.

    With ``num_workers`` > 0, items are loaded by that many threads while the consumer works,
    at most ``PREFETCH_BATCHES`` batches ahead of the one it holds, so no more than
    ``(PREFETCH_BATCHES + 1) * batch_size`` items are alive. ``num_workers=0`` loads in the
    calling thread. An exception raised while loading an item reaches the consumer unchanged.
    Threads are shut down when iteration ends, fails, or the consumer stops early.
    """

    def __init__(
        self,
        dataset: ItemDataset,
        batch_size: int = 32,
        num_workers: int = 2,
        indices: Sequence[int] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.indices = list(range(len(dataset))) if indices is None else list(indices)

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def _batch_indices(self) -> list[list[int]]:
        step = self.batch_size
        return [self.indices[i : i + step] for i in range(0, len(self.indices), step)]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.num_workers == 0:
            return self._serial()
        return self._threaded()

    def _serial(self) -> Iterator[dict[str, Any]]:
        for batch in self._batch_indices():
            yield _collate([self.dataset[i] for i in batch])

    def _threaded(self) -> Iterator[dict[str, Any]]:
        batches = self._batch_indices()
        pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="BatchLoader")
        pending: deque[list[Future[dict[str, Any]]]] = deque()
        submitted = 0
        try:
            for current in range(len(batches)):
                while submitted < len(batches) and submitted <= current + PREFETCH_BATCHES:
                    pending.append(
                        [pool.submit(self.dataset.__getitem__, i) for i in batches[submitted]]
                    )
                    submitted += 1
                futures = pending.popleft()
                yield _collate([future.result() for future in futures])
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """Contiguous shard ``rank`` of ``range(n)`` split into ``world_size`` parts.

    The shards are disjoint, cover ``range(n)`` in order, and differ in size by at most one
    (the first ``n % world_size`` shards get the extra item).
    """
    if world_size < 1 or not 0 <= rank < world_size or n < 0:
        raise ValueError(
            f"need n >= 0 and 0 <= rank < world_size, got {n=}, {rank=}, {world_size=}"
        )
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return list(range(start, start + base + (rank < extra)))
