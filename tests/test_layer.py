"""VectorQuantizer: parity with the article's (fixed) layer, layouts, errors, EMA, k-means, restarts,
cosine metric, diversity term, usage statistics, mixed precision and state dicts."""

from __future__ import annotations

import math
import os
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import triton_usable
from vqfast import ResidualVectorQuantizer, VectorQuantizer, reference
from vqfast.functional import quantize


def _device_for(backend: str) -> torch.device:
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return torch.device("cuda" if backend == "triton" and not interp else "cpu")


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch) -> str:
    if request.param == "triton" and not triton_usable():
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    monkeypatch.setenv("VQFAST_BACKEND", request.param)
    return request.param


@pytest.fixture
def device(backend) -> torch.device:
    return _device_for(backend)


class ArticleVQ(nn.Module):
    """The article's VQ layer with its defects fixed: squared distances, both losses from the gathered
    codes q before the straight-through step, and z_q = z + (q - z).detach()."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embeddings = nn.Embedding(num_embeddings, embedding_dim)
        nn.init.xavier_normal_(self.embeddings.weight)

    def forward(self, z):
        B, C, H, W = z.shape
        z_flattened = z.permute(0, 2, 3, 1).reshape(-1, C)
        distances = (z_flattened.unsqueeze(1) - self.embeddings.weight.unsqueeze(0)).pow(2).sum(-1)
        encoding_indices = distances.argmin(1)
        q = self.embeddings(encoding_indices).view(B, H, W, C).permute(0, 3, 1, 2)
        commitment_loss = F.mse_loss(z, q.detach())
        codebook_loss = F.mse_loss(z.detach(), q)
        z_q = z + (q - z).detach()
        return z_q, commitment_loss + codebook_loss, encoding_indices.view(B, H, W)


def _rows_of(z: torch.Tensor, cdim: int) -> torch.Tensor:
    return z.movedim(cdim, -1).reshape(-1, z.shape[cdim])


# -- parity with the article ----------------------------------------------------------------------

@pytest.mark.parametrize("train", [True, False])
def test_matches_fixed_article_layer(backend, device, train):
    torch.manual_seed(0)
    K, D = 40, 12
    article = ArticleVQ(K, D).to(device)
    vq = VectorQuantizer(K, D, beta=1.0).to(device)
    vq.load_state_dict(article.state_dict())  # strict: the codebook moves by name
    assert torch.equal(vq.embeddings.weight, article.embeddings.weight)
    article.train(train)
    vq.train(train)
    z = (torch.randn(3, D, 4, 5, device=device) * 0.05).requires_grad_()
    r = torch.randn(3, D, 4, 5, device=device)

    zq_a, loss_a, idx_a = article(z)
    (zq_a * r).sum().add(loss_a).backward()
    gz_a, gc_a = z.grad.clone(), article.embeddings.weight.grad.clone()
    z.grad = None

    zq_b, loss_b, idx_b = vq(z)
    (zq_b * r).sum().add(loss_b).backward()
    gz_b, gc_b = z.grad.clone(), vq.embeddings.weight.grad.clone()

    assert idx_b.dtype == torch.int64 and idx_b.shape == (3, 4, 5)
    assert torch.equal(idx_a, idx_b)
    assert zq_b.shape == z.shape
    torch.testing.assert_close(zq_b, zq_a)
    torch.testing.assert_close(loss_b, loss_a)
    torch.testing.assert_close(gz_b, gz_a)
    torch.testing.assert_close(gc_b, gc_a)
    # The output has the value of the codes (the article's defect was z_q == z).
    assert not torch.allclose(zq_b, z)


def test_default_loss_weights_codebook_and_commitment(backend, device):
    torch.manual_seed(1)
    vq = VectorQuantizer(16, 8).to(device)  # beta 0.25
    codes = vq.embeddings.weight.detach().clone()
    z = torch.randn(2, 10, 8, device=device)
    z_q, loss, idx = vq(z)
    q = codes[idx]
    torch.testing.assert_close(loss, 1.25 * F.mse_loss(q, z))


# -- layouts and errors ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape,channel_dim,cdim", [
    ((2, 6, 3, 5), None, 1),      # (B, C, H, W)
    ((2, 7, 6), None, 2),         # (B, N, C)
    ((9, 6), None, 1),            # (N, C)
    ((2, 6, 11), 1, 1),           # (B, C, T) with channel_dim
    ((2, 3, 6, 4), -2, 2),
])
def test_layouts(backend, device, shape, channel_dim, cdim):
    torch.manual_seed(2)
    vq = VectorQuantizer(13, 6, channel_dim=channel_dim).to(device).eval()
    z = torch.randn(*shape, device=device)
    z_q, loss, idx = vq(z)
    rows = _rows_of(z, cdim)
    ref_zq, ref_loss, ref_idx = reference.quantize(rows, vq.embeddings.weight.detach())
    assert z_q.shape == z.shape
    assert idx.shape == tuple(s for i, s in enumerate(shape) if i != cdim)
    assert torch.equal(idx.reshape(-1), ref_idx)
    torch.testing.assert_close(_rows_of(z_q, cdim), ref_zq)
    torch.testing.assert_close(loss, ref_loss)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("shape,channel_dim", [
    ((2, 6, 3, 5), None), ((2, 7, 6), None), ((9, 6), None), ((2, 6, 11), 1), ((2, 3, 6, 4), -2),
])
def test_codes_from_indices_give_forwards_output(backend, device, shape, channel_dim, metric):
    torch.manual_seed(3)
    vq = VectorQuantizer(13, 6, channel_dim=channel_dim, metric=metric).to(device).eval()
    z = torch.randn(*shape, device=device)
    z_q, _, idx = vq(z)
    codes = vq.codes_from_indices(idx)
    assert codes.shape == z.shape and codes.is_contiguous()
    assert torch.equal(codes, z_q)
    # Differentiable with respect to the codebook: each use of a code adds its output gradient.
    codes = vq.codes_from_indices(idx.reshape(-1)[:5].reshape(5), check_indices=False)
    if metric == "l2":
        codes.sum().backward()
        expected = torch.bincount(idx.reshape(-1)[:5].cpu(), minlength=13).float()[:, None].expand(13, 6)
        torch.testing.assert_close(vq.embeddings.weight.grad.cpu(), expected)


def test_codes_from_indices_reject_bad_indices():
    vq = VectorQuantizer(8, 4)
    with pytest.raises(ValueError, match=r"must lie in \[0, 8\)"):
        vq.codes_from_indices(torch.tensor([[0, 8]]))
    with pytest.raises(ValueError, match=r"must be -1 \(a row a mask left out\) or lie in \[0, 8\), got -2"):
        vq.codes_from_indices(torch.tensor([-1, -2]))
    with pytest.raises(TypeError, match="indices"):
        vq.codes_from_indices(torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="indices"):
        vq.codes_from_indices([0, 1])
    with pytest.raises(ValueError, match="0-dimensional"):
        vq.codes_from_indices(torch.tensor(3))
    with pytest.raises(ValueError, match="out of range"):
        VectorQuantizer(8, 4, channel_dim=3).codes_from_indices(torch.tensor([1, 2]))


def test_bad_inputs():
    vq = VectorQuantizer(8, 4)
    with pytest.raises(ValueError, match="channels at dim 1, expected embedding_dim=4"):
        vq(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="expected embedding_dim=4"):
        vq(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="batch and a channel"):
        vq(torch.randn(4))
    with pytest.raises(TypeError, match="floating-point"):
        vq(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="out of range"):
        VectorQuantizer(8, 4, channel_dim=3)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="metric"):
        VectorQuantizer(8, 4, metric="dot")
    with pytest.raises(ValueError, match="init"):
        VectorQuantizer(8, 4, init="orthogonal")
    with pytest.raises(ValueError, match="precision"):
        VectorQuantizer(8, 4, precision="fp8")
    with pytest.raises(ValueError, match="decay"):
        VectorQuantizer(8, 4, ema=True, decay=1.0)
    with pytest.raises(ValueError):
        VectorQuantizer(0, 4)


def test_empty_batch():
    vq = VectorQuantizer(8, 4)
    z_q, loss, idx = vq(torch.randn(0, 4, 3, 3))
    assert z_q.shape == (0, 4, 3, 3) and idx.shape == (0, 3, 3) and float(loss.detach()) == 0.0


# -- EMA codebook ---------------------------------------------------------------------------------

class PlainEMA:
    """The VQ-VAE paper's EMA update in plain PyTorch, with one-hot assignments (test oracle).
    Counts start at 1 and sums at the initial codes (so sums / counts is the codebook)."""

    def __init__(self, weight: torch.Tensor, decay: float, eps: float, beta: float) -> None:
        self.weight = weight.detach().double().clone()
        self.count = torch.ones(weight.shape[0], dtype=torch.float64)
        self.sum = self.weight.clone()
        self.decay, self.eps, self.beta = decay, eps, beta

    def step(self, rows: torch.Tensor):
        """Returns (indices, loss, codes used) and updates the codebook."""
        rows = rows.detach().double()
        idx = torch.cdist(rows, self.weight).argmin(1)
        q = self.weight[idx]
        loss = self.beta * ((rows - q) ** 2).mean()
        onehot = F.one_hot(idx, self.weight.shape[0]).double()
        self.count = self.decay * self.count + (1 - self.decay) * onehot.sum(0)
        self.sum = self.decay * self.sum + (1 - self.decay) * onehot.t() @ rows
        n = self.count.sum()
        smoothed = (self.count + self.eps) / (n + self.weight.shape[0] * self.eps) * n
        self.weight = self.sum / smoothed[:, None]
        return idx, loss, q


def test_ema_matches_plain_pytorch(backend, device, monkeypatch):
    if backend == "triton":
        # On the Triton backend the statistics come from the bincount (of the rows with a finite
        # distance) and scatter-add kernels, the averages from the EMA kernel (20 codes: two programs
        # under the interpreter).
        from vqfast import kernels

        calls = {"finite_row_counts": 0, "scatter_add_rows": 0, "ema_update": 0}
        for name in calls:
            def counted(*args, _name=name, _real=getattr(kernels, name), **kwargs):
                calls[_name] += 1
                return _real(*args, **kwargs)
            monkeypatch.setattr(kernels, name, counted)
    torch.manual_seed(3)
    K, D, beta = 20, 5, 0.3
    vq = VectorQuantizer(K, D, beta=beta, ema=True, decay=0.9, eps=1e-3, dead_code_threshold=0.0).to(device)
    assert not vq.embeddings.weight.requires_grad
    initial = vq.embeddings.weight.detach().cpu().clone()
    oracle = PlainEMA(initial, 0.9, 1e-3, beta)
    centres = torch.randn(K, D) * 0.3
    for step in range(4):
        rows = centres[torch.randint(K, (40,))] + 0.3 * torch.randn(40, D)
        z = rows.reshape(4, 10, D).to(device).requires_grad_()
        z_q, loss, idx = vq(z)
        ref_idx, ref_loss, ref_q = oracle.step(rows)
        assert torch.equal(idx.reshape(-1).cpu(), ref_idx), step
        torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(vq.embeddings.weight.double().cpu(), oracle.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(vq.ema_count.double().cpu(), oracle.count, rtol=1e-6, atol=1e-7)
        # Only the commitment term reaches z; the codebook gets no gradient.
        loss.backward()
        expected = 2 * beta * (rows.double() - ref_q) / rows.numel()
        torch.testing.assert_close(z.grad.double().cpu().reshape(-1, D), expected, rtol=1e-4, atol=1e-7)
        assert vq.embeddings.weight.grad is None
        # The straight-through output still has the value of the codes this step used.
        torch.testing.assert_close(z_q.double().cpu().reshape(-1, D), ref_q, rtol=1e-5, atol=1e-6)
    assert (vq.embeddings.weight.cpu() - initial).abs().max() > 1e-2
    if backend == "triton":
        assert calls == {"finite_row_counts": 4, "scatter_add_rows": 4, "ema_update": 4}


def test_ema_follows_codes_set_from_outside(backend, device):
    """A model may re-initialise or load the codes after construction; the averages start from them."""
    torch.manual_seed(31)
    vq = VectorQuantizer(10, 4, ema=True, decay=0.8, dead_code_threshold=0.0).to(device)
    with torch.no_grad():
        nn.init.xavier_normal_(vq.embeddings.weight)  # what ConvVQVAE(codebook_init="xavier_normal") does
        vq.embeddings.weight.mul_(20)
    oracle = PlainEMA(vq.embeddings.weight.cpu(), 0.8, 1e-5, 0.25)
    for _ in range(2):
        rows = torch.randn(30, 4)
        vq(rows.to(device))
        oracle.step(rows)
    torch.testing.assert_close(vq.embeddings.weight.double().cpu(), oracle.weight, rtol=1e-5, atol=1e-6)


def test_ema_eval_does_not_update(backend, device):
    torch.manual_seed(4)
    vq = VectorQuantizer(8, 3, ema=True).to(device).eval()
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    vq(torch.randn(20, 3, device=device))
    for k, v in vq.state_dict().items():
        assert torch.equal(v, before[k]), k


# -- k-means init ---------------------------------------------------------------------------------

def _clustered(n: int, k: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 4 + 2
    return centres[torch.randint(k, (n,), generator=g)] + 0.1 * torch.randn(n, d, generator=g)


def _first_step_error(device, **kwargs) -> float:
    torch.manual_seed(5)
    vq = VectorQuantizer(16, 4, dead_code_threshold=0.0, **kwargs).to(device)
    z = _clustered(192, 16, 4, seed=6).to(device)
    z_q, _, _ = vq(z)
    return F.mse_loss(z_q, z).item()


def test_kmeans_init_lowers_initial_error(backend, device):
    xavier = _first_step_error(device)
    uniform = _first_step_error(device, init="uniform")
    seeds_only = _first_step_error(device, init="kmeans", kmeans_iters=0)
    kmeans = _first_step_error(device, init="kmeans", kmeans_iters=8)
    assert kmeans < 0.2 * min(xavier, uniform)
    assert kmeans < seeds_only  # the Lloyd iterations improve on the random data seeds


def test_kmeans_runs_once_and_survives_state_dict(backend, device):
    torch.manual_seed(7)
    vq = VectorQuantizer(8, 3, init="kmeans", dead_code_threshold=0.0).to(device)
    assert not bool(vq.initialized)
    z = _clustered(64, 8, 3, seed=8).to(device)
    vq(z)
    assert bool(vq.initialized)
    after_init = vq.embeddings.weight.detach().clone()
    vq(z * 10)  # no optimizer step and no second k-means: the codebook stays
    assert torch.equal(vq.embeddings.weight, after_init)

    fresh = VectorQuantizer(8, 3, init="kmeans", dead_code_threshold=0.0).to(device)
    fresh.load_state_dict(vq.state_dict())
    fresh(z * 10)
    assert torch.equal(fresh.embeddings.weight, after_init)

    # Codes loaded from a checkpoint without the flag (the article's layer) are not replaced either.
    article = ArticleVQ(8, 3).to(device)
    other = VectorQuantizer(8, 3, init="kmeans", dead_code_threshold=0.0).to(device)
    other.load_state_dict(article.state_dict())
    other(z)
    assert torch.equal(other.embeddings.weight, article.embeddings.weight)


def _lloyd_step_move(codes: torch.Tensor, rows: torch.Tensor) -> float:
    """How far one Lloyd step on ``rows`` moves the codes that own rows: 0 at a k-means fixed point."""
    codes, rows = codes.detach().double().cpu(), rows.double().cpu()
    assign = torch.cdist(rows, codes).argmin(1)
    return max(float((rows[assign == j].mean(0) - codes[j]).norm()) for j in assign.unique().tolist())


def test_kmeans_pools_the_first_batches(backend, device):
    # Three batches from three separate clusters. Pooled, k-means fits all of them: its codes are a
    # fixed point of Lloyd's step on the pooled rows (whichever rows seeded it: the check does not
    # depend on the random draws, which differ between devices); on the first batch alone, all codes sit
    # in the first cluster.
    torch.manual_seed(10)
    centres = torch.tensor([[6.0, 0.0], [-6.0, 0.0], [0.0, 6.0]])
    batches = [(centres[i] + 0.1 * torch.randn(40, 2)).to(device) for i in range(3)]
    everything = torch.cat(batches)

    def nearest_centre_gaps(vq):
        codes = vq.embeddings.weight.detach().cpu()
        return torch.cdist(centres, codes).min(1).values

    # (15 iterations: at 10, Lloyd's step had converged on 300 of 300 draws; at 6, on 291.)
    pooled = VectorQuantizer(3, 2, init="kmeans", kmeans_batches=3, kmeans_iters=15).to(device)
    xavier = pooled.embeddings.weight.detach().clone()
    for z in batches[:2]:
        pooled(z)
    assert not bool(pooled.initialized)  # still collecting: the codes are the initial ones
    assert torch.equal(pooled.embeddings.weight, xavier)
    pooled(batches[2])
    assert bool(pooled.initialized)
    assert _lloyd_step_move(pooled.embeddings.weight, everything) < 1e-4
    # Statistics start at the k-means step: one step counted, on the new codes.
    assert float(pooled.usage_steps) == 1.0

    single = VectorQuantizer(3, 2, init="kmeans", kmeans_batches=1, dead_code_threshold=0.0).to(device)
    single(batches[0])
    assert (nearest_centre_gaps(single) > 3).sum() == 2
    assert _lloyd_step_move(single.embeddings.weight, everything) > 1
    with pytest.raises(ValueError, match="kmeans_batches"):
        VectorQuantizer(3, 2, init="kmeans", kmeans_batches=0)


@pytest.mark.usefixtures("deterministic_on_cuda")  # (bit-exact sums by atomics on a GPU)
def test_kmeans_pool_travels_in_the_state_dict(backend, device):
    # A checkpoint taken while k-means pools batches: the loaded layer runs the same k-means.
    torch.manual_seed(10)
    centres = torch.tensor([[6.0, 0.0], [-6.0, 0.0], [0.0, 6.0]])
    batches = [(centres[i] + 0.1 * torch.randn(40, 2)).to(device) for i in range(3)]
    pooled = VectorQuantizer(3, 2, init="kmeans", kmeans_batches=3).to(device)
    pooled(batches[0])
    state = {k: v.clone() for k, v in pooled.state_dict().items()}  # (buffers change in place later)
    assert state["kmeans_pool"].shape == (40, 2) and int(state["kmeans_pool_batches"]) == 1
    resumed = VectorQuantizer(3, 2, init="kmeans", kmeans_batches=3).to(device)
    resumed.load_state_dict(state)
    for layer in (pooled, resumed):
        torch.manual_seed(11)  # the same k-means seeds
        for z in batches[1:]:
            layer(z)
        assert bool(layer.initialized)
    assert torch.equal(resumed.embeddings.weight, pooled.embeddings.weight)
    # Consumed by k-means: the keys are gone, those of a trained layer are its parameters and buffers.
    assert resumed.state_dict().keys() == VectorQuantizer(3, 2).state_dict().keys()
    # Any layer that loads the pooling state pools on (its codes are not initialised); a malformed pool
    # is an error.
    uniform = VectorQuantizer(3, 2, init="uniform").to(device)
    uniform.load_state_dict(state)
    assert int(uniform.state_dict()["kmeans_pool_batches"]) == 1
    with pytest.raises(RuntimeError, match="kmeans_pool"):
        resumed.load_state_dict({**state, "kmeans_pool": torch.zeros(5, 3)})
    with pytest.raises(RuntimeError, match="kmeans_pool"):
        resumed.load_state_dict({**state, "kmeans_pool_batches": torch.ones(2)})
    # Codes from elsewhere (no pool in their state) end the pooling; so does a pool beside initialised codes.
    article = ArticleVQ(3, 2).to(device)
    fresh = VectorQuantizer(3, 2, init="kmeans", kmeans_batches=3).to(device)
    fresh(batches[0])
    fresh.load_state_dict(article.state_dict())
    assert "kmeans_pool" not in fresh.state_dict() and fresh._kmeans_pool_batches == 0
    # VQGAN's codes ("embedding.weight") too.
    vqgan = VectorQuantizer(3, 2, init="kmeans", kmeans_batches=3).to(device)
    vqgan(batches[0])
    vqgan.load_state_dict({"embedding.weight": article.embeddings.weight.detach().clone()})
    assert "kmeans_pool" not in vqgan.state_dict() and vqgan._kmeans_pool_batches == 0
    orphan = VectorQuantizer(3, 2, init="kmeans", kmeans_batches=3).to(device)
    orphan.load_state_dict({**state, "initialized": torch.tensor(True)})
    assert "kmeans_pool" not in orphan.state_dict()


def test_kmeans_pool_moves_with_the_layer_and_suits_distributed_checkpoints(torch_backend):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    vq = VectorQuantizer(3, 2, init="kmeans", kmeans_batches=3)
    assert "kmeans_pool" not in get_model_state_dict(vq)  # not pooling yet
    vq(torch.randn(10, 2))
    saved = get_model_state_dict(vq)
    assert saved["kmeans_pool"].shape == (10, 2) and int(saved["kmeans_pool_batches"]) == 1
    # Loaded on the CPU and then moved, as load_run does: the pool follows the codes (meta stands in for
    # a GPU), and keeps its float32 rows when the model is converted.
    moved = VectorQuantizer(3, 2, init="kmeans", kmeans_batches=3)
    moved.load_state_dict(vq.state_dict())
    moved.to("meta").half()
    assert moved.kmeans_pool.device.type == "meta" and moved.kmeans_pool.dtype == torch.float32


def test_kmeans_pool_follows_codes_loaded_off_meta_and_to_empty(torch_backend):
    # A layer built on meta and given a pooling layer's state with assign=True: the pool goes where the
    # loaded codes are (the embedding loads after its parent), and k-means then runs as in the original.
    torch.manual_seed(0)
    pooling = VectorQuantizer(6, 3, init="kmeans", kmeans_batches=2)
    pooling(torch.randn(30, 3))
    state = {name: value.clone() for name, value in pooling.state_dict().items()}
    with torch.device("meta"):
        loaded = VectorQuantizer(6, 3, init="kmeans", kmeans_batches=2)
    # (A copy: assign=True makes the layer's tensors those of the dict, which its steps then update.)
    loaded.load_state_dict({name: value.clone() for name, value in state.items()}, assign=True)
    assert loaded.kmeans_pool.device.type == "cpu"
    z = torch.randn(30, 3)
    for layer in (pooling, loaded):
        torch.manual_seed(1)
        layer(z)
    assert bool(loaded.initialized)
    assert torch.equal(loaded.embeddings.weight, pooling.embeddings.weight)
    # to_empty cannot move a pool's values off meta: the layer pools afresh (no k-means on uninitialised
    # rows), and a state dict loaded after it brings the pool back.
    fresh = VectorQuantizer(6, 3, init="kmeans", kmeans_batches=2)
    fresh.load_state_dict(state)
    emptied = fresh.to("meta").to_empty(device="cpu")
    assert emptied.kmeans_pool.device.type == "cpu" and emptied.kmeans_pool.shape == (0, 3)
    assert emptied._kmeans_pool_batches == 0
    emptied.load_state_dict(state)
    assert torch.equal(emptied.kmeans_pool, state["kmeans_pool"]) and emptied._kmeans_pool_batches == 1


@pytest.mark.parametrize("parametrization", ["weight_norm", "spectral_norm"])
def test_parametrized_codebook_is_never_rewritten_behind_the_parametrization(parametrization, backend, device):
    # A parametrized weight is recomputed on every access: in-place writes into it would be lost, so the
    # layer refuses them, and trains such a codebook by its loss alone.
    parametrize = getattr(torch.nn.utils.parametrizations, parametrization)
    z = torch.randn(40, 4, device=device)
    for options, named in ((dict(ema=True), "ema=True"), (dict(init="kmeans", dead_code_threshold=0), "kmeans"),
                           (dict(), "dead_code_threshold=0.01")):
        layer = VectorQuantizer(8, 4, **options).to(device)
        parametrize(layer.embeddings, "weight")
        with pytest.raises(RuntimeError, match=named + ".*parametrized"):
            layer(z)
    layer = VectorQuantizer(8, 4, dead_code_threshold=0).to(device)
    parametrize(layer.embeddings, "weight")
    with pytest.raises(RuntimeError, match="set_codebook.*parametrized"):
        layer.set_codebook(torch.randn(8, 4, device=device))
    z_q, loss, indices = layer(z)
    loss.backward()
    originals = list(layer.embeddings.parametrizations.weight.parameters())
    assert originals and all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in originals)
    layer.eval()  # (spectral_norm's power iteration stops: the codes stay put)
    z_q, _, indices = layer(z)
    torch.testing.assert_close(z_q, layer.embeddings.weight[indices])


def test_kmeans_codes_keep_their_clusters_but_empty_ones_are_restarted(backend, device):
    # Pooled batches of two exact points: the three seeds repeat one point, so one code owns no cluster.
    # The code that owns A survives the B-only batches after (its k-means credit); the clusterless code
    # is re-seeded from the batch after k-means, so the codebook ends with A once and B twice, whatever
    # the seeds were.
    a, b = torch.tensor([5.0, 0.0], device=device), torch.tensor([-5.0, 0.0], device=device)
    for seed in range(4):
        torch.manual_seed(seed)
        vq = VectorQuantizer(3, 2, init="kmeans", kmeans_batches=2, kmeans_iters=3).to(device)
        vq(a.repeat(40, 1))
        vq(b.repeat(40, 1))
        vq(b.repeat(40, 1))
        w = vq.embeddings.weight.detach()
        assert [int((w == a).all(1).sum()), int((w == b).all(1).sum())] == [1, 2], seed


def test_kmeans_on_fewer_rows_than_codes_leaves_no_duplicate_codes(backend, device):
    """A pool of 16 rows for 64 codes: 16 codes become those rows, and the 48 without a cluster are not
    re-seeded from the same rows on that step (they would copy the centroids, lose every tie to them and
    stay unused) but from the rows of the batches after it, 16 per batch."""
    torch.manual_seed(45)
    vq = VectorQuantizer(64, 4, init="kmeans").to(device)
    batches = [torch.randn(16, 4, device=device) + 4 * i for i in range(4)]
    vq(batches[0])
    w = vq.embeddings.weight.detach()
    assert torch.unique(w, dim=0).shape[0] == 64
    fitted = (w[:, None, :] == batches[0][None]).all(-1).any(1)
    assert int(fitted.sum()) == 16
    for batch in batches[1:]:
        vq(batch)
    w = vq.embeddings.weight.detach()
    assert torch.unique(w, dim=0).shape[0] == 64
    seen = torch.cat(batches)
    assert bool((w[:, None, :] == seen[None]).all(-1).any(1).all())  # every code is now a data row


def test_kmeans_leaves_out_rows_whose_distances_overflow(backend, device):
    """Finite rows with elements of 5e36: their squared norms (and, summed, their clusters) overflow
    fp32. A training step leaves such rows out of its statistics, and so does k-means: the codes come
    from the other rows and stay finite, and training goes on."""
    torch.manual_seed(46)
    vq = VectorQuantizer(4, 2, init="kmeans").to(device)
    z = torch.randn(256, 2, device=device)
    z[:200, 0] = 5e36
    vq(z)
    assert bool(vq.initialized) and torch.isfinite(vq.embeddings.weight).all()
    assert float(vq.embeddings.weight.abs().max()) < 10
    for _ in range(3):
        vq(torch.randn(64, 2, device=device))
    assert int(vq.codebook_usage()["steps"]) == 4


# -- dead-code restarts ---------------------------------------------------------------------------

def _dead_code_setup(device, threshold: float, **kwargs):
    torch.manual_seed(9)
    K, D = 8, 2
    vq = VectorQuantizer(K, D, dead_code_threshold=threshold, usage_decay=0.5, **kwargs).to(device)
    with torch.no_grad():
        vq.embeddings.weight.copy_(torch.cat([torch.randn(4, D) + 5, torch.full((4, D), -100.0)]).to(device))
    return vq


@pytest.mark.parametrize("ema", [False, True])
def test_dead_codes_are_revived(backend, device, ema):
    vq = _dead_code_setup(device, 0.5, ema=ema)
    batches = [torch.randn(32, 2, device=device) + 5 for _ in range(6)]
    z_q, _, _ = vq(batches[0])  # the far codes are never chosen ...
    assert (vq.batch_counts[4:] == 0).all()
    assert (z_q > -50).all()
    # ... so at the end of the step they are re-seeded from rows of this batch, ready for the next one.
    revived = vq.embeddings.weight.detach()[4:]
    for code in revived:
        assert (batches[0] - code).abs().sum(1).min() < 1e-5  # each one is an encoder output
    if ema:
        assert (vq.ema_count[4:] == 1).all()  # their running averages start over
    assert vq.codebook_usage()["codes_used"] <= 4  # reported usage is measured, not the restart credit
    for z in batches[1:]:
        vq(z)
    assert vq.codebook_usage()["codes_used"] > 4
    assert (vq.batch_counts[4:] > 0).any()


def test_restarted_codes_get_a_grace_period(backend, device):
    # Credit 1/K decaying by 0.5 per step against a threshold of 0.2/K: about two steps of grace.
    vq = _dead_code_setup(device, 0.2)
    vq(torch.randn(32, 2, device=device) + 5)
    revived = vq.embeddings.weight.detach()[4:].clone()
    assert (revived > -50).all()
    # Data away from the revived codes: they stay unused, but are not re-seeded on the very next step.
    with torch.no_grad():
        vq.embeddings.weight[:4] = 5.0
    vq(torch.full((8, 2), 5.0, device=device))
    assert torch.equal(vq.embeddings.weight[4:], revived)


def test_dead_codes_stay_dead_without_restarts(backend, device):
    vq = _dead_code_setup(device, 0.0)
    for _ in range(4):
        vq(torch.randn(32, 2, device=device) + 5)
    assert (vq.embeddings.weight[4:] == -100).all()
    assert vq.codebook_usage()["codes_used"] <= 4


def test_no_restarts_in_eval(backend, device):
    vq = _dead_code_setup(device, 0.5)
    vq.eval()
    for _ in range(3):
        vq(torch.randn(32, 2, device=device) + 5)
    assert (vq.embeddings.weight[4:] == -100).all()


def test_restarts_keep_gradients(backend, device):
    """The in-place restart happens after the codes were used: the backward still sees the old codes."""
    vq = _dead_code_setup(device, 0.5)
    z = (torch.randn(16, 2, device=device) + 5).requires_grad_()
    z_q, loss, idx = vq(z)
    old_codes = torch.cat([vq.embeddings.weight.detach()[:4], torch.full((4, 2), -100.0, device=device)])
    loss.backward()
    q = old_codes[idx]
    # d/dc of mse(q, sg(z)) summed into the chosen codes.
    expected = torch.zeros_like(old_codes).index_add_(0, idx, 2 * (q - z.detach()) / z.numel())
    torch.testing.assert_close(vq.embeddings.weight.grad, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_step_has_no_host_sync(monkeypatch):
    monkeypatch.setenv("VQFAST_BACKEND", "triton")
    vq = VectorQuantizer(64, 8, ema=True, init="kmeans").cuda()
    # EMA codes get no gradient, so the encoder output must want one for the loss to have a graph.
    z = torch.randn(4, 8, 6, 6, device="cuda", requires_grad=True)
    vq(z)  # k-means init runs once, outside the hot path
    vq(z)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        z_q, loss, _ = vq(z)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# -- cosine metric --------------------------------------------------------------------------------

def test_cosine_metric(backend, device):
    torch.manual_seed(10)
    vq = VectorQuantizer(20, 6, metric="cosine").to(device)
    z = torch.randn(3, 6, 4, 4, device=device, requires_grad=True)
    codes = vq.embeddings.weight.detach().clone()  # (unused codes are restarted after the step)
    z_q, loss, idx = vq(z)
    rows = _rows_of(z.detach(), 1).double()
    cos = F.normalize(rows, dim=1) @ F.normalize(codes.double(), dim=1).t()
    assert torch.equal(idx.reshape(-1), cos.argmax(1))
    unit_codes = F.normalize(codes, dim=1)[idx.reshape(-1)]
    torch.testing.assert_close(_rows_of(z_q.detach(), 1), unit_codes)
    expected = 1.25 * F.mse_loss(unit_codes.double(), F.normalize(rows, dim=1))
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    loss.backward()
    assert vq.embeddings.weight.grad is not None and vq.embeddings.weight.grad.abs().sum() > 0


def test_cosine_ema_averages_unit_rows(backend, device):
    # Under the cosine metric the statistics work on l2-normalised rows: rows whose norms differ by 100x
    # weigh alike in the EMA averages (the paper's update on unit rows, assignment by cosine).
    torch.manual_seed(21)
    K, D, decay, eps = 12, 4, 0.8, 1e-3
    vq = VectorQuantizer(K, D, metric="cosine", ema=True, decay=decay, eps=eps, dead_code_threshold=0.0).to(device)
    weight = vq.embeddings.weight.detach().cpu().double().clone()
    count = torch.ones(K, dtype=torch.float64)
    for step in range(3):
        rows = torch.randn(60, D) * 10 ** (2 * torch.rand(60, 1) - 1)
        _, _, idx = vq(rows.to(device))
        unit = F.normalize(rows.double(), dim=1)
        expected_idx = (unit @ F.normalize(weight, dim=1).t()).argmax(1)
        assert torch.equal(idx.cpu(), expected_idx), step
        onehot = F.one_hot(expected_idx, K).double()
        n_before = count.sum()
        sums = decay * weight * ((count + eps) / (n_before + K * eps) * n_before)[:, None] + (1 - decay) * onehot.t() @ unit
        count = decay * count + (1 - decay) * onehot.sum(0)
        n = count.sum()
        weight = sums / ((count + eps) / (n + K * eps) * n)[:, None]
        torch.testing.assert_close(vq.embeddings.weight.double().cpu(), weight, rtol=1e-5, atol=1e-6)


def test_cosine_restarts_seed_unit_codes(backend, device):
    torch.manual_seed(22)
    vq = VectorQuantizer(16, 3, metric="cosine", dead_code_threshold=0.5).to(device)
    rows = (torch.randn(40, 3) * 50).to(device)  # far from unit norm
    with torch.no_grad():
        vq.embeddings.weight.copy_(F.normalize(torch.randn(16, 3), dim=1))
    before = vq.embeddings.weight.detach().clone()
    vq(rows)
    restarted = (vq.embeddings.weight.detach() != before).any(1)
    assert restarted.any()
    torch.testing.assert_close(vq.embeddings.weight.detach()[restarted].norm(dim=1),
                               torch.ones(int(restarted.sum()), device=device))


# -- diversity (entropy) term ---------------------------------------------------------------------

def test_entropy_terms_off_by_default(backend, device):
    torch.manual_seed(11)
    vq = VectorQuantizer(10, 4).to(device)
    z = torch.randn(30, 4, device=device)
    _, loss, idx = vq(z)
    torch.testing.assert_close(loss, quantize(z, vq.embeddings.weight.detach(), beta=0.25, indices=idx)[1])


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_entropy_terms_in_loss(backend, device, metric):
    torch.manual_seed(12)
    # fp32 products: the comparison is with a float64 reference (the default tf32 logits differ by ~1e-3).
    kw = dict(metric=metric, dead_code_threshold=0.0, precision="fp32")
    base = VectorQuantizer(10, 4, **kw).to(device)
    reg = VectorQuantizer(10, 4, sample_entropy_weight=0.3, batch_entropy_weight=0.7, entropy_temperature=0.5,
                          **kw).to(device)
    reg.load_state_dict(base.state_dict())
    z = torch.randn(2, 4, 3, 5, device=device)
    zb = z.clone().requires_grad_()
    zr = z.clone().requires_grad_()
    _, loss_b, _ = base(zb)
    _, loss_r, _ = reg(zr)
    rows = _rows_of(z, 1).double()
    h_s, h_b = reference.soft_assignment_entropy(rows, base.embeddings.weight.detach().double(), 0.5, metric)
    torch.testing.assert_close((loss_r - loss_b).double(), (0.3 * h_s - 0.7 * h_b).double(), rtol=1e-4, atol=1e-6)
    loss_b.backward()
    loss_r.backward()
    # The term is differentiable: it changes the gradients of both the encoder output and the codebook.
    assert (zr.grad - zb.grad).abs().max() > 1e-6
    assert (reg.embeddings.weight.grad - base.embeddings.weight.grad).abs().max() > 1e-6


def test_entropy_gradients_match_across_backends(monkeypatch):
    if not triton_usable():
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    torch.manual_seed(13)
    results = {}
    z0 = torch.randn(2, 5, 3, 3)
    vq0 = VectorQuantizer(9, 5, sample_entropy_weight=0.5, batch_entropy_weight=1.0, entropy_temperature=2.0)
    for backend in ("torch", "triton"):
        monkeypatch.setenv("VQFAST_BACKEND", backend)
        dev = _device_for(backend)
        # fp32 products on both sides (on a GPU the default would put the Triton side on tf32).
        vq = VectorQuantizer(9, 5, sample_entropy_weight=0.5, batch_entropy_weight=1.0,
                             entropy_temperature=2.0, precision="fp32").to(dev)
        vq.load_state_dict(vq0.state_dict())
        z = z0.to(dev, copy=True).requires_grad_()  # a leaf of its own on each backend
        _, loss, _ = vq(z)
        loss.backward()
        results[backend] = (loss.cpu(), z.grad.cpu(), vq.embeddings.weight.grad.cpu())
    for a, b in zip(results["torch"], results["triton"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# -- usage statistics -----------------------------------------------------------------------------

def test_codes_used_counts_only_codes_above_the_restart_threshold(backend, device):
    # Running shares 0.599, 0.4 and 0.001: the last is below dead_code_threshold / K = 0.5 / 16, so two
    # codes are in use by the running share although the last batch used three.
    K = 16
    vq = VectorQuantizer(K, 2, dead_code_threshold=0.5).to(device)
    counts = torch.zeros(K, dtype=torch.int64)
    counts[0], counts[1], counts[2] = 599, 400, 1
    with torch.no_grad():
        vq.usage.copy_(counts.float() / counts.sum())
        vq.usage_steps.fill_(10_000.0)  # long trained: the bias correction is 1
        vq.batch_counts.copy_(counts)
    stats = vq.codebook_usage()
    assert stats["batch_codes_used"] == 3
    assert stats["codes_used"] == 2 and stats["fraction_used"] == 2 / K
    torch.testing.assert_close(stats["usage"].cpu(), counts.float() / 1000)


def test_usage_statistics(backend, device):
    torch.manual_seed(14)
    K = 16
    vq = VectorQuantizer(K, 3, dead_code_threshold=0.0, usage_decay=0.9).to(device)
    stats0 = vq.codebook_usage()
    assert stats0["steps"] == 0 and stats0["codes_used"] == 0
    z1 = torch.randn(50, 3, device=device)
    _, _, idx1 = vq(z1)
    counts1 = torch.bincount(idx1.cpu(), minlength=K)
    stats = vq.codebook_usage()
    assert torch.equal(stats["counts"].cpu(), counts1)
    share1 = counts1.double() / counts1.sum()
    torch.testing.assert_close(stats["usage"].double().cpu(), share1)
    expected_ppl = math.exp(-(share1[share1 > 0] * share1[share1 > 0].log()).sum().item())
    assert stats["perplexity"] == pytest.approx(expected_ppl, rel=1e-5)
    assert stats["batch_perplexity"] == pytest.approx(expected_ppl, rel=1e-5)
    assert stats["codes_used"] == int((counts1 > 0).sum()) == stats["batch_codes_used"]
    assert stats["fraction_used"] == pytest.approx(stats["codes_used"] / K)

    z2 = torch.randn(30, 3, device=device) * 3
    _, _, idx2 = vq(z2)
    share2 = torch.bincount(idx2.cpu(), minlength=K).double() / 30
    running = (0.9 * 0.1 * share1 + 0.1 * share2) / (1 - 0.9 ** 2)  # bias-corrected EMA
    stats = vq.codebook_usage()
    torch.testing.assert_close(stats["usage"].double().cpu(), running, rtol=1e-5, atol=1e-7)
    assert stats["steps"] == 2
    # Now the running share and the last batch's differ: each figure must come from its own.
    used = running[running > 0]
    assert stats["perplexity"] == pytest.approx(math.exp(-(used * used.log()).sum().item()), rel=1e-5)
    used2 = share2[share2 > 0]
    assert stats["batch_perplexity"] == pytest.approx(math.exp(-(used2 * used2.log()).sum().item()), rel=1e-5)
    assert stats["batch_perplexity"] != pytest.approx(stats["perplexity"], rel=1e-3)
    assert stats["batch_codes_used"] == int((share2 > 0).sum())
    # Restarts off: a code counts as used from 1 % of the uniform share 1/K on.
    assert stats["codes_used"] == int((running >= 0.01 / K).sum())

    vq.eval()
    vq(torch.randn(40, 3, device=device))
    assert vq.codebook_usage()["steps"] == 2  # evaluation leaves the statistics alone


def test_usage_is_a_distribution_after_restarts(backend, device):
    # Restarts zero the measured share of the codes they re-seed: the reported usage still sums to 1
    # and the perplexity never exceeds K.
    torch.manual_seed(0)
    vq = VectorQuantizer(2, 2, dead_code_threshold=2.0, usage_decay=0.5).to(device)
    with torch.no_grad():  # code 1 far from the data: never picked, so restarted whatever the draws
        vq.embeddings.weight.copy_(torch.tensor([[0.0, 0.0], [100.0, 100.0]]))
    restarted = 0
    for _ in range(6):
        before = vq.embeddings.weight.detach().clone()
        vq(torch.randn(4, 2, device=device))
        restarted += int((vq.embeddings.weight.detach() != before).any(1).sum())
        stats = vq.codebook_usage()
        assert float(stats["usage"].sum()) == pytest.approx(1.0, abs=1e-6)
        assert stats["perplexity"] <= 2.0 + 1e-6
    assert restarted > 0


@pytest.mark.parametrize("usage_decay", [0.99999, 1 - 1e-7])
def test_usage_with_a_decay_near_1(backend, device, usage_decay):
    # With the decay as float32 stores it in both the running share and its bias correction, the
    # corrected shares of the first step are the batch's own (float32 1 - d ** s put them 16 % low at
    # d = 1 - 1e-7), and one code has a perplexity of exactly 1.
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 2, dead_code_threshold=0.0, usage_decay=usage_decay).to(device)
    _, _, idx = vq(torch.randn(32, 2, device=device))
    share = torch.bincount(idx.cpu(), minlength=4).double() / 32
    torch.testing.assert_close(vq._usage_share().double().cpu(), share, rtol=1e-5, atol=0)
    single = VectorQuantizer(1, 2, usage_decay=usage_decay).to(device)
    single(torch.randn(8, 2, device=device))
    assert single.codebook_usage()["perplexity"] == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ema_with_a_decay_near_1_moves_by_1_minus_the_stored_decay(backend, device, dtype):
    # The running counts and sums decay by the decay as their dtype holds it and gain 1 minus that
    # value, so the steps' weights sum to 1. A rate of 1 - decay from the unrounded decay gained 0.84
    # of that at decay 1 - 1e-7 (float32 keeps 1 - 1.19e-7), and float64 statistics decayed by the
    # float32 value.
    decay = 1 - 1e-7
    vq = VectorQuantizer(2, 2, ema=True, decay=decay, eps=0.0, dead_code_threshold=0.0).to(device, dtype)
    with torch.no_grad():
        vq.embeddings.weight.copy_(torch.tensor([[0.0, 0.0], [100.0, 100.0]]))
    vq(torch.cat([torch.full((1000, 2), 10.0), torch.full((3, 2), 100.0)]).to(device, dtype))
    d = reference.stored_decay(decay, dtype)
    rate = 1.0 - d
    counts = torch.tensor([d + rate * 1000, d + rate * 3], dtype=torch.float64)
    torch.testing.assert_close(vq.ema_count.double().cpu(), counts, rtol=1e-7 if dtype == torch.float32 else 1e-14,
                               atol=0)
    code = rate * 1000 * 10 / (d + rate * 1000)
    torch.testing.assert_close(vq.embeddings.weight[0].double().cpu(), torch.tensor([code, code], dtype=torch.float64),
                               rtol=1e-6 if dtype == torch.float32 else 1e-13, atol=0)


def test_float64_usage_decays_by_its_float64_decay(torch_backend):
    # A float64 layer's usage decays by the float64 decay that its bias correction divides out
    # (torch.where with a Python number rounded it to float32: shares off by 2e-8 at 1 - 1e-7 per step).
    torch.manual_seed(0)
    decay = 1 - 1e-7
    vq = VectorQuantizer(4, 2, dead_code_threshold=0.0, usage_decay=decay).double()
    for step in range(2):
        before = vq.usage.clone()
        _, _, idx = vq(torch.randn(32, 2, dtype=torch.float64))
        share = torch.bincount(idx, minlength=4).double() / 32
        torch.testing.assert_close(vq.usage, before * decay + (1 - decay) * share, rtol=1e-14, atol=0)
        if step == 0:
            torch.testing.assert_close(vq._usage_share(), share, rtol=1e-14, atol=0)


def test_a_code_at_the_threshold_is_kept_with_a_decay_near_1(backend, device):
    # Code 1 holds 18 of 25 rows, then misses a batch: its corrected share (0.36) stays above the
    # threshold 1/3. float32 1 - d ** s (d = 1 - 1e-7) put it below on one backend, which re-seeded it.
    codes = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    g = torch.Generator().manual_seed(1)
    # (The 7 rows at the origin exactly: code 2, restarted from a random row of this batch, then either
    # duplicates code 0 and loses its ties, or sits near code 1, far from the second batch.)
    first = torch.cat([torch.zeros(7, 2), torch.tensor([[10.0, 0.0]]).repeat(18, 1) + 0.01 * torch.randn(18, 2, generator=g)])
    second = 0.01 * torch.randn(8, 2, generator=g)
    vq = VectorQuantizer(3, 2, dead_code_threshold=1.0, usage_decay=1 - 1e-7).to(device)
    with torch.no_grad():
        vq.embeddings.weight.copy_(codes.to(device))
    vq(first.to(device))
    vq(second.to(device))
    assert vq.embeddings.weight[1].tolist() == [10.0, 0.0]
    assert vq.embeddings.weight[2].tolist() != [0.0, 10.0]  # the never-used code was re-seeded
    torch.testing.assert_close(vq.codebook_usage()["usage"].cpu(), torch.tensor([0.64, 0.36, 0.0]))


def test_kmeans_codes_survive_a_threshold_of_exactly_the_uniform_share(backend, device):
    # After k-means the codes that own a cluster hold a credit of the uniform share 1/K: with
    # dead_code_threshold=1 (threshold 1/K) a few float32 roundings must not re-seed the codes fitted
    # to the first pooled batch when the second misses them.
    g = torch.Generator().manual_seed(0)
    first = torch.randn(16, 2, generator=g) + torch.tensor([5.0, 0.0])
    second = torch.randn(16, 2, generator=g) - torch.tensor([5.0, 0.0])
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 2, init="kmeans", kmeans_batches=2, dead_code_threshold=1.0,
                         usage_decay=0.9).to(device)
    vq(first.to(device))
    vq(second.to(device))
    w = vq.embeddings.weight.detach().cpu()
    assert int((w[:, 0] > 2).sum()) >= 1, w  # a code still on the first batch's cluster
    assert vq.batch_counts[w[:, 0] > 2].sum() == 0  # ... which the second batch did not use


@pytest.mark.parametrize("name", ["decay", "usage_decay"])
def test_a_decay_that_rounds_to_1_in_float32_is_refused(name):
    with pytest.raises(ValueError, match="rounds to 1 in float32"):
        VectorQuantizer(4, 2, ema=True, **{name: 1 - 1e-8})
    VectorQuantizer(4, 2, ema=True, **{name: 1 - 1e-7})  # the largest decays that float32 keeps below 1 work


@pytest.mark.parametrize("options, needs", [
    (dict(decay=0.8), "ema=True"),
    (dict(eps=1e-3), "ema=True"),
    (dict(kmeans_iters=3), "init='kmeans'"),
    (dict(kmeans_batches=2, init="uniform"), "init='kmeans'"),
    (dict(entropy_temperature=0.5), "entropy_weight"),
    (dict(process_group=object(), sync_distributed=False), "sync_distributed=True"),
])
def test_options_without_effect_warn(options, needs):
    """An option set where nothing uses it (decay=0.8 is vector-quantize-pytorch's EMA default, but here
    EMA is off unless asked for) warns instead of training some other way without a word."""
    name = next(iter(options))
    with pytest.warns(UserWarning, match=f"{name}=.* has no effect without .*{re.escape(needs)}"):
        VectorQuantizer(8, 2, **options)


def test_options_in_use_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        VectorQuantizer(8, 2, ema=True, decay=0.8, eps=1e-3)
        VectorQuantizer(8, 2, init="kmeans", kmeans_iters=3, kmeans_batches=2)
        VectorQuantizer(8, 2, batch_entropy_weight=0.1, entropy_temperature=0.5)
        VectorQuantizer(8, 2, decay=0.99, kmeans_iters=10, entropy_temperature=1.0)  # the defaults, spelt out


# -- mixed precision ------------------------------------------------------------------------------

def _chosen_gap(rows: torch.Tensor, codebook: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    d = torch.cdist(rows.double(), codebook.double()) ** 2
    chosen = d.gather(1, idx.reshape(-1, 1))[:, 0]
    best = d.min(1).values
    return (chosen - best) / (rows.double().pow(2).sum(1) + best)


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_autocast_bf16_keeps_fp32_codebook(monkeypatch, autocast_dtype):
    monkeypatch.setenv("VQFAST_BACKEND", "torch")
    torch.manual_seed(15)
    enc = nn.Linear(6, 8)
    vq = VectorQuantizer(32, 8)
    x = torch.randn(4, 10, 6)
    exact = vq.embeddings.weight.detach().clone()  # (unused codes are restarted after the step)
    with torch.autocast("cpu", dtype=autocast_dtype):
        z = enc(x)
        assert z.dtype == autocast_dtype
        z_q, loss, idx = vq(z)
    assert z_q.dtype == autocast_dtype and loss.dtype == torch.float32
    assert vq.embeddings.weight.dtype == torch.float32
    # fp32 mode searches exactly on the (bf16) values the encoder produced.
    rows = z.detach().float().reshape(-1, 8)
    assert torch.equal(idx.reshape(-1), torch.cdist(rows.double(), exact.double()).argmin(1))
    (z_q.float().sum() + loss).backward()
    assert vq.embeddings.weight.grad.dtype == torch.float32 and torch.isfinite(vq.embeddings.weight.grad).all()
    assert enc.weight.grad is not None and torch.isfinite(enc.weight.grad).all()


def test_precision_option_changes_the_search(torch_backend):
    # Codes 1 and 1 + 2**-10 and a row between them, nearer the second: in bf16 (8 significant bits)
    # all three round to 1, and the tie goes to code 0; the fp32 search (tf32 mode too) finds code 1.
    codes = torch.tensor([[1.0, 0.0], [1.0 + 2**-10, 0.0]])
    z = torch.tensor([[1.0 + 2**-10 - 2**-12, 0.0]])
    picked = {}
    for precision in ("fp32", "tf32", "bf16"):
        vq = VectorQuantizer(2, 2, precision=precision, dead_code_threshold=0.0).eval()
        with torch.no_grad():
            vq.embeddings.weight.copy_(codes)
        picked[precision] = vq(z)[2].item()
    assert picked == {"fp32": 1, "tf32": 1, "bf16": 0}


def test_bf16_precision_with_the_cosine_metric_searches_bf16_unit_vectors(torch_backend):
    """The unit vectors are taken in fp32 and then rounded to bf16 (as "bf16" rounds l2 rows), and that
    search is what the layer does: nearest_code would search a bf16 input's unit vectors in fp32."""
    from vqfast.reference import unit_rows

    torch.manual_seed(51)
    base = torch.randn(1, 16)
    vq = VectorQuantizer(64, 16, metric="cosine", precision="bf16", dead_code_threshold=0.0).eval()
    with torch.no_grad():
        vq.embeddings.weight.copy_(base + 0.05 * torch.randn(64, 16))
    z = base + 0.05 * torch.randn(300, 16)
    _, _, idx = vq(z)
    rows, codes = unit_rows(z).bfloat16().float(), unit_rows(vq.embeddings.weight.detach()).bfloat16().float()
    d = torch.cdist(rows.double(), codes.double())
    assert (d.gather(1, idx[:, None])[:, 0] - d.min(1).values).max() <= 1e-12
    fp32_search = reference.nearest_code(z, vq.embeddings.weight.detach(), metric="cosine")[0]
    assert not torch.equal(idx, fp32_search)  # the case tells the two searches apart


