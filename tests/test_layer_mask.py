"""VectorQuantizer and ResidualVectorQuantizer with a padding mask: the kept rows give what the layer
gives on those rows alone (indices, loss, gradients, statistics, EMA codes); padding passes through,
gets index -1 and reaches neither the loss, the statistics, the restart seeds nor k-means."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from helpers import assert_compiled_steps_match, triton_usable
from vqfast import ResidualVectorQuantizer, VectorQuantizer, quantize


def _sequences(device, batch=3, length=7, channels=4, seed=0):
    """(B, T, C) rows, lengths 7, 4 and 1: a padding mask (B, T) of True for the real frames."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, length, channels, generator=g).to(device)
    lengths = torch.tensor([length, 4, 1][:batch])
    mask = (torch.arange(length)[None, :] < lengths[:, None]).to(device)
    return z, mask


def _step(layer, z, mask=None):
    """One training step's outputs and gradients (of z_q's sum weighted per channel, plus the loss)."""
    z = z.detach().clone().requires_grad_(True)
    z_q, loss, indices = layer(z, mask=mask) if mask is not None else layer(z)
    weights = torch.linspace(-1.0, 1.0, z_q.shape[-1], device=z.device).expand_as(z_q)
    ((z_q * weights).sum() + loss).backward()
    grad_c = layer.embeddings.weight.grad
    return z_q.detach(), loss.detach(), indices, z.grad, None if grad_c is None else grad_c.clone(), weights


@pytest.mark.parametrize("options", [dict(), dict(ema=True), dict(metric="cosine"), dict(beta=1.0)],
                         ids=["codebook-loss", "ema", "cosine", "beta1"])
def test_kept_rows_give_the_layer_on_those_rows_alone(device, options):
    torch.manual_seed(0)
    masked = VectorQuantizer(16, 4, dead_code_threshold=0.0, **options).to(device)
    alone = copy.deepcopy(masked)
    z, mask = _sequences(device)

    z_q, loss, indices, grad_z, grad_c, weights = _step(masked, z, mask)
    z_q1, loss1, indices1, grad_z1, grad_c1, _ = _step(alone, z[mask])

    assert indices.shape == mask.shape
    assert torch.equal(indices[mask], indices1) and bool((indices[~mask] == -1).all())
    assert torch.equal(z_q[mask], z_q1) and torch.equal(z_q[~mask], z[~mask])
    torch.testing.assert_close(loss, loss1, rtol=1e-6, atol=1e-7)
    # Kept rows: the gradient of the layer on those rows; padding: z_q's gradient straight through.
    torch.testing.assert_close(grad_z[mask], grad_z1, rtol=1e-5, atol=1e-7)
    assert torch.equal(grad_z[~mask], weights[~mask])
    if grad_c1 is None:
        assert grad_c is None
    else:
        torch.testing.assert_close(grad_c, grad_c1, rtol=1e-5, atol=1e-7)
    # The statistics (and EMA codes) count the kept rows only.
    for name, buf in alone.named_buffers():
        torch.testing.assert_close(dict(masked.named_buffers())[name], buf, rtol=1e-6, atol=1e-7, msg=name)
    torch.testing.assert_close(masked.embeddings.weight, alone.embeddings.weight, rtol=1e-6, atol=1e-7)
    assert int(masked.batch_counts.sum()) == int(mask.sum())


def test_channels_first_input_takes_a_mask_without_the_channel_dimension(device):
    torch.manual_seed(1)
    vq = VectorQuantizer(8, 3, dead_code_threshold=0.0).to(device)
    x = torch.randn(2, 3, 4, 5, device=device)
    mask = torch.rand(2, 4, 5, generator=torch.Generator().manual_seed(2)).to(device) > 0.3
    z_q, loss, indices = vq(x, mask=mask)
    full_q, _, full_indices = vq.eval()(x)
    keep = mask.unsqueeze(1).expand_as(x)
    assert torch.equal(indices, torch.where(mask, full_indices, -1))
    assert torch.equal(z_q, torch.where(keep, full_q, x))


