"""Fused nearest-code search: squared distances and a running argmin, never writing the N x K matrix.

For a block of BLOCK_N rows of z, a program streams the codebook in (BLOCK_D x BLOCK_K) tiles, forms
||c||^2 - 2 z.c on the tensor cores (fp32 accumulation) and keeps the best (score, index) per row in
registers. When there are few row blocks (few rows, many codes), the codebook is split across
programs and a second small kernel reduces the per-split winners.

The fp32 search (precision "highest", "high" or "medium") scores codes with tf32 products and ranks
them by a lower bound of their exact score: the tf32 score minus a bound on its error for that row
and code, computed from the data (their norms and what tf32 drops from each). The nearest code is
among the codes whose lower bound is at most the best code's upper bound, and the three lowest lower
bounds say how many there are: one, and the row is sure; two, and the same kernel decides between
them by the direct form ||z - c||^2 in fp32; more (a few rows), and the row goes to a list, built on
the device, that a second search works through: with full fp32 products on the CUDA cores for
"highest", with fp32-accurate tf32x3 products for "high"/"medium". So the search costs about one tf32
pass, in a fixed number of launches and with no host synchronisation, which is what small
(latency-bound) problems need; precision "ieee" scores every code with fp32 products instead (the
slow, plain search that tests and benchmarks check the others against). Whichever kernel writes an
index also sums the chosen code's distance directly, ||z - c||^2.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import triton
import triton.language as tl

from vqfast._checks import env_switch
from vqfast.kernels import _common
from vqfast.kernels._launch import PreparedLaunch
from vqfast.kernels._common import (
    KeptBuffers, PlanCache, _sqnorm_blocks, _sqnorm_launch, autotuning, cdiv, check_rows_and_codes, fresh_buffers,
    int32_safe_columns, interpreting, max_shared_memory, multiprocessor_count, next_power_of_2, resolves_negative_views,
)

# Largest D kept whole in registers for a row block; larger D loops over BLOCK_D slices. Exact fp32
# (CUDA-core FMA products) keeps slices small.
_MAX_SINGLE_D = {torch.float32: 128, torch.float16: 256, torch.bfloat16: 256}
_MAX_SINGLE_D_IEEE_FP32 = 32
# tf32x3 products (the re-search of listed rows) stage more in shared memory: on sm_90 a whole D of 128
# in one tile asks for 256 KiB (compile_check.py), over the 227 KiB there; a D of 64, or a D loop of
# 64-column slices, takes 128 KiB.
_MAX_SINGLE_D_TF32X3 = 64
_LOOP_BLOCK_D = 64
# Split granularity along K: a multiple of every BLOCK_K the autotuner may pick.
_SPLIT_ALIGN = 256
# Most codebook splits: the reducing kernel holds a row's split winners in registers (and CUDA allows
# 65,535 programs along grid y). The automatic choice stays near 2 programs per SM.
_MAX_SPLITS = 1024


# Columns per step of the distance epilogue: a (BLOCK_N x 32) fp32 slice stays in registers.
_DIST_BLOCK_D = 32


@triton.jit
def _chosen_code_sqdist(z_rows, stride_zd, c_ptr, stride_ck, stride_cd, index, mask_n, D,
                        BLOCK_N: tl.constexpr, DIST_BLOCK_D: tl.constexpr):
    """``||z - c[index]||^2`` per row, summed directly in fp32: unlike the search's expanded form
    ``||z||^2 + ||c||^2 - 2 z.c`` it does not cancel (data far from the origin, tiny distances) and
    carries no tf32 error. One gather of the chosen codes, N x D reads in all."""
    c_rows = c_ptr + index.to(tl.int64)[:, None] * stride_ck
    offs_d = tl.arange(0, DIST_BLOCK_D)
    acc = tl.zeros([BLOCK_N, DIST_BLOCK_D], tl.float32)
    for d0 in range(0, D, DIST_BLOCK_D):
        dd = d0 + offs_d
        mask = mask_n[:, None] & (dd[None, :] < D)
        zt = tl.load(z_rows + dd[None, :] * stride_zd, mask=mask, other=0.0).to(tl.float32)
        ct = tl.load(c_rows + dd[None, :] * stride_cd, mask=mask, other=0.0).to(tl.float32)
        diff = zt - ct
        acc += diff * diff
    return tl.sum(acc, axis=1)


@triton.jit
def _store_choice(rows, index, mask_n, z_rows, c_ptr, D, stride_zd, stride_ck, stride_cd, index_ptr, dist_ptr,
                  BLOCK_N: tl.constexpr, DIST_BLOCK_D: tl.constexpr):
    """Writes ``index`` and the distance of that code (``_chosen_code_sqdist``) at ``rows``."""
    index = index.to(tl.int64)
    dist = _chosen_code_sqdist(z_rows, stride_zd, c_ptr, stride_ck, stride_cd, index, mask_n, D, BLOCK_N, DIST_BLOCK_D)
    tl.store(index_ptr + rows, index, mask=mask_n)
    tl.store(dist_ptr + rows, dist, mask=mask_n)


@triton.jit
def _merge_best_three(b1, i1, b2, i2, b3, t1, a1, t2, a2, t3):
    """The three lowest scores, and the indices of the two lowest, of two ascending lists: the running
    one ``b`` and a tile's ``t``. Ties go to ``b``: its codes come first, so the lowest index wins."""
    take = t1 < b1
    n1 = tl.where(take, t1, b1)
    j1 = tl.where(take, a1, i1)
    # The head of each list once the winner is taken from it, and the element after that head.
    b_head = tl.where(take, b1, b2)
    b_head_index = tl.where(take, i1, i2)
    b_next = tl.where(take, b2, b3)
    t_head = tl.where(take, t2, t1)
    t_head_index = tl.where(take, a2, a1)
    t_next = tl.where(take, t3, t2)
    take2 = t_head < b_head
    n2 = tl.where(take2, t_head, b_head)
    j2 = tl.where(take2, t_head_index, b_head_index)
    n3 = tl.where(take2, tl.minimum(b_head, t_next), tl.minimum(b_next, t_head))
    return n1, j1, n2, j2, n3


@triton.jit
def _tile_scores(acc, k0, mask_k, c_sqnorm_ptr, c_norm_ptr, c_resid_ptr, row_err, row_resid_err, err_norm,
                 err_tiny, FULL_TILES: tl.constexpr, BOUND: tl.constexpr):
    """A code tile's scores ``||c||^2 - 2 z.c`` from its products ``acc`` with codes ``k0`` onwards, and
    the codes' ``||c||^2``; with BOUND, minus the bound on their tf32 error (``_code_error``): lower
    bounds of the exact scores. Codes past the split (``mask_k`` false; FULL_TILES: none) score +inf
    through their norm."""
    # (Scalar base + constant column offsets: one address with immediate offsets per thread, where
    # Triton 3.6 formed a 64-bit address per element from offs_k.)
    cols = tl.arange(0, acc.shape[1])
    offs_k = k0 + cols
    if FULL_TILES:
        c_sqnorm = tl.load(c_sqnorm_ptr + k0 + cols)
    else:
        # Padding codes get +inf so they never win.
        c_sqnorm = tl.load(c_sqnorm_ptr + offs_k, mask=mask_k, other=float("inf"))
    score = c_sqnorm[None, :] - 2.0 * acc
    if BOUND:
        if FULL_TILES:
            c_norm = tl.load(c_norm_ptr + k0 + cols)
            c_resid = tl.load(c_resid_ptr + k0 + cols)
            c_term = c_sqnorm
        else:
            c_norm = tl.load(c_norm_ptr + offs_k, mask=mask_k, other=0.0)
            c_resid = tl.load(c_resid_ptr + offs_k, mask=mask_k, other=0.0)
            c_term = tl.where(mask_k, c_sqnorm, 0.0)
        score = score - _code_error(row_err[:, None], row_resid_err[:, None], c_norm[None, :],
                                    c_resid[None, :], c_term[None, :], err_norm, err_tiny)
    return score, c_sqnorm


@triton.jit
def _update_slots(score, k0, slot_best, slot_start, slot_second, BEST_THREE: tl.constexpr,
                  ONE_SELECT: tl.constexpr = True):
    """Each (row, column) slot's running minimum and the start of its tile (with BEST_THREE also its
    second-lowest), after one more tile's scores. ONE_SELECT (without BEST_THREE): the minimum taken by
    ``minimum()`` and one select on the compare, the same values as two selects."""
    # A NaN score compares false and never replaces a slot's minimum (and minimum() ignores a NaN
    # operand); strict '<' keeps a slot's earliest tile on ties.
    better = score < slot_best
    if BEST_THREE:
        slot_second = tl.where(better, slot_best, tl.minimum(slot_second, score))
    if BEST_THREE or not ONE_SELECT:
        slot_best = tl.where(better, score, slot_best)
    else:
        # One select on the compare: with two, Triton 3.6 packed the predicates into integers and
        # unpacked them (~50 instructions per tile).
        slot_best = tl.minimum(slot_best, score)
    slot_start = tl.where(better, k0, slot_start)
    return slot_best, slot_start, slot_second


