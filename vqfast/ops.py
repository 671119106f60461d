"""The Triton launchers registered as PyTorch custom ops (``torch.ops.vqfast.*``).

Registering them through ``torch.library`` gives each op a fake (meta) implementation, so
``torch.compile`` traces models that use vqfast without graph breaks; the kernels themselves stay
opaque to the compiler. Nothing here runs a kernel or queries CUDA at import time.

:func:`for_call` picks, per call, the registered ops or :data:`direct` (the same launchers without the
dispatcher): eager calls skip the custom-op machinery, about 30 us of host time per op, which small,
launch-bound problems pay in full.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import types
from typing import Optional

import torch
from torch import Tensor

from vqfast import kernels
from vqfast.kernels import _common as kernels_common
from vqfast._autograd import intercepted
from vqfast._checks import is_legacy_batched
from vqfast._library import vmap_by_loop


def on_device(t: Tensor):
    """Triton launches on the current CUDA device, not the tensors': make it the tensors' device."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _nearest_code(z: Tensor, codebook: Tensor, precision: str, num_splits: int) -> tuple[Tensor, Tensor]:
    """Fused search on rows ``z`` (N, D); ``num_splits`` <= 0 lets the launcher choose."""
    with on_device(z):
        return kernels.nearest_code(z, codebook, precision=precision,
                                    num_splits=num_splits if num_splits > 0 else None)


def _nearest_code_op(z: Tensor, codebook: Tensor, precision: str, num_splits: int) -> tuple[Tensor, Tensor]:
    """The registered op's search: with fresh scratch buffers, which compiled code and CUDA-graph trees
    (whose warm-up runs allocate from a graph's private memory pool) must not keep between calls."""
    with kernels_common.fresh_scratch():
        return _nearest_code(z, codebook, precision, num_splits)


nearest_code = torch.library.custom_op("vqfast::nearest_code", _nearest_code_op, mutates_args=())


@nearest_code.register_fake
def _(z: Tensor, codebook: Tensor, precision: str, num_splits: int) -> tuple[Tensor, Tensor]:
    n = z.shape[0]
    return z.new_empty(n, dtype=torch.int64), z.new_empty(n, dtype=torch.float32)


def _gather_rows(codebook: Tensor, indices: Tensor) -> Tensor:
    with on_device(codebook):
        return kernels.gather_rows(codebook, indices)


gather_rows = torch.library.custom_op("vqfast::gather_rows", _gather_rows, mutates_args=())


@gather_rows.register_fake
def _(codebook: Tensor, indices: Tensor) -> Tensor:
    return codebook.new_empty((indices.shape[0], codebook.shape[1]))


def _scatter_add_rows(grad: Tensor, indices: Tensor, num_codes: int, out_dtype: torch.dtype) -> Tensor:
    with on_device(grad):
        return kernels.scatter_add_rows(grad, indices, num_codes, out_dtype)


scatter_add_rows = torch.library.custom_op("vqfast::scatter_add_rows", _scatter_add_rows, mutates_args=())


@scatter_add_rows.register_fake
def _(grad: Tensor, indices: Tensor, num_codes: int, out_dtype: torch.dtype) -> Tensor:
    return grad.new_empty((num_codes, grad.shape[1]), dtype=out_dtype)


def _code_usage(indices: Tensor, num_codes: int) -> tuple[Tensor, Tensor]:
    """Returns ``(counts, stats)`` with ``stats = [entropy, perplexity]`` (outputs may not alias)."""
    with on_device(indices):
        return kernels.code_usage_stats(indices, num_codes)


code_usage = torch.library.custom_op("vqfast::code_usage", _code_usage, mutates_args=())


@code_usage.register_fake
def _(indices: Tensor, num_codes: int) -> tuple[Tensor, Tensor]:
    return indices.new_empty(num_codes, dtype=torch.int64), indices.new_empty(2, dtype=torch.float32)


def _bincount(indices: Tensor, num_codes: int) -> Tensor:
    """``torch.bincount(indices, minlength=num_codes)`` with a static length (traceable)."""
    with on_device(indices):
        return kernels.bincount(indices, num_codes)


bincount = torch.library.custom_op("vqfast::bincount", _bincount, mutates_args=())