# (The search still scores the padding: the interpreter warns about its overflows.)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("options", [dict(), dict(metric="cosine"), dict(ema=True)], ids=["l2", "cosine", "ema"])
@pytest.mark.usefixtures("deterministic_on_cuda")  # (codebook gradients and EMA sums, compared bit for bit)
def test_whatever_the_padding_holds_stays_out_of_loss_and_gradients(device, options):
    torch.manual_seed(2)
    z, mask = _sequences(device)
    fresh = VectorQuantizer(16, 4, dead_code_threshold=0.5, **options).to(device)
    losses, grads = [], []
    for fill in (0.0, 1e30, float("nan"), float("inf")):
        vq = copy.deepcopy(fresh)
        torch.manual_seed(3)  # the same restart draws
        padded = torch.where(mask.unsqueeze(-1), z, fill)
        _, loss, _, grad_z, grad_c, weights = _step(vq, padded, mask)
        assert torch.isfinite(loss) and (grad_c is None or bool(torch.isfinite(grad_c).all()))
        assert torch.equal(grad_z[~mask], weights[~mask]) and bool(torch.isfinite(grad_z).all())
        losses.append(loss)
        grads.append((grad_z[mask], grad_c if grad_c is not None else vq.embeddings.weight.detach().clone()))
        # No code was re-seeded from the padding.
        assert bool(torch.isfinite(vq.embeddings.weight).all())
        assert not bool((vq.embeddings.weight.abs() >= 1e29).any())
    for loss, (gz, gc) in zip(losses[1:], grads[1:]):
        assert torch.equal(loss, losses[0]) and torch.equal(gz, grads[0][0]) and torch.equal(gc, grads[0][1])


def test_restarts_seed_dead_codes_from_kept_rows_only(device):
    torch.manual_seed(3)
    vq = VectorQuantizer(64, 4).to(device)  # restarts re-seed never-used codes after the first step
    z, mask = _sequences(device, batch=3, length=40)
    sentinel = 1000.0
    padded = torch.where(mask.unsqueeze(-1), z, sentinel)
    before = vq.embeddings.weight.detach().clone()
    indices = _step(vq, padded, mask)[2]
    weight = vq.embeddings.weight.detach()
    reseeded = (weight != before).any(dim=1)
    # Every code the kept rows did not pick is dead after the first step, and each kept row seeds one
    # (padding drawn first would leave some unseeded).
    unused = 64 - torch.unique(indices[mask]).numel()
    assert int(reseeded.sum()) == min(unused, int(mask.sum())) > 10
    assert not bool((weight == sentinel).any())
    # Each re-seeded code is one of the kept rows, each row seeding one code at most.
    kept = z[mask]
    matches = (weight[reseeded][:, None, :] == kept[None, :, :]).all(dim=-1)
    assert bool((matches.sum(dim=1) == 1).all()) and bool((matches.sum(dim=0) <= 1).all())


def test_fewer_kept_rows_than_dead_codes_leave_the_rest_for_later(device):
    torch.manual_seed(4)
    vq = VectorQuantizer(32, 4).to(device)
    z, mask = _sequences(device, batch=3, length=7)  # 12 kept rows of 21
    before = vq.embeddings.weight.detach().clone()
    _step(vq, torch.where(mask.unsqueeze(-1), z, 7.0), mask)
    reseeded = (vq.embeddings.weight.detach() != before).any(dim=1)
    assert 0 < int(reseeded.sum()) <= int(mask.sum())
    assert not bool((vq.embeddings.weight == 7.0).any())


@pytest.mark.parametrize("options", [dict(), dict(ema=True)], ids=["codebook-loss", "ema"])
def test_all_rows_left_out(device, options):
    """A batch without kept rows is no step of the statistics: after a real step, everything stays."""
    torch.manual_seed(5)
    vq = VectorQuantizer(8, 4, **options).to(device)
    z, _ = _sequences(device)
    _step(vq, z)
    vq.embeddings.weight.grad = None
    before = {name: value.clone() for name, value in vq.state_dict().items()}
    mask = torch.zeros(z.shape[:-1], dtype=torch.bool, device=device)
    z_q, loss, indices, grad_z, grad_c, weights = _step(vq, z, mask)
    assert torch.equal(z_q, z) and bool((indices == -1).all())
    assert float(loss) == 0.0 and (grad_c is None or bool((grad_c == 0).all())) and torch.equal(grad_z, weights)
    assert int(vq.batch_counts.sum()) == 0
    for name, value in vq.state_dict().items():
        if name != "batch_counts":
            assert torch.equal(value, before[name]), name


