"""The fused VQ step: gather the chosen codes, write the straight-through output and the squared error
in one pass (forward), and produce both gradients in one pass (backward).

Forward, for rows z (N, D), codes q = codebook[indices]:
    z_q = q (in z's dtype); sse = sum((q - z)^2)
    loss = mse(q, sg(z)) + beta * mse(z, sg(q)) = (1 + beta) * sse / (N * D)
Backward, with g = dloss and M = N * D:
    dz = dz_q + g * beta * 2 (z - q) / M          (straight-through plus commitment)
    dcodebook[indices] += g * 2 (q - z) / M       (codebook loss, fp32 accumulation)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vqfast.kernels._common import (
    LaunchConfig, cdiv, check_grid_yz, check_launchable, check_row_count, int32_safe_columns, next_power_of_2,
    row_block_d, row_tile_configs, scratch_trial, tuned_config,
)
from vqfast.kernels._launch import launch_kernel


@triton.jit
def _vq_forward_kernel(
    z_ptr, c_ptr, index_ptr, zq_ptr, partial_ptr, N, K, D,
    stride_zn, stride_zd, stride_ck, stride_cd,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
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
        z = tl.load(z_ptr + offs_n64[:, None] * stride_zn + offs_d[None, :] * stride_zd, mask=mask, other=0.0)
        q = tl.load(c_ptr + rows[:, None] * stride_ck + offs_d[None, :] * stride_cd,
                    mask=valid[:, None] & (offs_d[None, :] < D), other=0.0)
        q_out = q.to(z.dtype)
        tl.store(zq_ptr + offs_n64[:, None] * D + offs_d[None, :], q_out, mask=mask)
        diff = q.to(tl.float32) - z.to(tl.float32)
        sse += tl.sum(diff * diff, axis=1)
    # Per-program partial sums (summed afterwards) keep the loss deterministic.
    tl.store(partial_ptr + pid, tl.sum(sse, axis=0))


@triton.jit
def _vq_backward_kernel(
    grad_zq_ptr, grad_loss_ptr, z_ptr, c_ptr, index_ptr, grad_z_ptr, grad_c_ptr,
    N, K, D, coef_codebook, coef_commit,
    stride_gn, stride_gd, stride_zn, stride_zd, stride_ck, stride_cd,
    HAS_GRAD_ZQ: tl.constexpr, NEED_GRAD_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask = mask_n[:, None] & (offs_d[None, :] < D)
    rows = tl.load(index_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    # Unchecked indices outside [0, K) neither read nor write the codebook.
    mask_c = mask & ((rows >= 0) & (rows < K))[:, None]
    offs_n64 = offs_n.to(tl.int64)
    g = tl.load(grad_loss_ptr).to(tl.float32)
    z = tl.load(z_ptr + offs_n64[:, None] * stride_zn + offs_d[None, :] * stride_zd, mask=mask, other=0.0)
    q = tl.load(c_ptr + rows[:, None] * stride_ck + offs_d[None, :] * stride_cd, mask=mask_c, other=0.0)
    diff = q.to(tl.float32) - z.to(tl.float32)
    grad_z = -(g * coef_commit) * diff
    if HAS_GRAD_ZQ:
        grad_z += tl.load(grad_zq_ptr + offs_n64[:, None] * stride_gn + offs_d[None, :] * stride_gd,
                          mask=mask, other=0.0).to(tl.float32)
    tl.store(grad_z_ptr + offs_n64[:, None] * D + offs_d[None, :], grad_z.to(z.dtype), mask=mask)
    if NEED_GRAD_C:
        tl.atomic_add(grad_c_ptr + rows[:, None] * D + offs_d[None, :], (g * coef_codebook) * diff, mask=mask_c,
                      sem="relaxed")


def quantize_forward(z: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor,
                     beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z_q, loss)`` for rows ``z`` (N, D): ``z_q = codebook[indices].to(z.dtype)``,
    ``loss = (1 + beta) * ((z_q - z) ** 2).mean()`` in fp32 (0 for N = 0)."""
    check_launchable(z, codebook, indices)
    check_row_count(z.shape[0], "z")
    z, codebook = int32_safe_columns(z), int32_safe_columns(codebook)
    indices = indices.contiguous()  # the kernels read indices with unit stride
    n, d = z.shape
    z_q = torch.empty((n, d), dtype=z.dtype, device=z.device)
    if n == 0:
        return z_q, torch.zeros((), dtype=torch.float32, device=z.device)
    block_d = row_block_d(d)

    def launch(cfg: LaunchConfig) -> torch.Tensor:
        programs = cdiv(n, cfg.block)
        partial = torch.empty(programs, dtype=torch.float32, device=z.device)
        launch_kernel(_vq_forward_kernel, (programs,), z, codebook, indices, z_q, partial, n, codebook.shape[0], d,
                      z.stride(0), z.stride(1), codebook.stride(0), codebook.stride(1),
                      BLOCK_N=cfg.block, BLOCK_D=block_d, num_warps=cfg.num_warps)
        return partial

    # Timing runs write z_q too (the final launch overwrites it) and partial sums of their own.
    key = ("quantize_forward", next_power_of_2(n), d, z.dtype, codebook.dtype, z.device)
    partial = launch(tuned_config(key, row_tile_configs(block_d), launch))
    loss = partial.sum() * ((1.0 + beta) / (n * d))
    return z_q, loss


