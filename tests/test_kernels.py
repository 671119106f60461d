"""The Triton kernels, run for real (interpreted on CPU, native on a GPU), against vqfast.reference."""

import functools
import math

import pytest
import torch

from helpers import chosen_gap, fp64_distances, near_tie_rows, unambiguous_rows
from vqfast import kernels, reference

SHAPES = [  # (N, K, D): degenerate, odd and round
    (1, 1, 1),
    (1, 7, 3),
    (5, 1, 16),
    (37, 53, 100),
    (64, 128, 32),
    (100, 300, 17),
    (129, 257, 65),
    (16, 40, 130),
]


def _data(n, k, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g).to(dtype).to(device)
    c = torch.randn(k, d, generator=g).to(dtype).to(device)
    return z, c


@pytest.mark.parametrize("precision", ["highest", "ieee"])
@pytest.mark.parametrize("n,k,d", SHAPES)
def test_nearest_code_fp32_exact(n, k, d, precision, kernel_device):
    """Both fp32 searches: the tf32 pass with its re-check ("highest") and fp32 products throughout."""
    z, c = _data(n, k, d, torch.float32, kernel_device)
    idx, dist = kernels.nearest_code(z, c, precision=precision)
    assert idx.dtype == torch.int64 and dist.dtype == torch.float32
    assert idx.shape == (n,) and dist.shape == (n,)
    assert chosen_gap(z, c, idx).max() <= 1e-5
    ref_idx, ref_dist = reference.nearest_code(z.cpu(), c.cpu(), compute_dtype=torch.float64)
    clear = unambiguous_rows(z, c)
    assert torch.equal(idx.cpu()[clear], ref_idx[clear])
    d64 = fp64_distances(z, c).min(1).values
    scale = (z.double().cpu() ** 2).sum(1) + d64
    assert ((dist.double().cpu() - d64).abs() <= 1e-5 * scale).all()


# Rows longer than the 16-bit search's whole-D tile: it loops over D, keeping slot-wise minima.
LONG_16_BIT_SHAPES = [(1, 1, 257), (37, 53, 300), (16, 64, 512)]


@pytest.mark.parametrize("n,k,d,splits", [(*shape, None) for shape in SHAPES]
                         + [(*shape, splits) for shape in LONG_16_BIT_SHAPES for splits in (1, 3)])
def test_nearest_code_fp16(n, k, d, splits, kernel_device):
    z, c = _data(n, k, d, torch.float16, kernel_device, seed=1)
    idx, dist = kernels.nearest_code(z, c, num_splits=None if splits is None else min(splits, k))
    assert ((idx >= 0) & (idx < k)).all()
    # fp16 products are exact in fp32 and summed in fp32: the search is an fp32 search of the upcast
    # values, so the fp32 rule holds. (The README's looser 1e-2 for 16-bit inputs would let the runner-up
    # through on 10-30% of these rows, whose runner-ups are all more than 1e-4 off.)
    assert chosen_gap(z, c, idx).max() <= 1e-5
    ref_idx, _ = reference.nearest_code(z.float().cpu(), c.float().cpu(), compute_dtype=torch.float64)
    clear = unambiguous_rows(z, c)
    assert torch.equal(idx.cpu()[clear], ref_idx[clear])
    d_chosen = fp64_distances(z, c).gather(1, idx.cpu()[:, None])[:, 0]
    scale = (z.double().cpu() ** 2).sum(1) + d_chosen
    assert ((dist.double().cpu() - d_chosen).abs() <= 1e-5 * scale).all()


