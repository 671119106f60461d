"""Public ops: backend dispatch, argument errors, autograd through both backends."""

import math

import numpy as np
import pytest
import torch

import vqfast
from helpers import chosen_gap
from vqfast import reference


def _pair(n=30, k=17, d=12, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g).to(dtype).to(device),
            torch.randn(k, d, generator=g).to(dtype).to(device))


def test_backend_resolution(monkeypatch):
    monkeypatch.delenv("VQFAST_BACKEND", raising=False)
    assert vqfast.resolve_backend(torch.device("cpu")) == "torch"
    assert vqfast.resolve_backend(torch.device("cuda", 0)) == "triton"
    monkeypatch.setenv("VQFAST_BACKEND", "torch")
    assert vqfast.resolve_backend(torch.device("cuda", 0)) == "torch"
    monkeypatch.setenv("VQFAST_BACKEND", "triton")
    assert vqfast.resolve_backend(torch.device("cuda", 0), torch.float64) == "torch"
    monkeypatch.setenv("VQFAST_BACKEND", "fast")
    with pytest.raises(ValueError, match="VQFAST_BACKEND"):
        vqfast.resolve_backend(torch.device("cpu"))
    monkeypatch.delenv("VQFAST_BACKEND")
    # A dtype's name is not a dtype: "float64" would not have matched torch.float64 and got "triton".
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        vqfast.resolve_backend("cuda", "float64")


def test_eager_calls_skip_the_dispatcher_and_traced_calls_use_the_custom_ops(triton_backend, kernel_device):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    from vqfast import ops

    z, c = _pair(device=kernel_device)
    assert ops.for_call() is ops.direct
    idx, dist = vqfast.nearest_code(z, c)

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    # A dispatch mode (a profiler's counter, say) sees the op, and the answer is the same.
    with Seen() as seen:
        assert ops.for_call() is ops
        idx2, dist2 = vqfast.nearest_code(z, c)
        vqfast.quantize(z, c)
    assert seen.ops.count("vqfast.nearest_code.default") == 2 and "vqfast.quantize_forward.default" in seen.ops
    assert torch.equal(idx2, idx) and torch.equal(dist2, dist)
    # Fake tensors get the ops' fake implementations (no kernel runs on them).
    with FakeTensorMode() as mode:
        fz, fc = mode.from_tensor(z), mode.from_tensor(c)
        fidx, fdist = vqfast.nearest_code(fz, fc)
    assert fidx.shape == idx.shape and fidx.dtype == torch.int64 and fdist.dtype == torch.float32

    class Tagged(torch.Tensor):
        pass

    # A tensor subclass goes through the registered op (so its own dispatch could see the call).
    sub_idx, sub_dist = ops.direct.nearest_code(z.as_subclass(Tagged), c, "highest", 0)
    assert torch.equal(sub_idx.as_subclass(torch.Tensor), idx)


