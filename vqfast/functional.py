"""Public functional ops: backend choice, autograd Functions with straight-through gradients.

Backend: "triton" when the tensors are on a CUDA device (the fused kernels), "torch" otherwise (the
pure-PyTorch reference in :mod:`vqfast.reference`). ``VQFAST_BACKEND=torch|triton`` forces one; forcing
"triton" on CPU tensors needs ``TRITON_INTERPRET=1`` (Triton's interpreter, used by the tests).
float64 tensors always use the reference.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Callable

import torch
from torch import Tensor

from vqfast import reference
from vqfast._autograd import apply_function, signature_kept
from vqfast._checks import (
    INTERPRETER_BF16_REFUSAL, check_bool, check_row_mask,
    check_gather_inputs, check_matmul_precision, check_num_codes, check_number, check_search_inputs,
    check_usage_inputs, is_legacy_batched,
)

__all__ = ["nearest_code", "gather", "code_usage", "quantize", "rotate_to_codes", "resolve_backend", "BACKENDS"]

BACKENDS = ("torch", "triton")


_TRITON_IMPORTED = False


def _triton_importable() -> bool:
    # Once imported, triton stays importable: later calls skip the import statement (~1 us each).
    global _TRITON_IMPORTED
    if not _TRITON_IMPORTED:
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        _TRITON_IMPORTED = True
    return True


def resolve_backend(device: torch.device | str, dtype: torch.dtype | None = None) -> str:
    """The backend an op on tensors of ``device`` / ``dtype`` runs on ("torch" or "triton")."""
    if type(device) is not torch.device:
        device = torch.device(device)
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype (e.g. torch.float32) or None, got {dtype!r}")
    forced = os.environ.get("VQFAST_BACKEND", "").strip().lower()
    if forced not in ("", "auto") + BACKENDS:
        raise ValueError(f"VQFAST_BACKEND must be 'torch', 'triton' or 'auto', got {forced!r}")
    if dtype == torch.float64 or device.type == "meta":
        return "torch"  # the kernels take fp32/fp16/bf16; meta tensors (shapes only) run no kernel
    if forced == "torch":
        return "torch"
    if forced == "triton":
        if not _triton_importable():
            raise RuntimeError("VQFAST_BACKEND=triton but triton cannot be imported")
        # Read the variable here rather than through vqfast.kernels: importing the kernels fixes, at
        # definition time, whether they are interpreted, so this check must not import them.
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise RuntimeError(
                f"VQFAST_BACKEND=triton needs CUDA tensors (got {device}); set TRITON_INTERPRET=1 before "
                "importing triton to run the kernels on CPU through Triton's interpreter"
            )
        if device.type != "cuda" and dtype == torch.bfloat16:
            raise RuntimeError(f"VQFAST_BACKEND=triton: {INTERPRETER_BF16_REFUSAL}")
        return "triton"
    return "triton" if device.type == "cuda" and _triton_importable() else "torch"


@torch.compiler.assume_constant_result
def _default_precision() -> str:
    # Read once per compiled graph: torch.compile cannot trace the global getter itself.
    return torch.get_float32_matmul_precision()


_OPS_MODULE = None


def _ops():
    # Imported lazily (importing vqfast must not need triton), once: an import statement per call costs
    # about 1 us, and small searches are bound by host time.
    global _OPS_MODULE
    if _OPS_MODULE is None:
        from vqfast import ops

        _OPS_MODULE = ops
    return _OPS_MODULE.for_call()


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def nearest_code(
    z: Tensor, codebook: Tensor, metric: str = "l2", precision: str | None = None
) -> tuple[Tensor, Tensor]:
    """Nearest code of every row of ``z`` (..., D) in ``codebook`` (K, D), without an N x K matrix.

    Plain PyTorch::

        d = torch.cdist(z.reshape(-1, D), codebook) ** 2    # cosine: 1 - cos
        indices = d.argmin(1); distances = d.min(1).values

    Returns ``(indices, distances)``: int64 shaped ``z.shape[:-1]`` and float32 (squared L2 distance
    of the chosen code, or 1 - cos for ``metric="cosine"``, which l2-normalises rows and codes first (in
    fp32 at least: 16-bit inputs are then searched as fp32 unit vectors):
    an all-zero row or code stays zero, at 0.5 from every unit vector, so a zero code is chosen for
    rows whose cosine with every other code is below 0.5). Ties go to the lowest index; every index
    is in [0, K) even for NaN/inf inputs (their distance is NaN or inf; which code such a row gets
    may differ between the backends). ``precision`` for fp32 inputs
    (and the fp32 unit vectors of 16-bit ones with the cosine metric) on the Triton backend (default
    ``torch.get_float32_matmul_precision()``): each mode searches with
    tf32 products and settles the rows in doubt in fp32, so the indices are those of an fp32 search;
    the few rows with three or more codes in doubt are searched again with fp32 products ("highest")
    or fp32-accurate tf32x3 products ("high"/"medium"). Codes are ranked by ``||c||^2 - 2 z.c``; the returned
    distance is summed directly, ``(z - codebook[indices]).pow(2).sum(-1)`` in fp32, on both backends
    and in every precision mode. Out of fp32's range: codes with elements beyond about 1e19 (``||c||^2``
    overflows) score inf on the Triton backend and are passed over (a row where every code does gets
    index 0), and a row whose products ``2 z.c`` pass fp32's range (``|z| |c|`` beyond about 1.7e38:
    elements of about 1e18 at D = 256) gets scores of -inf and an arbitrary code (in range, its distance
    summed as always); the CPU reference ranks both in float64. Scale such data down first; likewise
    data far below 1 (elements of about 1e-19 and less), whose squared distances are subnormal in fp32
    and rank codes by their rounding on the Triton backend.
    """
    check_search_inputs(z, codebook, metric)
    check_matmul_precision(precision)
    if resolve_backend(z.device, z.dtype) == "torch":
        return reference.nearest_code(z, codebook, metric=metric,
                                      compute_dtype=torch.float64 if z.dtype == torch.float64 else torch.float32)
    # Rows already (N, D) need no reshape either way (about 3 us each, and a small search is bound by
    # host time); nor does a tensor without autograd need detaching.
    flat = z.dim() == 2
    rows = z if flat else _rows(z)
    codes = codebook
    if metric == "cosine":
        # Unit vectors in fp32 at least, as the reference's: rounded back to 16 bits they would lose the
        # digits that 1 - cos of nearby vectors is made of (a relative error of 4e-3 in fp16).
        rows = reference.unit_rows(_at_least_float32(rows))
        codes = reference.unit_rows(_at_least_float32(codebook))
    precision = precision or _default_precision()
    indices, distances = _ops().nearest_code(rows.detach() if rows.requires_grad else rows,
                                             codes.detach() if codes.requires_grad else codes, precision, 0)
    if metric == "cosine":
        distances = distances * 0.5  # ||a - b||^2 / 2 = 1 - cos for unit vectors
    if flat:
        return indices, distances
    lead_shape = z.shape[:-1]
    return indices.reshape(lead_shape), distances.reshape(lead_shape)


def _at_least_float32(x: Tensor) -> Tensor:
    """``x`` in float32 when it is a 16-bit tensor (wider ones as they are)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@signature_kept
