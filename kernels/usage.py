"""Code usage: histogram of indices, then entropy and perplexity, all on the device."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from vqfast.kernels._common import (
    LaunchConfig, check_code_count, PlanCache, RowLaunches, cdiv, check_launchable, check_row_indices, interpreting, next_power_of_2,
    STREAMING_MIN_BYTES, scratch_trial, tuned_config, with_streaming_twins, resolves_negative_views,
)
from vqfast.kernels._launch import PreparedLaunch


@triton.jit
def _bincount_kernel(index_ptr, dist_ptr, counts_ptr, N, K, FINITE_ONLY: tl.constexpr, BLOCK: tl.constexpr,
                     STREAM: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    # (STREAM: the indices pass through once; the histogram, where the atomics land, stays in L2.)
    idx = tl.load(index_ptr + offs, mask=mask, other=0, eviction_policy="evict_first" if STREAM else "").to(tl.int64)
    # Unchecked indices outside [0, K) are not counted rather than written outside the histogram.
    mask = mask & (idx >= 0) & (idx < K)
    if FINITE_ONLY:
        # A NaN or inf distance marks a row holding NaN or inf; FLT_MAX also excludes NaN.
        dist = tl.load(dist_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first" if STREAM else "")
        mask = mask & (tl.abs(dist) <= 3.4028234663852886e38)
    tl.atomic_add(counts_ptr + idx, tl.full([BLOCK], 1, tl.int64), mask=mask, sem="relaxed")
    if FINITE_ONLY:
        # One atomic per program for the total: one per row would all collide on a single address.
        tl.atomic_add(counts_ptr + K, tl.sum(mask.to(tl.int64), axis=0), sem="relaxed")


@triton.jit
def _entropy_kernel(counts_ptr, ticket_ptr, partial_ptr, out_ptr, K, BLOCK: tl.constexpr,
                    PARTIAL_BLOCK: tl.constexpr):
    """Entropy and perplexity of the histogram ``counts`` (K,), by every program over its block of codes,
    with the formula H = (n log n - sum c log c) / n: each program writes its block's n and sum c log c
    (float64), and the last program to finish (a ticket taken with an atomic, zeroed by the caller)
    adds them up in program order, so the result does not depend on which programs finish first. A
    histogram with one used code gives exactly 0: its one term is n log n, computed as the total's."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # (K may pass 2**31 - BLOCK)
    c = tl.load(counts_ptr + offs, mask=offs < K, other=0).to(tl.float64)
    # c log c is 0 for c in {0, 1}; log is taken of 1 there.
    c_log_c = tl.where(c > 1.0, c * tl.log(tl.where(c > 1.0, c, 1.0)), 0.0)
    tl.store(partial_ptr + 2 * pid, tl.sum(c, axis=0))
    tl.store(partial_ptr + 2 * pid + 1, tl.sum(c_log_c, axis=0))
    # acq_rel: this program's partials are visible to whichever program takes the last ticket, and that
    # one sees every other program's.
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
    programs = tl.num_programs(0)
    if ticket == programs - 1:
        n = tl.zeros([PARTIAL_BLOCK], tl.float64)
        total = tl.zeros([PARTIAL_BLOCK], tl.float64)
        for p0 in range(0, programs, PARTIAL_BLOCK):
            p = p0 + tl.arange(0, PARTIAL_BLOCK)
            n += tl.load(partial_ptr + 2 * p, mask=p < programs, other=0.0)
            total += tl.load(partial_ptr + 2 * p + 1, mask=p < programs, other=0.0)
        n_all = tl.sum(n, axis=0)
        n_log_n = tl.where(n_all > 1.0, n_all * tl.log(tl.where(n_all > 1.0, n_all, 1.0)), 0.0)
        entropy = tl.maximum((n_log_n - tl.sum(total, axis=0)) / tl.maximum(n_all, 1.0), 0.0).to(tl.float32)
        tl.store(out_ptr, entropy)
        tl.store(out_ptr + 1, tl.exp(entropy))


@resolves_negative_views
def bincount(indices: torch.Tensor, num_codes: int) -> torch.Tensor:
    """``torch.bincount(indices, minlength=num_codes)`` (int64) of 1-D ``indices``, with a fixed output
    length. Callers check the indices; one outside [0, num_codes) is not counted."""
    return _count(indices, None, num_codes)[:num_codes]


@resolves_negative_views
def finite_row_counts(indices: torch.Tensor, distances: torch.Tensor, num_codes: int) -> torch.Tensor:
    """Code counts of the rows whose search distance is finite, then their number: int64 (K + 1,).

    ``ok = distances.isfinite(); torch.cat([torch.bincount(indices[ok], minlength=K), ok.sum()[None]])``
    (indices outside [0, K) are not counted). A row holding NaN or inf has a NaN or inf distance, so
    this leaves such rows out of the usage statistics without another pass over the rows.
    """
    if distances.shape != indices.shape or distances.dtype != torch.float32 or distances.device != indices.device:
        raise ValueError(f"distances must be float32 shaped like indices {tuple(indices.shape)} on {indices.device}, "
                         f"got {distances.dtype} {tuple(distances.shape)} on {distances.device}")
    return _count(indices, distances.contiguous(), num_codes)