def test_triton_backend_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("VQFAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        vqfast.resolve_backend(torch.device("cpu"))


def test_triton_backend_really_runs_the_kernels(triton_backend, kernel_device, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the reference ran instead of the kernel")

    monkeypatch.setattr(reference, "nearest_code", fail)
    monkeypatch.setattr(reference, "quantize", fail)
    monkeypatch.setattr(reference, "gather", fail)
    monkeypatch.setattr(reference, "code_usage", fail)
    z, c = _pair(device=kernel_device)
    idx, _ = vqfast.nearest_code(z, c)
    vqfast.quantize(z, c)
    vqfast.gather(c, idx)
    vqfast.code_usage(idx, c.shape[0])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_nearest_code_shapes_and_metric(backend, metric, monkeypatch, kernel_device):
    monkeypatch.setenv("VQFAST_BACKEND", backend)
    device = kernel_device if backend == "triton" else torch.device("cpu")
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 3, 5, 10, generator=g).to(device)
    c = torch.randn(19, 10, generator=g).to(device)
    idx, dist = vqfast.nearest_code(z, c, metric=metric, precision="highest")
    assert idx.shape == (2, 3, 5) and dist.shape == (2, 3, 5) and idx.dtype == torch.int64
    rows, codes = z.reshape(-1, 10).cpu(), c.cpu()
    if metric == "cosine":
        rows = torch.nn.functional.normalize(rows, dim=-1)
        codes = torch.nn.functional.normalize(codes, dim=-1)
        expected = 1 - (rows @ codes.t()).max(1).values
        torch.testing.assert_close(dist.reshape(-1).cpu(), expected, rtol=1e-4, atol=1e-5)
    assert chosen_gap(rows, codes, idx.reshape(-1)).max() <= 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_quantize_straight_through_and_gradients(backend, monkeypatch, kernel_device):
    """Value of z_q is the code; dz_q flows to z unchanged; losses send gradients to z and codebook."""
    monkeypatch.setenv("VQFAST_BACKEND", backend)
    device = kernel_device if backend == "triton" else torch.device("cpu")
    z0, c0 = _pair(n=40, k=9, d=6, seed=2, device=device)
    beta = 0.4

    z = z0.clone().requires_grad_()
    c = c0.clone().requires_grad_()
    z_q, loss, idx = vqfast.quantize(z, c, beta=beta)
    torch.testing.assert_close(z_q, c0[idx], rtol=0, atol=1e-6)

    # Straight-through: a gradient on z_q alone reaches z unchanged and the codebook not at all.
    upstream = torch.randn_like(z0)
    (z_q * upstream).sum().backward()
    torch.testing.assert_close(z.grad, upstream)
    assert c.grad is None or (c.grad == 0).all()

    # The loss alone: d/dz = beta * 2 (z - q) / M, d/dc = scatter of 2 (q - z) / M.
    z.grad, c.grad = None, None
    _, loss, idx = vqfast.quantize(z, c, beta=beta)
    loss.backward()
    m = z0.numel()
    q = c0[idx]
    torch.testing.assert_close(z.grad, beta * 2 * (z0 - q) / m)
    expected_c = torch.zeros_like(c0).index_add_(0, idx, 2 * (q - z0) / m)
    torch.testing.assert_close(c.grad, expected_c)
    expected_loss = (1 + beta) * ((q - z0) ** 2).mean()
    torch.testing.assert_close(loss, expected_loss)


def test_backends_agree_on_quantize(monkeypatch, kernel_device):
    z0, c0 = _pair(n=50, k=33, d=20, seed=3, device=kernel_device)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("VQFAST_BACKEND", backend)
        dev = kernel_device if backend == "triton" else torch.device("cpu")
        z = z0.clone().to(dev).requires_grad_()
        c = c0.clone().to(dev).requires_grad_()
        z_q, loss, idx = vqfast.quantize(z.reshape(5, 10, 20), c, beta=0.25, precision="highest")
        (z_q.pow(3).sum() + 3 * loss).backward()
        results[backend] = [t.detach().cpu() for t in (z_q, loss, idx, z.grad, c.grad)]
    for a, b in zip(results["torch"], results["triton"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gather_backward_scatter_adds(backend, monkeypatch, kernel_device):
    monkeypatch.setenv("VQFAST_BACKEND", backend)
    device = kernel_device if backend == "triton" else torch.device("cpu")
    c = torch.randn(6, 4, device=device, requires_grad=True)
    idx = torch.tensor([[0, 5, 5], [2, 0, 0]], device=device)
    out = vqfast.gather(c, idx)
    assert out.shape == (2, 3, 4)
    torch.testing.assert_close(out, c.detach()[idx])
    w = torch.randn(2, 3, 4, device=device)
    (out * w).sum().backward()
    expected = torch.zeros(6, 4, device=device).index_add_(0, idx.reshape(-1), w.reshape(-1, 4))
    torch.testing.assert_close(c.grad, expected)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_inputs(backend, monkeypatch, kernel_device):
    monkeypatch.setenv("VQFAST_BACKEND", backend)
    device = kernel_device if backend == "triton" else torch.device("cpu")
    z = torch.empty(0, 3, 8, device=device, requires_grad=True)
    c = torch.randn(4, 8, device=device, requires_grad=True)
    idx, dist = vqfast.nearest_code(z, c)
    assert idx.shape == (0, 3) and dist.shape == (0, 3)
    z_q, loss, idx = vqfast.quantize(z, c)
    assert z_q.shape == (0, 3, 8) and idx.shape == (0, 3) and loss.item() == 0.0
    (z_q.sum() + loss).backward()
    counts, entropy, perplexity = vqfast.code_usage(idx, 4)
    assert counts.tolist() == [0, 0, 0, 0] and entropy.item() == 0.0 and perplexity.item() == 1.0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_edge_cases_every_backend_answers_alike(backend, monkeypatch, kernel_device):
    monkeypatch.setenv("VQFAST_BACKEND", backend)
    device = kernel_device if backend == "triton" else torch.device("cpu")
    # The loss of an empty 16-bit batch is a float32 scalar, as every other batch's.
    _, loss, _ = vqfast.quantize(torch.empty(0, 4, dtype=torch.float16, device=device),
                                 torch.randn(3, 4, device=device).half())
    assert loss.dtype == torch.float32 and loss.item() == 0.0
    # z_q's gradient goes to z alone: with only the codebook requiring grad, z_q requires none
    # (z + (q - z).detach() has none), and the loss still reaches the codebook.
    c = torch.randn(3, 4, device=device, requires_grad=True)
    z_q, loss, _ = vqfast.quantize(torch.randn(5, 4, device=device), c)
    assert not z_q.requires_grad and z_q.grad_fn is None and loss.requires_grad
    # A row holding inf is inf away from every code without NaN; a NaN code at a lower index must not
    # win (its distance, and the loss, would be NaN).
    nan, inf = float("nan"), float("inf")
    z = torch.tensor([[inf, 0.0], [1.0, 2.0]], device=device)
    codes = torch.tensor([[nan, 0.0], [1.0, 0.0], [0.0, 1.0]], device=device)
    idx, dist = vqfast.nearest_code(z, codes)
    assert idx.tolist() == [1, 2] and dist.tolist() == [inf, 2.0]
    z_q, loss, _ = vqfast.quantize(z, codes, beta=0.0)
    assert loss.item() == inf and z_q[0].tolist() == [1.0, 0.0]


def test_code_usage_has_no_nan_for_unused_codes():
    counts, entropy, perplexity = vqfast.code_usage(torch.tensor([0, 0, 1, 1]), 1000)
    assert counts.sum() == 4 and torch.isfinite(entropy)
    assert abs(entropy.item() - torch.log(torch.tensor(2.0)).item()) < 1e-6
    assert abs(perplexity.item() - 2.0) < 1e-5
    # One code in use: entropy +0.0 (not -0.0, which prints as "-0.0" in reports), perplexity 1.
    _, entropy, perplexity = vqfast.code_usage(torch.tensor([3, 3]), 5)
    assert math.copysign(1.0, entropy.item()) == 1.0 and entropy.item() == 0.0 and perplexity.item() == 1.0


@pytest.mark.parametrize(
    "z_shape,c_shape,z_dtype,c_dtype,exc,match",
    [
        ((4, 8), (5, 7), torch.float32, torch.float32, ValueError, "last dimension of z"),
        ((4, 8), (2, 5, 8), torch.float32, torch.float32, ValueError, "2-D"),
        ((4, 8), (0, 8), torch.float32, torch.float32, ValueError, "at least one code"),
        ((4, 8), (5, 8), torch.int64, torch.int64, TypeError, "floating-point"),
        ((4, 8), (5, 8), torch.float32, torch.float16, TypeError, "same dtype"),
        ((), (5, 8), torch.float32, torch.float32, ValueError, "at least one dimension"),
    ],
)
def test_nearest_code_rejects_bad_input(z_shape, c_shape, z_dtype, c_dtype, exc, match):
    z = torch.zeros(z_shape, dtype=z_dtype)
    c = torch.zeros(c_shape, dtype=c_dtype)
    with pytest.raises(exc, match=match):
        vqfast.nearest_code(z, c)


def test_other_argument_errors():
    z, c = _pair()
    with pytest.raises(ValueError, match="metric"):
        vqfast.nearest_code(z, c, metric="l1")
    with pytest.raises(TypeError, match="torch.Tensor"):
        vqfast.nearest_code(z.numpy(), c)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 17\)"):
        vqfast.gather(c, torch.tensor([0, 17]))
    with pytest.raises(ValueError, match=r"\[-1, 3\]"):
        vqfast.gather(c, torch.tensor([-1, 3]))
    with pytest.raises(TypeError, match="int64 or int32"):
        vqfast.gather(c, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="num_codes"):
        vqfast.code_usage(torch.tensor([0, 1]), 0)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        vqfast.code_usage(torch.tensor([0, 2]), 2)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="same device"):
            vqfast.nearest_code(z, c.cuda())


def test_arguments_checked_the_same_on_every_backend(monkeypatch):
    """Names and values one backend would refuse are refused by the CPU backend too."""
    monkeypatch.setenv("VQFAST_BACKEND", "torch")
    z, c = _pair(n=6, k=5, d=3)
    for bad in ("bf16", "fp32", "ieee"):
        with pytest.raises(ValueError, match="precision must be None or one of"):
            vqfast.nearest_code(z, c, precision=bad)
        with pytest.raises(ValueError, match="precision must be None or one of"):
            vqfast.quantize(z, c, precision=bad)
    for beta in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
            vqfast.quantize(z, c, beta=beta)
    idx = torch.tensor([0, 3, 3])
    for k in (np.int64(4), torch.tensor(4)):
        assert vqfast.code_usage(idx, k)[0].tolist() == [1, 0, 0, 2]
    with pytest.raises(ValueError, match="num_codes"):
        vqfast.code_usage(idx, 4.0)
    assert vqfast.resolve_backend("cpu") == "torch"
    soft = vqfast.soft_assignment_entropy
    with pytest.raises(TypeError, match="floating-point"):
        soft(torch.ones(4, 3, dtype=torch.int64), c)
    with pytest.raises(ValueError, match="metric"):
        soft(z, c, metric="dot")
    with pytest.raises(ValueError, match="2-D"):
        soft(z, c[0])
    with pytest.raises(ValueError, match="last dimension of z"):
        soft(z, c[:, :2])
    with pytest.raises(ValueError, match="at least one code"):
        soft(z, c[:0])
    for t in (float("nan"), 0.0, float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            soft(z, c, temperature=t)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cosine_distances_of_16_bit_inputs_are_those_of_their_exact_unit_vectors(backend, monkeypatch, kernel_device):
    """Nearby fp16 vectors (1 - cos about 1e-3): unit vectors rounded back to fp16 would put a relative
    error of about 4e-3 on 1 - cos; normalised in fp32 it is that of fp32."""
    monkeypatch.setenv("VQFAST_BACKEND", backend)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 64, generator=g)
    z = (base + 0.05 * torch.randn(200, 64, generator=g)).half()
    c = (base + 0.05 * torch.randn(150, 64, generator=g)).half()
    exact = 1 - reference.unit_rows(z.double()) @ reference.unit_rows(c.double()).t()
    indices, distances = vqfast.nearest_code(z.to(kernel_device), c.to(kernel_device), metric="cosine")
    chosen = exact.gather(1, indices.cpu()[:, None])[:, 0]
    assert ((distances.cpu().double() - chosen).abs() / chosen).max() < 1e-4
    assert (chosen - exact.min(1).values).max() < 1e-5
    # quantize searches the same fp32 unit vectors, so it picks the same codes among these near ties.
    assert torch.equal(vqfast.quantize(z.to(kernel_device), c.to(kernel_device), metric="cosine")[2], indices)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cosine_quantize_gradients_match_float64(backend, masked, monkeypatch, kernel_device):
    """Straight through the unit vectors and on through the normalisation, and the losses' gradients to
    the unit codes: z's and the codebook's gradients as float64 autograd through the reference gives."""
    monkeypatch.setenv("VQFAST_BACKEND", backend)
    z, c = _pair(n=30, k=17, d=12, seed=3)
    g = torch.Generator().manual_seed(4)
    upstream = torch.randn(30, 12, generator=g)
    mask = torch.rand(30, generator=g) < 0.7 if masked else None
    z_dev = z.to(kernel_device, copy=True).requires_grad_()
    c_dev = c.to(kernel_device, copy=True).requires_grad_()
    z_q, loss, idx = vqfast.quantize(z_dev, c_dev, beta=0.25, metric="cosine",
                                     mask=None if mask is None else mask.to(kernel_device))
    ((z_q * upstream.to(kernel_device)).sum() + loss).backward()
    z64, c64 = z.double().requires_grad_(), c.double().requires_grad_()
    keep = torch.ones(30, dtype=torch.bool) if mask is None else mask
    zq64, loss64, _ = reference.quantize(z64[keep], c64, beta=0.25, metric="cosine", indices=idx.cpu()[keep])
    out64 = z64.clone()
    out64[keep] = zq64  # left-out rows keep z, gradient included
    ((out64 * upstream.double()).sum() + loss64).backward()
    torch.testing.assert_close(loss.detach().cpu().double(), loss64.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(z_dev.grad.cpu().double(), z64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(c_dev.grad.cpu().double(), c64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_quantize_checks_the_indices_it_is_given(backend, monkeypatch, kernel_device):
    monkeypatch.setenv("VQFAST_BACKEND", backend)
    z, c = (t.to(kernel_device) for t in _pair(n=6, k=5, d=3))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 5\)"):
        vqfast.quantize(z, c, indices=torch.tensor([0, 1, 2, 3, 4, 5], device=kernel_device))
    with pytest.raises(ValueError, match="shape of z"):
        vqfast.quantize(z, c, indices=torch.zeros(4, dtype=torch.int64, device=kernel_device))
    with pytest.raises(TypeError, match="int64 or int32"):
        vqfast.quantize(z, c, indices=torch.zeros(6, device=kernel_device))
    # With a mask, -1 is a left-out row's index: a wrong shape is named as such, not as that -1's range.
    mask = torch.tensor([True, True, False, True, True, True], device=kernel_device)
    with pytest.raises(ValueError, match=r"shape of z without its last dimension, \(6,\); got \(5,\)"):
        vqfast.quantize(z, c, mask=mask, indices=torch.tensor([0, 1, -1, 2, 3], device=kernel_device))
    with pytest.raises(TypeError, match="int64 or int32"):
        vqfast.quantize(z, c, mask=mask, indices=torch.zeros(6, device=kernel_device))
    with pytest.raises(TypeError, match="int64 or int32"):  # not codes 0 and 1
        vqfast.quantize(z, c, mask=mask, indices=torch.ones(6, dtype=torch.bool, device=kernel_device))
    given = torch.tensor([4, 0, 0, 3, 2, 1], dtype=torch.int32, device=kernel_device)
    z_q, _, idx = vqfast.quantize(z, c, indices=given)
    assert idx.dtype == torch.int64 and torch.equal(idx.cpu(), given.long().cpu())
    torch.testing.assert_close(z_q.cpu(), c.cpu()[given.long().cpu()])


def test_unchecked_out_of_range_indices_never_touch_memory_outside_the_codebook(triton_backend, kernel_device):
    """With the host-side check skipped, the kernels mask indices outside [0, K): no out-of-bounds read
    or write (on a GPU that would be silent corruption or an illegal-address error)."""
    z, c = (t.to(kernel_device).requires_grad_() for t in _pair(n=5, k=4, d=3))
    bad = torch.tensor([0, 4, -1, 3, 1000], device=kernel_device)
    rows = vqfast.gather(c, bad, check_indices=False)
    assert torch.equal(rows[[0, 3]].detach().cpu(), c.detach().cpu()[[0, 3]])
    assert (rows[[1, 2, 4]] == 0).all()
    rows.sum().backward()
    assert torch.equal(c.grad.cpu(), torch.tensor([[1.0] * 3, [0.0] * 3, [0.0] * 3, [1.0] * 3]))
    c.grad = None
    z_q, loss, _ = vqfast.quantize(z, c, indices=bad, check_indices=False)
    assert (z_q[[1, 2, 4]] == 0).all() and torch.isfinite(loss)
    (z_q.sum() + loss).backward()
    assert torch.isfinite(c.grad).all() and torch.isfinite(z.grad).all()
    counts, _, _ = vqfast.code_usage(bad, 4, check_indices=False)
    assert counts.tolist() == [1, 0, 0, 1]


def test_kernel_size_limits_raise_clear_errors(monkeypatch, kernel_device):
    """Row counts past the int32 tile offsets and grids past CUDA's 65,535 programs along y are refused
    (the limits are lowered here so that small tensors reach them)."""
    from vqfast.kernels import _common, gather, nearest, quantize

    z, c = (t.to(kernel_device) for t in _pair(n=20, k=8, d=3))
    monkeypatch.setattr(_common, "MAX_ROWS", 10)
    with pytest.raises(ValueError, match="z has 20 rows"):
        nearest.nearest_code(z, c)
    with pytest.raises(ValueError, match="z has 20 rows"):
        quantize.quantize_forward(z, c, torch.zeros(20, dtype=torch.int64, device=kernel_device), 0.25)
    monkeypatch.setattr(_common, "MAX_ROWS", 2**31 - 2**16)
    monkeypatch.setattr(_common, "MAX_GRID_YZ", 0)
    with pytest.raises(ValueError, match="CUDA allows at most 0"):
        gather.gather_rows(c, torch.zeros(3, dtype=torch.int64, device=kernel_device))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_quantize_mixed_dtypes_search_in_the_wider_dtype(backend, monkeypatch, kernel_device):
    monkeypatch.setenv("VQFAST_BACKEND", backend)
    z, c = _pair(n=20, k=10, d=8, seed=5, device=kernel_device)
    z16 = z.half().requires_grad_()
    z_q, loss, idx = vqfast.quantize(z16, c)
    assert z_q.dtype == torch.float16 and loss.dtype == torch.float32
    ref_idx, _ = reference.nearest_code(z16.detach().float().cpu(), c.cpu())
    assert torch.equal(idx.cpu(), ref_idx)
    # fp32 rows with an fp16 codebook: rounded to fp16, the row would overflow to inf and pick code 0.
    z = torch.tensor([[70000.0, 1.0]], device=kernel_device)
    c = torch.tensor([[60000.0, 100.0], [60000.0, 0.0]], device=kernel_device).half()
    assert vqfast.quantize(z, c)[2].tolist() == [1]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 50.0), (torch.float16, 1000.0)])