@bincount.register_fake
def _(indices: Tensor, num_codes: int) -> Tensor:
    return indices.new_empty(num_codes, dtype=torch.int64)


def _quantize_forward(z: Tensor, codebook: Tensor, indices: Tensor, beta: float,
                      left_out: bool = False) -> tuple[Tensor, Tensor]:
    with on_device(z):
        return kernels.quantize_forward(z, codebook, indices, beta, left_out)


quantize_forward = torch.library.custom_op("vqfast::quantize_forward", _quantize_forward, mutates_args=())


@quantize_forward.register_fake
def _(z: Tensor, codebook: Tensor, indices: Tensor, beta: float, left_out: bool = False) -> tuple[Tensor, Tensor]:
    return torch.empty_like(z, memory_format=torch.contiguous_format), z.new_empty((), dtype=torch.float32)


def _quantize_backward(grad_zq: Optional[Tensor], grad_loss: Tensor, z: Tensor, codebook: Tensor,
                      indices: Tensor, beta: float, need_grad_codebook: bool,
                      left_out: bool = False) -> tuple[Tensor, Tensor]:
    """``(dz, dcodebook)``; dcodebook is (0, D) when ``need_grad_codebook`` is False."""
    with on_device(z):
        return kernels.quantize_backward(grad_zq, grad_loss, z, codebook, indices, beta, need_grad_codebook, left_out)


quantize_backward = torch.library.custom_op("vqfast::quantize_backward", _quantize_backward, mutates_args=())


@quantize_backward.register_fake
def _(grad_zq: Optional[Tensor], grad_loss: Tensor, z: Tensor, codebook: Tensor,
      indices: Tensor, beta: float, need_grad_codebook: bool, left_out: bool = False) -> tuple[Tensor, Tensor]:
    c_shape = codebook.shape if need_grad_codebook else (0, codebook.shape[1])
    return torch.empty_like(z, memory_format=torch.contiguous_format), codebook.new_empty(c_shape)


vmap_by_loop(nearest_code, rows_arg=0)
vmap_by_loop(gather_rows, rows_arg=1)
for _op in (scatter_add_rows, code_usage, bincount, quantize_forward, quantize_backward):
    vmap_by_loop(_op)

# Tensors the launchers take as they are; subclasses go through the custom op.
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def _direct(op, launcher, mutates: tuple[str, ...] = ()):
    """``launcher`` for plain tensors; ``op`` (the registered custom op) for tensor subclasses, whose
    own dispatch must see the call. ``mutates`` names the arguments the launcher writes in place: their
    version counters are bumped afterwards, as the dispatcher does for the op, so that a graph that
    saved one of them fails in backward instead of silently using the new values."""
    params = list(inspect.signature(launcher).parameters)
    positions = [(params.index(name), name) for name in mutates]

    def call(*args, **kwargs):
        for a in (*args, *kwargs.values()) if kwargs else args:
            if isinstance(a, Tensor) and (type(a) not in _PLAIN_TYPES or is_legacy_batched(a)):
                return op(*args, **kwargs)
        out = launcher(*args, **kwargs)
        for position, name in positions:
            t = args[position] if position < len(args) else kwargs.get(name)
            if t is not None:
                torch.autograd.graph.increment_version(t)
        return out

    call.__name__ = call.__qualname__ = launcher.__name__.lstrip("_")
    call.__doc__ = launcher.__doc__
    return call


# The same ops, called without the dispatcher.
direct = types.SimpleNamespace(
    nearest_code=_direct(nearest_code, _nearest_code),
    gather_rows=_direct(gather_rows, _gather_rows),
    scatter_add_rows=_direct(scatter_add_rows, _scatter_add_rows),
    code_usage=_direct(code_usage, _code_usage),
    bincount=_direct(bincount, _bincount),
    quantize_forward=_direct(quantize_forward, _quantize_forward),
    quantize_backward=_direct(quantize_backward, _quantize_backward),
)


def for_call() -> types.ModuleType | types.SimpleNamespace:
    """This module (its custom ops) while anything traces or intercepts calls (:func:`intercepted`),
    else :data:`direct`."""
    return _THIS_MODULE if intercepted() else direct


# Looked up once, at import: a lookup in sys.modules while torch.compile traces fails for a module first
# imported inside the traced frame.
_THIS_MODULE = sys.modules[__name__]