def _count(indices: torch.Tensor, distances: torch.Tensor | None, num_codes: int) -> torch.Tensor:
    check_code_count(num_codes)
    check_launchable(indices)
    check_row_indices(indices, None, indices.device)
    finite_only = distances is not None
    key = (indices.shape, indices.dtype, num_codes, type(num_codes), finite_only, indices.device, interpreting())
    plan = _COUNT_PLANS.get(key)
    if plan is None:
        plan = _COUNT_PLANS.add(key, _CountPlan(indices, num_codes, finite_only))
    indices = indices.contiguous()  # the kernel reads indices with unit stride
    counts = torch.zeros(plan.length, dtype=torch.int64, device=indices.device)
    launches = plan.launches
    if launches is not None:
        def launch(cfg: LaunchConfig, into: torch.Tensor = counts) -> None:
            launches[cfg](indices, distances if finite_only else indices, into)

        launch(tuned_config(plan.tune_key, plan.configs, scratch_trial(launch, counts)))
    return counts


class _CountPlan:
    """What ``_count`` computes from its problem (see ``PlanCache``)."""

    def __init__(self, indices: torch.Tensor, num_codes: int, finite_only: bool):
        n = indices.shape[0]
        # One slot more: the number of rows counted (finite_only), or the entropy kernel's ticket.
        self.length = num_codes + 1
        self.launches = None
        if n == 0:
            return
        # (The indices, and the distances with finite_only, pass through once.)
        streamed = n * (indices.element_size() + (4 if finite_only else 0))
        self.configs = _bincount_configs(streamed >= STREAMING_MIN_BYTES)
        # Atomic counts: timing runs count into a scratch histogram. K is in the key: how often atomics
        # collide on one code, and so the best block, depends on it.
        self.tune_key = ("bincount", finite_only, next_power_of_2(n), num_codes, indices.dtype, indices.device,
                         self.configs[-1].stream)
        self.launches = RowLaunches(_bincount_kernel, n, None, (n, num_codes), dict(FINITE_ONLY=finite_only),
                                    block_name="BLOCK")


_COUNT_PLANS = PlanCache()


def _bincount_configs(streaming: bool = False) -> list[LaunchConfig]:
    """Indices per program and warps, with their streaming twins when ``streaming`` (enough indices
    to pass through L2, ``STREAMING_MIN_BYTES``); the first is the fixed choice (128 under the
    interpreter)."""
    if interpreting():
        return [LaunchConfig(128, 4)]
    return list(with_streaming_twins((LaunchConfig(1024, 4), LaunchConfig(512, 4), LaunchConfig(2048, 4),
                                      LaunchConfig(4096, 8), LaunchConfig(1024, 8)), streaming))


@resolves_negative_views
def code_usage(indices: torch.Tensor, num_codes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(counts int64 (K,), entropy fp32 (), perplexity fp32 ())`` of 1-D ``indices`` (values in range).

    Equivalent to ``c = torch.bincount(indices, minlength=K); p = c / c.sum();
    h = -(p * p.log()).nansum(); (c, h, h.exp())``.
    """
    counts, stats = code_usage_stats(indices, num_codes)
    return counts, stats[0], stats[1]


@resolves_negative_views
def code_usage_stats(indices: torch.Tensor, num_codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`code_usage` as ``(counts, stats)`` with ``stats`` = [entropy, perplexity] (fp32 (2,))."""
    with_ticket = _count(indices, None, num_codes)  # slot num_codes: zero, the ticket
    counts, ticket = with_ticket[:num_codes], with_ticket[num_codes:]
    launch = _entropy_launch(num_codes, interpreting())
    partial = torch.empty(2 * launch.grid[0], dtype=torch.float64, device=indices.device)
    stats = torch.empty(2, dtype=torch.float32, device=indices.device)
    launch(counts, ticket, partial, stats)
    return counts, stats


@functools.lru_cache(maxsize=256)
def _entropy_launch(num_codes: int, interp: bool) -> PreparedLaunch:
    block = 128 if interp else 1024
    # At least one program: with no codes it still writes the stats (entropy 0, perplexity 1), which
    # a grid of none would leave as uninitialised memory.
    programs = max(1, cdiv(num_codes, block))
    return PreparedLaunch(_entropy_kernel, (programs,), (num_codes,),
                          dict(BLOCK=block, PARTIAL_BLOCK=min(1024, next_power_of_2(programs))))