def test_forced_splits_are_capped(kernel_device, monkeypatch):
    """num_splits beyond the cap runs with the cap, and the answer is unchanged. (The cap, 1,024
    splits, lowered to 5 here: a thousand programs take minutes in the interpreter.)"""
    from vqfast.kernels import nearest

    for interp in (True, False):
        _, splits = nearest._split_codes(10**6, 10**5, interp)
        assert splits <= nearest._MAX_SPLITS
    monkeypatch.setattr(nearest, "_MAX_SPLITS", 5)
    assert nearest._split_codes(301, 300, True) == (61, 5)
    z, c = _data(3, 301, 5, torch.float32, kernel_device, seed=7)
    idx1, dist1 = kernels.nearest_code(z, c, precision="highest", num_splits=1)
    idx, dist = kernels.nearest_code(z, c, precision="highest", num_splits=300)
    assert torch.equal(idx, idx1)
    torch.testing.assert_close(dist, dist1, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("precision", ["highest", "ieee"])
@pytest.mark.parametrize("splits", [2, 3, 7])
def test_split_codebook_matches_single_pass(splits, precision, kernel_device):
    z, c = _data(23, 301, 24, torch.float32, kernel_device, seed=2)
    idx1, dist1 = kernels.nearest_code(z, c, precision=precision, num_splits=1)
    idx, dist = kernels.nearest_code(z, c, precision=precision, num_splits=splits)
    assert torch.equal(idx, idx1)
    torch.testing.assert_close(dist, dist1, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ties_go_to_lowest_index(splits, dtype, kernel_device):
    # Duplicate codes in different tiles and different splits: the first copy must win. Small
    # integers keep every product exact, so the copies' scores tie exactly. (fp16 runs the tensor-core
    # search with slot-wise minima, and so does fp32's tf32 pass with its re-check; fp32 products
    # ("ieee") the per-tile minima.)
    g = torch.Generator().manual_seed(3)
    z = torch.randint(-3, 4, (9, 20), generator=g).to(dtype).to(kernel_device)
    # 800 codes: on a GPU, splits are multiples of 256 codes, so 4 splits stay 4.
    c = torch.randint(-3, 4, (800, 20), generator=g).to(dtype).to(kernel_device)
    c[150] = c[7]
    c[790] = c[7]
    c[60] = c[40]
    z[0] = c[7]
    z[1] = c[40]
    z[2] = c[790]
    for precision in ("highest", "ieee") if dtype == torch.float32 else ("highest",):
        idx, dist = kernels.nearest_code(z, c, precision=precision, num_splits=splits)
        assert idx[:3].tolist() == [7, 40, 7], precision
    assert dist[:3].abs().max() == 0


def test_strided_inputs(kernel_device):
    z_big, c_big = _data(40, 90, 66, torch.float32, kernel_device, seed=4)
    z = z_big[::2, ::3]  # (20, 22), non-unit strides in both dimensions
    c = c_big.t().contiguous().t()[::2, ::3]  # column-major storage
    assert not z.is_contiguous() and not c.is_contiguous()
    idx, dist = kernels.nearest_code(z, c, precision="highest")
    ref_idx, ref_dist = kernels.nearest_code(z.contiguous(), c.contiguous(), precision="highest")
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(dist, ref_dist)


@pytest.mark.parametrize("precision,dtype", [("highest", torch.float32), ("high", torch.float32),
                                             ("ieee", torch.float32), ("high", torch.float16)])
def test_nan_and_inf_never_give_out_of_range_indices(precision, dtype, kernel_device):
    z, c = _data(12, 50, 10, dtype, kernel_device, seed=5)
    z[0] = float("nan")
    z[1, 3] = float("nan")
    z[2, 0] = float("inf")
    c[4] = float("nan")  # a NaN code must never be chosen
    c[9, 2] = float("-inf")
    for splits in (1, 3):
        idx, dist = kernels.nearest_code(z, c, precision=precision, num_splits=splits)
        assert ((idx >= 0) & (idx < 50)).all()
        assert not (idx == 4).any()
        assert torch.isnan(dist[0]) and torch.isnan(dist[1])
        clean = torch.arange(3, 12)
        ref_idx, _ = reference.nearest_code(z[clean].cpu(), c.cpu())
        assert torch.equal(idx[clean].cpu(), ref_idx)
        if dtype == torch.float16:
            # Rows of NaN keep index 0, as the per-tile minimum gives them.
            assert idx[0] == 0


def _half_rows_with_ties_and_non_finite(k: int, d: int, seed: int, copies_of_code_3: tuple[int, ...]):
    """45 fp16 rows and k codes of small integers: code 3 repeated at ``copies_of_code_3`` (ties across
    tiles and splits) and rows 0-4 equal to it, a NaN row (5), a row holding inf (6), a code holding NaN
    (50), then 13 random normal rows (7-19)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randint(-3, 4, (45, d), generator=g).half()
    c = torch.randint(-3, 4, (k, d), generator=g).half()
    for i in copies_of_code_3:
        c[i] = c[3]
    z[:5] = c[3]
    z[5] = float("nan")
    z[6, 2] = float("inf")
    c[50, 1] = float("nan")
    z[7:20] = torch.randn(13, d, generator=g).half()
    return z, c


@pytest.mark.parametrize("splits", [1, 3])
def test_slotwise_and_per_tile_minima_agree(splits, monkeypatch):
    """The 16-bit search's two ways of keeping the running minimum (SLOTS, see _scan_codes) give the
    same indices and distances: random rows, exact ties across tiles and splits, NaN and inf rows, a
    NaN code, and a split shorter than a tile."""
    from vqfast.kernels import _common, nearest

    if not _common.interpreting():
        pytest.skip("the interpreter's fixed configuration is what is switched here; on a GPU the autotuner "
                    "chooses, and the other tests cover the configuration it takes")
    z, c = _half_rows_with_ties_and_non_finite(203, 24, seed=11, copies_of_code_3=(100, 170))
    results = {}
    for slots in (True, False):
        monkeypatch.setitem(nearest._INTERPRETER_CONFIG, "SLOTS", slots)
        results[slots] = kernels.nearest_code(z, c, num_splits=splits)
    assert torch.equal(results[True][0], results[False][0])
    torch.testing.assert_close(results[True][1], results[False][1], equal_nan=True)
    assert results[True][0][:5].tolist() == [3] * 5 and results[True][0][5] == 0
    assert not (results[True][0] == 50).any()


@pytest.mark.parametrize("k,d", [(203, 24), (96, 32)])
@pytest.mark.parametrize("splits", [1, 3])
def test_pipelined_search_gives_the_plain_search_results(k, d, splits, monkeypatch):
    """The 16-bit search with the next tile's product issued before this tile's argmin (PIPELINE) gives
    the plain search's indices and distances: ties across tiles and splits, NaN and inf rows, a NaN
    code; partial tiles (K = 203, D = 24) and whole ones read unmasked (K = 96, D = 32), whose last
    tile is multiplied twice."""
    from vqfast.kernels import _common, nearest

    if not _common.interpreting():
        pytest.skip("the interpreter's fixed configuration is what is switched here; on a GPU the autotuner "
                    "chooses among both kinds")
    z, c = _half_rows_with_ties_and_non_finite(k, d, seed=12, copies_of_code_3=(k - 5, 40))
    z[20] = c[k - 1]  # (a code of the last tile)
    results = {}
    for pipeline in (False, True):
        monkeypatch.setitem(nearest._INTERPRETER_CONFIG, "PIPELINE", pipeline)
        results[pipeline] = kernels.nearest_code(z, c, num_splits=splits)
    assert torch.equal(results[True][0], results[False][0])
    torch.testing.assert_close(results[True][1], results[False][1], equal_nan=True)
    idx = results[True][0]
    assert idx[:5].tolist() == [3] * 5 and idx[5] == 0 and not (idx == 50).any()
    assert torch.equal(c[idx[20]], c[k - 1])
    finite = torch.arange(45) >= 7
    exact, _ = reference.nearest_code(z[finite].float(), torch.cat([c[:50], c[51:]]).float(), compute_dtype=torch.float64)
    chosen = ((z[finite].double() - c[idx[finite]].double()) ** 2).sum(1)
    best = ((z[finite].double() - torch.cat([c[:50], c[51:]])[exact].double()) ** 2).sum(1)
    assert torch.equal(chosen, best)


def test_pipelined_candidates_only_where_asked_for_and_the_kernel_pipelines(monkeypatch):
    """PIPELINE candidates are timed only with VQFAST_PIPELINED_SEARCH=1 and only for the 16-bit whole-D
    search (elsewhere the kernel ignores the flag, so they would be their twins timed again), and are
    never the fixed configuration."""
    from vqfast.kernels import nearest

    configs = nearest._AUTOTUNE_CONFIGS
    assert sum(c.kwargs["PIPELINE"] for c in configs) == len(nearest._PIPELINED_TILES)
    limit = 232448  # sm_90's shared memory per block
    monkeypatch.setattr(nearest, "max_shared_memory", lambda: limit)
    monkeypatch.delenv("VQFAST_PIPELINED_SEARCH", raising=False)
    assert not nearest._pipelines("tf32", True, False)
    z = torch.empty(4, 256, dtype=torch.bfloat16)
    meta = dict(BLOCK_D=256, SINGLE_D=True, INPUT_PRECISION="tf32", RECHECK=False)
    assert not any(c.kwargs["PIPELINE"] for c in nearest._prune_configs(configs, {"z_ptr": z}, **meta))
    monkeypatch.setenv("VQFAST_PIPELINED_SEARCH", "1")
    assert any(c.kwargs["PIPELINE"] for c in nearest._prune_configs(configs, {"z_ptr": z}, **meta))
    for precision, single_d, recheck in (("ieee", True, False), ("tf32", True, True), ("tf32", False, False)):
        assert not nearest._pipelines(precision, single_d, recheck)
        chosen = nearest._select_configs(configs, precision, 128, single_d, 2, limit,
                                         nearest._pipelines(precision, single_d, recheck))
        assert chosen and not any(c.kwargs["PIPELINE"] for c in chosen)
    assert nearest._pipelines("tf32", True, False)
    chosen = nearest._select_configs(configs, "tf32", 256, True, 2, limit, True)
    assert sum(c.kwargs["PIPELINE"] for c in chosen) == len(nearest._PIPELINED_TILES)
    assert all(c.kwargs["SLOTS"] for c in chosen if c.kwargs["PIPELINE"])  # (the kernel needs them)
    assert not nearest._first_config("tf32", 256, True, 2, limit).kwargs["PIPELINE"]


def test_empty_rows(kernel_device):
    z = torch.empty(0, 8, device=kernel_device)
    c = torch.randn(5, 8, device=kernel_device)
    idx, dist = kernels.nearest_code(z, c)
    assert idx.shape == (0,) and dist.shape == (0,)


def test_rows_and_codes_on_different_devices_are_refused(kernel_device):
    # The launchers are public (vqfast.kernels, torch.ops.vqfast): a kernel run on z's device would
    # read the codebook through a pointer into another device's memory.
    from vqfast.kernels import soft_entropy

    z = torch.randn(3, 4, device=kernel_device)
    elsewhere = torch.randn(5, 4, device="meta")
    for call in (lambda: kernels.nearest_code(z, elsewhere), lambda: kernels.nearest_code(elsewhere[:3], z),
                 lambda: soft_entropy.soft_entropy_forward(z, elsewhere, 0.5, "ieee")):
        with pytest.raises(ValueError, match="same device"):
            call()


def test_soft_entropy_backward_refuses_statistics_and_weights_of_the_wrong_length(kernel_device):
    # The kernels read N row statistics and K weights: a shorter tensor would be read past its end.
    from vqfast.kernels import soft_entropy

    g = torch.Generator().manual_seed(3)
    z, c = torch.randn(6, 5, generator=g).to(kernel_device), torch.randn(4, 5, generator=g).to(kernel_device)
    row_max, log_sum, ent, _ = soft_entropy.soft_entropy_forward(z, c, 1.0)
    w, coef = torch.ones(4, device=kernel_device), torch.ones(1, device=kernel_device)
    good = dict(row_max=row_max, log_sum=log_sum, ent=ent, w=w, coef=coef)
    dz, dc = soft_entropy.soft_entropy_backward(z, c, **good, scale=1.0)
    assert dz.shape == (6, 5) and dc.shape == (4, 5)
    for name, bad in (("row_max", row_max[:3]), ("log_sum", torch.cat([log_sum, log_sum])), ("ent", ent.double()),
                      ("w", w[:2]), ("w", torch.ones(4, dtype=torch.int64, device=kernel_device)),
                      ("coef", torch.ones(2, device=kernel_device)), ("w", torch.ones(4, device="meta"))):
        with pytest.raises(ValueError, match=name):
            soft_entropy.soft_entropy_backward(z, c, **{**good, name: bad}, scale=1.0)


def test_quantize_backward_checks_the_dtype_of_every_grad_zq(kernel_device):
    # The checked launch plan is kept per problem: a float64 grad_zq after a float32 one must still be
    # refused, not read as float32.
    g = torch.Generator().manual_seed(4)
    z, c = torch.randn(6, 10, generator=g).to(kernel_device), torch.randn(5, 10, generator=g).to(kernel_device)
    idx = torch.tensor([0, 4, 2, 2, 1, 3], device=kernel_device)
    grad_zq = torch.randn(6, 10, generator=g, dtype=torch.float64).to(kernel_device)
    one = torch.tensor(1.0, device=kernel_device)
    kernels.quantize_backward(grad_zq.float(), one, z, c, idx, 0.25)
    for bad in (grad_zq, grad_zq.long()):
        with pytest.raises(TypeError, match="grad_zq must be float32, float16 or bfloat16"):
            kernels.quantize_backward(bad, one, z, c, idx, 0.25)


@pytest.mark.parametrize("n,k,d", [(1, 1, 1), (37, 11, 20), (300, 64, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gather_and_scatter_add(n, k, d, dtype, kernel_device):
    g = torch.Generator().manual_seed(6)
    c = torch.randn(k, d, generator=g).to(dtype).to(kernel_device)
    idx = torch.randint(0, k, (n,), generator=g).to(kernel_device)
    out = kernels.gather_rows(c, idx)
    assert out.dtype == dtype and torch.equal(out, c[idx])
    grad = torch.randn(n, d, generator=g).to(dtype).to(kernel_device)
    acc = kernels.scatter_add_rows(grad, idx, k, dtype)
    expected = torch.zeros(k, d, dtype=torch.float64).index_add_(0, idx.cpu(), grad.cpu().double())
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(acc.double().cpu(), expected.to(dtype).double(), rtol=tol, atol=tol)


def test_scatter_add_accumulates_fp16_in_fp32(kernel_device):
    # 4096 copies of 1e-3 + 1: in fp16 arithmetic the small parts vanish; fp32 accumulation keeps them.
    n, d = 4096, 16
    idx = torch.zeros(n, dtype=torch.int64, device=kernel_device)
    grad = torch.full((n, d), 1.0 + 2**-10, dtype=torch.float16, device=kernel_device)
    acc = kernels.scatter_add_rows(grad, idx, 3, torch.float32)
    assert torch.allclose(acc[0].cpu(), torch.full((d,), n * (1.0 + 2**-10)), rtol=1e-6)
    assert (acc[1:] == 0).all()


@pytest.mark.parametrize("n,k", [(0, 5), (1, 1), (1000, 37), (257, 3000)])
def test_code_usage(n, k, kernel_device):
    idx = torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(7)).to(kernel_device)
    counts, entropy, perplexity = kernels.code_usage(idx, k)
    ref_counts, ref_entropy, ref_perplexity = reference.code_usage(idx.cpu(), k)
    assert counts.dtype == torch.int64 and torch.equal(counts.cpu(), ref_counts)
    torch.testing.assert_close(entropy.cpu(), ref_entropy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(perplexity.cpu(), ref_perplexity, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(entropy)


def test_code_usage_uniform_and_single(kernel_device):
    idx = torch.arange(64, device=kernel_device).repeat(3)
    _, entropy, perplexity = kernels.code_usage(idx, 64)
    assert math.isclose(entropy.item(), math.log(64), rel_tol=1e-5)
    assert math.isclose(perplexity.item(), 64.0, rel_tol=1e-4)
    _, entropy, perplexity = kernels.code_usage(torch.full((50,), 3, device=kernel_device), 10)
    assert entropy.item() == 0.0 and perplexity.item() == 1.0
    # One used code among many blocks of codes (each program of the entropy kernel takes a block).
    _, entropy, perplexity = kernels.code_usage(torch.full((70,), 2900, device=kernel_device), 3000)
    assert entropy.item() == 0.0 and perplexity.item() == 1.0


def test_code_usage_of_no_codes_is_zero_entropy(kernel_device):
    # The launcher (and torch.ops.vqfast.code_usage, which takes num_codes unchecked) with K = 0: no
    # counts, entropy 0 and perplexity 1, not whatever the stats buffer held.
    for indices in (torch.zeros(0, dtype=torch.int64), torch.tensor([0, 3])):
        for _ in range(3):
            torch.empty(64, dtype=torch.float32, device=kernel_device).fill_(7.0)  # leave garbage around
            counts, entropy, perplexity = kernels.code_usage(indices.to(kernel_device), 0)
            assert counts.shape == (0,)
            assert entropy.item() == 0.0 and perplexity.item() == 1.0


@pytest.mark.parametrize("k", [129, 1000, 5000])
def test_code_usage_entropy_over_many_blocks(k, kernel_device):
    """The entropy kernel's programs each take a block of codes (128 under the interpreter, 1,024 on a
    GPU) and the last to finish adds their partial sums in program order: the result matches the float64
    entropy of the histogram and does not change from call to call."""
    g = torch.Generator().manual_seed(12)
    # Skewed usage: many unused codes, a few heavy ones, and codes used once (c log c = 0).
    idx = torch.cat([torch.randint(0, k, (3000,), generator=g), torch.full((5000,), k - 1),
                     torch.randint(0, 7, (2000,), generator=g)]).to(kernel_device)
    counts, entropy, perplexity = kernels.code_usage(idx, k)
    p = torch.bincount(idx.cpu(), minlength=k).double() / idx.numel()
    expected = float(-torch.special.xlogy(p, p).sum())
    assert counts.shape == (k,) and int(counts.sum()) == idx.numel()
    assert abs(entropy.item() - expected) <= 1e-6 * expected
    assert math.isclose(perplexity.item(), math.exp(expected), rel_tol=1e-6)
    again = kernels.code_usage(idx, k)
    assert torch.equal(again[1], entropy) and torch.equal(again[2], perplexity)
    # Indices outside [0, k) (unchecked) are left out of the counts and of the entropy alike.
    counts_out, entropy_out, _ = kernels.code_usage(torch.cat([idx, torch.tensor([-1, k], device=kernel_device)]), k)
    assert torch.equal(counts_out, counts) and torch.equal(entropy_out, entropy)


@pytest.mark.parametrize("n,k,d", [(1, 1, 1), (37, 19, 20), (130, 50, 150)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_grad_zq", [True, False])
def test_fused_quantize_matches_reference(n, k, d, dtype, with_grad_zq, kernel_device):
    g = torch.Generator().manual_seed(8)
    z = torch.randn(n, d, generator=g).to(dtype).to(kernel_device)
    c = torch.randn(k, d, generator=g).to(dtype).to(kernel_device)
    idx = torch.randint(0, k, (n,), generator=g).to(kernel_device)
    beta = 0.37
    z_q, loss = kernels.quantize_forward(z, c, idx, beta)
    assert z_q.dtype == dtype and torch.equal(z_q, c[idx])

    z_ref = z.detach().cpu().double().requires_grad_()
    c_ref = c.detach().cpu().double().requires_grad_()
    zq_ref, loss_ref, _ = reference.quantize(z_ref, c_ref, beta=beta, indices=idx.cpu())
    torch.testing.assert_close(loss.double().cpu(), loss_ref.detach(), rtol=1e-5, atol=1e-7)

    grad_zq = torch.randn(n, d, generator=g).to(dtype).to(kernel_device) if with_grad_zq else None
    grad_loss = torch.tensor(1.7, device=kernel_device)
    gz, gc = kernels.quantize_backward(grad_zq, grad_loss, z, c, idx, beta)
    total = loss_ref * 1.7
    if with_grad_zq:
        total = total + (zq_ref * grad_zq.cpu().double()).sum()
    total.backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(gz.double().cpu(), z_ref.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(gc.double().cpu(), c_ref.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("n,k,d", [(1, 1, 1), (37, 19, 20), (130, 50, 150)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_quantize_leaves_out_rows_of_index_minus_one(n, k, d, dtype, kernel_device):
    """left_out=True (a padding mask): rows of index -1 pass z through, add nothing to the loss (a mean
    over the rows kept) or the codebook gradient, and get dz_q as their dz, whatever they hold."""
    g = torch.Generator().manual_seed(9)
    z = torch.randn(n, d, generator=g).to(dtype)
    c = torch.randn(k, d, generator=g).to(dtype)
    idx = torch.randint(0, k, (n,), generator=g)
    kept = torch.rand(n, generator=g) < 0.6
    kept[0] = n > 1 or bool(kept[0])
    idx = torch.where(kept, idx, -1)
    z = torch.where(kept[:, None], z, float("nan"))  # padding may hold anything
    beta = 0.37
    z_q, loss = kernels.quantize_forward(z.to(kernel_device), c.to(kernel_device), idx.to(kernel_device), beta,
                                         left_out=True)
    z_q = z_q.cpu()
    assert torch.equal(z_q[kept], c[idx[kept]]) and bool(z_q[~kept].isnan().all())

    z_ref = z[kept].double().requires_grad_()
    c_ref = c.double().requires_grad_()
    zq_ref, loss_ref, _ = reference.quantize(z_ref, c_ref, beta=beta, indices=idx[kept])
    if not bool(kept.any()):
        loss_ref = loss_ref * 0.0
    torch.testing.assert_close(loss.double().cpu(), loss_ref.detach(), rtol=1e-5, atol=1e-7)

    grad_zq = torch.randn(n, d, generator=g).to(dtype)
    gz, gc = kernels.quantize_backward(grad_zq.to(kernel_device), torch.tensor(1.7, device=kernel_device),
                                       z.to(kernel_device), c.to(kernel_device), idx.to(kernel_device), beta,
                                       left_out=True)
    (loss_ref * 1.7 + (zq_ref * grad_zq[kept].double()).sum()).backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    gz = gz.cpu()
    assert torch.equal(gz[~kept], grad_zq[~kept])
    if bool(kept.any()):
        torch.testing.assert_close(gz[kept].double(), z_ref.grad, rtol=tol, atol=tol)
        torch.testing.assert_close(gc.double().cpu(), c_ref.grad, rtol=tol, atol=tol)
    else:
        assert bool((gc == 0).all())


def _tf32_classes(z, c):
    """The class the tf32 search should give each row (kernels/nearest.py, _settle_rows), in float64,
    and the rows far enough from a class boundary for the kernels' fp32 rounding not to matter."""
    def truncated(x):
        return (x.float().cpu().view(torch.int32) & -8192).view(torch.float32).double()

    z64, c64 = z.double().cpu(), c.double().cpu()
    d = z.shape[1]
    z_norm, z_resid = z64.norm(dim=1)[:, None], (z64 - truncated(z)).norm(dim=1)[:, None]
    c_norm, c_resid = c64.norm(dim=1)[None, :], (c64 - truncated(c)).norm(dim=1)[None, :]
    # Per row and code: the bound on |tf32 score - exact score|.
    error = (1 + 2**-10) * (2 * (z_resid * c_norm + z_norm * c_resid) + 2 * d * 2**-22 * z_norm * c_norm
                            + d * 2**-23 * c_norm**2 + 4 * d * 2**-126)
    lower = (c64 * c64).sum(1)[None, :] - 2 * z64 @ c64.t() - error
    low3, at = lower.topk(3, dim=1, largest=False)
    upper = low3[:, 0] + 2 * error.gather(1, at[:, :1])[:, 0]
    expected = torch.where(low3[:, 2] <= upper, 2, torch.where(low3[:, 1] <= upper, 1, 0))
    margin = 1e-3 * error.gather(1, at[:, :1])[:, 0]
    clear = ((low3[:, 1] - upper).abs() > margin) & ((low3[:, 2] - upper).abs() > margin)
    return expected, clear, (at[:, 0] - at[:, 1]) % 32 == 0


def _assert_tf32_classes(status, z, c):
    """``status`` is the float64 model's class on every row far from a class boundary, except that a row
    to be decided between two codes may be searched again when the two could share a slot of the slot-wise
    minima (indices congruent modulo 32, the narrowest tile): a slot keeps its two lowest bounds, not the
    index of its second or its third (kernels/nearest.py, _slot_best_three)."""
    expected, clear, may_share_slot = _tf32_classes(z, c)
    status = status.cpu().long()
    upgraded = (expected == 1) & may_share_slot & (status == 2)
    assert torch.equal(torch.where(upgraded, 1, status)[clear], expected[clear])
    return expected, clear


@pytest.mark.parametrize("splits", [1, 3])
def test_tf32_rows_are_sorted_by_the_error_bound(splits, kernel_device, search_kernel):
    from vqfast.kernels.nearest import _nearest_code_with_status

    # 600 codes: on a GPU, splits are multiples of 256 codes, so 3 splits stay 3 ([0, 256), [256, 512),
    # [512, 600)); under the interpreter they are [0, 200), [200, 400), [400, 600).
    z, c = _data(90, 600, 24, torch.float32, kernel_device, seed=13)
    c[260] = c[7]  # two equal codes in different splits: a row next to them is decided between the two
    z[5] = c[7] + 0.01
    c[300] = c[100]  # three equal codes, one per split: a row next to them is searched again
    c[520] = c[100]
    z[6] = c[100] + 0.01
    c[11] = c[10]  # three equal codes in one tile: the tile's own third score must count
    c[12] = c[10]
    z[7] = c[10] + 0.01
    # A near tie of two close codes in different splits.
    c[450] = c[20] + 0.05 * torch.randn(24, generator=torch.Generator().manual_seed(1)).to(kernel_device)
    z[8] = 0.5 * (c[20] + c[450]) + 1e-4 * (c[20] - c[450])
    # The largest norm sits in the middle of the last split, in neither its first nor its last tile: the
    # bound must take the maximum over all tiles and splits.
    c[570] *= 3
    # Two equal codes 256 apart, and nothing else near: in one split they share a slot of the slot-wise
    # minima (every tile width divides 256), which keep no index for a slot's second code, so the row is
    # searched again; in different splits (3 splits: on a GPU [0, 256) and [256, 512)) it is decided
    # between the two.
    c[257] = c[1]
    z[9] = c[1] + 0.01
    idx, dist, status = _nearest_code_with_status(z, c, precision="high", num_splits=splits)

    assert status.dtype == torch.int8 and status.shape == (90,)
    expected, clear = _assert_tf32_classes(status, z, c)
    assert status[5] == 1 and status[6] == 2 and status[7] == 2 and status[8] == 1
    if splits > 1:
        assert status[9] == 1
    elif kernel_device.type == "cpu":  # (on a GPU the autotuner may take a tile too wide for slot-wise minima)
        assert status[9] == 2
    assert int((expected == 0).sum()) > 45
    # Ties go to the lowest index whichever way a row is settled; all rows get the nearest code.
    assert idx[5] == 7 and idx[6] == 100 and idx[7] == 10 and idx[8] == 20 and idx[9] == 1
    ref_idx, _ = reference.nearest_code(z.cpu(), c.cpu())
    assert torch.equal(idx.cpu(), ref_idx)
    d_chosen = ((z.double() - c[idx].double()) ** 2).sum(1)
    assert ((dist.double() - d_chosen).abs() <= 1e-5 * d_chosen).all()


@pytest.mark.parametrize("splits", [1, 3])
def test_a_few_large_codes_leave_the_other_rows_sure(splits, kernel_device, search_kernel):
    from vqfast.kernels.nearest import _nearest_code_with_status

    # Small codes with a few large ones among them, as after restarts put codes on data rows in a fresh
    # codebook: the large codes' tf32 error must not make every row's choice among small codes doubtful.
    g = torch.Generator().manual_seed(17)
    c = 0.01 * torch.randn(600, 24, generator=g)
    c[::50] = 4 * torch.randn(12, 24, generator=g)
    z = torch.randn(90, 24, generator=g)
    z, c = z.to(kernel_device), c.to(kernel_device)
    idx, _, status = _nearest_code_with_status(z, c, precision="high", num_splits=splits)
    _assert_tf32_classes(status, z, c)
    assert (status == 2).float().mean() < 0.1 and (status == 0).float().mean() > 0.6
    assert torch.equal(idx.cpu(), reference.nearest_code(z.cpu(), c.cpu())[0])


def test_tf32_bound_covers_accumulation_on_tf32_exact_data(kernel_device, search_kernel):
    from vqfast.kernels.nearest import _nearest_code_with_status

    # Entries k / 256 with |k| < 1024 are exact in tf32, so the residual terms of the bound vanish and
    # only fp32 accumulation and the rounding of ||c||^2 remain: rows whose two best scores are that
    # close must still be decided between the two codes.
    g = torch.Generator().manual_seed(19)
    c = torch.randint(-1023, 1024, (400, 64), generator=g).float() / 256
    z = torch.randint(-1023, 1024, (120, 64), generator=g).float() / 256
    z[:40] = 0.5 * (c[:40] + c[40:80])  # midpoints, rounded to the grid: near ties of two codes
    z[:40] = (z[:40] * 256).round() / 256
    z, c = z.to(kernel_device), c.to(kernel_device)
    idx, _, status = _nearest_code_with_status(z, c, precision="high")
    expected, clear = _assert_tf32_classes(status, z, c)
    assert int((expected[clear] == 1).sum()) >= 3
    assert torch.equal(idx.cpu(), reference.nearest_code(z.cpu(), c.cpu())[0])


@pytest.mark.parametrize("splits", [1, 2])
def test_tf32_rescoring_returns_the_exact_indices(splits, kernel_device, search_kernel):
    # A huge tolerance sends every row through the exact re-search: the result must be the fp32 one.
    z, c = _data(70, 600, 40, torch.float32, kernel_device, seed=10)  # 2 splits on a GPU too
    exact_idx, exact_dist = kernels.nearest_code(z, c, precision="ieee")
    idx, dist = kernels.nearest_code(z, c, precision="high", tie_tolerance_scale=1e9, num_splits=splits)
    assert torch.equal(idx, exact_idx)
    torch.testing.assert_close(dist, exact_dist, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="tf32 emulated in the interpreter; test_gpu.py runs the "
                                                       "same inputs on the real tensor cores")
@pytest.mark.parametrize("precision", ["high", "highest"])
@pytest.mark.parametrize("splits", [1, 3])
def test_tf32_recheck_gives_the_fp32_indices_under_tf32_rounding(tf32_rounding_interpreter, splits, precision, search_kernel):
    from vqfast.kernels.nearest import _nearest_code_with_status

    # 120 rows each just off the midpoint of two codes: their two distances differ by ~3e-3 of ~32, which
    # fp32 products resolve and tf32 products do not. 40 rows just off a point equally far from three
    # codes. Then 60 plain random rows, which the tf32 pass is sure of.
    g = torch.Generator().manual_seed(6)
    k, d, ties, triples, plain = 300, 64, 120, 40, 60
    c = torch.randn(k, d, generator=g)
    a, _, pairs, three, triple_rows = near_tie_rows(c, ties, triples, g)
    z = torch.cat([pairs, triple_rows, torch.randn(plain, d, generator=g)])
    exact, _ = reference.nearest_code(z, c)
    fp32, fp32_dist = kernels.nearest_code(z, c, precision="ieee", num_splits=splits)
    assert torch.equal(fp32, exact) and (exact[:ties] == a).float().mean() > 0.9
    # (A few centres are nearer to a fourth code: those rows are plain ones.)
    designed = exact[ties:ties + triples] == three[:, 0]
    assert designed.float().mean() > 0.8
    tf32_only, _ = kernels.nearest_code(z, c, precision="high", tie_tolerance_scale=0.0, num_splits=splits)
    assert tf32_rounding_interpreter, "the tf32 products did not go through the emulation"
    assert (tf32_only[:ties] != exact[:ties]).sum() > ties // 10  # the emulated rounding changes the answer
    assert (tf32_only[ties:ties + triples] != exact[ties:ties + triples])[designed].sum() > triples // 10
    # "highest" differs from "high" only in the products of the re-search (fp32, not tf32x3).
    rechecked, dist, status = _nearest_code_with_status(z, c, precision=precision, num_splits=splits)
    assert torch.equal(rechecked, exact)
    # The pairs are settled between their two codes, the triples searched again, the plain rows sure.
    assert (status[:ties] == 1).float().mean() > 0.9
    assert (status[ties:ties + triples][designed] == 2).float().mean() > 0.9
    assert (status[ties + triples:] == 0).float().mean() > 0.8
    # The distances are summed directly from the chosen codes, so none carries the tf32 error.
    assert torch.equal(dist, fp32_dist)
    d_chosen = ((z.double() - c[rechecked].double()) ** 2).sum(1)
    assert ((dist.double() - d_chosen).abs() <= 1e-5 * d_chosen).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's fixed configuration is what is switched "
                                                       "here; on a GPU the autotuner chooses")
