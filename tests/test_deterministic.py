"""Under ``torch.use_deterministic_algorithms(True)`` the kernels that add floats atomically (the codebook
gradients, the EMA sums) sum in a fixed order instead, and launch configurations are the fixed ones.

On the CPU the interpreter runs programs one after another, so its atomics are in order anyway: these
tests check which path runs (the atomic kernels are not launched) and that it gives the same sums; the
GPU tests check that repeated calls give the same bits where atomics would not.
"""

from __future__ import annotations

import pytest
import torch

from vqfast import kernels
from vqfast.kernels import _common, _launch, nearest, soft_entropy

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture
def deterministic_mode():
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@pytest.fixture
def launched(monkeypatch):
    """(kernel name, meta-parameters, grid, arguments) of every prepared launch and ``launch_kernel``
    call, in order (the arguments of ``launch_kernel`` calls only)."""
    seen: list[tuple[str, dict, tuple, tuple]] = []
    prepared_call = _launch.PreparedLaunch.__call__

    def record_prepared(self, *tensors):
        seen.append((_name(self.kernel), self.meta, self.grid, ()))
        return prepared_call(self, *tensors)

    def record_launch(kernel, grid, *args, **meta):
        seen.append((_name(kernel), meta, grid, args))
        return launch_kernel(kernel, grid, *args, **meta)

    launch_kernel = soft_entropy.launch_kernel
    monkeypatch.setattr(_launch.PreparedLaunch, "__call__", record_prepared)
    monkeypatch.setattr(soft_entropy, "launch_kernel", record_launch)
    return seen


def _name(kernel) -> str:
    fn = getattr(kernel, "fn", kernel)
    return getattr(fn, "__name__", None) or fn.fn.__name__


