"""Entropies of soft code assignments, streamed over the codebook (never an N x K matrix).

For rows z (N, D) and codes c (K, D), the soft assignment is p = softmax(l) with logits
l_ij = -scale * ||z_i - c_j||^2. The row term ||z_i||^2 is constant along a row and cancels in the
softmax, so the kernels use l_ij = scale * (2 z_i.c_j - ||c_j||^2).

Forward (two passes over the codebook, like flash-attention's online softmax):
    pass 1, one program per row block: running max m, sum-exp s and t = sum_j e_ij (l_ij - m) give
            the row's max m_i, log s_i and entropy H_i = log s - t / s (no lse - E[l] cancellation).
    pass 2, one program per (code block, row split): column sums P_j = sum_i p_ij.
Every pass takes log p_ij = (l_ij - m_i) - log s_i, never l_ij - lse_i with lse = m + log s: far from the
origin the logits are large (their fp32 spacing 1 near 1e7) while their differences are small, and
lse rounded to that spacing would lose log s and shift every log p of the row.
Backward, for a loss g_S * mean_i H_i + (terms in the column average a = P / N), the caller passes
w_j = dLoss/da_j / N and coef = g_S / N; then with r_i = sum_j p_ij w_j:
    dLoss/dl_ij = G_ij = p_ij * (w_j - r_i - coef * (log p_ij + H_i))
    dz_i = 2 scale sum_j G_ij c_j                     = 2 scale (U_i - r_i V_i), one row pass with
           U_i = sum_j p_ij (w_j - coef (log p_ij + H_i)) c_j and V_i = sum_j p_ij c_j
    dc_j = 2 scale (sum_i G_ij z_i - c_j sum_i G_ij)  one code-parallel pass over row tiles
Each pass recomputes its logit tiles from z and c instead of storing them.

Past fp32's range (vqfast.reference computes the same): a code whose ||c||^2 overflows has logit -inf
and p = 0, so it adds exactly 0 to the entropies and gets no gradient (0 log 0 = 0); a row with every
logit -inf has p = 0 everywhere (entropy 0, max -inf, nothing in the column sums, no gradient); a logit
past +inf saturates at the largest float, so such a row's p is even over its saturated codes and its
gradient is 0. NaN inputs give NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vqfast.kernels._common import (
    cdiv, check_grid_yz, check_rows_and_codes, code_sqnorms, deterministic, int32_safe_columns, interpreting,
    multiprocessor_count, next_power_of_2, scratch_trial, tuned_config, resolves_negative_views,
)
from vqfast.kernels._launch import launch_kernel

__all__ = ["soft_entropy_forward", "soft_entropy_backward"]

FLT_MAX = tl.constexpr(3.4028234663852886e38)  # the largest fp32 value


@triton.jit
def _logit_tile(
    z_ptr, c_ptr, c_sqnorm_ptr, offs_n, mask_n, offs_k, mask_k, D,
    stride_zn, stride_zd, stride_ck, stride_cd, scale,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """(BLOCK_N, BLOCK_K) logits scale * (2 z.c - ||c||^2); codes past K get -inf."""
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    z_rows = z_ptr + offs_n.to(tl.int64)[:, None] * stride_zn
    c_cols = c_ptr + offs_k.to(tl.int64)[None, :] * stride_ck
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        zt = tl.load(z_rows + dd[None, :] * stride_zd, mask=mask_n[:, None] & (dd[None, :] < D), other=0.0)
        ct = tl.load(c_cols + dd[:, None] * stride_cd, mask=mask_k[None, :] & (dd[:, None] < D), other=0.0)
        acc = tl.dot(zt, ct, acc, input_precision=INPUT_PRECISION)
    c_sqnorm = tl.load(c_sqnorm_ptr + offs_k, mask=mask_k, other=0.0)
    logits = scale * (2.0 * acc - c_sqnorm[None, :])
    # Past fp32's range a logit saturates at the largest float instead of leaving inf - inf = NaN to
    # the softmax (a NaN logit stays NaN: the comparison is false for it).
    logits = tl.where(logits > FLT_MAX, FLT_MAX, logits)
    # A code whose ||c||^2 overflows is infinitely far: probability 0, also where 2 z.c overflowed with
    # it (inf - inf). A NaN norm (a NaN code) is left to propagate.
    far = c_sqnorm == float("inf")
    return tl.where((mask_k & ~far)[None, :], logits, float("-inf"))


@triton.jit
def _log_probs(logits, row_max, log_sum, valid):
    """``(log p, p)`` of a logit tile given each row's largest logit and log-sum-exp past it (``lse =
    row_max + log_sum``); both 0 where not ``valid`` and where log p is -inf (0 log 0 = 0, with no
    0 * inf in the products that use them): a -inf logit, also in a row of them (whose max is -inf
    too: -inf - -inf would be NaN), or a difference past fp32's range. NaN logits stay NaN."""
    log_p = (logits - row_max[:, None]) - log_sum[:, None]
    live = valid & (logits != float("-inf")) & (log_p != float("-inf"))
    log_p = tl.where(live, log_p, 0.0)
    return log_p, tl.where(live, tl.exp(log_p), 0.0)