def test_uniform_init_is_within_one_over_k():
    torch.manual_seed(50)
    weight = VectorQuantizer(512, 16, init="uniform").embeddings.weight.detach()
    assert weight.abs().max() <= 1 / 512
    assert weight.min() < -0.9 / 512 and weight.max() > 0.9 / 512  # spread over the range, not a constant


@pytest.mark.parametrize("precision", ["bf16", "tf32"])
def test_reduced_precision_search(monkeypatch, precision):
    monkeypatch.setenv("VQFAST_BACKEND", "torch")
    torch.manual_seed(16)
    vq = VectorQuantizer(64, 16, precision=precision).eval()
    z = torch.randn(200, 16)
    _, _, idx = vq(z)
    assert (_chosen_gap(z, vq.embeddings.weight.detach(), idx) <= 1e-2).all()


def test_fp16_input_on_backend(backend, device):
    torch.manual_seed(17)
    vq = VectorQuantizer(24, 8, ema=(backend == "torch")).to(device)
    z = torch.randn(3, 4, 8, device=device, dtype=torch.float16, requires_grad=True)
    codes = vq.embeddings.weight.detach().clone()
    z_q, loss, idx = vq(z)
    assert z_q.dtype == torch.float16 and vq.embeddings.weight.dtype == torch.float32
    rows = _rows_of(z.detach(), 2)
    assert (_chosen_gap(rows, codes, idx) <= 1e-5).all()
    loss.backward()
    assert torch.isfinite(z.grad.float()).all()


