"""The opt-in TMA, warp-specialised search (kernels/nearest_tma.py, VQFAST_TMA_SEARCH=1): 16-bit rows,
and fp32 rows in the tf32 pass with its re-check.

On the CPU the kernel runs through Triton's interpreter (which reads tensor descriptors and ignores
warp specialisation; tf32 products are emulated by truncation where it matters); the GPU tests run
every autotuning candidate.
"""

import pytest
import torch

from helpers import chosen_gap, near_tie_rows
from vqfast import kernels, reference
from vqfast.kernels import nearest_tma

HAS_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
pytestmark = pytest.mark.tma


@pytest.fixture
def tma_calls(monkeypatch):
    """Switches the TMA search on and counts the calls that take it."""
    monkeypatch.setenv("VQFAST_TMA_SEARCH", "1")
    calls = []
    launch = nearest_tma.TmaSearch.__call__

    def counted(self, *args):
        calls.append(self)
        return launch(self, *args)

    monkeypatch.setattr(nearest_tma.TmaSearch, "__call__", counted)
    return calls


def _rows(n, d, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g).to(dtype).to(device)


def _usual_search(monkeypatch, z, c, splits):
    monkeypatch.setenv("VQFAST_TMA_SEARCH", "0")
    try:
        return kernels.nearest_code(z, c, num_splits=splits)
    finally:
        monkeypatch.setenv("VQFAST_TMA_SEARCH", "1")


