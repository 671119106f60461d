"""The fused VQ step: gather the chosen codes, write the straight-through output and the squared error
in one pass (forward), and produce both gradients in one pass (backward).

Forward, for rows z (N, D), codes q = codebook[indices]:
    z_q = q (in z's dtype); sse = sum((q - z)^2)
    loss = mse(q, sg(z)) + beta * mse(z, sg(q)) = (1 + beta) * sse / (N * D)
Backward, with g = dloss and M = N * D:
    dz = dz_q + g * beta * 2 (z - q) / M          (straight-through plus commitment)
    dcodebook[indices] += g * 2 (q - z) / M       (codebook loss, fp32 accumulation)
With ``left_out=True`` (a padding mask), rows whose index is outside [0, K) (-1) are left out: their z_q
is z, they add nothing to sse or the codebook gradient, their dz is dz_q, and M = (rows kept) * D.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vqfast.kernels import _common
from vqfast.kernels._common import (
    LaunchConfig, check_beta, check_kernel_floats, PlanCache, RowLaunches, cdiv, check_grid_yz, check_launchable, check_matrices, check_row_count,
    check_row_indices, deterministic, index_add_rows, int32_safe_strides, next_power_of_2, row_block_d, row_tile_configs, scratch_trial,
    tuned_config, resolves_negative_views,
)


@triton.jit
def _vq_forward_kernel(
    z_ptr, c_ptr, index_ptr, zq_ptr, partial_ptr, N, K, D,
    stride_zn, stride_zd, stride_ck, stride_cd,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, STREAM: tl.constexpr, LEFT_OUT: tl.constexpr,
):
    # (STREAM: z and z_q pass through once; the codes, read many times, stay in L2.)
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = tl.load(index_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    # Unchecked indices outside [0, K) read no code (a zero row) instead of reading out of bounds.
    valid = mask_n & (rows >= 0) & (rows < K)
    offs_n64 = offs_n.to(tl.int64)
    sse = tl.zeros([BLOCK_N], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_n[:, None] & (offs_d[None, :] < D)
        z = tl.load(z_ptr + offs_n64[:, None] * stride_zn + offs_d[None, :] * stride_zd, mask=mask, other=0.0,
                    eviction_policy="evict_first" if STREAM else "")
        q = tl.load(c_ptr + rows[:, None] * stride_ck + offs_d[None, :] * stride_cd,
                    mask=valid[:, None] & (offs_d[None, :] < D), other=0.0)
        q_out = q.to(z.dtype)
        diff = q.to(tl.float32) - z.to(tl.float32)
        if LEFT_OUT:
            # Rows left out pass z through and add nothing (whatever z holds there).
            q_out = tl.where(valid[:, None], q_out, z)
            diff = tl.where(valid[:, None], diff, 0.0)
        tl.store(zq_ptr + offs_n64[:, None] * D + offs_d[None, :], q_out, mask=mask,
                 cache_modifier=".cs" if STREAM else "")
        sse += tl.sum(diff * diff, axis=1)
    # Per-program partial sums (summed afterwards) keep the loss deterministic.
    tl.store(partial_ptr + pid, tl.sum(sse, axis=0))


@triton.jit
def _vq_backward_kernel(
    grad_zq_ptr, grad_loss_ptr, z_ptr, c_ptr, index_ptr, grad_z_ptr, grad_c_ptr,
    N, K, D, coef_codebook, coef_commit,
    stride_gn, stride_gd, stride_zn, stride_zd, stride_ck, stride_cd,
    HAS_GRAD_ZQ: tl.constexpr, NEED_GRAD_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    STREAM: tl.constexpr, LEFT_OUT: tl.constexpr,
):
    # (STREAM: z, dz_q and dz pass through once; the codes and their gradient, where the atomics land,
    # stay in L2.)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask = mask_n[:, None] & (offs_d[None, :] < D)
    rows = tl.load(index_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    # Unchecked indices outside [0, K) neither read nor write the codebook.
    mask_c = mask & ((rows >= 0) & (rows < K))[:, None]
    offs_n64 = offs_n.to(tl.int64)
    g = tl.load(grad_loss_ptr).to(tl.float32)
    z = tl.load(z_ptr + offs_n64[:, None] * stride_zn + offs_d[None, :] * stride_zd, mask=mask, other=0.0,
                eviction_policy="evict_first" if STREAM else "")
    q = tl.load(c_ptr + rows[:, None] * stride_ck + offs_d[None, :] * stride_cd, mask=mask_c, other=0.0)
    diff = q.to(tl.float32) - z.to(tl.float32)
    if LEFT_OUT:
        diff = tl.where(mask_c, diff, 0.0)
    grad_z = -(g * coef_commit) * diff
    if HAS_GRAD_ZQ:
        grad_z += tl.load(grad_zq_ptr + offs_n64[:, None] * stride_gn + offs_d[None, :] * stride_gd,
                          mask=mask, other=0.0, eviction_policy="evict_first" if STREAM else "").to(tl.float32)
    tl.store(grad_z_ptr + offs_n64[:, None] * D + offs_d[None, :], grad_z.to(z.dtype), mask=mask,
             cache_modifier=".cs" if STREAM else "")
    if NEED_GRAD_C:
        tl.atomic_add(grad_c_ptr + rows[:, None] * D + offs_d[None, :], (g * coef_codebook) * diff, mask=mask_c,
                      sem="relaxed")


@resolves_negative_views
def quantize_forward(z: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor,
                     beta: float, left_out: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z_q, loss)`` for rows ``z`` (N, D): ``z_q = codebook[indices].to(z.dtype)``,
    ``loss = (1 + beta) * ((z_q - z) ** 2).mean()`` in fp32 (0 for N = 0). ``left_out``: rows with
    index -1 (outside [0, K)) keep ``z_q = z`` and the mean is over the other rows (0 if none)."""
    check_launchable(z, codebook, indices)
    # (beta's type too: True == 1, which the plan's checks refuse.)
    key = (z.shape, z.stride(), codebook.shape, codebook.stride(), z.dtype, codebook.dtype, z.device, codebook.device, beta,
           type(beta), bool(left_out), _common.MAX_ROWS, _common.interpreting())
    plan = _FORWARD_PLANS.get(key)
    if plan is None:
        plan = _FORWARD_PLANS.add(key, _ForwardPlan(z, codebook, beta, left_out))
    check_row_indices(indices, z.shape[0], z.device)
    if plan.copy_z:
        z = z.contiguous()
    if plan.copy_codebook:
        codebook = codebook.contiguous()
    indices = indices.contiguous()  # the kernels read indices with unit stride
    z_q = torch.empty(plan.shape, dtype=z.dtype, device=z.device)
    launches = plan.launches
    if launches is None:
        return z_q, torch.zeros((), dtype=torch.float32, device=z.device)

    def launch(cfg: LaunchConfig) -> torch.Tensor:
        partial = torch.empty(launches.programs(cfg), dtype=torch.float32, device=z.device)
        launches[cfg](z, codebook, indices, z_q, partial)
        return partial

    # Timing runs write z_q too (the final launch overwrites it) and partial sums of their own.
    partial = launch(tuned_config(plan.tune_key, plan.configs, launch))
    # In place (the sum is a fresh tensor), by a float32 CPU scalar: the product is the one a Python
    # float gives (the scalar is rounded to float32 either way) without wrapping it in a tensor per call.
    loss = partial.sum().mul_(plan.scale)
    if plan.left_out:
        loss = loss.mul_(_left_out_scale(indices, codebook.shape[0]))
    return z_q, loss


