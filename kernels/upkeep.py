"""Codebook upkeep after a training step: running usage statistics and dead-code restarts.

Two launches replace the fifty-odd elementwise PyTorch ops this takes in plain PyTorch
(:func:`vqfast.reference.update_code_usage`), which on small problems cost more host time than the
search itself. Each program owns a contiguous block of codes:

1. ``_update_usage_kernel`` updates the running usage and restart credit of its codes, and flags the
   dead ones (counting them per block);
2. ``_restart_codes_kernel`` numbers the dead codes in index order (the dead codes of the blocks before
   its own, then a running count inside it) and re-seeds the first ``num_seeds`` of them from the seed
   rows, the n-th dead code from row n.

The numbering needs every block's count, hence two launches rather than one.
"""

from __future__ import annotations

import functools
import math
import struct

import torch
import triton
import triton.language as tl

from vqfast.kernels._common import (
    PlanCache, cdiv, check_launchable, check_matrices, interpreting, next_power_of_2,
)
from vqfast.kernels._launch import PreparedLaunch

# Largest finite float32: |x| <= it is False for NaN and +-inf alike.
_FLT_MAX = tl.constexpr(3.4028234663852886e38)


def _as_float32(x: float) -> float:
    """x rounded to the nearest float32, as a Python float."""
    return struct.unpack("f", struct.pack("f", x))[0]


# Blocks of codes are sized so that the second kernel sums at most this many per-block counts.
_MAX_BLOCKS = 256


@triton.jit
def _usage_correction(steps, log2_decay_hi, log2_decay_lo):
    # 1 - decay ** steps in float64. Scalar arguments are float32, so log2(decay) comes in two parts:
    # float32 alone would put a relative error of 1e-8 on it, which 1 - decay ** steps keeps.
    steps = steps.to(tl.float64)
    return 1.0 - tl.exp2(steps * log2_decay_hi + steps * log2_decay_lo)


