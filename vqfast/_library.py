"""Helpers for registering vqfast's custom ops (``torch.library``)."""

from __future__ import annotations

import torch


def vmap_by_loop(op) -> None:
    """Registers vmap for the custom op ``op`` as a loop over the batch: what torch.func's fallback runs
    too, but without its warning that asks PyTorch for a batching rule. (torch < 2.5 keeps the fallback.)"""
    register = getattr(op, "register_vmap", None)
    if register is None:
        return

    def rule(info, in_dims, *args, **kwargs):
        results = [op(*(a.select(d, i) if d is not None else a for a, d in zip(args, in_dims)), **kwargs)
                   for i in range(info.batch_size)]
        if not isinstance(results[0], tuple):
            return torch.stack(results), 0
        outputs = tuple(None if parts[0] is None else torch.stack(parts) for parts in zip(*results))
        return outputs, tuple(None if out is None else 0 for out in outputs)

    register(rule)