@pytest.mark.parametrize("n,k,d,splits", [
    (1, 1, 8, None), (1, 5, 16, None), (37, 19, 24, None), (64, 64, 64, None), (50, 300, 200, 3),
    (33, 70, 40, 2), (129, 97, 256, None), (100, 1000, 48, 4), (7, 3, 8, 3),
])
def test_tma_search_matches_the_usual_kernel_and_the_fp64_minimum(tma_calls, monkeypatch, kernel_device,
                                                                   n, k, d, splits):
    if kernel_device.type == "cuda" and not HAS_HOPPER:
        pytest.skip("TMA needs compute capability 9.0")
    z = _rows(n, d, torch.float16, kernel_device, 1)
    c = _rows(k, d, torch.float16, kernel_device, 2)
    idx, dist = kernels.nearest_code(z, c, num_splits=splits)
    assert len(tma_calls) == 1
    assert idx.dtype == torch.int64 and dist.dtype == torch.float32 and idx.shape == (n,)
    # 16-bit inputs multiply exactly in fp32: over their own values it is an fp32 search.
    assert chosen_gap(z, c, idx).max() <= 1e-5
    direct = ((z.double() - c.double()[idx]) ** 2).sum(1)
    torch.testing.assert_close(dist.double(), direct, rtol=1e-5, atol=1e-5)
    usual_idx, usual_dist = _usual_search(monkeypatch, z, c, splits)
    assert len(tma_calls) == 1
    if kernel_device.type == "cpu":
        # The same tiles, scores, slots and epilogue as the usual kernel: the same answer, bit for bit.
        assert torch.equal(idx, usual_idx)
        assert torch.equal(dist, usual_dist)
    else:
        # Other tiles on the GPU: products summed in another order may flip near ties only.
        same = idx == usual_idx
        assert same.float().mean() > 0.99
        torch.testing.assert_close(dist[same], usual_dist[same], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("splits", [1, 3])
def test_tma_search_ties_go_to_the_lowest_index_across_tiles_and_splits(tma_calls, kernel_device, splits):
    if kernel_device.type == "cuda" and not HAS_HOPPER:
        pytest.skip("TMA needs compute capability 9.0")
    k, d = 200, 16
    # Small integers: every distance and score is exact, so the copies tie exactly in any summation order.
    g = torch.Generator().manual_seed(0)
    c = torch.randint(-4, 5, (k, d), generator=g).half()
    z = torch.randint(-4, 5, (6, d), generator=g).half()
    # Every row's nearest code appears three times, in different tiles (and splits), the first at 70
    # (or 5). Two of the copies are 32 codes apart: the same column of consecutive tiles (the
    # interpreter's tiles are 32 wide, with or without splits), so one slot sees both.
    for code in (70, 102, 199):
        c[code] = z[0]
    c[[5, 37, 140]] = z[1]
    z[2:] = z[0]
    idx, dist = kernels.nearest_code(z.to(kernel_device), c.to(kernel_device), num_splits=splits)
    assert len(tma_calls) == 1
    assert idx.tolist() == [70, 5, 70, 70, 70, 70]
    assert dist.cpu().eq(0).all()


def test_tma_search_with_nan_and_inf(tma_calls, kernel_device):
    if kernel_device.type == "cuda" and not HAS_HOPPER:
        pytest.skip("TMA needs compute capability 9.0")
    k, d = 70, 24
    g = torch.Generator().manual_seed(7)
    z = torch.randn(5, d, generator=g).half()
    c = torch.randn(k, d, generator=g).half()
    z[1, 3] = float("nan")
    z[2, 0] = float("inf")
    c[4, 2] = float("nan")  # a NaN code scores NaN for every row and is passed over
    c[10] = z[0]
    idx, dist = kernels.nearest_code(z.to(kernel_device), c.to(kernel_device))
    assert len(tma_calls) == 1
    idx, dist = idx.cpu(), dist.cpu()
    assert ((idx >= 0) & (idx < k)).all()
    assert idx[0] == 10 and dist[0] == 0
    assert dist[1].isnan() and not dist[2].isfinite()
    finite = torch.tensor([0, 3, 4])
    assert (idx[finite] != 4).all()
    ref_idx, _ = reference.nearest_code(z[finite].double(), torch.cat([c[:4], c[5:]]).double())
    assert torch.equal(idx[finite], ref_idx + (ref_idx >= 4).long())


def test_tma_search_is_not_used_where_tma_cannot_read_the_inputs(tma_calls, kernel_device):
    if kernel_device.type == "cuda" and not HAS_HOPPER:
        pytest.skip("TMA needs compute capability 9.0")
    z = _rows(40, 64, torch.float16, kernel_device, 3)
    c = _rows(90, 64, torch.float16, kernel_device, 4)
    flat = torch.cat([torch.zeros(1, dtype=torch.float16, device=kernel_device), z.flatten()])
    misaligned = flat[1:].view(40, 64)  # 2 bytes past a 16-byte boundary
    # (rows, codes, precision, whether the TMA kernel runs)
    cases = [
        (z[:, :12].contiguous(), c[:, :12].contiguous(), None, False),  # rows of 24 bytes
        (z.t().contiguous().t(), c, None, False),                       # columns not contiguous
        (misaligned, c, None, False),
        (z[:1].expand(40, 64), c, None, False),                         # rows that overlap (stride 0)
        (z[:, :12], c[:, :12], None, True),                             # strided rows of 128 bytes, 24 read
        (z.float(), c.float(), "highest", True),                        # fp32: the tf32 pass
        (z.float(), c.float(), "high", True),
        (z.float(), c.float(), "ieee", False),                          # fp32 products: the default kernel
        (z[:, :13].float().contiguous(), c[:, :13].float().contiguous(), "high", False),  # rows of 52 bytes
    ]
    for a, b, precision, runs in cases:
        before = len(tma_calls)
        idx, _ = kernels.nearest_code(a, b, precision=precision)
        ref_idx, _ = reference.nearest_code(a.double().cpu(), b.double().cpu())
        assert torch.equal(idx.cpu(), ref_idx)
        assert len(tma_calls) - before == int(runs), (a.shape, a.stride(), a.dtype, precision)


@pytest.mark.skipif(torch.cuda.is_available(), reason="tf32 emulated in the interpreter; the GPU test below runs "
                                                       "every candidate on the real tensor cores")
@pytest.mark.parametrize("precision,splits", [("high", 1), ("high", 3), ("highest", 1), ("highest", 2)])
def test_tma_tf32_pass_matches_the_default_kernel_under_tf32_rounding(tf32_rounding_interpreter, tma_calls, monkeypatch,
                                                                      precision, splits):
    from vqfast.kernels.nearest import _nearest_code_with_status

    # Rows just off the midpoint of two codes and of three (decided between two codes, and searched
    # again), then plain random rows and a few far from the origin.
    g = torch.Generator().manual_seed(11)
    k, d = 300, 64
    c = torch.randn(k, d, generator=g)
    _, _, pairs, _, triple_rows = near_tie_rows(c, 40, 20, g)
    z = torch.cat([pairs, triple_rows, torch.randn(30, d, generator=g), torch.randn(5, d, generator=g) + 30.0])
    z[3, 5] = float("nan")
    tma = _nearest_code_with_status(z, c, precision, splits)
    assert len(tma_calls) == 1 and tf32_rounding_interpreter
    monkeypatch.setenv("VQFAST_TMA_SEARCH", "0")
    usual = _nearest_code_with_status(z, c, precision, splits)
    # The same bounds, slots and settling (one split's rows settled by the reduction kernel instead):
    # the same indices, distances and row status, bit for bit.
    for ours, theirs in zip(tma, usual):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)
    status = tma[2]
    assert set(status.tolist()) == {0, 1, 2}
    exact, _ = kernels.nearest_code(z, c, precision="ieee", num_splits=splits)
    finite = torch.arange(z.shape[0]) != 3
    assert torch.equal(tma[0][finite], exact[finite])


