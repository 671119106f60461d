"""Fused nearest-code search: squared distances and a running argmin, never writing the N x K matrix.

For a block of BLOCK_N rows of z, a program streams the codebook in (BLOCK_D x BLOCK_K) tiles, forms
||c||^2 - 2 z.c on the tensor cores (fp32 accumulation) and keeps the best (score, index) per row in
registers. When there are few row blocks (few rows, many codes), the codebook is split across
programs and the per-split winners are reduced afterwards.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vqfast.kernels._common import check_launchable, interpreting, multiprocessor_count, next_power_of_2

# Largest D kept whole in registers for a row block; larger D loops over BLOCK_D slices.
_MAX_SINGLE_D = {torch.float32: 128, torch.float16: 256, torch.bfloat16: 256}
_LOOP_BLOCK_D = 64
# Split granularity along K: a multiple of every BLOCK_K the autotuner may pick.
_SPLIT_ALIGN = 256


@triton.jit
def _nearest_code_kernel(
    z_ptr, c_ptr, c_sqnorm_ptr,
    score_ptr, index_ptr, dist_ptr,
    N, K, D, codes_per_split,
    stride_zn, stride_zd, stride_ck, stride_cd, stride_sn,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    SINGLE_D: tl.constexpr, INPUT_PRECISION: tl.constexpr, WRITE_DISTANCE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    # 64-bit row offsets: N * D may exceed 2**31.
    z_rows = z_ptr + offs_n.to(tl.int64)[:, None] * stride_zn
    offs_d = tl.arange(0, BLOCK_D)

    k_begin = pid_s * codes_per_split
    k_end = tl.minimum(k_begin + codes_per_split, K)

    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_index = tl.zeros([BLOCK_N], tl.int32) + k_begin

    if SINGLE_D:
        z_block = tl.load(z_rows + offs_d[None, :] * stride_zd,
                          mask=mask_n[:, None] & (offs_d[None, :] < D), other=0.0)
        z_f32 = z_block.to(tl.float32)
        z_sqnorm = tl.sum(z_f32 * z_f32, axis=1)
    else:
        z_sqnorm = tl.zeros([BLOCK_N], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            zt = tl.load(z_rows + dd[None, :] * stride_zd, mask=mask_n[:, None] & (dd[None, :] < D),
                         other=0.0).to(tl.float32)
            z_sqnorm += tl.sum(zt * zt, axis=1)

    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        c_cols = c_ptr + offs_k.to(tl.int64)[None, :] * stride_ck
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        if SINGLE_D:
            c_tile = tl.load(c_cols + offs_d[:, None] * stride_cd,
                             mask=mask_k[None, :] & (offs_d[:, None] < D), other=0.0)
            acc = tl.dot(z_block, c_tile, acc, input_precision=INPUT_PRECISION)
        else:
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + offs_d
                zt = tl.load(z_rows + dd[None, :] * stride_zd,
                             mask=mask_n[:, None] & (dd[None, :] < D), other=0.0)
                ct = tl.load(c_cols + dd[:, None] * stride_cd,
                             mask=mask_k[None, :] & (dd[:, None] < D), other=0.0)
                acc = tl.dot(zt, ct, acc, input_precision=INPUT_PRECISION)
        # Padding codes get +inf so they never win.
        c_sqnorm = tl.load(c_sqnorm_ptr + offs_k, mask=mask_k, other=float("inf"))
        score = c_sqnorm[None, :] - 2.0 * acc
        # NaN never wins: a row whose scores are all NaN keeps a valid index.
        score = tl.where(score == score, score, float("inf"))
        tile_best = tl.min(score, axis=1)
        tile_index = tl.argmin(score, axis=1, tie_break_left=True).to(tl.int32) + k0
        # Strict '<' across tiles keeps the lowest index on ties, since tiles go in increasing order.
        improved = tile_best < best
        best_index = tl.where(improved, tile_index, best_index)
        best = tl.where(improved, tile_best, best)

    if WRITE_DISTANCE:
        dist = z_sqnorm + best
        # Rounding can push a near-zero distance below 0; NaN (from NaN in z) is kept.
        dist = tl.where(dist < 0.0, 0.0, dist)
        tl.store(dist_ptr + offs_n, dist, mask=mask_n)
        tl.store(index_ptr + offs_n, best_index.to(tl.int64), mask=mask_n)
    else:
        out = offs_n.to(tl.int64) * stride_sn + pid_s
        tl.store(score_ptr + out, best, mask=mask_n)
        tl.store(index_ptr + out, best_index.to(tl.int64), mask=mask_n)
        if pid_s == 0:
            tl.store(dist_ptr + offs_n, z_sqnorm, mask=mask_n)


def _autotune_configs() -> list[triton.Config]:
    configs = []
    for block_n in (64, 128):
        for block_k in (64, 128):
            for warps in (4, 8):
                for stages in (2, 3, 4):
                    configs.append(triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k},
                                                 num_warps=warps, num_stages=stages))
    return configs


# The autotuned variant is keyed on the problem size; the interpreter cannot benchmark, so it uses
# the plain kernel with a fixed configuration.
_nearest_code_autotuned = triton.autotune(
    configs=_autotune_configs(),
    key=["N", "K", "D", "SINGLE_D", "INPUT_PRECISION", "WRITE_DISTANCE"],
)(_nearest_code_kernel)

_INTERPRETER_CONFIG = {"BLOCK_N": 16, "BLOCK_K": 32}


def _input_precision(dtype: torch.dtype, precision: str) -> str:
    if dtype != torch.float32:
        return "ieee"  # 16-bit operands: products are exact in the fp32 accumulator
    if precision in ("highest", "ieee"):
        return "ieee"
    if precision in ("high", "medium", "tf32"):
        return "tf32"
    raise ValueError(f"precision must be 'highest', 'high', 'medium' or 'tf32', got {precision!r}")


def _choose_splits(n_rows: int, n_codes: int, block_n: int, device: torch.device) -> int:
    row_blocks = triton.cdiv(n_rows, block_n)
    target_programs = 2 * multiprocessor_count(device)
    if row_blocks >= target_programs:
        return 1
    max_splits = triton.cdiv(n_codes, _SPLIT_ALIGN)
    return max(1, min(max_splits, triton.cdiv(target_programs, row_blocks)))


def nearest_code(
    z: torch.Tensor,
    codebook: torch.Tensor,
    precision: str | None = None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codebook row (squared L2) for each row of ``z`` (N, D): ``(indices int64, distances fp32)``.

    Equivalent to ``d = torch.cdist(z, codebook) ** 2; i = d.argmin(1); (i, d[arange(N), i])`` without
    building ``d``. ``precision`` (fp32 inputs only): "highest" = full fp32 products, "high"/"medium"
    = tf32; default ``torch.get_float32_matmul_precision()``. ``num_splits`` forces the number of
    codebook splits (default: chosen from the problem size and the GPU).
    """
    if z.dim() != 2 or codebook.dim() != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(f"expected z (N, D) and codebook (K, D), got {tuple(z.shape)} and {tuple(codebook.shape)}")
    if z.dtype != codebook.dtype or z.dtype not in _MAX_SINGLE_D:
        raise TypeError(f"z and codebook must share a dtype in float32/float16/bfloat16, got {z.dtype}, {codebook.dtype}")
    check_launchable(z, codebook)
    n, d = z.shape
    k = codebook.shape[0]
    device = z.device
    if precision is None:
        precision = torch.get_float32_matmul_precision()
    input_precision = _input_precision(z.dtype, precision)
    indices = torch.empty(n, dtype=torch.int64, device=device)
    distances = torch.empty(n, dtype=torch.float32, device=device)
    if n == 0:
        return indices, distances

    c_sqnorm = codebook.float().pow(2).sum(1)
    single_d = d <= _MAX_SINGLE_D[z.dtype]
    block_d = max(16, next_power_of_2(d)) if single_d else _LOOP_BLOCK_D
    interp = interpreting()
    nominal_block_n = _INTERPRETER_CONFIG["BLOCK_N"] if interp else 128
    splits = num_splits if num_splits is not None else _choose_splits(n, k, nominal_block_n, device)
    splits = max(1, min(int(splits), k))
    codes_per_split = triton.cdiv(triton.cdiv(k, splits), _SPLIT_ALIGN) * _SPLIT_ALIGN
    if interp:
        codes_per_split = triton.cdiv(k, splits)
    splits = triton.cdiv(k, codes_per_split)
    write_distance = splits == 1

    if write_distance:
        scores = distances  # unused placeholder
        part_index = indices
        stride_sn = 0
    else:
        scores = torch.empty((n, splits), dtype=torch.float32, device=device)
        part_index = torch.empty((n, splits), dtype=torch.int64, device=device)
        stride_sn = splits

    args = (
        z, codebook, c_sqnorm, scores, part_index, distances,
        n, k, d, codes_per_split,
        z.stride(0), z.stride(1), codebook.stride(0), codebook.stride(1), stride_sn,
    )
    meta = dict(BLOCK_D=block_d, SINGLE_D=single_d, INPUT_PRECISION=input_precision,
                WRITE_DISTANCE=write_distance)
    if interp:
        grid = (triton.cdiv(n, _INTERPRETER_CONFIG["BLOCK_N"]), splits)
        _nearest_code_kernel[grid](*args, **meta, **_INTERPRETER_CONFIG)
    else:
        grid = lambda cfg: (triton.cdiv(n, cfg["BLOCK_N"]), splits)  # noqa: E731
        _nearest_code_autotuned[grid](*args, **meta)

    if not write_distance:
        # Splits are in increasing code order and argmin keeps the first minimum: ties stay lowest-index.
        winner = scores.argmin(1, keepdim=True)
        indices = part_index.gather(1, winner).squeeze(1)
        dist = distances + scores.gather(1, winner).squeeze(1)
        distances = torch.where(dist < 0, torch.zeros_like(dist), dist)
    return indices, distances
