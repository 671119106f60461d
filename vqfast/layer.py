"""``VectorQuantizer``: a drop-in VQ layer on the fused ops, with the tools that keep a codebook alive.

Training a VQ layer well needs more than the nearest-code search: a way to learn the codebook (the
codebook loss or exponential moving averages), an initialisation near the data (k-means), restarts of
codes nobody picks, optionally a diversity term, and usage statistics to see what is going on. All of
these live here and run on the device without host synchronisation, so the layer compiles to one
graph (``torch.compile(fullgraph=True)``; with a padding mask, not while k-means pools or with the
diversity terms, see ``VectorQuantizer``) and keeps identical codebooks on every rank under DDP.
"""

from __future__ import annotations

import contextlib
from copy import deepcopy
import inspect
import math
import warnings
from typing import Any, Callable

import torch
from torch import Tensor, nn

from vqfast import reference
from vqfast._autograd import apply_function, signature_kept
from vqfast._checks import (
    SMALLEST_TEMPERATURE, check_bool, check_int, check_number, check_row_mask, check_search_inputs, host_values,
)
from vqfast.distributed import all_gather_rows, all_reduce_sum_, world_size
from vqfast.functional import (
    _at_least_float32, _masked_quantize_rows, _ops, first_order_only, gather, nearest_code, quantize, resolve_backend,
    rotate_to_codes,
)

__all__ = ["CodebookEmbedding", "VectorQuantizer", "soft_assignment_entropy"]

INITS = ("xavier_normal", "uniform", "kmeans")
GRADIENTS = ("straight_through", "rotation")
PRECISIONS = ("fp32", "tf32", "bf16")
# Dead codes re-seeded per training step at most (see _update_statistics).
_RESTARTS_PER_STEP = 1024
# The layer's precision names -> nearest_code's (torch.set_float32_matmul_precision names).
_SEARCH_PRECISION = {"fp32": "highest", "tf32": "high", "bf16": "highest"}
# ... and the soft-entropy kernel's (Triton's input_precision names; for "bf16" it is the precision
# of the fp32 gradient products, the logit products being bf16).
_KERNEL_PRECISION = {"fp32": "ieee", "tf32": "tf32", "bf16": "tf32"}


_KMEANS_POOL_KEYS = ("kmeans_pool", "kmeans_pool_batches")
_SMALLEST_TEMPERATURE = SMALLEST_TEMPERATURE  # (see vqfast._checks)


def _save_kmeans_pool(module: "VectorQuantizer", state_dict: dict[str, Any], prefix: str, local_metadata) -> None:
    """State-dict hook: while the layer pools batches for k-means, the rows pooled so far and how many
    batches they came from (``kmeans_pool``, ``kmeans_pool_batches``). Absent otherwise, so the keys of
    a trained layer are those of its parameters and buffers alone."""
    if module._kmeans_pool_batches > 0:
        state_dict[prefix + _KMEANS_POOL_KEYS[0]] = module.kmeans_pool
        state_dict[prefix + _KMEANS_POOL_KEYS[1]] = module.kmeans_pool_batches


def _move_kmeans_pool(module: "VectorQuantizer", incompatible_keys: Any) -> None:
    """Load post-hook: the loaded pool goes to the codes' device, known only once the embedding (loaded
    after its parent) holds them; ``load_state_dict(assign=True)`` may have moved them, e.g. off meta."""
    module._pool_to_codebook_device()


def _bincount(indices: Tensor, num_codes: int) -> Tensor:
    """``torch.bincount(indices, minlength=num_codes + 1)[:num_codes]`` (int64), with a static output
    shape: index ``num_codes`` marks a row left out (see ``_statistics_indices``).

    ``torch.bincount``'s output length depends on the data, which ``torch.compile`` cannot trace; the
    Triton path is the bincount kernel behind ``vqfast.code_usage``, which skips indices out of range.
    """
    flat = indices.reshape(-1)
    if resolve_backend(flat.device) == "triton":
        return _ops().bincount(flat, num_codes)
    counts = torch.zeros(num_codes + 1, dtype=torch.int64, device=flat.device)
    return counts.index_add_(0, flat, torch.ones_like(flat))[:num_codes]


def _sum_rows(rows: Tensor, indices: Tensor, num_codes: int) -> Tensor:
    """Per-code sums of ``rows`` (N, D) in fp32, rows with index ``num_codes`` left out:
    ``zeros(K + 1, D).index_add_(0, indices, rows.float())[:K]``."""
    rows = rows.float()
    if resolve_backend(rows.device, rows.dtype) == "triton":
        return _ops().scatter_add_rows(rows, indices.reshape(-1), num_codes, torch.float32)
    out = torch.zeros(num_codes + 1, rows.shape[1], dtype=torch.float32, device=rows.device)
    return out.index_add_(0, indices.reshape(-1), rows)[:num_codes]


_OPS_LAYER_MODULE = None


def _upkeep_ops():
    """The codebook-upkeep custom ops (or their direct launchers, for eager calls)."""
    # Imported lazily (importing vqfast must not need triton), once: an import statement costs ~1 us.
    global _OPS_LAYER_MODULE
    if _OPS_LAYER_MODULE is None:
        from vqfast import ops_layer

        _OPS_LAYER_MODULE = ops_layer
    return _OPS_LAYER_MODULE.for_call()


def _autocast_on(device_type: str) -> bool:
    """Whether autocast may be on for ``device_type`` (True for a device type that autocast does not know:
    the context then decides, or says what is wrong). torch.compile reads the state as a constant and
    guards on it; torch.export bakes in the state at export time."""
    if device_type == "meta":  # shapes only: autocast has no meta mode
        return False
    try:
        return torch.is_autocast_enabled(device_type)
    except Exception:  # noqa: BLE001
        return True


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_mask(mask: Tensor, z: Tensor, cdim: int) -> None:
    """A layer's ``mask``: a bool tensor on z's device, shaped like z without its channel dimension."""
    check_row_mask(mask, z.shape[:cdim] + z.shape[cdim + 1:], z.device,
                   f"z {tuple(z.shape)}, channels at dim {cdim}")


def _channel_dim_for(channel_dim: int | None, ndim: int, what: str) -> int:
    """Where the channels are in an input of ``ndim`` dimensions (``what`` names it in errors): at
    ``channel_dim`` if given, else at dim 1 for 4 or more dimensions and last otherwise."""
    if channel_dim is not None:
        if not -ndim <= channel_dim < ndim:
            raise ValueError(f"channel_dim={channel_dim} is out of range for {what}")
        return channel_dim % ndim
    return 1 if ndim >= 4 else ndim - 1


def _checked_input(z: Tensor, mask: Tensor | None, channel_dim: int | None, channels: int, expected: str) -> int:
    """The checks of an input ``z`` (and its ``mask``) to a layer that wants ``channels`` channels
    (``expected`` says which in errors); the dimension of its channels."""
    if not isinstance(z, Tensor):
        raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
    if z.dim() < 2:
        raise ValueError(f"z must have a batch and a channel dimension, got shape {tuple(z.shape)}")
    if not z.is_floating_point():
        raise TypeError(f"z must be a floating-point tensor, got {z.dtype}")
    cdim = _channel_dim_for(channel_dim, z.dim(), f"z of shape {tuple(z.shape)}")
    if z.shape[cdim] != channels:
        raise ValueError(
            f"z has {z.shape[cdim]} channels at dim {cdim}, expected {expected} "
            f"(shape {tuple(z.shape)}); pass channel_dim= if the channels are elsewhere"
        )
    if mask is not None:
        _check_mask(mask, z, cdim)
    return cdim


@signature_kept
class _LayoutQuantize(torch.autograd.Function):
    """quantize's fused step (``_FusedQuantize``) for a layer input ``z`` in its own layout: takes ``z``
    (for its gradient) and its rows (N, D), detached, and returns ``z_q`` in ``z``'s layout, as
    ``VectorQuantizer.forward`` builds it; the backward takes the rows of z_q's gradient and returns z's
    gradient in z's layout. The values are those of ``quantize`` on the rows followed by the layout's
    reshape and permute, which move values only. ``copy``: the codebook is saved for the backward as
    a private copy (dead-code restarts rewrite it in place after the step), while its gradient goes to
    the codebook itself."""

    # (setup_context and a generated vmap rule: torch.func transforms, vmap and grad, can run it.)
    generate_vmap_rule = True

    @staticmethod
    def forward(z: Tensor, codebook: Tensor, rows: Tensor, indices: Tensor, beta: float,  # type: ignore[override]
                cdim: int, last_shape: torch.Size, copy: bool, left_out: bool):
        z_q, loss = _ops().quantize_forward(rows, codebook, indices, beta, left_out)
        z_q = z_q.reshape(last_shape).movedim(-1, cdim)
        if z.is_contiguous() and not z_q.is_contiguous():
            z_q = z_q.contiguous()
        return z_q, loss

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        z, codebook, rows, indices, beta, cdim, last_shape, copy, left_out = inputs
        ctx.save_for_backward(*reference.saveable(rows, codebook.clone() if copy else codebook, indices))
        ctx.beta, ctx.cdim, ctx.last_shape, ctx.left_out = beta, cdim, last_shape, left_out
        ctx.set_materialize_grads(False)
        if not ctx.needs_input_grad[0]:
            # Straight through: z_q's gradient goes to z alone, so without z needing one it has none.
            ctx.mark_non_differentiable(output[0])

    @staticmethod
    @first_order_only
    def backward(ctx, grad_zq: Tensor | None, grad_loss: Tensor | None):  # type: ignore[override]
        rows, codebook, indices = ctx.saved_tensors
        need_z, need_c = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_loss is None:
            return grad_zq if need_z else None, None, None, None, None, None, None, None, None
        cdim = ctx.cdim
        grad_rows = None if grad_zq is None else grad_zq.movedim(cdim, -1).reshape(rows.shape)
        grad_z, grad_codebook = _ops().quantize_backward(grad_rows, grad_loss, rows, codebook, indices, ctx.beta,
                                                         need_c, ctx.left_out)
        return (grad_z.reshape(ctx.last_shape).movedim(-1, cdim) if need_z else None,
                grad_codebook if need_c else None, None, None, None, None, None, None, None)