@pytest.mark.parametrize("splits", [1, 3])
def test_tma_tf32_pass_falls_back_for_misaligned_rows_with_the_same_answer(tma_calls, monkeypatch, kernel_device,
                                                                          splits):
    if kernel_device.type == "cuda" and not HAS_HOPPER:
        pytest.skip("TMA needs compute capability 9.0")
    from vqfast.kernels.nearest import _nearest_code_with_status

    # A plan made for the TMA kernel (one split: split winners and the reduction kernel) meets rows 4
    # bytes off a 16-byte boundary: the default kernel runs with that plan's split buffers.
    z = _rows(120, 32, torch.float32, kernel_device, 14)
    c = _rows(300, 32, torch.float32, kernel_device, 15)
    aligned = _nearest_code_with_status(z, c, "high", splits)
    assert len(tma_calls) == 1
    flat = torch.cat([torch.zeros(1, device=kernel_device), z.flatten()])
    shifted = flat[1:].view(120, 32)
    moved = _nearest_code_with_status(shifted, c, "high", splits)
    assert len(tma_calls) == 1
    monkeypatch.setenv("VQFAST_TMA_SEARCH", "0")
    usual = _nearest_code_with_status(z, c, "high", splits)
    if kernel_device.type == "cpu":  # (on a GPU the tiles, and so the bounds' last bits, may differ)
        for a, b, u in zip(aligned, moved, usual):
            assert torch.equal(a, u) and torch.equal(b, u)
    exact, _ = kernels.nearest_code(z, c, precision="ieee", num_splits=splits)
    assert torch.equal(aligned[0], exact) and torch.equal(moved[0], exact)


@pytest.mark.parametrize("shift", [0.0, 8.0])
def test_tma_tf32_pass_lists_rows_for_the_research(tma_calls, kernel_device, shift):
    if kernel_device.type == "cuda" and not HAS_HOPPER:
        pytest.skip("TMA needs compute capability 9.0")
    from vqfast.kernels.nearest import _nearest_code_with_status

    # Far from the origin compared with its spread, most rows are in doubt and searched again.
    z = _rows(200, 96, torch.float32, kernel_device, 12) + shift
    c = _rows(700, 96, torch.float32, kernel_device, 13) + shift
    idx, dist, status = _nearest_code_with_status(z, c, "high")
    assert len(tma_calls) == 1
    exact, exact_dist = kernels.nearest_code(z, c, precision="ieee")
    assert torch.equal(idx, exact)
    torch.testing.assert_close(dist, exact_dist, rtol=1e-6, atol=1e-6)
    if shift:
        assert (status == 2).float().mean() > 0.5


