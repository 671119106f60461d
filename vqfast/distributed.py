"""Small ``torch.distributed`` helpers that do nothing when no process group is running.

The layer keeps every rank's codebook identical by summing its statistics over ranks and by drawing
its random rows (k-means seeds, restart candidates) from all ranks' batches, gathered to every rank;
these helpers make that a no-op in a single process, so the same code runs with and without
distributed training.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["is_distributed", "world_size", "all_reduce_sum_", "broadcast_", "all_gather_rows", "same_on_all_ranks"]


def is_distributed(group: object | None = None) -> bool:
    """True when a process group with more than one rank is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(group) > 1


def world_size(group: object | None = None) -> int:
    """Ranks in the process group, 1 when none is running."""
    return dist.get_world_size(group) if is_distributed(group) else 1


def all_reduce_sum_(tensor: Tensor, group: object | None = None) -> Tensor:
    """Sum ``tensor`` over ranks, in place (``dist.all_reduce``); unchanged in a single process."""
    if is_distributed(group):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def broadcast_(tensor: Tensor, src: int = 0, group: object | None = None) -> Tensor:
    """Overwrite ``tensor`` with rank ``src``'s copy, in place; unchanged in a single process."""
    if is_distributed(group):
        if group is not None:
            src = dist.get_global_rank(group, src)
        dist.broadcast(tensor, src=src, group=group)
    return tensor


def all_gather_rows(tensor: Tensor, group: object | None = None) -> Tensor:
    """Every rank's ``tensor`` (same shape on each), interleaved row by row: row ``i * world + r`` is
    rank ``r``'s row ``i``, so any prefix draws evenly from all ranks. Unchanged in a single process.

    Equivalent to ``torch.stack([t_rank0, t_rank1, ...], 1).flatten(0, 1)``.
    """
    if not is_distributed(group):
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.stack(parts, 1).flatten(0, 1)


@torch.no_grad()
def same_on_all_ranks(tensor: Tensor, group: object | None = None) -> bool:
    """Whether ``tensor`` is bit-identical on every rank (a check for tests; it syncs the host)."""
    if not is_distributed(group):
        return True
    # Bytes, not values: a NaN equals itself here, and 0.0 differs from -0.0.
    bits = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    reference = broadcast_(bits.clone(), 0, group)
    differs = (reference != bits).any().to(torch.int64).reshape(1)
    all_reduce_sum_(differs, group)
    return int(differs.item()) == 0
