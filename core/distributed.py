"""Several processes fitting one model: rank/world from ``paddle.distributed.launch``, collectives.

``python -m paddle.distributed.launch --nproc_per_node N train.py ...`` starts N copies of the
script with PADDLE_TRAINER_ID / PADDLE_TRAINERS_NUM set; on a CPU the collectives run over gloo,
on GPUs over NCCL. A single process (no launcher) is a world of size 1 and needs no set-up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class World:
    """This process's rank, the number of processes, and its rank on this machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 finalises, writes and evaluates; the others only contribute statistics."""
        return self.rank == 0


def current_world() -> World:
    """The world this process belongs to, read from the launcher's environment."""
    size = int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))
    rank = int(os.environ.get("PADDLE_TRAINER_ID", "0"))
    local = int(os.environ.get("PADDLE_LOCAL_RANK", os.environ.get("PADDLE_RANK_IN_NODE", "0")))
    return World(rank=rank, size=size, local_rank=local)


class Collective:
    """Sum and broadcast of numpy arrays across the processes of a launched job."""

    def __init__(self, world: World) -> None:
        import paddle.distributed as dist

        self.world = world
        self._dist = dist
        if world.size > 1 and not dist.is_initialized():
            dist.init_parallel_env()

    def all_reduce_sum(self, array: np.ndarray) -> np.ndarray:
        """Element-wise sum of ``array`` over all processes (same shape and dtype everywhere)."""
        import paddle

        tensor = paddle.to_tensor(np.ascontiguousarray(array))
        self._dist.all_reduce(tensor)
        return tensor.numpy()

    def broadcast(self, array: np.ndarray, src: int = 0) -> np.ndarray:
        """``array`` as held by process ``src``."""
        import paddle

        tensor = paddle.to_tensor(np.ascontiguousarray(array))
        self._dist.broadcast(tensor, src=src)
        return tensor.numpy()