def test_restarts_per_step_are_bounded(backend, device, monkeypatch):
    # With a budget of 3 re-seeds per step, the 4 dead codes come back 3 then 1, lowest index first.
    import vqfast.layer

    monkeypatch.setattr(vqfast.layer, "_RESTARTS_PER_STEP", 3)
    vq = _dead_code_setup(device, 0.5)
    batch = torch.randn(32, 2, device=device) + 5
    vq(batch)
    weight = vq.embeddings.weight.detach()
    assert (weight[4:7] > -50).all() and (weight[7] == -100).all()
    for code in weight[4:7]:
        assert (batch - code).abs().sum(1).min() < 1e-5
    vq(torch.randn(32, 2, device=device) + 5)
    assert (vq.embeddings.weight[4:] > -50).all()


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_rows_without_a_finite_distance_seed_no_code(metric, backend, device):
    # A finite row whose squared norm overflows fp32 (elements beyond about 1e19) has no finite distance:
    # as a code, it would be found by one backend's search and passed over by the other's. Every row of
    # this small batch is drawn as a seed, so only the check keeps it out.
    for seed in range(3):
        torch.manual_seed(seed)
        vq = VectorQuantizer(16, 4, metric=metric).to(device)
        z = torch.randn(8, 4, device=device)
        z[3, 0] = 1e20
        z[5, 1] = float("inf")
        vq(z)
        codes = vq.embeddings.weight.detach()
        assert bool(torch.isfinite(codes).all()) and float(codes.abs().max()) < 1e19
        restarted = (codes.unsqueeze(1) == z.unsqueeze(0)).all(-1).any(1) if metric == "l2" else None
        if restarted is not None:
            assert int(restarted.sum()) == 6  # the six usable rows became codes