def test_quantize_output_is_exactly_the_code(backend, dtype, scale, monkeypatch, kernel_device):
    """z + (q - z).detach() rounds away from q when z is large; z_q must be the code itself."""
    monkeypatch.setenv("VQFAST_BACKEND", backend)
    g = torch.Generator().manual_seed(21)
    z = (torch.randn(300, 8, generator=g) * scale).to(dtype).to(kernel_device).requires_grad_()
    c = torch.randn(16, 8, generator=g).to(dtype).to(kernel_device)
    z_q, _, idx = vqfast.quantize(z, c)
    assert torch.equal(z_q.detach(), c[idx])
    grad = torch.randn(z.shape, generator=g).to(dtype).to(kernel_device)
    z_q.backward(grad)
    assert torch.equal(z.grad, grad)  # straight through, unchanged


def test_quantize_output_is_exactly_the_code_in_bf16(torch_backend):
    # (bf16 kernels need a GPU: under the interpreter this case runs on the reference only.)
    g = torch.Generator().manual_seed(22)
    z, c = torch.randn(1000, 8, generator=g).bfloat16(), torch.randn(16, 8, generator=g).bfloat16()
    z_q, _, idx = vqfast.quantize(z, c)
    assert torch.equal(z_q, c[idx])


def test_quantize_on_the_cpu_always_checks_indices(torch_backend):
    z, c = _pair(n=3, k=5, d=4)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 5\)"):
        vqfast.quantize(z, c, indices=torch.tensor([0, 5, -1]), check_indices=False)


