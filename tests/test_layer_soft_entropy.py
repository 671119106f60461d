"""The streaming soft-assignment entropy kernels (forward and backward) against the PyTorch reference."""

from __future__ import annotations

import os
from importlib.util import find_spec

import pytest
import torch

from vqfast import reference
from vqfast.layer import soft_assignment_entropy

_INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
pytestmark = pytest.mark.skipif(
    find_spec("triton") is None or not (_INTERP or torch.cuda.is_available()),
    reason="Triton kernels need CUDA or TRITON_INTERPRET=1",
)
DEVICE = "cpu" if _INTERP else "cuda"


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("VQFAST_BACKEND", "triton")


def _reference(z, codebook, temperature, metric):
    # On the CPU, where the results are compared.
    z64 = z.detach().double().cpu().requires_grad_()
    c64 = codebook.detach().double().cpu().requires_grad_()
    # The reference works in fp32; a float64 re-run of its formula is the tighter oracle.
    rows, codes = z64, c64
    if metric == "cosine":
        rows = torch.nn.functional.normalize(rows, dim=-1)
        codes = torch.nn.functional.normalize(codes, dim=-1)
    d = torch.cdist(rows, codes) ** 2
    if metric == "cosine":
        d = d * 0.5
    logp = torch.log_softmax(-d / temperature, dim=1)
    p = logp.exp()
    sample = -(p * logp).sum(1).mean()
    avg = p.mean(0)
    batch = -torch.special.xlogy(avg, avg).sum()
    return sample, batch, z64, c64


# Odd sizes: partial row / code / D tiles, D larger than one D block (64), K smaller than one code tile.
SHAPES = [(37, 45, 7), (50, 100, 70), (5, 3, 130), (1, 1, 1), (64, 33, 16)]