def test_kmeans_pools_kept_rows_only(device):
    torch.manual_seed(6)
    vq = VectorQuantizer(4, 2, init="kmeans", kmeans_iters=3).to(device)
    z, mask = _sequences(device, channels=2, length=12)
    padded = torch.where(mask.unsqueeze(-1), z, -500.0)
    vq(padded, mask=mask)
    assert bool(vq.initialized)
    codes = vq.embeddings.weight.detach()
    assert not bool((codes.abs() > 100).any())
    kept = z[mask]
    assert bool((codes.min(0).values >= kept.min(0).values - 1e-6).all())
    assert bool((codes.max(0).values <= kept.max(0).values + 1e-6).all())


def test_bad_masks_are_refused():
    vq = VectorQuantizer(8, 4)
    z = torch.randn(2, 5, 4)
    with pytest.raises(TypeError, match="bool"):
        vq(z, mask=torch.ones(2, 5))
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        vq(z, mask=[[True] * 5] * 2)
    with pytest.raises(ValueError, match=r"shape of z without its channel dimension \(2, 5\)"):
        vq(z, mask=torch.ones(2, 5, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="shape"):
        VectorQuantizer(8, 3)(torch.randn(2, 3, 4, 4), mask=torch.ones(2, 3, 4, dtype=torch.bool))


def test_residual_stages_share_the_mask(device):
    torch.manual_seed(7)
    rvq = ResidualVectorQuantizer(3, 16, 4, dead_code_threshold=0.0).to(device)
    alone = copy.deepcopy(rvq)
    z, mask = _sequences(device)
    z_q, loss, indices = rvq(z, mask=mask)
    z_q1, loss1, indices1 = alone(z[mask])
    assert indices.shape == (*mask.shape, 3)
    assert torch.equal(indices[mask], indices1) and bool((indices[~mask] == -1).all())
    assert torch.equal(z_q[mask], z_q1) and torch.equal(z_q[~mask], z[~mask])
    torch.testing.assert_close(loss, loss1, rtol=1e-6, atol=1e-7)
    for a, b in zip(rvq.quantizers, alone.quantizers):
        assert torch.equal(a.batch_counts, b.batch_counts)


def test_masked_step_compiles_without_graph_breaks(device):
    torch.manual_seed(8)
    vq = VectorQuantizer(16, 4, dead_code_threshold=0.5).to(device)
    z, mask = _sequences(device)
    assert_compiled_steps_match(vq, z, mask)


def test_half_precision_rows_keep_their_dtype(device):
    torch.manual_seed(9)
    masked = VectorQuantizer(16, 4, dead_code_threshold=0.0).to(device)
    alone = copy.deepcopy(masked)
    z, mask = _sequences(device)
    z = z.half()
    z_q, loss, indices, grad_z, grad_c, _ = _step(masked, z, mask)
    z_q1, loss1, indices1, grad_z1, grad_c1, _ = _step(alone, z[mask])
    assert z_q.dtype == grad_z.dtype == torch.float16 and loss.dtype == torch.float32
    assert torch.equal(indices[mask], indices1) and torch.equal(z_q[mask], z_q1)
    torch.testing.assert_close(loss, loss1, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_z[mask], grad_z1)
    torch.testing.assert_close(grad_c, grad_c1, rtol=1e-5, atol=1e-7)


def test_diversity_terms_see_the_kept_rows_only(device):
    torch.manual_seed(10)
    masked = VectorQuantizer(16, 4, dead_code_threshold=0.0, sample_entropy_weight=0.3,
                             batch_entropy_weight=0.2).to(device)
    alone = copy.deepcopy(masked)
    z, mask = _sequences(device)
    _, loss, _, grad_z, grad_c, _ = _step(masked, torch.where(mask.unsqueeze(-1), z, 50.0), mask)
    _, loss1, _, grad_z1, grad_c1, _ = _step(alone, z[mask])
    torch.testing.assert_close(loss, loss1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_z[mask], grad_z1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_c, grad_c1, rtol=1e-5, atol=1e-6)


def test_a_batch_without_kept_rows_is_not_pooled_for_kmeans(device):
    torch.manual_seed(11)
    vq = VectorQuantizer(4, 2, init="kmeans", kmeans_iters=2).to(device)
    z = torch.randn(6, 2, device=device)
    vq(z, mask=torch.zeros(6, dtype=torch.bool, device=device))
    assert not bool(vq.initialized) and vq.kmeans_pool.shape[0] == 0
    vq(z, mask=torch.arange(6, device=device) < 5)
    assert bool(vq.initialized)


def test_left_out_indices_decode_to_zeros(device):
    torch.manual_seed(12)
    vq = VectorQuantizer(8, 3).to(device)
    x = torch.randn(2, 3, 4, 4, device=device)
    mask = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(0)).to(device) > 0.5
    z_q, _, indices = vq.eval()(x, mask=mask)
    codes = vq.codes_from_indices(indices)
    keep = mask.unsqueeze(1).expand_as(x)
    assert torch.equal(codes[keep], z_q[keep]) and bool((codes[~keep] == 0).all())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_residual_padding_passes_through_whatever_it_holds(device):
    torch.manual_seed(13)
    rvq = ResidualVectorQuantizer(2, 8, 4).to(device)
    z, mask = _sequences(device)
    for fill in (float("inf"), float("-inf"), float("nan"), 1e30):
        padded = torch.where(mask.unsqueeze(-1), z, fill).requires_grad_(True)
        z_q, loss, _ = rvq(padded, mask=mask)
        assert torch.equal(z_q[~mask], padded[~mask]) or fill != fill
        assert bool(z_q[~mask].isnan().all()) == (fill != fill) and torch.isfinite(loss)
        assert bool(torch.isfinite(z_q[mask]).all())