@pytest.mark.parametrize("forced", ["torch", "triton", ""])
def test_meta_tensors_give_the_output_shapes(monkeypatch, forced):
    """Shape inference on the meta device (as for a model built there): every op and the layer's forward
    and backward give their shapes, whatever backend is asked for (meta tensors have no values to run a
    kernel on, or to range-check)."""
    monkeypatch.setenv("VQFAST_BACKEND", forced)
    assert vqfast.resolve_backend("meta", torch.float32) == "torch"
    z = torch.empty(5, 3, device="meta")
    c = torch.empty(7, 3, device="meta")
    idx, dist = vqfast.nearest_code(z, c)
    assert idx.shape == dist.shape == (5,) and idx.is_meta and idx.dtype == torch.int64
    assert vqfast.gather(c, idx).shape == (5, 3)
    counts, entropy, perplexity = vqfast.code_usage(idx, 7)
    assert counts.shape == (7,) and entropy.shape == perplexity.shape == ()
    z_q, loss, _ = vqfast.quantize(z, c)
    assert z_q.shape == (5, 3) and loss.shape == ()
    from vqfast import VectorQuantizer

    for kwargs in ({}, {"ema": True}, {"heads": 2}, {"sample_entropy_weight": 0.1, "batch_entropy_weight": 0.1},
                   {"init": "kmeans"}):
        layer = VectorQuantizer(8, 3, **kwargs).to("meta")
        x = torch.empty(2, 3 * kwargs.get("heads", 1), 4, 5, device="meta", requires_grad=True)
        z_q, loss, indices = layer(x)
        (z_q.sum() + loss).backward()
        assert z_q.shape == x.grad.shape == x.shape and loss.shape == ()
        assert indices.shape == ((2, 4, 5, 2) if kwargs.get("heads") else (2, 4, 5))
        assert layer.codes_from_indices(indices).shape == x.shape
        mask = torch.ones(2, 4, 5, dtype=torch.bool, device="meta")
        assert layer(x, mask)[0].shape == x.shape
    assert layer._needs_init  # k-means, with no rows to cluster, stays pending
    from vqfast import ResidualVectorQuantizer

    rvq = ResidualVectorQuantizer(2, 8, 3).to("meta")
    _, _, indices = rvq(torch.empty(6, 3, device="meta"))
    assert indices.shape == (6, 2) and rvq.codes_from_indices(indices).shape == (6, 3)


