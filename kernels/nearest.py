"""Fused nearest-code search: squared distances and a running argmin, never writing the N x K matrix.

For a block of BLOCK_N rows of z, a program streams the codebook in (BLOCK_D x BLOCK_K) tiles, forms
||c||^2 - 2 z.c on the tensor cores (fp32 accumulation) and keeps the best (score, index) per row in
registers. When there are few row blocks (few rows, many codes), the codebook is split across
programs and a second small kernel reduces the per-split winners. The fp32 search with tf32 products
flags, in the same kernels, the rows whose two best codes are closer than the tf32 error bound, and a
second pass searches only those rows' blocks again with fp32 products, writing in place: a handful of
launches and no host synchronisation, which is what small (latency-bound) problems need. The
distance of the chosen code is then summed directly, ||z - c||^2, by whichever kernel writes the
index (the search, or the reduction of the splits).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from vqfast.kernels._common import (
    autotuning, cdiv, check_rows_and_codes, code_sqnorms, int32_safe_columns, interpreting, max_shared_memory,
    multiprocessor_count, next_power_of_2,
)

# Largest D kept whole in registers for a row block; larger D loops over BLOCK_D slices. Exact fp32
# (CUDA-core FMA products) keeps slices small.
_MAX_SINGLE_D = {torch.float32: 128, torch.float16: 256, torch.bfloat16: 256}
_MAX_SINGLE_D_IEEE_FP32 = 32
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


# Sizes that change from call to call are not specialised on, so a new batch size reuses the compiled
# kernel instead of compiling (and autotuning) another variant.
@triton.jit(do_not_specialize=["N", "codes_per_split", "N_BUCKET", "stride_sn", "flag_scale"])
def _nearest_code_kernel(
    z_ptr, c_ptr, c_sqnorm_ptr, flag_in_ptr,
    score_ptr, index_ptr, dist_ptr, second_ptr, flag_out_ptr, cmax_ptr,
    N, K, D, codes_per_split, N_BUCKET, flag_scale,
    stride_zn, stride_zd, stride_ck, stride_cd, stride_sn,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DIST_BLOCK_D: tl.constexpr,
    SINGLE_D: tl.constexpr, INPUT_PRECISION: tl.constexpr, WRITE_DISTANCE: tl.constexpr,
    TRACK_SECOND: tl.constexpr, HAS_FLAGS: tl.constexpr, WRITE_FLAGS: tl.constexpr,
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
    store_n = mask_n
    if HAS_FLAGS:
        # Re-search of flagged rows only: blocks without one skip the codebook loop, and only flagged
        # rows are written, so no host-side list of rows is needed.
        flags = tl.load(flag_in_ptr + offs_n, mask=mask_n, other=0)
        store_n = mask_n & (flags != 0)
        k_end = tl.where(tl.max(flags, axis=0) > 0, k_end, k_begin)

    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_index = tl.zeros([BLOCK_N], tl.int32) + k_begin
    second = tl.full([BLOCK_N], float("inf"), tl.float32)
    # Largest ||c||^2 among the codes seen, for the tf32 error bound.
    c_max = tl.zeros([BLOCK_K], tl.float32)

    if SINGLE_D:
        # Rows that are not stored (unflagged ones in a re-search) are not read either.
        z_block = tl.load(z_rows + offs_d[None, :] * stride_zd,
                          mask=store_n[:, None] & (offs_d[None, :] < D), other=0.0)
    # ||z||^2 only scales the tf32 error bound: the distances come from the epilogue below.
    z_sqnorm = tl.zeros([BLOCK_N], tl.float32)
    if WRITE_FLAGS and SINGLE_D:
        z_f32 = z_block.to(tl.float32)
        z_sqnorm = tl.sum(z_f32 * z_f32, axis=1)
    elif WRITE_FLAGS:
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            zt = tl.load(z_rows + dd[None, :] * stride_zd, mask=store_n[:, None] & (dd[None, :] < D),
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
                             mask=store_n[:, None] & (dd[None, :] < D), other=0.0)
                ct = tl.load(c_cols + dd[:, None] * stride_cd,
                             mask=mask_k[None, :] & (dd[:, None] < D), other=0.0)
                acc = tl.dot(zt, ct, acc, input_precision=INPUT_PRECISION)
        # Padding codes get +inf so they never win.
        c_sqnorm = tl.load(c_sqnorm_ptr + offs_k, mask=mask_k, other=float("inf"))
        if WRITE_FLAGS:
            c_max = tl.maximum(c_max, tl.where(mask_k, c_sqnorm, 0.0))
        score = c_sqnorm[None, :] - 2.0 * acc
        # NaN never wins: a row whose scores are all NaN keeps a valid index.
        score = tl.where(score == score, score, float("inf"))
        tile_best, tile_arg = tl.min(score, axis=1, return_indices=True, return_indices_tie_break_left=True)
        tile_arg = tile_arg.to(tl.int32)
        tile_index = tile_arg + k0
        if TRACK_SECOND:
            # Runner-up score, so reduced-precision searches can spot rows whose winner is uncertain.
            cols = tl.arange(0, BLOCK_K)
            others = tl.where(cols[None, :] == tile_arg[:, None], float("inf"), score)
            second = tl.minimum(tl.minimum(second, tl.min(others, axis=1)), tl.maximum(best, tile_best))
        # Strict '<' across tiles keeps the lowest index on ties, since tiles go in increasing order.
        improved = tile_best < best
        best_index = tl.where(improved, tile_index, best_index)
        best = tl.where(improved, tile_best, best)

    if WRITE_DISTANCE:
        dist = _chosen_code_sqdist(z_rows, stride_zd, c_ptr, stride_ck, stride_cd, best_index, store_n, D,
                                   BLOCK_N, DIST_BLOCK_D)
        tl.store(dist_ptr + offs_n, dist, mask=store_n)
        tl.store(index_ptr + offs_n, best_index.to(tl.int64), mask=store_n)
        if TRACK_SECOND:
            tl.store(second_ptr + offs_n, second, mask=mask_n)
        if WRITE_FLAGS:
            bound = flag_scale * tl.sqrt(z_sqnorm) * tl.sqrt(tl.max(c_max, axis=0))
            tl.store(flag_out_ptr + offs_n, ((second - best) <= bound).to(tl.int8), mask=mask_n)
    else:
        out = offs_n.to(tl.int64) * stride_sn + pid_s
        tl.store(score_ptr + out, best, mask=mask_n)
        tl.store(index_ptr + out, best_index.to(tl.int64), mask=mask_n)
        if TRACK_SECOND:
            tl.store(second_ptr + out, second, mask=mask_n)
        if WRITE_FLAGS:
            if pid_s == 0:
                tl.store(dist_ptr + offs_n, z_sqnorm, mask=mask_n)
            if pid_n == 0:
                tl.store(cmax_ptr + pid_s, tl.max(c_max, axis=0))


@triton.jit(do_not_specialize=["N", "flag_scale"])
def _reduce_splits_kernel(
    score_ptr, part_index_ptr, second_ptr, zsq_ptr, cmax_ptr, flag_in_ptr, z_ptr, c_ptr,
    index_ptr, dist_ptr, runner_up_ptr, flag_out_ptr,
    N, S, D, flag_scale, stride_zn, stride_zd, stride_ck, stride_cd,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, DIST_BLOCK_D: tl.constexpr,
    TRACK_SECOND: tl.constexpr, HAS_FLAGS: tl.constexpr, WRITE_FLAGS: tl.constexpr,
):
    """Per row, the best of the S per-split winners (splits are in increasing code order and ties go
    to the first, so the lowest index wins), its distance, and optionally the runner-up and the flag."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_s = tl.arange(0, BLOCK_S)
    mask_s = offs_s < S
    rows = offs_n.to(tl.int64) * S
    scores = tl.load(score_ptr + rows[:, None] + offs_s[None, :], mask=mask_n[:, None] & mask_s[None, :],
                     other=float("inf"))
    best, win = tl.min(scores, axis=1, return_indices=True, return_indices_tie_break_left=True)
    win = win.to(tl.int64)
    index = tl.load(part_index_ptr + rows + win, mask=mask_n, other=0)
    store_n = mask_n
    if HAS_FLAGS:
        store_n = mask_n & (tl.load(flag_in_ptr + offs_n, mask=mask_n, other=0) != 0)
    z_rows = z_ptr + offs_n.to(tl.int64)[:, None] * stride_zn
    dist = _chosen_code_sqdist(z_rows, stride_zd, c_ptr, stride_ck, stride_cd, index, store_n, D,
                               BLOCK_N, DIST_BLOCK_D)
    tl.store(index_ptr + offs_n, index, mask=store_n)
    tl.store(dist_ptr + offs_n, dist, mask=store_n)
    if TRACK_SECOND:
        own = tl.load(second_ptr + rows + win, mask=mask_n, other=float("inf"))
        others = tl.where(offs_s[None, :] == win[:, None], float("inf"), scores)
        runner_up = tl.minimum(own, tl.min(others, axis=1))
        tl.store(runner_up_ptr + offs_n, runner_up, mask=mask_n)
        if WRITE_FLAGS:
            z_sqnorm = tl.load(zsq_ptr + offs_n, mask=mask_n, other=0.0)
            c_max = tl.max(tl.load(cmax_ptr + offs_s, mask=mask_s, other=0.0), axis=0)
            bound = flag_scale * tl.sqrt(z_sqnorm) * tl.sqrt(c_max)
            tl.store(flag_out_ptr + offs_n, ((runner_up - best) <= bound).to(tl.int8), mask=mask_n)