def _rows(n, k, d, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Few codes for many rows: every code is hit many times, where the order of the sums matters.
    idx = torch.randint(0, k, (n,), generator=g)
    idx[::7] = k + 3  # unchecked out-of-range indices are dropped on both paths
    return torch.randn(n, d, generator=g).to(device), idx.to(device)


def test_autotuning_is_off_in_deterministic_mode(deterministic_mode, monkeypatch):
    monkeypatch.setenv("VQFAST_AUTOTUNE", "1")
    assert not _common.autotuning()
    torch.use_deterministic_algorithms(False)
    assert _common.autotuning()


@pytest.mark.parametrize("value, on", [("1", True), (" TRUE ", True), ("on", True), ("yes", True), ("0", False),
                                       ("", False), ("False", False), ("off", False), ("no", False)])
def test_switches_read_the_usual_spellings(monkeypatch, value, on):
    monkeypatch.setenv("VQFAST_AUTOTUNE", value)
    monkeypatch.setenv("VQFAST_TMA_SEARCH", value)
    monkeypatch.setenv("VQFAST_PIPELINED_SEARCH", value)
    assert _common.autotuning() is on
    assert nearest.tma_search_enabled() is on and nearest.pipelined_search_enabled() is on


def test_switches_refuse_values_they_cannot_read_and_keep_their_defaults_when_unset(monkeypatch):
    for name in ("VQFAST_AUTOTUNE", "VQFAST_TMA_SEARCH", "VQFAST_PIPELINED_SEARCH"):
        monkeypatch.delenv(name, raising=False)
    assert _common.autotuning() and not nearest.tma_search_enabled() and not nearest.pipelined_search_enabled()
    # A typo must not silently leave tuning on (every value used to count as "on" but "" and "0").
    monkeypatch.setenv("VQFAST_AUTOTUNE", "flase")
    with pytest.raises(ValueError, match="VQFAST_AUTOTUNE must be 1 or 0.*'flase'"):
        _common.autotuning()
    monkeypatch.setenv("VQFAST_TMA_SEARCH", "2")
    with pytest.raises(ValueError, match="VQFAST_TMA_SEARCH"):
        nearest.tma_search_enabled()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_scatter_add_sums_in_order(dtype, launched, kernel_device):
    n, k, d = 300, 5, 37
    grad, idx = _rows(n, k, d, kernel_device)
    grad = grad.to(dtype)
    atomic = kernels.scatter_add_rows(grad, idx, k, torch.float32)
    assert [name for name, *_ in launched] == ["_scatter_add_rows_kernel"]
    launched.clear()
    enabled = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        ordered = kernels.scatter_add_rows(grad, idx, k, torch.float32)
        ordered_16 = kernels.scatter_add_rows(grad, idx, k)
    finally:
        torch.use_deterministic_algorithms(enabled)
    assert "_scatter_add_rows_kernel" not in [name for name, *_ in launched]
    valid = idx < k
    expected = torch.zeros(k, d, dtype=torch.float64).index_add_(0, idx[valid].cpu(), grad[valid].double().cpu())
    assert ordered.shape == (k, d) and ordered.dtype == torch.float32 and ordered.is_contiguous()
    torch.testing.assert_close(ordered.double().cpu(), expected, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(ordered, atomic, rtol=1e-6, atol=1e-5)
    assert ordered_16.dtype == dtype and torch.equal(ordered_16, ordered.to(dtype))


@pytest.mark.parametrize("with_grad_zq", [False, True])
def test_quantize_backward_sums_the_codebook_gradient_in_order(with_grad_zq, launched, kernel_device):
    n, k, d, beta = 257, 6, 19, 0.4
    z, idx = _rows(n, k, d, kernel_device, seed=1)
    codebook = torch.randn(k, d, generator=torch.Generator().manual_seed(2)).to(kernel_device)
    grad_zq = torch.randn(n, d).to(kernel_device) if with_grad_zq else None
    grad_loss = torch.tensor(1.7, device=kernel_device)
    gz_atomic, gc_atomic = kernels.quantize_backward(grad_zq, grad_loss, z, codebook, idx, beta)
    assert [meta["NEED_GRAD_C"] for name, meta, *_ in launched if name == "_vq_backward_kernel"] == [True]
    launched.clear()
    torch.use_deterministic_algorithms(True)
    try:
        gz, gc = kernels.quantize_backward(grad_zq, grad_loss, z, codebook, idx, beta)
    finally:
        torch.use_deterministic_algorithms(False)
    assert [meta["NEED_GRAD_C"] for name, meta, *_ in launched if name == "_vq_backward_kernel"] == [False]
    assert torch.equal(gz, gz_atomic)
    valid = (idx < k).cpu()
    diff = codebook.double().cpu()[idx.cpu()[valid]] - z.double().cpu()[valid]
    expected = torch.zeros(k, d, dtype=torch.float64).index_add_(0, idx.cpu()[valid], 1.7 * 2 * diff / (n * d))
    assert gc.shape == (k, d) and gc.dtype == torch.float32
    torch.testing.assert_close(gc.double().cpu(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gc, gc_atomic, rtol=1e-5, atol=1e-7)


def test_quantize_backward_in_order_for_a_16_bit_codebook_and_no_rows(deterministic_mode, kernel_device):
    k, d = 4, 8
    codebook = torch.randn(k, d).to(torch.float16).to(kernel_device)
    z, idx = torch.randn(9, d).to(torch.float16).to(kernel_device), torch.tensor([0, 1, 1, 3, 3, 3, 2, 0, 1])
    gz, gc = kernels.quantize_backward(None, torch.ones((), device=kernel_device), z, codebook, idx.to(kernel_device),
                                       0.25)
    diff = codebook.float().cpu()[idx] - z.float().cpu()
    expected = torch.zeros(k, d).index_add_(0, idx, 2 * diff / (9 * d))
    assert gc.dtype == torch.float16
    torch.testing.assert_close(gc.float().cpu(), expected.half().float(), rtol=1e-3, atol=1e-6)
    empty = torch.empty(0, d, dtype=torch.float16, device=kernel_device)
    gz, gc = kernels.quantize_backward(None, torch.ones((), device=kernel_device), empty, codebook,
                                       torch.empty(0, dtype=torch.int64, device=kernel_device), 0.25)
    assert gz.shape == (0, d) and torch.equal(gc.cpu(), torch.zeros(k, d, dtype=torch.float16))
    # No codes: refused, as the forward pass refuses them, with or without the mode.
    no_codes = torch.empty(0, d, dtype=torch.float16, device=kernel_device)
    with pytest.raises(ValueError, match="at least one code"):
        kernels.quantize_backward(None, torch.ones((), device=kernel_device), z, no_codes, idx.to(kernel_device),
                                  0.25)


def test_soft_entropy_codebook_pass_sums_its_row_splits_in_order(launched, kernel_device):
    from vqfast.kernels.soft_entropy import soft_entropy_backward, soft_entropy_forward

    g = torch.Generator().manual_seed(4)
    # Many rows and few codes: several row splits, which add into one output atomically unless
    # deterministic.
    k, d = 5, 9
    z, c = torch.randn(300, d, generator=g).to(kernel_device), torch.randn(k, d, generator=g).to(kernel_device)
    w, coef = torch.randn(k, generator=g).to(kernel_device), torch.ones(1, device=kernel_device)
    row_max, log_sum, ent, _ = soft_entropy_forward(z, c, 0.5)

    def codes_pass() -> tuple[int, torch.Tensor, int]:
        """(row splits, output, stride between the splits' outputs) of the codebook pass."""
        (found,) = [(grid, args) for name, _, grid, args in launched if name == "_grad_codes_kernel"]
        launched.clear()
        grid, args = found
        return grid[2], args[9], args[14]

    dz_split, dc_split = soft_entropy_backward(z, c, row_max, log_sum, ent, w, coef, 0.5)
    splits, out, stride = codes_pass()
    assert splits > 1 and stride == 0 and out is dc_split
    torch.use_deterministic_algorithms(True)
    try:
        dz, dc = soft_entropy_backward(z, c, row_max, log_sum, ent, w, coef, 0.5)
    finally:
        torch.use_deterministic_algorithms(False)
    ordered_splits, out, stride = codes_pass()
    assert ordered_splits == splits and stride == k * d and out.shape == (splits, k, d)
    assert torch.equal(dc, out.sum(0))
    assert torch.equal(dz, dz_split)
    torch.testing.assert_close(dc, dc_split, rtol=1e-5, atol=1e-6)


def test_layer_step_in_deterministic_mode_matches_the_reference(deterministic_mode, monkeypatch, kernel_device):
    """A training step of the layer (codebook loss and EMA) in deterministic mode, Triton kernels against
    the CPU reference backend."""
    from vqfast import VectorQuantizer

    results = []
    for backend in ("triton", "torch"):
        monkeypatch.setenv("VQFAST_BACKEND", backend)
        for ema in (False, True):
            torch.manual_seed(0)
            layer = VectorQuantizer(24, 6, ema=ema, dead_code_threshold=0.0).to(kernel_device)
            x = torch.randn(5, 6, 4, 3).to(kernel_device).requires_grad_()
            z_q, loss, idx = layer(x)
            (z_q.square().sum() + loss).backward()
            grad_c = None if ema else layer.embeddings.weight.grad.clone()
            results.append((backend, ema, idx, x.grad, grad_c, layer.embeddings.weight.detach().clone()))
    for (_, ema, idx, gx, gc, w), (_, _, ref_idx, ref_gx, ref_gc, ref_w) in zip(results[:2], results[2:]):
        assert torch.equal(idx, ref_idx)
        torch.testing.assert_close(gx, ref_gx, rtol=1e-5, atol=1e-6)
        if not ema:
            torch.testing.assert_close(gc, ref_gc, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_repeated_gpu_sums_are_bitwise_equal(deterministic_mode):
    """On the GPU, atomics add in whatever order the hardware runs them; in deterministic mode every
    repetition gives the same bits (many rows per code, so the order matters)."""
    from vqfast.kernels.soft_entropy import soft_entropy_backward, soft_entropy_forward

    n, k, d = 200_000, 64, 128
    grad, idx = _rows(n, k, d, "cuda", seed=5)
    z = torch.randn(n, d, device="cuda")
    codebook = torch.randn(k, d, device="cuda")
    one = torch.ones((), device="cuda")
    row_max, log_sum, ent, _ = soft_entropy_forward(z[:20_000], codebook, 0.5)
    w, coef = torch.randn(k, device="cuda"), torch.ones(1, device="cuda")

    def sums():
        _, gc = kernels.quantize_backward(None, one, z, codebook, idx, 0.25)
        _, dc = soft_entropy_backward(z[:20_000], codebook, row_max, log_sum, ent, w, coef, 0.5)
        return kernels.scatter_add_rows(grad, idx, k, torch.float32), gc, dc

    first = sums()
    for _ in range(5):
        for a, b in zip(first, sums()):
            assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_deterministic_sums_in_a_cuda_graph(deterministic_mode):
    """The fixed-order sums (PyTorch's index_add_ in this mode) can be captured and replayed."""
    n, k, d = 50_000, 32, 64
    grad, idx = _rows(n, k, d, "cuda", seed=6)
    z, codebook = torch.randn(n, d, device="cuda"), torch.randn(k, d, device="cuda")
    one = torch.ones((), device="cuda")

    def sums():
        return kernels.scatter_add_rows(grad, idx, k, torch.float32), kernels.quantize_backward(
            None, one, z, codebook, idx, 0.25)[1]

    eager = sums()  # also the warm-up outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = sums()
    grad.mul_(2.0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured[0], 2.0 * eager[0])  # doubling is exact in fp32
    assert torch.equal(captured[1], eager[1])