class _SecondDerivativeRefused(torch.autograd.Function):
    """Passes gradients through; differentiating them again raises."""

    generate_vmap_rule = True

    @staticmethod
    def forward(count: int, *tensors: Tensor):  # type: ignore[override]
        """Clones of the first ``count`` tensors; the others only tie the node into the graph."""
        return tuple(g.clone() for g in tensors[:count])

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        pass

    @staticmethod
    def backward(ctx, *grads: Tensor):  # type: ignore[override]
        raise RuntimeError("vqfast's Triton backward is not differentiable: a second derivative through it "
                           "(create_graph=True) needs the CPU backend (VQFAST_BACKEND=torch)")


def first_order_only(backward: Callable) -> Callable:
    """For an autograd Function's ``backward`` whose kernels have no backward of their own. In plain
    training (grad mode off in the backward) it just calls it. Under ``create_graph=True`` it runs it
    without recording and, when an input of the Function needs a gradient, returns gradients that
    raise if differentiated again (by ``.backward()`` or ``torch.autograd.grad``, through the incoming
    gradients or the saved inputs); a gradient passed through unchanged (the straight-through one)
    stays differentiable, being exact. (``torch.autograd.function.once_differentiable`` looks only at
    the incoming gradients, so a second derivative through the inputs, as a gradient penalty takes,
    came out silently wrong.)"""

    @functools.wraps(backward)
    def wrapper(ctx: Any, *grad_outputs: Tensor | None) -> Any:
        if not torch.is_grad_enabled():
            return backward(ctx, *grad_outputs)
        with torch.no_grad():
            grads = backward(ctx, *grad_outputs)
        single = not isinstance(grads, tuple)
        grads = (grads,) if single else grads
        if not any(ctx.needs_input_grad):
            return grads[0] if single else grads
        incoming = {id(g) for g in grad_outputs if g is not None}
        refuse = [isinstance(g, Tensor) and id(g) not in incoming for g in grads]
        if any(refuse):
            # The refusing node takes, besides the gradients, what they depend on in the graph: the
            # incoming gradients and the saved inputs that require grad. Otherwise
            # torch.autograd.grad, which runs only the nodes between its outputs and inputs, would
            # prune it and report the input unused (or None with allow_unused) instead of refusing.
            # Gradients that depend on none of them get leaves of their own, which .backward()
            # reaches.
            if torch._C._are_functorch_transforms_active():
                # Under torch.func's transforms requires_grad says nothing about outer levels (a grad of
                # a grad may reach this backward through its incoming gradient alone), and no leaf can be
                # made: the refusing node takes them all, and each level records it where it tracks one.
                graph = [t for t in (*grad_outputs, *ctx.saved_tensors) if isinstance(t, Tensor)]
                sources = [g for g, r in zip(grads, refuse) if r]
            else:
                graph = [t for t in (*grad_outputs, *ctx.saved_tensors) if isinstance(t, Tensor) and t.requires_grad]
                sources = [g.detach().requires_grad_() if not graph else g for g, r in zip(grads, refuse) if r]
            refused = iter(_SecondDerivativeRefused.apply(len(sources), *sources, *graph))
            grads = tuple(next(refused) if r else g for g, r in zip(grads, refuse))
        return grads[0] if single else grads

    return wrapper