@triton.jit
def _reduce_slots(slot_best, slot_start, slot_second, k_end, BLOCK_K: tl.constexpr, BEST_THREE: tl.constexpr):
    """Per row, from the slots after the last tile: the best score and its index (with BEST_THREE also
    the second and third lowest and the second's index, ``_slot_best_three``; otherwise +inf and the
    best's index, which nothing reads)."""
    # The lowest index among the slots that hold the row's minimum: each slot holds the earliest code
    # with its own minimum, so this is the lowest index of all codes with that score. A row whose
    # scores are all NaN or +inf gets the split's first code (column 0 of its first tile).
    best = tl.min(slot_best, axis=1)
    codes = slot_start + tl.arange(0, BLOCK_K)[None, :]
    best_index = tl.min(tl.where(slot_best == best[:, None], codes, k_end), axis=1)
    second = tl.full(best.shape, float("inf"), tl.float32)
    second_index = best_index
    third = second
    if BEST_THREE:
        second, second_index, third = _slot_best_three(slot_best, slot_second, codes, best, best_index, k_end)
    return best, best_index, second, second_index, third


@triton.jit
def _upper_bound(best, best_index, mask_n, row_err, row_resid_err, c_sqnorm_ptr, c_norm_ptr, c_resid_ptr,
                 err_norm, err_tiny):
    """An upper bound of each row's best exact score: the best code's tf32 score plus its error."""
    chosen = best_index.to(tl.int64)
    return best + 2.0 * _code_error(row_err, row_resid_err,
                                    tl.load(c_norm_ptr + chosen, mask=mask_n, other=0.0),
                                    tl.load(c_resid_ptr + chosen, mask=mask_n, other=0.0),
                                    tl.load(c_sqnorm_ptr + chosen, mask=mask_n, other=0.0), err_norm, err_tiny)


@triton.jit
def _store_split_winners(offs_n, mask_n, pid_s, stride_sn, best, best_index, second, second_index, third, upper,
                         score_ptr, index_ptr, second_ptr, second_index_ptr, third_ptr, upper_ptr,
                         RECHECK: tl.constexpr):
    """One split's winners per row, for ``_reduce_splits_kernel``: the best score and index, with
    RECHECK also the second and third lower bounds, the second's index and the upper bound."""
    out = offs_n.to(tl.int64) * stride_sn + pid_s
    tl.store(score_ptr + out, best, mask=mask_n)
    tl.store(index_ptr + out, best_index.to(tl.int64), mask=mask_n)
    if RECHECK:
        tl.store(second_ptr + out, second, mask=mask_n)
        tl.store(second_index_ptr + out, second_index, mask=mask_n)
        tl.store(third_ptr + out, third, mask=mask_n)
        tl.store(upper_ptr + out, upper, mask=mask_n)


@triton.jit
def _code_tile(c_ptr, k0, mask_k, offs_d, D, stride_ck, stride_cd, FULL_TILES: tl.constexpr,
               EVEN_D: tl.constexpr):
    """The (BLOCK_D, BLOCK_K) tile of codes ``k0 + arange(BLOCK_K)`` (transposed for the product), masked
    only where the tile may be partial (not FULL_TILES) or D does not fill BLOCK_D (not EVEN_D)."""
    cols = tl.arange(0, mask_k.shape[0])
    if EVEN_D and c_ptr.dtype.element_ty.primitive_bitwidth == 16:
        # The tile's start as one 64-bit scalar and in-tile offsets that do not change across tiles:
        # the compiler keeps the offsets out of the loop, where 64-bit products per element cost ~60
        # instructions per tile with Triton 3.6. Only for whole 16-bit rows: with masked D (element by
        # element loads) or fp32 codes there are 4 to 8 times more addresses to keep, and the hoisted
        # offsets took up to 255 registers and spilled.
        tile_start = c_ptr + tl.cast(k0, tl.int64) * stride_ck
        c_tile_ptr = tile_start + (cols.to(tl.int64)[None, :] * stride_ck + offs_d[:, None] * stride_cd)
    else:
        c_tile_ptr = c_ptr + (k0 + cols).to(tl.int64)[None, :] * stride_ck + offs_d[:, None] * stride_cd
    if FULL_TILES and EVEN_D:
        c_tile = tl.load(c_tile_ptr)
    elif FULL_TILES:
        c_tile = tl.load(c_tile_ptr, mask=offs_d[:, None] < D, other=0.0)
    elif EVEN_D:
        c_tile = tl.load(c_tile_ptr, mask=mask_k[None, :], other=0.0)
    else:
        c_tile = tl.load(c_tile_ptr, mask=mask_k[None, :] & (offs_d[:, None] < D), other=0.0)
    return c_tile


@triton.jit
def _scan_codes(z_rows, load_n, c_ptr, c_sqnorm_ptr, c_norm_ptr, c_resid_ptr, row_err, row_resid_err,
                err_norm, err_tiny, k_begin, k_end, D, stride_zd, stride_ck, stride_cd,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_D: tl.constexpr,
                INPUT_PRECISION: tl.constexpr, BEST_THREE: tl.constexpr, SLOTS: tl.constexpr,
                K_ALIGN: tl.constexpr, EVEN_D: tl.constexpr, PIPELINE: tl.constexpr):
    """Streams codes [k_begin, k_end) past a block of rows: per row the best score ``||c||^2 - 2 z.c``
    and its index. With BEST_THREE the codes are ranked instead by a lower bound of their exact score,
    the tf32 score minus the bound on its error for that code and row (``_code_error``), and the
    runner-up (lower bound and index) and the third lower bound are kept too.

    With SLOTS (tensor-core products) each (row, column) slot of the tile keeps its own running minimum
    and the start of the tile it came from, and the rows are reduced once, after the last tile: per
    score one compare and two selects, against a minimum with its index across each tile's columns
    (compare-and-select chains over values and indices, then shuffles) per tile. With BEST_THREE a slot
    also keeps its second-lowest bound (one minimum and one select more), and ``_slot_best_three``
    takes the row's three lowest from the slots' pairs.

    K_ALIGN, a power of two dividing k_begin and k_end, and EVEN_D (D == BLOCK_D, one slice) let the
    loads go unmasked: when BLOCK_K divides K_ALIGN every tile is full, and the per-element masks (and
    their selects) leave the loop.

    PIPELINE (a whole D per tile, slots, no BEST_THREE: the 16-bit search) issues the next tile's
    product before the current tile's argmin, so that the argmin runs while the tensor cores work (the
    warpgroup MMA is asynchronous; its wait then follows the argmin). It holds a second accumulator
    tile; the last tile's extra product (of the last full tile again, or of masked zeros) is unused."""
    offs_d = tl.arange(0, BLOCK_D)
    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_index = tl.zeros([BLOCK_N], tl.int32) + k_begin
    second = tl.full([BLOCK_N], float("inf"), tl.float32)
    second_index = tl.zeros([BLOCK_N], tl.int32) + k_begin
    third = tl.full([BLOCK_N], float("inf"), tl.float32)
    use_slots: tl.constexpr = SLOTS and INPUT_PRECISION != "ieee"
    if use_slots:
        slot_best = tl.full([BLOCK_N, BLOCK_K], float("inf"), tl.float32)
        slot_start = tl.zeros([BLOCK_N, BLOCK_K], tl.int32) + k_begin
        slot_second = tl.full([BLOCK_N, BLOCK_K], float("inf"), tl.float32)
    # (Not in the tf32 pass without slots: at ~255 registers there, unmasked loads made ptxas spill.)
    full_tiles: tl.constexpr = K_ALIGN % BLOCK_K == 0 and (use_slots or not BEST_THREE)
    pipelined: tl.constexpr = PIPELINE and SINGLE_D and use_slots and not BEST_THREE
    if SINGLE_D:
        # Rows that are not searched (past the end, or not listed) are not read either.
        z_block = tl.load(z_rows + offs_d[None, :] * stride_zd, mask=load_n[:, None] & (offs_d[None, :] < D),
                          other=0.0)
    if pipelined:
        # The first tile's product before the loop, with masks (an empty split reads nothing).
        first = k_begin + tl.arange(0, BLOCK_K)
        acc_next = tl.dot(z_block, _code_tile(c_ptr, k_begin, first < k_end, offs_d, D, stride_ck, stride_cd, False,
                                              EVEN_D),
                          tl.zeros([BLOCK_N, BLOCK_K], tl.float32), input_precision=INPUT_PRECISION)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        if pipelined:
            acc = acc_next
            # Whole tiles: after the last one, the last one again (in bounds, unmasked); otherwise the
            # masks leave the tile past the end unread.
            k_next = tl.minimum(k0 + BLOCK_K, k_end - BLOCK_K) if full_tiles else k0 + BLOCK_K
            offs_next = k_next + tl.arange(0, BLOCK_K)
            acc_next = tl.dot(z_block, _code_tile(c_ptr, k_next, offs_next < k_end, offs_d, D, stride_ck,
                                                  stride_cd, full_tiles, EVEN_D),
                              tl.zeros([BLOCK_N, BLOCK_K], tl.float32), input_precision=INPUT_PRECISION)
        elif SINGLE_D:
            acc = tl.dot(z_block, _code_tile(c_ptr, k0, mask_k, offs_d, D, stride_ck, stride_cd, full_tiles,
                                             EVEN_D),
                         acc, input_precision=INPUT_PRECISION)
        else:
            c_cols = c_ptr + offs_k.to(tl.int64)[None, :] * stride_ck
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + offs_d
                zt = tl.load(z_rows + dd[None, :] * stride_zd,
                             mask=load_n[:, None] & (dd[None, :] < D), other=0.0)
                ct = tl.load(c_cols + dd[:, None] * stride_cd,
                             mask=mask_k[None, :] & (dd[:, None] < D), other=0.0)
                acc = tl.dot(zt, ct, acc, input_precision=INPUT_PRECISION)
        # (Without slots, _merge_tile subtracts the bound itself.)
        score, c_sqnorm = _tile_scores(acc, k0, mask_k, c_sqnorm_ptr, c_norm_ptr, c_resid_ptr, row_err,
                                       row_resid_err, err_norm, err_tiny, full_tiles, use_slots and BEST_THREE)
        if use_slots:
            slot_best, slot_start, slot_second = _update_slots(score, k0, slot_best, slot_start, slot_second,
                                                               BEST_THREE)
        else:
            best, best_index, second, second_index, third = _merge_tile(
                score, k0, offs_k, mask_k, c_sqnorm, c_norm_ptr, c_resid_ptr, row_err, row_resid_err, err_norm,
                err_tiny, best, best_index, second, second_index, third, BLOCK_K, BEST_THREE)
    if use_slots:
        # (A row whose scores are all NaN or +inf gets k_begin, as without slots.)
        best, best_index, second, second_index, third = _reduce_slots(slot_best, slot_start, slot_second, k_end,
                                                                      BLOCK_K, BEST_THREE)
    return best, best_index, second, second_index, third


