"""Pure-PyTorch reference of every vqfast op.

This is the test oracle for the Triton kernels and the backend used for CPU tensors. Each op works on
bounded blocks of rows, so the full N x K distance matrix is never held in memory (N = K = 65,536 runs
on a laptop); under ``torch.compile`` the soft-assignment entropy is one block (see its docstring).
"""

from __future__ import annotations

import contextlib
import math
import struct

import torch
import torch.nn.functional as F

from vqfast._checks import (SMALLEST_TEMPERATURE, check_gather_inputs, check_number, check_search_inputs,
                            check_usage_inputs)
from vqfast._library import vmap_by_loop
from vqfast._autograd import signature_kept

__all__ = ["nearest_code", "gather", "code_usage", "quantize", "soft_assignment_entropy", "unit_rows"]

# Elements of the (rows x K) distance block held at once: 2**22 fp32 values = 16 MiB.
_BLOCK_ELEMENTS = 1 << 22


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` (..., D) scaled to unit l2 norm; an all-zero row stays zero, with zero gradient.

    Plain PyTorch: ``F.normalize(x, dim=-1)``, whose gradient at a zero row is about 1 / eps = 1e12
    (the cosine metric then blew up on a zero encoder output, e.g. a ReLU row or padding).
    """
    # In fp32 at least (an fp16 row of finite elements can have a norm above 65,504), and scaled to a
    # largest element of 1 first, so that the norm of a finite row neither overflows (|x| > 1.8e19 in
    # fp32) nor underflows to 0 (|x| < 1e-23) and such a row is not taken for a zero row.
    wide = torch.promote_types(x.dtype, torch.float32)
    largest = torch.linalg.vector_norm(x, ord=math.inf, dim=-1, keepdim=True, dtype=wide)
    scaled = x / torch.where(largest > 0, largest, torch.ones_like(largest))
    norm = torch.linalg.vector_norm(scaled, dim=-1, keepdim=True)
    nonzero = norm > 0
    return (scaled / torch.where(nonzero, norm, torch.ones_like(norm)) * nonzero).to(x.dtype)


def _row_chunk(num_codes: int) -> int:
    return max(1, _BLOCK_ELEMENTS // max(num_codes, 1))


@torch.no_grad()
def nearest_code(
    z: torch.Tensor,
    codebook: torch.Tensor,
    metric: str = "l2",
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest codebook row for every row of ``z``, and its distance.

    Plain PyTorch, for one small block::

        d = torch.cdist(z, codebook) ** 2          # (N, K), never built whole here
        indices = d.argmin(1); distances = d.gather(1, indices[:, None])[:, 0]

    ``metric="l2"``: squared Euclidean distance; ``"cosine"``: 1 - cos(z, c) (rows and codes scaled by
    :func:`unit_rows`, so an all-zero row or code stays zero and is 0.5 from every unit one). Ties go to the lowest
    index; NaN distances never win (a row whose distances are all NaN gets index 0 and distance NaN).
    ``compute_dtype`` is float32 or float64: codes are ranked by ``||c||^2 - 2 z.c`` in it, and with
    float32 the rows whose two best codes are within its rounding bound are ranked again in float64,
    so the indices are those of exact distances also for data far from the origin. Returns
    ``(indices, distances)``: int64 shaped like ``z[..., 0]`` and float32 (``||z - c||^2`` computed
    directly).
    """
    check_search_inputs(z, codebook, metric)
    if compute_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}")
    lead_shape = z.shape[:-1]
    # A custom op: its data-dependent re-check (which rows, how many) stays out of torch.compile's graph.
    indices, distances = torch.ops.vqfast.reference_nearest_code(z.reshape(-1, z.shape[-1]), codebook, metric,
                                                                 compute_dtype)
    return indices.reshape(lead_shape), distances.reshape(lead_shape)


@torch.library.custom_op("vqfast::reference_nearest_code", mutates_args=())
def _nearest_code_rows(z: torch.Tensor, codebook: torch.Tensor, metric: str,
                       compute_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`nearest_code` of rows ``z`` (N, D), inputs already checked."""
    # Under autocast, addmm would run in 16 bits, past what the rounding bounds below cover.
    with _autocast_off(z.device):
        return _nearest_code_rows_exact(z, codebook, metric, compute_dtype)


vmap_by_loop(_nearest_code_rows, rows_arg=0)


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast turned off on ``device`` (nothing to turn off where autocast does not exist, e.g. meta)."""
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()


def _nearest_code_rows_exact(z: torch.Tensor, codebook: torch.Tensor, metric: str,
                             compute_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    rows = z.to(compute_dtype)
    codes = codebook.to(compute_dtype)
    if metric == "cosine":
        rows = unit_rows(rows)
        codes = unit_rows(codes)
    code_sq = codes.pow(2).sum(1)
    n = rows.shape[0]
    indices = torch.zeros(n, dtype=torch.int64, device=z.device)
    distances = torch.empty(n, dtype=torch.float32, device=z.device)
    step = _row_chunk(codes.shape[0])
    codes64 = codes.double()
    code_sq64 = codes64.pow(2).sum(1)
    # Largest finite code norm (NaN/inf codes never win, in any pass), for the rounding bounds.
    c_norm = torch.where(torch.isfinite(code_sq64), code_sq64, 0.0).max().sqrt()
    for start in range(0, n, step):
        block = rows[start : start + step]
        # ||c||^2 - 2 z.c ranks codes exactly like ||z - c||^2 (||z||^2 is constant per row).
        scores = torch.addmm(code_sq, block, codes.t(), beta=1, alpha=-2)
        scores.nan_to_num_(nan=math.inf, posinf=math.inf, neginf=-math.inf)  # NaN never wins
        if scores.shape[1] == 1:
            idx = torch.zeros(scores.shape[0], dtype=torch.int64, device=z.device)
        else:
            # The two best scores rank the row and size its gap; where they differ by more than the
            # rounding bound (below), the best is unique, so topk's first index is the argmin.
            best_two = scores.topk(2, dim=1, largest=False)
            idx = best_two.indices[:, 0].clone()
            # The expanded form cancels when the data sit far from the origin (z, c = 1000 + randn in fp32:
            # a third to nearly all of the rows, by D, got a farther code). Rows whose two best scores lie within its
            # rounding bound are ranked again: in float64 (after an fp32 pass), then, among the codes
            # still within the float64 bound of the best, by the direct form ||z - c||^2, whose error
            # scales with the distance, not with the offset. (The row norms come from the search's
            # dtype: close enough for a bound; one that overflows only sends its row to the re-check.)
            z_norm = block.pow(2).sum(1).double().sqrt()
            bound = _rounding_bound(z_norm, c_norm, compute_dtype, codes.shape[1])
            unsure = _near_tie(best_two.values, bound)
            if unsure.any():
                sub = block[unsure].double()
                if compute_dtype == torch.float32:
                    sub_scores = torch.addmm(code_sq64, sub, codes64.t(), beta=1, alpha=-2)
                    sub_scores = torch.where(sub_scores.isnan(), math.inf, sub_scores)
                    # The row norms again in float64: a row past 1.8e19 has an infinite fp32 norm, which
                    # would leave every code in doubt for the direct form, whose float64 squares cannot
                    # tell codes apart next to ||z||^2 ~ 1e40 while the expanded form can.
                    sub_norm = sub.pow(2).sum(1).sqrt()
                    sub_bound = _rounding_bound(sub_norm, c_norm, torch.float64, codes.shape[1])
                else:
                    sub_scores, sub_bound = scores[unsure], bound[unsure]
                sub_idx = sub_scores.argmin(1)
                still = _near_tie(sub_scores.topk(2, dim=1, largest=False).values, sub_bound)
                if still.any():
                    sub_idx[still] = _direct_argmin(sub[still], codes64, sub_scores[still], sub_bound[still])
                idx[unsure] = sub_idx
        # Recompute the chosen distance directly: no cancellation from the expanded form.
        chosen = codes.index_select(0, idx)
        diff = block - chosen
        dist = diff.pow(2).sum(1)
        indices[start : start + step] = idx
        distances[start : start + step] = dist.to(torch.float32)
    if metric == "cosine":
        distances = distances * 0.5  # ||a - b||^2 / 2 = 1 - cos for unit vectors
    return indices, distances


def _rounding_bound(z_norm: torch.Tensor, c_norm: torch.Tensor, dtype: torch.dtype, dim: int) -> torch.Tensor:
    """Per row, a bound on the rounding of ``||c||^2 - 2 z.c`` computed in ``dtype`` for any code: (D + 2)
    roundoffs of ||c||^2 + 2 ||z|| ||c|| plus as many smallest normal numbers (underflow); float64.
    2.02, not 2: the row norms come from a sum in the search's dtype."""
    info = torch.finfo(dtype)
    return (dim + 2) * (info.eps * (c_norm * c_norm + 2.02 * z_norm * c_norm) + info.tiny)


def _near_tie(best_two: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """Rows whose two best scores ``best_two`` (N, 2, ascending) are within twice ``bound``; a NaN gap
    (both best scores infinite) counts as a near tie."""
    two = best_two.double()
    return ~(two[:, 1] - two[:, 0] > 2 * bound)


def _direct_argmin(rows64: torch.Tensor, codes64: torch.Tensor, scores: torch.Tensor,
                   bound: torch.Tensor) -> torch.Tensor:
    """argmin_k ||z - c_k||^2 in float64 from the differences themselves, over the codes whose ``scores``
    are within twice ``bound`` of the row's best (the others cannot win); NaN never wins, ties go to the
    lowest index. Equal codes (restarts seed several from one row) leave few candidates per row."""
    best = scores.min(1).values
    candidates = scores <= (best + 2 * bound)[:, None]
    candidates |= ~torch.isfinite(best)[:, None]  # rows holding NaN/inf: all (they all lose)
    r, k = candidates.nonzero(as_tuple=True)
    direct = torch.full(candidates.shape, math.inf, dtype=torch.float64, device=rows64.device)
    nan_at = torch.zeros(candidates.shape, dtype=torch.bool, device=rows64.device)
    step = _row_chunk(codes64.shape[1])  # pairs per block, as rows per block of that many columns
    for start in range(0, r.shape[0], step):
        rr, kk = r[start : start + step], k[start : start + step]
        d = (rows64[rr] - codes64[kk]).pow(2).sum(1)
        direct[rr, kk] = torch.where(d.isnan(), math.inf, d)
        nan_at[rr, kk] = d.isnan()
    # NaN loses to inf as well: a row holding inf is inf away from every code without NaN, and must not
    # get a NaN code at a lower index (its distance and loss would be NaN). Rows where every code gives
    # NaN take the lowest index.
    winners = (direct == direct.min(1, keepdim=True).values) & ~nan_at
    return torch.where(winners.any(1), winners.to(torch.uint8).argmax(1), 0)


@_nearest_code_rows.register_fake
def _(z: torch.Tensor, codebook: torch.Tensor, metric: str,
      compute_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    n = z.shape[0]
    return z.new_empty(n, dtype=torch.int64), z.new_empty(n, dtype=torch.float32)


def gather(codebook: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Codebook rows selected by ``indices``: ``codebook[indices]`` (differentiable w.r.t. codebook)."""
    compiling = torch.compiler.is_compiling()
    check_gather_inputs(codebook, indices, check_range=not compiling)
    if compiling:
        # The range is data a compiled graph cannot branch on, and compiled indexing may wrap negative
        # indices: an assertion checked where the graph runs instead.
        _assert_in_range(indices, codebook.shape[0])
    if torch.is_grad_enabled() and codebook.requires_grad:
        (indices,) = saveable(indices)  # (the embedding's backward keeps them)
    return _gather_wide(codebook, indices).to(codebook.dtype)


def saveable(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The tensors, each one made under ``torch.inference_mode`` replaced by a copy: autograd refuses to
    save inference tensors for backward, and plain PyTorch's VQ step (``q = codebook[i]``, the losses)
    saves copies it makes, so a frozen codebook, stored indices or encoder outputs made in inference
    mode work there. (In inference mode itself nothing is saved: no copies.)"""
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():  # (compiled code cannot ask)
        return tensors
    return tuple(t.clone() if t is not None and t.is_inference() else t for t in tensors)


def _assert_in_range(indices: torch.Tensor, num_codes: int) -> None:
    torch._assert_async(((indices >= 0) & (indices < num_codes)).all(),
                        f"indices must lie in [0, {num_codes})")


def _gather_wide(codebook: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``codebook[indices]`` in fp32 at least, so that the codebook gradient is summed in fp32.

    (A half-precision embedding's backward sums in half precision: 5,000 gradients of 1 into one fp16
    row add up to 2,048.)
    """
    wide = torch.promote_types(codebook.dtype, torch.float32)
    return F.embedding(indices, codebook.to(wide))


def code_usage(indices: torch.Tensor, num_codes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Histogram of code indices with its entropy (nats, 0 log 0 = 0) and perplexity = exp(entropy).

    Plain PyTorch::

        counts = torch.bincount(indices.flatten(), minlength=num_codes)
        p = counts / counts.sum(); entropy = -(p * p.log()).nansum(); perplexity = entropy.exp()
    """
    compiling = torch.compiler.is_compiling()
    check_usage_inputs(indices, num_codes, check_range=not compiling)
    flat = indices.reshape(-1)
    # bincount has no meta kernel (no values, no length) and no batching rule for vmap, and its length,
    # max(num_codes, largest index + 1), is one a compiled graph cannot know: index_add gives num_codes
    # counts (out of place: vmap cannot add batched counts into unbatched zeros).
    if compiling or flat.is_meta or torch._C._are_functorch_transforms_active():
        if compiling or flat.is_meta:
            # The range, checked where the graph runs (compiled index_add wraps negative indices); a
            # transform's was checked above.
            _assert_in_range(flat, num_codes)
        counts = torch.zeros(num_codes, dtype=torch.int64, device=indices.device).index_add(
            0, flat, torch.ones_like(flat, dtype=torch.int64))
    else:
        counts = torch.bincount(flat, minlength=num_codes)
    entropy, perplexity = histogram_entropy(counts)
    return counts, entropy, perplexity


def histogram_entropy(counts: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy (nats, 0 log 0 = 0) and perplexity of a histogram, computed in ``dtype``; 0 for an empty one.

    Plain PyTorch: ``p = counts / counts.sum(); e = -(p * p.log()).nansum(); e, e.exp()``
    """
    counts = counts.to(dtype)
    p = counts / counts.sum().clamp_min(1)
    # + 0.0 turns the -0.0 of a one-code histogram into 0.0, as the Triton kernel gives.
    entropy = -torch.special.xlogy(p, p).sum() + 0.0
    return entropy, entropy.exp()


def finite_row_counts(indices: torch.Tensor, distances: torch.Tensor, num_codes: int) -> torch.Tensor:
    """Code counts of the rows with a finite search distance, then their number: int64 (K + 1,).

    A row holding NaN or inf has a NaN or inf distance; indices outside [0, K) are not counted either.
    """
    ok = torch.isfinite(distances) & (indices >= 0) & (indices < num_codes)
    # Rows left out land in the extra slot K, which is then overwritten with the count of the others.
    counts = torch.zeros(num_codes + 1, dtype=torch.int64, device=indices.device)
    counts.index_add_(0, torch.where(ok, indices, num_codes), ok.to(torch.int64))
    return torch.cat([counts[:num_codes], ok.sum().reshape(1)])


def _smoothed_counts(counts: torch.Tensor, eps: float) -> torch.Tensor:
    """Laplace-smoothed counts (N_k + eps) / (n + K eps) * n, n = sum_k N_k: a rarely used code never
    divides by ~0."""
    total = counts.sum()
    denominator = total + counts.shape[0] * eps
    # No counts yet with eps = 0: every smoothed count is 0 (not 0 / 0).
    return torch.where(denominator > 0, (counts + eps) / denominator * total, 0.0)


@torch.no_grad()
def ema_update(weight: torch.Tensor, ema_count: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor,
               decay: float, eps: float) -> None:
    """The EMA codebook step of the VQ-VAE paper, in place.

    ``counts`` is (K + 1,) (:func:`finite_row_counts`); ``sums`` (K, D) the sums of this step's rows
    per code. The running sums are not stored: they equal ``weight * smoothed(ema_count)`` at every
    step, so codes set from outside never disagree with the averages::

        m = decay * weight * smoothed(ema_count) + (1 - decay) * sums
        ema_count = decay * ema_count + (1 - decay) * counts
        weight = m / smoothed(ema_count)          # a code with smoothed count 0 (eps = 0) keeps its value

    A step that counted no row leaves ``weight`` and ``ema_count`` bit for bit as they are.
    """
    k = ema_count.shape[0]
    dtype = ema_count.dtype
    # A step that counted no row (every row masked out, or NaN) leaves the averages as they are.
    counted = counts[k] > 0
    # With the rate 1 - decay of the unrounded decay, the weights of the steps summed to 0.84 at
    # decay 1 - 1e-7.
    decay, rate = _step_decay_and_rate(counted, decay, dtype)
    wide = torch.promote_types(weight.dtype, torch.float32)
    running_sums = weight.to(wide) * _smoothed_counts(ema_count, eps).unsqueeze(1)
    running_sums.mul_(decay).add_(sums.to(wide) * rate)
    ema_count.mul_(decay).add_(counts[:k].to(dtype) * rate)
    smoothed = _smoothed_counts(ema_count, eps).unsqueeze(1)
    # The rewrite is skipped outright on such a step: W * s / s can round a code by an ulp.
    keep = (smoothed > 0) & counted
    weight.copy_(torch.where(keep, running_sums / smoothed.clamp_min(1e-30), weight.to(wide)))


def _step_decay_and_rate(counted: torch.Tensor, decay: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(decay, rate)`` of a step as ``dtype`` scalars on ``counted``'s device: the decay as ``dtype``
    holds it and 1 minus that (exact), or ``(1, 0)`` on a step that ``counted`` no row."""
    stored = stored_decay_tensor(decay, dtype, counted.device)
    # (1 - stored is exact for a decay of 0.5 or more, and correctly rounded below that, as in float64.)
    return torch.where(counted, stored, 1.0), torch.where(counted, 1.0 - stored, 0.0)


def stored_decay_tensor(decay: float, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """:func:`stored_decay` as a 0-d ``dtype`` tensor, rounded by torch: what the step's ops use, since
    under ``torch.compile(dynamic=True)`` a layer's decay is a symbolic float, which has no value for
    plain Python to round."""
    return torch.full((), decay, dtype=torch.float64, device=device).to(dtype)


def stored_decay(usage_decay: float, dtype: torch.dtype) -> float:
    """``usage_decay`` as a ``dtype`` number holds it (float32 0.99 is 0.9900000095...): the running usage
    decays by that value and gains ``1 - `` that value per step, so the shares sum to
    ``1 - stored_decay ** steps`` exactly, which the bias correction divides out."""
    if dtype == torch.float64:
        return float(usage_decay)
    if dtype == torch.float32:
        # In plain Python: a tensor here would be a graph break under torch.compile (its .item()).
        return struct.unpack("f", struct.pack("f", usage_decay))[0]
    # On the CPU whatever the default device: a meta one (a model built under torch.device("meta")) has
    # no value to read, and a GPU one would sync the host.
    return float(torch.tensor(usage_decay, dtype=dtype, device="cpu"))


def usage_correction(steps: torch.Tensor, usage_decay: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The bias correction of the running usage share, ``1 - usage_decay ** steps`` (as Adam's), with
    the decay as ``dtype`` stores it; computed in float64 (with float32, 1 - d ** s loses most of its
    digits for a decay near 1) and returned in ``dtype``."""
    return (1.0 - stored_decay_tensor(usage_decay, dtype, steps.device).double() ** steps.double()).to(dtype)


@torch.no_grad()
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
    """One training step's update of a codebook's usage statistics, then its dead-code restarts (in place).

    ``counts`` is (K + 1,): this step's code counts, then their total (:func:`finite_row_counts`); a
    total of 0 (every row masked out, or NaN) leaves the running statistics as they are (``batch_counts``,
    this step's counts, become zeros). ``usage`` is an EMA
    of per-step usage shares, ``grace`` a credit that restarted codes get, both decayed by ``usage_decay``; ``steps`` counts the updates (for the bias correction
    ``1 - usage_decay ** steps``). With ``seeds`` (S, D) and ``weight`` (K, D), codes unused in this
    batch whose corrected ``usage + grace`` share is below ``dead_threshold`` are dead; the n-th dead
    code by index (n < S) takes seed row n unless that row holds NaN or inf, and then starts over with
    no usage, a grace credit of ``(1 - usage_decay ** steps) / K`` and an ``ema_count`` of 1.
    No host synchronisation: the restarts are applied with masks.
    """
    k = usage.shape[0]
    # A step that counted no row (every row masked out, or NaN) leaves the running statistics as they are.
    counted = counts[k] > 0
    total = counts[k].to(torch.float32).clamp_min(1.0)
    counts = counts[:k]
    steps.add_(counted.to(steps.dtype))
    batch_counts.copy_(counts)
    decay, rate = _step_decay_and_rate(counted, usage_decay, usage.dtype)
    usage.mul_(decay).add_(counts.to(usage.dtype) / total * rate)
    grace.mul_(decay)
    if seeds is None or dead_threshold <= 0 or seeds.shape[0] == 0:
        return
    decayed = usage_correction(steps, usage_decay, usage.dtype)  # and K times a restarted code's credit
    dead = ((usage + grace) / decayed.clamp_min(1e-12) < dead_threshold) & (steps > 0) & (counts == 0)
    budget = seeds.shape[0]
    order = dead.to(torch.int64).cumsum(0) - 1
    chosen = seeds.index_select(0, order.clamp(0, budget - 1)).to(weight.dtype)
    dead = dead & (order < budget) & torch.isfinite(chosen).all(dim=1)
    weight.copy_(torch.where(dead.unsqueeze(1), chosen, weight))
    usage.copy_(torch.where(dead, 0.0, usage))
    grace.copy_(torch.where(dead, decayed / k, grace))
    if ema_count is not None:
        ema_count.copy_(torch.where(dead, 1.0, ema_count))


def quantize(
    z: torch.Tensor,
    codebook: torch.Tensor,
    beta: float = 0.25,
    metric: str = "l2",
    indices: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The VQ step with straight-through gradients, in plain PyTorch.

    ::

        indices = nearest_code(z, codebook)[0]
        q = codebook[indices]
        loss = F.mse_loss(q, z.detach()) + beta * F.mse_loss(z, q.detach())
        z_q = z + (q - z).detach()       # value of q, gradient to z

    Returns ``(z_q, loss, indices)``; ``z`` is (..., D) and ``z_q`` has its shape and dtype, and the
    value of the code exactly (``z + (q - z)`` may round away from it). ``indices`` (shaped
    ``z.shape[:-1]``, in [0, K)) skip the search.
    """
    check_search_inputs(z, codebook, metric, allow_mixed_dtypes=True)
    beta = check_number(beta, "beta", minimum=0.0)
    if indices is not None:
        if not isinstance(indices, torch.Tensor) or indices.shape != z.shape[:-1]:
            shape = tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__
            raise ValueError(f"indices must have the shape of z without its last dimension, {tuple(z.shape[:-1])}; "
                             f"got {shape}")
        check_gather_inputs(codebook, indices, check_range=not torch.compiler.is_compiling())
    if torch.is_grad_enabled():
        z, indices = saveable(z, indices)  # (the losses and the gather keep them)
    given_z, given_codebook = z, codebook
    if metric == "cosine":
        # As vqfast.quantize: the code and the losses are those of the l2-normalised vectors.
        z, codebook = unit_rows(z), unit_rows(codebook)
    if indices is None:
        with torch.no_grad():
            # As vqfast.quantize: mixed dtypes search in the wider one, and the cosine metric searches
            # the given vectors (nearest_code normalises them in fp32 at least).
            wide = torch.promote_types(given_z.dtype, given_codebook.dtype)
            search_z, search_codes = (given_z, given_codebook) if metric == "cosine" else (z, codebook)
            indices = nearest_code(search_z.detach().to(wide), search_codes.detach().to(wide), metric=metric)[0]
    # The losses see the code itself, in fp32 at least (fp64 for fp64 inputs), not the code rounded
    # to z's dtype: an fp16 z beside an fp32 codebook would otherwise hide a code's distance from it.
    q = _gather_wide(codebook, indices)
    acc = torch.promote_types(q.dtype, z.dtype)
    if z.numel() == 0:
        # (An empty slice of the codebook: a NaN code must not make the loss of no rows NaN.) In fp32 at
        # least, as the loss of any other batch.
        loss = (z.sum().to(acc) + codebook[:0].sum().to(acc)) * 0.0
    else:
        loss = F.mse_loss(q.to(acc), z.detach().to(acc)) + weighted(F.mse_loss(z.to(acc), q.detach().to(acc)), beta)
    return straight_through(z, q.detach().to(z.dtype)), loss, indices


def weighted(term: torch.Tensor, weight: float) -> torch.Tensor:
    """``weight * term``, where a weight of 0 leaves the term out: 0 * inf would turn an infinite term
    into NaN, while the loss without it (beta = 0: the codebook term alone) is what its other terms
    make it, inf for a row holding inf, as the fused kernel's ``(1 + beta) * mse`` gives. A NaN term
    stays NaN; the term's gradient is still multiplied by the weight."""
    out = term * weight
    if weight != 0:
        return out
    return torch.where(torch.isinf(term), 0.0, out)


@signature_kept
class _StraightThrough(torch.autograd.Function):
    """``z + (q - z).detach()`` without its rounding: the value is exactly ``q`` (also where z is
    large, inf or NaN), and the gradient goes to ``z`` unchanged."""

    # (setup_context and a generated vmap rule: torch.func transforms, vmap and grad, can run it.)
    generate_vmap_rule = True

    @staticmethod
    def forward(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return q.detach().clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


class _StraightThroughForwardMode(_StraightThrough):
    """:class:`_StraightThrough` with a forward-mode rule (jvp, jacfwd, hessian): z's tangent, unchanged."""

    @staticmethod
    def jvp(ctx, z_tangent: torch.Tensor, q_tangent: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return z_tangent


def straight_through(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The value of ``q`` with the gradient (and forward-mode tangent) of ``z``: ``z + (q - z).detach()``
    without its rounding (see :class:`_StraightThrough`)."""
    # torch.compile refuses autograd Functions that have a jvp rule (and forward mode does not compile).
    function = _StraightThrough if torch.compiler.is_compiling() else _StraightThroughForwardMode
    return function.apply(z, q)


@signature_kept
class _RowEntropy(torch.autograd.Function):
    """Entropy of each row of ``p = softmax(logits)``, and ``p``, with gradients that keep their
    relative accuracy.

    Plain PyTorch: ``p = logits.softmax(1); -(p * logits.log_softmax(1)).sum(1), p``. Autograd's gradient
    of the entropy, ``-p * (log p + H)``, adds two numbers near -1 and +1 for a row that puts almost all
    of its weight on one code (a low temperature): the true value, as small as 1e-12 or less, drowns in
    their rounding. With ``x = logits - max``, ``s`` the sum of ``exp(x)`` over all codes but the first
    largest, and ``xbar = sum(p * x)``: ``H = log1p(s) - xbar`` and ``dH/dlogits = -p * (x - xbar)``,
    both free of that cancellation. A row whose every logit is -inf has no probability: entropy 0, p 0,
    no gradient.
    """

    @staticmethod
    def _terms(logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
        dead = (logits == -torch.inf).all(1, keepdim=True)
        shifted = logits.masked_fill(dead, 0.0)
        shifted = shifted - shifted.amax(1, keepdim=True)
        far = shifted == -torch.inf  # exp gives 0; 0 * -inf would be NaN (NaN stays NaN)
        e = shifted.exp()
        rest = e.scatter(1, shifted.argmax(1, keepdim=True), 0.0).sum(1, keepdim=True)
        xbar = torch.where(far, 0.0, e * shifted).sum(1, keepdim=True) / (1 + rest)
        p = (e / (1 + rest)).masked_fill(dead, 0.0)
        return dead, shifted.masked_fill(far, 0.0), p, rest, xbar

    generate_vmap_rule = True

    @staticmethod
    def forward(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        dead, _, p, rest, xbar = _RowEntropy._terms(logits)
        return (torch.log1p(rest) - xbar).masked_fill(dead, 0.0).squeeze(1), p

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor, grad_p: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # Recomputed from the logits (an N x K block less to keep); built of differentiable ops, so that
        # a second derivative still works. p's own part is softmax's backward, p * (g - sum(p * g)).
        (logits,) = ctx.saved_tensors
        _, shifted, p, _, xbar = _RowEntropy._terms(logits)
        grad = -p * (shifted - xbar) * grad_h[:, None]
        if grad_p is not None:
            grad = grad + p * (grad_p - (p * grad_p).sum(1, keepdim=True))
        return grad  # (0 on a row of no probability: p is 0 there)


def soft_assignment_entropy(
    z: torch.Tensor, codebook: torch.Tensor, temperature: float = 1.0, metric: str = "l2"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropies of the soft code assignment ``p = softmax(-distance / temperature)`` (differentiable).

    Returns ``(sample_entropy, batch_entropy)``: the mean over rows of each row's entropy, and the
    entropy of the row-averaged assignment. Plain PyTorch::

        p = torch.softmax(-torch.cdist(z, codebook) ** 2 / temperature, dim=1)
        sample_entropy = -(p * p.log()).sum(1).mean()
        avg = p.mean(0); batch_entropy = -(avg * avg.log()).sum()

    Rows are processed in blocks (with recomputation in backward through checkpointing), so memory
    stays bounded by one block of the N x K matrix; under ``torch.compile`` in one block (the graph then
    does not depend on N).
    """
    from torch.utils.checkpoint import checkpoint

    check_search_inputs(z, codebook, metric, allow_mixed_dtypes=True)
    temperature = check_number(temperature, "temperature", minimum=SMALLEST_TEMPERATURE)
    dtype = torch.promote_types(torch.promote_types(z.dtype, codebook.dtype), torch.float32)
    if torch.is_grad_enabled():
        z, codebook = saveable(z, codebook)  # (the blocks' backward keeps them)
    rows = z.reshape(-1, z.shape[-1]).to(dtype)
    codes = codebook.to(dtype)
    if metric == "cosine":
        rows = unit_rows(rows)
        codes = unit_rows(codes)
    n = rows.shape[0]
    if n == 0:
        zero = (rows.sum() + codes[:0].sum()) * 0.0
        return zero, zero

    # The Triton kernels' logits, in the same order of operations: scale * (2 z.c - ||c||^2), the row's
    # ||z||^2 left out (it cancels in the softmax, and its overflow would wipe out a whole row).
    scale = (0.5 if metric == "cosine" else 1.0) / temperature
    top = torch.finfo(dtype).max

    def block_terms(block: torch.Tensor, codes_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Under autocast the product would run in 16 bits; the Triton kernels keep fp32 (or tf32).
        with _autocast_off(block.device):
            # A code whose ||c||^2 overflows is infinitely far: probability 0 and no gradient. Its values
            # are replaced by zeros (no inf - inf in the logit, no 0 * inf in the gradients) and its
            # logit by -inf. A NaN code is not far and stays NaN.
            far = codes_.detach().pow(2).sum(1) == torch.inf
            codes_ = torch.where(far[:, None], 0.0, codes_)
            logits = scale * (2 * block @ codes_.t() - codes_.pow(2).sum(1))
            # Past the dtype's range a logit saturates (and gets no gradient) rather than making the
            # softmax NaN. NaN stays NaN.
            logits = torch.where(far, -torch.inf, logits.clamp_max(top))
            # 0 log 0 = 0, with no 0 * -inf in the value or the gradient: codes whose log p is -inf (a -inf
            # logit, or a difference past the dtype's range) get p = 0, and a row with every logit -inf
            # gets no probability at all (entropy 0, nothing in the average).
            entropies, p = _RowEntropy.apply(logits)
            return entropies.sum(), p.sum(0)

    # Compiled, one block: a loop over blocks would tie the graph to N (a recompile per batch size).
    compiling = torch.compiler.is_compiling()
    step = n if compiling else _row_chunk(codes.shape[0])
    sample_sum = rows.new_zeros(())
    p_sum = rows.new_zeros(codes.shape[0])
    for start in (0,) if compiling else range(0, n, step):
        block = rows[start : start + step]
        # (torch.func's grad cannot run checkpointing's saved-tensor hooks: under its transforms each
        # block keeps its N x K terms for the backward.)
        if (torch.is_grad_enabled() and (block.requires_grad or codes.requires_grad)
                and (compiling or not torch._C._are_functorch_transforms_active())):
            s, ps = checkpoint(block_terms, block, codes, use_reentrant=False)
        else:
            s, ps = block_terms(block, codes)
        sample_sum = sample_sum + s
        p_sum = p_sum + ps
    avg = p_sum / n
    # avg can underflow to 0 in fp32 (low temperature): clamp inside the log so the gradient stays finite.
    batch_entropy = -(avg * avg.clamp_min(torch.finfo(avg.dtype).tiny).log()).sum()
    return sample_sum / n, batch_entropy
