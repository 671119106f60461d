"""ResidualVectorQuantizer: stages on residuals, straight-through output, fewer stages, quantizer dropout,
decoding from indices."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from vqfast import ResidualVectorQuantizer, reference


def _manual(rvq: ResidualVectorQuantizer, z: torch.Tensor, stages: int):
    """The plain loop over (N, C) rows, with the reference search: codes sum, summed loss, indices."""
    residual, total, loss, indices = z, torch.zeros_like(z), 0.0, []
    for vq in list(rvq.quantizers)[:stages]:
        codebook = vq.embeddings.weight.detach()
        idx, _ = reference.nearest_code(residual, codebook)
        q = codebook[idx]
        loss = loss + (1 + vq.beta) * F.mse_loss(q, residual)
        total, residual = total + q, residual - q
        indices.append(idx)
    return total, loss, torch.stack(indices, dim=-1)


@pytest.mark.parametrize("stages", [None, 1, 2])
def test_stages_quantize_what_the_previous_ones_left(device, stages):
    torch.manual_seed(0)
    rvq = ResidualVectorQuantizer(3, 20, 6).to(device).eval()
    z = torch.randn(4, 6, 5, 3, device=device)  # (B, C, H, W)
    z_q, loss, indices = rvq(z, stages)
    used = stages or 3
    rows = z.movedim(1, -1).reshape(-1, 6)
    total, manual_loss, manual_indices = _manual(rvq, rows, used)
    assert z_q.shape == z.shape and indices.shape == (4, 5, 3, 3) and indices.dtype == torch.int64
    assert torch.equal(indices.reshape(-1, 3)[:, :used], manual_indices)
    assert bool((indices[..., used:] == -1).all())
    torch.testing.assert_close(z_q.movedim(1, -1).reshape(-1, 6), total)
    torch.testing.assert_close(loss, manual_loss)
    assert torch.equal(rvq.codes_from_indices(indices), z_q)


def test_more_stages_quantize_more_finely(device):
    torch.manual_seed(1)
    rvq = ResidualVectorQuantizer(4, 64, 4).to(device).eval()
    with torch.no_grad():
        for vq in rvq.quantizers:  # codebooks that hold the zero code, so no stage can add error
            vq.embeddings.weight[0] = 0.0
    z = torch.randn(300, 4, device=device)
    errors = [float((rvq(z, n)[0] - z).pow(2).mean()) for n in (1, 2, 3, 4)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.5 * errors[0]


def test_gradients_go_straight_to_z_and_to_every_stage(device):
    torch.manual_seed(2)
    rvq = ResidualVectorQuantizer(3, 16, 5, dead_code_threshold=0.0).to(device)
    z = torch.randn(7, 5, device=device, requires_grad=True)
    z_q, loss, indices = rvq(z)
    z_q.sum().backward(retain_graph=True)
    assert torch.equal(z.grad, torch.ones_like(z))  # the output's gradient, unchanged, to z
    z.grad = None
    loss.backward()
    for stage, vq in enumerate(rvq.quantizers):
        grad = vq.embeddings.weight.grad
        used = torch.unique(indices[:, stage])
        assert grad is not None and bool((grad[used].abs().sum(1) > 0).all()), stage
    assert z.grad is not None and float(z.grad.abs().sum()) > 0  # the commitment terms reach z
    # ... every stage's, the later ones through their residuals: with no commitment in the first
    # stage, z still gets the second's.
    rvq.quantizers[0].beta = 0.0
    z.grad = None
    rvq(z)[1].backward()
    assert float(z.grad.abs().sum()) > 0


def test_half_precision_inputs_are_chained_in_fp32(device):
    torch.manual_seed(6)
    rvq = ResidualVectorQuantizer(3, 32, 8).to(device).eval()
    z = torch.randn(64, 8, device=device)
    half = z.half()
    z_q, _, indices = rvq(half)
    wide_q, _, wide_indices = rvq(half.float())
    assert z_q.dtype == torch.float16 and torch.equal(indices, wide_indices)
    assert torch.equal(z_q, wide_q.half()) and torch.equal(rvq.codes_from_indices(indices).half(), z_q)


def test_kmeans_stages_pool_the_residuals_of_initialised_stages():
    torch.manual_seed(7)
    rvq = ResidualVectorQuantizer(2, 8, 4, init="kmeans", kmeans_batches=2, kmeans_iters=2)
    first, second = rvq.quantizers
    states = []
    for _ in range(3):
        rvq(torch.randn(64, 4))
        states.append((not first._needs_init, not second._needs_init))
    # The second stage starts pooling in the batch where the first runs k-means, so it runs its own a
    # batch later, on residuals of the first stage's k-means codes only.
    assert states == [(False, False), (True, False), (True, True)]


def test_quantizer_dropout_draws_the_stages_from_the_layers_own_generator():
    torch.manual_seed(3)
    a = ResidualVectorQuantizer(4, 8, 3, quantizer_dropout=1.0, dropout_seed=7, dead_code_threshold=0.0)
    b = ResidualVectorQuantizer(4, 8, 3, quantizer_dropout=1.0, dropout_seed=7, dead_code_threshold=0.0)
    z = torch.randn(10, 3)

    def used_stages(rvq):
        return [int((rvq(z)[2][0] >= 0).sum()) for _ in range(12)]

    torch.manual_seed(99)  # the global generator does not decide
    drawn = used_stages(a)
    assert used_stages(b) == drawn  # same seed, same draws: the same stages on every rank
    assert set(drawn + used_stages(a) + used_stages(a)) == {1, 2, 3, 4}  # uniform over 1..num_quantizers
    state = a.state_dict()
    next_draws = used_stages(a)
    resumed = ResidualVectorQuantizer(4, 8, 3, quantizer_dropout=1.0, dropout_seed=123, dead_code_threshold=0.0)
    resumed.load_state_dict(state)
    assert used_stages(resumed) == next_draws  # a resumed run draws on as the uninterrupted one
    # The generator's state survives a checkpoint mapped to another device or dtype, and a state dict
    # without it keeps the layer's own; anything else is a clear error.
    converted = {k: (v.to(torch.float32) if k.endswith("_extra_state") else v) for k, v in state.items()}
    resumed.load_state_dict(converted)
    assert used_stages(resumed) == next_draws
    resumed.load_state_dict({k: v for k, v in state.items() if not k.endswith("_extra_state")})
    with pytest.raises(ValueError, match="dropout generator's state"):
        resumed.load_state_dict({**state, "_extra_state": {"seed": 1}})
    a.eval()
    assert used_stages(a) == [4] * 12  # no dropout in eval
    half = ResidualVectorQuantizer(4, 8, 3, quantizer_dropout=0.5, dead_code_threshold=0.0)
    counts = used_stages(half) + used_stages(half) + used_stages(half)
    assert 4 in counts and any(n < 4 for n in counts)
    # A call refused for its input uses up no draw: the draws stay those of a run without the mistake.
    c = ResidualVectorQuantizer(4, 8, 3, quantizer_dropout=1.0, dropout_seed=7, dead_code_threshold=0.0)
    for bad in (torch.randn(10, 5), z.double().numpy(), torch.zeros(10, 3, dtype=torch.int64)):
        with pytest.raises((TypeError, ValueError), match="z "):
            c(bad)
    with pytest.raises(ValueError, match="mask"):
        c(z, mask=torch.ones(3, dtype=torch.bool))
    # ... nor one refused later, by a stage (the meta device stands in for a GPU the layer is not on).
    with pytest.raises(ValueError, match="same device"):
        c(z.to("meta"))
    assert used_stages(c) == drawn


def test_codes_from_indices_and_bad_arguments():
    torch.manual_seed(4)
    rvq = ResidualVectorQuantizer(3, 10, 4).eval()
    z = torch.randn(2, 7, 4)  # (B, N, C)
    z_q, _, indices = rvq(z, 2)
    assert indices.shape == (2, 7, 3) and torch.equal(rvq.codes_from_indices(indices), z_q)
    # Tokens that keep only the stages they used decode alike, in the decoder's dtype if asked.
    assert torch.equal(rvq.codes_from_indices(indices[..., :2]), z_q)
    assert torch.equal(rvq.codes_from_indices(indices[..., :2], dtype=torch.float16), z_q.half())
    with pytest.raises(TypeError, match="floating-point torch.dtype"):
        rvq.codes_from_indices(indices, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"must lie in \[0, 10\)"):
        rvq.codes_from_indices(torch.full((2, 3), 10))
    with pytest.raises(ValueError, match="-1"):
        rvq.codes_from_indices(torch.full((2, 3), -2))
    with pytest.raises(ValueError, match="-1"):  # on the CPU checked anyway, as gather does
        rvq.codes_from_indices(torch.full((2, 3), -2), check_indices=False)
    with pytest.raises(ValueError, match="num_quantizers=3"):
        rvq.codes_from_indices(torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="at most the layer's 3"):
        rvq(z, 4)
    with pytest.raises(ValueError, match="num_quantizers must be an int >= 1"):
        rvq(z, 0)
    # A mask in num_quantizers' place (the single layer takes it second) is not read as 0 or 1 stages.
    with pytest.raises(TypeError, match="num_quantizers must be a positive int"):
        rvq(z[:1, :1], torch.tensor([True]))
    with pytest.raises(ValueError, match="probability"):
        ResidualVectorQuantizer(2, 4, 4, quantizer_dropout=1.5)
    with pytest.raises(ValueError, match="num_quantizers must be an int >= 1"):
        ResidualVectorQuantizer(0, 4, 4)
    with pytest.raises(ValueError, match="dropout_seed must be below 2\\*\\*64"):
        ResidualVectorQuantizer(2, 4, 4, dropout_seed=2**70)
    with pytest.warns(UserWarning, match="dropout_seed=7 has no effect without a positive quantizer_dropout"):
        ResidualVectorQuantizer(2, 4, 4, dropout_seed=7)
    with pytest.warns(UserWarning, match="decay=0.8 has no effect without ema=True"):
        ResidualVectorQuantizer(2, 4, 4, decay=0.8)  # the stages' options too
    # Bool indices are not codes 0 and 1, as gather says.
    with pytest.raises(TypeError, match="int64 or int32"):
        rvq.codes_from_indices(torch.ones(2, 3, dtype=torch.bool))
    # Keyword arguments reach every stage.
    cosine = ResidualVectorQuantizer(2, 4, 4, metric="cosine", beta=0.5, channel_dim=1)
    assert all(vq.metric == "cosine" and vq.beta == 0.5 and vq.channel_dim == 1 for vq in cosine.quantizers)
    assert len(rvq.codebook_usage()) == 3


def test_compiles_without_graph_breaks(device):
    torch.manual_seed(5)
    rvq = ResidualVectorQuantizer(3, 16, 4, dead_code_threshold=0.0).to(device)
    z = torch.randn(8, 4, device=device)
    compiled = torch.compile(rvq, fullgraph=True, backend="aot_eager")
    for train in (True, False):
        rvq.train(train)
        torch._dynamo.reset()
        eager, got = rvq(z), compiled(z)
        assert torch.equal(got[2], eager[2]) and torch.equal(got[0], eager[0])
        torch.testing.assert_close(got[1], eager[1])