def _autotune_configs() -> list[triton.Config]:
    configs = []
    for block_n, block_k, warps, stages in [
        (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (64, 128, 4, 3),
        (64, 64, 4, 4), (128, 64, 4, 3), (64, 256, 8, 3), (128, 128, 8, 2),
    ]:
        configs.append(triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=warps, num_stages=stages))
    return configs


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
                    element_bytes: int, shared_memory_limit: int) -> list[triton.Config]:
    """The autotuning candidates worth compiling for one problem: those that fit in shared memory and,
    for exact fp32 products (CUDA cores, no tensor cores), at most 32 accumulators per thread: larger
    tiles only spill (ptxas reports hundreds of spilled bytes) and add compile time."""
    def fits(c: triton.Config) -> bool:
        need = _shared_memory_bytes(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages, block_d, single_d,
                                    element_bytes)
        return need <= shared_memory_limit

    chosen = [c for c in configs if fits(c)]
    if input_precision == "ieee":
        chosen = [c for c in chosen if c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= 32 * 32 * c.num_warps]
    if chosen:
        return chosen
    fallback = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=st)
                for n, k, w, st in _FALLBACK_CONFIGS]
    return [c for c in fallback if fits(c)][:1] or fallback[-1:]


# Keyed on a power-of-two bucket of N (not N itself), so a ragged last batch reuses the tuned config,
# and on the codebook split (rows in one bucket may get different split counts, which change the
# work per program). The interpreter cannot benchmark, so it runs the plain kernel with a fixed
# configuration.
def _prune_configs(configs, named_args, **kwargs):
    meta = {**named_args, **kwargs}
    return _select_configs(configs, meta["INPUT_PRECISION"], meta["BLOCK_D"], meta["SINGLE_D"],
                           meta["z_ptr"].element_size(), max_shared_memory())


