"""Codebook gather and its backward, a scatter-add of row gradients with fp32 accumulation."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vqfast.kernels import _common
from vqfast.kernels._common import (
    LaunchConfig, check_code_count, PlanCache, RowLaunches, cdiv, check_grid_yz, check_launchable, check_matrices, check_row_indices,
    deterministic, index_add_rows, int32_safe_strides, next_power_of_2, row_block_d, row_tile_configs, scratch_trial,
    tuned_config, resolves_negative_views,
)


@triton.jit
def _gather_rows_kernel(
    c_ptr, index_ptr, out_ptr, N, K, D,
    stride_ck, stride_cd, stride_on,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, STREAM: tl.constexpr,
):
    # 64-bit row numbers: memory-bound, so wide offsets cost nothing and N may pass 2**31.
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask = mask_n[:, None] & (offs_d[None, :] < D)
    rows = tl.load(index_ptr + offs_n, mask=mask_n, other=0, eviction_policy="evict_first" if STREAM else "").to(tl.int64)
    # Unchecked indices (check_indices=False) outside [0, K) read nothing and give zero rows.
    valid = (rows >= 0) & (rows < K)
    # (STREAM: the output is written once; the codes, read many times, stay in L2.)
    vals = tl.load(c_ptr + rows[:, None] * stride_ck + offs_d[None, :] * stride_cd, mask=mask & valid[:, None],
                   other=0.0)
    tl.store(out_ptr + offs_n[:, None] * stride_on + offs_d[None, :], vals, mask=mask,
             cache_modifier=".cs" if STREAM else "")


@triton.jit
def _scatter_add_rows_kernel(
    grad_ptr, index_ptr, out_ptr, N, K, D,
    stride_gn, stride_gd,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, STREAM: tl.constexpr,
):
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask = mask_n[:, None] & (offs_d[None, :] < D)
    rows = tl.load(index_ptr + offs_n, mask=mask_n, other=0, eviction_policy="evict_first" if STREAM else "").to(tl.int64)
    # (STREAM: the gradient passes through once; the output, where the atomics land, stays in L2.)
    g = tl.load(grad_ptr + offs_n[:, None] * stride_gn + offs_d[None, :] * stride_gd,
                mask=mask, other=0.0, eviction_policy="evict_first" if STREAM else "").to(tl.float32)
    # Unchecked indices outside [0, K) must never write outside the output.
    valid = (rows >= 0) & (rows < K)
    tl.atomic_add(out_ptr + rows[:, None] * D + offs_d[None, :], g, mask=mask & valid[:, None], sem="relaxed")


@resolves_negative_views
def gather_rows(codebook: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``codebook[indices]`` for 1-D ``indices``: (N, D) in the codebook's dtype. Callers check the
    indices; one outside [0, K) gives a zero row, never an out-of-bounds read."""
    check_launchable(codebook, indices)
    check_row_indices(indices, None, codebook.device)
    if codebook.is_complex():  # (Triton has no complex pointer type)
        raise TypeError(f"the codebook must be real for the gather kernel, got {codebook.dtype}")
    key = (codebook.shape, codebook.stride(), indices.shape, indices.dtype, codebook.dtype, codebook.device,
           _common.interpreting())
    plan = _GATHER_PLANS.get(key)
    if plan is None:
        plan = _GATHER_PLANS.add(key, _GatherPlan(codebook, indices))
    if plan.copy_codebook:
        codebook = codebook.contiguous()
    indices = indices.contiguous()  # the kernels read indices with unit stride
    out = torch.empty(plan.shape, dtype=codebook.dtype, device=codebook.device)
    launches = plan.launches
    if launches is None:
        return out

    def launch(cfg: LaunchConfig) -> None:
        launches[cfg](codebook, indices, out)

    # Timing runs write the real output too: the final launch overwrites it.
    launch(tuned_config(plan.tune_key, plan.configs, launch))
    return out


