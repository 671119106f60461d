"""Small ``torch.distributed`` helpers that do nothing when no process group is running.

The layer keeps every rank's codebook identical by summing its statistics over ranks and by taking
rank 0's random choices (k-means seeds, restart candidates); these helpers make that a no-op in a
single process, so the same code runs with and without distributed training.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["is_distributed", "all_reduce_sum_", "broadcast_", "same_on_all_ranks"]


def is_distributed(group: object | None = None) -> bool:
    """True when a process group with more than one rank is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(group) > 1


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


@torch.no_grad()
def same_on_all_ranks(tensor: Tensor, group: object | None = None) -> bool:
    """Whether ``tensor`` is bit-identical on every rank (a check for tests; it syncs the host)."""
    if not is_distributed(group):
        return True
    reference = broadcast_(tensor.detach().clone(), 0, group)
    differs = (reference != tensor.detach()).any().to(torch.int64).reshape(1)
    all_reduce_sum_(differs, group)
    return int(differs.item()) == 0