def test_tma_search_is_off_by_default_and_the_switch_is_part_of_the_plan(monkeypatch, kernel_device):
    if kernel_device.type == "cuda" and not HAS_HOPPER:
        pytest.skip("TMA needs compute capability 9.0")
    calls = []
    launch = nearest_tma.TmaSearch.__call__
    monkeypatch.setattr(nearest_tma.TmaSearch, "__call__", lambda self, *a: calls.append(1) or launch(self, *a))
    monkeypatch.delenv("VQFAST_TMA_SEARCH", raising=False)
    z = _rows(20, 32, torch.float16, kernel_device, 5)
    c = _rows(30, 32, torch.float16, kernel_device, 6)
    first, _ = kernels.nearest_code(z, c)
    assert not calls
    monkeypatch.setenv("VQFAST_TMA_SEARCH", "1")
    second, _ = kernels.nearest_code(z, c)  # same shapes: a plan of its own
    assert calls and torch.equal(first, second)
    monkeypatch.setenv("VQFAST_TMA_SEARCH", "0")
    kernels.nearest_code(z, c)
    assert len(calls) == 1


def test_tma_candidates_are_pruned_by_shared_memory(monkeypatch):
    # Triton 3.6 for sm_90 asks for 164,544 bytes at 128 x 64 tiles, 3 stages, D = 256 in bf16: the
    # estimate must not be below what the compiler asks for.
    assert 164544 <= nearest_tma.shared_memory_bytes(128, 64, 3, 256, 2) <= 232448
    configs = [nearest_tma._config(*c) for c in nearest_tma._SPECIALISED_16 + nearest_tma._UNSPECIALISED_16]
    tf32_configs = [nearest_tma._config(*c) for c in nearest_tma._SPECIALISED_TF32 + nearest_tma._UNSPECIALISED_TF32]

    def tiles(limit, block_d, candidates=configs, dtype=torch.bfloat16, recheck=False):
        monkeypatch.setattr(nearest_tma, "max_shared_memory", lambda: limit)
        z = torch.empty(1, block_d, dtype=dtype)
        return [(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages) for c in
                nearest_tma._prune(candidates, {"z_ptr": z}, BLOCK_D=block_d, RECHECK=recheck)]

    # sm_90's 227 KiB: at D = 256 every 16-bit candidate but 128 x 128 with 3 stages (264 KiB) fits.
    assert tiles(232448, 256) == [(128, 64, 3), (128, 64, 4), (128, 128, 2), (128, 64, 3), (128, 128, 2)]
    assert len(tiles(232448, 64)) == len(configs)
    # fp32 at D = 256: the 128 KiB row block leaves room for two stages of 32 codes only (Triton 3.6 asks
    # for 197,222 bytes there); at D = 128 everything fits.
    assert tiles(232448, 256, tf32_configs, torch.float32, True) == [(128, 32, 2), (128, 32, 2)]
    assert 197222 <= nearest_tma.shared_memory_bytes(128, 32, 2, 256, 4, True) <= 232448
    assert len(tiles(232448, 128, tf32_configs, torch.float32, True)) == len(tf32_configs)
    # Where none fits, the smallest is left (and compiles or fails as such).
    assert tiles(100_000, 256) == [(128, 64, 3)]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_HOPPER, reason="TMA and warp specialisation need compute capability 9.0")
