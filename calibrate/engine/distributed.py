"""Shards of score blocks on several processes, reduced to the single-process state.

Each process (rank) sweeps only the blocks whose index, in the order a single
process visits them, is ``index % world == rank``. After each pass the ranks
combine what they accumulated so that every rank holds exactly the state one
process would have: integer counts are summed, best-impostor scores take the
maximum, and resolved tail bins (distinct values with counts) are gathered and
merged. Those merges are exact and do not depend on order, so the thresholds,
counts and OPIS equal the single-process ones bit for bit.

torch is imported only by ``torch_sharding``: the rest of calibrate runs without it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Sharding:
    """Which blocks this process owns and how the processes combine their results.

    ``sum_``/``max_`` reduce a numpy array elementwise across ranks (every rank gets
    the result); ``gather`` returns every rank's object, in rank order.
    """

    rank: int
    world: int
    sum_: Callable[[np.ndarray], np.ndarray]
    max_: Callable[[np.ndarray], np.ndarray]
    gather: Callable[[Any], list[Any]]

    def owns(self, index: int) -> bool:
        return index % self.world == self.rank


def torch_sharding() -> Sharding:
    """A Sharding over torch.distributed's default process group (already initialised).

    Reductions run on CPU tensors, so it works with the gloo backend (torchrun on
    CPU). For NCCL groups, tensors would have to live on the GPU: not supported here.
    """
    try:
        import torch
        import torch.distributed as dist
    except ImportError as err:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "distributed calibration needs torch (pip install '.[train]') and torchrun"
        ) from err
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "distributed=True needs torch.distributed's default process group: run under "
            "torchrun and call torch.distributed.init_process_group('gloo') first"
        )

    def reduce(op):
        def run(a: np.ndarray) -> np.ndarray:
            t = torch.from_numpy(np.ascontiguousarray(a).copy())
            dist.all_reduce(t, op=op)
            return t.numpy().astype(a.dtype, copy=False).reshape(a.shape)

        return run

    def gather(obj: Any) -> list[Any]:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out

    return Sharding(
        rank=dist.get_rank(),
        world=dist.get_world_size(),
        sum_=reduce(dist.ReduceOp.SUM),
        max_=reduce(dist.ReduceOp.MAX),
        gather=gather,
    )
