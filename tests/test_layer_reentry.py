"""The layer called more than once per backward, recomputed by activation checkpointing, or first fed a
batch k-means cannot use; and the residual layer's modes and random draws."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from vqfast import ResidualVectorQuantizer, VectorQuantizer


@pytest.mark.parametrize("options", [{}, dict(metric="cosine"), dict(sample_entropy_weight=0.1)])
def test_two_forwards_before_backward_while_kmeans_pools(device, options):
    """The second forward completes k-means and rewrites the codebook; the first forward's backward
    still uses the codes it searched."""
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 4, init="kmeans", kmeans_batches=2, dead_code_threshold=0.0, **options).to(device)
    before = vq.embeddings.weight.detach().clone()
    z1 = torch.randn(16, 4, device=device, requires_grad=True)
    z2 = torch.randn(16, 4, device=device) * 2
    _, loss1, indices1 = vq(z1)
    _, loss2, _ = vq(z2)
    assert bool(vq.initialized) and not torch.equal(vq.embeddings.weight, before)
    (loss1 + loss2).backward()
    # The first loss's gradient, from the codes as they were then: the same as a layer that stops there.
    twin = VectorQuantizer(8, 4, init="kmeans", kmeans_batches=2, dead_code_threshold=0.0, **options).to(device)
    twin.embeddings.weight.data.copy_(before)
    z1_twin = z1.detach().clone().requires_grad_(True)
    _, loss1_twin, indices1_twin = twin(z1_twin)
    loss1_twin.backward()
    assert torch.equal(indices1, indices1_twin)
    torch.testing.assert_close(z1.grad, z1_twin.grad)


@pytest.mark.parametrize("options", [dict(init="kmeans"), dict(init="kmeans", metric="cosine"), dict(ema=True), {}])
def test_a_step_that_keeps_the_codes_then_one_that_rewrites_them_before_one_backward(device, options):
    """A forward after which no codes are rewritten (the one running k-means, or an eval-mode one) used
    to save the parameter itself for its backward; a second forward that then runs k-means, restarts
    codes or averages them wrote it in place before that backward ("modified by an inplace
    operation"). Each step's gradient is the one it gets alone."""
    torch.manual_seed(3)
    z1, z2 = torch.randn(40, 8, device=device), torch.randn(40, 8, device=device) * 3
    for first_mode in ("train", "eval"):
        vq = VectorQuantizer(16, 8, **options).to(device)
        start = {name: value.clone() for name, value in vq.state_dict().items()}
        x1, x2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        vq.train(first_mode == "train")
        torch.manual_seed(4)  # (k-means seeds from random rows)
        _, loss1, _ = vq(x1)
        version = vq.embeddings.weight._version
        vq.train()
        _, loss2, _ = vq(x2)
        # (What the backward checks: whether the tensor was written in place since it was saved.)
        assert vq.embeddings.weight._version > version, "the second step did not write the codebook"
        (loss1 + loss2).backward()
        twin = VectorQuantizer(16, 8, **options).to(device)
        twin.load_state_dict(start)
        twin.train(first_mode == "train")
        x1_twin = z1.clone().requires_grad_()
        torch.manual_seed(4)
        twin(x1_twin)[1].backward()
        torch.testing.assert_close(x1.grad, x1_twin.grad)


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_recomputed_training_forward_raises(device, reentrant):
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 4, ema=True).to(device)
    z = torch.randn(16, 4, device=device, requires_grad=True)
    z_q, loss, _ = checkpoint(vq, z * 1.0, use_reentrant=reentrant)
    steps = int(vq.usage_steps)
    with pytest.raises(RuntimeError, match="activation checkpointing"):
        (z_q.sum() + loss).backward()
    assert int(vq.usage_steps) == steps  # the recompute updated nothing


def test_an_eval_forward_may_be_recomputed(device):
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 4).to(device).eval()
    z = torch.randn(16, 4, device=device, requires_grad=True)
    z_q, loss, _ = checkpoint(vq, z * 1.5, use_reentrant=False)
    (z_q.square().sum() + loss).backward()
    grad_z, grad_c = z.grad.clone(), vq.embeddings.weight.grad.clone()
    z.grad = None
    vq.embeddings.weight.grad = None
    z_q, loss, _ = vq(z * 1.5)
    (z_q.square().sum() + loss).backward()
    torch.testing.assert_close(grad_z, z.grad)
    torch.testing.assert_close(grad_c, vq.embeddings.weight.grad)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
@pytest.mark.parametrize("seed", range(4))
def test_kmeans_waits_for_a_batch_with_finite_rows(device, bad, seed):
    torch.manual_seed(seed)
    vq = VectorQuantizer(8, 4, init="kmeans", dead_code_threshold=0.0).to(device)
    before = vq.embeddings.weight.detach().clone()
    vq(torch.full((16, 4), bad, device=device))
    assert not bool(vq.initialized) and torch.equal(vq.embeddings.weight, before)
    z = torch.randn(32, 4, device=device) + 5.0
    z[:3] = bad
    vq(z)
    assert bool(vq.initialized) and torch.isfinite(vq.embeddings.weight).all()
    # Every code was fitted to the finite rows, all far from the initial codes around 0: the seeds are
    # drawn from the finite rows (no restart helps here: dead_code_threshold=0).
    assert bool((vq.embeddings.weight.mean(1) > 2.0).all())


def test_residual_encode_keeps_each_stages_mode():
    rvq = ResidualVectorQuantizer(3, 8, 4)
    rvq.quantizers[1].eval()
    rvq.encode(torch.randn(5, 4))
    assert [q.training for q in rvq.quantizers] == [True, False, True] and rvq.training
    rvq.eval()
    rvq.quantizers[0].train()
    rvq.encode(torch.randn(5, 4))
    assert [q.training for q in rvq.quantizers] == [True, False, False] and not rvq.training


def test_quantizer_dropout_draws_on_the_cpu_whatever_the_default_device():
    rvq = ResidualVectorQuantizer(3, 8, 4, quantizer_dropout=1.0)
    twin = ResidualVectorQuantizer(3, 8, 4, quantizer_dropout=1.0)
    twin.load_state_dict(rvq.state_dict())
    z = torch.randn(5, 4)
    expected = rvq(z)[2]
    # The meta device stands in for CUDA: a generator on the CPU cannot draw on another device.
    with torch.device("meta"):
        stages = twin._stages_for(None)[0]
    assert bool((expected[:, stages:] == -1).all()) and bool((expected[:, :stages] >= 0).all())