@pytest.mark.parametrize("n,k,d", SHAPES)
@pytest.mark.parametrize("metric,temperature", [("l2", 1.0), ("l2", 0.05), ("cosine", 0.1)])
def test_forward_and_gradients_match_reference(n, k, d, metric, temperature):
    torch.manual_seed(n * 1000 + k + d)
    z = (torch.randn(n, d) * 0.5).to(DEVICE).requires_grad_()
    codebook = (torch.randn(k, d) * 0.5).to(DEVICE).requires_grad_()
    sample, batch = soft_assignment_entropy(z, codebook, temperature=temperature, metric=metric)
    ref_sample, ref_batch, z64, c64 = _reference(z, codebook, temperature, metric)
    torch.testing.assert_close(sample.double().cpu(), ref_sample.detach(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(batch.double().cpu(), ref_batch.detach(), rtol=2e-5, atol=2e-5)
    # The reference op itself agrees too (fp32, blocked).
    r_sample, r_batch = reference.soft_assignment_entropy(z.detach().cpu(), codebook.detach().cpu(), temperature,
                                                          metric)
    torch.testing.assert_close(sample.cpu(), r_sample, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batch.cpu(), r_batch, rtol=1e-4, atol=1e-5)

    a, b = 0.7, -1.3  # arbitrary upstream weights for the two outputs
    (a * sample + b * batch).backward()
    (a * ref_sample + b * ref_batch).backward()
    scale_z = z64.grad.abs().max().item() + 1e-3
    scale_c = c64.grad.abs().max().item() + 1e-3
    torch.testing.assert_close(z.grad.double().cpu(), z64.grad, rtol=1e-3, atol=1e-4 * scale_z)
    torch.testing.assert_close(codebook.grad.double().cpu(), c64.grad, rtol=1e-3, atol=1e-4 * scale_c)
    if temperature >= 0.1:
        # ... and the reference op's own gradients (at very low temperatures some code's average
        # assignment underflows to 0 in fp32 and the reference's gradient is NaN; the kernel's is not).
        zr = z.detach().cpu().requires_grad_()
        cr = codebook.detach().cpu().requires_grad_()
        rs, rb = reference.soft_assignment_entropy(zr, cr, temperature, metric)
        (a * rs + b * rb).backward()
        torch.testing.assert_close(z.grad.cpu(), zr.grad, rtol=1e-3, atol=1e-4 * scale_z)
        torch.testing.assert_close(codebook.grad.cpu(), cr.grad, rtol=1e-3, atol=1e-4 * scale_c)
    assert torch.isfinite(z.grad).all() and torch.isfinite(codebook.grad).all()


def test_single_output_gradients():
    """Gradients when only one of the two entropies is used (the other's grad is None)."""
    torch.manual_seed(1)
    z = torch.randn(21, 9).to(DEVICE).requires_grad_()
    codebook = torch.randn(17, 9).to(DEVICE).requires_grad_()
    for pick in (0, 1):
        z.grad = codebook.grad = None
        out = soft_assignment_entropy(z, codebook, temperature=2.0)[pick]
        out.backward()
        ref = _reference(z, codebook, 2.0, "l2")
        ref[pick].backward()
        torch.testing.assert_close(z.grad.double().cpu(), ref[2].grad, rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(codebook.grad.double().cpu(), ref[3].grad, rtol=1e-3, atol=1e-5)


def test_fp16_inputs():
    torch.manual_seed(2)
    z = torch.randn(30, 12).half().to(DEVICE).requires_grad_()
    codebook = torch.randn(20, 12).half().to(DEVICE).requires_grad_()
    sample, batch = soft_assignment_entropy(z, codebook, temperature=4.0)
    ref_sample, ref_batch, z64, c64 = _reference(z, codebook, 4.0, "l2")
    torch.testing.assert_close(sample.double().cpu(), ref_sample.detach(), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(batch.double().cpu(), ref_batch.detach(), rtol=1e-3, atol=1e-3)
    (sample - batch).backward()
    (ref_sample - ref_batch).backward()
    assert z.grad.dtype == torch.float16 and codebook.grad.dtype == torch.float16
    torch.testing.assert_close(z.grad.double().cpu(), z64.grad, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(codebook.grad.double().cpu(), c64.grad, rtol=2e-2, atol=2e-3)


# bf16 arithmetic is wrong under Triton's interpreter: that case needs a GPU.
@pytest.mark.parametrize("precision", ["tf32", pytest.param("bf16", marks=pytest.mark.gpu)])
def test_reduced_precision_modes_within_their_error_bound(precision):
    """tf32 products (and bf16-rounded inputs for "bf16") against float64 on the inputs the mode sees.

    A tf32 product z.c is off by at most 2**-9 |z| |c| (two operands each truncated to 10 bits), so
    every logit by at most eps = 2 scale max|z| max|c| 2**-9; entropies then move by at most 4 eps, and
    gradients by about that relative to their size plus the gradient products' own 2**-9.
    (Under the interpreter the products are exact fp32, so there the bound is loose.)
    """
    torch.manual_seed(6)
    z = (torch.randn(300, 40) * 0.15).to(DEVICE).requires_grad_()
    codebook = (torch.randn(200, 40) * 0.15).to(DEVICE).requires_grad_()
    temperature = 0.5
    sample, batch = soft_assignment_entropy(z, codebook, temperature=temperature, precision=precision)
    (sample - 2.0 * batch).backward()
    seen = (lambda t: t.detach().bfloat16()) if precision == "bf16" else (lambda t: t.detach())
    ref_sample, ref_batch, z64, c64 = _reference(seen(z), seen(codebook), temperature, "l2")
    (ref_sample - 2.0 * ref_batch).backward()
    eps = 2.0 / temperature * z64.norm(dim=1).max().item() * c64.norm(dim=1).max().item() * 2.0**-9
    assert 4 * eps < 0.1  # the bound is informative at this size
    torch.testing.assert_close(sample.double().cpu(), ref_sample.detach(), rtol=0, atol=4 * eps)
    torch.testing.assert_close(batch.double().cpu(), ref_batch.detach(), rtol=0, atol=4 * eps)
    for grad, ref in ((z.grad, z64.grad), (codebook.grad, c64.grad)):
        torch.testing.assert_close(grad.double().cpu(), ref, rtol=0,
                                   atol=(4 * eps + 2.0**-9) * ref.abs().max().item())


def test_kernel_outputs_per_row():
    """The launcher's per-row logsumexp / entropy and column sums, directly."""
    from vqfast.kernels.soft_entropy import soft_entropy_forward

    torch.manual_seed(3)
    z = torch.randn(19, 5).to(DEVICE)
    c = torch.randn(11, 5).to(DEVICE)
    lse, ent, colsum = soft_entropy_forward(z, c, 0.75)
    logits = 0.75 * (2 * z.double() @ c.double().t() - c.double().pow(2).sum(1))
    ref_lse = logits.logsumexp(1)
    p = (logits - ref_lse[:, None]).exp()
    torch.testing.assert_close(lse.double().cpu(), ref_lse.cpu(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double().cpu(), -(p * p.log()).sum(1).cpu(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(colsum.double().cpu(), p.sum(0).cpu(), rtol=1e-5, atol=1e-5)


def test_empty_and_errors():
    z = torch.zeros(0, 4, device=DEVICE, requires_grad=True)
    c = torch.randn(5, 4, device=DEVICE, requires_grad=True)
    sample, batch = soft_assignment_entropy(z, c)
    assert float(sample.detach()) == 0.0 and float(batch.detach()) == 0.0
    with pytest.raises(ValueError, match="temperature"):
        soft_assignment_entropy(torch.randn(3, 4, device=DEVICE), c, temperature=0.0)
    from vqfast.kernels.soft_entropy import soft_entropy_forward

    with pytest.raises(ValueError, match="expected z"):
        soft_entropy_forward(torch.randn(3, 5, device=DEVICE), c.detach(), 1.0)


def test_frozen_codebook_skips_its_gradient():
    """With a codebook that needs no gradient (EMA), only dz is computed, and it is unchanged."""
    torch.manual_seed(4)
    z = torch.randn(23, 6).to(DEVICE).requires_grad_()
    codebook = torch.randn(14, 6).to(DEVICE)
    sample, batch = soft_assignment_entropy(z, codebook, temperature=1.5)
    (sample - batch).backward()
    ref = _reference(z, codebook, 1.5, "l2")
    (ref[0] - ref[1]).backward()
    torch.testing.assert_close(z.grad.double().cpu(), ref[2].grad, rtol=1e-3, atol=1e-5)


def test_backward_without_codebook_gradient_allocates_none():
    from vqfast.kernels.soft_entropy import soft_entropy_backward, soft_entropy_forward

    torch.manual_seed(5)
    z, c = torch.randn(19, 7).to(DEVICE), torch.randn(11, 7).to(DEVICE)
    lse, ent, colsum = soft_entropy_forward(z, c, 0.5)
    w, coef = torch.randn(11).to(DEVICE), torch.ones(1).to(DEVICE)
    dz_full, dc_full = soft_entropy_backward(z, c, lse, ent, w, coef, 0.5)
    dz, dc = soft_entropy_backward(z, c, lse, ent, w, coef, 0.5, codebook_grad=False)
    assert dc_full.shape == (11, 7) and dc.shape == (0, 7)
    assert torch.equal(dz, dz_full)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_float64_inputs_are_computed_in_float64(metric, monkeypatch):
    monkeypatch.setenv("VQFAST_BACKEND", "torch")
    g = torch.Generator().manual_seed(5)
    z = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    sample, batch = soft_assignment_entropy(z, c, temperature=0.5, metric=metric)
    assert sample.dtype == batch.dtype == torch.float64
    assert torch.autograd.gradcheck(
        lambda a, b: soft_assignment_entropy(a, b, temperature=0.5, metric=metric), (z, c))
    # A float64 z beside a float32 codebook is not rounded down to float32.
    sample32, _ = soft_assignment_entropy(z, c.float(), temperature=0.5, metric=metric)
    assert sample32.dtype == torch.float64


@pytest.mark.skipif(torch.cuda.is_available(), reason="fakes the GPU timer around the CPU interpreter")
@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_each_pass_tunes_its_tiles_once_per_problem(monkeypatch, precision):
    # On a GPU the four passes time their candidate tiles on the first call of a problem and keep the
    # fastest. Here the interpreter runs them and a fake timer makes the second candidate the fastest:
    # the results must still be right, and the codebook pass's timing runs must not add into its output.
    from vqfast.kernels import _common, soft_entropy

    monkeypatch.setattr(_common, "interpreting", lambda: False)
    monkeypatch.setattr(soft_entropy, "interpreting", lambda: False)
    monkeypatch.setattr(_common, "check_launchable", lambda *tensors: None)  # the interpreter's business here
    monkeypatch.setenv("VQFAST_AUTOTUNE", "1")
    monkeypatch.setattr(_common, "_TUNED", {})
    timings = []
    real_tuned_config = soft_entropy.tuned_config
    trial_in_pass = []

    def tuned_config(key, configs, trial):
        trial_in_pass.clear()
        return real_tuned_config(key, configs, trial)

    def fake_do_bench(fn, warmup, rep):
        fn()
        timings.append(len(timings))
        trial_in_pass.append(1)
        return 1.0 if len(trial_in_pass) == 2 else 2.0

    monkeypatch.setattr(soft_entropy, "tuned_config", tuned_config)
    monkeypatch.setattr(_common, "_benchmarker", lambda: fake_do_bench)
    torch.manual_seed(50)
    z = (torch.randn(40, 20) * 0.5).requires_grad_()
    codebook = (torch.randn(30, 20) * 0.5).requires_grad_()
    for round_ in range(2):  # the second reuses the tuned tiles without timing
        z.grad = codebook.grad = None
        sample, batch = soft_assignment_entropy(z, codebook, temperature=0.5, precision=precision)
        (sample - 2 * batch).backward()
        ref_sample, ref_batch, z64, c64 = _reference(z, codebook, 0.5, "l2")
        (ref_sample - 2 * ref_batch).backward()
        torch.testing.assert_close(sample.double(), ref_sample.detach(), rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(batch.double(), ref_batch.detach(), rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(z.grad.double(), z64.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(codebook.grad.double(), c64.grad, rtol=1e-4, atol=1e-5)
    backward = "ieee" if precision == "fp32" else "tf32"
    # Four passes, each timing its candidates, all in the first round.
    assert len(timings) == 2 * len(soft_entropy._FORWARD_TILES) + 2 * len(soft_entropy._BACKWARD_TILES[backward])
    for key, cfg in _common._TUNED.items():
        tiles = soft_entropy._FORWARD_TILES if key[0] in ("soft_entropy_rows", "soft_entropy_columns") \
            else soft_entropy._BACKWARD_TILES[backward]
        assert cfg[:2] == tiles[1][:2] and cfg[3] == tiles[1][2], key
    assert len(_common._TUNED) == 4


def test_a_candidate_that_does_not_fit_is_skipped(monkeypatch):
    from triton.runtime.errors import OutOfResources

    from vqfast.kernels import _common

    monkeypatch.setattr(_common, "interpreting", lambda: False)
    monkeypatch.setenv("VQFAST_AUTOTUNE", "1")
    monkeypatch.setattr(_common, "_TUNED", {})
    monkeypatch.setattr(_common, "_benchmarker", lambda: lambda fn, warmup, rep: fn())

    def trial(cfg):
        if cfg != "fits":
            raise OutOfResources(300000, 232448, "shared memory")
        return 3.0

    assert _common.tuned_config(("fit",), ["big", "fits", "bigger"], trial) == "fits"
    with pytest.raises(OutOfResources):
        _common.tuned_config(("none",), ["big", "bigger"], trial)