@pytest.mark.parametrize("splits", [1, 3])
def test_tf32_slotwise_and_per_tile_bounds_agree(tf32_rounding_interpreter, splits, monkeypatch):
    """The tf32 pass's two ways of keeping the three lowest bounds (SLOTS, see _scan_codes) give the same
    indices and distances, and the same status except where the slots may send a row decided between
    two codes to the re-search: near ties of two and of three codes (in one slot, across slots, tiles
    and splits), random rows, NaN and inf rows, a split shorter than a tile."""
    from vqfast.kernels import nearest
    from vqfast.kernels.nearest import _nearest_code_with_status

    g = torch.Generator().manual_seed(21)
    k, d = 203, 40
    c = torch.randn(k, d, generator=g)
    a = torch.randint(0, k, (40,), generator=g)
    b = (a + 1 + torch.randint(0, k - 1, (40,), generator=g)) % k
    b[:8] = (a[:8] + 32) % k  # pairs that can share a slot
    z = torch.cat([0.5 * (c[a] + c[b]) + 1e-5 * (c[a] - c[b]), torch.randn(20, d, generator=g)])
    c[64] = c[0]  # three equal codes, two of them in one slot
    c[96] = c[0]
    z[40] = c[0] + 0.01
    c[161] = c[33]  # two equal codes in one slot
    z[41] = c[33] + 0.01
    z[42] = float("nan")
    z[43, 3] = float("inf")
    results = {}
    for slots in (True, False):
        monkeypatch.setitem(nearest._INTERPRETER_CONFIG, "SLOTS", slots)
        results[slots] = _nearest_code_with_status(z, c, precision="high", num_splits=splits)
    (idx, dist, status), (idx_tile, dist_tile, status_tile) = results[True], results[False]
    assert torch.equal(idx, idx_tile)
    torch.testing.assert_close(dist, dist_tile, equal_nan=True)
    upgraded = (status_tile == 1) & (status == 2)
    assert torch.equal(torch.where(upgraded, 1, status), status_tile)
    # Only rows whose two best codes are congruent modulo the tile width (32 here) are upgraded.
    second_best = ((c[None] - z[:, None]).double() ** 2).sum(-1).topk(2, largest=False).indices
    assert ((second_best[:, 0] - second_best[:, 1])[upgraded] % 32 == 0).all()
    assert int(upgraded.sum()) >= 2 and int((status_tile == 1).sum()) >= 20
    assert idx[40] == 0 and status[40] == 2 and idx[41] == 33
    if splits == 1:
        assert status[41] == 2 and status_tile[41] == 1
    good = torch.arange(60)
    assert torch.equal(idx[good], reference.nearest_code(z[good], c)[0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="tf32 emulated in the interpreter; test_gpu.py runs "
                                                       "tiny inputs on the real tensor cores")
def test_tf32_recheck_holds_for_tiny_inputs(tf32_rounding_interpreter, search_kernel):
    from vqfast.kernels.nearest import _nearest_code_with_status

    # Rows just off the midpoint of two codes, scaled by 1e-20: the squares of what tf32 drops underflow
    # fp32, so the bound needs its absolute term; every row must still get the fp32 index.
    g = torch.Generator().manual_seed(6)
    c = torch.randn(300, 64, generator=g)
    a = torch.randint(0, 300, (60,), generator=g)
    b = (a + 1 + torch.randint(0, 299, (60,), generator=g)) % 300
    z = 0.5 * (c[a] + c[b]) + 1e-5 * (c[a] - c[b])
    z, c = z * 1e-20, c * 1e-20
    exact, _ = kernels.nearest_code(z, c, precision="ieee")
    assert (exact == a).all()
    assert torch.equal(kernels.nearest_code(z, c, precision="highest")[0], exact)
    tf32_only, _ = kernels.nearest_code(z, c, precision="high", tie_tolerance_scale=0.0)
    assert (tf32_only != exact).sum() > 6  # the emulated rounding changes the answer
    rechecked, _, status = _nearest_code_with_status(z, c, precision="high")
    assert torch.equal(rechecked, exact) and (status != 0).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="tf32 emulated in the interpreter; test_gpu.py runs "
                                                       "near ties on the real tensor cores")
