"""Helpers for registering vqfast's custom ops (``torch.library``)."""

from __future__ import annotations

import importlib
import importlib.util

import torch

# The modules that register ops; those after the first need triton (the kernels' ops).
_OP_MODULES = ("vqfast.layer", "vqfast.ops", "vqfast.ops_layer")


def register_ops() -> list[str]:
    """Registers every vqfast custom op (``torch.ops.vqfast.*``) and returns their names.

    ``import vqfast`` registers nothing (its names load on first use, and the kernels' ops only once a
    Triton call needs them), so call this before ``torch.export.load`` of a program that uses vqfast:
    loading resolves the program's ops by name. Without triton installed, only the CPU ops exist."""
    importlib.import_module(_OP_MODULES[0])
    if importlib.util.find_spec("triton") is not None:
        for module in _OP_MODULES[1:]:
            importlib.import_module(module)
    return sorted(name for name in torch._C._dispatch_get_all_op_names() if name.startswith("vqfast::"))


def vmap_by_loop(op, rows_arg: int | None = None) -> None:
    """Registers vmap for the custom op ``op`` as a loop over the batch: what torch.func's fallback runs
    too, but without its warning that asks PyTorch for a batching rule. (torch < 2.5 keeps the fallback.)

    ``rows_arg``: the position of an argument whose first dimension holds independent rows, each giving
    its own first-dimension row of every output (the search's z, the gather's indices). When it is the
    only batched argument, the batch is folded into its rows: one call instead of one per element."""
    register = getattr(op, "register_vmap", None)
    if register is None:
        return

    def rule(info, in_dims, *args, **kwargs):
        if rows_arg is not None and all((d is None) == (i != rows_arg) for i, d in enumerate(in_dims)):
            rows = args[rows_arg].movedim(in_dims[rows_arg], 0)
            folded = list(args)
            folded[rows_arg] = rows.reshape(-1, *rows.shape[2:])
            out = op(*folded, **kwargs)
            unfold = lambda t: t.reshape(rows.shape[0], rows.shape[1], *t.shape[1:])  # noqa: E731
            if isinstance(out, tuple):
                return tuple(unfold(t) for t in out), tuple(0 for _ in out)
            return unfold(out), 0
        if info.batch_size == 0:
            raise ValueError(f"vmap over an empty batch: {op} has no element to take its output's shape from")
        results = [op(*(a.select(d, i) if d is not None else a for a, d in zip(args, in_dims)), **kwargs)
                   for i in range(info.batch_size)]
        if not isinstance(results[0], tuple):
            return torch.stack(results), 0
        outputs = tuple(None if parts[0] is None else torch.stack(parts) for parts in zip(*results))
        return outputs, tuple(None if out is None else 0 for out in outputs)

    register(rule)