@pytest.mark.parametrize("dtype,n,k,d,splits", [
    (torch.bfloat16, 3000, 5000, 256, None), (torch.bfloat16, 1000, 20000, 64, None), (torch.float16, 777, 3001, 200, 5),
    (torch.float32, 3000, 5000, 256, None), (torch.float32, 777, 3001, 200, 5), (torch.float32, 5000, 2000, 128, None),
])
def test_every_tma_candidate_on_the_gpu(tma_calls, monkeypatch, dtype, n, k, d, splits):
    from vqfast.kernels import _launch

    monkeypatch.setenv("VQFAST_AUTOTUNE", "1")
    recheck = dtype == torch.float32
    tuner = nearest_tma._tma_tf32_search_autotuned if recheck else nearest_tma._tma_search_autotuned
    z = _rows(n, d, dtype, "cuda", 7)
    c = _rows(k, d, dtype, "cuda", 8)
    usual, usual_dist = _usual_search(monkeypatch, z, c, splits)
    if recheck:
        # fp32 rows: the tf32 pass and its re-check give the indices of the fp32 search.
        usual, usual_dist = kernels.nearest_code(z, c, precision="ieee", num_splits=splits)
    candidates = nearest_tma._prune(tuner.configs, {"z_ptr": z}, BLOCK_D=max(16, 1 << (d - 1).bit_length()),
                                    RECHECK=recheck)
    # The unspecialised TMA tiles only: the warp-specialised ones fault at run time (Triton 3.6, H200).
    assert candidates and not any(cfg.kwargs["WARP_SPECIALIZE"] for cfg in candidates)
    for cfg in candidates:
        monkeypatch.setattr(tuner, "configs", [cfg])
        tuner.cache.clear()
        with _launch.launch_path(direct=False):
            idx, dist = kernels.nearest_code(z, c, num_splits=splits)
        assert tuner.best_config is cfg
        assert chosen_gap(z, c, idx).max() <= 1e-5, cfg
        if recheck:
            assert torch.equal(idx, usual), cfg
        # 16-bit: the same fp32 scores as the usual kernel, summed in another order by the tensor cores:
        # the indices may differ on near ties only, and each distance is that of its own index.
        assert (idx != usual).float().mean() < 1e-3, cfg
        direct = ((z.double() - c.double()[idx]) ** 2).sum(1)
        torch.testing.assert_close(dist.double(), direct, rtol=1e-4, atol=1e-4)
    tuner.cache.clear()
    assert tma_calls


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_HOPPER, reason="TMA and warp specialisation need compute capability 9.0")
@pytest.mark.parametrize("dtype,precision", [(torch.bfloat16, "highest"), (torch.float32, "high")])
def test_tma_search_replays_from_a_cuda_graph(tma_calls, dtype, precision):
    # The descriptors are made on the host per call and passed by value: a captured search must read
    # the captured buffers' new contents on replay (and the tf32 pass's extra launches replay too).
    from test_gpu import _captured

    z = _rows(4096, 128, dtype, "cuda", 16)
    c = _rows(3000, 128, dtype, "cuda", 17)
    graph, (idx, dist) = _captured(lambda: kernels.nearest_code(z, c, precision=precision))
    assert len(tma_calls) == 2  # the warm-up and the capture
    z.copy_(_rows(4096, 128, dtype, "cuda", 18))
    idx.fill_(-1)
    graph.replay()
    torch.cuda.synchronize()
    ref_idx, ref_dist = kernels.nearest_code(z, c, precision=precision)
    assert torch.equal(idx, ref_idx) and torch.equal(dist, ref_dist)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_HOPPER, reason="TMA and warp specialisation need compute capability 9.0")
def test_a_layer_training_step_with_the_tma_search(tma_calls, monkeypatch):
    # The layer's default tf32 search (fp32 data) through the TMA kernel: the same indices as with the
    # default kernel (both give the fp32 search's), so the same loss and gradients.
    import vqfast

    def step():
        torch.manual_seed(0)
        vq = vqfast.VectorQuantizer(4096, 128, dead_code_threshold=0).cuda()
        z = torch.randn(64, 128, 8, 8, device="cuda", requires_grad=True)
        z_q, loss, idx = vq(z)
        (loss + z_q.square().mean()).backward()
        return idx, loss.detach(), z.grad, vq.embeddings.weight.grad

    with_tma = step()
    assert tma_calls
    monkeypatch.setenv("VQFAST_TMA_SEARCH", "0")
    usual = step()
    assert torch.equal(with_tma[0], usual[0])
    for a, b in zip(with_tma[1:], usual[1:]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("version,supported", [("3.6.0", True), ("3.8.1", True), ("3.10.0", True), ("3.5.1", False),
                                               ("3.4.0", False), ("2.3.1", False), ("3.7.0+git1234", True)])
def test_tma_search_needs_a_triton_it_was_compiled_with(monkeypatch, version, supported):
    monkeypatch.setattr(nearest_tma.triton, "__version__", version)
    nearest_tma._triton_supports_it.cache_clear()
    try:
        assert nearest_tma._triton_supports_it() == supported
    finally:
        monkeypatch.undo()
        nearest_tma._triton_supports_it.cache_clear()