@pytest.mark.parametrize("exact_side", ["rows", "codes"])
def test_tf32_bound_covers_what_tf32_drops_from_each_side(tf32_rounding_interpreter, exact_side, search_kernel):
    from vqfast.kernels.nearest import _nearest_code_with_status

    # Rows just off midpoints of two codes, with one side exact in tf32 (entries on a 1/512 grid): the
    # other side's residual term alone must cover the tf32 error, for rows and codes alike.
    g = torch.Generator().manual_seed(3)
    k, d, n = 64, 32, 120
    c = torch.randn(k, d, generator=g)
    a = torch.randint(0, k, (n,), generator=g)
    b = (a + 1 + torch.randint(0, k - 1, (n,), generator=g)) % k
    if exact_side == "codes":
        c = (c * 512).round() / 512
    z = 0.5 * (c[a] + c[b]) + 1e-4 * torch.randn(n, d, generator=g)
    if exact_side == "rows":
        z = (z * 512).round() / 512
    exact, _ = reference.nearest_code(z, c)
    tf32_only, _ = kernels.nearest_code(z, c, precision="high", tie_tolerance_scale=0.0)
    assert (tf32_only != exact).sum() > n // 20  # the emulated rounding changes the answer
    rechecked, _, status = _nearest_code_with_status(z, c, precision="high")
    assert torch.equal(rechecked, exact) and (status != 0).float().mean() > 0.5


