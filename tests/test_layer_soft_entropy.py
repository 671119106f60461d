"""The streaming soft-assignment entropy kernels (forward and backward) against the PyTorch reference."""

from __future__ import annotations

import os
from importlib.util import find_spec

import pytest
import torch

from vqfast import reference
from vqfast.layer import VectorQuantizer, soft_assignment_entropy

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
def test_reduced_precision_modes_within_their_error_bound(precision, tf32_rounding_interpreter):
    """tf32 products (and bf16-rounded inputs for "bf16") against float64 on the inputs the mode sees.

    A tf32 product z.c is off by at most 2**-9 |z| |c| (two operands each truncated to 10 bits), so
    every logit by at most eps = 2 scale max|z| max|c| 2**-9; entropies then move by at most 4 eps, and
    gradients by about that relative to their size plus the gradient products' own 2**-9.
    (Under the interpreter the tf32 operands are truncated to 10 bits, tf32_rounding_interpreter.)
    """
    torch.manual_seed(6)
    z = (torch.randn(300, 40) * 0.15).to(DEVICE).requires_grad_()
    codebook = (torch.randn(200, 40) * 0.15).to(DEVICE).requires_grad_()
    temperature = 0.5
    sample, batch = soft_assignment_entropy(z, codebook, temperature=temperature, precision=precision)
    (sample - 2.0 * batch).backward()
    if _INTERP:
        assert tf32_rounding_interpreter  # the products were truncated
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
    """The launcher's per-row largest logit, log-sum-exp past it and entropy, and column sums, directly."""
    from vqfast.kernels.soft_entropy import soft_entropy_forward

    torch.manual_seed(3)
    z = torch.randn(19, 5).to(DEVICE)
    c = torch.randn(11, 5).to(DEVICE)
    row_max, log_sum, ent, colsum = soft_entropy_forward(z, c, 0.75)
    logits = 0.75 * (2 * z.double() @ c.double().t() - c.double().pow(2).sum(1))
    ref_max = logits.amax(1)
    ref_log_sum = (logits - ref_max[:, None]).logsumexp(1)
    p = (logits - logits.logsumexp(1)[:, None]).exp()
    torch.testing.assert_close(row_max.double().cpu(), ref_max.cpu(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(log_sum.double().cpu(), ref_log_sum.cpu(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double().cpu(), -(p * p.log()).sum(1).cpu(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(colsum.double().cpu(), p.sum(0).cpu(), rtol=1e-5, atol=1e-5)


def test_empty_and_errors():
    z = torch.zeros(0, 4, device=DEVICE, requires_grad=True)
    c = torch.randn(5, 4, device=DEVICE, requires_grad=True)
    sample, batch = soft_assignment_entropy(z, c)
    assert float(sample.detach()) == 0.0 and float(batch.detach()) == 0.0
    with pytest.raises(ValueError, match="temperature"):
        soft_assignment_entropy(torch.randn(3, 4, device=DEVICE), c, temperature=0.0)
    # 1 / T must be finite in float32, where the kernels compute the logits.
    for tiny in (1e-39, 2.0 ** -127):
        with pytest.raises(ValueError, match="temperature"):
            soft_assignment_entropy(torch.randn(3, 4, device=DEVICE), c, temperature=tiny)
        with pytest.raises(ValueError, match="entropy_temperature"):
            VectorQuantizer(5, 4, sample_entropy_weight=0.1, entropy_temperature=tiny)
    sample, _ = soft_assignment_entropy(torch.randn(3, 4, device=DEVICE), c, temperature=2.0 ** -126)
    assert torch.isfinite(sample)
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
    row_max, log_sum, ent, colsum = soft_entropy_forward(z, c, 0.5)
    w, coef = torch.randn(11).to(DEVICE), torch.ones(1).to(DEVICE)
    dz_full, dc_full = soft_entropy_backward(z, c, row_max, log_sum, ent, w, coef, 0.5)
    dz, dc = soft_entropy_backward(z, c, row_max, log_sum, ent, w, coef, 0.5, codebook_grad=False)
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


# -- logits past fp32's range -----------------------------------------------------------------------

_FP32_MAX = torch.finfo(torch.float32).max


def _fp64_entropies(z, codebook, temperature):
    """The kernels' formula in float64, where nothing overflows: logits (2 z.c - ||c||^2) / T, saturated
    at fp32's largest value as the kernels saturate them. Codes holding inf are left out: they are
    infinitely far, with probability 0 (their column of the average is 0 and adds nothing)."""
    z64 = z.detach().double().cpu().requires_grad_()
    c64 = codebook.detach().double().cpu().requires_grad_()
    kept = torch.isfinite(c64.detach()).all(1)
    codes = c64[kept]
    logits = ((2 * z64 @ codes.t() - codes.pow(2).sum(1)) / temperature).clamp_max(_FP32_MAX)
    logp = torch.log_softmax(logits, dim=1)
    p = logp.exp()
    sample = -(p * logp).sum(1).mean()
    avg = p.mean(0)
    batch = -(avg * avg.clamp_min(torch.finfo(torch.float64).tiny).log()).sum()
    return sample, batch, z64, c64


def _entropies_and_grads(backend, z, codebook, temperature, monkeypatch):
    monkeypatch.setenv("VQFAST_BACKEND", backend)
    device = DEVICE if backend == "triton" else "cpu"
    z = z.to(device, copy=True).requires_grad_()
    codebook = codebook.to(device, copy=True).requires_grad_()
    sample, batch = soft_assignment_entropy(z, codebook, temperature=temperature)
    (0.7 * sample - 1.3 * batch).backward()
    return sample.detach().cpu(), batch.detach().cpu(), z.grad.cpu(), codebook.grad.cpu()


def _far_codes(k, d, g):
    """Codes whose every element is beyond 1e19 in size, so that ||c||^2 overflows fp32."""
    return torch.randn(k, d, generator=g).sign() * (1 + torch.rand(k, d, generator=g)) * 1e19


def _far_codebook(case):
    g = torch.Generator().manual_seed(21)
    if case == "one code":
        # ||c||^2 of the code overflows fp32 (its logit was -inf, and 0 * log 0 made both entropies NaN).
        z, c = torch.randn(20, 13, generator=g), torch.randn(17, 13, generator=g)
        c[3] = 1e19
    else:
        # Whole codebook tiles of far codes before the near ones (every row's running max starts at
        # -inf and stays there for a tile or two), one of them holding inf.
        z, c = torch.randn(37, 7, generator=g), torch.randn(80, 7, generator=g)
        c[:64] = _far_codes(64, 7, g)
        c[5, 2] = float("inf")
    return z, c


def _assert_matches_fp64(backend, z, c, temperature, monkeypatch):
    """Entropies and finite gradients of ``0.7 * sample - 1.3 * batch`` as the float64 formula gives
    them; returns the codebook gradient."""
    sample, batch, dz, dc = _entropies_and_grads(backend, z, c, temperature, monkeypatch)
    ref_sample, ref_batch, z64, c64 = _fp64_entropies(z, c, temperature)
    torch.testing.assert_close(sample.double(), ref_sample.detach(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(batch.double(), ref_batch.detach(), rtol=2e-5, atol=2e-5)
    (0.7 * ref_sample - 1.3 * ref_batch).backward()
    assert torch.isfinite(dz).all() and torch.isfinite(dc).all()
    torch.testing.assert_close(dz.double(), z64.grad, rtol=1e-3, atol=1e-4 * z64.grad.abs().max().item())
    torch.testing.assert_close(dc.double(), c64.grad, rtol=1e-3, atol=1e-4 * c64.grad.abs().max().item())
    return dc


@pytest.mark.parametrize("case", ["one code", "leading tiles"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_codes_past_fp32_range_have_no_probability_and_no_gradient(backend, case, monkeypatch):
    z, c = _far_codebook(case)
    dc = _assert_matches_fp64(backend, z, c, 1.0, monkeypatch)
    far = (c.double() ** 2).sum(1) > _FP32_MAX
    assert (dc[far] == 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rows_with_every_code_infinitely_far_have_entropy_zero(backend, monkeypatch):
    """No code has any probability: such a row adds 0 to the sample entropy, nothing to the average
    assignment and nothing to the gradients (on both backends alike)."""
    g = torch.Generator().manual_seed(22)
    z = torch.randn(21, 6, generator=g)
    c = _far_codes(40, 6, g)
    c[7, 1] = float("inf")
    sample, batch, dz, dc = _entropies_and_grads(backend, z, c, 1.0, monkeypatch)
    assert sample.item() == 0.0 and batch.item() == 0.0
    assert (dz == 0).all() and (dc == 0).all()
    if backend == "triton":
        from vqfast.kernels.soft_entropy import soft_entropy_forward

        row_max, _, ent, colsum = soft_entropy_forward(z.to(DEVICE), c.to(DEVICE), 1.0)
        assert (row_max.cpu() == float("-inf")).all() and (ent.cpu() == 0).all() and (colsum.cpu() == 0).all()


def _saturating(case):
    g = torch.Generator().manual_seed(23)
    z, c = torch.randn(30, 9, generator=g), torch.randn(19, 9, generator=g)
    if case == "temperature":
        return 10 * z, c, 1e-37  # the logits of the rows' nearest codes pass fp32's range
    # Rows along their code of the largest norm, scaled so that 2 z.c / T passes fp32's range for it
    # and a code close to it (and no partial sum of the product does): two saturated codes, between
    # which the probability is split evenly.
    j = int((c ** 2).sum(1).argmax())
    c[(j + 1) % len(c)] = 0.9 * c[j] + 0.05 * torch.randn(9, generator=g)
    z[:4] = c[j] * (1e38 / (c[j] ** 2).sum())
    return z, c, 0.25


@pytest.mark.parametrize("case", ["temperature", "rows"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logits_past_fp32_range_saturate(backend, case, monkeypatch):
    """Finite inputs whose logits pass fp32's range: they saturate at its largest value (the row's
    probability is spread evenly over its saturated codes) and get no gradient, instead of NaN."""
    z, c, temperature = _saturating(case)
    exact = (2 * z.double() @ c.double().T - (c.double() ** 2).sum(1)) / temperature
    assert (exact > _FP32_MAX).any(1).sum() >= 2  # the case saturates some rows
    _assert_matches_fp64(backend, z, c, temperature, monkeypatch)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_large_logits_keep_their_small_differences(backend, monkeypatch):
    """Rows and codes far from the origin: logits near 9e6 (fp32 spacing 1) that differ by a few units,
    all exact in fp32 (small integers). A row's log-sum-exp m + log s rounded to that spacing would shift
    every log p of the row by up to 0.5; the probabilities must come from (l - m) - log s instead."""
    g = torch.Generator().manual_seed(25)
    z = torch.randint(-3, 4, (24, 4), generator=g).float()
    c = torch.randint(-3, 4, (10, 4), generator=g).float()
    z[:, 0] = c[:, 0] = 3000.0
    exact = 2 * z.double() @ c.double().T - (c.double() ** 2).sum(1)
    assert exact.min() > 2**23 and exact.max() < 2**24  # fp32 spacing 1 there, and every logit exact
    sample, batch, dz, dc = _entropies_and_grads(backend, z, c, 1.0, monkeypatch)
    ref_sample, ref_batch, z64, c64 = _fp64_entropies(z, c, 1.0)
    torch.testing.assert_close(sample.double(), ref_sample.detach(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(batch.double(), ref_batch.detach(), rtol=2e-5, atol=2e-5)
    (0.7 * ref_sample - 1.3 * ref_batch).backward()
    # Along the shared far axis each gradient is a sum of terms of size 6000 * |dLoss/dl_ij| that cancel
    # to 0 (each row of p sums to 1): fp32 leaves its rounding of those terms there (about 1e-4 here,
    # on either backend), an ill-conditioned sum rather than a wrong probability. The other axes show
    # whether p is right.
    assert torch.isfinite(dz).all() and torch.isfinite(dc).all()
    for grad, ref in ((dz, z64.grad), (dc, c64.grad)):
        torch.testing.assert_close(grad[:, 1:].double(), ref[:, 1:], rtol=1e-3, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cosine_entropies_of_16_bit_inputs_use_their_exact_unit_vectors(backend, monkeypatch):
    """fp16 rows and codes at a low temperature: their unit vectors rounded back to fp16 would move the
    entropies by about 1e-3."""
    g = torch.Generator().manual_seed(26)
    z, c = torch.randn(5, 5, generator=g).half(), torch.randn(129, 5, generator=g).half()
    temperature = 0.01
    ref_sample, ref_batch, _, _ = _reference(z, c, temperature, "cosine")
    monkeypatch.setenv("VQFAST_BACKEND", backend)
    device = DEVICE if backend == "triton" else "cpu"
    sample, batch = soft_assignment_entropy(z.to(device), c.to(device), temperature=temperature, metric="cosine")
    torch.testing.assert_close(sample.cpu().double(), ref_sample.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch.cpu().double(), ref_batch.detach(), rtol=1e-5, atol=1e-5)


def test_nan_inputs_still_give_nan(monkeypatch):
    """Saturation and far codes must not hide a NaN: it reaches both entropies on both backends. So does
    a row holding inf, whose saturated or -inf logits would otherwise leave finite entropies while its
    0 * inf made the codebook gradient NaN."""
    g = torch.Generator().manual_seed(24)
    for backend in ("torch", "triton"):
        for where, value in (("row", float("nan")), ("code", float("nan")), ("row", float("inf")),
                             ("row", float("-inf"))):
            z, c = torch.randn(9, 5, generator=g), torch.randn(40, 5, generator=g)
            c[0] = 1e19
            (z if where == "row" else c)[3, 1] = value
            sample, batch, _, _ = _entropies_and_grads(backend, z, c, 1.0, monkeypatch)
            assert sample.isnan() and batch.isnan(), (backend, where, value)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_layer_entropy_terms_with_a_far_code(backend, monkeypatch):
    """The layer's entropy options with a code past fp32's range: finite loss and gradients, the terms
    the float64 formula gives, and the same on both backends."""
    from vqfast import VectorQuantizer

    monkeypatch.setenv("VQFAST_BACKEND", backend)
    device = DEVICE if backend == "triton" else "cpu"
    torch.manual_seed(25)
    kw = dict(dead_code_threshold=0.0, precision="fp32")
    base = VectorQuantizer(12, 4, **kw)
    with torch.no_grad():
        base.embeddings.weight[5] = 1e19
    reg = VectorQuantizer(12, 4, sample_entropy_weight=0.3, batch_entropy_weight=0.7, entropy_temperature=0.5, **kw)
    reg.load_state_dict(base.state_dict())
    base, reg = base.to(device), reg.to(device)
    z = torch.randn(2, 4, 3, 5)
    zb, zr = z.to(device, copy=True).requires_grad_(), z.to(device, copy=True).requires_grad_()
    _, loss_b, _ = base(zb)
    _, loss_r, _ = reg(zr)
    rows = z.permute(0, 2, 3, 1).reshape(-1, 4)
    h_s, h_b, z64, c64 = _fp64_entropies(rows, base.embeddings.weight.cpu(), 0.5)
    torch.testing.assert_close((loss_r - loss_b).double().cpu(), (0.3 * h_s - 0.7 * h_b).detach(),
                               rtol=1e-4, atol=1e-6)
    loss_r.backward()
    loss_b.backward()
    (0.3 * h_s - 0.7 * h_b).backward()
    dz = (zr.grad - zb.grad).permute(0, 2, 3, 1).reshape(-1, 4).double().cpu()
    dc = (reg.embeddings.weight.grad - base.embeddings.weight.grad).double().cpu()
    assert torch.isfinite(dz).all() and torch.isfinite(dc).all() and (dc[5] == 0).all()
    torch.testing.assert_close(dz, z64.grad, rtol=1e-3, atol=1e-4 * z64.grad.abs().max().item())
    torch.testing.assert_close(dc, c64.grad, rtol=1e-3, atol=1e-4 * c64.grad.abs().max().item())


def _exact_sample_entropy_grads(z, codebook, temperature):
    """Gradients of the mean sample entropy in float64, from dH/dl = -p (x - sum(p x)) with x = l - max:
    autograd's -p (log p + H) cancels, even in float64, for a row that is almost one-hot."""
    z64 = z.detach().double().requires_grad_()
    c64 = codebook.detach().double().requires_grad_()
    logits = (2 * z64 @ c64.t() - c64.pow(2).sum(1)) / temperature
    x = (logits - logits.amax(1, keepdim=True)).detach()
    p = x.softmax(1)
    logits.backward(-p * (x - (p * x).sum(1, keepdim=True)) / len(z))
    return z64.grad, c64.grad


@pytest.mark.parametrize("temperature", [0.3, 0.1])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_peaked_rows_keep_the_relative_accuracy_of_their_gradients(backend, temperature, monkeypatch):
    """Rows next to a code put almost all their weight on it: the gradient of their entropy is as small
    as 1e-15 (T = 0.3) or 1e-27 (T = 0.1), and must still be right to its own size, not lost in the
    rounding of numbers near 1."""
    g = torch.Generator().manual_seed(27)
    z, c = torch.randn(16, 8, generator=g), torch.randn(40, 8, generator=g)
    z[:8] = c[:8] + 0.01 * torch.randn(8, 8, generator=g)
    monkeypatch.setenv("VQFAST_BACKEND", backend)
    device = DEVICE if backend == "triton" else "cpu"
    zd, cd = z.to(device, copy=True).requires_grad_(), c.to(device, copy=True).requires_grad_()
    soft_assignment_entropy(zd, cd, temperature=temperature)[0].backward()
    dz_ref, dc_ref = _exact_sample_entropy_grads(z, c, temperature)
    assert (dz_ref.norm(dim=1) < 1e-11).sum() >= 2  # the case has peaked rows
    # Gradients below fp32's normal range (some rows at T = 0.1 reach 1e-48) cannot be held in fp32.
    representable = 1e3 * torch.finfo(torch.float32).tiny
    for grad, ref in ((zd.grad.cpu().double(), dz_ref), (cd.grad.cpu().double(), dc_ref)):
        live = ref.norm(dim=1) > representable
        err = (grad - ref).norm(dim=1)[live] / ref.norm(dim=1)[live]
        assert err.max() < 1e-3, err.max()