def test_beta_of_the_wrong_type_is_named(torch_backend):
    z, c = _pair(n=3, k=5, d=4)
    for beta in ("0.5", None):
        with pytest.raises(TypeError, match="beta must be a finite number >= 0"):
            vqfast.quantize(z, c, beta=beta)
    # A learned beta would get no gradient: it is read as a number.
    with pytest.raises(TypeError, match="not a tensor that requires grad"):
        vqfast.quantize(z, c, beta=torch.tensor(0.25, requires_grad=True))
    assert torch.equal(vqfast.quantize(z, c, beta=torch.tensor(0.25))[1], vqfast.quantize(z, c, beta=0.25)[1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU interpreter")
def test_interpreter_refuses_bf16(triton_backend):
    z, c = _pair(n=4, k=3, d=8)
    with pytest.raises(RuntimeError, match="interpreter computes bfloat16 kernels wrongly"):
        vqfast.nearest_code(z.bfloat16(), c.bfloat16())
    with pytest.raises(RuntimeError, match="interpreter computes bfloat16 kernels wrongly"):
        vqfast.gather(c.bfloat16(), torch.tensor([0, 2]))
    # The backend query says so too, rather than "triton" for an op that would then refuse.
    with pytest.raises(RuntimeError, match="interpreter computes bfloat16 kernels wrongly"):
        vqfast.resolve_backend("cpu", torch.bfloat16)
    assert vqfast.resolve_backend("cpu", torch.float16) == "triton"


def test_public_ops_compile_without_graph_breaks(triton_backend, kernel_device):
    z, c = _pair(n=24, k=10, d=8, seed=6, device=kernel_device)

    def step(z, c):
        idx, dist = vqfast.nearest_code(z, c)  # default precision is read inside the graph
        counts, entropy, _ = vqfast.code_usage(idx, c.shape[0])
        return vqfast.gather(c, idx).sum() + dist.sum() + entropy + counts.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(z, c), step(z, c))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cosine_metric_with_zero_rows_keeps_gradients_finite(backend, monkeypatch, kernel_device):
    """A zero row has no direction: it gets a code and no gradient through the normalisation
    (F.normalize's gradient there is about 1e12)."""
    monkeypatch.setenv("VQFAST_BACKEND", backend)
    z, c = _pair(n=6, k=5, d=4, seed=23, device=kernel_device)
    z[2] = 0.0
    c[1] = 0.0
    z.requires_grad_()
    c.requires_grad_()
    z_q, loss, idx = vqfast.quantize(z, c, metric="cosine")
    sample_h, batch_h = vqfast.soft_assignment_entropy(z, c, metric="cosine")
    (z_q.sum() + loss + sample_h - batch_h).backward()
    assert ((idx >= 0) & (idx < 5)).all()
    assert torch.isfinite(z.grad).all() and torch.isfinite(c.grad).all()
    assert (z.grad[2] == 0).all() and (c.grad[1] == 0).all()
    assert z.grad.abs().max() < 100 and (z.grad[[0, 1, 3, 4, 5]] != 0).any()
    # The other rows' values are F.normalize's.
    torch.testing.assert_close(reference.unit_rows(z.detach()), torch.nn.functional.normalize(z.detach(), dim=-1))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_half_precision_codebook_gradients_are_summed_in_fp32(backend, monkeypatch, kernel_device):
    # fp16 counts exactly only up to 2,048: summed in fp16, 2,100 unit gradients into one row give 2,048.
    monkeypatch.setenv("VQFAST_BACKEND", backend)
    device = kernel_device if backend == "triton" else torch.device("cpu")
    n = 2100
    c = torch.randn(3, 4, dtype=torch.float16, device=device, requires_grad=True)
    vqfast.gather(c, torch.zeros(n, dtype=torch.int64, device=device)).sum().backward()
    assert c.grad.dtype == torch.float16
    assert c.grad[0].float().tolist() == [float(n)] * 4
    assert c.grad[1:].abs().sum().item() == 0

    c.grad = None
    z = torch.zeros(n, 4, dtype=torch.float16, device=device)
    _, loss, _ = vqfast.quantize(z, c, beta=0.0, indices=torch.zeros(n, dtype=torch.int64, device=device))
    loss.backward()
    # d/dc0 of mean((c0 - z)^2) over n * 4 elements, from n rows: 2 * c0 / 4 per element.
    expected = (2 * c.detach()[0].float() / 4)
    torch.testing.assert_close(c.grad[0].float(), expected, rtol=2e-3, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_quantize_loss_uses_the_code_not_the_code_rounded_to_z(backend, monkeypatch, kernel_device):
    # An fp16 z beside an fp32 codebook (the layer under .half()): 2049 rounds to 2048 in fp16.
    monkeypatch.setenv("VQFAST_BACKEND", backend)
    device = kernel_device if backend == "triton" else torch.device("cpu")
    z = torch.full((1, 1), 2048.0, dtype=torch.float16, device=device)
    c = torch.tensor([[2049.0], [0.0]], device=device, requires_grad=True)
    z_q, loss, idx = vqfast.quantize(z, c, beta=0.25)
    assert idx.item() == 0 and z_q.dtype == torch.float16
    assert loss.item() == pytest.approx(1.25)
    loss.backward()
    assert c.grad[:, 0].tolist() == [2.0, 0.0]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_codebook_gets_no_gradient_when_only_z_q_is_used(backend, monkeypatch, kernel_device):
    # A zero gradient is not "no gradient": AdamW's weight decay would still move the codebook.
    monkeypatch.setenv("VQFAST_BACKEND", backend)
    device = kernel_device if backend == "triton" else torch.device("cpu")
    z, c = _pair(device=device)
    z.requires_grad_(True)
    c.requires_grad_(True)
    z_q, _, _ = vqfast.quantize(z, c)
    (3 * z_q).sum().backward()
    assert c.grad is None
    torch.testing.assert_close(z.grad, torch.full_like(z, 3.0))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cosine_metric_with_fp16_rows_longer_than_the_fp16_range(backend, monkeypatch, kernel_device):
    # Every element is finite, but the norm (80,000) is not representable in fp16.
    monkeypatch.setenv("VQFAST_BACKEND", backend)
    device = kernel_device if backend == "triton" else torch.device("cpu")
    z = torch.full((1, 4), 40000.0, dtype=torch.float16, device=device)
    c = torch.tensor([[1.0, -1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float16, device=device)
    idx, dist = vqfast.nearest_code(z, c, metric="cosine")
    assert idx.item() == 1 and dist.item() == pytest.approx(0.0, abs=1e-3)
    z_q, _, idx = vqfast.quantize(z, c, metric="cosine")
    assert idx.item() == 1
    torch.testing.assert_close(z_q.float(), torch.full((1, 4), 0.5, device=device))


def test_reference_search_is_exact_far_from_the_origin(torch_backend):
    # z, c = 1000 + randn: the plain expanded form ||c||^2 - 2 z.c in fp32 got about a quarter of these
    # rows wrong; the reference shifts both by the codebook mean first.
    g = torch.Generator().manual_seed(3)
    z = 1000 + torch.randn(200, 4, generator=g)
    c = 1000 + torch.randn(50, 4, generator=g)
    idx, dist = vqfast.nearest_code(z, c)
    exact = torch.cdist(z.double(), c.double()).pow(2)
    assert torch.equal(idx, exact.argmin(1))
    torch.testing.assert_close(dist.double(), exact.min(1).values, rtol=1e-4, atol=1e-4)


def test_tensors_on_different_devices_are_refused():
    # The meta device stands in for a second device on a CPU-only machine.
    from vqfast.layer import soft_assignment_entropy

    z, c = _pair()
    on_meta = c.to("meta")
    calls = {
        "nearest_code": lambda: vqfast.nearest_code(z, on_meta),
        "quantize": lambda: vqfast.quantize(z, on_meta),
        "quantize indices": lambda: vqfast.quantize(z, c, indices=torch.zeros(30, dtype=torch.int64, device="meta")),
        "gather": lambda: vqfast.gather(c, torch.zeros(3, dtype=torch.int64, device="meta")),
        "soft_assignment_entropy": lambda: soft_assignment_entropy(z, on_meta),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match="device") as info:
            call()
        assert "meta" in str(info.value) and "cpu" in str(info.value), name


@pytest.mark.parametrize("global_precision, passes", [("highest", ["tf32", "re-search ieee"]),
                                                      ("high", ["tf32", "re-search tf32x3"]),
                                                      ("medium", ["tf32", "re-search tf32x3"])])
def test_default_search_precision_follows_torch(triton_backend, kernel_device, monkeypatch, global_precision,
                                                passes):
    # Every mode runs the tf32 pass; "highest" searches the listed rows again with fp32 products.
    from vqfast.kernels import nearest

    seen = []
    real_search, real_research = nearest._search, nearest._research_listed_rows

    def recording(z, c, c_sqnorm, input_precision, *args, **kwargs):
        seen.append(input_precision)
        return real_search(z, c, c_sqnorm, input_precision, *args, **kwargs)

    def recording_research(*args, **kwargs):
        seen.append(f"re-search {kwargs['plan'].products}")
        return real_research(*args, **kwargs)

    monkeypatch.setattr(nearest, "_search", recording)
    monkeypatch.setattr(nearest, "_research_listed_rows", recording_research)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(global_precision)
    try:
        z, c = _pair(device=kernel_device)
        vqfast.nearest_code(z, c)
    finally:
        torch.set_float32_matmul_precision(previous)
    assert seen == passes


def test_reference_search_and_entropies_ignore_autocast(torch_backend):
    # Under autocast the reference's products would run in bf16, past the fp32 bound that sends near
    # ties to float64: rows then got a farther code.
    g = torch.Generator().manual_seed(31)
    z, c = torch.randn(1000, 16, generator=g), torch.randn(256, 16, generator=g)
    idx, dist = vqfast.nearest_code(z, c)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        idx_ac, dist_ac = vqfast.nearest_code(z, c)
        z_q, _, idx_q = vqfast.quantize(z, c)
        entropies_ac = vqfast.soft_assignment_entropy(3 * z[:500], 3 * c[:64])
    exact = torch.cdist(z.double(), c.double()).argmin(1)
    assert torch.equal(idx, exact) and torch.equal(idx_ac, exact) and torch.equal(idx_q, exact)
    assert torch.equal(dist_ac, dist)
    for got, want in zip(entropies_ac, vqfast.soft_assignment_entropy(3 * z[:500], 3 * c[:64])):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("op", ["quantize", "gather"])
def test_triton_backward_refuses_a_second_derivative(triton_backend, kernel_device, op):
    # The kernels' backward is not differentiable: create_graph=True must fail loudly, not return a
    # gradient that silently drops the second-order terms.
    z0, c0 = _pair(n=6, k=4, d=3, seed=33, device=kernel_device)
    z, c = z0.clone().requires_grad_(), c0.clone().requires_grad_()
    if op == "quantize":
        out = vqfast.quantize(z, c)[1] + (z**3).sum()
        (grad,) = torch.autograd.grad(out, z, create_graph=True)
    else:
        out = (vqfast.gather(c, torch.tensor([0, 2, 2], device=kernel_device)) ** 3).sum()
        (grad,) = torch.autograd.grad(out, c, create_graph=True)
    # The first derivative itself is right (and may take part in a graph that is not differentiated).
    z_ref, c_ref = z0.cpu().clone().requires_grad_(), c0.cpu().clone().requires_grad_()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VQFAST_BACKEND", "torch")
        if op == "quantize":
            out_ref = vqfast.quantize(z_ref, c_ref)[1] + (z_ref**3).sum()
            (grad_ref,) = torch.autograd.grad(out_ref, z_ref)
        else:
            out_ref = (vqfast.gather(c_ref, torch.tensor([0, 2, 2])) ** 3).sum()
            (grad_ref,) = torch.autograd.grad(out_ref, c_ref)
    torch.testing.assert_close(grad.detach().cpu(), grad_ref, rtol=1e-5, atol=1e-6)
    # Through torch.autograd.grad too, which runs only the nodes on the way to its inputs (the refusal
    # was pruned: None with allow_unused, else "not used in the graph").
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.autograd.grad((grad**2).sum(), z if op == "quantize" else c, retain_graph=True, allow_unused=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        (grad**2).sum().backward()


@pytest.mark.parametrize("temperature", ["1", None, torch.tensor([0.5, 0.5]), 0.0, float("inf")])
def test_soft_entropy_temperature_errors_name_the_argument(temperature):
    z, c = _pair(n=4, k=3, d=2)
    with pytest.raises((TypeError, ValueError), match="temperature"):
        vqfast.soft_assignment_entropy(z, c, temperature=temperature)


@pytest.mark.parametrize("scale", [1e20, 1e-25])
def test_cosine_rows_far_from_unit_scale_are_not_taken_for_zero(scale):
    # Their fp32 norm overflows or underflows unless the row is scaled first.
    rows = torch.tensor([[3.0, 3.0], [1.0, -2.0]]) * scale
    unit = reference.unit_rows(rows)
    torch.testing.assert_close(unit, (rows.double() / rows.double().norm(dim=-1, keepdim=True)).float())
    idx, dist = vqfast.nearest_code(rows, torch.tensor([[1.0, 2.0], [2.0, -1.0]]), metric="cosine")
    assert idx.tolist() == [0, 1]
    assert dist[0] < 0.06


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_check_indices_and_rows_of_no_values_are_refused_up_front(backend, monkeypatch, kernel_device):
    monkeypatch.setenv("VQFAST_BACKEND", backend)
    device = kernel_device if backend == "triton" else torch.device("cpu")
    c = torch.randn(4, 3, device=device)
    i = torch.tensor([1, 1, 2], device=device)
    # Any truthy value used to count as True (a string, or a dtype passed in its place).
    for call in (lambda: vqfast.gather(c, i, check_indices="no"), lambda: vqfast.code_usage(i, 4, "no"),
                 lambda: vqfast.quantize(torch.randn(3, 3, device=device), c, indices=i, check_indices=None)):
        with pytest.raises(TypeError, match="check_indices"):
            call()
    # rotate_to_codes accepted D = 0 and failed in its backward, differently per backend.
    for bad in (torch.randn(6, 0, device=device, requires_grad=True), torch.randn(2, 3, 0, device=device)):
        with pytest.raises(ValueError, match="D >= 1"):
            vqfast.rotate_to_codes(bad, torch.zeros_like(bad))


def test_lazily_negated_views_are_read_as_their_values(device):
    """A view with PyTorch's negative bit (``x.conj().imag``, ``torch._neg_view``) holds the memory of the
    values before the negation: the kernels must see the values, as the reference does."""
    import vqfast.kernels

    torch.manual_seed(0)
    plain_z = torch.randn(9, 5, device=device)
    z = torch._neg_view(-plain_z)  # the values of plain_z, stored negated
    c = torch.randn(7, 5, device=device)
    negated_c = torch._neg_view(-c)
    assert z.is_neg() and torch.equal(z, plain_z)
    want = vqfast.reference.nearest_code(plain_z.cpu(), c.cpu())
    for codebook in (c, negated_c):
        idx, dist = vqfast.nearest_code(z, codebook)
        assert torch.equal(idx.cpu(), want[0])
        torch.testing.assert_close(dist.cpu(), want[1])
        torch.testing.assert_close(vqfast.gather(codebook, idx), c[idx])
    x = plain_z.clone().requires_grad_()
    cb = c.clone().requires_grad_()
    z_q, loss, idx = vqfast.quantize(x, cb, beta=0.3)
    upstream = torch.randn(9, 5, device=device)
    grads = torch.autograd.grad((z_q * torch._neg_view(-upstream)).sum() + loss, (x, cb))
    ref_x, ref_c = plain_z.cpu().clone().requires_grad_(), c.cpu().clone().requires_grad_()
    ref_q, ref_loss, _ = vqfast.reference.quantize(ref_x, ref_c, beta=0.3)
    ref_grads = torch.autograd.grad((ref_q * upstream.cpu()).sum() + ref_loss, (ref_x, ref_c))
    for got, ref in zip(grads, ref_grads):
        torch.testing.assert_close(got.cpu(), ref)
    x = plain_z.clone().requires_grad_()
    codes = torch._neg_view(-c[idx])
    got = torch.autograd.grad(vqfast.rotate_to_codes(x, codes), x, upstream)[0]
    ref_x = plain_z.clone().requires_grad_()
    want = torch.autograd.grad(vqfast.rotate_to_codes(ref_x, c[idx]), ref_x, upstream)[0]
    assert not torch.allclose(want, upstream)  # (a rotation, not the straight-through gradient)
    torch.testing.assert_close(got, want)
    if vqfast.resolve_backend(device) == "triton":
        # A launcher that writes in place refuses a negative view (its writes would land negated).
        weight = torch._neg_view(-c.clone())
        with pytest.raises(ValueError, match="lazily negated view"):
            vqfast.kernels.ema_update(weight, torch.ones(7, device=device), torch.zeros(7, 5, device=device),
                                      torch.zeros(8, dtype=torch.int64, device=device), 0.9, 1e-5)


def test_a_codebook_changed_in_place_before_backward(device):
    """The Triton backward reads the codebook: an in-place change before it is PyTorch's error there
    (never a gradient of the new codes), while the CPU backend, which saves the chosen codes, goes on."""
    torch.manual_seed(0)
    codebook = torch.nn.Parameter(torch.randn(5, 3, device=device))
    z = torch.randn(7, 3, device=device, requires_grad=True)
    z_q, loss, _ = vqfast.quantize(z, codebook)
    with torch.no_grad():
        codebook[4] = 10.0
    if vqfast.resolve_backend(device) == "triton":
        with pytest.raises(RuntimeError, match="inplace operation"):
            (z_q.sum() + loss).backward()
    else:
        (z_q.sum() + loss).backward()
        assert codebook.grad is not None and z.grad is not None


def test_every_autograd_function_with_setup_context_keeps_its_signature():
    # torch binds each apply's arguments to forward's signature; a kept one saves rebuilding it per call.
    import inspect

    from vqfast import functional, layer, reference

    found = []
    for module in (functional, layer, reference):
        for value in vars(module).values():
            if (isinstance(value, type) and issubclass(value, torch.autograd.Function)
                    and value.__module__ == module.__name__ and "setup_context" in vars(value)):
                forward = vars(value)["forward"].__func__
                code = forward.__code__
                names = list(code.co_varnames[:code.co_argcount + code.co_kwonlyargcount
                                                + bool(code.co_flags & inspect.CO_VARARGS)])
                assert "__signature__" in vars(forward), value.__name__
                assert list(inspect.signature(forward).parameters) == names, value.__name__
                found.append(value.__name__)
    assert {"_FusedQuantize", "_GatherRows", "_LayoutQuantize", "_StraightThrough"} <= set(found)


def _eager_and_transform_form_runs(monkeypatch, run):
    """``run()`` with vqfast's Functions applied in their ctx-in-forward form (plain eager calls), then
    in their setup_context form (what torch.compile and torch.func get)."""
    from vqfast import functional, layer

    eager = run()
    for module in (functional, layer):
        monkeypatch.setattr(module, "apply_function", lambda function, *args: function.apply(*args))
    return eager, run()


def _assert_same_bits(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        if a is None or b is None:
            assert a is None and b is None
            continue
        assert a.requires_grad == b.requires_grad and a.dtype == b.dtype and a.stride() == b.stride()
        assert torch.equal(a.detach(), b.detach()), (a, b)


def test_both_forms_of_the_functions_give_the_same_values_and_gradients(triton_backend, kernel_device, monkeypatch):
    def functional_ops():
        out = []
        for z_grad, codebook_grad in ((True, True), (True, False), (False, True)):
            z, codebook = _pair(40, 9, 6, seed=3, device=kernel_device)
            z.requires_grad_(z_grad)
            codebook.requires_grad_(codebook_grad)
            mask = torch.arange(40, device=kernel_device) % 3 != 0
            z_q, loss, indices = vqfast.quantize(z, codebook, 0.25)
            z_q_masked, loss_masked, _ = vqfast.quantize(z, codebook, 0.5, mask=mask)
            rows = vqfast.gather(codebook, indices)
            rotated = vqfast.rotate_to_codes(z, rows.detach())
            total = z_q.square().sum() + loss + z_q_masked.sum() + loss_masked + rows.sum() + rotated.pow(3).sum()
            total.backward()
            out += [z_q, loss, z_q_masked, loss_masked, rows, rotated, z.grad, codebook.grad]
        return out

    def layer_steps():
        torch.manual_seed(0)
        plain = vqfast.VectorQuantizer(12, 5, dead_code_threshold=0.5)
        entropy = vqfast.VectorQuantizer(12, 5, sample_entropy_weight=0.1, batch_entropy_weight=0.1)
        out = []
        for vq in (plain, entropy):
            vq.to(kernel_device)
            for step in range(3):
                x = torch.randn(4, 5, 3, 2, device=kernel_device, requires_grad=True)
                z_q, loss, _ = vq(x)
                (z_q.pow(2).sum() + loss).backward()
                out += [z_q, loss, x.grad, vq.embeddings.weight.grad, vq.embeddings.weight.detach().clone()]
        return out

    for run in (functional_ops, layer_steps):
        eager, traced_form = _eager_and_transform_form_runs(monkeypatch, run)
        _assert_same_bits(eager, traced_form)
        monkeypatch.undo()
        monkeypatch.setenv("VQFAST_BACKEND", "triton")


def test_eager_calls_apply_the_functions_without_binding_their_arguments(triton_backend, kernel_device, monkeypatch):
    # PyTorch binds every apply of a Function with setup_context to forward's signature (~14 us of host
    # time); the ctx-in-forward form has no such step. torch.func still gets the setup_context form.
    import torch.autograd.function as autograd_function

    bound = []
    real = autograd_function._bind_default_args
    monkeypatch.setattr(autograd_function, "_bind_default_args", lambda *args: bound.append(1) or real(*args))
    z, codebook = _pair(20, 7, 4, seed=1, device=kernel_device)
    z.requires_grad_(True)
    z_q, loss, indices = vqfast.quantize(z, codebook)
    vqfast.gather(codebook, indices)
    vqfast.rotate_to_codes(z, z_q.detach())
    vq = vqfast.VectorQuantizer(7, 4).to(kernel_device)
    vq_q, vq_loss, _ = vq(z)
    (z_q.sum() + loss + vq_q.sum() + vq_loss).backward()
    assert bound == []

    def summed(z):
        z_q, loss, _ = vqfast.quantize(z, codebook)
        return z_q.sum() + loss

    grad = torch.func.grad(summed)(z.detach())
    assert bound  # the setup_context form under the transform
    want = z.detach().clone().requires_grad_(True)
    summed(want).backward()
    torch.testing.assert_close(grad, want.grad, rtol=0, atol=0)