@triton.jit
def _slot_best_three(slot_best, slot_second, codes, best, best_index, k_end):
    """The second- and third-lowest bounds of a row, and the index of the second, from each slot's two
    lowest bounds (``slot_best`` at code ``codes``, ``slot_second``), given the lowest (``best`` at
    ``best_index``). A slot's third bound is not kept: when the winning slot also holds the row's
    second-lowest, its third could be the row's third. The third then comes out equal to the second
    (the winning slot's second stays among the candidates), which moves the row from "decided between
    two codes" to "searched again" and never the other way; the second's index, not kept either, is
    then reported as the best's (a valid code that nothing reads)."""
    is_win = codes == best_index[:, None]
    # Each slot's lowest bound once the row's best is taken out of its slot.
    heads = tl.where(is_win, slot_second, slot_best)
    second = tl.min(heads, axis=1)
    second_index = tl.min(tl.where(is_win, k_end, tl.where(heads == second[:, None], codes, k_end)), axis=1)
    third = tl.min(tl.where(codes == second_index[:, None], slot_second, heads), axis=1)
    second_index = tl.where(second_index < k_end, second_index, best_index)
    return second, second_index, third


@triton.jit
def _merge_tile(score, k0, offs_k, mask_k, c_sqnorm, c_norm_ptr, c_resid_ptr, row_err, row_resid_err, err_norm,
                err_tiny, best, best_index, second, second_index, third, BLOCK_K: tl.constexpr,
                BEST_THREE: tl.constexpr):
    """One tile's scores merged into the running best per row (and, with BEST_THREE, the lower bounds'
    best three), by a minimum with its index across the tile's columns."""
    # NaN never wins: a row whose scores are all NaN keeps a valid index. (minimum() ignores a NaN operand:
    # one FMNMX instead of a compare and a select.)
    score = tl.minimum(score, float("inf"))
    if BEST_THREE:
        error = _code_error(row_err[:, None], row_resid_err[:, None],
                            tl.load(c_norm_ptr + offs_k, mask=mask_k, other=0.0)[None, :],
                            tl.load(c_resid_ptr + offs_k, mask=mask_k, other=0.0)[None, :],
                            tl.where(mask_k, c_sqnorm, 0.0)[None, :], err_norm, err_tiny)
        # inf - inf (padding, or a row of infinities) is NaN: such a code never wins either.
        score = score - error
        score = tl.minimum(score, float("inf"))
    tile_best, tile_arg = tl.min(score, axis=1, return_indices=True, return_indices_tie_break_left=True)
    tile_arg = tile_arg.to(tl.int32)
    if BEST_THREE:
        cols = tl.arange(0, BLOCK_K)
        rest = tl.where(cols[None, :] == tile_arg[:, None], float("inf"), score)
        tile_second, tile_arg2 = tl.min(rest, axis=1, return_indices=True, return_indices_tie_break_left=True)
        tile_arg2 = tile_arg2.to(tl.int32)
        rest = tl.where(cols[None, :] == tile_arg2[:, None], float("inf"), rest)
        tile_third = tl.min(rest, axis=1)
        best, best_index, second, second_index, third = _merge_best_three(
            best, best_index, second, second_index, third,
            tile_best, tile_arg + k0, tile_second, tile_arg2 + k0, tile_third)
    else:
        # Strict '<' across tiles keeps the lowest index on ties, since tiles go in increasing order.
        improved = tile_best < best
        best_index = tl.where(improved, tile_arg + k0, best_index)
        best = tl.where(improved, tile_best, best)
    return best, best_index, second, second_index, third


@triton.jit
def _code_error(row_err, row_resid_err, c_norm, c_resid, c_sqnorm, err_norm, err_tiny):
    """Bound on |tf32 score - exact score| of a row against a code (broadcasting): the row's factors
    (``_row_errors``) times the code's norm and tf32 residual norm, plus the rounding of ``||c||^2``
    and the underflow term (see the comment above ``_BOUND_SLACK``)."""
    # Nested so that it compiles to a chain of fused multiply-adds (its rounding is in _BOUND_SLACK).
    return row_err * c_norm + (row_resid_err * c_resid + (err_norm * c_sqnorm + 4.0 * err_tiny))


