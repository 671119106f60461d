"""Codebook gather and its backward, a scatter-add of row gradients with fp32 accumulation."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vqfast.kernels._common import (
    LaunchConfig, cdiv, check_grid_yz, check_launchable, int32_safe_columns, next_power_of_2, row_block_d,
    row_tile_configs, scratch_trial, tuned_config,
)
from vqfast.kernels._launch import launch_kernel


@triton.jit
def _gather_rows_kernel(
    c_ptr, index_ptr, out_ptr, N, K, D,
    stride_ck, stride_cd, stride_on,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # 64-bit row numbers: memory-bound, so wide offsets cost nothing and N may pass 2**31.
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask = mask_n[:, None] & (offs_d[None, :] < D)
    rows = tl.load(index_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    # Unchecked indices (check_indices=False) outside [0, K) read nothing and give zero rows.
    valid = (rows >= 0) & (rows < K)
    vals = tl.load(c_ptr + rows[:, None] * stride_ck + offs_d[None, :] * stride_cd, mask=mask & valid[:, None],
                   other=0.0)
    tl.store(out_ptr + offs_n[:, None] * stride_on + offs_d[None, :], vals, mask=mask)


@triton.jit
def _scatter_add_rows_kernel(
    grad_ptr, index_ptr, out_ptr, N, K, D,
    stride_gn, stride_gd,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask = mask_n[:, None] & (offs_d[None, :] < D)
    rows = tl.load(index_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    g = tl.load(grad_ptr + offs_n[:, None] * stride_gn + offs_d[None, :] * stride_gd,
                mask=mask, other=0.0).to(tl.float32)
    # Unchecked indices outside [0, K) must never write outside the output.
    valid = (rows >= 0) & (rows < K)
    tl.atomic_add(out_ptr + rows[:, None] * D + offs_d[None, :], g, mask=mask & valid[:, None], sem="relaxed")


def gather_rows(codebook: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``codebook[indices]`` for 1-D ``indices``: (N, D) in the codebook's dtype. Callers check the
    indices; one outside [0, K) gives a zero row, never an out-of-bounds read."""
    check_launchable(codebook, indices)
    codebook = int32_safe_columns(codebook)
    indices = indices.contiguous()  # the kernels read indices with unit stride
    n, d = indices.shape[0], codebook.shape[1]
    out = torch.empty((n, d), dtype=codebook.dtype, device=codebook.device)
    if n == 0 or d == 0:
        return out
    block_d = row_block_d(d)
    check_grid_yz(cdiv(d, block_d), "a gather")

    def launch(cfg: LaunchConfig) -> None:
        grid = (cdiv(n, cfg.block), cdiv(d, block_d))
        launch_kernel(_gather_rows_kernel, grid, codebook, indices, out, n, codebook.shape[0], d, codebook.stride(0),
                      codebook.stride(1), out.stride(0), BLOCK_N=cfg.block, BLOCK_D=block_d,
                      num_warps=cfg.num_warps)

    # Timing runs write the real output too: the final launch overwrites it.
    key = ("gather", next_power_of_2(n), d, codebook.dtype, codebook.device)
    launch(tuned_config(key, row_tile_configs(block_d), launch))
    return out


def scatter_add_rows(grad: torch.Tensor, indices: torch.Tensor, num_codes: int,
                     out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sum rows of ``grad`` (N, D) into a (num_codes, D) tensor at ``indices``, accumulating in fp32.

    Equivalent to ``torch.zeros(K, D).index_add_(0, indices, grad.float()).to(out_dtype)``; rows whose
    index lies outside [0, K) are dropped (callers check the indices).
    """
    check_launchable(grad, indices)
    grad = int32_safe_columns(grad)
    indices = indices.contiguous()
    n, d = grad.shape
    acc = torch.zeros((num_codes, d), dtype=torch.float32, device=grad.device)
    if n > 0 and d > 0:
        block_d = row_block_d(d)
        check_grid_yz(cdiv(d, block_d), "a scatter-add")

        def launch(cfg: LaunchConfig, into: torch.Tensor = acc) -> None:
            grid = (cdiv(n, cfg.block), cdiv(d, block_d))
            launch_kernel(_scatter_add_rows_kernel, grid, grad, indices, into, n, num_codes, d, grad.stride(0),
                          grad.stride(1), BLOCK_N=cfg.block, BLOCK_D=block_d, num_warps=cfg.num_warps)

        key = ("scatter_add", next_power_of_2(n), num_codes, d, grad.dtype, grad.device)
        launch(tuned_config(key, row_tile_configs(block_d), scratch_trial(launch, acc)))
    out_dtype = out_dtype or grad.dtype
    return acc if out_dtype == torch.float32 else acc.to(out_dtype)