@triton.jit
def _row_stats_kernel(
    z_ptr, c_ptr, c_sqnorm_ptr, max_ptr, log_sum_ptr, ent_ptr, N, K, D,
    stride_zn, stride_zd, stride_ck, stride_cd, scale,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    t = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        logits = _logit_tile(z_ptr, c_ptr, c_sqnorm_ptr, offs_n, mask_n, offs_k, mask_k, D,
                             stride_zn, stride_zd, stride_ck, stride_cd, scale,
                             BLOCK_N, BLOCK_K, BLOCK_D, INPUT_PRECISION)
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        # While every logit of a row so far is -inf, any finite reference does (every e is 0): with
        # m_new itself, -inf - -inf would be NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_ref)  # 0 while m is -inf (s = t = 0 then)
        # Re-reference t from m to m_ref. Where alpha underflows to 0 the old terms vanish. The shift
        # is floored where exp has underflowed anyway (below -104) so that the product left out is
        # not 0 * -inf (s = 0 while m is -inf), which the interpreter reports as invalid.
        t = tl.where(alpha > 0.0, alpha * (t + s * tl.maximum(m - m_ref, -200.0)), 0.0)
        centred = logits - m_ref[:, None]
        e = tl.exp(centred)
        # 0 log 0 = 0: a code whose e is 0 (padding, a -inf logit, an underflow) adds nothing, not
        # 0 * -inf (floored as above).
        t += tl.sum(tl.where(e > 0.0, e * tl.maximum(centred, -200.0), 0.0), axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
    log_s = tl.log(s)
    tl.store(max_ptr + offs_n, m, mask=mask_n)
    tl.store(log_sum_ptr + offs_n, log_s, mask=mask_n)
    # A row with every logit -inf (every code infinitely far) has no probability anywhere: entropy 0,
    # max -inf. (A NaN s is not 0 and stays NaN.)
    tl.store(ent_ptr + offs_n, tl.where(s == 0.0, 0.0, log_s - t / s), mask=mask_n)


@triton.jit
def _col_sum_kernel(
    z_ptr, c_ptr, c_sqnorm_ptr, max_ptr, log_sum_ptr, out_ptr, N, K, D, rows_per_split,
    stride_zn, stride_zd, stride_ck, stride_cd, scale,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    n_begin = pid_s * rows_per_split
    n_end = tl.minimum(n_begin + rows_per_split, N)
    acc = tl.zeros([BLOCK_K], tl.float32)
    for n0 in range(n_begin, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_end
        logits = _logit_tile(z_ptr, c_ptr, c_sqnorm_ptr, offs_n, mask_n, offs_k, mask_k, D,
                             stride_zn, stride_zd, stride_ck, stride_cd, scale,
                             BLOCK_N, BLOCK_K, BLOCK_D, INPUT_PRECISION)
        row_max = tl.load(max_ptr + offs_n, mask=mask_n, other=0.0)
        log_sum = tl.load(log_sum_ptr + offs_n, mask=mask_n, other=0.0)
        _, p = _log_probs(logits, row_max, log_sum, mask_n[:, None] & mask_k[None, :])
        acc += tl.sum(p, axis=0)
    # One row of partial sums per split, summed by the launcher: deterministic, no atomics.
    tl.store(out_ptr + pid_s.to(tl.int64) * K + offs_k, acc, mask=mask_k)


@triton.jit
def _grad_rows_kernel(
    z_ptr, c_ptr, c_sqnorm_ptr, max_ptr, log_sum_ptr, ent_ptr, w_ptr, coef_ptr, r_ptr, dz_ptr, N, K, D,
    stride_zn, stride_zd, stride_ck, stride_cd, scale,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ACC_PRECISION: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    # This program writes columns [d_out, d_out + BLOCK_D) of dz; the logits still use all of D.
    offs_do = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_do = offs_do < D
    row_max = tl.load(max_ptr + offs_n, mask=mask_n, other=0.0)
    log_sum = tl.load(log_sum_ptr + offs_n, mask=mask_n, other=0.0)
    ent = tl.load(ent_ptr + offs_n, mask=mask_n, other=0.0)
    # A row whose logits saturated (its largest is the largest float) has no gradient: it went through
    # a clamp.
    mask_g = mask_n & (row_max != FLT_MAX)
    coef = tl.load(coef_ptr)
    u = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    v = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    r = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        logits = _logit_tile(z_ptr, c_ptr, c_sqnorm_ptr, offs_n, mask_n, offs_k, mask_k, D,
                             stride_zn, stride_zd, stride_ck, stride_cd, scale,
                             BLOCK_N, BLOCK_K, BLOCK_D, INPUT_PRECISION)
        log_p, p = _log_probs(logits, row_max, log_sum, mask_g[:, None] & mask_k[None, :])
        w = tl.load(w_ptr + offs_k, mask=mask_k, other=0.0)
        r += tl.sum(p * w[None, :], axis=1)
        a = p * (w[None, :] - coef * (log_p + ent[:, None]))
        # An infinitely far code (p = 0) is read as 0: an inf element would make 0 * inf = NaN in the product.
        near = mask_k & (tl.load(c_sqnorm_ptr + offs_k, mask=mask_k, other=0.0) != float("inf"))
        c_out = tl.load(c_ptr + offs_k.to(tl.int64)[:, None] * stride_ck + offs_do[None, :] * stride_cd,
                        mask=near[:, None] & mask_do[None, :], other=0.0).to(tl.float32)
        u = tl.dot(a, c_out, u, input_precision=ACC_PRECISION)
        v = tl.dot(p, c_out, v, input_precision=ACC_PRECISION)
    dz = (2.0 * scale) * (u - r[:, None] * v)
    tl.store(dz_ptr + offs_n.to(tl.int64)[:, None] * D + offs_do[None, :], dz,
             mask=mask_n[:, None] & mask_do[None, :])
    if tl.program_id(1) == 0:
        tl.store(r_ptr + offs_n, r, mask=mask_n)


@triton.jit
def _grad_codes_kernel(
    z_ptr, c_ptr, c_sqnorm_ptr, max_ptr, log_sum_ptr, ent_ptr, w_ptr, coef_ptr, r_ptr, dc_ptr, N, K, D,
    rows_per_split,
    stride_dc_split, stride_zn, stride_zd, stride_ck, stride_cd, scale,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ACC_PRECISION: tl.constexpr,
):
    pid_k = tl.program_id(0)
    offs_do = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_do = offs_do < D
    pid_s = tl.program_id(2)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    n_begin = pid_s * rows_per_split
    n_end = tl.minimum(n_begin + rows_per_split, N)
    coef = tl.load(coef_ptr)
    w = tl.load(w_ptr + offs_k, mask=mask_k, other=0.0)
    acc = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    g_col = tl.zeros([BLOCK_K], tl.float32)
    for n0 in range(n_begin, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_end
        logits = _logit_tile(z_ptr, c_ptr, c_sqnorm_ptr, offs_n, mask_n, offs_k, mask_k, D,
                             stride_zn, stride_zd, stride_ck, stride_cd, scale,
                             BLOCK_N, BLOCK_K, BLOCK_D, INPUT_PRECISION)
        row_max = tl.load(max_ptr + offs_n, mask=mask_n, other=0.0)
        log_sum = tl.load(log_sum_ptr + offs_n, mask=mask_n, other=0.0)
        ent = tl.load(ent_ptr + offs_n, mask=mask_n, other=0.0)
        r = tl.load(r_ptr + offs_n, mask=mask_n, other=0.0)
        mask_g = mask_n & (row_max != FLT_MAX)  # (no gradient for a saturated row, as in _grad_rows_kernel)
        log_p, p = _log_probs(logits, row_max, log_sum, mask_g[:, None] & mask_k[None, :])
        g = p * (w[None, :] - r[:, None] - coef * (log_p + ent[:, None]))
        g_col += tl.sum(g, axis=0)
        z_out = tl.load(z_ptr + offs_n.to(tl.int64)[:, None] * stride_zn + offs_do[None, :] * stride_zd,
                        mask=mask_n[:, None] & mask_do[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(tl.trans(g), z_out, acc, input_precision=ACC_PRECISION)
    # An infinitely far code gets no gradient (g_col = 0), not 0 * inf = NaN from an inf element.
    near = mask_k & (tl.load(c_sqnorm_ptr + offs_k, mask=mask_k, other=0.0) != float("inf"))
    c_out = tl.load(c_ptr + offs_k.to(tl.int64)[:, None] * stride_ck + offs_do[None, :] * stride_cd,
                    mask=near[:, None] & mask_do[None, :], other=0.0).to(tl.float32)
    dc = (2.0 * scale) * (acc - c_out * g_col[:, None])
    # Row splits of the same code block add into one fp32 output (stride_dc_split 0), or each into its
    # own zeroed slice, summed afterwards in split order (deterministic mode).
    tl.atomic_add(dc_ptr + pid_s.to(tl.int64) * stride_dc_split + offs_k.to(tl.int64)[:, None] * D + offs_do[None, :],
                  dc, mask=mask_k[:, None] & mask_do[None, :], sem="relaxed")




# Tile candidates (BLOCK_N, BLOCK_K, num_warps), the first the fixed choice (VQFAST_AUTOTUNE=0). Each
# pass is timed on the first call of a problem size (``tuned_config``). Chosen from ptxas's register
# counts for sm_90 (benchmarks/compile_check.py): the backward kernels hold three tiles at once, and
# at 64 x 64 with 4 warps spill 1.4-3.3 KB per thread with fp32 (CUDA-core) gradient products and use
# 244-255 registers (some spilling) with tf32 ones; 8 warps (tf32, 64 x 64: at most 208 registers)
# or 32 x 32 tiles (fp32: at most 32 spilled bytes) fix that. With fp32 gradient products 32 x 64 and
# 64 x 32 tiles spill 0.4-0.8 KB, so that list has two candidates (16 x 64 spills 16 bytes with fp32
# inputs, 260 with 16-bit ones); the other candidates spill at most 12 bytes (Triton 3.6's figures;
# with 3.8, 128 x 64 with tf32 products on fp32 inputs spills 48).
_FORWARD_TILES = ((64, 64, 4), (128, 64, 8), (64, 128, 8), (32, 64, 4))
_BACKWARD_TILES = {"tf32": ((64, 64, 8), (32, 64, 4), (64, 32, 4), (128, 64, 8)),
                   "ieee": ((32, 32, 4), (16, 64, 4))}


def _configs(d: int, backward_precision: str | None = None) -> list[tuple[int, int, int, int]]:
    """Candidate (BLOCK_N, BLOCK_K, BLOCK_D, num_warps) of the forward passes, or of the backward
    passes when ``backward_precision`` (their gradient products' precision) is given; one under the
    interpreter."""
    block_d = min(64, max(16, next_power_of_2(d)))
    if interpreting():
        return [(16, 32, block_d, 4)]
    tiles = _FORWARD_TILES if backward_precision is None else _BACKWARD_TILES[backward_precision]
    return [(bn, bk, block_d, warps) for bn, bk, warps in tiles]


def _meta(cfg: tuple[int, int, int, int], **precisions: str) -> dict:
    """Launch arguments of a (BLOCK_N, BLOCK_K, BLOCK_D, num_warps) candidate, with the pass's precisions."""
    block_n, block_k, block_d, warps = cfg
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=warps, **precisions)


def _precisions(dtype: torch.dtype, precision: str) -> tuple[str, str]:
    if precision not in ("ieee", "tf32"):
        raise ValueError(f"precision must be 'ieee' or 'tf32', got {precision!r}")
    # 16-bit logit products are exact in the fp32 accumulator either way, and "tf32" is Triton's
    # default (tensor-core) path for them; the fp32 gradient products follow the requested precision.
    return ("tf32" if dtype != torch.float32 else precision), precision


def _splits(rows: int, block_n: int, programs: int, device: torch.device) -> tuple[int, int]:
    """``(splits, rows_per_split)``: row splits so that code-parallel passes still fill the GPU when K
    is small, each a whole number of ``block_n`` row blocks (so the last split may hold fewer)."""
    target = 2 * multiprocessor_count(device)
    splits = max(1, min(cdiv(rows, block_n), cdiv(target, max(programs, 1))))
    rows_per_split = cdiv(cdiv(rows, splits), block_n) * block_n
    return cdiv(rows, rows_per_split), rows_per_split


@resolves_negative_views
def soft_entropy_forward(
    z: torch.Tensor, codebook: torch.Tensor, scale: float, precision: str = "ieee"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row ``(row_max, log_sum, entropy)`` (N,) and column sums (K,) of
    ``p = softmax(-scale * ||z - c||^2)``.

    Plain PyTorch (up to the per-row constant ``-scale * ||z||^2`` in ``row_max``)::

        logits = scale * (2 * z @ c.T - (c * c).sum(1))
        row_max = logits.amax(1); log_sum = (logits - row_max[:, None]).logsumexp(1)
        log_p = (logits - row_max[:, None]) - log_sum[:, None]; p = log_p.exp()
        entropy = -(p * log_p).sum(1); colsum = p.sum(0)

    (``row_max + log_sum`` is the log-sum-exp, kept in two parts: rounded to one float it loses log_sum
    where the logits are large.) All outputs are float32.
    """
    check_rows_and_codes(z, codebook)
    z, codebook = int32_safe_columns(z), int32_safe_columns(codebook)
    n, d = z.shape
    k = codebook.shape[0]
    device = z.device
    # Three tensors, not views of one: the custom op may not return aliased outputs.
    row_max, log_sum, ent = (torch.empty(n, dtype=torch.float32, device=device) for _ in range(3))
    if n == 0:
        return row_max, log_sum, ent, torch.zeros(k, dtype=torch.float32, device=device)
    input_precision, _ = _precisions(z.dtype, precision)
    configs = _configs(d)
    c_sqnorm = code_sqnorms(codebook)
    strides = (z.stride(0), z.stride(1), codebook.stride(0), codebook.stride(1))
    tune = (next_power_of_2(n), k, d, z.dtype, input_precision, device)

    def meta(cfg: tuple[int, int, int, int]) -> dict:
        return _meta(cfg, INPUT_PRECISION=input_precision)

    def row_stats(cfg: tuple[int, int, int, int]) -> None:
        # Every launch writes all of the row statistics, so timing runs may write the real outputs.
        launch_kernel(_row_stats_kernel, (cdiv(n, cfg[0]),), z, codebook, c_sqnorm, row_max, log_sum, ent,
                      n, k, d, *strides, float(scale), **meta(cfg))

    def col_sums(cfg: tuple[int, int, int, int]) -> torch.Tensor:
        code_blocks = cdiv(k, cfg[1])
        splits, rows_per_split = _splits(n, cfg[0], code_blocks, device)
        partial = torch.empty((splits, k), dtype=torch.float32, device=device)
        launch_kernel(_col_sum_kernel, (code_blocks, splits), z, codebook, c_sqnorm, row_max, log_sum, partial,
                      n, k, d, rows_per_split, *strides, float(scale), **meta(cfg))
        return partial

    row_stats(tuned_config(("soft_entropy_rows", *tune), configs, row_stats))
    partial = col_sums(tuned_config(("soft_entropy_columns", *tune), configs, col_sums))
    return row_max, log_sum, ent, partial.sum(0)


def _check_loss_terms(z: torch.Tensor, codebook: torch.Tensor, row_max: torch.Tensor, log_sum: torch.Tensor,
                      ent: torch.Tensor, w: torch.Tensor, coef: torch.Tensor) -> None:
    """The backward's per-row statistics (N,) float32 and weights ``w`` (K,) and ``coef`` (one value), all
    on z's device: the kernels read N and K entries from them, so a shorter tensor would be read past its
    end and a longer one silently cut."""
    n, k = z.shape[0], codebook.shape[0]
    for name, t in (("row_max", row_max), ("log_sum", log_sum), ("ent", ent)):
        if t.shape != (n,) or t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32 of shape ({n},) as soft_entropy_forward returns it, got "
                             f"{t.dtype} of shape {tuple(t.shape)}")
    if w.shape != (k,) or not w.dtype.is_floating_point:
        raise ValueError(f"w must be a floating-point tensor of shape ({k},) (one weight per code), got "
                         f"{w.dtype} of shape {tuple(w.shape)}")
    if coef.numel() != 1 or not coef.dtype.is_floating_point:
        raise ValueError(f"coef must be a floating-point tensor holding one value, got {coef.dtype} of shape "
                         f"{tuple(coef.shape)}")
    for name, t in (("row_max", row_max), ("log_sum", log_sum), ("ent", ent), ("w", w), ("coef", coef)):
        if t.device != z.device:
            raise ValueError(f"{name} must be on z's device {z.device}, got {t.device}")


@resolves_negative_views
def soft_entropy_backward(
    z: torch.Tensor, codebook: torch.Tensor, row_max: torch.Tensor, log_sum: torch.Tensor, ent: torch.Tensor,
    w: torch.Tensor, coef: torch.Tensor, scale: float, precision: str = "ieee", codebook_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients ``(dz (N, D), dcodebook (K, D))``, float32, of ``coef * sum_i H_i + sum_j w_j P_j``.

    ``row_max``, ``log_sum`` and ``ent`` come from :func:`soft_entropy_forward`; ``w`` (K,) and ``coef`` (a 1-element
    tensor, so no host sync is needed to read a gradient) define the loss as above, where ``H_i`` are
    the row entropies and ``P_j`` the column sums of p. Plain PyTorch: autograd through the forward's
    equivalent code with ``loss = coef * entropy.sum() + (w * colsum).sum()``. ``codebook_grad=False``
    skips the codebook pass (dcodebook is then an empty (0, D) tensor). That pass splits the rows across
    programs that add into dcodebook atomically; under ``torch.use_deterministic_algorithms(True)`` each
    split adds into its own slice, and the slices are summed in order.
    """
    check_rows_and_codes(z, codebook)
    _check_loss_terms(z, codebook, row_max, log_sum, ent, w, coef)
    z, codebook = int32_safe_columns(z), int32_safe_columns(codebook)
    n, d = z.shape
    k = codebook.shape[0]
    device = z.device
    dz = torch.zeros((n, d), dtype=torch.float32, device=device)
    dc = torch.zeros((k if codebook_grad else 0, d), dtype=torch.float32, device=device)
    if n == 0:
        return dz, dc
    input_precision, acc_precision = _precisions(z.dtype, precision)
    configs = _configs(d, acc_precision)
    c_sqnorm = code_sqnorms(codebook)
    w = w.to(torch.float32).contiguous()
    coef = coef.to(torch.float32).reshape(1).contiguous()
    row_max, log_sum, ent = row_max.contiguous(), log_sum.contiguous(), ent.contiguous()
    r = torch.empty(n, dtype=torch.float32, device=device)
    strides = (z.stride(0), z.stride(1), codebook.stride(0), codebook.stride(1))
    d_blocks = cdiv(d, configs[0][2])  # (BLOCK_D is the same in every candidate)
    check_grid_yz(d_blocks, "the soft-entropy backward")
    tune = (next_power_of_2(n), k, d, z.dtype, input_precision, acc_precision, device)

    def meta(cfg: tuple[int, int, int, int]) -> dict:
        return _meta(cfg, INPUT_PRECISION=input_precision, ACC_PRECISION=acc_precision)

    def grad_rows(cfg: tuple[int, int, int, int]) -> None:
        # Stores every element of dz and r: timing runs may write the real outputs.
        launch_kernel(_grad_rows_kernel, (cdiv(n, cfg[0]), d_blocks),
                      z, codebook, c_sqnorm, row_max, log_sum, ent, w, coef, r, dz, n, k, d, *strides, float(scale),
                      **meta(cfg))

    grad_rows(tuned_config(("soft_entropy_grad_rows", *tune), configs, grad_rows))
    if not codebook_grad:
        return dz, dc

    def grad_codes(cfg: tuple[int, int, int, int], into: torch.Tensor = dc) -> torch.Tensor:
        code_blocks = cdiv(k, cfg[1])
        splits, rows_per_split = _splits(n, cfg[0], code_blocks * d_blocks, device)
        split_stride = 0
        if deterministic() and splits > 1:
            # Row splits add into one output atomically, in no fixed order: here each adds into its own
            # zeroed slice (a single exact addition), and the slices are summed in order. At most ~2
            # programs per SM of BLOCK_K x BLOCK_D each, so a few MB.
            into = torch.zeros((splits, k, d), dtype=torch.float32, device=device)
            split_stride = k * d
        launch_kernel(_grad_codes_kernel, (code_blocks, d_blocks, splits),
                      z, codebook, c_sqnorm, row_max, log_sum, ent, w, coef, r, into, n, k, d, rows_per_split,
                      split_stride, *strides, float(scale), **meta(cfg))
        return into.sum(0) if split_stride else into

    # Atomic sums: timing runs add into a scratch output.
    dc = grad_codes(tuned_config(("soft_entropy_grad_codes", *tune), configs, scratch_trial(grad_codes, dc)))
    return dz, dc