@triton.jit
def _row_errors(z_rows, mask_n, D, stride_zd, err_resid, err_dot, err_tiny,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per row, the factors of the tf32 error bound that multiply a code's norm and its tf32 residual
    norm: err_resid ||z - tf32(z)|| + err_dot ||z||, and err_resid ||z||."""
    z_sqnorm, z_resid = _row_tf32_norms(z_rows, mask_n, D, stride_zd, BLOCK_N, BLOCK_D)
    # err_tiny = D * 2**-126 covers squares and products that underflow (GPUs flush subnormals to
    # zero), and sqrt_rn is exact rounding: tl.sqrt is an approximation that flushes subnormal inputs.
    return _row_error_factors(tl.sqrt_rn(z_sqnorm + err_tiny), tl.sqrt_rn(z_resid + err_tiny), err_resid, err_dot)


@triton.jit
def _row_error_factors(z_norm, z_resid_norm, err_resid, err_dot):
    """``_row_errors``'s two factors from the rows' norm and tf32 residual norm."""
    return err_resid * z_resid_norm + err_dot * z_norm, err_resid * z_norm


@triton.jit
def _row_tf32_norms(z_rows, mask_n, D, stride_zd, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """``||z||^2`` and ``||z - tf32(z)||^2`` per row in fp32. tf32 by truncation to 10 mantissa bits:
    its error bounds that of rounding to nearest, whichever the tensor cores do."""
    offs_d = tl.arange(0, BLOCK_D)
    sq = tl.zeros([BLOCK_N], tl.float32)
    resid = tl.zeros([BLOCK_N], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        x = tl.load(z_rows + dd[None, :] * stride_zd, mask=mask_n[:, None] & (dd[None, :] < D),
                    other=0.0).to(tl.float32)
        r = x - (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
        sq += tl.sum(x * x, axis=1)
        resid += tl.sum(r * r, axis=1)
    return sq, resid


@triton.jit
def _settle_rows(best, best_index, second, second_index, third, upper,
                 offs_n, mask_n, z_rows, c_ptr, K, D, stride_zd, stride_ck, stride_cd,
                 index_ptr, dist_ptr, status_ptr, count_ptr, list_ptr, packed_ptr,
                 BLOCK_N: tl.constexpr, DIST_BLOCK_D: tl.constexpr):
    """After a tf32 search that ranked codes by a lower bound of their exact score (``best``,
    ``second``, ``third``: the three lowest), with ``upper`` an upper bound of the best exact score:
    the nearest code is among the codes whose lower bound is at most ``upper``. Writes each row's index
    and distance, and sorts the rows by how many such codes there are (status 0, 1, 2).
    0: one; it is the nearest.
    1: two: both are scored by the direct form ||z - c||^2 in fp32 and the nearer is kept (lower index
       on ties).
    2: three or more: the row is appended to the list that ``_research_listed_rows`` searches (one
       atomic per program; its (score, index) slot is set to "none yet"). So is a row without a finite
       bound: with ||z||^2 past fp32's range (|z_i| > ~1.8e19) every lower bound is -inf, while the
       fp32 search still ranks its codes (rows of NaN get index 0 there, as from the search)."""
    bounded = upper < float("inf")
    uncertain = bounded & (second <= upper)
    hard = (uncertain & (third <= upper)) | (bounded == 0)
    pair = uncertain & (hard == 0)
    best_index = best_index.to(tl.int64)
    # A pair row's runner-up is a real code (its score is finite); the clamp only guards the address.
    second_index = tl.minimum(second_index.to(tl.int64), K - 1)
    dist = _chosen_code_sqdist(z_rows, stride_zd, c_ptr, stride_ck, stride_cd, best_index, mask_n, D,
                               BLOCK_N, DIST_BLOCK_D)
    dist2 = _chosen_code_sqdist(z_rows, stride_zd, c_ptr, stride_ck, stride_cd, second_index, mask_n & pair, D,
                                BLOCK_N, DIST_BLOCK_D)
    swap = pair & ((dist2 < dist) | ((dist2 == dist) & (second_index < best_index)))
    tl.store(index_ptr + offs_n, tl.where(swap, second_index, best_index), mask=mask_n)
    tl.store(dist_ptr + offs_n, tl.where(swap, dist2, dist), mask=mask_n)
    tl.store(status_ptr + offs_n, tl.where(hard, 2, tl.where(pair, 1, 0)).to(tl.int8), mask=mask_n)
    listed = (hard & mask_n).to(tl.int32)
    start = tl.atomic_add(count_ptr, tl.sum(listed, axis=0))
    slot = start + tl.cumsum(listed, axis=0) - 1
    tl.store(list_ptr + slot, offs_n, mask=listed != 0)
    tl.store(packed_ptr + slot, tl.full([BLOCK_N], 0x7FFFFFFFFFFFFFFF, tl.int64), mask=listed != 0)


# Sizes that change from call to call are not specialised on, so a new batch size reuses the compiled
# kernel instead of compiling (and autotuning) another variant.
@triton.jit(do_not_specialize=["N", "codes_per_split", "N_BUCKET", "stride_sn", "err_resid", "err_dot", "err_norm",
                               "err_tiny"])
def _nearest_code_kernel(
    z_ptr, c_ptr, c_sqnorm_ptr, c_norm_ptr, c_resid_ptr,
    score_ptr, index_ptr, dist_ptr, second_ptr, second_index_ptr, third_ptr, upper_ptr,
    status_ptr, count_ptr, list_ptr, packed_ptr,
    N, K, D, codes_per_split, N_BUCKET, err_resid, err_dot, err_norm, err_tiny,
    stride_zn, stride_zd, stride_ck, stride_cd, stride_sn,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DIST_BLOCK_D: tl.constexpr,
    SINGLE_D: tl.constexpr, INPUT_PRECISION: tl.constexpr, WRITE_DISTANCE: tl.constexpr, RECHECK: tl.constexpr,
    SLOTS: tl.constexpr, K_ALIGN: tl.constexpr, EVEN_D: tl.constexpr, PIPELINE: tl.constexpr,
):
    """One block of rows against one split of the codebook. WRITE_DISTANCE (one split): the final index
    and distance; otherwise the split's winner for the reduction. RECHECK (fp32 data, tf32 products):
    codes ranked by a lower bound of their exact score, the three lowest bounds, the two best codes and an
    upper bound of the best exact score (see ``_settle_rows``)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    # 64-bit row offsets: N * D may exceed 2**31.
    z_rows = z_ptr + offs_n.to(tl.int64)[:, None] * stride_zn
    k_begin = pid_s * codes_per_split
    # (Not k_begin + codes_per_split: rounded up, the last split's end can pass 2**31.)
    k_end = k_begin + tl.minimum(codes_per_split, K - k_begin)
    row_err = tl.zeros([BLOCK_N], tl.float32)
    row_resid_err = tl.zeros([BLOCK_N], tl.float32)
    if RECHECK:
        row_err, row_resid_err = _row_errors(z_rows, mask_n, D, stride_zd, err_resid, err_dot, err_tiny,
                                             BLOCK_N, DIST_BLOCK_D)
    best, best_index, second, second_index, third = _scan_codes(
        z_rows, mask_n, c_ptr, c_sqnorm_ptr, c_norm_ptr, c_resid_ptr, row_err, row_resid_err, err_norm, err_tiny,
        k_begin, k_end, D, stride_zd, stride_ck, stride_cd,
        BLOCK_N, BLOCK_K, BLOCK_D, SINGLE_D, INPUT_PRECISION, RECHECK, SLOTS, K_ALIGN, EVEN_D, PIPELINE)
    upper = best  # (read with RECHECK only)
    if RECHECK:
        upper = _upper_bound(best, best_index, mask_n, row_err, row_resid_err, c_sqnorm_ptr, c_norm_ptr,
                             c_resid_ptr, err_norm, err_tiny)

    if WRITE_DISTANCE:
        if RECHECK:
            _settle_rows(best, best_index, second, second_index, third, upper,
                         offs_n, mask_n, z_rows, c_ptr, K, D, stride_zd, stride_ck, stride_cd,
                         index_ptr, dist_ptr, status_ptr, count_ptr, list_ptr, packed_ptr, BLOCK_N, DIST_BLOCK_D)
        else:
            _store_choice(offs_n, best_index, mask_n, z_rows, c_ptr, D, stride_zd, stride_ck, stride_cd,
                          index_ptr, dist_ptr, BLOCK_N, DIST_BLOCK_D)
    else:
        _store_split_winners(offs_n, mask_n, pid_s, stride_sn, best, best_index, second, second_index, third, upper,
                             score_ptr, index_ptr, second_ptr, second_index_ptr, third_ptr, upper_ptr, RECHECK)


@triton.jit(do_not_specialize=["N"])
def _reduce_splits_kernel(
    score_ptr, part_index_ptr, second_ptr, second_index_ptr, third_ptr, upper_ptr, z_ptr, c_ptr,
    index_ptr, dist_ptr, status_ptr, count_ptr, list_ptr, packed_ptr,
    N, S, K, D, stride_zn, stride_zd, stride_ck, stride_cd,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, DIST_BLOCK_D: tl.constexpr, RECHECK: tl.constexpr,
):
    """Per row, the best of the S per-split winners (splits are in increasing code order and ties go
    to the first, so the lowest index wins) and its distance; with RECHECK the best three of the splits'
    best three and the lowest upper bound, then ``_settle_rows``."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_s = tl.arange(0, BLOCK_S)
    mask_s = offs_s < S
    mask = mask_n[:, None] & mask_s[None, :]
    rows = offs_n.to(tl.int64) * S
    parts = rows[:, None] + offs_s[None, :]
    scores = tl.load(score_ptr + parts, mask=mask, other=float("inf"))
    best, win = tl.min(scores, axis=1, return_indices=True, return_indices_tie_break_left=True)
    win = win.to(tl.int64)
    index = tl.load(part_index_ptr + rows + win, mask=mask_n, other=0)
    z_rows = z_ptr + offs_n.to(tl.int64)[:, None] * stride_zn
    if RECHECK:
        # Each split's list is ascending: take the winner's head off its list, then the runner-up's.
        is_win = offs_s[None, :] == win[:, None]
        firsts = tl.where(is_win, tl.load(second_ptr + parts, mask=mask, other=float("inf")), scores)
        first_index = tl.where(is_win, tl.load(second_index_ptr + parts, mask=mask, other=0).to(tl.int64),
                               tl.load(part_index_ptr + parts, mask=mask, other=0))
        after = tl.where(is_win, tl.load(third_ptr + parts, mask=mask, other=float("inf")),
                         tl.load(second_ptr + parts, mask=mask, other=float("inf")))
        second, runner = tl.min(firsts, axis=1, return_indices=True, return_indices_tie_break_left=True)
        is_runner = offs_s[None, :] == runner[:, None]
        second_index = tl.sum(tl.where(is_runner, first_index, 0), axis=1)
        third = tl.min(tl.where(is_runner, after, firsts), axis=1)
        upper = tl.min(tl.load(upper_ptr + parts, mask=mask, other=float("inf")), axis=1)
        _settle_rows(best, index, second, second_index, third, upper,
                     offs_n, mask_n, z_rows, c_ptr, K, D, stride_zd, stride_ck, stride_cd,
                     index_ptr, dist_ptr, status_ptr, count_ptr, list_ptr, packed_ptr, BLOCK_N, DIST_BLOCK_D)
    else:
        _store_choice(offs_n, index, mask_n, z_rows, c_ptr, D, stride_zd, stride_ck, stride_cd,
                      index_ptr, dist_ptr, BLOCK_N, DIST_BLOCK_D)


@triton.jit
def _research_listed_rows_kernel(
    z_ptr, c_ptr, c_sqnorm_ptr, count_ptr, list_ptr, packed_ptr,
    K, D, codes_per_split, stride_zn, stride_zd, stride_ck, stride_cd,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """fp32-accurate search of the rows the tf32 pass listed. The list's length is known only on the device, so
    a fixed grid of programs takes its row blocks in turn, each program against one codebook split; the
    splits' winners meet in one 64-bit atomic minimum per row of (order-preserving score bits, index),
    which also keeps the lowest index on ties."""
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    count = tl.load(count_ptr)
    k_begin = pid_s * codes_per_split
    # (Not k_begin + codes_per_split: rounded up, the last split's end can pass 2**31.)
    k_end = k_begin + tl.minimum(codes_per_split, K - k_begin)
    for start in range(pid * BLOCK_N, count, tl.num_programs(0) * BLOCK_N):
        slots = start + tl.arange(0, BLOCK_N)
        mask_n = slots < count
        rows = tl.load(list_ptr + slots, mask=mask_n, other=0)
        z_rows = z_ptr + rows.to(tl.int64)[:, None] * stride_zn
        unused = tl.zeros([BLOCK_N], tl.float32)
        best, best_index, _, _, _ = _scan_codes(
            z_rows, mask_n, c_ptr, c_sqnorm_ptr, c_sqnorm_ptr, c_sqnorm_ptr, unused, unused, 0.0, 0.0,
            k_begin, k_end, D, stride_zd, stride_ck, stride_cd,
            BLOCK_N, BLOCK_K, BLOCK_D, SINGLE_D, INPUT_PRECISION, False, False, 1, False, False)
        bits = best.to(tl.int32, bitcast=True)
        # Negative floats: flip all but the sign bit, so that integer order is float order.
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        tl.atomic_min(packed_ptr + slots, (key.to(tl.int64) << 32) | best_index.to(tl.int64), mask=mask_n)


@triton.jit
def _write_listed_rows_kernel(
    z_ptr, c_ptr, count_ptr, list_ptr, packed_ptr, index_ptr, dist_ptr,
    D, stride_zn, stride_zd, stride_ck, stride_cd,
    BLOCK_N: tl.constexpr, DIST_BLOCK_D: tl.constexpr,
):
    """The re-searched rows' indices (the low half of the packed minimum) and their distances."""
    count = tl.load(count_ptr)
    for start in range(tl.program_id(0) * BLOCK_N, count, tl.num_programs(0) * BLOCK_N):
        slots = start + tl.arange(0, BLOCK_N)
        mask_n = slots < count
        rows = tl.load(list_ptr + slots, mask=mask_n, other=0).to(tl.int64)
        index = tl.load(packed_ptr + slots, mask=mask_n, other=0) & 0xFFFFFFFF
        _store_choice(rows, index, mask_n, z_ptr + rows[:, None] * stride_zn, c_ptr, D, stride_zd, stride_ck,
                      stride_cd, index_ptr, dist_ptr, BLOCK_N, DIST_BLOCK_D)


@triton.jit
def _code_norms_kernel(c_ptr, sqnorm_ptr, norm_ptr, resid_ptr, count_ptr, K, D, tiny, stride_ck, stride_cd,
                       BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """``||c||^2`` per code, and for the tf32 error bound ``||c||`` and ``||c - tf32(c)||`` (``tiny`` =
    D 2**-126 added under the roots covers squares that underflow); a zeroed list length for the tf32
    pass too (one launch fewer than a separate fill). The TMA search (nearest_tma.py) runs it on the
    rows too, with the bound's own ``err_tiny``, for the factors ``_row_errors`` computes."""
    pid = tl.program_id(0)
    offs_k = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    sq, resid = _row_tf32_norms(c_ptr + offs_k.to(tl.int64)[:, None] * stride_ck, offs_k < K, D, stride_cd,
                                BLOCK_K, BLOCK_D)
    tl.store(sqnorm_ptr + offs_k, sq, mask=offs_k < K)
    tl.store(norm_ptr + offs_k, tl.sqrt_rn(sq + tiny), mask=offs_k < K)
    tl.store(resid_ptr + offs_k, tl.sqrt_rn(resid + tiny), mask=offs_k < K)
    if pid == 0:
        tl.store(count_ptr, 0)


def _autotune_configs() -> list[triton.Config]:
    configs = []
    for block_n, block_k, warps, stages in [
        (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (64, 128, 4, 3),
        (64, 64, 4, 4), (128, 64, 4, 3), (64, 256, 8, 3), (128, 128, 8, 2),
        *_TENSOR_CORE_ONLY,
    ]:
        configs.append(_config(block_n, block_k, warps, stages))
    # The per-tile minimum at (128, 64, 8 warps, 1 stage) too: ~95 registers against ~160 with slots,
    # which is what lets two programs share an SM (see _TENSOR_CORE_ONLY).
    configs.append(_config(128, 64, 8, 1, slots=False))
    # The 16-bit search with the next tile's product issued before this tile's argmin (PIPELINE, see
    # _scan_codes): timed only with VQFAST_PIPELINED_SEARCH=1 (see _pipelines); last, so that the fixed
    # configuration (the first that fits) stays as it was.
    configs += [_config(*tile, slots=True, pipeline=True) for tile in _PIPELINED_TILES]
    return configs


def _config(block_n: int, block_k: int, warps: int, stages: int, slots: bool | None = None,
            pipeline: bool = False) -> triton.Config:
    # Slot-wise minima (see _scan_codes) hold two more values per score in registers (three in the tf32
    # pass): by default only for tiles of at most 32 scores per thread.
    if slots is None:
        slots = block_n * block_k <= 32 * 32 * warps
    return triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k, "SLOTS": slots, "PIPELINE": pipeline},
                         num_warps=warps, num_stages=stages)


# The headline's tile (one program per SM at D = 256, where shared memory allows no second program to
# overlap it), with slot-wise minima (PIPELINE needs them). Triton waits for the asynchronous MMA right
# after issuing it; ptxas then moves part of the argmin above that wait: 37 of its 64 compares and
# selects at D = 256 and 32 at D = 64 for this tile (Triton 3.8, sm_90; compile_check.py's "in flight"),
# 2 to 14 for 64 x 64 tiles with 4 warps, which were left out.
_PIPELINED_TILES = ((128, 64, 8, 3),)


# Two programs per SM at D = 256 in 16-bit (96 KiB of shared memory each; the others take 160 KiB or
# more), so that one program's tensor-core work can overlap the other's argmin. With 8 warps that also
# needs at most 128 registers per thread, which slot-wise minima exceed (155-163 on sm_90, one program
# per SM): _autotune_configs adds the same tile with the per-tile minimum. Not for exact fp32
# products, where (128, 64) with one stage spills (compile_check.py).
_TENSOR_CORE_ONLY = ((128, 64, 8, 1), (64, 64, 4, 2))


# Used when no listed configuration fits a GPU's shared memory (consumer GPUs have ~100 KB).
_FALLBACK_CONFIGS = [(64, 32, 4, 2), (32, 32, 4, 1)]


def _shared_memory_bytes(block_n: int, block_k: int, stages: int, block_d: int, single_d: bool,
                         element_bytes: int) -> int:
    """Shared memory the kernel asks for, as Triton 3.6-3.8 lay it out for sm_90 (checked with
    benchmarks/compile_check.py): with SINGLE_D the row tile is loaded once and only code tiles are
    pipelined; otherwise both tiles are, one buffer per stage. Plus 2 KiB for reductions."""
    tiles = block_n + stages * block_k if single_d else stages * (block_n + block_k)
    return tiles * block_d * element_bytes + 2048


def _select_configs(configs: list[triton.Config], input_precision: str, block_d: int, single_d: bool,
                    element_bytes: int, shared_memory_limit: int, pipelined: bool = False) -> list[triton.Config]:
    """The autotuning candidates worth compiling for one problem: those that fit in shared memory and,
    for exact fp32 products (CUDA cores, no tensor cores), at most 32 accumulators per thread: larger
    tiles only spill (ptxas reports hundreds of spilled bytes) and add compile time. PIPELINE candidates
    only where ``pipelined`` (the kernel pipelines: see ``_pipelines``)."""
    def fits(c: triton.Config) -> bool:
        need = _shared_memory_bytes(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages, block_d, single_d,
                                    element_bytes)
        return need <= shared_memory_limit

    chosen = [c for c in configs if fits(c)]
    if not pipelined:
        # (Elsewhere the kernel ignores PIPELINE: such a candidate would be its twin timed again.)
        chosen = [c for c in chosen if not c.kwargs.get("PIPELINE")]
    if input_precision == "ieee":
        chosen = [c for c in chosen if c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= 32 * 32 * c.num_warps
                  and (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages) not in _TENSOR_CORE_ONLY]
    if chosen:
        return chosen
    fallback = [_config(n, k, w, st) for n, k, w, st in _FALLBACK_CONFIGS]
    return [c for c in fallback if fits(c)][:1] or fallback[-1:]


# Keyed on a power-of-two bucket of N (not N itself), so a ragged last batch reuses the tuned config,
# and on the codebook split (rows in one bucket may get different split counts, which change the
# work per program). The interpreter cannot benchmark, so it runs the plain kernel with a fixed
# configuration.
def _prune_configs(configs, named_args, **kwargs):
    meta = {**named_args, **kwargs}
    return _select_configs(configs, meta["INPUT_PRECISION"], meta["BLOCK_D"], meta["SINGLE_D"],
                           meta["z_ptr"].element_size(), _shared_memory_for_tiles(meta["RECHECK"]),
                           _pipelines(meta["INPUT_PRECISION"], meta["SINGLE_D"], meta["RECHECK"]))


def _pipelines(input_precision: str, single_d: bool, recheck: bool) -> bool:
    """Whether the PIPELINE candidates are timed for a problem: ``VQFAST_PIPELINED_SEARCH=1`` (read when a
    problem size is first tuned), and the kernel honours the flag there: tensor-core products over a
    whole D without the tf32 pass's bounds (whose ~250 registers leave no room for a second
    accumulator)."""
    return pipelined_search_enabled() and input_precision != "ieee" and single_d and not recheck


def pipelined_search_enabled() -> bool:
    """``VQFAST_PIPELINED_SEARCH=1``: the 16-bit search's autotuning also times the PIPELINE candidates
    (tuning note 29); off by default, where the compiled code promises ~1 % and each candidate costs a
    compile on every new problem size."""
    return env_switch("VQFAST_PIPELINED_SEARCH", False)


# The tf32 pass's per-code error bound stages about 32 KiB more (compile_check.py, Triton 3.6, sm_90).
_RECHECK_SHARED_BYTES = 32768


def _shared_memory_for_tiles(recheck: bool) -> int:
    return max_shared_memory() - (_RECHECK_SHARED_BYTES if recheck else 0)


_AUTOTUNE_CONFIGS = _autotune_configs()
_nearest_code_autotuned = triton.autotune(
    configs=_AUTOTUNE_CONFIGS,
    key=["N_BUCKET", "K", "D", "codes_per_split", "SINGLE_D", "INPUT_PRECISION", "WRITE_DISTANCE", "RECHECK"],
    prune_configs_by={"early_config_prune": _prune_configs},
    reset_to_zero=["count_ptr"],
)(_nearest_code_kernel)

# fp32 with tf32 products at 128 < D <= 256 (goal 2's shape has D = 256): a whole D per tile, the row
# block's z loaded once and only code tiles streamed, or 64-column slices of both, which reload the row
# block's slices for every code tile (at 128 x 64 tiles, 3x the bytes from L2 per product). A whole
# D of fp32 fits in shared memory only beside small code tiles and few stages, so which is faster is
# left to the autotuner: these candidates carry SINGLE_D and BLOCK_D themselves.
_WIDE_TF32_MAX_D = 256
_WIDE_TF32_WHOLE_D = ((128, 64, 8, 1), (128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 4))


def _wide_tf32_configs() -> list[triton.Config]:
    def with_d(c: triton.Config, single_d: bool, block_d: int) -> triton.Config:
        return triton.Config({**c.kwargs, "SINGLE_D": single_d, "BLOCK_D": block_d}, num_warps=c.num_warps,
                             num_stages=c.num_stages)

    return ([with_d(c, False, _LOOP_BLOCK_D) for c in _AUTOTUNE_CONFIGS]
            + [with_d(_config(*c), True, _WIDE_TF32_MAX_D) for c in _WIDE_TF32_WHOLE_D])


def _prune_wide_tf32_configs(configs, named_args, **kwargs):
    """``_prune_configs`` for candidates that carry their own SINGLE_D and BLOCK_D: the D-slice ones as
    usual (with the fallback if none fits), the whole-D ones that fit."""
    meta = {**named_args, **kwargs}
    element_bytes = meta["z_ptr"].element_size()
    limit = _shared_memory_for_tiles(meta["RECHECK"])
    whole = [c for c in configs if c.kwargs["SINGLE_D"]
             and _shared_memory_bytes(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages, c.kwargs["BLOCK_D"],
                                      True, element_bytes) <= limit]
    sliced = [c for c in configs if not c.kwargs["SINGLE_D"]]
    if not sliced and whole:
        return whole
    chosen = _select_configs(sliced, meta["INPUT_PRECISION"], _LOOP_BLOCK_D, False, element_bytes, limit)
    chosen = [c if "SINGLE_D" in c.kwargs else
              triton.Config({**c.kwargs, "SINGLE_D": False, "BLOCK_D": _LOOP_BLOCK_D}, num_warps=c.num_warps,
                            num_stages=c.num_stages) for c in chosen]
    return chosen + whole


_nearest_code_wide_tf32_autotuned = triton.autotune(
    configs=_wide_tf32_configs(),
    key=["N_BUCKET", "K", "D", "codes_per_split", "INPUT_PRECISION", "WRITE_DISTANCE", "RECHECK"],
    prune_configs_by={"early_config_prune": _prune_wide_tf32_configs},
    reset_to_zero=["count_ptr"],
)(_nearest_code_kernel)

# The autotuner of the last search pass, None if it was not autotuned (benchmarks report its choice).
_last_search_autotuner = None


def last_search_autotuner():
    """The ``triton.autotune`` object the last search pass launched through, or None (no pass, or a
    fixed configuration)."""
    return _last_search_autotuner


_INTERPRETER_CONFIG = {"BLOCK_N": 16, "BLOCK_K": 32, "SLOTS": True, "PIPELINE": False}


@functools.lru_cache(maxsize=None)
def _first_config(input_precision: str, block_d: int, single_d: bool, element_bytes: int,
                  shared_memory_limit: int) -> triton.Config:
    """The first candidate that suits a problem (cached: small searches are bound by host time)."""
    return _select_configs(_AUTOTUNE_CONFIGS, input_precision, block_d, single_d, element_bytes,
                           shared_memory_limit)[0]

# The tf32 error bound (see _settle_rows). A tf32 score differs from the exact ||c||^2 - 2 z.c by
#   2 |z.c - tf32(z).tf32(c)| + |fl(||c||^2) - ||c||^2|
#   <= 2 (||z - tf32(z)|| ||c|| + ||z|| ||c - tf32(c)||) + 2 * D 2**-22 ||z|| ||c|| + D 2**-23 ||c||^2,
# the first term by z.c - z'.c' = (z - z').c + z'.(c - c') and Cauchy-Schwarz with the residuals
# themselves (measured per row and per code, a few times tighter than the worst case 2**-10 ||z|| ||c||
# for typical data), the others bounding fp32 accumulation and the norms with 4x and 2x slack, plus
# 4 D 2**-126 for squares and products that underflow. The bound is taken per code: one based on the
# largest code norm sent nearly every row to the re-search when a few codes were far larger than the
# rest (data rows restarted among small initial codes). The factor covers the rounding of the bound's
# own arithmetic.
_BOUND_SLACK = 1.0 + 2.0**-10
# At most this many codebook splits in the fp32 re-search of listed rows (how many rows are listed is
# only known on the device; splits keep the GPU busy when they are few: 64 against 16 took 4.75 against
# 5.4 ms on the H200 in the case below).
_MAX_RESEARCH_SPLITS = 64
# Products of that re-search by precision: "ieee" (fp32 on the CUDA cores) for "highest", "tf32x3" (each
# fp32 operand split into a tf32 part and a tf32 remainder, three tensor-core products: about fp32's
# accuracy) otherwise. Measured on an H200 at (65,536, 65,536, 256), 1,379 listed rows: 1.05 ms with
# tf32x3 against 4.75 ms with ieee (64 splits), each giving the index of the all-fp32 search on all.
_RESEARCH_PRECISION = {"highest": "ieee", "high": "tf32x3", "medium": "tf32x3", "tf32": "tf32x3"}
PRECISIONS = ("highest", "high", "medium", "tf32", "ieee")


def _input_precision(dtype: torch.dtype, precision: str) -> str:
    """Triton's input precision of the first search pass: "ieee" (fp32 products for every code) only
    for precision "ieee"; the others search with tf32 products and the error bound."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if dtype != torch.float32:
        # 16-bit operands: the products are exact either way; "tf32" is Triton's default path for them.
        return "tf32"
    return "ieee" if precision == "ieee" else "tf32"


def _choose_splits(n_rows: int, n_codes: int, block_n: int, device: torch.device) -> int:
    row_blocks = cdiv(n_rows, block_n)
    target_programs = 2 * multiprocessor_count(device)
    if row_blocks >= target_programs:
        return 1
    max_splits = cdiv(n_codes, _SPLIT_ALIGN)
    return max(1, min(max_splits, cdiv(target_programs, row_blocks)))


def _power_of_two_dividing(*values: int, cap: int = 256) -> int:
    """The largest power of two up to ``cap`` that divides every value."""
    p = cap
    while p > 1 and any(v % p for v in values):
        p //= 2
    return p


def _split_codes(n_codes: int, splits: int, interp: bool) -> tuple[int, int]:
    """``(codes_per_split, splits)`` for about ``splits`` splits of whole alignment units."""
    splits = max(1, min(int(splits), n_codes, _MAX_SPLITS))
    align = 1 if interp else _SPLIT_ALIGN
    codes_per_split = cdiv(cdiv(n_codes, splits), align) * align
    return codes_per_split, cdiv(n_codes, codes_per_split)


class _Recheck:
    """Buffers of the tf32 search's re-check: codebook norms, the bound's factors, per-row status
    (0 sure, 1 decided between its two best codes, 2 searched again in fp32) and the list of rows to
    search again, with its length and a packed (score, index) slot per entry."""

    def __init__(self, z: torch.Tensor, codebook: torch.Tensor, tolerance_scale: float,
                 plan: _RecheckPlan | None = None, scratch: Sequence[torch.Tensor] | None = None,
                 fresh_status: bool = True):
        if plan is None:
            plan = _RecheckPlan(z, codebook, tolerance_scale)
        device = z.device
        if scratch is None:
            scratch = fresh_buffers(plan.scratch_specs, device)
        self.c_sqnorm, self.c_norm, self.c_resid, self.count, self.rows, self.packed, status = scratch
        # A status that goes back to the caller is a fresh tensor; otherwise the scratch one.
        self.status = torch.empty(z.shape[0], dtype=torch.int8, device=device) if fresh_status else status
        self.errors = plan.errors
        plan.norms(codebook, self.c_sqnorm, self.c_norm, self.c_resid, self.count)


class _RecheckPlan:
    """What ``_Recheck`` computes from the problem alone: the bound's factors and the norms' launch."""

    def __init__(self, z: torch.Tensor, codebook: torch.Tensor, tolerance_scale: float):
        n, d = z.shape
        k = codebook.shape[0]
        f32 = torch.float32
        # c_sqnorm, c_norm, c_resid, count, rows, packed, status
        self.scratch_specs = [((k,), f32), ((k,), f32), ((k,), f32), ((1,), torch.int32), ((n,), torch.int32),
                              ((n,), torch.int64), ((n,), torch.int8)]
        scale = tolerance_scale * _BOUND_SLACK
        self.errors = (2.0 * scale, 2.0 * scale * d * 2.0**-22, scale * d * 2.0**-23, scale * d * 2.0**-126)
        # The blocks of code_sqnorms: the same summation order, so the search of listed rows sees the
        # very norms that the plain fp32 search (precision="ieee") sees.
        block_d, block_k = _sqnorm_blocks(d)
        self.norms = PreparedLaunch(_code_norms_kernel, (cdiv(k, block_k),),
                                    (k, d, d * 2.0**-126, codebook.stride(0), codebook.stride(1)),
                                    dict(BLOCK_K=block_k, BLOCK_D=block_d))


# The tensors of one search pass, in the order _SearchPlan.__call__ gathers them, and the search and
# reduce kernels' tensor parameters, in their order.
_PASS_TENSORS = ("z", "codebook", "c_sqnorm", "indices", "distances", "scores", "part_index", "second", "second_index",
                 "third", "upper", "c_norm", "c_resid", "status", "count", "row_list", "packed")
_SEARCH_TENSORS = ("z", "codebook", "c_sqnorm", "c_norm", "c_resid", "scores", "part_index", "distances", "second",
                   "second_index", "third", "upper", "status", "count", "row_list", "packed")
_REDUCE_TENSORS = ("scores", "part_index", "second", "second_index", "third", "upper", "z", "codebook", "indices",
                   "distances", "status", "count", "row_list", "packed")


class _SearchPlan:
    """One search pass for one problem (shapes, strides, dtypes, device, precision, splits): the
    launch arithmetic, done once; calling it allocates the outputs and launches (see ``_search``)."""

    def __init__(self, z: torch.Tensor, codebook: torch.Tensor, input_precision: str, num_splits: int | None,
                 errors: tuple[float, float, float, float] | None):
        n, d = z.shape
        k = codebook.shape[0]
        device = z.device
        max_single_d = _MAX_SINGLE_D[z.dtype]
        if z.dtype == torch.float32 and input_precision == "ieee":
            max_single_d = _MAX_SINGLE_D_IEEE_FP32
        single_d = d <= max_single_d
        block_d = max(16, next_power_of_2(d)) if single_d else _LOOP_BLOCK_D
        interp = interpreting()
        nominal_block_n = _INTERPRETER_CONFIG["BLOCK_N"] if interp else 128
        splits = num_splits if num_splits is not None else _choose_splits(n, k, nominal_block_n, device)
        codes_per_split, splits = _split_codes(k, splits, interp)
        checking = errors is not None
        from vqfast.kernels import nearest_tma

        # The opt-in TMA and warp-specialised kernel (nearest_tma.py). Its tf32 pass always leaves the
        # settling of rows to the reduction kernel, even with one split: Triton 3.6 cannot specialise
        # the warps of a kernel whose epilogue appends to the list of rows.
        use_tma = nearest_tma.suits(z, codebook, input_precision, checking)
        write_distance = splits == 1 and not (use_tma and checking)
        self.n, self.splits, self.write_distance, self.checking = n, splits, write_distance, checking
        # The split winners: scores, part_index, then with the re-check second, second_index, third, upper.
        shape = (n, splits)
        specs = [] if write_distance else [(shape, torch.float32), (shape, torch.int64)]
        if specs and checking:
            specs += [(shape, torch.float32), (shape, torch.int32), (shape, torch.float32), (shape, torch.float32)]
        self.scratch_specs = specs

        # Stand-ins for pointers a variant never touches: c_sqnorm, except ``count_ptr`` without the
        # re-check: the autotuner zeroes it before each timing run (the tf32 pass appends to a list), so
        # it gets an output that the kernel then overwrites in full.
        stand_in = {}
        if write_distance:
            stand_in.update(scores="c_sqnorm", part_index="indices", second="c_sqnorm", second_index="c_sqnorm",
                            third="c_sqnorm", upper="c_sqnorm")
        elif not checking:
            stand_in.update(second="c_sqnorm", second_index="c_sqnorm", third="c_sqnorm", upper="c_sqnorm")
        if not checking:
            stand_in.update(c_norm="c_sqnorm", c_resid="c_sqnorm", status="c_sqnorm", row_list="c_sqnorm",
                            packed="c_sqnorm", count=stand_in.get("part_index", "part_index"))
        present = [name for name in _PASS_TENSORS if name not in stand_in]

        def layout(names: tuple[str, ...]) -> list[int]:
            return [present.index(stand_in.get(name, name)) for name in names]

        err_resid, err_dot, err_norm, err_tiny = errors if checking else (0.0,) * 4
        scalars = (n, k, d, codes_per_split, next_power_of_2(n), err_resid, err_dot, err_norm, err_tiny,
                   z.stride(0), z.stride(1), codebook.stride(0), codebook.stride(1), 0 if write_distance else splits)
        dist_block_d = min(_DIST_BLOCK_D, max(16, next_power_of_2(d)))
        meta = dict(BLOCK_D=block_d, DIST_BLOCK_D=dist_block_d, SINGLE_D=single_d, INPUT_PRECISION=input_precision,
                    WRITE_DISTANCE=write_distance, RECHECK=checking,
                    # Unmasked whole tiles (see _scan_codes).
                    K_ALIGN=_power_of_two_dividing(k, codes_per_split),
                    EVEN_D=single_d and d == block_d)
        if interp:
            grid = (cdiv(n, _INTERPRETER_CONFIG["BLOCK_N"]), splits)
            kernel = _nearest_code_kernel
            meta.update(_INTERPRETER_CONFIG)
        elif not autotuning():
            cfg = _first_config(input_precision, block_d, single_d, z.element_size(), _shared_memory_for_tiles(checking))
            grid = (cdiv(n, cfg.kwargs["BLOCK_N"]), splits)
            kernel = _nearest_code_kernel
            meta.update(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        else:
            grid = lambda cfg: (cdiv(n, cfg["BLOCK_N"]), splits)  # noqa: E731
            kernel = _nearest_code_autotuned
            if checking and z.dtype == torch.float32 and max_single_d < d <= _WIDE_TF32_MAX_D:
                kernel = _nearest_code_wide_tf32_autotuned
                del meta["SINGLE_D"], meta["BLOCK_D"]
                meta["EVEN_D"] = d == _WIDE_TF32_MAX_D  # (read by whole-D candidates only)
        self.tuner = kernel if kernel is not _nearest_code_kernel else None
        self.search = PreparedLaunch(kernel, grid, scalars, meta, layout(_SEARCH_TENSORS))
        self.tma = None
        if use_tma:
            # (Calls whose inputs TMA cannot read at their addresses take the kernel above.)
            self.tma = nearest_tma.TmaSearch(
                z, codebook, splits, scalars,
                dict(DIST_BLOCK_D=dist_block_d, WRITE_DISTANCE=write_distance, RECHECK=checking,
                     K_ALIGN=_power_of_two_dividing(k, codes_per_split)),
                layout(_SEARCH_TENSORS))

        self.reduce = None
        if not write_distance:
            block_s = next_power_of_2(splits)
            # Few rows per program: with splits there are few rows in all, and the distance epilogue's
            # gather wants many programs in flight more than wide ones.
            block_n = max(1, min(32, 4096 // block_s))
            self.reduce = PreparedLaunch(
                _reduce_splits_kernel, (cdiv(n, block_n),),
                (n, splits, k, d, z.stride(0), z.stride(1), codebook.stride(0), codebook.stride(1)),
                dict(BLOCK_N=block_n, BLOCK_S=block_s, DIST_BLOCK_D=dist_block_d, RECHECK=checking),
                layout(_REDUCE_TENSORS))

    def __call__(self, z: torch.Tensor, codebook: torch.Tensor, c_sqnorm: torch.Tensor,
                 recheck: _Recheck | None, scratch: Sequence[torch.Tensor] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.n
        device = z.device
        indices = torch.empty(n, dtype=torch.int64, device=device)
        distances = torch.empty(n, dtype=torch.float32, device=device)
        tensors = [z, codebook, c_sqnorm, indices, distances]
        if not self.write_distance:
            tensors += scratch if scratch is not None else fresh_buffers(self.scratch_specs, device)
        if self.checking:
            tensors += (recheck.c_norm, recheck.c_resid, recheck.status, recheck.count, recheck.rows, recheck.packed)
        global _last_search_autotuner
        if self.tma is not None and nearest_tma_aligned(z, codebook):
            _last_search_autotuner = self.tma.tuner
            self.tma(tensors)
        else:
            _last_search_autotuner = self.tuner
            self.search(*tensors)
        if self.reduce is not None:
            self.reduce(*tensors)
        return indices, distances


def _search(z: torch.Tensor, codebook: torch.Tensor, c_sqnorm: torch.Tensor, input_precision: str,
            num_splits: int | None, recheck: _Recheck | None = None,
            plan: _SearchPlan | None = None, scratch: Sequence[torch.Tensor] | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """One search pass: ``(indices, distances)``. With ``recheck`` (tf32 products) it also settles the
    rows the tf32 scores leave in doubt, or lists them in ``recheck`` for ``_research_listed_rows``.
    ``plan``: this problem's ``_SearchPlan``, if the caller holds it; ``scratch``: its split buffers
    (``plan.scratch_specs``; fresh ones when None)."""
    if plan is None:
        plan = _SearchPlan(z, codebook, input_precision, num_splits, None if recheck is None else recheck.errors)
    return plan(z, codebook, c_sqnorm, recheck, scratch)


class _ResearchPlan:
    """The two launches of ``_research_listed_rows`` for one problem, with ``products`` "ieee" or
    "tf32x3" (Triton's input precision)."""

    def __init__(self, z: torch.Tensor, codebook: torch.Tensor, products: str = "ieee"):
        n, d = z.shape
        k = codebook.shape[0]
        interp = interpreting()
        self.products = products
        single_d = d <= (_MAX_SINGLE_D_IEEE_FP32 if products == "ieee" else _MAX_SINGLE_D_TF32X3)
        block_d = max(16, next_power_of_2(d)) if single_d else _LOOP_BLOCK_D
        if interp:
            cfg = dict(_INTERPRETER_CONFIG)
            options = {}
        else:
            # Not autotuned: its work depends on how many rows the data lists, so timings from one call's
            # list would say little about the next call's.
            first = _first_config(products, block_d, single_d, z.element_size(), max_shared_memory())
            cfg = dict(first.kwargs)
            options = dict(num_warps=first.num_warps, num_stages=first.num_stages)
        # Minima with indices per tile (SLOTS False in the kernel): tf32x3 products already take ~254
        # registers when D is looped over, with no room for slot-wise minima, and the listed rows are few
        # (and slots are for tensor-core products only).
        cfg.pop("SLOTS", None)
        cfg.pop("PIPELINE", None)
        # (Under the interpreter, where every program runs in turn, 3 splits still exercise the merge.)
        codes_per_split, splits = _split_codes(k, 3 if interp else _MAX_RESEARCH_SPLITS, interp)
        programs = max(1, min(cdiv(n, cfg["BLOCK_N"]), cdiv(2 * multiprocessor_count(z.device), splits)))
        self.research = PreparedLaunch(
            _research_listed_rows_kernel, (programs, splits),
            (k, d, codes_per_split, z.stride(0), z.stride(1), codebook.stride(0), codebook.stride(1)),
            dict(BLOCK_D=block_d, SINGLE_D=single_d, INPUT_PRECISION=products, **cfg, **options))
        block_n = 32
        programs = max(1, min(cdiv(n, block_n), 2 * multiprocessor_count(z.device)))
        self.write = PreparedLaunch(
            _write_listed_rows_kernel, (programs,),
            (d, z.stride(0), z.stride(1), codebook.stride(0), codebook.stride(1)),
            dict(BLOCK_N=block_n, DIST_BLOCK_D=min(_DIST_BLOCK_D, max(16, next_power_of_2(d)))))


def _research_listed_rows(z: torch.Tensor, codebook: torch.Tensor, recheck: _Recheck,
                          indices: torch.Tensor, distances: torch.Tensor, plan: _ResearchPlan | None = None) -> None:
    """fp32 search (fp32 products unless ``plan`` says tf32x3, see ``_RESEARCH_PRECISION``) of the rows
    ``recheck`` lists, written into ``indices`` and ``distances`` in place; two launches whatever the
    list's length, no host synchronisation."""
    if plan is None:
        plan = _ResearchPlan(z, codebook)
    plan.research(z, codebook, recheck.c_sqnorm, recheck.count, recheck.rows, recheck.packed)
    plan.write(z, codebook, recheck.count, recheck.rows, recheck.packed, indices, distances)


@resolves_negative_views
def nearest_code(
    z: torch.Tensor,
    codebook: torch.Tensor,
    precision: str | None = None,
    num_splits: int | None = None,
    tie_tolerance_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codebook row (squared L2) for each row of ``z`` (N, D): ``(indices int64, distances fp32)``.

    Equivalent to ``d = torch.cdist(z, codebook) ** 2; i = d.argmin(1); (i, d[arange(N), i])`` without
    building ``d``. ``precision`` (fp32 inputs only; default ``torch.get_float32_matmul_precision()``):
    every mode but "ieee" scores the codes with tf32 tensor-core products and checks each row against a
    bound on their error: a row with two codes in doubt is decided between them by the direct form
    ``||z - c||^2`` in fp32, and a row with three or more is searched again, with full fp32 products
    for "highest" and with fp32-accurate tf32x3 products for "high"/"medium" (on the CPU interpreter:
    fp32 for both), so the indices are those of an fp32 search. "ieee" scores every code with fp32
    products on the CUDA cores (several times slower; what the others are checked against). ``num_splits``
    forces the number of codebook splits (default: chosen from the problem size and the GPU; at most
    1,024).
    ``tie_tolerance_scale`` multiplies the error bound (for tests).
    """
    indices, distances, _ = _nearest_code_with_status(z, codebook, precision, num_splits, tie_tolerance_scale,
                                                      want_status=False)
    return indices, distances


class _Plan:
    """Everything a search computes from its problem before allocating and launching: the checks'
    verdict (a plan exists only for inputs that passed them), whether an input is copied first
    (``int32_safe_columns``), and the plans of the passes."""

    def __init__(self, z: torch.Tensor, codebook: torch.Tensor, precision: str, num_splits: int | None,
                 tie_tolerance_scale: float):
        check_rows_and_codes(z, codebook)
        if num_splits is not None and (type(num_splits) is not int or num_splits < 1):
            raise ValueError(f"num_splits must be None or a Python int >= 1, got {num_splits!r}")
        # A negative scale would turn the error bound around: rows in doubt would never be re-checked.
        if (isinstance(tie_tolerance_scale, bool) or not isinstance(tie_tolerance_scale, (int, float))
                or not math.isfinite(tie_tolerance_scale) or tie_tolerance_scale < 0):
            raise ValueError(f"tie_tolerance_scale must be a finite number >= 0, got {tie_tolerance_scale!r}")
        safe_z, safe_codebook = int32_safe_columns(z), int32_safe_columns(codebook)
        self.copy_z, self.copy_codebook = safe_z is not z, safe_codebook is not codebook
        z, codebook = safe_z, safe_codebook
        self.input_precision = _input_precision(z.dtype, precision)
        self.empty = z.shape[0] == 0
        self.checking = z.dtype == torch.float32 and self.input_precision == "tf32"
        if self.empty:
            return
        if self.checking:
            self.recheck = _RecheckPlan(z, codebook, tie_tolerance_scale)
            self.search = _SearchPlan(z, codebook, "tf32", num_splits, self.recheck.errors)
            self.research = _ResearchPlan(z, codebook, _RESEARCH_PRECISION[precision])
            first = self.recheck.scratch_specs
        else:
            k, d = codebook.shape
            self.sqnorms = _sqnorm_launch(k, d, codebook.stride(0), codebook.stride(1), interpreting())
            first = [((k,), torch.float32)]  # c_sqnorm
            self.search = _SearchPlan(z, codebook, self.input_precision, num_splits, None)
        # Every scratch buffer of a call: the re-check's (or the codebook norms), then the split winners.
        self.scratch = KeptBuffers([*first, *self.search.scratch_specs])
        self.first_scratch = len(first)


# Plans by problem: a small search is bound by host time, and the checks and launch arithmetic of a
# problem give the same answer on every call.
_PLANS = PlanCache()


def _plan_key(z: torch.Tensor, codebook: torch.Tensor, precision: str, num_splits: int | None,
              tie_tolerance_scale: float) -> tuple:
    """What a ``_Plan`` is computed from: the inputs' shapes, strides, dtypes and devices, the
    arguments, the switches it reads (autotuning, the interpreter's configuration, the row limit, which
    tests lower) and, for the shared memory a configuration may use, Triton's driver and device."""
    if interpreting():
        where = tuple(_INTERPRETER_CONFIG.items())
    else:
        driver = triton.runtime.driver.active
        where = (driver, driver.get_current_device())
    return (z.shape, z.stride(), codebook.shape, codebook.stride(), z.dtype, codebook.dtype, z.device,
            # (The arguments' types too: True == 1 and 2.0 == 2, which the plan's checks refuse.)
            codebook.device, precision, num_splits, type(num_splits), tie_tolerance_scale, type(tie_tolerance_scale),
            autotuning(), _common.MAX_ROWS, where, tma_search_enabled())


def tma_search_enabled() -> bool:
    """``VQFAST_TMA_SEARCH=1``: search passes that suit it (16-bit rows, the tf32 pass of fp32 rows)
    run the TMA, warp-specialised kernel of ``nearest_tma.py``."""
    return env_switch("VQFAST_TMA_SEARCH", False)


def nearest_tma_aligned(z: torch.Tensor, codebook: torch.Tensor) -> bool:
    """TMA reads from 16-byte aligned addresses only: checked per call (a view may start anywhere)."""
    return z.data_ptr() % 16 == 0 and codebook.data_ptr() % 16 == 0


@resolves_negative_views
def _nearest_code_with_status(z: torch.Tensor, codebook: torch.Tensor, precision: str | None = None,
                              num_splits: int | None = None, tie_tolerance_scale: float = 1.0,
                              want_status: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`nearest_code`, and for the tf32 search the int8 status of each row (see ``_Recheck``; with
    ``want_status=False`` the status goes to a scratch buffer and None is returned)."""
    if precision is None:
        precision = torch.get_float32_matmul_precision()
    try:
        key = _plan_key(z, codebook, precision, num_splits, tie_tolerance_scale)
        plan = _PLANS.get(key)
    except Exception:  # not tensors, or an unhashable argument: _Plan's checks say what is wrong
        key = plan = None
    if plan is None:
        plan = _Plan(z, codebook, precision, num_splits, tie_tolerance_scale)
        if key is not None:
            _PLANS.add(key, plan)
    if plan.copy_z:
        z = z.contiguous()
    if plan.copy_codebook:
        codebook = codebook.contiguous()
    if plan.empty:
        global _last_search_autotuner
        _last_search_autotuner = None  # no pass ran: no tile to report
        return (torch.empty(0, dtype=torch.int64, device=z.device),
                torch.empty(0, dtype=torch.float32, device=z.device), None)
    scratch, token = plan.scratch.take(codebook.device)
    try:
        first, splits = scratch[:plan.first_scratch], scratch[plan.first_scratch:]
        if not plan.checking:
            (c_sqnorm,) = first
            plan.sqnorms(codebook, c_sqnorm)
            return (*_search(z, codebook, c_sqnorm, plan.input_precision, num_splits, plan=plan.search,
                             scratch=splits), None)
        recheck = _Recheck(z, codebook, tie_tolerance_scale, plan.recheck, first, fresh_status=want_status)
        indices, distances = _search(z, codebook, recheck.c_sqnorm, "tf32", num_splits, recheck, plan=plan.search,
                                     scratch=splits)
        _research_listed_rows(z, codebook, recheck, indices, distances, plan=plan.research)
        return indices, distances, (recheck.status if want_status else None)
    finally:
        # Every kernel of this call is launched: the next call on this stream runs after them.
        plan.scratch.give_back(token, scratch)
