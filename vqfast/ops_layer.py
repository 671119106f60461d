"""Custom ops (``torch.ops.vqfast.*``) for the kernels used only by :class:`vqfast.VectorQuantizer`.

Like :mod:`vqfast.ops`, each op has a fake implementation so that ``torch.compile`` traces through it
without a graph break. Importing this module imports Triton; nothing runs at import time.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vqfast.kernels import soft_entropy as _soft_entropy
from vqfast.ops import on_device


@torch.library.custom_op("vqfast::soft_entropy_forward", mutates_args=())
def soft_entropy_forward(z: Tensor, codebook: Tensor, scale: float, precision: str) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row ``(lse, entropy)`` and column sums of ``softmax(-scale * ||z - c||^2)``, streamed."""
    with on_device(z):
        return _soft_entropy.soft_entropy_forward(z, codebook, scale, precision)


@soft_entropy_forward.register_fake
def _(z: Tensor, codebook: Tensor, scale: float, precision: str) -> tuple[Tensor, Tensor, Tensor]:
    n, k = z.shape[0], codebook.shape[0]
    return (z.new_empty(n, dtype=torch.float32), z.new_empty(n, dtype=torch.float32),
            z.new_empty(k, dtype=torch.float32))


@torch.library.custom_op("vqfast::soft_entropy_backward", mutates_args=())
def soft_entropy_backward(z: Tensor, codebook: Tensor, lse: Tensor, ent: Tensor, w: Tensor, coef: Tensor,
                          scale: float, precision: str, codebook_grad: bool) -> tuple[Tensor, Tensor]:
    """fp32 gradients ``(dz, dcodebook)`` of ``coef * sum(entropy) + (w * colsum).sum()``."""
    with on_device(z):
        return _soft_entropy.soft_entropy_backward(z, codebook, lse, ent, w, coef, scale, precision, codebook_grad)


@soft_entropy_backward.register_fake
def _(z: Tensor, codebook: Tensor, lse: Tensor, ent: Tensor, w: Tensor, coef: Tensor,
      scale: float, precision: str, codebook_grad: bool) -> tuple[Tensor, Tensor]:
    rows = codebook.shape[0] if codebook_grad else 0
    return (z.new_empty(z.shape, dtype=torch.float32),
            codebook.new_empty((rows, codebook.shape[1]), dtype=torch.float32))