def test_masked_steps_run_the_fused_kernels_on_the_triton_backend(monkeypatch):
    """On the kernels (here interpreted) an l2 masked step goes through the fused step, not the PyTorch
    path; the results are those of the PyTorch path."""
    if not triton_usable():
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    device = torch.device("cpu" if interp else "cuda")
    monkeypatch.setenv("VQFAST_BACKEND", "triton")
    torch.manual_seed(14)
    fused = VectorQuantizer(16, 4, dead_code_threshold=0.0).to(device)
    plain = copy.deepcopy(fused)
    z, mask = _sequences(device)
    padded = torch.where(mask.unsqueeze(-1), z, float("nan"))
    monkeypatch.setenv("VQFAST_BACKEND", "torch")  # the PyTorch path
    z_q1, loss1, indices1, grad_z1, grad_c1, _ = _step(plain, padded, mask)
    monkeypatch.setenv("VQFAST_BACKEND", "triton")
    monkeypatch.setattr(VectorQuantizer, "_masked_quantize", lambda *a, **k: pytest.fail("not fused"))
    z_q, loss, indices, grad_z, grad_c, _ = _step(fused, padded, mask)
    assert torch.equal(indices, indices1) and torch.equal(z_q[mask], z_q1[mask])
    assert bool(z_q[~mask].isnan().all())
    torch.testing.assert_close(loss, loss1, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_z, grad_z1, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_c, grad_c1, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_functional_quantize_takes_a_mask(device, metric, dtype):
    g = torch.Generator().manual_seed(15)
    z, mask = _sequences(device)
    z = torch.where(mask.unsqueeze(-1), z, float("nan")).to(dtype)
    codebook = torch.randn(16, 4, generator=g).to(device).requires_grad_(True)
    x = z.clone().requires_grad_(True)
    z_q, loss, indices = quantize(x, codebook, beta=0.3, metric=metric, mask=mask)
    upstream = torch.linspace(-1.0, 1.0, 4, device=device).expand_as(z_q)
    ((z_q * upstream).sum() + loss).backward()

    kept = z[mask].clone().requires_grad_(True)
    codebook1 = codebook.detach().clone().requires_grad_(True)
    z_q1, loss1, indices1 = quantize(kept, codebook1, beta=0.3, metric=metric)
    ((z_q1 * upstream[mask]).sum() + loss1).backward()

    assert torch.equal(indices[mask], indices1) and bool((indices[~mask] == -1).all())
    assert z_q.dtype == dtype and torch.equal(z_q[mask], z_q1) and bool(z_q[~mask].isnan().all())
    torch.testing.assert_close(loss, loss1, rtol=1e-6, atol=1e-7)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(x.grad[mask], kept.grad, **tol)
    assert torch.equal(x.grad[~mask], upstream[~mask].to(dtype))
    torch.testing.assert_close(codebook.grad, codebook1.grad, **tol)
    # The indices a masked step returned (-1 on padding) can be passed back with the mask.
    again = quantize(z, codebook.detach(), beta=0.3, metric=metric, indices=indices, mask=mask)
    assert torch.equal(again[2], indices) and torch.equal(again[1], loss.detach())


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_a_nan_code_only_padding_points_at_stays_out_of_the_loss(device, metric):
    g = torch.Generator().manual_seed(4)
    z = torch.randn(4, 8, generator=g).to(device)
    codebook = torch.randn(5, 8, generator=g).to(device)
    codebook[0, 3] = float("nan")  # a broken code, used by no kept row
    indices = torch.tensor([2, 0, 0, 0], device=device)
    for mask in (torch.tensor([True, False, False, False]), torch.zeros(4, dtype=torch.bool)):
        c = codebook.clone().requires_grad_(True)
        x = z.clone().requires_grad_(True)
        z_q, loss, _ = quantize(x, c, metric=metric, mask=mask.to(device), indices=indices)
        (z_q.sum() + loss).backward()
        assert bool(torch.isfinite(loss)) and bool(torch.isfinite(x.grad).all())
        assert bool(torch.isfinite(c.grad[1:]).all()) and bool((c.grad[3:] == 0).all())
        if metric == "l2":  # (the cosine metric normalises every code: a NaN one gets a NaN gradient)
            assert bool((c.grad[0] == 0).all())
        if not bool(mask.any()):
            assert float(loss) == 0.0


def test_the_loss_of_no_rows_is_zero_whatever_the_codebook_holds(device):
    codebook = torch.randn(5, 8, device=device)
    codebook[1] = float("inf")
    _, loss, _ = quantize(torch.zeros(0, 8, device=device), codebook.requires_grad_(True))
    assert float(loss) == 0.0


def test_functional_quantize_refuses_bad_masks():
    z = torch.randn(2, 5, 4)
    with pytest.raises(TypeError, match="bool"):
        quantize(z, torch.randn(8, 4), mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"shape of z without its channel dimension \(2, 5\)"):
        quantize(z, torch.randn(8, 4), mask=torch.ones(10, dtype=torch.bool))


def test_masked_quantize_of_16_bit_inputs_keeps_an_fp32_loss(device):
    g = torch.Generator().manual_seed(16)
    z = (torch.randn(4096, 64, generator=g) * 8).half().to(device)
    codebook = torch.randn(16, 64, generator=g).half().to(device)
    plain = quantize(z, codebook)
    masked = quantize(z, codebook, mask=torch.ones(4096, dtype=torch.bool, device=device))
    assert masked[1].dtype == plain[1].dtype == torch.float32 and bool(torch.isfinite(masked[1]))
    torch.testing.assert_close(masked[1], plain[1], rtol=1e-5, atol=0.0)
    assert torch.equal(masked[0], plain[0]) and torch.equal(masked[2], plain[2])


def test_only_minus_one_decodes_to_zeros_when_compiled(monkeypatch):
    monkeypatch.setenv("VQFAST_BACKEND", "torch")
    vq = VectorQuantizer(8, 3)
    decode = torch.compile(lambda i: vq.codes_from_indices(i), fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    assert bool((decode(torch.tensor([-1, 2]))[0] == 0).all())
    with pytest.raises(Exception, match=r"\[0, 8\)"):
        decode(torch.tensor([-5, 1]))