def _left_out_scale(indices: torch.Tensor, num_codes: int) -> torch.Tensor:
    """N / (rows kept, at least 1), float32 on the device: turns a mean over all rows into one over the
    rows kept (index in [0, K)), without a host sync."""
    kept = ((indices >= 0) & (indices < num_codes)).sum().clamp_min_(1)
    return indices.shape[0] / kept.to(torch.float32)


def check_vq_step(z: torch.Tensor, codebook: torch.Tensor, beta: float) -> None:
    """The fused step's inputs beyond their shapes: kernel dtypes, at least one code of at least one
    element, at most MAX_ROWS rows, a finite beta >= 0."""
    check_kernel_floats(("z", z), ("codebook", codebook))
    if codebook.shape[0] == 0 or codebook.shape[1] == 0:
        raise ValueError(f"codebook must have at least one code of at least one element, got shape "
                         f"{tuple(codebook.shape)}")
    check_row_count(z.shape[0], "z")
    check_beta(beta)


class _ForwardPlan:
    """What ``quantize_forward`` computes from its problem (see ``PlanCache``); made only for inputs
    that passed the checks."""

    def __init__(self, z: torch.Tensor, codebook: torch.Tensor, beta: float, left_out: bool = False):
        check_matrices(("z", z), ("codebook", codebook))
        check_vq_step(z, codebook, beta)
        self.copy_z, z_strides = int32_safe_strides(z)
        self.copy_codebook, c_strides = int32_safe_strides(codebook)
        n, d = z.shape
        self.shape = (n, d)
        self.left_out = bool(left_out)
        self.launches = None
        if n == 0:
            return
        block_d = row_block_d(d)
        self.configs = row_tile_configs(block_d, 2 * n * d * z.element_size())  # (z read, z_q written once)
        self.tune_key = ("quantize_forward", next_power_of_2(n), d, z.dtype, codebook.dtype, z.device,
                         self.configs[-1].stream)
        self.scale = torch.tensor((1.0 + beta) / (n * d), dtype=torch.float32, device="cpu")
        self.launches = RowLaunches(_vq_forward_kernel, n, None,
                                    (n, codebook.shape[0], d, z_strides[0], z_strides[1], c_strides[0], c_strides[1]),
                                    dict(BLOCK_D=block_d, LEFT_OUT=self.left_out))


