"""Custom ops (``torch.ops.vqfast.*``) for the kernels of :class:`vqfast.VectorQuantizer`'s upkeep and of
the soft-assignment entropies (the layer's and :func:`vqfast.soft_assignment_entropy`).

Like :mod:`vqfast.ops`, each op has a fake implementation so that ``torch.compile`` traces through it
without a graph break. Importing this module imports Triton; nothing runs at import time.
"""

from __future__ import annotations

import sys
import types
from typing import Optional

import torch
from torch import Tensor

from vqfast import kernels
from vqfast.kernels import soft_entropy as _soft_entropy
from vqfast.ops import _direct, intercepted, on_device, vmap_by_loop


@torch.library.custom_op("vqfast::soft_entropy_forward", mutates_args=())
def soft_entropy_forward(z: Tensor, codebook: Tensor, scale: float,
                         precision: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row ``(row_max, log_sum, entropy)`` and column sums of ``softmax(-scale * ||z - c||^2)``,
    streamed."""
    with on_device(z):
        return _soft_entropy.soft_entropy_forward(z, codebook, scale, precision)


@soft_entropy_forward.register_fake
def _(z: Tensor, codebook: Tensor, scale: float, precision: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    n, k = z.shape[0], codebook.shape[0]
    return (*(z.new_empty(n, dtype=torch.float32) for _ in range(3)), z.new_empty(k, dtype=torch.float32))


@torch.library.custom_op("vqfast::soft_entropy_backward", mutates_args=())
def soft_entropy_backward(z: Tensor, codebook: Tensor, row_max: Tensor, log_sum: Tensor, ent: Tensor, w: Tensor,
                          coef: Tensor, scale: float, precision: str, codebook_grad: bool) -> tuple[Tensor, Tensor]:
    """fp32 gradients ``(dz, dcodebook)`` of ``coef * sum(entropy) + (w * colsum).sum()``."""
    with on_device(z):
        return _soft_entropy.soft_entropy_backward(z, codebook, row_max, log_sum, ent, w, coef, scale, precision,
                                                   codebook_grad)


@soft_entropy_backward.register_fake
def _(z: Tensor, codebook: Tensor, row_max: Tensor, log_sum: Tensor, ent: Tensor, w: Tensor, coef: Tensor,
      scale: float, precision: str, codebook_grad: bool) -> tuple[Tensor, Tensor]:
    rows = codebook.shape[0] if codebook_grad else 0
    return (z.new_empty(z.shape, dtype=torch.float32),
            codebook.new_empty((rows, codebook.shape[1]), dtype=torch.float32))


def _finite_row_counts(indices: Tensor, distances: Tensor, num_codes: int) -> Tensor:
    """Code counts of the rows with a finite distance, then their number (K + 1,)."""
    with on_device(indices):
        return kernels.finite_row_counts(indices, distances, num_codes)


finite_row_counts = torch.library.custom_op("vqfast::finite_row_counts", _finite_row_counts, mutates_args=())
for _op in (soft_entropy_forward, soft_entropy_backward, finite_row_counts):
    vmap_by_loop(_op)


@finite_row_counts.register_fake
def _(indices: Tensor, distances: Tensor, num_codes: int) -> Tensor:
    return indices.new_empty(num_codes + 1, dtype=torch.int64)


def _update_code_usage(counts: Tensor, usage: Tensor, grace: Tensor, batch_counts: Tensor, steps: Tensor,
                       usage_decay: float, dead_threshold: float, seeds: Optional[Tensor], weight: Optional[Tensor],
                       ema_count: Optional[Tensor]) -> None:
    """Running usage statistics and dead-code restarts of one training step, in place."""
    with on_device(usage):
        kernels.update_code_usage(counts, usage, grace, batch_counts, steps, usage_decay, dead_threshold,
                                  seeds, weight, ema_count)


_UPDATE_CODE_USAGE_WRITES = ("usage", "grace", "batch_counts", "steps", "weight", "ema_count")
update_code_usage = torch.library.custom_op("vqfast::update_code_usage", _update_code_usage,
                                            mutates_args=_UPDATE_CODE_USAGE_WRITES)


@update_code_usage.register_fake
def _(counts: Tensor, usage: Tensor, grace: Tensor, batch_counts: Tensor, steps: Tensor, usage_decay: float,
      dead_threshold: float, seeds: Optional[Tensor], weight: Optional[Tensor], ema_count: Optional[Tensor]) -> None:
    return None


def _ema_update(weight: Tensor, ema_count: Tensor, sums: Tensor, counts: Tensor, decay: float, eps: float) -> None:
    """The EMA codebook step, in place."""
    with on_device(weight):
        kernels.ema_update(weight, ema_count, sums, counts, decay, eps)


_EMA_UPDATE_WRITES = ("weight", "ema_count")
ema_update = torch.library.custom_op("vqfast::ema_update", _ema_update, mutates_args=_EMA_UPDATE_WRITES)


@ema_update.register_fake
def _(weight: Tensor, ema_count: Tensor, sums: Tensor, counts: Tensor, decay: float, eps: float) -> None:
    return None


# The upkeep ops without the dispatcher, for eager calls (see vqfast.ops.for_call).
direct = types.SimpleNamespace(
    finite_row_counts=_direct(finite_row_counts, _finite_row_counts),
    update_code_usage=_direct(update_code_usage, _update_code_usage, mutates=_UPDATE_CODE_USAGE_WRITES),
    ema_update=_direct(ema_update, _ema_update, mutates=_EMA_UPDATE_WRITES),
)


def for_call() -> types.ModuleType | types.SimpleNamespace:
    """This module's custom ops while anything traces or intercepts calls, else :data:`direct`."""
    return _THIS_MODULE if intercepted() else direct


# Looked up once, at import: a lookup in sys.modules while torch.compile traces fails for a module first
# imported inside the traced frame.
_THIS_MODULE = sys.modules[__name__]