def test_restarted_codes_start_from_different_rows(backend, device):
    # 3 batch rows, at least 5 dead codes (the 4 far ones and a near one no row picks): three are
    # re-seeded, each from its own row (drawn with replacement, two would often share one and stay
    # identical); the others wait for the next step.
    for seed in range(5):
        vq = _dead_code_setup(device, 0.5)
        torch.manual_seed(seed)
        before = vq.embeddings.weight.detach().clone()
        batch = torch.randn(3, 2, device=device) + 5
        vq(batch)
        weight = vq.embeddings.weight.detach()
        changed = (weight != before).any(1)
        assert int(changed.sum()) == 3 and (weight[7] == -100).all()
        seeded = (weight[changed][:, None, :] - batch[None]).abs().sum(-1) < 1e-5  # (code, row)
        assert (seeded.sum(1) == 1).all() and (seeded.sum(0) == 1).all()


# -- rows holding NaN or inf --------------------------------------------------------------------

def _with_bad_rows(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` with a NaN row, an inf row and a row with one -inf entry inserted."""
    bad = torch.zeros(3, rows.shape[1], device=rows.device)
    bad[0, 0] = float("nan")
    bad[1] = float("inf")
    bad[2, -1] = -float("inf")
    return torch.cat([rows[:5], bad[:2], rows[5:], bad[2:]])


@pytest.mark.parametrize("ema", [False, True])
def test_nonfinite_rows_are_left_out_of_the_statistics(backend, device, ema):
    """A bad row still gets a code and makes the loss NaN, but it neither moves an EMA code nor
    counts as usage: the layer ends exactly where the finite rows alone would take it."""
    torch.manual_seed(41)
    K, D = 6, 3
    options = dict(ema=True, decay=0.7) if ema else {}
    clean = VectorQuantizer(K, D, dead_code_threshold=0.0, **options).to(device)
    dirty = VectorQuantizer(K, D, dead_code_threshold=0.0, **options).to(device)
    dirty.load_state_dict(clean.state_dict())
    for _ in range(3):
        rows = torch.randn(20, D, device=device)
        _, clean_loss, clean_idx = clean(rows)
        _, dirty_loss, dirty_idx = dirty(_with_bad_rows(rows))
        assert torch.isfinite(clean_loss) and not torch.isfinite(dirty_loss)
        assert ((dirty_idx >= 0) & (dirty_idx < K)).all()
        assert torch.equal(torch.cat([dirty_idx[:5], dirty_idx[7:-1]]), clean_idx)
    assert torch.isfinite(dirty.embeddings.weight).all()
    for name, value in clean.state_dict().items():
        torch.testing.assert_close(dirty.state_dict()[name], value, rtol=1e-6, atol=1e-7, msg=name)
    assert dirty.codebook_usage()["steps"] == 3


@pytest.mark.parametrize("ema", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.25])
def test_a_row_holding_inf_gives_an_inf_loss_on_both_backends(backend, device, beta, ema):
    """The losses of a row holding inf are inf, whatever beta: with beta = 0 the commitment term is
    absent, not 0 * inf = NaN (the fused kernel's (1 + beta) * mse was inf, the PyTorch ops' NaN).
    With EMA the loss is beta * mse alone: inf, or 0 with beta = 0."""
    torch.manual_seed(0)
    z = torch.randn(6, 4)
    z[1, 2] = math.inf
    finite = torch.tensor([True, False, True, True, True, True])
    expected = 0.0 if ema and beta == 0 else math.inf
    for mask in (None, torch.ones(6, dtype=torch.bool, device=device)):
        vq = VectorQuantizer(8, 4, beta=beta, ema=ema, dead_code_threshold=0.0).to(device)
        loss = quantize(z.to(device), vq.embeddings.weight.detach(), beta=beta, mask=mask)[1]
        assert loss.item() == math.inf
        x = z.to(device, copy=True).requires_grad_()
        z_q, loss, _ = vq(x, mask=mask)
        assert loss.item() == expected
        (z_q.sum() + loss).backward()
        grad = x.grad.cpu()[finite]
        assert torch.isfinite(grad).all()
        if beta == 0:
            assert (grad == 1).all()  # the straight-through gradient alone


def test_a_row_holding_inf_gives_a_nan_loss_under_the_cosine_metric(backend, device):
    z = torch.randn(6, 4, device=device)
    z[1, 2] = math.inf
    for train in (True, False):
        vq = VectorQuantizer(8, 4, metric="cosine").to(device).train(train)
        _, loss, indices = vq(z)
        assert math.isnan(loss.item()) and bool(((indices >= 0) & (indices < 8)).all())


def test_restarts_never_seed_from_nonfinite_rows(backend, device):
    vq = _dead_code_setup(device, 0.5)
    before = vq.embeddings.weight.detach().clone()
    vq(torch.full((16, 2), float("nan"), device=device))  # every code is dead after this step ...
    assert torch.equal(vq.embeddings.weight, before)  # ... but there is nothing usable to seed them from
    for _ in range(4):
        vq(_with_bad_rows(torch.randn(30, 2, device=device) + 5))
    assert torch.isfinite(vq.embeddings.weight).all()
    assert (vq.embeddings.weight[4:] > -50).all()  # revived from the finite rows


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_kmeans_ignores_nonfinite_rows(backend, device, metric):
    torch.manual_seed(43)
    vq = VectorQuantizer(8, 4, init="kmeans", metric=metric, dead_code_threshold=0.0).to(device)
    z = _clustered(60, 8, 4, seed=44).to(device)
    z[::3] = float("nan")  # a third of the rows, so many seeds are bad
    z[1, 2] = float("inf")
    vq(z)
    assert bool(vq.initialized)
    assert torch.isfinite(vq.embeddings.weight).all()
    # The codes fit the finite rows far better than the initial (xavier-normal) ones do.
    rows = z[torch.isfinite(z).all(1)]

    def error(layer):
        z_q = layer.eval()(rows)[0]
        if metric == "l2":
            return F.mse_loss(z_q, rows).item()
        return (1 - F.cosine_similarity(z_q, rows)).mean().item()

    assert error(vq) < 0.5 * error(VectorQuantizer(8, 4, metric=metric).to(device))


# -- constructor arguments and dtype conversions ---------------------------------------------------

@pytest.mark.parametrize("kwargs,exc,name", [
    ({"num_embeddings": 16.0}, TypeError, "num_embeddings"),
    ({"embedding_dim": 0}, ValueError, "embedding_dim"),
    ({"channel_dim": 1.0}, TypeError, "channel_dim"),
    ({"beta": float("nan")}, ValueError, "beta"),
    ({"beta": float("inf")}, ValueError, "beta"),
    ({"beta": "0.25"}, TypeError, "beta"),
    ({"ema": "no"}, TypeError, "ema"),
    ({"eps": float("nan")}, ValueError, "eps"),
    ({"eps": 1e39, "ema": True}, ValueError, "eps must be finite in float32"),
    ({"decay": 1.0}, ValueError, "decay"),
    ({"usage_decay": -0.1}, ValueError, "usage_decay"),
    ({"dead_code_threshold": float("nan")}, ValueError, "dead_code_threshold"),
    ({"kmeans_iters": 2.5}, TypeError, "kmeans_iters"),
    ({"kmeans_batches": 0}, ValueError, "kmeans_batches"),
    ({"sample_entropy_weight": float("inf")}, ValueError, "sample_entropy_weight"),
    # The signs are built in: a negative weight would reverse its term.
    ({"sample_entropy_weight": -0.1}, ValueError, "sample_entropy_weight"),
    ({"batch_entropy_weight": -0.1}, ValueError, "batch_entropy_weight"),
    ({"entropy_temperature": float("nan")}, ValueError, "entropy_temperature"),
    ({"entropy_temperature": float("inf")}, ValueError, "entropy_temperature"),
    ({"sync_distributed": "yes"}, TypeError, "sync_distributed"),
])
def test_constructor_names_the_bad_argument(kwargs, exc, name):
    args = {"num_embeddings": 16, "embedding_dim": 8, **kwargs}
    with pytest.raises(exc, match=name):
        VectorQuantizer(**args)


def test_constructor_accepts_numpy_and_tensor_numbers():
    import numpy as np

    vq = VectorQuantizer(np.int64(16), torch.tensor(8), beta=np.float32(0.5), ema=np.bool_(True))
    assert (vq.num_embeddings, vq.embedding_dim, vq.beta, vq.ema) == (16, 8, 0.5, True)
    assert type(vq.num_embeddings) is int and type(vq.beta) is float


@pytest.mark.parametrize("convert", [nn.Module.half, nn.Module.bfloat16, lambda m: m.to(torch.float16)])
def test_half_model_keeps_a_float32_codebook_and_statistics(convert, torch_backend):
    """An fp16 running count overflows at 65,504 rows: EMA codes then froze without a word."""
    torch.manual_seed(47)
    model = nn.Sequential(nn.Linear(8, 8), VectorQuantizer(64, 8, ema=True, decay=0.5, dead_code_threshold=0.0))
    convert(model)
    vq = model[1]
    assert model[0].weight.dtype != torch.float32
    for t in (vq.embeddings.weight, vq.ema_count, vq.usage, vq.restart_grace, vq.usage_steps):
        assert t.dtype == torch.float32
    z = torch.randn(70000, 8).to(model[0].weight.dtype)
    for _ in range(3):
        vq(z)
    before = vq.embeddings.weight.clone()
    z_q, loss, _ = vq(z * 3 + 1)
    assert z_q.dtype == z.dtype and torch.isfinite(loss)
    assert torch.isfinite(vq.ema_count).all() and torch.isfinite(vq.embeddings.weight).all()
    assert (vq.embeddings.weight != before).any(1).sum() > 32  # the averages still move the codes
    model.double()  # wider types are kept
    assert vq.embeddings.weight.dtype == torch.float64


def test_a_layer_built_under_a_16_bit_default_dtype_keeps_a_float32_codebook_and_statistics(torch_backend):
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        vq = VectorQuantizer(4, 2, ema=True, decay=0.5, dead_code_threshold=0.0, init="kmeans")
    finally:
        torch.set_default_dtype(default)
    for t in (vq.embeddings.weight, vq.ema_count, vq.usage, vq.restart_grace, vq.usage_steps, vq.kmeans_pool):
        assert t.dtype == torch.float32
    # The counts pass fp16's 65,504 and keep moving the codes.
    for _ in range(4):
        vq(torch.randn(100_000, 2))
    before = vq.embeddings.weight.clone()
    vq(torch.randn(100_000, 2) + 3)
    assert torch.isfinite(vq.ema_count).all() and (vq.embeddings.weight != before).any()


def test_a_16_bit_codebook_cast_behind_the_layers_back_is_refused_at_forward(backend, device):
    """``vq.embeddings.half()`` bypasses the layer's own casts: the same TypeError on both backends (the
    Triton backend's statistics kernels refused it with internal messages, the torch backend trained an
    fp16 codebook)."""
    vq = VectorQuantizer(8, 4).to(device)
    vq.embeddings.half()
    z = torch.randn(6, 4, device=device)
    with pytest.raises(TypeError, match=r"codebook \(embeddings.weight\) is torch.float16.*\.float\(\)"):
        vq(z)
    vq.float()
    assert torch.isfinite(vq(z)[1])


@pytest.mark.parametrize("convert,dtype", [(nn.Module.half, torch.float16), (nn.Module.bfloat16, torch.bfloat16)])
def test_converting_a_trained_model_keeps_the_exact_codes_and_statistics(convert, dtype, torch_backend):
    # Converted first and upcast afterwards, the codes kept their fp16 rounding and a count above 65,504
    # was already inf (the smoothed counts then NaN, and the EMA codes never moved again).
    torch.manual_seed(48)
    model = nn.Sequential(nn.Linear(8, 8), VectorQuantizer(8, 8, ema=True, dead_code_threshold=0.0))
    vq = model[1]
    with torch.no_grad():
        vq.embeddings.weight.add_(1e-3 * torch.randn(8, 8))
        vq.ema_count.fill_(1e5)
        vq.usage_steps.fill_(3001)
    vq.embeddings.weight.grad = torch.full((8, 8), 1.0 + 2**-20)
    saved = {k: v.clone() for k, v in vq.state_dict().items()}
    saved_grad = vq.embeddings.weight.grad.clone()
    assert not torch.equal(saved["embeddings.weight"].to(dtype).float(), saved["embeddings.weight"])
    convert(model)
    assert model[0].weight.dtype == dtype
    for key, value in vq.state_dict().items():
        assert value.dtype == saved[key].dtype and torch.equal(value, saved[key]), key
    assert torch.equal(vq.embeddings.weight.grad, saved_grad)
    assert isinstance(vq.embeddings.weight, nn.Parameter) and not vq.embeddings.weight.requires_grad
    before = vq.embeddings.weight.clone()
    vq(torch.randn(64, 8).to(dtype))
    assert torch.isfinite(vq.embeddings.weight).all() and not torch.equal(vq.embeddings.weight, before)


def test_frozen_codebook_is_never_rewritten(torch_backend):
    torch.manual_seed(49)
    vq = VectorQuantizer(64, 4, init="kmeans", dead_code_threshold=0.5)
    vq.embeddings.weight.requires_grad_(False)
    frozen = vq.embeddings.weight.clone()
    for _ in range(4):
        vq(torch.randn(32, 4) + 5)  # far from every code: without the freeze most would be restarted
    assert torch.equal(vq.embeddings.weight, frozen)
    assert vq.codebook_usage()["steps"] == 4
    vq.embeddings.weight.requires_grad_(True)  # unfrozen: k-means and restarts run again
    vq(torch.randn(32, 4) + 5)
    assert not torch.equal(vq.embeddings.weight, frozen)


@pytest.mark.parametrize("shape,channel_dim", [((2, 8, 4, 4), None), ((2, 8, 3, 4, 4), None), ((5, 8, 3), 1)])
def test_z_q_is_contiguous_when_z_is(shape, channel_dim, torch_backend):
    vq = VectorQuantizer(16, 8, channel_dim=channel_dim)
    z = torch.randn(*shape, requires_grad=True)
    z_q, _, _ = vq(z)
    assert z_q.is_contiguous()
    z_q.view(shape[0], -1).sum().backward()  # the article's layer output can be viewed like this
    torch.testing.assert_close(z.grad, torch.ones_like(z))
    cl = torch.randn(2, 8, 4, 4).to(memory_format=torch.channels_last)
    assert vq(cl)[0].is_contiguous(memory_format=torch.channels_last)


def test_layer_builds_on_the_meta_device_and_loads_with_assign(torch_backend):
    # Large models are built on the meta device and then given their weights with assign=True; the
    # constructor's decay checks read a number, which a tensor on the default (meta) device has not.
    torch.manual_seed(0)
    trained = VectorQuantizer(8, 4, ema=True, decay=0.9)
    trained(torch.randn(20, 4))
    with torch.device("meta"):
        vq = VectorQuantizer(8, 4, ema=True, decay=0.9)
    with pytest.raises(RuntimeError, match="meta device"):
        vq.codebook_usage()
    vq.load_state_dict(trained.state_dict(), assign=True)
    assert vq.codebook_usage()["steps"] == trained.codebook_usage()["steps"] == 1
    z = torch.randn(20, 4)
    for layer in (trained, vq):
        torch.manual_seed(1)
        layer(z)
    for name, value in trained.state_dict().items():
        assert torch.equal(vq.state_dict()[name], value), name


@pytest.mark.parametrize("order", ["modules", "apply"])
@pytest.mark.parametrize("init", ["xavier_normal", "uniform", "kmeans"])
def test_meta_build_then_to_empty_and_reset_parameters_is_a_fresh_layer(torch_backend, init, order):
    """FSDP-style initialisation: build on the meta device, to_empty, then every module's
    reset_parameters (in modules() order, the layer before its codebook, or apply's, children first).
    The statistics must be those of a fresh layer (to_empty leaves whatever memory held), and the codes
    drawn as init draws them (nn.Embedding's own reset draws N(0, 1))."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), VectorQuantizer(64, 4, init=init, ema=True))
    model.to_empty(device="cpu")
    for buffer in model[1].buffers():  # what uninitialised memory may hold
        buffer.fill_(7 if buffer.dtype != torch.bool else True)
    model[1].embeddings.weight.data.fill_(1e10)
    reset = [m for m in model.modules() if hasattr(m, "reset_parameters")]
    if order == "modules":
        for module in reset:
            module.reset_parameters()
    else:
        model.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
    vq, fresh = model[1], VectorQuantizer(64, 4, init=init, ema=True)
    for name, value in fresh.state_dict().items():
        if name != "embeddings.weight":
            assert torch.equal(vq.state_dict()[name], value), name
    weight = vq.embeddings.weight
    if init == "uniform":
        assert weight.abs().max() <= 1 / 64 and weight.abs().max() > 0.5 / 64
    else:
        xavier_std = (2 / (64 + 4)) ** 0.5
        assert 0.7 * xavier_std < weight.std() < 1.3 * xavier_std
    assert vq._needs_init == (init == "kmeans")
    vq(torch.randn(80, 4))
    assert int(vq.usage_steps) == 1 and bool(vq.initialized)


def test_reset_parameters_starts_a_trained_layer_over(torch_backend):
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 4, init="kmeans", kmeans_batches=2)
    vq(torch.randn(20, 4))
    assert "kmeans_pool" in vq.state_dict()
    vq.reset_parameters()
    assert "kmeans_pool" not in vq.state_dict() and not bool(vq.initialized) and int(vq.usage_steps) == 0
    parametrized = VectorQuantizer(8, 4)
    torch.nn.utils.parametrizations.weight_norm(parametrized.embeddings)
    with pytest.raises(RuntimeError, match="parametrized"):
        parametrized.reset_parameters()


def test_torchscript_is_refused_clearly_and_jit_trace_only_in_eval_mode(torch_backend):
    vq = VectorQuantizer(8, 4)
    for layer in (vq, ResidualVectorQuantizer(2, 8, 4)):
        with pytest.raises(RuntimeError, match="does not support TorchScript"):
            torch.jit.script(layer)
    z = torch.randn(6, 4)
    with pytest.raises(RuntimeError, match="trace it in eval mode"):
        torch.jit.trace(vq, z)
    vq.eval()
    traced = torch.jit.trace(vq, z, check_trace=False)
    other = torch.randn(9, 4) + 2
    assert torch.equal(traced(other)[2], vq(other)[2])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_loading_16_bit_state_with_assign_keeps_a_float32_codebook_and_statistics(dtype, torch_backend):
    torch.manual_seed(0)
    trained = VectorQuantizer(8, 4, ema=True)
    trained(torch.randn(20, 4))
    state = {name: value.to(dtype) if value.is_floating_point() else value
             for name, value in trained.state_dict().items()}
    vq = VectorQuantizer(8, 4, ema=True)
    vq.load_state_dict(state, assign=True)
    for name, value in vq.state_dict().items():
        if value.is_floating_point():
            assert value.dtype == torch.float32, name
            assert torch.equal(value, state[name].float()), name
    assert not vq.embeddings.weight.requires_grad  # (EMA codes)


def test_loading_across_the_ema_setting_reports_the_mismatch_and_starts_ema_counts_afresh(torch_backend):
    x = torch.randn(256, 4, generator=torch.Generator().manual_seed(0))
    ema_layer = VectorQuantizer(16, 4, ema=True)
    ema_layer(x)
    plain = VectorQuantizer(16, 4)
    # EMA counts into a layer without EMA: a setting that changed between runs, reported as PyTorch
    # reports any key the layer does not keep; strict=False loads the rest.
    with pytest.raises(RuntimeError, match='Unexpected key.*"ema_count"'):
        plain.load_state_dict(ema_layer.state_dict())
    result = plain.load_state_dict(ema_layer.state_dict(), strict=False)
    assert result.unexpected_keys == ["ema_count"] and result.missing_keys == []
    assert torch.equal(plain.embeddings.weight, ema_layer.embeddings.weight)
    assert torch.equal(plain.usage, ema_layer.usage)
    # The other way: the EMA layer's own counts (of other codes) must not survive; they start at 1.
    trained = VectorQuantizer(16, 4, ema=True)
    for _ in range(3):
        trained(x * 3)
    assert not (trained.ema_count == 1).all()
    result = trained.load_state_dict(plain.state_dict(), strict=False)
    assert result.missing_keys == ["ema_count"]
    assert (trained.ema_count == 1).all() and torch.equal(trained.usage, plain.usage)
    with pytest.raises(RuntimeError, match='Missing key.*"ema_count"'):
        trained.load_state_dict(plain.state_dict())
    # The first EMA version also stored the running sums (codebook * smoothed counts): dropped quietly.
    old = dict(ema_layer.state_dict())
    old["ema_sum"] = old["embeddings.weight"] * 2
    again = VectorQuantizer(16, 4, ema=True)
    again.load_state_dict(old)
    assert torch.equal(again.embeddings.weight, ema_layer.embeddings.weight)
    assert torch.equal(again.ema_count, ema_layer.ema_count)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        plain.load_state_dict({**plain.state_dict(), "something_else": torch.zeros(1)})


def test_a_codebook_marked_initialised_in_place_is_not_overwritten_by_kmeans(torch_backend):
    # torch.distributed.checkpoint.load and AveragedModel(use_buffers=True) write the state in place,
    # past load_state_dict: k-means must still see the codes as initialised.
    x = torch.randn(256, 4, generator=torch.Generator().manual_seed(1))
    src = VectorQuantizer(16, 4, init="kmeans")
    for _ in range(3):
        src(x)
    dst = VectorQuantizer(16, 4, init="kmeans")
    tensors = {**dict(dst.named_parameters()), **dict(dst.named_buffers())}
    with torch.no_grad():
        for name, value in src.state_dict().items():
            tensors[name].copy_(value)
    loaded = dst.embeddings.weight.detach().clone()
    dst(x)
    assert torch.equal(dst.embeddings.weight, loaded)  # the step's restarts find no dead code here
    assert int(dst.usage_steps) == int(src.usage_steps) + 1  # statistics continued, not restarted
    assert dst.kmeans_pool_batches == 0
    # Still pending in the buffer too: k-means runs.
    fresh = VectorQuantizer(16, 4, init="kmeans")
    before = fresh.embeddings.weight.detach().clone()
    fresh(x)
    assert not torch.equal(fresh.embeddings.weight, before) and bool(fresh.initialized)


def test_codes_only_state_loaded_with_assign_into_a_meta_layer_gets_statistics_beside_the_codes(torch_backend):
    codes = torch.randn(16, 4, generator=torch.Generator().manual_seed(2))
    for ema in (False, True):
        with torch.device("meta"):
            vq = VectorQuantizer(16, 4, ema=ema)
        assert str(vq.load_state_dict({"embeddings.weight": codes}, assign=True)) == "<All keys matched successfully>"
        assert {b.device.type for b in vq.buffers()} == {"cpu"}
        assert torch.equal(vq.embeddings.weight, codes) and bool(vq.initialized)
        assert (vq.usage == 0).all() and int(vq.usage_steps) == 0
        if ema:
            assert (vq.ema_count == 1).all()
        vq(torch.randn(32, 4))  # a training step, on the CPU beside the codes
        assert int(vq.usage_steps) == 1


def test_repr_shows_the_settings_in_use():
    text = repr(VectorQuantizer(16, 4, channel_dim=-1, init="kmeans", kmeans_iters=3, ema=True, decay=0.9,
                                eps=1e-4, usage_decay=0.95, sync_distributed=False))
    for part in ("channel_dim=-1", "kmeans_iters=3", "kmeans_batches=1", "decay=0.9", "eps=0.0001",
                 "usage_decay=0.95", "sync_distributed=False"):
        assert part in text, part
    assert "decay=" not in repr(VectorQuantizer(16, 4)).replace("usage_decay", "")


def _layer_steps(layer, inputs, frozen):
    """Training steps of ``layer`` on ``inputs``: per step the outputs, the input's gradient and its
    strides; then the parameters, their gradients and the buffers."""
    steps = []
    for step, base in enumerate(inputs):
        z = base.clone().requires_grad_(True) if base.is_contiguous() else base.detach().requires_grad_(True)
        torch.manual_seed(10 + step)  # the restarts' random rows
        z_q, loss, indices = layer(z)
        weights = torch.linspace(-1.0, 1.0, z_q.numel(), device=z_q.device).reshape(z_q.shape).to(z_q.dtype)
        ((z_q * weights).sum() + loss).backward()
        steps.append((z_q.detach(), z_q.stride(), loss.detach(), indices, z.grad, z.grad.stride()))
    state = {name: t.detach().clone() for name, t in layer.state_dict().items()}
    grad = layer.embeddings.weight.grad
    return steps, state, None if grad is None else grad.clone()


@pytest.mark.parametrize("shape,channel_dim,kwargs", [
    ((6, 4, 3, 5), None, {}),
    ((6, 4, 3, 5), None, {"ema": True}),
    ((6, 4, 3, 5), None, {"dead_code_threshold": 0.0}),
    ((6, 4, 3, 5), None, {"beta": 1.0, "frozen": True}),
    ((6, 4, 3, 5), None, {"transposed": True}),
    ((6, 4, 3, 5), None, {"dtype": torch.float16}),
    ((7, 9, 4), None, {}),
    ((30, 4), None, {"ema": True}),
    ((5, 4, 3), 1, {"precision": "fp32"}),
])
@pytest.mark.usefixtures("deterministic_on_cuda")
def test_fused_layer_step_matches_the_generic_one(triton_backend, kernel_device, monkeypatch, shape, channel_dim,
                                                 kwargs):
    # The eager l2 step on the kernels runs in one autograd node (_LayoutQuantize); the generic step
    # (quantize on the rows, then the layout's reshapes) must give the very same bits: outputs,
    # gradients, codebook, statistics. (On a GPU in deterministic mode: the codebook gradient is
    # otherwise summed by atomics, in no fixed order.)
    kwargs = dict(kwargs)
    frozen, transposed = kwargs.pop("frozen", False), kwargs.pop("transposed", False)
    dtype = kwargs.pop("dtype", torch.float32)
    g = torch.Generator().manual_seed(3)
    if transposed:
        inputs = [torch.randn(shape[0], shape[3], shape[2], shape[1], generator=g).permute(0, 3, 2, 1)
                  for _ in range(3)]
    else:
        inputs = [torch.randn(*shape, generator=g) for _ in range(3)]
    inputs = [x.to(dtype).to(kernel_device) for x in inputs]
    # Far from the initial codes, so most codes stay unused and get restarted.
    inputs[0] = inputs[0] * 3.0

    def make():
        torch.manual_seed(0)
        layer = VectorQuantizer(12, 4, channel_dim=channel_dim, **kwargs).to(kernel_device)
        if frozen:
            layer.embeddings.weight.requires_grad_(False)
        return layer

    fused_calls = []
    fused_step = VectorQuantizer._fused_step

    def counting(self, z, cdim, mask=None):
        out = fused_step(self, z, cdim, mask)
        fused_calls.append(out is not None)
        return out

    monkeypatch.setattr(VectorQuantizer, "_fused_step", counting)
    fused = _layer_steps(make(), inputs, frozen)
    assert fused_calls == [True] * 3
    monkeypatch.setattr(VectorQuantizer, "_fused_step", lambda self, z, cdim, mask=None: None)
    generic = _layer_steps(make(), inputs, frozen)
    for got, want in zip(fused[0], generic[0]):
        for a, b in zip(got, want):
            if isinstance(a, torch.Tensor):
                assert a.dtype == b.dtype and torch.equal(a, b)
            else:
                assert a == b
    assert fused[1].keys() == generic[1].keys()
    for name in fused[1]:
        assert torch.equal(fused[1][name], generic[1][name]), name
    assert (fused[2] is None) == (generic[2] is None)
    if fused[2] is not None:
        assert torch.equal(fused[2], generic[2])
    if not frozen and not kwargs.get("ema"):
        assert fused[2] is not None


def test_ema_without_smoothing_survives_a_batch_of_nan_rows(backend, device):
    # A batch of NaN rows only counts no row: the averages stay as they are. Then decay 0 and eps 0 with
    # a batch that picks one code leave every other running count at 0; the next batches' codes must
    # come out finite (their smoothed counts were 0 / 0 once).
    torch.manual_seed(45)
    vq = VectorQuantizer(4, 3, ema=True, decay=0.0, eps=0.0, dead_code_threshold=0.0).to(device)
    before = vq.embeddings.weight.detach().clone()
    vq(torch.full((8, 3), float("nan"), device=device))
    assert (vq.ema_count == 1).all() and torch.equal(vq.embeddings.weight, before)
    assert float(vq.usage_steps) == 0.0
    vq(before[0].expand(8, 3).clone())
    assert (vq.ema_count[1:] == 0).all() and float(vq.ema_count[0]) == 8.0
    for _ in range(2):
        _, _, idx = vq(torch.randn(8, 3, device=device))
        assert torch.isfinite(vq.embeddings.weight).all()
    assert idx.unique().numel() > 1


@pytest.mark.parametrize("kwargs", [{}, dict(ema=True), dict(dead_code_threshold=0.0),
                                    dict(sample_entropy_weight=0.1, batch_entropy_weight=0.1)])
def test_layer_first_derivative_with_create_graph_and_no_silent_second(backend, device, kwargs):
    # create_graph=True through the layer gives the first derivative of both backends; differentiating
    # it again works on the torch backend and raises on the Triton one (its kernels have no backward),
    # also where the layer saves only detached rows and a private codebook copy (restarts on, EMA).
    torch.manual_seed(47)
    vq = VectorQuantizer(6, 4, **kwargs).to(device)
    start = {name: value.clone() for name, value in vq.state_dict().items()}  # (a step updates the codes)
    x = torch.randn(2, 4, 3, 3, device=device, requires_grad=True)
    z_q, loss, _ = vq(x)
    (grad,) = torch.autograd.grad((z_q**2).sum() + loss + (x**3).sum(), x, create_graph=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VQFAST_BACKEND", "torch")
        ref = VectorQuantizer(6, 4, **kwargs)
        ref.load_state_dict(start)
        x_ref = x.detach().cpu().requires_grad_()
        z_ref, loss_ref, _ = ref(x_ref)
        (grad_ref,) = torch.autograd.grad((z_ref**2).sum() + loss_ref + (x_ref**3).sum(), x_ref)
    torch.testing.assert_close(grad.detach().cpu(), grad_ref, rtol=1e-4, atol=1e-5)
    if backend == "torch":
        (grad**2).sum().backward()
        assert torch.isfinite(x.grad).all()
    else:
        with pytest.raises(RuntimeError, match="not differentiable"):
            torch.autograd.grad((grad**2).sum(), x, retain_graph=True, allow_unused=True)
        with pytest.raises(RuntimeError, match="not differentiable"):
            (grad**2).sum().backward()


def test_straight_through_alone_stays_twice_differentiable(backend, device):
    # With the VQ loss unused, the gradient to the input is the incoming one passed through (exact), so
    # its derivative is too, on both backends.
    torch.manual_seed(48)
    vq = VectorQuantizer(6, 4, dead_code_threshold=0.0).to(device)
    x = torch.randn(5, 4, device=device, requires_grad=True)
    z_q, _, _ = vq(x)
    (grad,) = torch.autograd.grad((z_q**3).sum(), x, create_graph=True)
    (grad**2).sum().backward()
    z_q = z_q.detach()
    # d/dx sum((3 z_q^2)^2) through the straight-through step: 36 z_q^3.
    torch.testing.assert_close(x.grad, 36 * z_q**3, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", ["set_codebook", "codes-only state dict", "VQGAN state dict"])
def test_codes_brought_in_are_kept_until_the_data_had_a_chance_to_pick_them(how, backend, device):
    # Pretrained codes, 64 clusters, and batches of 32 rows: one batch picks at most half of them. With
    # the statistics of the layer's own (random) codes, or none, every code a batch did not pick counted
    # as dead and was re-seeded on the first step.
    torch.manual_seed(0)
    codes = torch.randn(64, 8) * 4
    # (A fast usage decay: the credit of a code nobody picks runs out after 7 steps instead of ~70.)
    vq = VectorQuantizer(64, 8, init="kmeans", ema=(how == "VQGAN state dict"), usage_decay=0.5).to(device)
    vq(torch.randn(32, 8, device=device))  # a step on its own codes: statistics of other codes
    if how == "set_codebook":
        vq.set_codebook(codes.to(device))
    elif how == "codes-only state dict":
        vq.load_state_dict({"embeddings.weight": codes})  # the article's layer's state
    else:
        missing, unexpected = vq.load_state_dict({"embedding.weight": codes, "loss.w": torch.ones(1)}, strict=False)
        assert missing == [] and unexpected == ["loss.w"]  # taming-transformers' name for the codebook
    assert bool(vq.initialized) and int(vq.usage_steps) == 0 and not vq.usage.any()
    if vq.ema:
        assert torch.equal(vq.ema_count, torch.ones(64, device=device))
    steps, picked = 0, set()
    for _ in range(3):
        batch = (codes[torch.randint(0, 32, (32,))] + 0.01 * torch.randn(32, 8)).to(device)
        picked |= set(vq(batch)[2].tolist())
        steps += 1
        assert torch.allclose(vq.embeddings.weight.cpu(), codes, atol=0.1 if vq.ema else 0.0)
    assert len(picked) < 64  # some codes went unpicked all along, and were kept
    # Codes the data never picks are still re-seeded once their credit has run out.
    for _ in range(8):
        vq((codes[torch.randint(0, 32, (32,))] + 0.01 * torch.randn(32, 8)).to(device))
    unused = ~torch.isin(torch.arange(64), torch.arange(32))
    moved = (vq.embeddings.weight.cpu() - codes).norm(dim=1) > 0.5
    assert moved[unused].any() and not moved[~unused].any()


def test_set_codebook_refuses_what_is_not_a_codebook():
    vq = VectorQuantizer(4, 3)
    with pytest.raises(ValueError, match=r"shape \(4, 3\)"):
        vq.set_codebook(torch.zeros(5, 3))
    with pytest.raises(TypeError, match="floating-point"):
        vq.set_codebook(torch.zeros(4, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        vq.set_codebook([[0.0] * 3] * 4)
    vq.set_codebook(torch.ones(4, 3, dtype=torch.float64))
    assert vq.embeddings.weight.dtype == torch.float32 and bool((vq.embeddings.weight == 1).all())
    # Non-finite codes would stay so (no batch would ever look usable to them): refused, codebook kept.
    for bad in (float("nan"), float("inf"), 1e300):  # (1e300 is inf in the float32 codebook)
        codes = torch.zeros(4, 3, dtype=torch.float64)
        codes[2, 1] = bad
        with pytest.raises(ValueError, match=r"codes must be finite .*1 code\(s\) are not: 2"):
            vq.set_codebook(codes)
        assert bool((vq.embeddings.weight == 1).all())


def test_codes_from_indices_in_the_decoders_dtype(torch_backend):
    # A .half() model: the codebook stays float32, forward's z_q is float16, and so are the codes asked for
    # in that dtype (a float32 tensor into a float16 decoder is an error).
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4, channel_dim=1).half().eval()
    z = torch.randn(2, 4, 3, 3).half()
    z_q, _, indices = vq(z)
    assert vq.embeddings.weight.dtype == torch.float32 and z_q.dtype == torch.float16
    assert vq.codes_from_indices(indices).dtype == torch.float32
    codes = vq.codes_from_indices(indices, dtype=torch.float16)
    assert codes.dtype == torch.float16 and torch.equal(codes, z_q)
    with pytest.raises(TypeError, match="floating-point torch.dtype"):
        vq.codes_from_indices(indices, dtype="float16")


def test_z_q_needs_no_grad_when_z_needs_none_and_misplaced_arguments_are_refused(backend, device):
    # z_q's gradient goes to z alone (straight through): an input that needs none gives a z_q with none
    # on every backend (the fused step's node had marked it differentiable), while the loss still
    # reaches the codebook.
    torch.manual_seed(5)
    vq = VectorQuantizer(16, 8).to(device)
    z_q, loss, indices = vq(torch.randn(2, 8, 3, 3, device=device))
    assert not z_q.requires_grad and z_q.grad_fn is None and loss.requires_grad
    # A dtype passed in check_indices' place was taken as True and ignored: refused now.
    with pytest.raises(TypeError, match="check_indices"):
        vq.codes_from_indices(indices, torch.float16)
    assert vq.codes_from_indices(indices, dtype=torch.float16).dtype == torch.float16
    rvq = ResidualVectorQuantizer(2, 16, 8).to(device)
    with pytest.raises(TypeError, match="check_indices"):
        rvq.codes_from_indices(torch.zeros(3, 2, dtype=torch.int64, device=device), torch.float16)


def test_a_state_dict_whose_initialized_flag_is_not_one_value_is_a_loading_error():
    vq = VectorQuantizer(8, 4)
    state = vq.state_dict()
    state["initialized"] = torch.tensor([True, False])
    with pytest.raises(RuntimeError, match="initialized: expected a single flag, got shape \\(2,\\)"):
        vq.load_state_dict(state)


@pytest.mark.parametrize("ema", [False, True], ids=["codebook-loss", "ema"])
def test_a_float64_layer_restarts_and_fits_codes_in_float64(ema):
    """A layer made fp64 (.double()) keeps fp64 through its upkeep: restarted codes are their data rows
    exactly, and k-means pools the rows in fp64 (rounded to fp32, they were 3e-8 off)."""
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 3, ema=ema, dead_code_threshold=0.5).double()
    with torch.no_grad():
        vq.embeddings.weight.fill_(100.0)
        vq.embeddings.weight[0] = 0.0
    z = torch.randn(10, 3, dtype=torch.float64) + 0.123456789012345
    vq(z)
    w = vq.embeddings.weight.detach()
    assert w.dtype == torch.float64
    assert all(bool((w[i] == z).all(1).any()) for i in range(1, 4))
    pooled = VectorQuantizer(4, 3, ema=ema, init="kmeans", kmeans_batches=2).double()
    pooled(z)
    assert pooled.kmeans_pool.dtype == torch.float64 and torch.equal(pooled.kmeans_pool, z)


@pytest.mark.parametrize("other", ["codes", "dim", "usage"])
def test_a_state_of_other_shapes_fails_to_load_and_leaves_the_layer_as_it_was(torch_backend, other):
    # load_state_dict reports a size mismatch only after every module had its turn, and copies the
    # entries that fit: a layer pooling for k-means must keep its pool, its pending k-means and its
    # statistics, since the codes and statistics of that state are not loaded.
    torch.manual_seed(0)
    trained = VectorQuantizer(8, 4)
    trained(torch.randn(20, 4))
    state = dict(trained.state_dict())
    if other == "codes":
        state = dict(VectorQuantizer(16, 4).state_dict(), initialized=torch.tensor(True))
    elif other == "dim":
        state["embeddings.weight"] = torch.randn(8, 5)
    else:
        state["usage"] = torch.rand(9)
    pooling = VectorQuantizer(8, 4, init="kmeans", kmeans_batches=3)
    pooling(torch.randn(10, 4))
    before = {name: value.clone() for name, value in pooling.state_dict().items()}
    weight, usage = pooling.embeddings.weight, pooling.usage
    for assign in (False, True):
        with pytest.raises(RuntimeError, match="size mismatch"):
            pooling.load_state_dict(state, assign=assign)
        after = pooling.state_dict()
        assert after.keys() == before.keys()
        assert all(torch.equal(after[name], before[name]) for name in before)
        assert pooling._needs_init and pooling._kmeans_pool_batches == 1
        # The same tensors (an optimizer holds the parameter).
        assert pooling.embeddings.weight is weight and pooling.usage is usage
    # The layer goes on pooling, and loads a state that fits.
    pooling(torch.randn(10, 4))
    assert pooling._kmeans_pool_batches == 2
    pooling.load_state_dict(trained.state_dict())
    assert not pooling._needs_init and torch.equal(pooling.embeddings.weight, trained.embeddings.weight)