@triton.jit
def _update_usage_kernel(counts_ptr, usage_ptr, grace_ptr, batch_counts_ptr, steps_ptr, dead_ptr,
                         dead_per_block_ptr, K, usage_decay, usage_rate, log2_decay_hi, log2_decay_lo, dead_threshold,
                         FIND_DEAD: tl.constexpr, CODES_PER_PROGRAM: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    # Slot K holds the number of rows counted (finite rows only). A step that counted none (every row
    # masked out, or NaN) leaves the running statistics as they are.
    counted = tl.load(counts_ptr + K)
    total = tl.maximum(counted.to(tl.float32), 1.0)
    usage_decay = tl.where(counted > 0, usage_decay, 1.0)
    usage_rate = tl.where(counted > 0, usage_rate, 0.0)
    steps = tl.load(steps_ptr)
    # Bias correction of the running share, as Adam's: 1 - decay ** steps, in float64: 1 minus the
    # GPU's approximate float32 exp2 loses a few digits with a decay near 1.
    correction = tl.maximum(_usage_correction(steps, log2_decay_hi, log2_decay_lo), 1e-12).to(tl.float32)
    # No code is dead before a step has counted a row (steps 0: this one counted none either); the
    # shares are >= 0, so none is below a threshold of 0.
    dead_threshold = tl.where(steps > 0, dead_threshold, 0.0)
    dead_count = tl.zeros([BLOCK], tl.int32)
    for c0 in range(0, CODES_PER_PROGRAM, BLOCK):
        offs = pid.to(tl.int64) * CODES_PER_PROGRAM + c0 + tl.arange(0, BLOCK)
        mask = offs < K
        counts = tl.load(counts_ptr + offs, mask=mask, other=0)
        usage = tl.load(usage_ptr + offs, mask=mask, other=0.0) * usage_decay
        # (div_rn: the GPU's default fp32 division may be 2 ulp off; torch's divides exactly.)
        usage = usage + usage_rate * tl.div_rn(counts.to(tl.float32), total)
        grace = tl.load(grace_ptr + offs, mask=mask, other=0.0) * usage_decay
        tl.store(usage_ptr + offs, usage, mask=mask)
        tl.store(grace_ptr + offs, grace, mask=mask)
        tl.store(batch_counts_ptr + offs, counts, mask=mask)
        if FIND_DEAD:
            # Unused in this batch too: this step's gradient of a used code would land on its new value.
            dead = mask & (tl.div_rn(usage + grace, correction) < dead_threshold) & (counts == 0)
            tl.store(dead_ptr + offs, dead.to(tl.int8), mask=mask)
            dead_count += dead.to(tl.int32)
    if FIND_DEAD:
        tl.store(dead_per_block_ptr + pid, tl.sum(dead_count, axis=0))


@triton.jit
def _restart_codes_kernel(dead_ptr, dead_per_block_ptr, seeds_ptr, weight_ptr, usage_ptr, grace_ptr, ema_count_ptr,
                          steps_ptr, K, D, num_seeds, stride_seed, stride_wk, stride_wd, log2_decay_hi, log2_decay_lo,
                          HAS_EMA: tl.constexpr, CODES_PER_PROGRAM: tl.constexpr, NUM_BLOCKS_P2: tl.constexpr,
                          BLOCK_CODES: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    blocks = tl.arange(0, NUM_BLOCKS_P2)
    before = tl.sum(tl.load(dead_per_block_ptr + blocks, mask=blocks < pid, other=0), axis=0)
    # A restarted code starts with no measured usage and the uniform share 1/K, times the bias
    # correction of this step, as its credit (see update_code_usage).
    fresh = (_usage_correction(tl.load(steps_ptr), log2_decay_hi, log2_decay_lo) / K).to(tl.float32)
    for c0 in range(0, CODES_PER_PROGRAM, BLOCK_CODES):
        offs = pid.to(tl.int64) * CODES_PER_PROGRAM + c0 + tl.arange(0, BLOCK_CODES)
        mask = offs < K
        dead = tl.load(dead_ptr + offs, mask=mask, other=0).to(tl.int32)
        order = before + tl.cumsum(dead, axis=0) - 1
        take = (dead != 0) & (order < num_seeds)
        before += tl.sum(dead, axis=0)
        if tl.sum(take.to(tl.int32), axis=0) > 0:
            seed_rows = seeds_ptr + tl.where(take, order, 0).to(tl.int64)[:, None] * stride_seed
            code_rows = weight_ptr + offs.to(tl.int64)[:, None] * stride_wk
            # A seed row holding NaN or inf leaves its code as it is (still dead, for a later step).
            bad = tl.zeros([BLOCK_CODES], tl.int32)
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + tl.arange(0, BLOCK_D)
                seed = tl.load(seed_rows + cols[None, :], mask=take[:, None] & (cols[None, :] < D), other=0.0)
                bad += tl.sum((~(tl.abs(seed) <= _FLT_MAX)).to(tl.int32), axis=1)
            ok = take & (bad == 0)
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + tl.arange(0, BLOCK_D)
                m2 = ok[:, None] & (cols[None, :] < D)
                seed = tl.load(seed_rows + cols[None, :], mask=m2, other=0.0)
                # (int64: a transposed codebook's column stride is K, and cols * K can pass 2**31.)
                tl.store(code_rows + cols.to(tl.int64)[None, :] * stride_wd, seed.to(weight_ptr.dtype.element_ty),
                         mask=m2)
            zeros = tl.zeros([BLOCK_CODES], tl.float32)
            tl.store(usage_ptr + offs, zeros, mask=ok)
            tl.store(grace_ptr + offs, zeros + fresh, mask=ok)
            if HAS_EMA:
                tl.store(ema_count_ptr + offs, zeros + 1.0, mask=ok)


@triton.jit
def _ema_update_kernel(weight_ptr, sums_ptr, ema_count_ptr, counts_ptr, total_ptr, K, D, stride_wk, stride_wd,
                       stride_sk, decay, rate, eps, BLOCK_CODES: tl.constexpr, BLOCK_D: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_CODES + tl.arange(0, BLOCK_CODES)
    mask = offs < K
    # Laplace-smoothed counts (N_k + eps) / (n + K eps) * n, before and after this step's counts.
    # No counts yet with eps = 0: every smoothed count is 0 (not 0 / 0).
    total = tl.load(total_ptr)
    # A step that counted no row (every row masked out, or NaN) leaves the averages as they are.
    counted = tl.load(counts_ptr + K)
    decay = tl.where(counted > 0, decay, 1.0)
    rate = tl.where(counted > 0, rate, 0.0)
    count = tl.load(ema_count_ptr + offs, mask=mask, other=0.0)
    # (div_rn: exact division, as torch's; the GPU's default fp32 division may be 2 ulp off.)
    smoothed = tl.where(total + K * eps > 0, tl.div_rn(count + eps, total + K * eps) * total, 0.0)
    count = count * decay + rate * tl.load(counts_ptr + offs, mask=mask, other=0).to(tl.float32)
    total = total * decay + rate * tl.load(counts_ptr + K).to(tl.float32)
    new_smoothed = tl.where(total + K * eps > 0, tl.div_rn(count + eps, total + K * eps) * total, 0.0)
    tl.store(ema_count_ptr + offs, count, mask=mask)
    # Only eps = 0 with a never-used code keeps its value; so does every code on a step that counted
    # no row (W * s / s can round by an ulp).
    # (counted > 0 as a block: Triton's interpreter cannot combine a block and a scalar bool and then
    # the result with another block.)
    keep = (new_smoothed > 0) & ((offs * 0 + counted) > 0)
    # The floor of 1e-30 is the reference's (a code unused for thousands of steps with eps = 0).
    divisor = tl.where(keep, tl.maximum(new_smoothed, 1e-30), 1.0)
    rows = offs.to(tl.int64)[:, None]
    # Codes that keep their values are neither read nor written (a step that counted no row touches
    # no code at all).
    update = mask & keep
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m2 = update[:, None] & (cols[None, :] < D)
        w_ptrs = weight_ptr + rows * stride_wk + cols.to(tl.int64)[None, :] * stride_wd  # (see _restart_codes_kernel)
        w = tl.load(w_ptrs, mask=m2, other=0.0).to(tl.float32)
        sums = tl.load(sums_ptr + rows * stride_sk + cols[None, :], mask=m2, other=0.0)
        # The running sums are the codes times their smoothed counts (they are not stored).
        running = w * smoothed[:, None] * decay + rate * sums
        tl.store(w_ptrs, tl.div_rn(running, divisor[:, None]).to(weight_ptr.dtype.element_ty), mask=m2)


def ema_update(weight: torch.Tensor, ema_count: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor,
               decay: float, eps: float) -> None:
    """The EMA codebook step of the VQ-VAE paper, in place, in one launch (plus the sum of the counts).

    ``weight`` (K, D) fp32 codes, ``ema_count`` (K,) fp32 running counts, ``sums`` (K, D) fp32 sums of
    this step's rows per code, ``counts`` (K + 1,) int64 (:func:`finite_row_counts`). The running sums
    are ``weight * smoothed(ema_count)``; both decay by ``decay`` towards this step's sums and counts,
    and the codes become their ratio. Plain PyTorch: :func:`vqfast.reference.ema_update`.
    """
    k = ema_count.shape[0]
    check_launchable(weight, ema_count, sums, counts)
    _check_vector(ema_count, "ema_count", k, torch.float32)
    _check_vector(counts, "counts", k + 1, torch.int64)
    check_matrices(("weight", weight), ("sums", sums))  # (also: one device, and at most MAX_ROWS columns)
    if weight.dtype != torch.float32 or weight.shape[0] != k or sums.shape != weight.shape \
            or sums.dtype != torch.float32 or sums.stride(1) != 1:
        raise ValueError(f"weight ({k}, D) float32 and sums of its shape (float32, unit column stride) expected, "
                         f"got {weight.dtype} {tuple(weight.shape)} and {sums.dtype} {tuple(sums.shape)}")
    # (A NaN or inf eps makes every smoothed count NaN: no code would move again.)
    if not 0.0 <= decay < 1.0 or _as_float32(decay) == 1.0 or not 0.0 <= eps <= torch.finfo(torch.float32).max:
        raise ValueError(f"decay must be in [0, 1) and below 1 in float32, and eps >= 0 and finite in float32, got {decay}, {eps}")
    total = ema_count.sum()
    _ema_launch(k, weight.shape[1], weight.stride(0), weight.stride(1), sums.stride(0), decay, eps,
                interpreting())(weight, sums, ema_count, counts, total)


@functools.lru_cache(maxsize=256)
def _ema_launch(k: int, d: int, stride_wk: int, stride_wd: int, stride_sk: int, decay: float, eps: float,
                interp: bool) -> PreparedLaunch:
    # 32 x 64 elements per program: 72 registers on sm_90 with Triton 3.6 (44 % occupancy); 64 codes
    # took 138 (19 %).
    block_codes = 16 if interp else 32
    block_d = min(64, max(16, next_power_of_2(d)))
    # The decay as float32 holds it, and 1 minus that (exact) as the rate, as the reference
    # (vqfast.reference.ema_update): the steps' weights then sum to 1.
    decay = _as_float32(decay)
    return PreparedLaunch(_ema_update_kernel, (cdiv(k, block_codes),),
                          (k, d, stride_wk, stride_wd, stride_sk, decay, 1.0 - decay, eps),
                          dict(BLOCK_CODES=block_codes, BLOCK_D=block_d, num_warps=4))


def _codes_per_program(num_codes: int) -> int:
    """Codes per program: a power of two, at least one tile, and at most _MAX_BLOCKS programs."""
    return max(32 if interpreting() else 1024, next_power_of_2(cdiv(num_codes, _MAX_BLOCKS)))


def _check_vector(t: torch.Tensor, name: str, length: int, dtype: torch.dtype) -> None:
    if t.shape != (length,) or t.dtype != dtype or not t.is_contiguous():
        got = f"{t.dtype} {tuple(t.shape)}" + ("" if t.is_contiguous() else ", not contiguous")
        raise ValueError(f"{name} must be a contiguous {dtype} tensor of shape ({length},), got {got}")


def update_code_usage(
    counts: torch.Tensor,
    usage: torch.Tensor,
    grace: torch.Tensor,
    batch_counts: torch.Tensor,
    steps: torch.Tensor,
    usage_decay: float,
    dead_threshold: float = 0.0,
    seeds: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    ema_count: torch.Tensor | None = None,
) -> None:
    """One training step's update of the usage statistics, in place, then dead-code restarts.

    ``counts`` (K + 1,) int64: this step's code counts, then their total (:func:`finite_row_counts`); a
    total of 0 (every row masked out, or NaN) leaves the statistics as they are.
    ``usage``, ``grace`` (K,) fp32, ``batch_counts`` (K,) int64 and ``steps`` (() fp32) are the
    running statistics. With ``seeds`` (S, D) fp32 and ``weight`` (K, D) fp32 or fp64, codes unused in
    this batch whose bias-corrected ``usage + grace`` share is below ``dead_threshold`` are dead; the
    n-th dead code by index (n < S) takes seed row n unless that row holds NaN or inf (it then stays
    dead), and starts over: usage 0, grace ``(1 - usage_decay ** steps) / K``, ``ema_count`` 1. What it
    computes, in plain PyTorch, is :func:`vqfast.reference.update_code_usage`.
    """
    k = usage.shape[0]
    check_launchable(counts, usage, grace, batch_counts, steps)
    _check_vector(counts, "counts", k + 1, torch.int64)
    _check_vector(grace, "grace", k, torch.float32)
    _check_vector(usage, "usage", k, torch.float32)
    _check_vector(batch_counts, "batch_counts", k, torch.int64)
    if steps.shape != () or steps.dtype != torch.float32:
        raise ValueError(f"steps must be a float32 scalar tensor, got {steps.dtype} {tuple(steps.shape)}")
    if not 0.0 <= usage_decay < 1.0 or _as_float32(usage_decay) == 1.0:
        raise ValueError(f"usage_decay must be in [0, 1) and below 1 in float32, got {usage_decay}")
    restart = seeds is not None and dead_threshold > 0 and seeds.shape[0] > 0
    # The kernels run on usage's device and would read the others' pointers there as its memory.
    named = {"counts": counts, "grace": grace, "batch_counts": batch_counts, "steps": steps}
    if restart:
        named.update(seeds=seeds, weight=weight, ema_count=ema_count)
    for name, t in named.items():
        if t is not None and t.device != usage.device:
            raise ValueError(f"{name} must be on usage's device {usage.device}, got {t.device}")
    if restart:
        # A narrower codebook could overflow a finite seed row into inf when storing it.
        if weight is None or weight.dim() != 2 or weight.shape[0] != k or seeds.dim() != 2 \
                or seeds.shape[1] != weight.shape[1] or seeds.dtype != torch.float32 \
                or weight.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"seeds (S, D) float32 and weight ({k}, D) float32 or float64 expected, got seeds "
                             f"{seeds.dtype} {tuple(seeds.shape)} and weight "
                             f"{None if weight is None else (weight.dtype, tuple(weight.shape))}")
        check_launchable(seeds, weight)
        check_matrices(("weight", weight), ("seeds", seeds))  # (also: one device, and at most MAX_ROWS columns)
        if ema_count is not None:
            _check_vector(ema_count, "ema_count", k, torch.float32)
            check_launchable(ema_count)
        seeds = seeds.contiguous()
    key = (k, usage_decay, type(usage_decay), dead_threshold, type(dead_threshold), restart, usage.device, interpreting(),
           (seeds.shape, seeds.stride(), weight.shape, weight.stride(), ema_count is not None) if restart else None)
    plan = _USAGE_PLANS.get(key)
    if plan is None:
        plan = _USAGE_PLANS.add(key, _UsagePlan(k, usage_decay, dead_threshold, seeds, weight, ema_count, restart))
    # The step counter first: both kernels read the new count, and no kernel may write what another
    # of its programs reads. A step that counted no row is not counted either.
    steps.add_(counts[k].clamp(max=1))
    if not restart:
        # Without restarts the first kernel writes no flags: it gets a stand-in pointer.
        plan.update(counts, usage, grace, batch_counts, steps, counts, counts)
        return
    dead = torch.empty(k, dtype=torch.int8, device=usage.device)
    dead_per_block = torch.empty(plan.programs, dtype=torch.int32, device=usage.device)
    plan.update(counts, usage, grace, batch_counts, steps, dead, dead_per_block)
    plan.restart(dead, dead_per_block, seeds, weight, usage, grace, ema_count if ema_count is not None else usage,
                 steps)


class _UsagePlan:
    """The launches of ``update_code_usage`` for one problem (see ``PlanCache``); its tensors' shapes
    and dtypes are checked on every call."""

    def __init__(self, k: int, usage_decay: float, dead_threshold: float, seeds: torch.Tensor | None,
                 weight: torch.Tensor | None, ema_count: torch.Tensor | None, restart: bool):
        per_program = _codes_per_program(k)
        programs = self.programs = cdiv(k, per_program)
        # The decay as float32 holds it, and 1 minus that (exact) as the rate, so that the shares sum to
        # the bias correction (as vqfast.reference.stored_decay).
        usage_decay = _as_float32(usage_decay)
        # decay 0: a huge finite log (a float32 argument), not -inf, whose product with 0 steps would be NaN
        # where 0 ** 0 = 1.
        log2_decay = math.log2(usage_decay) if usage_decay > 0 else -3.0e38
        log2_decay_hi = _as_float32(log2_decay)
        log2_decay = (log2_decay_hi, log2_decay - log2_decay_hi)
        block = min(per_program, 16 if interpreting() else 1024)
        self.update = PreparedLaunch(_update_usage_kernel, (programs,),
                                     (k, usage_decay, 1.0 - usage_decay, *log2_decay, dead_threshold),
                                     dict(FIND_DEAD=restart, CODES_PER_PROGRAM=per_program, BLOCK=block, num_warps=4))
        self.restart = None
        if not restart:
            return
        d = weight.shape[1]
        block_codes = 8 if interpreting() else 256
        self.restart = PreparedLaunch(
            _restart_codes_kernel, (programs,),
            (k, d, seeds.shape[0], seeds.stride(0), weight.stride(0), weight.stride(1), *log2_decay),
            dict(HAS_EMA=ema_count is not None, CODES_PER_PROGRAM=per_program,
                 NUM_BLOCKS_P2=max(2, next_power_of_2(programs)), BLOCK_CODES=min(block_codes, per_program),
                 BLOCK_D=16, num_warps=4))


_USAGE_PLANS = PlanCache()