def _searchable_rows(rows: Tensor) -> Tensor:
    """Boolean (N,): fp32 rows whose squared norm is finite. The others (NaN, inf, elements beyond about
    1e19) have no finite distance to a code, and in k-means their sums would overflow the centroids."""
    # A sum of squares is >= 0 or NaN: "< inf" is isfinite in one op (isfinite takes four).
    return rows.square().sum(dim=-1) < math.inf


@torch.library.custom_op("vqfast::snapshot", mutates_args=())
def _snapshot_op(t: Tensor) -> Tensor:
    """``t.clone()`` as an op opaque to the compiler (see :func:`_snapshot`)."""
    return t.clone()


@_snapshot_op.register_fake
def _(t: Tensor) -> Tensor:
    return torch.empty_like(t)


def _snapshot_backward(ctx: Any, grad: Tensor) -> Tensor:
    return grad


_snapshot_op.register_autograd(_snapshot_backward)


def _snapshot(t: Tensor) -> Tensor:
    """A copy of ``t`` (``t.clone()``, differentiable) that a later in-place update of ``t`` leaves alone.
    Compiled, a plain clone of a tensor the graph then updates in place is not safe: AOTAutograd may
    recompute it in the backward from the updated tensor, or drop it (the step's gradients then see
    the codebook after its EMA update or restarts); an opaque op it can neither recompute nor remove."""
    return _snapshot_op(t) if torch.compiler.is_compiling() else t.clone()


def _in_backward_pass() -> bool:
    """Whether autograd is running a backward pass on this thread (a forward then is a recompute)."""
    return torch._C._current_graph_task_id() != -1


@signature_kept
class _SoftEntropy(torch.autograd.Function):
    """Sample and batch entropies of soft assignments through the streaming Triton kernels."""

    # (setup_context and a generated vmap rule: torch.func transforms, vmap and grad, can run it. The
    # per-row statistics the backward needs are outputs too, without gradients: apply(...)[:2].)
    generate_vmap_rule = True

    @staticmethod
    def forward(rows: Tensor, codebook: Tensor, scale: float, precision: str):  # type: ignore[override]
        from vqfast import ops_layer

        row_max, log_sum, ent, colsum = ops_layer.soft_entropy_forward(rows, codebook, scale, precision)
        n = rows.shape[0]
        avg = colsum / n
        sample_entropy = ent.sum() / n
        batch_entropy = -torch.special.xlogy(avg, avg).sum()
        return sample_entropy, batch_entropy, row_max, log_sum, ent, avg

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        rows, codebook, scale, precision = inputs
        kept = output[2:]
        ctx.mark_non_differentiable(*kept)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*reference.saveable(rows, codebook), *kept)
        ctx.scale = scale
        ctx.precision = precision

    @staticmethod
    @first_order_only
    def backward(ctx, grad_sample: Tensor | None, grad_batch: Tensor | None,  # type: ignore[override]
                 *_statistics: Tensor | None):
        from vqfast import ops_layer

        rows, codebook, row_max, log_sum, ent, avg = ctx.saved_tensors
        n = rows.shape[0]
        zero = torch.zeros((), dtype=torch.float32, device=rows.device)
        grad_sample = zero if grad_sample is None else grad_sample.float()
        grad_batch = zero if grad_batch is None else grad_batch.float()
        # d(batch entropy)/d(avg_j) = -(log avg_j + 1); the +1 and any constant drop out because each row
        # of p sums to 1. Centring w on its average under p keeps the kernel's U - r V difference small
        # (a plain mean would be dominated by the huge -log avg of codes nobody is near).
        w = -grad_batch * torch.log(avg.clamp_min(torch.finfo(torch.float32).tiny)) / n
        w = w - (avg * w).sum()
        coef = (grad_sample / n).reshape(1)
        dz, dc = ops_layer.soft_entropy_backward(rows, codebook, row_max, log_sum, ent, w, coef, ctx.scale,
                                                 ctx.precision, ctx.needs_input_grad[1])
        return (dz.to(rows.dtype) if ctx.needs_input_grad[0] else None,
                dc.to(codebook.dtype) if ctx.needs_input_grad[1] else None, None, None)


def soft_assignment_entropy(
    z: Tensor, codebook: Tensor, temperature: float = 1.0, metric: str = "l2", precision: str = "fp32"
) -> tuple[Tensor, Tensor]:
    """``(sample_entropy, batch_entropy)`` of ``p = softmax(-distance / temperature)``, differentiable.

    Plain PyTorch (what :func:`vqfast.reference.soft_assignment_entropy` computes in row blocks)::

        p = torch.softmax(-torch.cdist(z, codebook) ** 2 / temperature, dim=1)   # cosine: 1 - cos
        sample_entropy = -(p * p.log()).sum(1).mean()
        avg = p.mean(0); batch_entropy = -(avg * avg.log()).sum()

    On the Triton backend the N x K matrix is never built: the kernels stream codebook tiles with an
    online softmax, and the backward recomputes each tile. ``z`` is (..., D). ``precision`` (Triton
    backend): "fp32" = fp32 products throughout; "tf32" = tf32 tensor-core products; "bf16" = z and
    the codes rounded to bf16 for the logits, tf32 products for the gradients. The gradients are
    float32-accurate relative to the scale of the terms, not to their own size: the batch entropy's
    gradient, ``p * (g - (p * g).sum())``, cancels where assignments are near uniform or near one-hot,
    so a gradient of 1e-15 there may be off by its own size (on every backend).
    """
    check_search_inputs(z, codebook, metric, allow_mixed_dtypes=True)
    # The kernels scale by 2 / T in float32 (see _SMALLEST_TEMPERATURE).
    temperature = check_number(temperature, "temperature", minimum=_SMALLEST_TEMPERATURE)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    rows = z.reshape(-1, z.shape[-1])
    if rows.dtype != codebook.dtype:
        wide = torch.promote_types(torch.promote_types(rows.dtype, codebook.dtype), torch.float32)
        rows, codebook = rows.to(wide), codebook.to(wide)
    if resolve_backend(rows.device, rows.dtype) == "torch":
        return _nan_for_non_finite_rows(
            z, reference.soft_assignment_entropy(rows, codebook, temperature=temperature, metric=metric))
    if rows.shape[0] == 0:
        zero = (rows.sum() + codebook[:0].sum()).float() * 0.0
        return zero, zero
    scale = 1.0 / temperature
    if metric == "cosine":
        # Unit vectors in fp32 at least, as the reference's: 16-bit ones would lose the digits that
        # 1 - cos of nearby vectors is made of ("bf16" rounds them afterwards, as it rounds l2 rows).
        rows = reference.unit_rows(_at_least_float32(rows))
        codebook = reference.unit_rows(_at_least_float32(codebook))
        scale *= 0.5  # ||a - b||^2 / 2 = 1 - cos for unit vectors
    if precision == "bf16":
        rows, codebook = rows.bfloat16(), codebook.bfloat16()
    terms = apply_function(_SoftEntropy, rows, codebook, scale, _KERNEL_PRECISION[precision])
    return _nan_for_non_finite_rows(z, terms[:2])


