"""Checks that need a real GPU: bf16, tensor-core precision modes, split codebooks, 64-bit offsets.

Marked ``gpu``; skipped on machines without CUDA.
"""

import os

import numpy as np
import pytest
import torch

import vqfast
from helpers import chosen_gap
from vqfast import bench, kernels, reference

pytestmark = pytest.mark.gpu

DTYPES_PRECISIONS = [
    # fp32 products for every code.
    (torch.float32, "ieee", 1e-5),
    # tf32 products, then near ties settled in fp32 (two codes by the direct form, more by an fp32
    # search: fp32 products for "highest", tf32x3 for "high").
    (torch.float32, "highest", 1e-5),
    (torch.float32, "high", 1e-5),
    (torch.float32, "medium", 1e-5),
    # 16-bit products are exact in fp32 and summed in fp32: over the inputs' own values (the gaps below
    # are measured on them) the search is an fp32 search, held to the fp32 bound as on the CPU.
    (torch.float16, "highest", 1e-5),
    (torch.bfloat16, "highest", 1e-5),
]


def _data(n, k, d, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(n, d, device="cuda", generator=g).to(dtype),
            torch.randn(k, d, device="cuda", generator=g).to(dtype))


@pytest.mark.parametrize("dtype,precision,tol", DTYPES_PRECISIONS)
@pytest.mark.parametrize("n,k,d", [(1, 1, 1), (1000, 333, 100), (4096, 5000, 256), (513, 2049, 1000)])
def test_nearest_code_precision_modes(dtype, precision, tol, n, k, d):
    z, c = _data(n, k, d, dtype)
    idx, dist = kernels.nearest_code(z, c, precision=precision)
    assert ((idx >= 0) & (idx < k)).all()
    rows = torch.arange(0, n, max(1, n // 256), device="cuda")
    assert chosen_gap(z[rows].float(), c.float(), idx[rows]).max() <= tol
    # The distance is summed directly from the chosen code in fp32, in every precision mode.
    d_chosen = ((z[rows].double() - c[idx[rows]].double()) ** 2).sum(1)
    assert ((dist[rows].double() - d_chosen).abs() <= 1e-5 * d_chosen + 1e-6).all()


@pytest.mark.parametrize("dtype,precision,tol", [(torch.float32, "ieee", 1e-5), (torch.float32, "highest", 1e-5),
                                                 (torch.float32, "high", 1e-5), (torch.bfloat16, "highest", 1e-5)])
@pytest.mark.parametrize("n,k,d", [(3000, 5000, 128), (700, 20000, 64)])
def test_autotuned_search(monkeypatch, dtype, precision, tol, n, k, d):
    # The rest of the suite runs with VQFAST_AUTOTUNE=0 (one configuration); here every candidate is
    # compiled and timed and the fastest one must be right too.
    monkeypatch.setenv("VQFAST_AUTOTUNE", "1")
    z, c = _data(n, k, d, dtype, seed=7)
    idx, _ = kernels.nearest_code(z, c, precision=precision)
    rows = torch.arange(0, n, max(1, n // 256), device="cuda")
    assert chosen_gap(z[rows].float(), c.float(), idx[rows]).max() <= tol
    if dtype == torch.float32:
        exact, _ = reference.nearest_code(z.cpu(), c.cpu())
        assert (idx.cpu() == exact).float().mean() > 0.999


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autotuned_memory_bound_kernels(monkeypatch, dtype):
    # Gather, scatter-add, the fused VQ step and bincount time their candidates on the first call of a
    # problem size; the accumulating ones time into scratch buffers, so the results must be exact.
    from vqfast.kernels import _common

    from vqfast.kernels import usage

    monkeypatch.setenv("VQFAST_AUTOTUNE", "1")
    monkeypatch.setattr(_common, "_TUNED", {})
    # Every candidate timed, the streaming-hint twins included (real problems get them from 128 MiB).
    monkeypatch.setattr(_common, "STREAMING_MIN_BYTES", 0)
    monkeypatch.setattr(usage, "STREAMING_MIN_BYTES", 0)
    n, k, d = 70000, 3000, 96
    z, c = _data(n, k, d, dtype, seed=8)
    idx = torch.randint(0, k, (n,), device="cuda")
    grad = torch.randn(n, d, device="cuda").to(dtype)
    assert torch.equal(kernels.gather_rows(c, idx), c[idx])
    expected = torch.zeros(k, d, device="cuda").index_add_(0, idx, grad.float())
    torch.testing.assert_close(kernels.scatter_add_rows(grad, idx, k, torch.float32), expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(kernels.bincount(idx, k), torch.bincount(idx, minlength=k))
    z_q, loss = kernels.quantize_forward(z, c, idx, 0.25)
    diff = c[idx].float() - z.float()
    assert torch.equal(z_q, c[idx])
    torch.testing.assert_close(loss, 1.25 * diff.pow(2).mean(), rtol=1e-4, atol=0)
    _, gc = kernels.quantize_backward(None, torch.ones((), device="cuda"), z, c, idx, 0.25)
    expected = torch.zeros(k, d, device="cuda").index_add_(0, idx, 2 * diff / (n * d))
    torch.testing.assert_close(gc.float(), expected.to(dtype).float(), rtol=1e-2, atol=1e-6)
    assert len(_common._TUNED) == 5


@pytest.mark.parametrize("dtype,precision", [(torch.float32, "highest"), (torch.float32, "ieee"),
                                             (torch.bfloat16, "highest")])
def test_split_codebook_few_rows_many_codes(dtype, precision):
    z, c = _data(1024, 262144, 64, dtype, seed=1)
    idx_auto, dist_auto = kernels.nearest_code(z, c, precision=precision)
    idx_one, dist_one = kernels.nearest_code(z, c, precision=precision, num_splits=1)
    tol = 1e-5  # also for bf16: the gap is measured on the bf16 values themselves
    rows = torch.arange(0, 1024, 8, device="cuda")
    assert chosen_gap(z[rows].float(), c.float(), idx_auto[rows]).max() <= tol
    if dtype == torch.float32:
        assert (idx_auto == idx_one).float().mean() > 0.999
    torch.testing.assert_close(dist_auto, dist_one, rtol=1e-3, atol=1e-3)


def test_more_than_2_pow_31_elements():
    n, d, k = (1 << 31) // 64 + 4099, 64, 40
    g = torch.Generator(device="cuda").manual_seed(2)
    c = torch.randn(k, d, device="cuda", generator=g, dtype=torch.bfloat16)
    z = torch.empty(n, d, device="cuda", dtype=torch.bfloat16)
    z.normal_(generator=g)
    assert z.numel() > 2**31
    idx, dist = kernels.nearest_code(z, c)
    tail = torch.arange(n - 5000, n, device="cuda")  # rows beyond the 32-bit offset range
    ref_idx, _ = reference.nearest_code(z[tail].float(), c.float())
    assert chosen_gap(z[tail].float(), c.float(), idx[tail]).max() <= 1e-5
    assert (idx[tail] == ref_idx).float().mean() > 0.99
    z_q, loss = kernels.quantize_forward(z, c, idx, 0.25)
    assert torch.equal(z_q[tail], c[idx[tail]])
    del z_q
    counts, _, _ = kernels.code_usage(idx, k)
    assert counts.sum().item() == n


def test_codebook_with_more_than_2_pow_31_elements():
    # K * D > 2**31: the codes past the 32-bit offset range must be searched, gathered and scattered into.
    k, d = (1 << 31) // 64 + 4099, 64
    g = torch.Generator(device="cuda").manual_seed(9)
    c = torch.empty(k, d, device="cuda", dtype=torch.bfloat16)
    c.normal_(generator=g)
    assert c.numel() > 2**31
    far = torch.arange(k - 300, k, device="cuda")
    z = c[far].clone()  # each row is one of the last codes: its own code is the unique nearest
    idx, dist = kernels.nearest_code(z, c)
    assert torch.equal(idx, far)
    assert (dist == 0).all()
    assert torch.equal(kernels.gather_rows(c, far), z)
    summed = kernels.scatter_add_rows(torch.ones(300, d, device="cuda"), far, k, torch.float32)
    assert (summed[far] == 1).all() and summed.sum().item() == 300 * d


def test_nan_inputs_on_gpu():
    z, c = _data(300, 700, 32, torch.bfloat16, seed=3)
    z[0] = float("nan")
    z[5, 3] = float("inf")
    c[11] = float("nan")
    for splits in (None, 5):
        idx, dist = kernels.nearest_code(z, c, num_splits=splits)
        assert ((idx >= 0) & (idx < 700)).all() and not (idx == 11).any()
        assert torch.isnan(dist[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_and_gather_gradients_16_bit(dtype):
    z0, c0 = _data(5000, 300, 64, dtype, seed=4)
    z = z0.clone().requires_grad_()
    c = c0.clone().requires_grad_()
    z_q, loss, idx = vqfast.quantize(z, c, beta=0.25)
    assert z_q.dtype == dtype and torch.equal(z_q, c0[idx])
    upstream = torch.randn_like(z0)
    (z_q * upstream).sum().backward(retain_graph=True)
    loss.backward()
    z_ref = z0.double().requires_grad_()
    c_ref = c0.double().requires_grad_()
    zq_ref, loss_ref, _ = reference.quantize(z_ref, c_ref, beta=0.25, indices=idx)
    ((zq_ref * upstream.double()).sum() + loss_ref).backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(loss.double(), loss_ref.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(z.grad.double(), z_ref.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(c.grad.double(), c_ref.grad, rtol=tol, atol=1e-4)

    g = vqfast.gather(c, idx)
    c.grad = None
    g.sum().backward()
    # Accumulated exactly in fp32, then rounded once to the codebook dtype (bf16 cannot hold every
    # integer above 256).
    counts = torch.bincount(idx, minlength=300).to(torch.float32).to(dtype).double()
    torch.testing.assert_close(c.grad.double(), counts[:, None].expand(300, 64), rtol=0, atol=0)


def test_code_usage_million_indices():
    idx = torch.randint(0, 65536, (1 << 20,), device="cuda")
    counts, entropy, perplexity = vqfast.code_usage(idx, 65536)
    ref_counts, ref_entropy, _ = reference.code_usage(idx.cpu(), 65536)
    assert torch.equal(counts.cpu(), ref_counts)
    torch.testing.assert_close(entropy.cpu(), ref_entropy, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d", [200, 256])
def test_every_wide_tf32_candidate_gives_the_fp32_indices(monkeypatch, d):
    # fp32 with tf32 products at 128 < D <= 256: candidates with a whole D per tile and with 64-column
    # slices. The autotuner runs the fastest only, so each one is run here on its own.
    from vqfast.kernels import _launch, nearest

    monkeypatch.setenv("VQFAST_AUTOTUNE", "1")
    tuner = nearest._nearest_code_wide_tf32_autotuned
    z, c = _data(3000, 5000, d, torch.float32, seed=8)
    exact, _ = kernels.nearest_code(z, c, precision="ieee")
    candidates = nearest._prune_wide_tf32_configs(tuner.configs, {"z_ptr": z}, INPUT_PRECISION="tf32", RECHECK=True)
    whole = [cfg for cfg in candidates if cfg.kwargs["SINGLE_D"]]
    assert whole and len(whole) < len(candidates)
    # (Every whole-D candidate, at an even and an odd D; of the sliced ones, which other tests cover at
    # other D, the first: each candidate is one more compile.)
    for cfg in whole + ([candidates[0]] if d == 256 else []):
        monkeypatch.setattr(tuner, "configs", [cfg])
        tuner.cache.clear()
        with _launch.launch_path(direct=False):  # through the autotuner, which now has this one candidate
            idx, _ = kernels.nearest_code(z, c, precision="high")
        assert tuner.best_config is cfg
        differ = (idx != exact).nonzero().flatten()
        assert differ.numel() <= 3, cfg
        if differ.numel():
            assert chosen_gap(z[differ], c, idx[differ]).max() <= 1e-5, cfg
    tuner.cache.clear()


@pytest.mark.parametrize("n,k,d,splits", [(4096, 8192, 256, None), (1000, 70001, 64, 7)])
def test_every_pipelined_candidate_gives_the_plain_search_results(monkeypatch, n, k, d, splits):
    # The 16-bit search that issues the next tile's product before this tile's argmin (PIPELINE): each
    # candidate on its own against the plain one, with whole tiles (K = 8,192) and masked ones (K =
    # 70,001 in 7 splits: no tile size divides the split, the last split ends in a partial tile).
    from vqfast.kernels import _launch, nearest

    monkeypatch.setenv("VQFAST_AUTOTUNE", "1")
    monkeypatch.setenv("VQFAST_PIPELINED_SEARCH", "1")  # (the candidates are opt-in)
    tuner = nearest._nearest_code_autotuned
    z, c = _data(n, k, d, torch.bfloat16, seed=9)
    z[:4] = c[k - 1]  # (rows whose code is in the last tile)
    expected = None
    # (The candidates the autotuner would time here: those that fit in shared memory.)
    candidates = nearest._select_configs(tuner.configs, "tf32", max(16, d), True, 2,
                                         nearest._shared_memory_for_tiles(False), True)
    plain = [cfg for cfg in candidates if not cfg.kwargs["PIPELINE"]][:1]
    pipelined = [cfg for cfg in candidates if cfg.kwargs["PIPELINE"]]
    assert len(pipelined) == len(nearest._PIPELINED_TILES)
    for cfg in plain + pipelined:
        monkeypatch.setattr(tuner, "configs", [cfg])
        tuner.cache.clear()
        with _launch.launch_path(direct=False):
            got = kernels.nearest_code(z, c, num_splits=splits)
        if expected is None:
            expected = got
            assert (got[0][:4] == k - 1).all()
            continue
        assert tuner.best_config is cfg
        assert torch.equal(got[0], expected[0]), cfg
        assert torch.equal(got[1], expected[1]), cfg
    tuner.cache.clear()


@pytest.mark.parametrize("precision", ["high", "highest"])
def test_tf32_search_gives_exact_fp32_indices_on_a_million_rows(precision):
    from vqfast.kernels.nearest import _nearest_code_with_status

    z, c = _data(1_000_000, 4096, 64, torch.float32, seed=5)
    exact, _ = kernels.nearest_code(z, c, precision="ieee")
    fast, _, status = _nearest_code_with_status(z, c, precision=precision)
    shares = torch.bincount(status.long(), minlength=3)
    assert shares[1] > 0 and shares[0] > 0.5 * z.shape[0]  # the bound leaves most rows sure
    # A row settled by the re-check (between two codes by the direct form ||z - c||^2, or searched again
    # with tf32x3 or fp32 products) may differ from the fp32 search (expanded form, fp32 products) only where
    # both codes are equally near to within fp32 rounding.
    differ = (fast != exact).nonzero().flatten()
    assert differ.numel() <= 1e-3 * z.shape[0]
    if differ.numel():
        assert (status[differ] != 0).all()
        assert chosen_gap(z[differ], c, exact[differ]).max() <= 1e-5
    # The tf32 picks: not just within the 1e-5 of the precision rule, which tf32 rounding alone can meet,
    # but at most fp32-level slack beyond an fp32 search's pick (the benchmark's criterion; it compares
    # with a torch fp32 search, which may round near ties otherwise than the kernel's plain one).
    report = bench.agreement_with_fp32(z, c, fast)
    assert report.wrong == 0, report


def test_tf32_search_on_adversarial_near_ties():
    # Each row sits just off the midpoint of two codes: tf32 products alone cannot separate them.
    g = torch.Generator(device="cuda").manual_seed(6)
    k, d, n = 2048, 256, 20000
    c = torch.randn(k, d, device="cuda", generator=g)
    a = torch.randint(0, k, (n,), device="cuda", generator=g)
    b = (a + 1 + torch.randint(0, k - 1, (n,), device="cuda", generator=g)) % k
    mid = 0.5 * (c[a] + c[b])
    z = mid + 1e-5 * (c[a] - c[b])
    exact, _ = kernels.nearest_code(z, c, precision="ieee")
    for precision in ("high", "highest"):
        fast, _ = kernels.nearest_code(z, c, precision=precision)
        assert torch.equal(fast, exact), precision
    assert (exact == a).float().mean() > 0.9


@pytest.mark.parametrize("scale", [1e-18, 1e-20])
def test_tf32_search_on_tiny_near_ties(scale):
    # As above, scaled down until the squares of what tf32 drops are subnormal or underflow, which GPUs
    # flush to zero: the bound's absolute term must still send these rows to the fp32 re-check.
    g = torch.Generator(device="cuda").manual_seed(6)
    k, d, n = 2048, 256, 20000
    c = torch.randn(k, d, device="cuda", generator=g)
    a = torch.randint(0, k, (n,), device="cuda", generator=g)
    b = (a + 1 + torch.randint(0, k - 1, (n,), device="cuda", generator=g)) % k
    z = (0.5 * (c[a] + c[b]) + 1e-5 * (c[a] - c[b])) * scale
    c = c * scale
    exact, _ = kernels.nearest_code(z, c, precision="ieee")
    for precision in ("high", "highest"):
        fast, _ = kernels.nearest_code(z, c, precision=precision)
        assert torch.equal(fast, exact), precision
    assert (exact == a).float().mean() > 0.9


def _captured(fn):
    """``fn`` warmed up on a side stream (compilation, autotuning), then captured in a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@pytest.mark.parametrize("dtype,precision", [(torch.float32, "highest"), (torch.float32, "high"),
                                             (torch.bfloat16, "highest")])
def test_ops_replay_from_a_cuda_graph(monkeypatch, dtype, precision):
    """No host synchronisation inside the search, quantize or the eval layer: they capture and replay,
    which is how small (launch-bound) problems avoid the host's launch cost."""
    monkeypatch.setenv("VQFAST_BACKEND", "triton")
    z, c = _data(1024, 4096, 128, dtype, seed=5)
    vq = vqfast.VectorQuantizer(4096, 128).cuda().eval()
    graph, (idx, dist, z_q, loss, layer_idx) = _captured(
        lambda: (*vqfast.nearest_code(z, c, precision=precision), *vqfast.quantize(z, c, precision=precision)[:2],
                 vq(z.float())[2]))
    z.copy_(_data(1024, 4096, 128, dtype, seed=6)[0])  # new inputs, same buffers
    graph.replay()
    torch.cuda.synchronize()
    ref_idx, ref_dist = vqfast.nearest_code(z, c, precision=precision)
    assert torch.equal(idx, ref_idx) and torch.equal(dist, ref_dist)
    ref_zq, ref_loss, _ = vqfast.quantize(z, c, precision=precision)
    assert torch.equal(z_q, ref_zq) and torch.equal(loss, ref_loss)
    assert torch.equal(layer_idx, vq(z.float())[2])


def test_codebook_upkeep_on_a_large_codebook_replays_from_a_cuda_graph():
    """The statistics and restarts of 70,000 codes (69 programs, 1,024 seed rows) match the reference,
    and need no host synchronisation: the update captures and replays."""
    from test_upkeep import _assert_same_update, _run, _upkeep_state

    k = 70000
    state = _upkeep_state(k, 64, 1024, seed=3, device="cuda")
    want = {name: t.cpu().clone() for name, t in state.items()}
    before = want["weight"].clone()
    graph, _ = _captured(lambda: _run(kernels.update_code_usage, state, 0.5 / k))
    graph.replay()  # the second step (the warm-up run was the first)
    torch.cuda.synchronize()
    for _ in range(2):
        _run(reference.update_code_usage, want, 0.5 / k)
    _assert_same_update(state, want)
    assert int((want["weight"] != before).any(dim=1).sum()) > 1024  # both steps restarted codes


@pytest.mark.parametrize("restarts", [False, True])
def test_layer_training_step_replays_from_a_cuda_graph(restarts):
    """A training step of the layer (forward, statistics, restarts, backward into the codebook) has no
    host synchronisation: it captures, and each replay equals an eager step on the same batch (with
    restarts, whose random seeds differ between the graph and eager runs, only that it runs)."""
    import copy

    torch.manual_seed(9)
    eager = vqfast.VectorQuantizer(512, 64, dead_code_threshold=0.5 if restarts else 0.0).cuda()
    graphed = copy.deepcopy(eager)
    xs = [torch.randn(256, 64, device="cuda") * (1 + i) for i in range(4)]
    static = xs[0].clone()

    def step(layer, x):
        z_q, loss, idx = layer(x)
        (z_q.square().sum() + loss).backward()
        return idx

    graph, idx_graph = _captured(lambda: step(graphed, static))  # its warm-up ran a step on xs[0]
    step(eager, xs[0])
    for x in xs[1:]:
        static.copy_(x)
        graph.replay()
        idx_eager = step(eager, x)
        torch.cuda.synchronize()
        assert ((idx_graph >= 0) & (idx_graph < 512)).all()
        if not restarts:
            assert torch.equal(idx_graph, idx_eager)
    assert torch.isfinite(graphed.embeddings.weight).all() and torch.isfinite(graphed.embeddings.weight.grad).all()
    if not restarts:
        torch.testing.assert_close(graphed.embeddings.weight.grad, eager.embeddings.weight.grad)
        buffers = dict(graphed.named_buffers())
        for name, value in eager.named_buffers():
            torch.testing.assert_close(buffers[name], value, msg=name)
        assert graphed.codebook_usage()["steps"] == 4


@pytest.mark.parametrize("restarts", [False, True])
def test_masked_layer_step_replays_from_a_cuda_graph(restarts):
    """With a padding mask (fused kernels leaving the padding out, restart seeds from the kept rows) a
    training step still has no host synchronisation: it captures, and replays equal eager steps."""
    import copy

    torch.manual_seed(10)
    eager = vqfast.VectorQuantizer(512, 64, dead_code_threshold=0.5 if restarts else 0.0).cuda()
    graphed = copy.deepcopy(eager)
    xs = [torch.randn(8, 32, 64, device="cuda") * (1 + i) for i in range(4)]
    masks = [torch.rand(8, 32, device="cuda") < 0.3 + 0.2 * i for i in range(4)]
    static, static_mask = xs[0].clone(), masks[0].clone()

    def step(layer, x, mask):
        z_q, loss, idx = layer(x, mask=mask)
        (z_q.square().sum() + loss).backward()
        return idx

    graph, idx_graph = _captured(lambda: step(graphed, static, static_mask))
    step(eager, xs[0], masks[0])
    for x, mask in zip(xs[1:], masks[1:]):
        static.copy_(x)
        static_mask.copy_(mask)
        graph.replay()
        idx_eager = step(eager, x, mask)
        torch.cuda.synchronize()
        assert bool((idx_graph[~mask] == -1).all()) and bool((idx_graph[mask] >= 0).all())
        if not restarts:
            assert torch.equal(idx_graph, idx_eager)
    assert torch.isfinite(graphed.embeddings.weight).all()
    if not restarts:
        torch.testing.assert_close(graphed.embeddings.weight.grad, eager.embeddings.weight.grad)
        assert int(graphed.batch_counts.sum()) == int(masks[-1].sum())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_masked_quantize_in_16_bit_matches_the_kept_rows_alone(dtype):
    # Rows near their codes: no near ties, which 16-bit products may settle either way (the precision
    # rule), so the indices can be compared as they are.
    _, c = _data(3000, 700, 96, dtype, seed=3)
    g = torch.Generator(device="cuda").manual_seed(4)
    near = torch.randint(0, 700, (3000,), device="cuda", generator=g)
    z = (c[near].float() + 0.01 * torch.randn(3000, 96, device="cuda", generator=g)).to(dtype)
    mask = torch.rand(3000, device="cuda", generator=g) < 0.6
    z = torch.where(mask[:, None], z, float("nan")).requires_grad_(True)
    codebook = c.clone().requires_grad_(True)
    z_q, loss, idx = vqfast.quantize(z, codebook, mask=mask)
    loss.backward()  # (z_q holds the NaN padding: its own gradient is the upstream one, tested elsewhere)
    kept = z.detach()[mask].clone().requires_grad_(True)
    codebook1 = c.clone().requires_grad_(True)
    z_q1, loss1, idx1 = vqfast.quantize(kept, codebook1)
    loss1.backward()
    assert loss.dtype == torch.float32 and torch.equal(idx[mask], idx1) and bool((idx[~mask] == -1).all())
    assert torch.equal(idx1, near[mask])
    assert torch.equal(z_q[mask], z_q1) and bool(z_q[~mask].isnan().all())
    torch.testing.assert_close(loss, loss1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z.grad[mask].float(), kept.grad.float(), rtol=2e-2, atol=1e-4)
    assert bool((z.grad[~mask] == 0).all())
    torch.testing.assert_close(codebook.grad.float(), codebook1.grad.float(), rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("amp", [False, True])
def test_vqvae_trains_on_the_gpu_with_the_triton_backend(tmp_path, amp):
    from vqfast.models.train import TrainConfig, train

    backend_before = os.environ.get("VQFAST_BACKEND")
    result = train(TrainConfig(model="vqvae", data="sample", limit=256, batch_size=32, epochs=2, device="cuda",
                               backend="triton", amp=amp, num_codes=512, progress=False, eval_limit=128,
                               out=str(tmp_path / "run")))
    first, last = result.history[0], result.history[-1]
    assert np.isfinite(last["avg_loss"]) and last["avg_loss"] < first["avg_loss"]
    # 16 steps are too few for restarts to keep codes alive (the CPU backend's run also ends with a
    # handful); the statistics must still be those of the codes the layer chose.
    assert 1 <= last["codes_used"] <= 512 and 1.0 <= last["perplexity"] <= last["codes_used"] + 1e-6
    assert os.environ.get("VQFAST_BACKEND") == backend_before  # train() restores the caller's backend
    assert result.test_metrics is not None and np.isfinite(result.test_metrics["mse"])
    for name in ("reconstructions.png", "codebook_usage.png", "loss_curve.png", "checkpoint.pt"):
        assert (tmp_path / "run" / name).is_file()


@pytest.mark.parametrize("dtype,precision", [(torch.float32, "highest"), (torch.bfloat16, "highest")])
def test_kept_search_buffers_across_streams_and_a_cuda_graph(dtype, precision):
    """A search plan keeps its scratch per stream, and not in a CUDA graph: calls interleaved
    on two streams without synchronising, and a graph replayed between eager calls, each give their own
    indices (a shared buffer would mix the calls' codebook norms and split winners)."""
    from vqfast.kernels import _common

    gen = torch.Generator(device="cuda").manual_seed(21)
    codebooks = [torch.randn(4096, 128, device="cuda", generator=gen).to(dtype) for _ in range(2)]
    zs = [torch.randn(1024, 128, device="cuda", generator=gen).to(dtype) for _ in range(8)]
    want = [kernels.nearest_code(z.float(), codebooks[i % 2].float(), precision="ieee")[0] for i, z in enumerate(zs)]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    got = []
    for i, z in enumerate(zs):
        with torch.cuda.stream(streams[i % 2]):
            got.append(kernels.nearest_code(z, codebooks[i % 2], precision=precision)[0])
    torch.cuda.synchronize()
    tol = 1e-5  # 16-bit gaps are measured on the 16-bit values themselves
    for i, (idx, ref) in enumerate(zip(got, want)):
        if dtype == torch.float32:
            assert torch.equal(idx, ref), i
        else:
            assert chosen_gap(zs[i].float(), codebooks[i % 2].float(), idx).max() <= tol, i
    static_z = zs[0].clone()
    kernels.nearest_code(static_z, codebooks[0], precision=precision)  # warm-up outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        assert _common._scratch_key(static_z.device) is None
        static_idx, _ = kernels.nearest_code(static_z, codebooks[0], precision=precision)
    static_z.copy_(zs[2])
    graph.replay()
    eager, _ = kernels.nearest_code(zs[4], codebooks[0], precision=precision)
    graph.replay()
    torch.cuda.synchronize()
    for idx, i in ((static_idx, 2), (eager, 4)):
        assert chosen_gap(zs[i].float(), codebooks[0].float(), idx).max() <= tol
        if dtype == torch.float32:
            assert torch.equal(idx, want[i])


def test_rotation_kernel_in_bfloat16():
    """kernels/rotation.py on bf16 rows (the interpreter cannot run bf16): the float64 rotation's gradient
    to bf16 rounding, and the upstream gradient on a zero row."""
    g = torch.Generator(device="cuda").manual_seed(4)
    z = torch.randn(3000, 200, device="cuda", generator=g).bfloat16()
    q = torch.randn(3000, 200, device="cuda", generator=g).bfloat16()
    z[5] = 0
    upstream = torch.randn(3000, 200, device="cuda", generator=g).bfloat16()
    x = z.clone().requires_grad_(True)
    vqfast.rotate_to_codes(x, q).backward(upstream)
    zd, qd, ud = z.double(), q.double(), upstream.double()
    z_unit, q_unit = zd / zd.norm(dim=1, keepdim=True), qd / qd.norm(dim=1, keepdim=True)
    r = (z_unit + q_unit) / (z_unit + q_unit).norm(dim=1, keepdim=True)
    scale = qd.norm(dim=1, keepdim=True) / zd.norm(dim=1, keepdim=True)
    want = scale * (ud - 2 * r * (r * ud).sum(1, keepdim=True) + 2 * z_unit * (q_unit * ud).sum(1, keepdim=True))
    error = (x.grad.double() - want).norm(dim=1) / want.norm(dim=1)
    error[5] = 0
    assert x.grad.dtype == torch.bfloat16 and float(error.max()) < 1e-2
    assert torch.equal(x.grad[5], upstream[5])


@pytest.mark.parametrize("dtype,precision", [(torch.float32, "ieee"), (torch.float32, "highest"),
                                             (torch.float32, "high"), (torch.float16, "highest"),
                                             (torch.bfloat16, "highest")])
def test_copies_of_random_codes_tie_and_the_first_wins(dtype, precision):
    # The interpreter's tl.dot (NumPy) rounds columns of a tile differently, so it cannot show this: on the
    # tensor cores, copies of a code (in one tile, in other tiles, in other splits) score alike, and
    # every row near them gets the first copy.
    z, c = _data(300, 3000, 100, dtype, seed=11)
    copies = [5, 13, 21, 130, 1999, 2990]
    c[copies] = c[copies[0]].clone()
    near = c[copies[0]].float() + 0.01 * torch.randn(300, 100, device="cuda")
    z = torch.cat([z, near.to(dtype)])
    for splits in (None, 1, 6):
        idx, _ = kernels.nearest_code(z, c, precision=precision, num_splits=splits)
        on_copies = torch.isin(idx, torch.tensor(copies, device="cuda"))
        assert bool(on_copies[300:].all()) and set(idx[on_copies].tolist()) == {copies[0]}, (splits, precision)


def test_projected_quantizer_trains_on_the_gpu_under_bf16_autocast(monkeypatch):
    """ProjectedVectorQuantizer on the kernels, under bf16 autocast as `--amp` trains: the indices are the
    nearest codes of the projected rows (distance of the chosen code against the fp64 minimum), padding
    keeps z, and a few Adam steps leave every parameter finite and the loss lower."""
    monkeypatch.setenv("VQFAST_BACKEND", "triton")
    torch.manual_seed(0)
    pvq = vqfast.ProjectedVectorQuantizer(1024, 256, 16, metric="cosine").cuda()
    z = torch.randn(16, 256, 8, 8, device="cuda")
    mask = torch.rand(16, 8, 8, device="cuda") < 0.9
    opt = torch.optim.Adam(pvq.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            z_q, loss, indices = pvq(z, mask=mask)
        opt.zero_grad()
        (loss + (z_q.float() - z).pow(2)[mask.unsqueeze(1).expand_as(z)].mean()).backward()
        opt.step()
        losses.append(float(loss))
    assert all(bool(torch.isfinite(p).all()) for p in pvq.parameters())
    assert losses[-1] < losses[0]
    pad = ~mask.unsqueeze(1).expand_as(z)
    # (Padding keeps z, in z_q's dtype: bf16, the projection's output under autocast.)
    assert bool((indices[~mask] == -1).all()) and torch.equal(z_q[pad], z[pad].to(z_q.dtype))
    pvq.eval()
    idx = pvq.encode(z)
    with torch.no_grad():
        rows = reference.unit_rows(pvq.project_in(z.movedim(1, -1)).reshape(-1, 16).double())
        codes = reference.unit_rows(pvq.quantizer.embeddings.weight.double())
        d = torch.cdist(rows, codes) ** 2
        chosen = d.gather(1, idx.reshape(-1, 1)).squeeze(1)
    assert bool((chosen - d.min(1).values <= 1e-5 * (1 + d.min(1).values)).all())
