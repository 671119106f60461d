"""The Triton launchers registered as PyTorch custom ops (``torch.ops.vqfast.*``).

Registering them through ``torch.library`` gives each op a fake (meta) implementation, so
``torch.compile`` traces models that use vqfast without graph breaks; the kernels themselves stay
opaque to the compiler. Nothing here runs a kernel or queries CUDA at import time.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from vqfast import kernels


def on_device(t: Tensor):
    """Triton launches on the current CUDA device, not the tensors': make it the tensors' device."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


@torch.library.custom_op("vqfast::nearest_code", mutates_args=())
def nearest_code(z: Tensor, codebook: Tensor, precision: str, num_splits: int) -> tuple[Tensor, Tensor]:
    """Fused search on rows ``z`` (N, D); ``num_splits`` <= 0 lets the launcher choose."""
    with on_device(z):
        return kernels.nearest_code(z, codebook, precision=precision,
                                    num_splits=num_splits if num_splits > 0 else None)


@nearest_code.register_fake
def _(z: Tensor, codebook: Tensor, precision: str, num_splits: int) -> tuple[Tensor, Tensor]:
    n = z.shape[0]
    return z.new_empty(n, dtype=torch.int64), z.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("vqfast::gather_rows", mutates_args=())
def gather_rows(codebook: Tensor, indices: Tensor) -> Tensor:
    with on_device(codebook):
        return kernels.gather_rows(codebook, indices)


@gather_rows.register_fake
def _(codebook: Tensor, indices: Tensor) -> Tensor:
    return codebook.new_empty((indices.shape[0], codebook.shape[1]))


@torch.library.custom_op("vqfast::scatter_add_rows", mutates_args=())
def scatter_add_rows(grad: Tensor, indices: Tensor, num_codes: int, out_dtype: torch.dtype) -> Tensor:
    with on_device(grad):
        return kernels.scatter_add_rows(grad, indices, num_codes, out_dtype)


@scatter_add_rows.register_fake
def _(grad: Tensor, indices: Tensor, num_codes: int, out_dtype: torch.dtype) -> Tensor:
    return grad.new_empty((num_codes, grad.shape[1]), dtype=out_dtype)


@torch.library.custom_op("vqfast::code_usage", mutates_args=())
def code_usage(indices: Tensor, num_codes: int) -> tuple[Tensor, Tensor]:
    """Returns ``(counts, stats)`` with ``stats = [entropy, perplexity]`` (outputs may not alias)."""
    with on_device(indices):
        counts, entropy, perplexity = kernels.code_usage(indices, num_codes)
        return counts, torch.stack([entropy, perplexity])


@code_usage.register_fake
def _(indices: Tensor, num_codes: int) -> tuple[Tensor, Tensor]:
    return indices.new_empty(num_codes, dtype=torch.int64), indices.new_empty(2, dtype=torch.float32)


@torch.library.custom_op("vqfast::bincount", mutates_args=())
def bincount(indices: Tensor, num_codes: int) -> Tensor:
    """``torch.bincount(indices, minlength=num_codes)`` with a static length (traceable)."""
    with on_device(indices):
        return kernels.bincount(indices, num_codes)


@bincount.register_fake
def _(indices: Tensor, num_codes: int) -> Tensor:
    return indices.new_empty(num_codes, dtype=torch.int64)


@torch.library.custom_op("vqfast::quantize_forward", mutates_args=())
def quantize_forward(z: Tensor, codebook: Tensor, indices: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    with on_device(z):
        return kernels.quantize_forward(z, codebook, indices, beta)


@quantize_forward.register_fake
def _(z: Tensor, codebook: Tensor, indices: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    return torch.empty_like(z, memory_format=torch.contiguous_format), z.new_empty((), dtype=torch.float32)


@torch.library.custom_op("vqfast::quantize_backward", mutates_args=())
def quantize_backward(grad_zq: Optional[Tensor], grad_loss: Tensor, z: Tensor, codebook: Tensor,
                      indices: Tensor, beta: float, need_grad_codebook: bool) -> tuple[Tensor, Tensor]:
    """``(dz, dcodebook)``; dcodebook is (0, D) when ``need_grad_codebook`` is False."""
    with on_device(z):
        return kernels.quantize_backward(grad_zq, grad_loss, z, codebook, indices, beta, need_grad_codebook)


@quantize_backward.register_fake
def _(grad_zq: Optional[Tensor], grad_loss: Tensor, z: Tensor, codebook: Tensor,
      indices: Tensor, beta: float, need_grad_codebook: bool) -> tuple[Tensor, Tensor]:
    c_shape = codebook.shape if need_grad_codebook else (0, codebook.shape[1])
    return torch.empty_like(z, memory_format=torch.contiguous_format), codebook.new_empty(c_shape)