def _nan_for_non_finite_rows(rows: Tensor, entropies: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Both entropies NaN when ``rows`` hold NaN or inf. A row holding inf has no softmax to speak of (its
    logits saturate or are inf - inf), yet it could leave finite entropies while its 0 * inf made the
    codebook gradient NaN: a finite loss would then hide it until the codes turned NaN. No host sync."""
    finite = torch.isfinite(rows).all()
    nan = torch.full((), float("nan"), dtype=entropies[0].dtype, device=entropies[0].device)
    return torch.where(finite, entropies[0], nan), torch.where(finite, entropies[1], nan)


def _init_codes(weight: Tensor, init: str) -> None:
    """Draw the codes of a (K, D) codebook in place: "uniform" +-1/K, otherwise xavier-normal (the
    article's; k-means replaces these on the first training batches)."""
    if init == "uniform":
        nn.init.uniform_(weight, -1.0 / weight.shape[0], 1.0 / weight.shape[0])
    else:
        nn.init.xavier_normal_(weight)


class CodebookEmbedding(nn.Embedding):
    """The layer's codebook: an ``nn.Embedding`` whose ``reset_parameters`` draws the codes as the layer's
    ``init`` does (``nn.Embedding``'s draws N(0, 1), about 50 times the xavier-normal scale of a 4,096 x
    128 codebook). A model built on the meta device and re-initialised after ``to_empty`` calls it."""

    def __init__(self, num_embeddings: int, embedding_dim: int, codebook_init: str = "xavier_normal",
                 **kwargs: Any) -> None:
        self.codebook_init = codebook_init  # (nn.Embedding.__init__ calls reset_parameters)
        super().__init__(num_embeddings, embedding_dim, **kwargs)

    def reset_parameters(self) -> None:
        _init_codes(self.weight, self.codebook_init)


def _warn_unused_options(**options: tuple[Any, bool, str]) -> None:
    """Warn about each option set away from its default where it has no effect (``name=(value, unused,
    what_it_needs)``): ``VectorQuantizer(..., decay=0.8)`` without ``ema=True`` (vector-quantize-pytorch's
    default) would otherwise train by the codebook loss without a word."""
    defaults = inspect.signature(VectorQuantizer.__init__).parameters
    for name, (value, unused, needs) in options.items():
        default = defaults[name].default
        changed = value is not default if default is None else value != default
        if unused and changed:
            warnings.warn(f"VectorQuantizer: {name}={value!r} has no effect without {needs}", UserWarning,
                          stacklevel=3)


class VectorQuantizer(nn.Module):
    """Vector quantization with straight-through gradients.

    ``forward(z)`` takes (B, C, H, W) (channels at dim 1; any input with 4 or more dims defaults to
    channels at dim 1), (B, N, C) or (N, C) (channels last), or any layout with ``channel_dim`` given,
    and returns ``(z_q, loss, indices)`` in the input's layout: z_q has the value of the nearest code
    and passes gradients straight to z (for the cosine metric, z_q is the unit code and its gradient
    goes through z's l2-normalisation); indices are int64 with the channel dimension removed (with
    ``heads`` > 1, a last dimension of ``heads`` in its place). The
    codebook is ``self.embeddings`` (an ``nn.Embedding``: a :class:`CodebookEmbedding`, whose
    ``reset_parameters`` draws codes as ``init`` does; kept float32 when the model is converted
    to fp16 or bf16, as are the running statistics), so its weights move by name
    (``embeddings.weight``) to and from the article's layer. Plain PyTorch for one step::

        q = codebook[argmin_k ||z - c_k||^2]
        loss = mse(q, sg(z)) + beta * mse(z, sg(q))          # ema=True: beta * mse(z, sg(q)) only
        loss += sample_entropy_weight * H_sample - batch_entropy_weight * H_batch   # if enabled
        z_q = z + sg(q - z)

    Codebook learning: by the codebook loss (default) or, with ``ema=True``, by exponential moving
    averages as in the VQ-VAE paper (``decay``, Laplace-smoothed counts with ``eps``; the running counts
    start at 1, without Sonnet's bias correction); the codebook then gets no gradient. A codebook frozen
    with ``requires_grad_(False)`` in codebook-loss mode is never rewritten (no k-means, no restarts).
    ``init``: "xavier_normal" (the article), "uniform" (+-1/K) or "kmeans" (``kmeans_iters`` Lloyd
    iterations on the rows of the first ``kmeans_batches`` training batches, pooled, from K distinct seed
    rows; until then the layer quantizes with the xavier-normal codes, and its usage statistics start
    over once k-means has run. With fewer pooled rows than K, the codes left without a seed row keep
    their values, and restarts re-seed those that stay unused).
    A state dict says whether its codebook is initialised (the ``initialized`` buffer): loading one
    saved before k-means ran makes this layer run k-means on its next training batches, whatever its
    own ``init``; a state dict without that buffer (e.g. the article's layer's) counts as initialised.
    While the layer pools batches for k-means, its state dict also holds the rows pooled so far
    (``kmeans_pool``, float32 (R, D), and ``kmeans_pool_batches``), so a checkpoint taken in between
    resumes with the same k-means.
    ``dead_code_threshold``: in training, codes whose running usage share falls below this fraction of the uniform share 1/K (and
    that the current batch did not use) are re-seeded from random encoder outputs of the current batch
    at the end of the step (lowest index first, at most 1,024 per step and no more than the batch has
    rows, each from a different row), with a grace period before they
    can be re-seeded again (0 disables). Never used codes are re-seeded from the end of the first
    training step on. ``usage_decay`` is the decay of that running usage, reported by
    :meth:`codebook_usage`. ``metric``: "l2" or "cosine" (codes and inputs l2-normalised).
    Rows holding NaN or inf still get a code (in range) and make the loss NaN (inf for a row holding inf
    and no NaN, also with beta = 0; with EMA, beta * mse, 0 for beta = 0; NaN for the cosine metric,
    whose unit row is inf / inf), but are left out of the
    usage statistics, the EMA averages, k-means and restart seeds, so one bad batch cannot turn a
    code into NaN for good. A training forward updates the layer's state and must not be recomputed:
    under activation checkpointing its recompute raises RuntimeError.
    ``forward(z, mask=...)``: a bool tensor shaped like z without its channels (e.g. (B, T) padding masks of
    sequences), True for the rows to quantize. The others (padding, whatever they hold) keep
    ``z_q = z`` with its gradient, get index -1 (which :meth:`codes_from_indices` decodes to zeros),
    and take no part in the loss (a mean over the kept rows, 0 when none is kept), the diversity
    terms, the statistics, the EMA averages, k-means or the restart seeds. Restart seeds are drawn
    from the kept rows with another random stream than without a mask (the same distribution). A
    batch whose rows are all left out (or all NaN) leaves the running statistics, the EMA averages
    and the codes as they are, decided on the device (the last batch's counts then show no code
    used); k-means does not pool it (without DDP). Without a
    host sync, except where the kept rows are selected: on the batches that k-means pools and with
    the diversity terms on, where ``torch.compile(fullgraph=True)`` therefore fails (the selection's
    size depends on the data). On the GPU a masked step runs the fused kernels too, which leave out
    the rows of index -1; where the fused step does not apply (the cosine metric, the diversity
    terms, the rotation trick, under ``torch.compile``, the CPU backend) it computes its loss and
    ``z_q`` with PyTorch ops around the search and ``vqfast.gather`` (a few N x D temporaries).
    ``heads``: each position's channels are ``heads`` vectors of ``embedding_dim`` in turn, each
    quantized with the one codebook (multi-head VQ); the indices then end in a dimension of ``heads``
    (a mask stays one of positions). 1 by default. (A codebook per head: :class:`vqfast.ProductVectorQuantizer`.)
    ``gradient``: how the gradient of ``z_q`` reaches ``z``: "straight_through" (default, unchanged)
    or "rotation" (the rotation trick of Fifty et al., 2024, :func:`vqfast.rotate_to_codes`: rotated
    and scaled the way each row is carried onto its code, from the unit rows for the cosine metric;
    the losses and the codebook's gradient are unchanged; the step then skips the layout-fused
    step: quantize's fused kernels give the loss, and the rotation's backward is one more kernel on
    the GPU, PyTorch ops elsewhere).
    ``precision`` of the search: "tf32" (default: on the GPU tensor cores, then rows whose best code is
    in doubt within the tf32 error bound are settled in fp32, so the indices are the exact ones),
    "fp32" (the same search, with the rows that have three or more codes in doubt searched again with
    fp32 products instead of tf32x3, and the soft-entropy products in fp32) or "bf16" (inputs and codes
    rounded to bf16 on every backend; fastest on the GPU, may pick a near-tied code). On the CPU, "tf32" and "fp32" are the exact
    fp32 search (fp64 inputs: fp64).
    Under ``torch.distributed``, statistics are summed over ranks and the random rows that seed k-means
    and restarts are drawn from all ranks' batches and gathered to every rank, so every rank keeps the
    same codebook (``sync_distributed=False`` turns this off).
    An option set away from its default where nothing uses it (``decay``/``eps`` without ``ema=True``,
    ``kmeans_iters``/``kmeans_batches`` without ``init="kmeans"``, ``entropy_temperature`` with both
    entropy weights 0, ``process_group`` with ``sync_distributed=False``) gives a UserWarning.

    Defaults keep a large codebook alive without tuning: the codebook loss with the VQ-VAE paper's
    beta = 0.25 (it needs no extra state and works with any optimizer), plus dead-code restarts, which
    re-seed never-used codes after the first step and codes unused for a few hundred steps later. On
    the article's VQ-VAE (4,096 x 128 codes, CIFAR-10 10k, 10 epochs, Adam 1e-3, batch 64, one seed)
    this used 4,090 of the 4,096 codes on the training images at 19.93 dB PSNR on the first 1,000 test
    images; the article's settings (beta 1, no restarts, defects fixed) used 100 codes at 18.61 dB.
    (Same setup: ``dead_code_threshold=0.1`` 20.42 dB with 4,096 codes, ``ema=True`` 20.24 dB with
    4,096, ``init="kmeans"`` 20.08 dB with 4,095; benchmarks/results/cpu-vqvae-defaults, its
    one-pass runs.)
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        beta: float = 0.25,
        channel_dim: int | None = None,
        metric: str = "l2",
        init: str = "xavier_normal",
        *,
        ema: bool = False,
        decay: float = 0.99,
        eps: float = 1e-5,
        kmeans_iters: int = 10,
        kmeans_batches: int = 1,
        dead_code_threshold: float = 0.01,
        usage_decay: float = 0.99,
        sample_entropy_weight: float = 0.0,
        batch_entropy_weight: float = 0.0,
        entropy_temperature: float = 1.0,
        precision: str = "tf32",
        sync_distributed: bool = True,
        process_group: Any = None,
        gradient: str = "straight_through",
        heads: int = 1,
    ) -> None:
        super().__init__()
        num_embeddings = check_int(num_embeddings, "num_embeddings", minimum=1)
        embedding_dim = check_int(embedding_dim, "embedding_dim", minimum=1)
        if channel_dim is not None:
            channel_dim = check_int(channel_dim, "channel_dim")
        beta = check_number(beta, "beta", minimum=0.0)
        ema = check_bool(ema, "ema")
        sync_distributed = check_bool(sync_distributed, "sync_distributed")
        decay = check_number(decay, "decay", minimum=0.0, below=1.0)
        usage_decay = check_number(usage_decay, "usage_decay", minimum=0.0, below=1.0)
        for name, value in (("decay", decay), ("usage_decay", usage_decay)):
            # The running statistics are float32: a decay that rounds to 1 there would never move them.
            if reference.stored_decay(value, torch.float32) == 1.0:
                raise ValueError(f"{name} must be below 1 - 2**-25 (it rounds to 1 in float32), got {value!r}")
        eps = check_number(eps, "eps", minimum=0.0)
        if eps > torch.finfo(torch.float32).max:  # (the running counts are float32: inf there makes them NaN)
            raise ValueError(f"eps must be finite in float32 (at most 3.4e38), got {eps}")
        dead_code_threshold = check_number(dead_code_threshold, "dead_code_threshold", minimum=0.0)
        kmeans_iters = check_int(kmeans_iters, "kmeans_iters", minimum=0)
        kmeans_batches = check_int(kmeans_batches, "kmeans_batches", minimum=1)
        # The signs are built in (the loss adds sample_entropy_weight * H_sample - batch_entropy_weight *
        # H_batch): a negative weight, e.g. one meant to "maximise" the batch entropy, would reverse its term.
        sample_entropy_weight = check_number(sample_entropy_weight, "sample_entropy_weight", minimum=0.0)
        batch_entropy_weight = check_number(batch_entropy_weight, "batch_entropy_weight", minimum=0.0)
        entropy_temperature = check_number(entropy_temperature, "entropy_temperature", minimum=_SMALLEST_TEMPERATURE)
        if metric not in ("l2", "cosine"):
            raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if gradient not in GRADIENTS:
            raise ValueError(f"gradient must be one of {GRADIENTS}, got {gradient!r}")
        self.heads = check_int(heads, "heads", minimum=1)
        _warn_unused_options(
            decay=(decay, not ema, "ema=True"),
            eps=(eps, not ema, "ema=True"),
            kmeans_iters=(kmeans_iters, init != "kmeans", "init='kmeans'"),
            kmeans_batches=(kmeans_batches, init != "kmeans", "init='kmeans'"),
            entropy_temperature=(entropy_temperature, sample_entropy_weight == 0 and batch_entropy_weight == 0,
                                 "a positive sample_entropy_weight or batch_entropy_weight"),
            process_group=(process_group, not sync_distributed, "sync_distributed=True"),
        )
        self.num_embeddings = num_embeddings
        self.gradient = gradient
        self.embedding_dim = embedding_dim
        self.beta = float(beta)
        self.channel_dim = channel_dim
        self.metric = metric
        self.init = init
        self.ema = bool(ema)
        self.decay = float(decay)
        self.eps = float(eps)
        self.kmeans_iters = int(kmeans_iters)
        self.kmeans_batches = int(kmeans_batches)
        # Rows of the training batches pooled before k-means runs, and how many batches they came from.
        # In the state dict while the layer pools ("kmeans_pool", "kmeans_pool_batches"), so that a checkpoint
        # taken in between resumes with the same k-means (see _save_kmeans_pool).
        self._kmeans_pool: list[Tensor] = []
        self._kmeans_pool_batches = 0
        # Set by a residual chain while an earlier stage is not initialised: this stage's input is not
        # yet what it will be, so it pools nothing (and, not initialised, restarts nothing).
        self._kmeans_paused = False
        self.register_state_dict_post_hook(_save_kmeans_pool)
        self.register_load_state_dict_post_hook(_move_kmeans_pool)
        self.dead_code_threshold = float(dead_code_threshold)
        self.usage_decay = float(usage_decay)
        self.sample_entropy_weight = float(sample_entropy_weight)
        self.batch_entropy_weight = float(batch_entropy_weight)
        self.entropy_temperature = float(entropy_temperature)
        self.precision = precision
        self.sync_distributed = bool(sync_distributed)
        self.process_group = process_group

        # float32 whatever torch.get_default_dtype() is: a model built under a 16-bit default would
        # otherwise get a 16-bit codebook and statistics (an fp16 count overflows at 65,504 rows).
        self.embeddings = CodebookEmbedding(num_embeddings, embedding_dim, init, dtype=torch.float32)

        k = num_embeddings
        # Running usage share of every code (an EMA of per-step assignment frequencies, started at 0 and
        # bias-corrected by the step count like Adam's moments, so never-used codes count as dead early).
        self.register_buffer("usage", torch.zeros(k, dtype=torch.float32))
        self.register_buffer("usage_steps", torch.zeros((), dtype=torch.float32))
        # Usage credited to freshly restarted codes so that they are not restarted again before they had
        # a chance to be picked; kept apart from the measured usage, which is what gets reported.
        self.register_buffer("restart_grace", torch.zeros(k, dtype=torch.float32))
        self.register_buffer("batch_counts", torch.zeros(k, dtype=torch.int64))
        self.register_buffer("initialized", torch.tensor(init != "kmeans"))
        # Mirrors the buffer as a Python bool: a tensor test would sync the host (and break the graph)
        # on every forward.
        self._needs_init = init == "kmeans"
        if self.ema:
            self.embeddings.weight.requires_grad_(False)
            # Running (decayed) counts per code, started at 1. The matching running sums are not stored:
            # they equal codebook * smoothed counts at every step (see _update_statistics), so codes set
            # from outside (re-initialised, loaded, restarted) never disagree with the averages.
            self.register_buffer("ema_count", torch.ones(k, dtype=torch.float32))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The layer as built: codes drawn afresh by ``init`` (k-means again on the next training batches
        for "kmeans"), usage statistics from zero (EMA counts 1), nothing pooled. For a model built on
        the meta device: after ``to_empty`` its codes and statistics hold whatever memory held until
        this runs (``model.apply(lambda m: getattr(m, "reset_parameters", lambda: None)())``)."""
        if self._codebook_parametrized():
            self._refuse_rewrite("reset_parameters")
        _init_codes(self.embeddings.weight, self.init)
        for name in ("usage", "usage_steps", "restart_grace", "batch_counts"):
            getattr(self, name).zero_()
        if self.ema:
            self.ema_count.fill_(1.0)
        self.initialized.fill_(self.init != "kmeans")
        self._needs_init = self.init == "kmeans"
        self._kmeans_pool = []
        self._kmeans_pool_batches = 0

    def __prepare_scriptable__(self) -> "VectorQuantizer":
        # (torch.jit.script calls this first; its own error names a list attribute, not the way out.)
        raise RuntimeError(f"{type(self).__name__} does not support TorchScript (torch.jit.script): use "
                           "torch.compile, or torch.export of the layer in eval mode")

    def __deepcopy__(self, memo: dict[int, Any]) -> "VectorQuantizer":
        """``copy.deepcopy``, sharing ``process_group``: a group is a handle to live communicators, which
        cannot be copied (the default deepcopy failed on it), and a copy (say, an EMA of the model's
        weights) synchronises over the same ranks."""
        if self.process_group is not None:
            memo[id(self.process_group)] = self.process_group
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__setstate__(deepcopy(self.__getstate__(), memo))
        return copied

    # -- forward ---------------------------------------------------------------------------------

    def _channel_dim(self, z: Tensor) -> int:
        return self._channel_dim_of(z.dim(), f"z of shape {tuple(z.shape)}")

    def _channel_dim_of(self, ndim: int, what: str) -> int:
        """Where the channels are in an input of ``ndim`` dimensions (``what`` names it in errors)."""
        return _channel_dim_for(self.channel_dim, ndim, what)

    def codes_from_indices(self, indices: Tensor, check_indices: bool = True,
                           dtype: torch.dtype | None = None) -> Tensor:
        """The values of the ``z_q`` that :meth:`forward` returns for these ``indices``, in the same layout:
        the codes with the channel dimension put back where forward finds it, e.g. (B, C, H, W) for
        (B, H, W) indices, (B, N, C) for (B, N) and (N, C) for (N,) (or at ``channel_dim``); unit codes
        for the cosine metric. For decoding indices that did not come from an encoder (a prior's
        samples, stored tokens). The codes as they are now: a training forward that rewrote the codebook
        afterwards (EMA, restarts) returned the codes before that.

        Plain PyTorch: ``self.embeddings.weight[indices].movedim(-1, channel_dim)`` (with ``heads`` > 1,
        indices end in a dimension of ``heads``, and ``.flatten(-2)`` comes before the move). In the codebook's
        dtype (float32; forward's ``z_q`` is in z's), differentiable with respect to the codebook.
        Index -1 (a row that forward's ``mask`` left out) gives a zero vector. Other indices outside
        [0, K) raise ValueError, a host-side check that ``check_indices=False`` skips on the GPU (as in
        :func:`vqfast.gather`, which under ``torch.compile`` checks with an assertion inside the graph
        on the CPU backend and not at all on the Triton backend). ``dtype``: the codes in that dtype
        instead, e.g. ``torch.float16`` for the decoder of a ``.half()`` model (forward's ``z_q`` is
        in z's).
        """
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        # (A dtype passed in check_indices' place would otherwise count as True and be ignored.)
        check_indices = check_bool(check_indices, "check_indices")
        if not isinstance(indices, Tensor):
            raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
        if indices.dim() == 0:
            raise ValueError("indices must have at least a batch dimension, got a 0-dimensional tensor")
        if self.heads > 1 and (indices.dim() < 2 or indices.shape[-1] != self.heads):
            raise ValueError(f"indices must end in a dimension of heads={self.heads}, got shape {tuple(indices.shape)}")
        positions = indices.dim() - (self.heads > 1)
        channel_dim = self._channel_dim_of(positions + 1, f"codes from indices of shape {tuple(indices.shape)}")
        weight = self.embeddings.weight
        if self.metric == "cosine":
            weight = reference.unit_rows(weight)
        if indices.dtype in (torch.int64, torch.int32):
            if ((check_indices or indices.device.type != "cuda") and not torch.compiler.is_compiling()
                    and indices.numel() and not indices.is_meta and int(host_values(indices).min()) < -1):
                raise ValueError(f"indices must be -1 (a row a mask left out) or lie in [0, {self.num_embeddings}), "
                                 f"got {int(host_values(indices).min())}")
            # Only -1 is replaced: other indices out of range still reach gather's checks (which under
            # torch.compile on the CPU backend assert inside the graph).
            left_out = indices == -1
            codes = gather(weight, torch.where(left_out, 0, indices), check_indices=check_indices)
            codes = torch.where(left_out.unsqueeze(-1), 0.0, codes)
        else:
            codes = gather(weight, indices, check_indices=check_indices)  # (which says what is wrong)
        if self.heads > 1:
            codes = codes.reshape(*indices.shape[:-1], self.heads * self.embedding_dim)
        if dtype is not None:
            codes = codes.to(dtype)
        return codes.movedim(-1, channel_dim).contiguous()

    def _checked_channel_dim(self, z: Tensor, mask: Tensor | None) -> int:
        """The checks of an input ``z`` (and its ``mask``) to the layer; the dimension of its channels."""
        expected = (f"embedding_dim={self.embedding_dim}" if self.heads == 1 else
                    f"heads * embedding_dim = {self.heads} * {self.embedding_dim}")
        return _checked_input(z, mask, self.channel_dim, self.heads * self.embedding_dim, expected)

    def _index_shape(self, positions: torch.Size) -> torch.Size:
        """The indices' shape for these positions (z without its channels): one index per head."""
        return positions if self.heads == 1 else torch.Size((*positions, self.heads))

    def _row_mask(self, mask: Tensor | None) -> Tensor | None:
        """A mask of positions as one of rows (each position's heads in turn)."""
        if mask is None or self.heads == 1:
            return None if mask is None else mask.reshape(-1)
        return mask.unsqueeze(-1).expand(*mask.shape, self.heads).reshape(-1)

    @torch.no_grad()
    def encode(self, z: Tensor, mask: Tensor | None = None) -> Tensor:
        """The indices :meth:`forward` gives for ``z`` in eval mode (-1 where ``mask`` is False), from the
        search alone: no ``z_q``, no loss and, in training mode too, no statistics, k-means, restarts or
        EMA update (so a training forward that runs k-means on this batch searches other codes).
        For tokenizing. Plain PyTorch: ``cdist(z_rows, codebook).argmin(1)`` shaped like forward's indices
        (the layer's metric and search precision)."""
        cdim = self._checked_channel_dim(z, mask)
        z_last = z.movedim(cdim, -1)
        with torch.autocast(device_type=z.device.type, enabled=False) if _autocast_on(z.device.type) \
                else contextlib.nullcontext():
            indices, _ = self._search(z_last.reshape(-1, self.embedding_dim), self.embeddings.weight)
        indices = indices.reshape(self._index_shape(z_last.shape[:-1]))
        if mask is None:
            return indices
        return torch.where(mask if self.heads == 1 else mask.unsqueeze(-1), indices, -1)

    def forward(self, z: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Quantize ``z``; returns ``(z_q, loss, indices)`` (see the class docstring). ``mask``: bool,
        shaped like z without its channel dimension, True for the rows to quantize (padding False)."""
        weight = self.embeddings.weight
        if weight.dtype not in (torch.float32, torch.float64):
            # Reached by casting the embedding itself (the layer's own casts keep it float32): its
            # statistics and restarts need float32, which the Triton backend enforces and the torch
            # backend would not (an fp16 codebook trained there silently).
            raise TypeError(f"the codebook (embeddings.weight) is {weight.dtype}; the layer keeps it float32 "
                            f"(or float64): call .float() on the layer, and cast models as a whole "
                            f"(model.half() keeps the codebook float32)")
        if self.training and torch.jit.is_tracing():
            # A trace records neither the step's no_grad sections nor its data-dependent upkeep: every
            # call of the traced module would fail, or replay the wrong updates.
            raise RuntimeError(f"torch.jit.trace of a {type(self).__name__} in training mode is not supported: "
                               "trace it in eval mode (layer.eval()), or use torch.compile")
        cdim = self._checked_channel_dim(z, mask)
        if mask is not None and torch.is_grad_enabled():
            (mask,) = reference.saveable(mask)  # (the step's selections save it for their backward)
        # The codebook stays float32 under autocast; the layer picks its own precisions below. (Entering
        # the context costs ~10 us, and leaving autocast off, as it mostly is, changes nothing.)
        if _autocast_on(z.device.type):
            with torch.autocast(device_type=z.device.type, enabled=False):
                return self._quantize_layout(z, cdim, mask)
        return self._quantize_layout(z, cdim, mask)

    def _quantize_layout(self, z: Tensor, cdim: int, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        fused = self._fused_step(z, cdim, mask)
        if fused is not None:
            return fused
        z_last = z.movedim(cdim, -1)
        rows = z_last.reshape(-1, self.embedding_dim)
        z_q, loss, indices = self._quantize_rows(rows, self._row_mask(mask))
        z_q = z_q.reshape(z_last.shape).movedim(-1, cdim)
        if z.is_contiguous() and not z_q.is_contiguous():
            # Channels-first z gives channels-last rows; callers of a drop-in layer may .view() z_q.
            z_q = z_q.contiguous()
        return z_q, loss, indices.reshape(self._index_shape(z_last.shape[:-1]))

    def _fused_step(self, z: Tensor, cdim: int, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor] | None:
        """The step of ``_quantize_rows`` with the input's layout inside one autograd node, for eager
        calls on the kernels with the l2 metric, no entropy terms and the straight-through gradient;
        None where it does not apply. With a ``mask`` the fused kernels leave the padding out (index -1).

        The same kernels on the same rows give the same values; what it saves is host time: the
        permutes and reshapes of z and z_q, the codebook copy and the checks of the public ops each
        cost an operation in the forward and a node in the backward, ~10-30 us apiece on a small
        problem, which is bound by host time."""
        weight = self.embeddings.weight
        if (self.metric != "l2" or self.sample_entropy_weight != 0.0 or self.batch_entropy_weight != 0.0
                or self.gradient != "straight_through" or z.dtype not in _KERNEL_DTYPES or weight.dtype not in _KERNEL_DTYPES
                or torch.compiler.is_compiling() or resolve_backend(z.device, z.dtype) != "triton"):
            return None
        # Detached: the search, the statistics and the kernels read the rows; the gradient reaches z
        # through _LayoutQuantize's backward.
        z_last = z.detach().movedim(cdim, -1)
        z_last_shape = z_last.shape
        rows = z_last.reshape(-1, self.embedding_dim)
        # The public search checks z and the codebook (shapes, device) as quantize would; the dtypes
        # are the kernels' (above), so quantize's own checks would pass too.
        valid = self._row_mask(mask)
        train, indices, distances, restarts = self._start_step(rows, weight, valid)
        beta = check_number(self.beta, "beta", minimum=0.0)
        codebook, copy = self._step_codebook(weight, train)
        step_indices = indices if valid is None else torch.where(valid, indices, -1)
        # The op copies the codebook itself when asked: one autograd node fewer than a clone.
        z_q, loss = apply_function(_LayoutQuantize, z, codebook, rows, step_indices, beta, cdim, z_last_shape, copy,
                                   valid is not None)
        loss = self._ema_loss(loss)
        if train:
            self._update_statistics(rows, indices, distances, restarts, valid)
        return z_q, loss, step_indices.reshape(self._index_shape(z_last_shape[:-1]))

    def _start_step(self, rows: Tensor, weight: Tensor, valid: Tensor | None = None,
                    ) -> tuple[bool, Tensor, Tensor, bool]:
        """The start of a step on ``rows``, shared by both step paths: k-means collection, the search,
        and whether restarts follow. ``(train, indices, distances, restarts)``. ``valid``: the rows a
        mask keeps (None: all)."""
        # Under DDP a rank with no rows still joins the step's collectives (with nothing to add).
        train = self.training and (rows.shape[0] > 0 or self._synced_world() > 1)
        if train and not torch.compiler.is_compiling() and _in_backward_pass():
            raise RuntimeError(
                "VectorQuantizer ran a training forward inside a backward pass, as activation checkpointing "
                "(torch.utils.checkpoint) does when it recomputes a region: a training step updates the "
                "layer's statistics and codebook, so a recompute would update them twice and search a "
                "codebook the first pass already changed (other codes, wrong gradients). Checkpoint the "
                "layers before and after it instead (in eval mode it may be recomputed)")
        if train and torch._C._are_functorch_transforms_active():
            self._refuse_transformed_training(rows)
        if train and self._needs_init:
            self._reread_initialized()
        # A codebook frozen with requires_grad_(False) (codebook-loss mode) is never rewritten.
        maintain = train and (self.ema or weight.requires_grad)
        if maintain and (self.ema or self._needs_init or self.dead_code_threshold > 0) and self._codebook_parametrized():
            self._refuse_rewrite("a training step with " + (
                "ema=True" if self.ema else "init='kmeans'" if self._needs_init else
                f"dead_code_threshold={self.dead_code_threshold}"))
        ran_kmeans = False
        # (Meta tensors, shapes only, have no rows to cluster: k-means stays pending.)
        if maintain and self._needs_init and not self._kmeans_paused and not rows.is_meta:
            # (Selecting the kept rows syncs the host: once, on the batches k-means pools.)
            kept = rows if valid is None else rows[valid]
            # A batch with no kept rows is not pooled, as an empty batch is not; under DDP every rank
            # pools (and, at the last batch, joins k-means's collectives) on every batch.
            if kept.shape[0] > 0 or self._synced_world() > 1:
                self._collect_for_kmeans(kept)
                ran_kmeans = not self._needs_init
        indices, distances = self._search(rows, weight)
        # No restarts while k-means is still collecting batches (it replaces every code anyway), nor on
        # the step it ran: its centroids came from this batch's rows, and codes re-seeded from them would
        # copy those centroids (with fewer pooled rows than codes, each row is one). Codes left without
        # a cluster are re-seeded from the next batch.
        restarts = maintain and self.dead_code_threshold > 0 and not self._needs_init and not ran_kmeans
        return train, indices, distances, restarts

    def _reread_initialized(self) -> None:
        """``_needs_init`` mirrors the ``initialized`` buffer, which tools that load state in place write
        behind the layer's back (``torch.distributed.checkpoint.load``, ``AveragedModel(use_buffers=True)``):
        while k-means is pending the buffer itself is read, so that k-means never overwrites codes
        loaded that way. (One host sync per training step until k-means has run, and none under
        torch.compile, which sees the mirror.)"""
        flag = self.initialized
        if not torch.compiler.is_compiling() and not flag.is_meta and bool(flag):
            self._needs_init = False
            self._kmeans_pool, self._kmeans_pool_batches = [], 0

    def _refuse_transformed_training(self, rows: Tensor) -> None:
        """A training step under torch.func: its in-place updates of the statistics and codes cannot be
        batched by vmap, and grad refuses them on the CPU backend (PyTorch's own errors there name an
        internal op, not the way out)."""
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
        from torch._C._functorch import TransformType

        kinds = {interpreter.key() for interpreter in retrieve_all_functorch_interpreters()}
        cpu_backend = resolve_backend(rows.device, rows.dtype) != "triton"
        if TransformType.Vmap in kinds or cpu_backend:
            what = "torch.func.vmap" if TransformType.Vmap in kinds else "torch.func transforms on the CPU backend"
            raise RuntimeError(
                f"{type(self).__name__} in training mode updates its statistics and codebook in place, which "
                f"{what} cannot do: transform the layer in eval mode (layer.eval()), or its encode()")

    def _codebook_parametrized(self) -> bool:
        """Whether ``embeddings.weight`` is computed by a parametrization (weight_norm, spectral_norm, ...)
        from tensors of its own on every access: writes into it would be silently lost. (A dict lookup:
        it runs on every training step.)"""
        parametrizations = self.embeddings._modules.get("parametrizations")
        return parametrizations is not None and "weight" in parametrizations

    def _refuse_rewrite(self, what: str) -> None:
        raise RuntimeError(
            f"{what} rewrites the codes in place, but embeddings.weight is parametrized "
            f"(torch.nn.utils.parametrize, e.g. weight_norm or spectral_norm): the writes would be lost. "
            f"With a parametrized codebook use ema=False, dead_code_threshold=0 and init='xavier_normal' "
            f"or 'uniform' (codebook-loss training reaches the parametrization's tensors by its gradient), "
            f"or remove the parametrization")

    def _step_codebook(self, weight: Tensor, train: bool) -> tuple[Tensor, bool]:
        """The codebook a step quantizes with, and whether it must be copied (differentiably) first.

        The step's ops save the codebook for their backward, and the upkeep after this step or a later
        training step (EMA, restarts, k-means still to come) rewrites the parameter in place, possibly
        before this step's backward (a layer applied to several inputs, or an eval-mode forward followed
        by a training one). A training step with EMA gets a private copy without gradient (none flows to
        EMA codes); otherwise, where the codes may be rewritten, a differentiable copy, so that the
        gradient still reaches the parameter. Without grad mode nothing is saved, so nothing is copied."""
        if self.ema and train:
            return _snapshot(weight.detach()), False
        # (This step's restarts are among them: they need dead_code_threshold > 0.)
        rewritten = self.ema or (weight.requires_grad and (self._needs_init or self.dead_code_threshold > 0))
        return weight, rewritten and torch.is_grad_enabled()

    def _ema_loss(self, loss: Tensor) -> Tensor:
        """With EMA, quantize's loss (1 + beta) * mse, whose gradient to z is beta * dmse (the codebook is
        detached), with the value beta * mse and the same gradient. Unchanged without EMA."""
        if not self.ema:
            return loss
        # Not loss minus a constant: for a row holding inf that is inf - inf = NaN, where beta * mse is
        # inf (0 with beta = 0: no term at all).
        value = reference.weighted(loss.detach(), self.beta / (1.0 + self.beta))
        return reference.straight_through(loss, value)

    def _quantize_rows(self, rows: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        weight = self.embeddings.weight
        train, indices, distances, restarts = self._start_step(rows, weight, valid)
        codebook, copy = self._step_codebook(weight, train)
        if copy:
            codebook = _snapshot(codebook)
        if valid is None:
            # The indices come from the search: valid by construction, and checking them would sync the host.
            z_q, loss, indices = quantize(rows, codebook, beta=self.beta, metric=self.metric,
                                          indices=indices, check_indices=False)
            if self.gradient == "rotation":
                # From the rows the codes were chosen for (unit rows for the cosine metric).
                z_q = rotate_to_codes(reference.unit_rows(rows) if self.metric == "cosine" else rows, z_q.detach())
        else:
            z_q, loss = self._masked_quantize(rows, codebook, indices, valid)
        loss = self._ema_loss(loss)
        if self.sample_entropy_weight != 0.0 or self.batch_entropy_weight != 0.0:
            # (With a mask, selecting its rows syncs the host: the soft assignments have no row weights.)
            # (Meta tensors cannot be selected by values; their entropies are scalars of no value anyway.)
            kept = rows if valid is None or rows.is_meta else rows[valid]
            sample_h, batch_h = soft_assignment_entropy(kept, codebook, self.entropy_temperature, self.metric,
                                                        self.precision)
            loss = loss + self.sample_entropy_weight * sample_h - self.batch_entropy_weight * batch_h
        if train:
            self._update_statistics(rows, indices, distances, restarts, valid)
        if valid is not None:
            indices = torch.where(valid, indices, -1)
        return z_q, loss, indices

    def _masked_quantize(self, rows: Tensor, codebook: Tensor, indices: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """``quantize``'s ``(z_q, loss)`` over the ``valid`` rows only (``_masked_quantize_rows``), with the
        layer's metric, beta and gradient."""
        to_codes = rotate_to_codes if self.gradient == "rotation" else None
        return _masked_quantize_rows(rows, codebook, indices, valid, self.beta, self.metric, to_codes)

    def _search(self, rows: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
        rows = rows.detach()
        weight = weight.detach()
        if self.precision == "bf16":
            if self.metric == "cosine":
                # Normalised in fp32 and then rounded: nearest_code would search bf16 rows' unit vectors
                # in fp32 (for their digits), not in bf16. ||a - b||^2 / 2 = 1 - cos for unit vectors.
                rows = reference.unit_rows(rows.float()).bfloat16()
                weight = reference.unit_rows(weight.float()).bfloat16()
                indices, distances = nearest_code(rows, weight, precision=_SEARCH_PRECISION[self.precision])
                return indices, distances * 0.5
            rows, weight = rows.bfloat16(), weight.bfloat16()
        else:
            dtype = torch.promote_types(torch.promote_types(rows.dtype, weight.dtype), torch.float32)
            rows, weight = rows.to(dtype), weight.to(dtype)
        # (No torch.no_grad(): the inputs are detached, so nothing is recorded either way.)
        return nearest_code(rows, weight, metric=self.metric, precision=_SEARCH_PRECISION[self.precision])

    # -- codebook maintenance (no gradients, no host syncs) --------------------------------------

    def _synced_world(self) -> int:
        """How many ranks the layer's statistics are synchronised over (1 without DDP or without the sync)."""
        return world_size(self.process_group) if self.sync_distributed else 1

    def _all_reduce_(self, t: Tensor) -> Tensor:
        return all_reduce_sum_(t, self.process_group) if self.sync_distributed else t

    def _gather_rows(self, t: Tensor) -> Tensor:
        return all_gather_rows(t, self.process_group) if self.sync_distributed else t

    def _statistics_indices(self, finite: Tensor, indices: Tensor) -> Tensor:
        """``indices`` with rows that are not ``finite`` (hold NaN or inf) set to K, which the statistics
        leave out: one bad row (an overflow under autocast, say) would otherwise turn its EMA code into
        NaN for good."""
        return torch.where(finite, indices, self.num_embeddings)

    def _data_rows(self, rows: Tensor) -> Tensor:
        # In fp32 at least, and in the codebook's fp64 where it has been made fp64 (.double()): restart
        # seeds, k-means and EMA sums of such a layer keep its precision.
        x = rows.detach().to(torch.promote_types(self.embeddings.weight.dtype, torch.float32))
        return reference.unit_rows(x) if self.metric == "cosine" else x

    def _seed_rows(self, drawn: Tensor) -> Tensor:
        """Restart seeds from drawn rows: NaN (passed over) for rows without a finite distance to a code
        (NaN, inf, or elements beyond about 1e19, whose squared norm overflows fp32): as a code, such a
        row would be found by one backend's search and passed over by the other's."""
        x = self._data_rows(drawn)
        return torch.where(_searchable_rows(x).unsqueeze(1), x, math.nan)

    def _random_rows(self, x: Tensor, count: int, prepare: Callable[[Tensor], Tensor] | None = None,
                     valid: Tensor | None = None, prefer: Tensor | None = None) -> Tensor:
        """``count`` rows drawn from every rank's ``x`` (an equal share from each), the same on every
        rank; ``prepare`` maps the drawn rows (before they are gathered from the ranks). A rank draws
        its share without replacement (``x[torch.randperm(len(x))[:share]]``): codes seeded from one
        row would be identical, and all but the lowest-index one would lose every tie and stay unused.
        A rank with fewer rows than its share fills the rest with NaN rows, which k-means and the
        restarts pass over (those codes keep their values; dead ones wait for a later step). The
        share depends on ``count`` and the world size only, so ranks with batches of different sizes
        gather rows of the same shape. ``randperm`` sorts random keys for all of ``x``'s rows: O(N) per
        training step (on a 2-core AMD EPYC: 0.13 ms at 32K rows, 7.6 ms at 1M; one radix sort on a GPU).
        ``valid`` (bool (N,), a mask's rows): only those rows are drawn (the lowest of random keys, the
        others' pushed above them, without a host sync), the others only to fill the share, as NaN.
        ``prefer`` (bool (N,), with ``valid`` None): those rows first, in the permutation's order (the
        same rows as without it when every row is preferred), the others only to fill the share."""
        world = self._synced_world()
        share = -(-count // world)
        n = x.shape[0]
        if valid is None:
            order = torch.randperm(n, device=x.device)
            if prefer is not None:
                order = order[torch.sort((~prefer[order]).to(torch.uint8), stable=True).indices]
            order = order[:share]
        else:
            keys = torch.rand(n, device=x.device) + (~valid).to(torch.float32)
            order = keys.topk(min(share, n), largest=False).indices
        drawn = x.index_select(0, order)
        if prepare is not None:
            drawn = prepare(drawn)
        if valid is not None:
            drawn = torch.where(valid[order].unsqueeze(1), drawn, math.nan)
        if share > n:
            drawn = torch.cat([drawn, drawn.new_full((share - n, drawn.shape[1]), math.nan)])
        drawn = self._gather_rows(drawn.contiguous())
        return drawn if drawn.shape[0] == count else drawn[:count]

    @property
    def kmeans_pool(self) -> Tensor:
        """The rows pooled for k-means so far, float32 (R, D) (R = 0 when the layer is not pooling)."""
        if self._kmeans_pool:
            return torch.cat(self._kmeans_pool)
        return torch.zeros(0, self.embedding_dim, dtype=torch.float32, device=self.embeddings.weight.device)

    @property
    def kmeans_pool_batches(self) -> Tensor:
        """How many training batches ``kmeans_pool`` holds (int64 scalar)."""
        return torch.tensor(self._kmeans_pool_batches, dtype=torch.int64)

    @torch.no_grad()
    def _collect_for_kmeans(self, rows: Tensor) -> None:
        self._kmeans_pool.append(self._data_rows(rows).clone())
        self._kmeans_pool_batches += 1
        if self._kmeans_pool_batches < self.kmeans_batches:
            return
        # (On the rows' device: a layer pickled by an older vqfast may hold its pool elsewhere.)
        x = torch.cat([p.to(rows.device) for p in self._kmeans_pool])
        self._kmeans_pool = []
        # A pool without a finite row on any rank (an overflow in the first steps, say) would leave the
        # codes as they are for good: k-means waits for the next batch instead. One host sync, on the
        # batch that completes the pool; compiled code runs k-means on the pool it has.
        if not torch.compiler.is_compiling():
            finite = self._all_reduce_(_searchable_rows(x).sum().reshape(1))
            if int(finite.item()) == 0:
                self._kmeans_pool_batches = self.kmeans_batches - 1
                return
        self._kmeans_pool_batches = 0
        self._kmeans_init(x)

    @torch.no_grad()
    def _kmeans_init(self, x: Tensor) -> None:
        """Lloyd's k-means on data rows ``x`` (pooled over ranks); empty clusters keep their seed row.

        Rows whose squared norm is not finite in fp32 (NaN, inf, or elements beyond about 1e19, whose
        distances a training step leaves out too) take no part, and seed codes only when the finite rows
        are fewer than the codes; a code whose seed row is such a row (or that has none: fewer rows
        than codes, see ``_random_rows``) starts from its current value instead."""
        k = self.num_embeddings
        finite = _searchable_rows(x)
        # Seeds from the finite rows while there are enough: a code seeded by another starts where it
        # is, far from the data, and k-means leaves it there (an empty cluster).
        seeds = self._random_rows(x, k, prefer=finite)
        current = self._data_rows(self.embeddings.weight)
        centroids = torch.where(_searchable_rows(seeds).unsqueeze(1), seeds, current)
        counts = torch.ones(k, dtype=torch.int64, device=x.device)
        for _ in range(self.kmeans_iters):
            assign = nearest_code(x, centroids, metric=self.metric, precision="highest")[0]
            assign = self._statistics_indices(finite, assign)
            counts = self._all_reduce_(_bincount(assign, k))
            sums = self._all_reduce_(_sum_rows(x, assign, k))
            means = sums / counts.clamp_min(1).unsqueeze(1).to(sums.dtype)
            if self.metric == "cosine":
                means = reference.unit_rows(means)
            centroids = torch.where((counts > 0).unsqueeze(1), means, centroids)
        self.embeddings.weight.copy_(centroids)
        # Codes that own a cluster get the restart credit, so codes fitted to earlier pooled batches are
        # not re-seeded for missing from this one; codes with an empty cluster get none and are
        # re-seeded from the next batch.
        self._start_statistics(counts > 0)

    def _restart_credit(self) -> float:
        """The grace credit of a code started afresh: the uniform share 1/K once the step's statistics
        are in, a relative 1e-6 above it (a few float32 roundings would otherwise put it just under a
        threshold of exactly 1/K, dead_code_threshold=1, on one backend and not the other)."""
        decay = reference.stored_decay(self.usage_decay, self.usage.dtype)
        return (1.0 - decay) / (decay * self.num_embeddings) * (1.0 + 1e-6) if decay > 0 else 0.0

    def _fresh_statistics(self, credited: Tensor | None = None, device: torch.device | None = None,
                          ) -> dict[str, Tensor]:
        """The running statistics of codes started afresh, by buffer name: no usage, no steps, no batch
        counts, the restart credit for the ``credited`` codes (all by default) and, with EMA, counts of 1;
        on ``device`` (default: the buffers')."""
        credit = self._restart_credit()
        grace = self.restart_grace
        fresh = {name: torch.zeros_like(self._buffers[name], device=device)
                 for name in ("usage", "usage_steps", "batch_counts")}
        fresh["restart_grace"] = (torch.full_like(grace, credit, device=device) if credited is None
                                  else torch.where(credited, credit, 0.0).to(grace.dtype))
        if self.ema:
            fresh["ema_count"] = torch.ones_like(self.ema_count, device=device)
        return fresh

    @torch.no_grad()
    def _start_statistics(self, credited: Tensor | None = None) -> None:
        """New codes (k-means', or set from outside): usage measured on the old ones says nothing about
        them, so the running statistics start over (:meth:`_fresh_statistics`). The codebook counts as
        initialised (no k-means)."""
        for name, value in self._fresh_statistics(credited).items():
            self._buffers[name].copy_(value)
        self.initialized.fill_(True)
        self._needs_init = False
        self._kmeans_pool, self._kmeans_pool_batches = [], 0

    @torch.no_grad()
    def set_codebook(self, codes: Tensor) -> None:
        """Use ``codes`` (K, D) as the codebook, e.g. pretrained ones: copied into
        ``embeddings.weight`` (which stays float32), the codebook marked initialised (no k-means), and
        the usage statistics started afresh with every code holding the grace credit of a restarted
        code, so that dead-code restarts leave the codes the first batches happen not to pick alone
        (for about 70 steps at the defaults) and re-seed only those the data does not use. A state dict
        that brings codes without statistics (the article's layer's) is loaded the same way. Under
        DDP, call it on every rank with the same codes. Plain PyTorch:
        ``vq.embeddings.weight.copy_(codes)`` plus that bookkeeping (a bare ``copy_`` keeps the old
        statistics, which may then count many of the new codes as dead)."""
        if self._codebook_parametrized():
            self._refuse_rewrite("set_codebook")
        weight = self.embeddings.weight
        if not isinstance(codes, Tensor):
            raise TypeError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
        if codes.shape != weight.shape:
            raise ValueError(f"codes must have the codebook's shape {tuple(weight.shape)}, got {tuple(codes.shape)}")
        if not codes.is_floating_point():
            raise TypeError(f"codes must be a floating-point tensor, got {codes.dtype}")
        # A NaN or inf code would stay so (every batch would look all-NaN to it, and no restart would
        # ever replace a codebook of them); values past float32's range become inf in the codebook.
        stored = codes.detach().to(weight.dtype)
        if not stored.is_meta and not bool(torch.isfinite(stored).all()):
            bad = (~torch.isfinite(stored)).any(1).nonzero().flatten().tolist()
            shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
            raise ValueError(f"codes must be finite (in {weight.dtype}); {len(bad)} code(s) are not: {shown}")
        weight.copy_(codes)
        self._start_statistics()

    def _usage_share(self) -> Tensor:
        """Bias-corrected running usage share of every code (0 before the first training step)."""
        correction = reference.usage_correction(self.usage_steps, self.usage_decay, self.usage.dtype)
        return torch.where(self.usage_steps > 0, self.usage / correction.clamp_min(1e-12), 0.0)

    @torch.no_grad()
    def _update_statistics(self, rows: Tensor, indices: Tensor, distances: Tensor, restarts: bool,
                           valid: Tensor | None = None) -> None:
        """After the search and the loss: the running statistics, the EMA codebook and the dead-code
        restarts of this training step (in place, without host synchronisation). Rows whose distance
        is not finite take no part, nor do rows outside ``valid`` (a mask's rows), seeds included."""
        k = self.num_embeddings
        # Looked up once: each attribute lookup through nn.Module.__getattr__ costs ~1 us.
        buffers = self._buffers
        usage, weight = buffers["usage"], self.embeddings.weight
        ema_count = buffers["ema_count"] if self.ema else None
        # The kernels keep fp32 statistics; a layer converted to float64 keeps them in plain PyTorch.
        wide = torch.float64 in (usage.dtype, weight.dtype, ema_count.dtype if self.ema else None)
        triton = resolve_backend(indices.device, torch.float64 if wide else None) == "triton"
        # The kernels' ops and the reference share names and signatures.
        upkeep = _upkeep_ops() if triton else reference
        # A row holding NaN or inf has a NaN or inf distance: no N x D pass over the rows to find it.
        # Rows a mask leaves out count as such rows.
        if valid is not None:
            distances = torch.where(valid, distances, math.inf)
        # counts: (K + 1,), this step's code counts and then their total, summed over ranks.
        counts = self._all_reduce_(upkeep.finite_row_counts(indices, distances, k))
        if self.ema:
            # Distances are >= 0, so "< inf" is False exactly for the NaN and inf ones (one op, where
            # isfinite takes several).
            finite = distances < math.inf
            sums = self._all_reduce_(_sum_rows(self._data_rows(rows), self._statistics_indices(finite, indices), k))
            upkeep.ema_update(weight, ema_count, sums, counts, self.decay, self.eps)
        seeds = None
        if restarts:
            # Drawn from this batch, but they serve from the next step on: their rows cannot pick them
            # right away and inflate their usage. At most _RESTARTS_PER_STEP codes are re-seeded per
            # step (the lowest-index dead ones), so the rows drawn (and, under DDP, gathered from the
            # ranks) stay few when K is large; the others follow on the next steps, as do those beyond
            # the batch's rows (no two codes start from the same row).
            seeds = self._random_rows(rows.detach(), min(k, _RESTARTS_PER_STEP), prepare=self._seed_rows,
                                      valid=valid)
        # A restarted code gets a grace credit of the uniform share 1/K (times the bias correction of its
        # step) that decays like the usage, so once training has run a few hundred steps it survives
        # ln(dead_code_threshold) / ln(usage_decay) steps unused (about 459 with the defaults) before it can be
        # restarted again; in the first steps fewer (69 for a code restarted at the first), which keeps
        # re-seeding codes while the encoder's outputs still move fast (a full 459 then cost half the
        # codebook's use in the second epoch of the README's CPU VQ-VAE run).
        upkeep.update_code_usage(counts, usage, buffers["restart_grace"], buffers["batch_counts"],
                                 buffers["usage_steps"], self.usage_decay,
                                 self.dead_code_threshold / k if restarts else 0.0, seeds,
                                 weight if restarts else None, ema_count if restarts else None)

    # -- reporting -------------------------------------------------------------------------------

    @torch.no_grad()
    def codebook_usage(self) -> dict[str, Any]:
        """Usage statistics from the running averages kept by training forwards (no extra pass).

        Returns a dict: ``counts`` (int64 (K,), code counts of the last training batch, summed over
        ranks), ``usage`` (float (K,), running usage share per code, scaled to sum to 1 once a
        step has counted a row),
        ``codes_used`` / ``fraction_used`` (codes whose running share is at least
        ``dead_code_threshold / K``, or 1 % of the uniform share when restarts are off),
        ``perplexity`` (exp of the entropy of ``usage``; 1, as for one code in use, before any step
        counted a row: ``steps`` tells them apart), ``batch_codes_used`` and
        ``batch_perplexity`` (the same for the last batch) and ``steps`` (training forwards that counted
        a row since the statistics started, the first or the one that ran k-means: a batch whose rows
        were all masked out or NaN does not count; a float32 count, exact up to 2**24 steps).
        Reading the numbers syncs the host, so call it for logging, not inside the training step.
        """
        k = self.num_embeddings
        if self.usage.is_meta:
            raise RuntimeError("codebook_usage() reads the usage statistics, which a layer on the meta device "
                               "does not hold: move it to a real device or load a state first")
        share = self._usage_share()
        # Restarts zero a code's measured share, so the corrected shares sum to a little under 1 until
        # the restarted codes' usage comes in; as a distribution (and for a perplexity <= K) they are
        # scaled to sum to 1.
        total = share.sum()
        share = torch.where(total > 0, share / total.clamp_min(1e-30), share)
        threshold = (self.dead_code_threshold if self.dead_code_threshold > 0 else 0.01) / k
        in_use = (share >= threshold) & (share > 0)
        entropy = -torch.special.xlogy(share, share).sum()
        counts = self.batch_counts.clone()
        _, batch_perplexity = reference.histogram_entropy(counts)
        codes_used = int(in_use.sum())
        return {
            "counts": counts,
            "usage": share,
            "codes_used": codes_used,
            "fraction_used": codes_used / k,
            "perplexity": float(entropy.exp()),
            "batch_codes_used": int((counts > 0).sum()),
            "batch_perplexity": float(batch_perplexity),
            "steps": int(self.usage_steps),
        }

    # -- state -----------------------------------------------------------------------------------

    # Floating-point state that must not drop below float32: the codes (searched and averaged in fp32)
    # and the running statistics (an fp16 count sum overflows at 65,504 rows, which froze EMA codes).
    _FP32_BUFFERS = ("usage", "usage_steps", "restart_grace", "ema_count")

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        """``.half()`` / ``.to(torch.bfloat16)`` convert the rest of a model; the codebook and the running
        statistics stay float32 (wider types such as float64 are kept)."""
        protected = {id(self.embeddings.weight)} | {id(b) for n, b in self._buffers.items()
                                                    if n in self._FP32_BUFFERS and b is not None}
        weight = self.embeddings.weight
        if weight.grad is not None:
            protected.add(id(weight.grad))

        def keep_wide(t: Tensor) -> Tensor:
            out = fn(t)
            if (id(t) in protected and isinstance(out, Tensor) and out.is_floating_point()
                    and out.element_size() < 4):
                # From the original values: upcasting the converted copy would keep its rounding (and an
                # fp16 count above 65,504 would already be inf).
                return t.detach().to(device=out.device, dtype=torch.promote_types(t.dtype, torch.float32),
                                     copy=True)
            return out

        out = super()._apply(keep_wide, recurse)
        self._pool_to_codebook_device()
        return out

    def _pool_to_codebook_device(self) -> None:
        """The k-means pool follows the codes' device (it is not a buffer); its rows stay float32."""
        device = self.embeddings.weight.device
        pool = getattr(self, "_kmeans_pool", [])
        if device.type != "meta" and any(p.is_meta for p in pool):
            # A pool on meta has no values to move (to_empty): k-means pools its batches afresh, unless a
            # state dict brings the pool back.
            self._kmeans_pool, self._kmeans_pool_batches = [], 0
            return
        self._kmeans_pool = [p.to(device) for p in pool]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:  # type: ignore[override]
        if local_metadata.get("assign_to_params_buffers", False):
            # load_state_dict(assign=True) takes the loaded tensors themselves: a state dict converted to
            # 16 bits would make the codes and statistics 16-bit, which the kernels refuse and in which an
            # EMA count freezes at 65,504. (In place: the codebook's entry is loaded by the embedding,
            # from this dict.)
            for name in ("embeddings.weight", *self._FP32_BUFFERS):
                t = state_dict.get(prefix + name)
                if isinstance(t, Tensor) and t.is_floating_point() and t.element_size() < 4:
                    state_dict[prefix + name] = t.float()
        # taming-transformers' VectorQuantizer (VQGAN) names its codebook "embedding".
        alias = prefix + "embedding.weight"
        if alias in state_dict and prefix + "embeddings.weight" not in state_dict:
            # In place: the embedding module loads its weight from this dict (load_state_dict's own copy).
            state_dict[prefix + "embeddings.weight"] = state_dict.pop(alias)
        own = {"embeddings.weight": self.embeddings.weight, **self._buffers}
        # (A 0-dim buffer takes a one-element 1-D value: load_state_dict's own allowance.)
        other_shape = {name for name, t in own.items() if isinstance(state_dict.get(prefix + name), Tensor)
                       and t.dim() > 0 and state_dict[prefix + name].shape != t.shape}
        if other_shape:
            # A state of other shapes fails to load (load_state_dict reports the mismatch once every module
            # has had its turn, and would have copied the entries that fit): this layer takes nothing
            # from it, neither codes nor statistics nor whether k-means is pending, nor a pool.
            self._load_nothing(state_dict, prefix, local_metadata, strict, own, other_shape, missing_keys,
                               unexpected_keys, error_msgs)
            return
        # Checkpoints of the article's layer (or of an older VectorQuantizer) hold only the codes: keep
        # this layer's own statistics for whatever they lack, so that strict loading still works.
        missing = [name for name in self._buffers if prefix + name not in state_dict]
        # The running sums that the first EMA version stored (they equal codebook * smoothed counts), and
        # the k-means pool (not buffers: restored below while the layer pools, dropped otherwise).
        extra = [prefix + "ema_sum"] if prefix + "ema_sum" in state_dict and self.ema else []
        pool_key, batches_key = (prefix + name for name in _KMEANS_POOL_KEYS)
        extra += [key for key in (pool_key, batches_key) if key in state_dict]
        pool, batches = state_dict.get(pool_key), state_dict.get(batches_key)
        # A state of the whole layer (not just its pool, as a distributed resume loads per rank); after
        # the renaming, so that VQGAN's codes drop a pending pool as this layer's own codes do.
        whole = prefix + "initialized" in state_dict or prefix + "embeddings.weight" in state_dict
        # Codes without statistics (the article's layer, VQGAN): statistics started afresh for them, as
        # set_codebook does, not this layer's own, which describe other codes.
        fresh = prefix + "embeddings.weight" in state_dict and "usage" in missing
        # The statistics of an EMA layer without its EMA counts (saved with ema=False): the layer's own
        # counts belong to other codes, so they start afresh; and, as EMA counts loaded into a layer
        # without EMA are, the mismatch is reported (a setting that changed between runs).
        ema_mismatch = (self.ema and not fresh and "ema_count" in missing and prefix + "usage" in state_dict)
        if ema_mismatch:
            missing_keys.append(prefix + "ema_count")
        # Under load_state_dict(assign=True) the filled-in tensors become the buffers themselves: on the
        # loaded codes' device (a layer built on meta has its own statistics there).
        codes = state_dict.get(prefix + "embeddings.weight")
        device = codes.device if local_metadata.get("assign_to_params_buffers", False) and isinstance(codes, Tensor) \
            else None
        if missing or extra:
            state_dict = dict(state_dict)
            for key in extra:
                del state_dict[key]
            started = self._fresh_statistics(device=device) if fresh or ema_mismatch else {}
            if ema_mismatch:
                started = {"ema_count": started["ema_count"]}
            for name in missing:
                if name == "initialized":
                    continue
                own = self._buffers[name]
                if name not in started and device is not None and own.device != device:
                    # (Moved, or started afresh where it is on meta, which holds no values to move.)
                    own = self._fresh_statistics(device=device)[name] if own.is_meta else own.to(device)
                state_dict[prefix + name] = started.get(name, own)
        key = prefix + "initialized"
        if key in state_dict:
            flag = state_dict[key]
            if isinstance(flag, Tensor) and flag.numel() != 1:
                # (bool() of it would raise "ambiguous" before load_state_dict's shape check names it.)
                raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}:\n\t{key}: expected "
                                   f"a single flag, got shape {tuple(flag.shape)}")
            self._needs_init = not bool(flag)
        elif prefix + "embeddings.weight" in state_dict:
            # Loaded codes (e.g. from the article's layer) must not be overwritten by k-means.
            self._needs_init = False
            state_dict[key] = torch.tensor(True, device=device)
        if pool is not None and self._needs_init:
            self._load_kmeans_pool(pool, batches, pool_key, error_msgs)
        elif whole or pool is not None:
            # Codes loaded or initialised (a pool beside them would never be used), or a layer saved
            # while not pooling: whatever this layer had pooled belongs to another run.
            self._kmeans_pool, self._kmeans_pool_batches = [], 0
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _load_nothing(self, state_dict, prefix, local_metadata, strict, own, other_shape, missing_keys,
                      unexpected_keys, error_msgs) -> None:
        """For a state that will fail to load: the entries of other shapes are left for load_state_dict to
        report, every other entry of this layer is its own value (a copy that changes nothing), and the
        k-means pool and its flag stay as they are."""
        # The tensors themselves: copied onto themselves, or under assign=True put back where they are
        # (a detached copy would become a new Parameter, which an optimizer would not update).
        for name in own:
            if name not in other_shape and prefix + name in state_dict:
                # In place for the codebook, which the embedding loads from this dict after this layer.
                state_dict[prefix + name] = own[name]
        dropped = {prefix + name for name in _KMEANS_POOL_KEYS} | {prefix + "ema_sum"}
        kept = {key: value for key, value in state_dict.items() if key not in dropped}
        for name, t in self._buffers.items():
            kept.setdefault(prefix + name, t)
        super()._load_from_state_dict(kept, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _load_kmeans_pool(self, pool: Any, batches: Any, key: str, error_msgs: list[str]) -> None:
        try:
            count = int(batches)
        except (TypeError, ValueError, RuntimeError):  # absent, or not a single number
            count = 0
        if not (isinstance(pool, Tensor) and pool.dim() == 2 and pool.shape[1] == self.embedding_dim and count > 0):
            shape = tuple(pool.shape) if isinstance(pool, Tensor) else type(pool).__name__
            error_msgs.append(f"{key}: expected float rows of {self.embedding_dim} values and a positive number of "
                              f"batches they came from, got {shape} from {batches!r}")
            return
        # As pooled (float32 data rows); a pool saved with more batches than this layer's kmeans_batches
        # runs k-means on its next training batch.
        # (Moved to the codes' device once they are loaded: _move_kmeans_pool.)
        self._kmeans_pool = [pool.to(dtype=torch.float32, copy=True)]
        self._kmeans_pool_batches = count

    def extra_repr(self) -> str:
        parts = [f"{self.num_embeddings}, {self.embedding_dim}", f"beta={self.beta}", f"metric={self.metric!r}"]
        if self.channel_dim is not None:
            parts.append(f"channel_dim={self.channel_dim}")
        parts.append(f"init={self.init!r}")
        if self.init == "kmeans":
            parts.append(f"kmeans_iters={self.kmeans_iters}, kmeans_batches={self.kmeans_batches}")
        parts.append(f"ema={self.ema}")
        if self.ema:
            parts.append(f"decay={self.decay}, eps={self.eps}")
        parts += [f"dead_code_threshold={self.dead_code_threshold}", f"usage_decay={self.usage_decay}",
                  f"precision={self.precision!r}"]
        if not self.sync_distributed:
            parts.append("sync_distributed=False")
        if self.sample_entropy_weight or self.batch_entropy_weight:
            parts.append(f"sample_entropy_weight={self.sample_entropy_weight}, "
                         f"batch_entropy_weight={self.batch_entropy_weight}, "
                         f"entropy_temperature={self.entropy_temperature}")
        if self.gradient != "straight_through":
            parts.append(f"gradient={self.gradient!r}")
        if self.heads > 1:
            parts.append(f"heads={self.heads}")
        return ", ".join(parts)