@signature_kept
class _GatherRows(torch.autograd.Function):
    """``codebook[indices]``; backward scatter-adds the output gradient into the chosen rows (fp32)."""

    # (setup_context and a generated vmap rule: torch.func transforms, vmap and grad, can run it.)
    generate_vmap_rule = True

    @staticmethod
    def forward(codebook: Tensor, indices: Tensor) -> Tensor:  # type: ignore[override]
        return _ops().gather_rows(codebook, indices)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        codebook, indices = inputs
        ctx.save_for_backward(*reference.saveable(indices))
        ctx.num_codes = codebook.shape[0]
        ctx.codebook_dtype = codebook.dtype

    @staticmethod
    @first_order_only
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        (indices,) = ctx.saved_tensors
        grad_codebook = None
        if ctx.needs_input_grad[0]:
            grad_codebook = _ops().scatter_add_rows(grad_out, indices, ctx.num_codes, ctx.codebook_dtype)
        return grad_codebook, None


def gather(codebook: Tensor, indices: Tensor, check_indices: bool = True) -> Tensor:
    """Rows of ``codebook`` (K, D) at ``indices`` (any shape): ``codebook[indices]``, shape ``indices.shape + (D,)``.

    Differentiable w.r.t. ``codebook``: the backward is ``zeros(K, D).index_add_(0, indices, grad)``
    accumulated in fp32. Raises ValueError for indices outside [0, K); that check reads the indices'
    range on the host (a device sync, skipped under ``torch.compile``): pass ``check_indices=False``
    for indices known to be valid, such as those from :func:`nearest_code` (on the Triton backend an
    unchecked index outside [0, K) gives a zero row and no gradient). The CPU backend (the
    reference) checks them anyway, which costs no device sync there; under ``torch.compile`` it checks
    them with an assertion inside the compiled graph instead (with ``VQFAST_BACKEND=torch`` on a GPU,
    a device-side assertion, fatal to the process's CUDA context, as bad indices in compiled code are).
    """
    check_indices = check_bool(check_indices, "check_indices")
    check_gather_inputs(codebook, indices, check_range=check_indices and not torch.compiler.is_compiling())
    if resolve_backend(codebook.device, codebook.dtype) == "torch":
        return reference.gather(codebook, indices)
    flat = indices.reshape(-1).to(torch.int64)
    return apply_function(_GatherRows, codebook, flat).reshape(*indices.shape, codebook.shape[1])