def quantize_backward(grad_zq: torch.Tensor | None, grad_loss: torch.Tensor, z: torch.Tensor,
                      codebook: torch.Tensor, indices: torch.Tensor, beta: float,
                      need_grad_codebook: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients ``(dz, dcodebook)`` of the fused VQ step (see the module docstring).

    With ``need_grad_codebook=False`` the scatter-add is skipped and ``dcodebook`` is an empty (0, D)
    tensor.
    """
    check_launchable(z, codebook, indices)
    check_row_count(z.shape[0], "z")
    z, codebook = int32_safe_columns(z), int32_safe_columns(codebook)
    indices = indices.contiguous()
    n, d = z.shape
    grad_z = torch.empty((n, d), dtype=z.dtype, device=z.device)
    c_shape = codebook.shape if need_grad_codebook else (0, d)
    grad_c = torch.zeros(c_shape, dtype=torch.float32, device=z.device)
    if n > 0:
        block_d = row_block_d(d)
        coef = 2.0 / (n * d)
        grad_loss = grad_loss.reshape(1).to(torch.float32)
        has_gzq = grad_zq is not None
        gzq = int32_safe_columns(grad_zq) if has_gzq else z
        check_grid_yz(cdiv(d, block_d), "the VQ backward")

        def launch(cfg: LaunchConfig, into_z: torch.Tensor = grad_z, into_c: torch.Tensor = grad_c) -> None:
            grid = (cdiv(n, cfg.block), cdiv(d, block_d))
            launch_kernel(_vq_backward_kernel, grid, gzq, grad_loss, z, codebook, indices, into_z, into_c, n,
                          codebook.shape[0], d, coef, coef * beta, gzq.stride(0), gzq.stride(1), z.stride(0), z.stride(1),
                          codebook.stride(0), codebook.stride(1),
                          HAS_GRAD_ZQ=has_gzq, NEED_GRAD_C=need_grad_codebook,
                          BLOCK_N=cfg.block, BLOCK_D=block_d, num_warps=cfg.num_warps)

        # The codebook gradient accumulates (atomics): timing runs go to scratch tensors.
        key = ("quantize_backward", next_power_of_2(n), codebook.shape[0], d, z.dtype, codebook.dtype, has_gzq,
               need_grad_codebook, z.device)
        launch(tuned_config(key, row_tile_configs(block_d), scratch_trial(launch, grad_z, grad_c)))
    elif grad_zq is not None:
        grad_z.copy_(grad_zq)
    return grad_z, (grad_c if codebook.dtype == torch.float32 else grad_c.to(codebook.dtype))