class _GatherPlan:
    """What ``gather_rows`` computes from its problem (see ``PlanCache``)."""

    def __init__(self, codebook: torch.Tensor, indices: torch.Tensor):
        check_matrices(("codebook", codebook))
        self.copy_codebook, c_strides = int32_safe_strides(codebook)
        n, d = indices.shape[0], codebook.shape[1]
        self.shape = (n, d)
        self.launches = None
        if n == 0 or d == 0:
            return
        block_d = row_block_d(d)
        check_grid_yz(cdiv(d, block_d), "a gather")
        # (The rows written and the indices pass through once.)
        self.configs = row_tile_configs(block_d, n * (d * codebook.element_size() + indices.element_size()))
        self.tune_key = ("gather", next_power_of_2(n), d, codebook.dtype, indices.dtype, codebook.device,
                         self.configs[-1].stream)
        # (The output is contiguous: its row stride is d.)
        self.launches = RowLaunches(_gather_rows_kernel, n, cdiv(d, block_d),
                                    (n, codebook.shape[0], d, c_strides[0], c_strides[1], d), dict(BLOCK_D=block_d))


_GATHER_PLANS = PlanCache()


@resolves_negative_views
def scatter_add_rows(grad: torch.Tensor, indices: torch.Tensor, num_codes: int,
                     out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sum rows of ``grad`` (N, D) into a (num_codes, D) tensor at ``indices``, accumulating in fp32.

    Equivalent to ``torch.zeros(K, D).index_add_(0, indices, grad.float()).to(out_dtype)``; rows whose
    index lies outside [0, K) are dropped (callers check the indices). The kernel adds atomically, in
    no fixed order; under ``torch.use_deterministic_algorithms(True)`` it is that ``index_add_``.
    """
    check_launchable(grad, indices)
    if grad.is_complex() or not grad.is_floating_point():  # (Triton has no complex pointer type)
        raise TypeError(f"grad must be a real floating-point tensor for the scatter-add kernel, got {grad.dtype}")
    check_code_count(num_codes)
    if out_dtype is not None and not isinstance(out_dtype, torch.dtype):
        raise TypeError(f"out_dtype must be a torch.dtype or None, got {out_dtype!r}")
    key = (grad.shape, grad.stride(), num_codes, type(num_codes), grad.dtype, grad.device, _common.interpreting())
    plan = _SCATTER_PLANS.get(key)
    if plan is None:
        plan = _SCATTER_PLANS.add(key, _ScatterPlan(grad, num_codes))
    check_row_indices(indices, grad.shape[0], grad.device)
    if plan.copy_grad:
        grad = grad.contiguous()
    indices = indices.contiguous()
    launches = plan.launches
    if launches is not None and deterministic():
        acc = index_add_rows(grad, indices, plan.shape[0])
    else:
        acc = torch.zeros(plan.shape, dtype=torch.float32, device=grad.device)
        if launches is not None:
            def launch(cfg: LaunchConfig, into: torch.Tensor = acc) -> None:
                launches[cfg](grad, indices, into)

            launch(tuned_config(plan.tune_key, plan.configs, scratch_trial(launch, acc)))
    out_dtype = out_dtype or grad.dtype
    return acc if out_dtype == torch.float32 else acc.to(out_dtype)


class _ScatterPlan:
    """What ``scatter_add_rows`` computes from its problem (see ``PlanCache``)."""

    def __init__(self, grad: torch.Tensor, num_codes: int):
        check_matrices(("grad", grad))
        self.copy_grad, g_strides = int32_safe_strides(grad)
        n, d = grad.shape
        self.shape = (num_codes, d)
        self.launches = None
        if n == 0 or d == 0:
            return
        block_d = row_block_d(d)
        check_grid_yz(cdiv(d, block_d), "a scatter-add")
        # (The gradient rows and the indices pass through once; int64 indices assumed.)
        self.configs = row_tile_configs(block_d, n * (d * grad.element_size() + 8))
        self.tune_key = ("scatter_add", next_power_of_2(n), num_codes, d, grad.dtype, grad.device,
                         self.configs[-1].stream)
        self.launches = RowLaunches(_scatter_add_rows_kernel, n, cdiv(d, block_d),
                                    (n, num_codes, d, g_strides[0], g_strides[1]), dict(BLOCK_D=block_d))


_SCATTER_PLANS = PlanCache()