@pytest.mark.parametrize("splits", [1, 3])
def test_tf32_pair_rows_break_exact_ties_by_index(tf32_rounding_interpreter, splits, kernel_device):
    from vqfast.kernels.nearest import _nearest_code_with_status

    # Two different codes exactly as far from a row: the tf32 pass ranks them by lower bounds, and the
    # larger code has the larger error bound, so the one at the higher index comes first; only the
    # index tie-break of the two-code decision then gives the lowest index. (Equal codes have equal
    # bounds and come in index order anyway.) Entries are multiples of 1/32, exact in tf32, so every
    # score and distance is exact with or without tf32 rounding.
    g = torch.Generator().manual_seed(23)
    d = 6
    c = torch.zeros(8, d)
    c[:5, 0] = torch.tensor([0.0, 1.0, 0.5, 2.0, -3.0])
    c[5:] = torch.randint(-64, 65, (3, d), generator=g) / 32
    z = torch.randint(-64, 65, (20, d), generator=g) / 32
    z[3], z[17] = 0.0, 0.0
    z[3, 0] = 0.25  # 1/16 from codes 0 and 2
    z[17, 0] = 1.5  # 1/4 from codes 1 and 3 (under the interpreter, 3 splits put them in different ones)
    z, c = z.to(kernel_device), c.to(kernel_device)
    idx, dist, status = _nearest_code_with_status(z, c, precision="high", num_splits=splits)
    assert idx[[3, 17]].tolist() == [0, 1] and status[[3, 17]].tolist() == [1, 1]
    assert dist[[3, 17]].tolist() == [0.0625, 0.25]
    exact, _ = kernels.nearest_code(z, c, precision="ieee", num_splits=splits)
    assert torch.equal(idx, exact)
    assert torch.equal(exact.cpu(), reference.nearest_code(z.cpu(), c.cpu(), compute_dtype=torch.float64)[0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="tf32 emulated in the interpreter; test_gpu.py runs "
                                                       "near ties on the real tensor cores")
def test_tf32_modes_give_the_plain_fp32_indices_on_random_problems(tf32_rounding_interpreter, search_kernel):
    """"highest" and "high" against the plain fp32 search ("ieee") on random problems under emulated tf32
    rounding: odd K and D, scales from 1e-3 to 1e3, data off the origin, plain rows and near ties of
    two and three codes. A row may differ only where the two picks are equally near to within fp32
    rounding (the benchmark's criterion: 1e-6 of ||z||^2 + d)."""
    from vqfast.kernels.nearest import _nearest_code_with_status

    statuses = torch.zeros(3, dtype=torch.int64)
    for seed in range(12):
        g = torch.Generator().manual_seed(100 + seed)
        k, d = int(torch.randint(4, 400, (1,), generator=g)), int(torch.randint(1, 150, (1,), generator=g))
        if search_kernel == "tma":
            d = -(-d // 4) * 4  # rows of 16-byte multiples, which the TMA kernel reads
        scale = 10.0 ** float(torch.empty(1).uniform_(-3, 3, generator=g))
        shift = 3 * float(torch.randn(1, generator=g))
        c = torch.randn(k, d, generator=g)
        _, _, pairs, _, triple_rows = near_tie_rows(c, 20, min(10, k // 3), g)
        z = torch.cat([torch.randn(30, d, generator=g), pairs, triple_rows])
        z, c = (z + shift) * scale, (c + shift) * scale
        plain, _ = kernels.nearest_code(z, c, precision="ieee")
        for precision in ("highest", "high"):
            idx, dist, status = _nearest_code_with_status(z, c, precision=precision)
            statuses += torch.bincount(status.long(), minlength=3)
            rows = (idx != plain).nonzero().flatten()
            zs = z[rows].double()
            mine = ((zs - c[idx[rows]].double()) ** 2).sum(1)
            theirs = ((zs - c[plain[rows]].double()) ** 2).sum(1)
            assert ((mine - theirs) <= 1e-6 * (zs.pow(2).sum(1) + theirs)).all(), (seed, precision, k, d, scale)
            d_chosen = ((z.double() - c[idx].double()) ** 2).sum(1)
            assert ((dist.double() - d_chosen).abs() <= 1e-5 * (d_chosen + 1e-30)).all()
    assert tf32_rounding_interpreter, "the tf32 products did not go through the emulation"
    # Every way of settling a row was taken: sure, decided between two codes, searched again.
    assert (statuses > 100).all(), statuses


@pytest.mark.skipif(torch.cuda.is_available(), reason="tf32 emulated in the interpreter; test_gpu.py runs "
                                                       "near ties on the real tensor cores")
@pytest.mark.parametrize("d", [68, 132])
def test_tf32_recheck_at_wide_d_under_tf32_rounding(tf32_rounding_interpreter, d, search_kernel):
    from vqfast.kernels.nearest import _nearest_code_with_status

    # Past D = 64 the re-search of listed rows loops over 64-column slices, and past D = 128 so does the
    # tf32 pass with its bound; a D that is no multiple of 64 leaves the last slice partial (and rows of
    # 16-byte multiples, which the TMA kernel reads). Near ties of two codes (settled in the tf32 pass)
    # and of three (searched again) take both.
    g = torch.Generator().manual_seed(31)
    k, ties, triples = 64, 32, 8
    c = torch.randn(k, d, generator=g)
    if d > 128:
        # Half the codes zero in the first slice, and so the rows between two of them: all their tf32
        # error comes from the later slices, which the bound must count too.
        c[k // 2:, :64] = 0
    a, _, pairs, three, triple_rows = near_tie_rows(c, ties, triples, g)
    z = torch.cat([pairs, triple_rows])
    padded = (z[:, :64] == 0).all(1)
    exact, _ = kernels.nearest_code(z, c, precision="ieee")
    assert torch.equal(exact, reference.nearest_code(z, c)[0]) and (exact[:ties] == a).all()
    designed = exact[ties:] == three[:, 0]  # (the others are nearer to a fourth code)
    assert int(designed.sum()) >= triples // 2
    tf32_only, _ = kernels.nearest_code(z, c, precision="high", tie_tolerance_scale=0.0)
    assert (tf32_only != exact).sum() >= 4  # the emulated rounding changes the answer
    if d > 128:
        assert int(padded.sum()) >= 4 and (tf32_only != exact)[padded].any()
    # The tf32 products ran on 64-column slices past D = 128, on whole rows below (the TMA kernel: whole
    # rows up to D = 256).
    whole = 1 << (d - 1).bit_length()
    assert {shape[1] for shape in tf32_rounding_interpreter} == {whole if search_kernel == "tma" or d <= 128 else 64}
    rechecked, dist, status = _nearest_code_with_status(z, c, precision="high")
    assert torch.equal(rechecked, exact)
    assert (status[:ties] == 1).float().mean() > 0.8
    assert (status[ties:][designed] == 2).all()
    d_chosen = ((z.double() - c[rechecked].double()) ** 2).sum(1)
    assert ((dist.double() - d_chosen).abs() <= 1e-5 * d_chosen).all()


@pytest.mark.parametrize("splits", [1, 3])
def test_rows_past_fp32_range_still_get_the_nearest_code(splits, kernel_device, search_kernel):
    # ||z||^2 overflows fp32 (|z_0| > 1.8e19) while ||c||^2 - 2 z.c does not: the tf32 bound is infinite,
    # so the rows go to the re-search, which ranks the codes as the plain fp32 search ("ieee") does.
    c = torch.randn(40, 8, generator=torch.Generator().manual_seed(0)).to(kernel_device)
    z = torch.zeros(3, 8, device=kernel_device)
    z[:, 0] = torch.tensor([3e19, 1e20, -5e19])
    exact, _ = kernels.nearest_code(z, c, precision="ieee", num_splits=splits)
    expected = ((c.double() ** 2).sum(1)[None, :] - 2 * z.double() @ c.double().t()).argmin(1)
    assert torch.equal(exact.cpu(), expected.cpu())
    for precision in ("high", "highest"):
        idx, _ = kernels.nearest_code(z, c, precision=precision, num_splits=splits)
        assert torch.equal(idx, exact), precision


@pytest.mark.parametrize("splits", [1, 3])
def test_distances_are_exact_far_from_the_origin(splits, kernel_device, search_kernel):
    # z, c = 1000 + randn: ||z||^2 + ||c||^2 - 2 z.c cancels ~2e7 down to ~64, far below fp32's
    # resolution of the terms (~2), so only a direct sum gives the distance to fp32 rounding.
    g = torch.Generator().manual_seed(12)
    z = (1000.0 + torch.randn(40, 32, generator=g)).to(kernel_device)
    c = (1000.0 + torch.randn(700, 32, generator=g)).to(kernel_device)  # 3 splits also on a GPU (256-aligned)
    z[5] = c[17]  # an exact hit has distance 0
    for precision in ("ieee", "highest", "high"):
        idx, dist = kernels.nearest_code(z, c, precision=precision, num_splits=splits)
        d_chosen = ((z.double() - c[idx].double()) ** 2).sum(1)
        assert ((dist.double() - d_chosen).abs() <= 1e-5 * d_chosen).all()
        assert idx[5] == 17 and dist[5] == 0


def test_bad_precision_is_rejected(kernel_device):
    z, c = _data(4, 5, 8, torch.float32, kernel_device)
    with pytest.raises(ValueError, match="precision"):
        kernels.nearest_code(z, c, precision="fast")


@pytest.mark.parametrize("products", ["ieee", "tf32x3"])
@pytest.mark.parametrize("listed", [3, 40])
def test_listed_rows_are_searched_again_in_place(listed, products, kernel_device):
    from vqfast.kernels.nearest import _Recheck, _research_listed_rows, _ResearchPlan

    # 40 listed rows are 3 row blocks of the interpreter's 16: the fixed grid loops over the list.
    z, c = _data(70, 90, 20, torch.float32, kernel_device, seed=11)
    recheck = _Recheck(z, c, 1.0)
    rows = torch.randperm(70, generator=torch.Generator().manual_seed(0))[:listed].to(kernel_device)
    recheck.count.fill_(listed)
    recheck.rows[:listed] = rows.int()
    recheck.packed[:listed] = torch.iinfo(torch.int64).max
    idx = torch.full((70,), -1, dtype=torch.int64, device=kernel_device)
    dist = torch.full((70,), -1.0, device=kernel_device)
    _research_listed_rows(z, c, recheck, idx, dist, plan=_ResearchPlan(z, c, products))
    ref_idx, ref_dist = kernels.nearest_code(z, c, precision="ieee")
    picked = torch.zeros(70, dtype=torch.bool, device=kernel_device)
    picked[rows] = True
    assert torch.equal(idx[picked], ref_idx[picked])
    torch.testing.assert_close(dist[picked], ref_dist[picked], rtol=1e-6, atol=1e-6)
    assert (idx[~picked] == -1).all() and (dist[~picked] == -1.0).all()


def test_listed_rows_unpack_indices_past_16_bits(kernel_device):
    from vqfast.kernels.nearest import _write_listed_rows_kernel

    z = torch.randn(3, 1, generator=torch.Generator().manual_seed(2)).to(kernel_device)
    c = torch.randn(70_002, 1, generator=torch.Generator().manual_seed(3)).to(kernel_device)
    count = torch.tensor([2], dtype=torch.int32, device=kernel_device)
    rows = torch.tensor([2, 0, 1], dtype=torch.int32, device=kernel_device)
    key = 0x3F800000 << 32  # the order-preserving bits of 1.0 in the high half
    packed = torch.tensor([key | 70_001, key | 65_536, -1], dtype=torch.int64, device=kernel_device)
    idx = torch.full((3,), -1, dtype=torch.int64, device=kernel_device)
    dist = torch.full((3,), -1.0, device=kernel_device)
    _write_listed_rows_kernel[(1,)](z, c, count, rows, packed, idx, dist, 1, z.stride(0), z.stride(1),
                                    c.stride(0), c.stride(1), BLOCK_N=32, DIST_BLOCK_D=16)
    assert idx.tolist() == [65_536, -1, 70_001]  # row 1 is not listed
    expected = torch.stack([(z[0] - c[65_536]).square().sum(), (z[2] - c[70_001]).square().sum()])
    torch.testing.assert_close(dist[[0, 2]], expected)


@pytest.mark.parametrize("products", ["ieee", "tf32x3"])
def test_listed_rows_keep_the_lowest_index_across_splits(products, kernel_device):
    from vqfast.kernels.nearest import _Recheck, _research_listed_rows, _ResearchPlan

    # Equal codes at both ends of the codebook land in different splits; their (score, index) pairs meet
    # in the packed atomic minimum, where the lower index must win, also for negative scores.
    z, c = _data(4, 600, 8, torch.float32, kernel_device, seed=15)
    c[599] = c[2]
    z[:] = c[2] + 1e-3  # ||c||^2 - 2 z.c < 0 at the nearest code
    recheck = _Recheck(z, c, 1.0)
    recheck.count.fill_(4)
    recheck.rows[:4] = torch.arange(4, dtype=torch.int32)
    recheck.packed[:4] = torch.iinfo(torch.int64).max
    idx = torch.empty(4, dtype=torch.int64, device=kernel_device)
    dist = torch.empty(4, device=kernel_device)
    _research_listed_rows(z, c, recheck, idx, dist, plan=_ResearchPlan(z, c, products))
    assert idx.tolist() == [2, 2, 2, 2]


def test_strided_indices_are_read_correctly(kernel_device):
    g = torch.Generator().manual_seed(12)
    c = torch.randn(30, 12, generator=g).to(kernel_device)
    z = torch.randn(20, 12, generator=g).to(kernel_device)
    wide = torch.randint(0, 30, (40,), generator=g).to(kernel_device)
    idx = wide[::2]
    assert idx.stride(0) == 2
    assert torch.equal(kernels.gather_rows(c, idx), c[idx])
    assert torch.equal(kernels.bincount(idx, 30).cpu(), torch.bincount(idx.cpu(), minlength=30))
    z_q, _ = kernels.quantize_forward(z, c, idx, 0.25)
    assert torch.equal(z_q, c[idx])
    grad = torch.ones(20, 12, device=kernel_device)
    expected = torch.zeros(30, 12).index_add_(0, idx.cpu(), grad.cpu())
    assert torch.equal(kernels.scatter_add_rows(grad, idx, 30, torch.float32).cpu(), expected)


def test_quantize_backward_can_skip_the_codebook_gradient(kernel_device):
    z, c = _data(33, 7, 10, torch.float32, kernel_device, seed=13)
    idx = torch.randint(0, 7, (33,), generator=torch.Generator().manual_seed(0)).to(kernel_device)
    g = torch.tensor(1.0, device=kernel_device)
    gz_full, gc_full = kernels.quantize_backward(None, g, z, c, idx, 0.5)
    gz, gc = kernels.quantize_backward(None, g, z, c, idx, 0.5, need_grad_codebook=False)
    assert gc.shape == (0, 10) and gc_full.shape == (7, 10)
    assert torch.equal(gz, gz_full)


H100_SHARED_MEMORY = 232448  # bytes per block, as Triton's driver reports it on an H100


def test_exact_fp32_autotuning_keeps_small_tiles_only():
    from vqfast.kernels.nearest import _autotune_configs, _select_configs

    configs = _autotune_configs()
    exact = _select_configs(configs, "ieee", 32, True, 4, H100_SHARED_MEMORY)
    assert 0 < len(exact) < len(configs)
    assert all(c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= 32 * 32 * c.num_warps for c in exact)
    assert _select_configs(configs, "tf32", 32, True, 4, H100_SHARED_MEMORY, pipelined=True) == configs
    assert _select_configs(configs, "tf32", 32, True, 4, H100_SHARED_MEMORY) == [
        c for c in configs if not c.kwargs["PIPELINE"]]


def test_autotuning_skips_configs_that_overflow_shared_memory():
    from vqfast.kernels.nearest import _autotune_configs, _select_configs, _shared_memory_bytes

    configs = _autotune_configs()
    # bf16, D = 256 in one slice: compiled for sm_90, (BLOCK_N, BLOCK_K, stages) = (128, 128, 3) asks for
    # 256 KiB and (64, 256, 3) for 417 KiB, over the H100's 227 KiB.
    assert _shared_memory_bytes(128, 128, 3, 256, True, 2) > H100_SHARED_MEMORY
    chosen = _select_configs(configs, "tf32", 256, True, 2, H100_SHARED_MEMORY)
    assert 0 < len(chosen) < len(configs)
    key = lambda c: (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages)  # noqa: E731
    assert (128, 128, 3) not in {key(c) for c in chosen} and (64, 256, 3) not in {key(c) for c in chosen}
    assert all(_shared_memory_bytes(*key(c), 256, True, 2) <= H100_SHARED_MEMORY for c in chosen)
    # A GPU with ~100 KB per block still gets a configuration that fits.
    small = _select_configs(configs, "tf32", 256, True, 2, 101376)
    assert small and all(_shared_memory_bytes(*key(c), 256, True, 2) <= 101376 for c in small)


def test_autotune_pruning_reads_keyword_and_positional_arguments(monkeypatch):
    from vqfast.kernels import nearest

    monkeypatch.setattr(nearest, "max_shared_memory", lambda: H100_SHARED_MEMORY)
    configs = nearest._autotune_configs()
    z = torch.empty(4, 256, dtype=torch.bfloat16)
    from_kwargs = nearest._prune_configs(configs, {"z_ptr": z}, BLOCK_D=256, SINGLE_D=True, INPUT_PRECISION="tf32",
                                         RECHECK=False)
    from_named = nearest._prune_configs(configs, {"z_ptr": z, "BLOCK_D": 256, "SINGLE_D": True,
                                                  "INPUT_PRECISION": "tf32", "RECHECK": False})
    assert from_kwargs == from_named == nearest._select_configs(configs, "tf32", 256, True, 2, H100_SHARED_MEMORY)
    assert len(from_kwargs) < len(configs)
    # The tf32 pass with its re-check stages more: (64, 128) tiles with 3 stages at D = 128 in fp32 asked
    # for 240 KiB on sm_90, over the H100's 227 KiB, and must not be a candidate there.
    z32 = torch.empty(4, 128)
    checked = nearest._prune_configs(configs, {"z_ptr": z32}, BLOCK_D=128, SINGLE_D=True, INPUT_PRECISION="tf32",
                                     RECHECK=True)
    plain = nearest._prune_configs(configs, {"z_ptr": z32}, BLOCK_D=128, SINGLE_D=True, INPUT_PRECISION="tf32",
                                   RECHECK=False)
    big = [(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages) for c in plain if c not in checked]
    assert (64, 128, 3) in big and checked


def test_searches_record_the_autotuner_they_launched_through(monkeypatch, kernel_device):
    """The benchmark's tile note reads it: a pass on a fixed configuration, or no pass at all (no rows),
    records None rather than leaving the previous problem's autotuner."""
    from vqfast.kernels import _common, nearest

    c = torch.randn(40, 8, device=kernel_device)
    monkeypatch.setattr(nearest, "_last_search_autotuner", object())
    nearest.nearest_code(torch.empty(0, 8, device=kernel_device), c)
    assert nearest.last_search_autotuner() is None
    monkeypatch.setattr(nearest, "_last_search_autotuner", object())
    nearest.nearest_code(torch.randn(5, 8, device=kernel_device), c)
    if _common.interpreting() or not _common.autotuning():
        assert nearest.last_search_autotuner() is None
    else:
        assert nearest.last_search_autotuner() is nearest._nearest_code_autotuned


def test_wide_tf32_candidates_cover_d_whole_and_in_slices(monkeypatch):
    """fp32 with tf32 products at 128 < D <= 256: the autotuner weighs a whole D per tile (only the code
    tiles streamed) against 64-column slices; each candidate carries its SINGLE_D and BLOCK_D, and
    those kept fit in shared memory with the re-check's extra staging."""
    from vqfast.kernels import nearest

    z = torch.empty(4, 256)
    limit = H100_SHARED_MEMORY - nearest._RECHECK_SHARED_BYTES
    monkeypatch.setattr(nearest, "max_shared_memory", lambda: H100_SHARED_MEMORY)
    configs = nearest._wide_tf32_configs()
    chosen = nearest._prune_wide_tf32_configs(configs, {"z_ptr": z}, INPUT_PRECISION="tf32", RECHECK=True)
    whole = [c for c in chosen if c.kwargs["SINGLE_D"]]
    sliced = [c for c in chosen if not c.kwargs["SINGLE_D"]]
    assert whole and sliced and all(c.kwargs["BLOCK_D"] == 256 for c in whole)
    assert all(c.kwargs["BLOCK_D"] == nearest._LOOP_BLOCK_D for c in sliced)
    for c in chosen:
        need = nearest._shared_memory_bytes(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages,
                                            c.kwargs["BLOCK_D"], c.kwargs["SINGLE_D"], 4)
        assert need <= limit
    # A whole D of fp32 beside three stages of 64-code tiles would not fit: not a candidate.
    assert nearest._shared_memory_bytes(128, 64, 3, 256, True, 4) > limit
    assert all((c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages) != (128, 64, 3) for c in whole)
    # With little shared memory the slices' fallback remains, still saying how it covers D.
    monkeypatch.setattr(nearest, "max_shared_memory", lambda: 65536)
    small = nearest._prune_wide_tf32_configs(configs, {"z_ptr": z}, INPUT_PRECISION="tf32", RECHECK=True)
    assert small and all(c.kwargs["SINGLE_D"] is False and c.kwargs["BLOCK_D"] == 64 for c in small)
    assert set(nearest._nearest_code_wide_tf32_autotuned.keys) >= {"N_BUCKET", "K", "D", "codes_per_split"}


def test_autotuning_is_keyed_on_the_codebook_split():
    # Two row counts in one power-of-two bucket can get different split counts, i.e. different work per
    # program; a configuration tuned for one must not be reused for the other.
    from vqfast.kernels import nearest

    keys = nearest._nearest_code_autotuned.keys
    assert {"N_BUCKET", "K", "D", "codes_per_split"} <= set(keys)


@pytest.mark.parametrize("k,d,dtype", [(1, 1, torch.float32), (37, 130, torch.float32), (300, 20, torch.float16)])
def test_code_sqnorms(k, d, dtype, kernel_device):
    from vqfast.kernels._common import code_sqnorms

    g = torch.Generator().manual_seed(15)
    c = torch.randn(k, 2 * d, generator=g).to(dtype).to(kernel_device)[:, ::2]  # strided rows
    out = code_sqnorms(c)
    assert out.dtype == torch.float32 and out.shape == (k,)
    torch.testing.assert_close(out.double().cpu(), c.double().cpu().square().sum(1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k,d", [(1, 1), (37, 130), (300, 20)])
def test_tf32_norms_match_the_plain_norms_and_measure_what_tf32_drops(k, d, kernel_device):
    from vqfast.kernels._common import code_sqnorms
    from vqfast.kernels.nearest import _Recheck

    g = torch.Generator().manual_seed(16)
    c = torch.randn(k, 2 * d, generator=g).to(kernel_device)[:, ::2]  # strided rows
    recheck = _Recheck(torch.zeros(3, d, device=kernel_device), c, 1.0)
    # Bit for bit: rows searched again after the tf32 pass see the norms the plain fp32 search sees.
    assert torch.equal(recheck.c_sqnorm, code_sqnorms(c))
    kept = (c.cpu().contiguous().view(torch.int32) & -8192).view(torch.float32)  # tf32: 10 mantissa bits
    tiny = d * 2.0**-126  # under the roots, for squares that underflow
    torch.testing.assert_close(recheck.c_resid.double().cpu(),
                               ((c.cpu() - kept).double().square().sum(1) + tiny).sqrt(), rtol=1e-6, atol=0)
    torch.testing.assert_close(recheck.c_norm.double().cpu(), (c.cpu().double().square().sum(1) + tiny).sqrt(),
                               rtol=1e-6, atol=0)
    assert recheck.count.item() == 0  # the list starts empty


def test_views_whose_column_offsets_pass_int32_are_made_contiguous():
    from vqfast.kernels._common import int32_safe_columns

    # A column-major view of a (2**30 + 1)-row tensor: column 3 starts past 2**31 elements (meta: no memory).
    wide = torch.empty_strided((2**30 + 1, 4), (1, 2**30 + 1), device="meta")
    safe = int32_safe_columns(wide)
    assert safe.is_contiguous() and safe.shape == wide.shape
    small = torch.randn(8, 4).t()  # column-major too, but tiny: left as it is
    assert int32_safe_columns(small) is small


def test_interpreter_can_run_loops():
    # The kernels all loop over a runtime bound; an interpreter that cannot must be reported clearly.
    from vqfast.kernels._common import _interpreter_problem, interpreting

    if interpreting():
        assert _interpreter_problem() is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="fakes the GPU timer around the CPU interpreter")
def test_memory_bound_kernels_tune_their_launch_once_per_problem(monkeypatch):
    # On a GPU the gather, scatter-add, fused VQ step and bincount launchers time their candidate
    # configurations on the first call of a problem size and keep the fastest. Here the interpreter runs
    # the kernels and a fake timer names the winner: every candidate must compute the right result, and
    # the timing runs of accumulating kernels must not leak into the real output.
    from vqfast.kernels import _common, gather, quantize, usage

    # The launchers see a GPU's candidate lists (their device check is the interpreter's business here).
    monkeypatch.setattr(_common, "interpreting", lambda: False)
    monkeypatch.setattr(usage, "interpreting", lambda: False)
    for module in (gather, quantize, usage):
        monkeypatch.setattr(module, "check_launchable", lambda *tensors: None)
    monkeypatch.setenv("VQFAST_AUTOTUNE", "1")
    monkeypatch.setattr(_common, "_TUNED", {})
    # Streaming twins for these small problems too (real ones get them from 128 MiB streamed).
    monkeypatch.setattr(_common, "STREAMING_MIN_BYTES", 0)
    monkeypatch.setattr(usage, "STREAMING_MIN_BYTES", 0)
    timings: list[int] = []
    # Problems in the order below: gather, scatter-add, bincount, VQ forward, VQ backward (10 candidates
    # each: five tiles, then the same with the streaming cache hints); the streaming twin of the second
    # tile is the fastest of each.
    fake_ms = [2, 2, 2, 2, 2, 2, 1, 2, 2, 2] * 5

    def fake_do_bench(fn, warmup, rep):
        fn()
        timings.append(len(timings))
        return float(fake_ms[len(timings) - 1])

    monkeypatch.setattr(_common, "_benchmarker", lambda: fake_do_bench)
    g = torch.Generator().manual_seed(40)
    n, k, d = 50, 7, 20
    codebook = torch.randn(k, d, generator=g)
    indices = torch.randint(0, k, (n,), generator=g)
    grad = torch.randn(n, d, generator=g)
    z = torch.randn(n, d, generator=g)

    for _ in range(2):  # the second round reuses the tuned configurations without timing
        before = len(timings)
        out = kernels.gather_rows(codebook, indices)
        assert torch.equal(out, codebook[indices])
        summed = kernels.scatter_add_rows(grad, indices, k)
        torch.testing.assert_close(summed, torch.zeros(k, d).index_add_(0, indices, grad))
        counts = kernels.bincount(indices, k)
        assert torch.equal(counts, torch.bincount(indices, minlength=k))
        z_q, loss = kernels.quantize_forward(z, codebook, indices, 0.25)
        torch.testing.assert_close(loss, 1.25 * (codebook[indices] - z).pow(2).mean())
        gz, gc = kernels.quantize_backward(None, torch.ones(()), z, codebook, indices, 0.25)
        diff = codebook[indices] - z
        torch.testing.assert_close(gc, torch.zeros(k, d).index_add_(0, indices, 2 * diff / (n * d)))
        torch.testing.assert_close(gz, -0.25 * 2 * diff / (n * d))
        if before:
            assert len(timings) == before
    tuned = _common._TUNED
    assert len(tuned) == 5 and len(timings) == len(fake_ms)
    block_d = 32
    row_configs = _common.row_tile_configs(block_d, 1 << 30)
    assert len(row_configs) == 10 and row_configs[0] == _common.LaunchConfig(4096 // block_d, 4)
    assert [c.stream for c in row_configs] == [False] * 5 + [True] * 5
    assert [(c.block, c.num_warps) for c in row_configs[5:]] == [(c.block, c.num_warps) for c in row_configs[:5]]
    # At most 32 elements per thread: 8,192-element tiles only with 8 warps.
    assert all(c.block * block_d <= 32 * 32 * c.num_warps for c in row_configs)
    for key, cfg in tuned.items():
        expected = usage._bincount_configs(True)[6] if key[0] == "bincount" else row_configs[6]
        assert expected.stream
        assert cfg == expected, key


def test_memory_bound_kernels_use_the_fixed_configuration_without_autotuning(monkeypatch):
    from vqfast.kernels import _common

    monkeypatch.setattr(_common, "interpreting", lambda: False)
    monkeypatch.setenv("VQFAST_AUTOTUNE", "0")

    def never(*args, **kwargs):
        raise AssertionError("timed although autotuning is off")

    configs = _common.row_tile_configs(64)
    assert _common.tuned_config(("x",), configs, never) == configs[0] == _common.LaunchConfig(64, 4)
    # Streaming twins only where the data streamed through a kernel outgrows L2.
    assert len(configs) == 5 and not any(c.stream for c in configs)
    assert len(_common.row_tile_configs(64, _common.STREAMING_MIN_BYTES - 1)) == 5
    assert [c.stream for c in _common.row_tile_configs(64, _common.STREAMING_MIN_BYTES)] == [False] * 5 + [True] * 5


def _plan_summary(plan):
    """What a search plan launches with: its kernels' grids, arguments after the tensors, meta-parameters
    and tensor layouts."""
    out = [plan.copy_z, plan.copy_codebook, plan.input_precision, plan.empty, plan.checking]
    launches = [getattr(plan, "sqnorms", None), getattr(getattr(plan, "recheck", None), "norms", None)]
    search = getattr(plan, "search", None)
    if search is not None:
        launches += [search.search, search.reduce]
    research = getattr(plan, "research", None)
    if research is not None:
        launches += [research.research, research.write]
    for launch in launches:
        if launch is not None:
            grid = launch.grid if isinstance(launch.grid, tuple) else launch.grid({"BLOCK_N": 64})
            layout = launch.layout((tuple(range(20)))) if launch.layout is not None else None
            out.append((launch.kernel, grid, launch.scalars, launch.meta, layout))
    return out


def test_search_plans_are_keyed_on_what_they_are_computed_from(kernel_device, monkeypatch):
    """A search keeps a plan per problem (checks passed, launch arithmetic done); inputs that differ in
    shape, strides, dtype or arguments must never reuse another problem's plan, and a reused plan is the
    plan those inputs would get anew."""
    from vqfast.kernels import _common, nearest

    g = torch.Generator().manual_seed(3)
    z = torch.randn(40, 24, generator=g).to(kernel_device)
    c = torch.randn(30, 24, generator=g).to(kernel_device)
    z_cols = z.t().contiguous().t()  # the same values and shape, column-major
    c_cols = c.t().contiguous().t()
    c_rows = torch.randn(30, 48, generator=g).to(kernel_device)[:, ::2]  # every other column
    c_rows.copy_(c)
    ref = torch.cdist(z.double().cpu(), c.double().cpu()).argmin(1)
    variants = [
        (z, c, "highest", None, 1.0), (z_cols, c, "highest", None, 1.0), (z, c_cols, "highest", None, 1.0),
        (z, c_rows, "highest", None, 1.0), (z, c, "high", None, 1.0), (z, c, "high", 2, 1.0),
        (z, c, "high", None, 2.0), (z.half(), c.half(), "highest", None, 1.0), (z[:20], c, "highest", None, 1.0),
        (z, c[:20], "highest", None, 1.0), (z, c, "ieee", None, 1.0), (z_cols, c_rows, "ieee", None, 1.0),
    ]
    keys = [nearest._plan_key(*v) for v in variants]
    assert len(set(keys)) == len(keys)
    for _ in range(2):  # the second round through the plans of the first
        for zz, cc, precision, splits, scale in variants:
            idx, _ = kernels.nearest_code(zz, cc, precision=precision, num_splits=splits, tie_tolerance_scale=scale)
            want = torch.cdist(zz.double().cpu(), cc.double().cpu()).argmin(1)
            assert torch.equal(idx.cpu(), want), (zz.stride(), cc.stride(), precision)
    assert torch.equal(kernels.nearest_code(z_cols, c_rows, precision="highest")[0].cpu(), ref)
    for v in variants:
        cached = nearest._PLANS.get(nearest._plan_key(*v))
        assert _plan_summary(cached) == _plan_summary(nearest._Plan(*v)), v[2:]
    # The switches a plan reads are in its key too.
    key = nearest._plan_key(*variants[0])
    monkeypatch.setenv("VQFAST_AUTOTUNE", "0" if _common.autotuning() else "1")
    assert nearest._plan_key(*variants[0]) != key
    monkeypatch.undo()
    if _common.interpreting():
        monkeypatch.setitem(nearest._INTERPRETER_CONFIG, "SLOTS", not nearest._INTERPRETER_CONFIG["SLOTS"])
        assert nearest._plan_key(*variants[0]) != key
        monkeypatch.undo()
    # A plan exists only for inputs that passed the checks, as they stand now: a lowered row limit
    # refuses inputs it accepted before.
    monkeypatch.setattr(_common, "MAX_ROWS", 10)
    with pytest.raises(ValueError, match="z has 40 rows"):
        kernels.nearest_code(z, c, precision="highest")


def test_search_plans_are_bounded(kernel_device, monkeypatch):
    from vqfast.kernels import _common, nearest

    monkeypatch.setattr(nearest, "_PLANS", _common.PlanCache(limit=3))
    c = torch.randn(5, 4, device=kernel_device)
    for n in range(1, 6):
        kernels.nearest_code(torch.randn(n, 4, device=kernel_device), c, precision="highest")
    assert len(nearest._PLANS.plans) == 3
    assert [key[0][0] for key in nearest._PLANS.plans] == [3, 4, 5]  # the oldest go first


def test_kept_buffers_are_taken_and_given_back(kernel_device):
    from vqfast.kernels._common import KeptBuffers

    kept = KeptBuffers([((3, 2), torch.float32), ((5,), torch.int64)])
    first, token = kept.take(kernel_device)
    assert [(t.shape, t.dtype, t.device.type) for t in first] == [
        ((3, 2), torch.float32, kernel_device.type), ((5,), torch.int64, kernel_device.type)]
    # While one call holds them (another thread on the same stream, say), a second call gets fresh
    # buffers, and nothing to give back.
    other, other_token = kept.take(kernel_device)
    assert other_token is None and not any(a is b for a, b in zip(first, other))
    kept.give_back(other_token, other)
    kept.give_back(token, first)
    again, token = kept.take(kernel_device)
    assert all(a is b for a, b in zip(first, again))  # the next call reuses them
    kept.give_back(token, again)
    big = KeptBuffers([((1 << 20,), torch.float32)], limit=1 << 20)  # 4 MiB: over the limit, never kept
    for _ in range(2):
        buffers, token = big.take(kernel_device)
        assert token is None
        big.give_back(token, buffers)
    assert not big.kept and not big.owned


def test_kept_buffers_not_in_fresh_scratch_blocks_and_released_on_request(kernel_device):
    from vqfast.kernels import _common

    kept = _common.KeptBuffers([((4,), torch.float32)])
    with _common.fresh_scratch():
        buffers, token = kept.take(kernel_device)
    assert token is None and not kept.owned
    buffers, token = kept.take(kernel_device)
    kept.give_back(token, buffers)
    assert kept.kept and kept.owned
    key = next(iter(kept.owned))[0]
    assert _common._KEPT_BYTES[key] >= 512
    _common.release_scratch()  # every plan's
    assert not kept.kept and not kept.owned and _common._KEPT_BYTES[key] == 0


def test_only_direct_calls_keep_search_scratch(kernel_device, monkeypatch):
    """The registered custom op (what compiled code and CUDA-graph trees call) searches on fresh scratch
    buffers; eager calls of the public op keep them."""
    import vqfast
    from vqfast import ops
    from vqfast.kernels import nearest

    monkeypatch.setenv("VQFAST_BACKEND", "triton")
    z, c = torch.randn(9, 6, device=kernel_device), torch.randn(11, 6, device=kernel_device)
    idx, _ = torch.ops.vqfast.nearest_code(z, c, "highest", 0)
    plan = nearest._PLANS.get(nearest._plan_key(z, c, "highest", None, 1.0))
    assert not plan.scratch.owned
    assert torch.equal(vqfast.nearest_code(z, c, precision="highest")[0], idx)
    assert plan.scratch.owned and ops.for_call() is ops.direct


def test_kept_buffers_share_a_budget_and_give_it_back(kernel_device, monkeypatch):
    import gc

    from vqfast.kernels import _common

    spec = [((250,), torch.float32)]  # 1,000 bytes: 1,024 as the allocator rounds them
    plans = [_common.KeptBuffers(spec) for _ in range(4)]
    gc.disable()  # (so that no other plan gives its bytes back meanwhile)
    try:
        budget_key = _common._scratch_key(kernel_device)[0]
        monkeypatch.setattr(_common, "KEPT_BUDGET", _common._KEPT_BYTES.get(budget_key, 0) + 3 * 1024)
        for plan in plans:
            plan.give_back(*reversed(plan.take(kernel_device)))
    finally:
        gc.enable()
    assert [len(p.kept) for p in plans] == [1, 1, 1, 0]  # the fourth is over the budget: fresh buffers
    del plans[0]
    gc.collect()
    plans[-1].give_back(*reversed(plans[-1].take(kernel_device)))
    assert len(plans[-1].kept) == 1  # a dropped plan gave its bytes back


@pytest.mark.parametrize("dtype,precision", [(torch.float32, "highest"), (torch.float32, "high"),
                                             (torch.float16, "highest"), (torch.float32, "ieee")])
def test_repeated_searches_on_kept_buffers_match_fresh_ones(kernel_device, dtype, precision, monkeypatch):
    """Later calls of a plan reuse its scratch (split winners, re-check lists, codebook norms): data that
    changes between calls of one shape, and a change back, give what a search on fresh buffers gives."""
    from vqfast.kernels import _common, nearest

    g = torch.Generator().manual_seed(11)
    data = [(torch.randn(37, 20, generator=g).to(dtype).to(kernel_device),
             (torch.randn(50, 20, generator=g) * scale).to(dtype).to(kernel_device)) for scale in (1.0, 3.0, 0.5)]
    fresh = []
    with _common.fresh_scratch():
        for z, c in data:
            fresh.append(nearest._nearest_code_with_status(z, c, precision, 3))
    plan = nearest._PLANS.get(nearest._plan_key(*data[0], precision, 3, 1.0))
    for z, c in (*data, data[0]):
        want = fresh[[i for i, (zz, _) in enumerate(data) if zz is z][0]]
        got = nearest._nearest_code_with_status(z, c, precision, 3)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert (got[2] is None) == (want[2] is None) and (got[2] is None or torch.equal(got[2], want[2]))
        # Junk left in the kept buffers must not reach the next call: each kernel writes before it reads.
        for buffers in plan.scratch.kept.values():
            for t in buffers:
                t.fill_(-math.inf if t.is_floating_point() else 7)
    assert len(plan.scratch.kept) == 1  # all of it reused from the first call, and given back
    # The status goes to the caller: a fresh tensor on every call.
    if plan.checking:
        assert nearest._nearest_code_with_status(*data[0], precision, 3)[2] is not got[2]


class _EvictedMeanwhile(dict):
    """Plans as another thread leaves them: between finding the oldest plan and dropping it, the other
    thread drops that same plan."""

    def __iter__(self):
        oldest = next(dict.__iter__(self))
        dict.__delitem__(self, oldest)
        return iter([oldest])


def test_plan_eviction_tolerates_a_concurrent_eviction(kernel_device, monkeypatch):
    # Launchers run in several threads at once (nn.DataParallel replicas, threaded servers); a full
    # plan cache must not turn one thread's eviction of a plan another thread dropped into a KeyError.
    from vqfast.kernels import _common, nearest

    cache = _common.PlanCache(limit=2)
    cache.plans = _EvictedMeanwhile()
    for i in range(4):
        cache.add(("plan", i), i)
    assert cache.get(("plan", 3)) == 3 and len(cache.plans) <= 2
    monkeypatch.setattr(nearest, "_PLANS", _common.PlanCache(limit=1))
    nearest._PLANS.plans = _EvictedMeanwhile()
    c = torch.randn(5, 4, device=kernel_device)
    for n in (1, 2, 3):
        idx, _ = kernels.nearest_code(torch.randn(n, 4, device=kernel_device), c, precision="highest")
        assert idx.shape == (n,)


def _launcher_cases(device):
    """Calls of the planned launchers that differ in one thing a plan is computed from (shape, stride,
    dtype, scalar argument, flag), each a function that builds its inputs afresh and returns the
    launcher's outputs (for the upkeep launchers, the tensors they update in place)."""
    g = torch.Generator().manual_seed(61)
    n, k, d = 40, 9, 12
    z = torch.randn(n, 2 * d, generator=g)
    c = torch.randn(k, 2 * d, generator=g)
    idx = torch.randint(0, k, (n,), generator=g)
    grad = torch.randn(n, 2 * d, generator=g)
    dist = torch.rand(n, generator=g)
    seeds = torch.randn(k, d, generator=g)
    on = lambda t: t.to(device)  # noqa: E731
    zs, cs, gs = on(z[:, :d]), on(c[:, :d]), on(grad[:, :d])  # row stride 2 D
    zc, cc = on(z[:, :d].contiguous()), on(c[:, :d].contiguous())
    z_cols, c_cols = on(z[:, :d].t().contiguous().t()), on(c[:, :d].t().contiguous().t())  # column-major
    i = on(idx)

    def usage(decay=0.9, threshold=0.05, restart=True, ema=False, count_seeds=k, wide=False, strided=False):
        def run():
            counts = torch.cat([torch.bincount(idx[:n // 2], minlength=k), torch.tensor([n // 2])])
            state = [on(counts), on(torch.rand(k, generator=torch.Generator().manual_seed(1)) * 0.01),
                     on(torch.zeros(k)), on(torch.zeros(k, dtype=torch.int64)), on(torch.tensor(3.0))]
            weight = on(torch.randn(k, 2 * d if strided else d, generator=torch.Generator().manual_seed(2)))
            weight = weight[:, :d] if strided else weight
            weight = weight.double() if wide else weight
            ema_count = on(torch.ones(k)) if ema else None
            kernels.update_code_usage(*state, decay, threshold, on(seeds[:count_seeds]) if restart else None,
                                      weight if restart else None, ema_count if restart else None)
            return (*state[1:], weight, ema_count)
        return run

    def ema(decay=0.9, eps=1e-5, strided=False):
        def run():
            counts = on(torch.cat([torch.bincount(idx, minlength=k), torch.tensor([n])]))
            weight = on(torch.randn(k, 2 * d, generator=torch.Generator().manual_seed(3)))
            weight = weight[:, :d] if strided else weight.clone()[:, :d].contiguous()
            ema_count = on(torch.ones(k))
            kernels.ema_update(weight, ema_count, on(torch.randn(k, d, generator=torch.Generator().manual_seed(4))),
                               counts, decay, eps)
            return weight, ema_count
        return run

    ones = on(torch.ones(()))
    return {
        "fwd": lambda: kernels.quantize_forward(zc, cc, i, 0.25),
        "fwd beta": lambda: kernels.quantize_forward(zc, cc, i, 0.5),
        "fwd strided z": lambda: kernels.quantize_forward(zs, cc, i, 0.25),
        "fwd column-major codebook": lambda: kernels.quantize_forward(zc, c_cols, i, 0.25),
        "fwd fewer rows": lambda: kernels.quantize_forward(zc[:7], cc, i[:7], 0.25),
        "fwd fp16 z": lambda: kernels.quantize_forward(zc.half(), cc, i, 0.25),
        "fwd no rows": lambda: kernels.quantize_forward(zc[:0], cc, i[:0], 0.25),
        "bwd": lambda: kernels.quantize_backward(gs, ones, zc, cc, i, 0.25),
        "bwd beta": lambda: kernels.quantize_backward(gs, ones, zc, cc, i, 0.5),
        "bwd no grad_zq": lambda: kernels.quantize_backward(None, ones, zc, cc, i, 0.25),
        "bwd contiguous grad_zq": lambda: kernels.quantize_backward(gs.contiguous(), ones, zc, cc, i, 0.25),
        "bwd no codebook grad": lambda: kernels.quantize_backward(gs, ones, zc, cc, i, 0.25, False),
        "bwd column-major z": lambda: kernels.quantize_backward(gs, ones, z_cols, cc, i, 0.25),
        "bwd strided codebook": lambda: kernels.quantize_backward(gs, ones, zc, cs, i, 0.25),
        "bwd fewer codes": lambda: kernels.quantize_backward(gs, ones, zc, cc[:k - 2], i.clamp_max(k - 3), 0.25),
        "bwd no rows": lambda: kernels.quantize_backward(gs[:0], ones, zc[:0], cc, i[:0], 0.25),
        "gather": lambda: kernels.gather_rows(cc, i),
        "gather strided": lambda: kernels.gather_rows(cs, i),
        "gather fewer rows": lambda: kernels.gather_rows(cc, i[:5]),
        "gather fp16": lambda: kernels.gather_rows(cc.half(), i),
        "scatter": lambda: kernels.scatter_add_rows(gs.contiguous(), i, k),
        "scatter strided": lambda: kernels.scatter_add_rows(gs, i, k),
        "scatter more codes": lambda: kernels.scatter_add_rows(gs.contiguous(), i, k + 3),
        "scatter fp16 out": lambda: kernels.scatter_add_rows(gs.contiguous(), i, k, torch.float16),
        "bincount": lambda: kernels.bincount(i, k),
        "bincount more codes": lambda: kernels.bincount(i, k + 5),
        "bincount fewer rows": lambda: kernels.bincount(i[:11], k),
        "finite counts": lambda: kernels.finite_row_counts(i, on(dist), k),
        "finite counts inf": lambda: kernels.finite_row_counts(i, on(dist.masked_fill(dist > 0.5, math.inf)), k),
        "code usage": lambda: kernels.code_usage(i, k),
        "code usage more codes": lambda: kernels.code_usage(i, k + 4),
        "usage": usage(),
        "usage decay": usage(decay=0.5),
        "usage threshold": usage(threshold=0.2),
        "usage no restarts": usage(restart=False),
        "usage fewer seeds": usage(count_seeds=2),
        "usage ema": usage(ema=True),
        "usage fp64 codes": usage(wide=True),
        "usage strided codes": usage(strided=True),
        "ema": ema(),
        "ema decay": ema(decay=0.5),
        "ema eps": ema(eps=0.5),
        "ema strided codes": ema(strided=True),
    }


def _fresh_plans(monkeypatch):
    from vqfast.kernels import _common, gather, quantize, upkeep, usage

    for module, name in ((quantize, "_FORWARD_PLANS"), (quantize, "_BACKWARD_PLANS"), (gather, "_GATHER_PLANS"),
                         (gather, "_SCATTER_PLANS"), (usage, "_COUNT_PLANS"), (upkeep, "_USAGE_PLANS")):
        monkeypatch.setattr(module, name, _common.PlanCache())
    upkeep._ema_launch.cache_clear()
    usage._entropy_launch.cache_clear()


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.usefixtures("deterministic_on_cuda")  # (bit-exact sums by atomics on a GPU)
def test_launcher_plans_key_everything_they_depend_on(kernel_device, monkeypatch):
    # Each call on a fresh set of plans, then all of them again on the plans the others left: a key
    # that missed something a plan depends on would hand a call another problem's plan.
    cases = {name: (lambda run=run: _as_tuple(run())) for name, run in _launcher_cases(kernel_device).items()}
    fresh = {}
    for name, run in cases.items():
        _fresh_plans(monkeypatch)
        fresh[name] = run()
    for _ in range(2):
        for name, run in cases.items():
            outputs = run()
            assert len(outputs) == len(fresh[name]), name
            for got, want in zip(outputs, fresh[name]):
                assert (got is None) == (want is None), name
                if got is not None:
                    assert got.dtype == want.dtype and got.shape == want.shape, name
                    assert torch.equal(got, want), name


def test_launcher_plans_are_bounded_and_follow_the_switches(kernel_device, monkeypatch):
    from vqfast.kernels import _common, quantize

    plans = _common.PlanCache(limit=3)
    monkeypatch.setattr(quantize, "_FORWARD_PLANS", plans)
    c = torch.randn(5, 4, device=kernel_device)
    for n in range(1, 6):
        kernels.quantize_forward(torch.randn(n, 4, device=kernel_device), c,
                                 torch.zeros(n, dtype=torch.int64, device=kernel_device), 0.25)
    assert len(plans.plans) == 3
    assert [key[0][0] for key in plans.plans] == [3, 4, 5]  # the oldest go first
    # A plan exists only for inputs that passed the checks as they stand: a lowered row limit refuses
    # a problem it planned before.
    z = torch.randn(40, 4, device=kernel_device)
    idx = torch.zeros(40, dtype=torch.int64, device=kernel_device)
    kernels.quantize_forward(z, c, idx, 0.25)
    kernels.quantize_backward(None, torch.ones((), device=kernel_device), z, c, idx, 0.25)
    monkeypatch.setattr(_common, "MAX_ROWS", 10)
    with pytest.raises(ValueError, match="z has 40 rows"):
        kernels.quantize_forward(z, c, idx, 0.25)
    with pytest.raises(ValueError, match="z has 40 rows"):
        kernels.quantize_backward(None, torch.ones((), device=kernel_device), z, c, idx, 0.25)


def test_launchers_refuse_indices_and_shapes_they_would_misread(kernel_device):
    """The launchers read exactly N whole-number indices and D columns: other shapes, lengths or dtypes
    raise instead of being truncated or read past the end."""
    c = torch.arange(12.0, device=kernel_device).reshape(4, 3)
    z = torch.randn(4, 3, device=kernel_device)
    i2 = torch.tensor([[0, 1], [1, 1]], device=kernel_device)
    short = torch.tensor([0], device=kernel_device)
    calls = {
        "bincount 2-D": lambda: kernels.bincount(i2, 3),
        "code_usage 2-D": lambda: kernels.code_usage(i2, 3),
        "gather 2-D": lambda: kernels.gather_rows(c, i2),
        "gather float": lambda: kernels.gather_rows(c, torch.tensor([1.7, 2.2], device=kernel_device)),
        "gather 1-D codebook": lambda: kernels.gather_rows(torch.randn(5, device=kernel_device), short),
        "scatter short": lambda: kernels.scatter_add_rows(torch.ones(6, 3, device=kernel_device), short, 3),
        "forward short": lambda: kernels.quantize_forward(z, c, short, 0.25),
        "forward D": lambda: kernels.quantize_forward(torch.randn(4, 8, device=kernel_device), torch.randn(3, 4, device=kernel_device),
                                                      torch.tensor([0, 1, 2, 0], device=kernel_device), 0.25),
        "backward short": lambda: kernels.quantize_backward(None, torch.ones((), device=kernel_device), z, c, short, 0.25),
        "backward grad_zq": lambda: kernels.quantize_backward(torch.ones(3, 3, device=kernel_device),
                                                              torch.ones((), device=kernel_device), z, c,
                                                              torch.tensor([0, 1, 2, 3], device=kernel_device), 0.25),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match="indices|columns|2-D|grad_zq"):
            call()
            pytest.fail(name)
    # The same launchers with valid arguments (int32 indices too).
    idx = torch.tensor([3, 0, 0, 2], dtype=torch.int32, device=kernel_device)
    assert torch.equal(kernels.gather_rows(c, idx), c[idx.long()])
    assert kernels.bincount(idx, 4).tolist() == [2, 0, 1, 1]


def test_launchers_refuse_counts_and_numbers_they_would_misuse(kernel_device):
    """A negative num_codes would have the counting kernels add outside their buffer (a crash, or memory
    overwritten on a GPU); a negative tie tolerance would skip the tf32 re-check; a negative or NaN
    beta would give a wrong loss; other dtypes would be read as the kernels' own."""
    on = functools.partial(torch.as_tensor, device=kernel_device)
    i = on([0, 4, 2])
    z, c = on(torch.randn(5, 3) + 30), on(torch.randn(4, 3) + 30)
    ix = on([0, 1, 2, 3, 0])
    value_errors = {
        "code_usage -1": (lambda: kernels.code_usage(i, -1), "num_codes"),
        "code_usage_stats -1": (lambda: kernels.code_usage_stats(i, -1), "num_codes"),
        "finite_row_counts -1": (lambda: kernels.finite_row_counts(i, on([1.0, 1.0, 2.0]), -1), "num_codes"),
        "bincount float": (lambda: kernels.bincount(i, 5.0), "num_codes"),
        "scatter -2": (lambda: kernels.scatter_add_rows(on(torch.ones(3, 2)), i, -2), "num_codes"),
        "splits": (lambda: kernels.nearest_code(z, c, num_splits=-2), "num_splits"),
        "tolerance": (lambda: kernels.nearest_code(z, c, tie_tolerance_scale=-1.0), "tie_tolerance_scale"),
        "beta -1": (lambda: kernels.quantize_forward(z, c, ix, -1.0), "beta"),
        "beta nan": (lambda: kernels.quantize_forward(z, c, ix, float("nan")), "beta"),
        "backward beta": (lambda: kernels.quantize_backward(None, on(1.0), z, c, ix, -0.5), "beta"),
        "no codes": (lambda: kernels.quantize_forward(z, c[:0], ix, 0.25), "at least one code"),
        "no columns": (lambda: kernels.quantize_forward(z[:, :0], c[:, :0], ix, 0.25), "at least one"),
        "grad_loss": (lambda: kernels.quantize_backward(None, on(torch.ones(2)), z, c, ix, 0.25), "grad_loss"),
        # NaN would rotate no row, a negative bound every row (halfway vectors of norm 0 included).
        "halfway nan": (lambda: kernels.rotate_gradient(z, z + 1, z, float("nan")), "halfway_min"),
        "halfway -1": (lambda: kernels.rotate_gradient(z, z + 1, z, -1.0), "halfway_min"),
        "halfway inf": (lambda: kernels.rotate_gradient(z, z + 1, z, float("inf")), "halfway_min"),
    }
    for name, (call, message) in value_errors.items():
        with pytest.raises(ValueError, match=message):
            call()
            pytest.fail(name)
    type_errors = {
        "int z": lambda: kernels.quantize_forward(z.int(), c.int(), ix, 0.25),
        "float64 grad_zq": lambda: kernels.quantize_backward(z.double(), on(1.0), z, c, ix, 0.25),
        "out_dtype": lambda: kernels.scatter_add_rows(on(torch.ones(3, 2)), i, 5, "float16"),
        "complex codebook": lambda: kernels.gather_rows(c.to(torch.complex64), ix),
        "complex scatter": lambda: kernels.scatter_add_rows(on(torch.ones(3, 2, dtype=torch.complex64)), i, 5),
        "int scatter": lambda: kernels.scatter_add_rows(on(torch.ones(3, 2, dtype=torch.int32)), i, 5),
        # (The rotation kernel computes in fp32: float64 rows would be rounded, integers read as floats.)
        "float64 rotation": lambda: kernels.rotate_gradient(z.double(), z.double() + 1, z.double(), 0.0),
        "int rotation": lambda: kernels.rotate_gradient(z, z + 1, z.int(), 0.0),
    }
    for name, call in type_errors.items():
        with pytest.raises(TypeError, match="float32|dtype|real"):
            call()
            pytest.fail(name)
    # K = 0 counts nothing (as before), and the valid calls still run.
    assert kernels.code_usage(i, 0)[0].shape == (0,)
    assert kernels.nearest_code(z, c, tie_tolerance_scale=0.0)[0].shape == (5,)
    # Refused whatever an earlier call with an equal key (True == 1, 2.0 == 2) left in the plan cache.
    kernels.nearest_code(z, c, num_splits=1)
    kernels.nearest_code(z, c, tie_tolerance_scale=1)
    for bad in (dict(num_splits=True), dict(num_splits=1.0), dict(tie_tolerance_scale=True)):
        with pytest.raises(ValueError, match="num_splits|tie_tolerance_scale"):
            kernels.nearest_code(z, c, **bad)
    kernels.quantize_forward(z, c, ix, 1)
    kernels.quantize_backward(None, on(1.0), z, c, ix, 1)
    for call in (lambda: kernels.quantize_forward(z, c, ix, True),
                 lambda: kernels.quantize_backward(None, on(1.0), z, c, ix, True)):
        with pytest.raises(ValueError, match="beta"):
            call()
    assert torch.equal(kernels.quantize_forward(z, c, ix, 0.25)[0], c[ix])
    torch.testing.assert_close(kernels.rotate_gradient(z, z, z, 0.0), z)  # (codes = z: the identity rotation)


def test_each_fp32_mode_runs_its_own_passes(kernel_device):
    """"ieee" scores every code with fp32 products in one pass; the other modes run the tf32 pass with its
    re-check and search the listed rows again, with fp32 products for "highest" and tf32x3 otherwise."""
    from vqfast.kernels import nearest

    z, c = _data(9, 40, 12, torch.float32, kernel_device, seed=4)
    plain = nearest._Plan(z, c, "ieee", None, 1.0)
    assert not plain.checking and plain.search.search.meta["INPUT_PRECISION"] == "ieee"
    assert nearest._nearest_code_with_status(z, c, "ieee")[2] is None
    for precision, products in (("highest", "ieee"), ("high", "tf32x3"), ("medium", "tf32x3")):
        plan = nearest._Plan(z, c, precision, None, 1.0)
        assert plan.checking and plan.search.search.meta["INPUT_PRECISION"] == "tf32"
        assert plan.research.research.meta["INPUT_PRECISION"] == products
        assert nearest._nearest_code_with_status(z, c, precision)[2] is not None
    # 16-bit inputs: one pass, exact products on the tensor cores, whatever the mode.
    half = nearest._Plan(z.half(), c.half(), "highest", None, 1.0)
    assert not half.checking and half.search.search.meta["INPUT_PRECISION"] == "tf32"
    with pytest.raises(ValueError, match="precision must be one of"):
        kernels.nearest_code(z, c, precision="fp64")


def test_kept_buffers_survive_a_failed_allocation_and_count_each_key_once(kernel_device, monkeypatch):
    from vqfast.kernels import _common

    kept = _common.KeptBuffers([((8,), torch.float32)])
    budget_key = _common._scratch_key(kernel_device)[0]
    before = _common._KEPT_BYTES.get(budget_key, 0)

    def out_of_memory(self, device):
        raise torch.OutOfMemoryError("no memory")

    monkeypatch.setattr(_common.KeptBuffers, "_new", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        kept.take(kernel_device)
    monkeypatch.undo()
    assert not kept.owned and _common._KEPT_BYTES.get(budget_key, 0) == before  # nothing recorded
    buffers, token = kept.take(kernel_device)
    assert token is not None  # the stream can still keep its buffers
    kept.give_back(token, buffers)
    assert _common._KEPT_BYTES[budget_key] == before + 512
    kept.release()
    assert _common._KEPT_BYTES[budget_key] == before