def code_usage(indices: Tensor, num_codes: int, check_indices: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """``(counts, entropy, perplexity)`` of code indices, computed on the indices' device.

    Plain PyTorch::

        counts = torch.bincount(indices.flatten(), minlength=num_codes)
        p = counts / counts.sum(); entropy = -(p * p.log()).nansum(); perplexity = entropy.exp()

    ``counts`` is int64 (num_codes,); entropy (nats, 0 log 0 = 0) and perplexity are float32 scalars.
    No indices at all give entropy 0 and perplexity 1. Indices outside [0, num_codes) raise ValueError
    (a host-side check, skipped with ``check_indices=False`` on the Triton backend, where such an index
    is then left out of the counts; the CPU backend checks anyway). Under ``torch.compile`` the Triton
    backend does not check (the kernel leaves such an index out), the CPU backend checks with an
    assertion inside the compiled graph (as :func:`gather`).
    """
    num_codes = check_num_codes(num_codes)
    check_indices = check_bool(check_indices, "check_indices")
    check_usage_inputs(indices, num_codes,
                       check_range=check_indices and not torch.compiler.is_compiling())
    if resolve_backend(indices.device) == "torch":
        return reference.code_usage(indices, num_codes)
    counts, stats = _ops().code_usage(indices.reshape(-1).to(torch.int64), num_codes)
    return counts, stats[0], stats[1]


@signature_kept
class _FusedQuantize(torch.autograd.Function):
    """Gather + straight-through output + both VQ losses, forward and backward in one kernel each."""

    generate_vmap_rule = True

    @staticmethod
    def forward(z: Tensor, codebook: Tensor, indices: Tensor, beta: float,  # type: ignore[override]
                left_out: bool):
        # (No default for left_out: torch.compile mistakes the arguments of an apply that leaves out a
        # defaulted one, passing the context as z.)
        return _ops().quantize_forward(z, codebook, indices, beta, left_out)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        z, codebook, indices, beta, left_out = inputs
        z_q, _ = output
        ctx.save_for_backward(*reference.saveable(z, codebook, indices))
        ctx.beta, ctx.left_out = beta, left_out
        if not ctx.needs_input_grad[0]:
            # z_q's value is the code, but its gradient goes to z alone (straight through): with z not
            # requiring grad, z_q has none, as z + (q - z).detach() has none.
            ctx.mark_non_differentiable(z_q)
        # An unused loss then reaches backward as None, and the codebook gets no gradient at all (as
        # with plain autograd) rather than a zero one that weight decay would still act on.
        ctx.set_materialize_grads(False)

    @staticmethod
    @first_order_only
    def backward(ctx, grad_zq: Tensor | None, grad_loss: Tensor | None):  # type: ignore[override]
        z, codebook, indices = ctx.saved_tensors
        if grad_loss is None:
            return grad_zq if ctx.needs_input_grad[0] else None, None, None, None, None
        need_c = ctx.needs_input_grad[1]
        grad_z, grad_codebook = _ops().quantize_backward(grad_zq, grad_loss, z, codebook, indices, ctx.beta, need_c,
                                                         ctx.left_out)
        return (grad_z if ctx.needs_input_grad[0] else None, grad_codebook if need_c else None, None, None, None)


def quantize(
    z: Tensor,
    codebook: Tensor,
    beta: float = 0.25,
    metric: str = "l2",
    precision: str | None = None,
    indices: Tensor | None = None,
    check_indices: bool = True,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The VQ step: nearest code, straight-through output and the two VQ-VAE losses.

    Plain PyTorch::

        indices = nearest_code(z, codebook)[0]
        q = codebook[indices]
        loss = F.mse_loss(q, z.detach()) + beta * F.mse_loss(z, q.detach())   # codebook + commitment
        z_q = z + (q - z).detach()    # value of the code, gradient straight through to z

    ``z`` is (..., D). Returns ``(z_q, loss, indices)``: z_q like z (value exactly the code, which
    ``z + (q - z)`` may round away from by an ulp), loss a float32
    scalar (float64 for float64 inputs), indices int64 shaped ``z.shape[:-1]``. With
    ``metric="cosine"`` both z and the codebook are l2-normalised first (z_q is then the unit code; an
    all-zero row stays zero and gets no gradient through the normalisation).
    ``indices`` (shaped ``z.shape[:-1]``) skips the search when given; values outside [0, K) raise
    ValueError, a host-side check that ``check_indices=False`` skips on the GPU (as :func:`gather`;
    the CPU backend checks anyway). z and the codebook may differ in dtype: the search then runs in
    the wider one. ``mask`` (bool, shaped ``z.shape[:-1]``, False for padding): rows left out keep
    ``z_q = z`` (gradient included) and index -1, and the loss is a mean over the kept rows (0 if
    none); on the GPU with the l2 metric the fused kernels leave them out, otherwise PyTorch ops do.
    Given ``indices`` with a mask, those of the rows left out are neither used nor checked.
    On the Triton backend the backward reads the codebook itself (the CPU backend saves the chosen
    codes): changing it in place between the forward and the backward (a manual restart, say) raises
    PyTorch's in-place error there; ``VectorQuantizer`` saves a copy of its codebook for that reason.
    """
    check_search_inputs(z, codebook, metric, allow_mixed_dtypes=True)
    check_matmul_precision(precision)
    beta = check_number(beta, "beta", minimum=0.0)
    check_indices = check_bool(check_indices, "check_indices")
    wide = torch.float64 in (z.dtype, codebook.dtype)
    backend = resolve_backend(z.device, torch.float64 if wide else z.dtype)
    # The shape first: a range error about the -1 of a masked row would point at the wrong problem.
    if isinstance(indices, Tensor) and indices.shape != z.shape[:-1]:
        raise ValueError(f"indices must have the shape of z without its last dimension, {tuple(z.shape[:-1])}; "
                         f"got {tuple(indices.shape)}")
    if mask is not None:
        check_row_mask(mask, z.shape[:-1], z.device, f"z {tuple(z.shape)}")
        if torch.is_grad_enabled():
            (mask,) = reference.saveable(mask)  # (the selections of the masked step save it for backward)
        if (isinstance(indices, Tensor) and indices.device == mask.device
                and indices.dtype in (torch.int64, torch.int32)):  # (else gather's checks say what is wrong)
            # Indices of left-out rows are not used (they may be -1, from an earlier masked step).
            indices = torch.where(mask, indices, 0)
    if indices is not None:
        # The CPU backend always checks (the check costs no device sync there), as gather does, under
        # torch.compile with an assertion inside the graph.
        compiling = torch.compiler.is_compiling()
        check_gather_inputs(codebook, indices, check_range=(check_indices or backend == "torch") and not compiling)
        if compiling and backend == "torch":
            reference._assert_in_range(indices, codebook.shape[0])
        indices = indices.to(torch.int64)
    given_z, given_codebook = z, codebook
    if metric == "cosine":
        z = reference.unit_rows(z)
        codebook = reference.unit_rows(codebook)
    if indices is None:
        with torch.no_grad():
            # Mixed dtypes search in the wider one: rounding fp32 rows to an fp16 codebook's type could
            # overflow them or pick another code. The cosine metric searches the given vectors, which
            # nearest_code normalises in fp32 (as for the layer): the 16-bit unit vectors above would
            # pick other codes among near ties.
            search_dtype = torch.promote_types(given_z.dtype, given_codebook.dtype)
            search_z, search_codes = (given_z, given_codebook) if metric == "cosine" else (z, codebook)
            indices = nearest_code(search_z.detach().to(search_dtype), search_codes.detach().to(search_dtype),
                                   metric=metric, precision=precision)[0]
    if mask is not None:
        rows, valid, row_indices = _rows(given_z), mask.reshape(-1), indices.reshape(-1)
        step_indices = torch.where(valid, row_indices, -1)
        if backend == "triton" and metric == "l2":
            z_q, loss = apply_function(_FusedQuantize, rows, given_codebook, step_indices, float(beta), True)
        else:
            z_q, loss = _masked_quantize_rows(rows, given_codebook, row_indices, valid, beta, metric)
        return z_q.reshape(given_z.shape), loss, step_indices.reshape(given_z.shape[:-1])
    if backend == "torch":
        return reference.quantize(z, codebook, beta=beta, indices=indices)
    if z.dim() == 2:
        # Rows already: the reshapes would change nothing and cost an autograd node each way.
        z_q, loss = apply_function(_FusedQuantize, z, codebook, indices, float(beta), False)
        return z_q, loss, indices
    lead_shape = z.shape[:-1]
    z_q, loss = apply_function(_FusedQuantize, _rows(z), codebook, indices.reshape(-1), float(beta), False)
    return z_q.reshape(z.shape), loss, indices.reshape(lead_shape)


def _masked_quantize_rows(rows: Tensor, codebook: Tensor, indices: Tensor, valid: Tensor, beta: float,
                          metric: str = "l2", to_codes: Callable[[Tensor, Tensor], Tensor] | None = None,
                          ) -> tuple[Tensor, Tensor]:
    """``quantize``'s ``(z_q, loss)`` for rows (N, D) over the ``valid`` rows only, in plain PyTorch around
    ``gather`` (N x D temporaries): the losses are means over the kept rows (0 when there are none), and
    ``z_q`` is the code (``to_codes(z, code)``, straight through by default) on kept rows and ``rows``
    itself, gradient included, on the others."""
    keep = valid.unsqueeze(1)
    # Padding is replaced before any arithmetic: whatever it holds (NaN included) must not reach the
    # loss or, through a 0 * NaN in a backward, the gradients.
    z = torch.where(keep, rows, 0.0)
    if metric == "cosine":
        z, codebook = reference.unit_rows(z), reference.unit_rows(codebook)
    q = gather(codebook, indices, check_indices=False)
    # The losses in fp32 at least, as quantize's (a 16-bit sum of squares overflows).
    acc = torch.promote_types(torch.promote_types(q.dtype, z.dtype), torch.float32)
    # Left-out rows' codes are replaced too, so both terms are exactly 0 there and their gradient is 0:
    # a NaN code that only padding points at stays out of the loss and the codebook's gradient.
    q_kept = torch.where(keep, q.to(acc), 0.0)
    z_kept = z.to(acc)
    scale = 1.0 / (valid.sum().clamp_min(1) * rows.shape[1]).to(acc)
    codebook_loss = (q_kept - z_kept.detach()).square().sum() * scale
    commitment = (z_kept - q_kept.detach()).square().sum() * scale
    to_codes = to_codes or reference.straight_through
    z_q = torch.where(keep, to_codes(z, q.detach().to(z.dtype)), rows)
    return z_q, codebook_loss + reference.weighted(commitment, beta)


@signature_kept
class _RotateToCodes(torch.autograd.Function):
    """The value of ``codes``; the gradient of ``(lambda M) z`` with ``lambda M`` held constant (see
    :func:`rotate_to_codes`)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(z: Tensor, codes: Tensor) -> Tensor:  # type: ignore[override]
        return codes.detach().clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        ctx.save_for_backward(*reference.saveable(*inputs))

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        z, codes = ctx.saved_tensors
        if _rotation_kernel_applies(z, codes, grad):
            from vqfast import kernels
            from vqfast.ops import on_device

            with on_device(z):
                d = z.shape[-1]
                return kernels.rotate_gradient(z.reshape(-1, d), codes.reshape(-1, d), grad.reshape(-1, d),
                                               _HALFWAY_MIN).reshape(grad.shape), None
        # The rotation is a constant of the step (built from detached tensors); only the incoming
        # gradient is differentiated again under create_graph=True.
        wide = torch.promote_types(torch.promote_types(z.dtype, codes.dtype), torch.float32)
        z_unit, z_largest, z_norm = _unit_and_norm(z.detach().to(wide))
        code_unit, code_largest, code_norm = _unit_and_norm(codes.detach().to(wide))
        halfway = z_unit + code_unit
        halfway_norm = torch.linalg.vector_norm(halfway, dim=-1, keepdim=True)
        # |c| / |z| from the norms of the rows scaled to a largest element of 1, so that neither
        # overflows nor underflows on its own.
        scale = (code_largest / z_largest) * (code_norm / z_norm)
        # No rotation for a zero row or code, a code opposite its row (the halfway vector vanishes), a
        # row or code that is not finite, or a ratio of norms beyond fp32: the straight-through
        # gradient there. Their factors are replaced before use, so that no inf or NaN reaches the
        # graph of the incoming gradient (create_graph=True) through a product with 0.
        defined = ((z_norm > 0) & (code_norm > 0) & (halfway_norm > _HALFWAY_MIN) & torch.isfinite(halfway_norm)
                   & torch.isfinite(scale) & (scale > 0))
        r = torch.where(defined, halfway / torch.where(defined, halfway_norm, 1.0), 0.0)
        z_unit = torch.where(defined, z_unit, 0.0)
        code_unit = torch.where(defined, code_unit, 0.0)
        scale = torch.where(defined, scale, 1.0)
        g = grad.to(wide)
        rotated = scale * (g - 2.0 * r * (r * g).sum(-1, keepdim=True)
                           + 2.0 * z_unit * (code_unit * g).sum(-1, keepdim=True))
        # In z's dtype (autograd's): rounded to a 16-bit upstream gradient's, |c| / |z| times it could overflow.
        return torch.where(defined, rotated, g).to(z.dtype), None


def _rotation_kernel_applies(z: Tensor, codes: Tensor, grad: Tensor) -> bool:
    """Whether :func:`rotate_to_codes`'s backward runs the kernel (``kernels/rotation.py``): on the Triton
    backend, for 16- and 32-bit tensors, in plain backward passes. Under ``torch.compile`` the PyTorch
    ops of ``_RotateToCodes.backward`` are traced (and fused by the compiler); with
    ``create_graph=True`` they are recorded, so that the gradient can be differentiated again."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or z.dim() == 0:
        return False
    if not all(t.dtype in (torch.float32, torch.float16, torch.bfloat16) for t in (z, codes, grad)):
        return False
    # Batched or wrapped tensors (torch.func, the vectorised jacobian's vmap) have no storage the kernel
    # could read: the PyTorch ops handle them.
    if torch._C._are_functorch_transforms_active() or any(
            is_legacy_batched(t) or torch._C._functorch.is_functorch_wrapped_tensor(t)
            for t in (z, codes, grad)):
        return False
    try:
        if resolve_backend(z.device, z.dtype) != "triton" or z.device.type != grad.device.type:
            return False
    except RuntimeError:  # the Triton backend forced where it cannot run: the PyTorch ops can
        return False
    # (The interpreter computes bfloat16 wrongly: vqfast keeps it off bfloat16 tensors.)
    return z.device.type == "cuda" or torch.bfloat16 not in (z.dtype, codes.dtype, grad.dtype)


def _unit_and_norm(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per row of ``x``: the unit row, its largest magnitude m and the norm of x / m (so that the
    norm is m times it; rows of zeros: m = 1, norm 0); non-finite rows give non-finite values."""
    largest = torch.linalg.vector_norm(x, ord=math.inf, dim=-1, keepdim=True)
    largest = torch.where(largest > 0, largest, 1.0)
    scaled = x / largest
    norm = torch.linalg.vector_norm(scaled, dim=-1, keepdim=True)
    return scaled / torch.where(norm > 0, norm, 1.0), largest, norm


# Below this length of z^ + c^ (a code within ~1e-6 rad of the opposite of its row) the reflection's axis
# is lost to rounding.
_HALFWAY_MIN = 1e-6


def rotate_to_codes(z: Tensor, codes: Tensor) -> Tensor:
    """The rotation trick (Fifty et al., 2024): the value of ``codes``, with a gradient to ``z`` that is
    rotated and scaled the way ``z`` is carried onto its code, instead of passed straight through.

    Plain PyTorch, per row (``z``, ``codes`` (..., D) of one shape)::

        z_hat, c_hat = z / |z|, c / |c|;  r = (z_hat + c_hat) / |z_hat + c_hat|
        M = I - 2 r r^T + 2 c_hat z_hat^T            # rotates z_hat onto c_hat
        out = (|c| / |z| * M).detach() @ z           # = c

    The value is ``codes`` exactly (not the product, which may round away from it), in their dtype;
    ``codes`` get no gradient. The gradient to ``z`` is computed in fp32 at least (norms of rows
    scaled to a largest element of 1, so any finite row works) and cast to z's dtype, where it is
    ``|c| / |z|`` times the upstream one in size: with 16-bit z and codes much longer than their rows
    it can overflow where the straight-through one would not. Where the rotation is not defined (a
    zero row or code, a code within ~1e-6 rad of the opposite of its row, a row or code holding NaN
    or inf, ``|c| / |z|`` beyond fp32) the gradient is passed straight through, unscaled. On the
    Triton backend the backward is one kernel (``kernels/rotation.py``); PyTorch ops compute it
    elsewhere, under ``torch.compile`` and with ``create_graph=True``.
    """
    if not isinstance(z, Tensor) or not isinstance(codes, Tensor):
        raise TypeError(f"z and codes must be torch.Tensors, got {type(z).__name__} and {type(codes).__name__}")
    if not z.is_floating_point() or not codes.is_floating_point():
        raise TypeError(f"z and codes must be floating-point tensors, got {z.dtype} and {codes.dtype}")
    if z.shape != codes.shape:
        raise ValueError(f"z and codes must have the same shape, got {tuple(z.shape)} and {tuple(codes.shape)}")
    if z.device != codes.device:
        raise ValueError(f"z is on {z.device}, codes on {codes.device}: they must be on the same device")
    if z.dim() > 0 and z.shape[-1] == 0:
        # (The other ops refuse it too: a row of no values has no direction to rotate.)
        raise ValueError(f"z and codes must be (..., D) with D >= 1, got shape {tuple(z.shape)}")
    return apply_function(_RotateToCodes, z, codes)