_FORWARD_PLANS = PlanCache()


@resolves_negative_views
def quantize_backward(grad_zq: torch.Tensor | None, grad_loss: torch.Tensor, z: torch.Tensor,
                      codebook: torch.Tensor, indices: torch.Tensor, beta: float,
                      need_grad_codebook: bool = True, left_out: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients ``(dz, dcodebook)`` of the fused VQ step (see the module docstring; ``left_out`` as in
    :func:`quantize_forward`).

    With ``need_grad_codebook=False`` the scatter-add is skipped and ``dcodebook`` is an empty (0, D)
    tensor. The kernel adds into ``dcodebook`` atomically, in no fixed order; under
    ``torch.use_deterministic_algorithms(True)`` the kernel writes ``dz`` only and ``dcodebook`` is summed
    by ``index_add_`` instead.
    """
    check_launchable(z, codebook, indices)
    has_gzq = grad_zq is not None
    # Deterministic mode: the kernel writes dz only, and the codebook gradient is summed in a fixed order.
    fixed_order = bool(need_grad_codebook) and deterministic()
    key = (z.shape, z.stride(), codebook.shape, codebook.stride(), z.dtype, codebook.dtype, z.device, codebook.device, beta,
           type(beta), bool(need_grad_codebook), fixed_order, (grad_zq.shape, grad_zq.stride(), grad_zq.dtype, grad_zq.device) if has_gzq else None,
           bool(left_out), _common.MAX_ROWS, _common.interpreting())
    plan = _BACKWARD_PLANS.get(key)
    if plan is None:
        plan = _BACKWARD_PLANS.add(key, _BackwardPlan(grad_zq, z, codebook, beta, need_grad_codebook, fixed_order,
                                                      left_out))
    check_row_indices(indices, z.shape[0], z.device)
    if plan.copy_z:
        z = z.contiguous()
    if plan.copy_codebook:
        codebook = codebook.contiguous()
    indices = indices.contiguous()
    device = z.device
    grad_z = torch.empty(plan.shape, dtype=z.dtype, device=device)
    grad_c = None if plan.fixed_order else torch.zeros(plan.c_shape, dtype=torch.float32, device=device)
    launches = plan.launches
    if grad_loss.numel() != 1:
        raise ValueError(f"grad_loss must hold one value (the gradient of the scalar loss), got shape "
                         f"{tuple(grad_loss.shape)}")
    if launches is not None:
        if grad_loss.dim() or grad_loss.dtype != torch.float32:
            grad_loss = grad_loss.reshape(1).to(torch.float32)
        if plan.left_out:
            # The mean over the rows kept: the kernel's coefficients hold 1 / (N D).
            grad_loss = grad_loss * _left_out_scale(indices, codebook.shape[0])
        gzq = (grad_zq.contiguous() if plan.copy_gzq else grad_zq) if has_gzq else z

        # (Deterministic mode: the kernel leaves the codebook gradient alone; any fp32 tensor stands in.)
        def launch(cfg: LaunchConfig, into_z: torch.Tensor = grad_z,
                   into_c: torch.Tensor = grad_loss if grad_c is None else grad_c) -> None:
            launches[cfg](gzq, grad_loss, z, codebook, indices, into_z, into_c)

        # The codebook gradient accumulates (atomics): timing runs go to scratch tensors.
        launch(tuned_config(plan.tune_key, plan.configs, scratch_trial(launch, grad_z, grad_c)))
    elif has_gzq:
        grad_z.copy_(grad_zq)
    if plan.fixed_order:
        grad_c = _codebook_grad_in_order(grad_loss, z, codebook, indices, plan.coef_codebook)
    return grad_z, (grad_c if codebook.dtype == torch.float32 else grad_c.to(codebook.dtype))


def _codebook_grad_in_order(grad_loss: torch.Tensor, z: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor,
                            coef: float) -> torch.Tensor:
    """The backward kernel's codebook gradient, ``dcodebook[indices] += g * coef * (q - z)`` in fp32, as a
    fixed-order sum (``index_add_rows``) for deterministic mode."""
    k = codebook.shape[0]
    if k == 0:
        return torch.zeros((0, codebook.shape[1]), dtype=torch.float32, device=codebook.device)
    # Indices outside [0, K) read code 0 here; index_add_rows drops their rows.
    q = codebook.index_select(0, indices.clamp(0, k - 1)).to(torch.float32)
    # (g * coef) first, in fp32, as the kernel forms it.
    step = grad_loss.reshape(()).to(torch.float32) * coef
    return index_add_rows(q.sub_(z.to(torch.float32)).mul_(step), indices, k)


class _BackwardPlan:
    """What ``quantize_backward`` computes from its problem (see ``PlanCache``); made only for inputs
    that passed the checks."""

    def __init__(self, grad_zq: torch.Tensor | None, z: torch.Tensor, codebook: torch.Tensor, beta: float,
                 need_grad_codebook: bool, fixed_order: bool = False, left_out: bool = False):
        check_matrices(("z", z), ("codebook", codebook))
        if grad_zq is not None and (grad_zq.shape != z.shape or grad_zq.device != z.device):
            raise ValueError(f"grad_zq must have z's shape {tuple(z.shape)} on {z.device}, got "
                             f"{tuple(grad_zq.shape)} on {grad_zq.device}")
        if grad_zq is not None:
            check_kernel_floats(("grad_zq", grad_zq))
        check_vq_step(z, codebook, beta)
        self.copy_z, z_strides = int32_safe_strides(z)
        self.copy_codebook, c_strides = int32_safe_strides(codebook)
        n, d = z.shape
        self.shape = (n, d)
        self.c_shape = codebook.shape if need_grad_codebook else (0, d)
        self.fixed_order = fixed_order  # the codebook gradient summed outside the kernel (deterministic mode)
        self.left_out = bool(left_out)
        self.coef_codebook = 2.0 / (n * d) if n else 0.0
        self.copy_gzq = False
        self.launches = None
        if n == 0:
            return
        block_d = row_block_d(d)
        coef = 2.0 / (n * d)
        has_gzq = grad_zq is not None
        g_strides = z_strides
        if has_gzq:
            self.copy_gzq, g_strides = int32_safe_strides(grad_zq)
        check_grid_yz(cdiv(d, block_d), "the VQ backward")
        # (z and dz_q read, dz written once)
        self.configs = row_tile_configs(block_d, (3 if has_gzq else 2) * n * d * z.element_size())
        self.tune_key = ("quantize_backward", next_power_of_2(n), codebook.shape[0], d, z.dtype, codebook.dtype,
                         has_gzq, need_grad_codebook, z.device, self.configs[-1].stream)
        self.launches = RowLaunches(
            _vq_backward_kernel, n, cdiv(d, block_d),
            (n, codebook.shape[0], d, coef, coef * beta, g_strides[0], g_strides[1], z_strides[0], z_strides[1],
             c_strides[0], c_strides[1]),
            dict(HAS_GRAD_ZQ=has_gzq, NEED_GRAD_C=need_grad_codebook and not fixed_order, BLOCK_D=block_d,
                 LEFT_OUT=self.left_out))


_BACKWARD_PLANS = PlanCache()