_AUTOTUNE_CONFIGS = _autotune_configs()
_nearest_code_autotuned = triton.autotune(
    configs=_AUTOTUNE_CONFIGS,
    key=["N_BUCKET", "K", "D", "codes_per_split", "SINGLE_D", "INPUT_PRECISION", "WRITE_DISTANCE", "TRACK_SECOND", "HAS_FLAGS",
         "WRITE_FLAGS"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_nearest_code_kernel)

_INTERPRETER_CONFIG = {"BLOCK_N": 16, "BLOCK_K": 32}


@functools.lru_cache(maxsize=None)
def _first_config(input_precision: str, block_d: int, single_d: bool, element_bytes: int,
                  shared_memory_limit: int) -> triton.Config:
    """The first candidate that suits a problem (cached: small searches are bound by host time)."""
    return _select_configs(_AUTOTUNE_CONFIGS, input_precision, block_d, single_d, element_bytes,
                           shared_memory_limit)[0]

# Bound on |tf32 score - exact score| is TF32_ERROR * (1 + D * 2**-13) * ||z|| * max ||c||: tf32 keeps
# 10 mantissa bits (2**-11 relative rounding per operand, 2**-10 if truncated), and the score has a
# factor 2 on z.c. A row whose runner-up is within twice that bound is searched again in fp32.
_TF32_ERROR = 2.0 * 2.0**-9


def _input_precision(dtype: torch.dtype, precision: str) -> str:
    if precision not in ("highest", "ieee", "high", "medium", "tf32"):
        raise ValueError(f"precision must be 'highest', 'high', 'medium' or 'tf32', got {precision!r}")
    if dtype != torch.float32:
        # 16-bit operands: the products are exact either way; "tf32" is Triton's default path for them.
        return "tf32"
    return "ieee" if precision in ("highest", "ieee") else "tf32"


def _choose_splits(n_rows: int, n_codes: int, block_n: int, device: torch.device) -> int:
    row_blocks = cdiv(n_rows, block_n)
    target_programs = 2 * multiprocessor_count(device)
    if row_blocks >= target_programs:
        return 1
    max_splits = cdiv(n_codes, _SPLIT_ALIGN)
    return max(1, min(max_splits, cdiv(target_programs, row_blocks)))


def _search(z: torch.Tensor, codebook: torch.Tensor, c_sqnorm: torch.Tensor, input_precision: str,
            num_splits: int | None, track_second: bool = False, flag_scale: float | None = None,
            flags: torch.Tensor | None = None,
            out: tuple[torch.Tensor, torch.Tensor] | None = None):
    """One search pass: ``(indices, distances, runner_up or None, uncertain or None)``.

    ``track_second``: also the runner-up score per row (the best score ``||c||^2 - 2 z.c`` of any other
    code). ``flag_scale``: also int8 flags of the rows whose runner-up score is within
    ``flag_scale * ||z|| * max ||c||`` of the best one. ``flags`` (int8 (N,)): search only the row
    blocks that hold a flagged row and write only the flagged rows, into ``out = (indices, distances)``
    when given (the other rows are left as they are) or into new tensors (the other rows undefined).
    """
    if flags is not None and flag_scale is not None:
        raise ValueError("a re-search of flagged rows cannot flag rows itself")
    n, d = z.shape
    k = codebook.shape[0]
    device = z.device
    write_flags = flag_scale is not None
    track_second = track_second or write_flags
    if out is not None:
        indices, distances = out
    else:
        indices = torch.empty(n, dtype=torch.int64, device=device)
        distances = torch.empty(n, dtype=torch.float32, device=device)
    max_single_d = _MAX_SINGLE_D[z.dtype]
    if z.dtype == torch.float32 and input_precision == "ieee":
        max_single_d = _MAX_SINGLE_D_IEEE_FP32
    single_d = d <= max_single_d
    block_d = max(16, next_power_of_2(d)) if single_d else _LOOP_BLOCK_D
    interp = interpreting()
    nominal_block_n = _INTERPRETER_CONFIG["BLOCK_N"] if interp else 128
    splits = num_splits if num_splits is not None else _choose_splits(n, k, nominal_block_n, device)
    splits = max(1, min(int(splits), k, _MAX_SPLITS))
    align = 1 if interp else _SPLIT_ALIGN
    codes_per_split = cdiv(cdiv(k, splits), align) * align
    splits = cdiv(k, codes_per_split)
    write_distance = splits == 1

    runner_up = torch.empty(n, dtype=torch.float32, device=device) if track_second else None
    uncertain = torch.empty(n, dtype=torch.int8, device=device) if write_flags else None
    unused = c_sqnorm  # stands in for pointers a variant never touches
    if write_distance:
        scores, part_index, second, stride_sn = unused, indices, runner_up, 0
        z_sqnorm = distances  # the kernel writes the distances themselves here
        cmax = unused
    else:
        scores = torch.empty((n, splits), dtype=torch.float32, device=device)
        part_index = torch.empty((n, splits), dtype=torch.int64, device=device)
        second = torch.empty((n, splits), dtype=torch.float32, device=device) if track_second else None
        stride_sn = splits
        # Row norms, for the flags' error bound only (a re-search of flagged rows never writes flags).
        # Their own buffer: the reduction stores distances while other threads may still read norms.
        z_sqnorm = torch.empty(n, dtype=torch.float32, device=device) if write_flags else unused
        cmax = torch.empty(splits, dtype=torch.float32, device=device) if write_flags else unused

    args = (
        z, codebook, c_sqnorm, flags if flags is not None else unused,
        scores, part_index, z_sqnorm, second if second is not None else unused,
        uncertain if uncertain is not None else unused, cmax,
        n, k, d, codes_per_split, next_power_of_2(n), float(flag_scale or 0.0),
        z.stride(0), z.stride(1), codebook.stride(0), codebook.stride(1), stride_sn,
    )
    dist_block_d = min(_DIST_BLOCK_D, max(16, next_power_of_2(d)))
    meta = dict(BLOCK_D=block_d, DIST_BLOCK_D=dist_block_d, SINGLE_D=single_d, INPUT_PRECISION=input_precision,
                WRITE_DISTANCE=write_distance, TRACK_SECOND=track_second, HAS_FLAGS=flags is not None,
                WRITE_FLAGS=write_flags)
    if interp:
        grid = (cdiv(n, _INTERPRETER_CONFIG["BLOCK_N"]), splits)
        _nearest_code_kernel[grid](*args, **meta, **_INTERPRETER_CONFIG)
    elif not autotuning() or flags is not None:
        # The first candidate that suits this problem, without timing the others. A re-search of
        # flagged rows is not autotuned either: its work depends on how many rows the data flags, so
        # timings from one call's flags would say little about the next call's.
        cfg = _first_config(input_precision, block_d, single_d, z.element_size(), max_shared_memory())
        grid = (cdiv(n, cfg.kwargs["BLOCK_N"]), splits)
        _nearest_code_kernel[grid](*args, **meta, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        grid = lambda cfg: (cdiv(n, cfg["BLOCK_N"]), splits)  # noqa: E731
        _nearest_code_autotuned[grid](*args, **meta)

    if not write_distance:
        block_s = next_power_of_2(splits)
        # Few rows per program: with splits there are few rows in all, and the distance epilogue's
        # gather wants many programs in flight more than wide ones.
        block_n = max(1, min(32, 4096 // block_s))
        _reduce_splits_kernel[(cdiv(n, block_n),)](
            scores, part_index, second if second is not None else unused, z_sqnorm, cmax,
            flags if flags is not None else unused, z, codebook,
            indices, distances, runner_up if runner_up is not None else unused,
            uncertain if uncertain is not None else unused,
            n, splits, d, float(flag_scale or 0.0),
            z.stride(0), z.stride(1), codebook.stride(0), codebook.stride(1),
            BLOCK_N=block_n, BLOCK_S=block_s, DIST_BLOCK_D=dist_block_d, TRACK_SECOND=track_second, HAS_FLAGS=flags is not None,
            WRITE_FLAGS=write_flags)
    return indices, distances, runner_up, uncertain


def nearest_code(
    z: torch.Tensor,
    codebook: torch.Tensor,
    precision: str | None = None,
    num_splits: int | None = None,
    tie_tolerance_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codebook row (squared L2) for each row of ``z`` (N, D): ``(indices int64, distances fp32)``.

    Equivalent to ``d = torch.cdist(z, codebook) ** 2; i = d.argmin(1); (i, d[arange(N), i])`` without
    building ``d``. ``precision`` (fp32 inputs only): "highest" = full fp32 products; "high"/"medium" =
    tf32 tensor cores, after which rows whose two best codes lie within the tf32 error bound are
    searched again in fp32, so the indices equal the "highest" ones. Default:
    ``torch.get_float32_matmul_precision()``. ``num_splits`` forces the number of codebook splits
    (default: chosen from the problem size and the GPU; at most 1,024). ``tie_tolerance_scale`` multiplies the
    re-search bound (for tests).
    """
    check_rows_and_codes(z, codebook)
    z, codebook = int32_safe_columns(z), int32_safe_columns(codebook)
    n, d = z.shape
    if precision is None:
        precision = torch.get_float32_matmul_precision()
    input_precision = _input_precision(z.dtype, precision)
    if n == 0:
        return (torch.empty(0, dtype=torch.int64, device=z.device),
                torch.empty(0, dtype=torch.float32, device=z.device))
    c_sqnorm = code_sqnorms(codebook)
    if not (z.dtype == torch.float32 and input_precision == "tf32"):
        return _search(z, codebook, c_sqnorm, input_precision, num_splits)[:2]
    # tf32 pass that also flags rows whose runner-up is within twice the error bound, then an fp32
    # pass over the flagged rows' blocks that overwrites just those rows: no host sync, no merge.
    flag_scale = 2.0 * _TF32_ERROR * tie_tolerance_scale * (1.0 + d * 2.0**-13)
    indices, distances, _, uncertain = _search(z, codebook, c_sqnorm, "tf32", num_splits, flag_scale=flag_scale)
    _search(z, codebook, c_sqnorm, "ieee", num_splits, flags=uncertain, out=(indices, distances))
    return indices, distances
