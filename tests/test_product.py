"""ProductVectorQuantizer: each group of channels quantized with its own codebook, as separate layers
on the slices would; decoding, masks, gradients and bad arguments."""

from __future__ import annotations

import copy

import pytest
import torch

from vqfast import ProductVectorQuantizer, VectorQuantizer, reference, rotate_to_codes


def _separate_layers(product: ProductVectorQuantizer) -> list[VectorQuantizer]:
    """Stand-alone copies of the groups' layers, with their state."""
    return [copy.deepcopy(vq) for vq in product.quantizers]


@pytest.mark.parametrize("shape, channel_dim", [((4, 6, 5, 3), None), ((3, 7, 6), None), ((9, 6), None),
                                                ((2, 5, 6), -1), ((2, 6, 5), 1)])
def test_each_group_is_quantized_by_its_own_layer(device, shape, channel_dim):
    # Training steps (dead-code restarts included) of the product layer and of separate layers on the
    # slices, with the same random draws: the same outputs and the same codebooks after each step.
    torch.manual_seed(0)
    product = ProductVectorQuantizer(3, 5, 2, channel_dim=channel_dim).to(device)
    separate = _separate_layers(product)
    cdim = (channel_dim % len(shape)) if channel_dim is not None else (1 if len(shape) >= 4 else len(shape) - 1)
    for step in range(3):
        z = torch.randn(shape, device=device, requires_grad=True)
        torch.manual_seed(10 + step)
        z_q, loss, indices = product(z)
        (z_q.square().sum() + loss).backward()
        torch.manual_seed(10 + step)
        z2 = z.detach().clone().requires_grad_(True)
        outs = [vq(part) for vq, part in zip(separate, z2.split(2, dim=cdim))]
        want_zq = torch.cat([o[0] for o in outs], dim=cdim)
        want_loss = torch.stack([o[1] for o in outs]).mean()
        (want_zq.square().sum() + want_loss).backward()
        assert z_q.shape == z.shape and z_q.dtype == z.dtype and z_q.is_contiguous()  # (callers view it)
        assert indices.shape == z.movedim(cdim, -1).shape[:-1] + (3,) and indices.dtype == torch.int64
        assert torch.equal(indices, torch.stack([o[2] for o in outs], dim=-1))
        assert torch.equal(z_q, want_zq)
        torch.testing.assert_close(loss, want_loss)
        torch.testing.assert_close(z.grad, z2.grad)
        for vq, alone in zip(product.quantizers, separate):
            torch.testing.assert_close(vq.embeddings.weight.grad, alone.embeddings.weight.grad)
            assert torch.equal(vq.embeddings.weight, alone.embeddings.weight)
            vq.zero_grad(), alone.zero_grad()


def test_groups_search_their_own_codebooks(device):
    # Group 1's codebook is group 0's moved far away: each slice must get the code of its own codebook,
    # and the output is the pair of codes, gradient straight to z.
    torch.manual_seed(1)
    product = ProductVectorQuantizer(2, 8, 4, dead_code_threshold=0.0).to(device).eval()
    with torch.no_grad():
        product.quantizers[1].embeddings.weight.copy_(product.quantizers[0].embeddings.weight + 100.0)
    codes0 = product.quantizers[0].embeddings.weight.detach()
    z = torch.cat([codes0[[3, 5, 0]] + 0.01, codes0[[1, 1, 7]] + 100.0 - 0.01], dim=1).requires_grad_(True)
    z_q, loss, indices = product(z)
    assert indices.tolist() == [[3, 1], [5, 1], [0, 7]]
    assert torch.equal(z_q, torch.cat([codes0[[3, 5, 0]], codes0[[1, 1, 7]] + 100.0], dim=1))
    z_q.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))
    # The mean of the groups' losses: (1 + beta) * the mse over all the channels.
    torch.testing.assert_close(loss, 1.25 * (z_q - z).square().mean())
    # One shared codebook (heads) would pick from group 0's codes only.
    shared = VectorQuantizer(8, 4, heads=2, dead_code_threshold=0.0).to(device).eval()
    with torch.no_grad():
        shared.embeddings.weight.copy_(codes0)
    assert shared(z)[2][:, 1].tolist() != indices[:, 1].tolist()


def test_masked_rows_keep_z_and_index_minus_one_in_every_group(device):
    torch.manual_seed(2)
    product = ProductVectorQuantizer(2, 6, 3, channel_dim=1).to(device)
    z = torch.randn(2, 6, 5, device=device)  # (B, C, T)
    mask = torch.tensor([[True, True, False, True, False], [False, True, True, True, True]], device=device)
    z_q, loss, indices = product(z, mask=mask)
    assert torch.equal(z_q.movedim(1, -1)[~mask], z.movedim(1, -1)[~mask])
    assert bool((indices[~mask] == -1).all()) and bool((indices[mask] >= 0).all())
    assert torch.equal(product.encode(z, mask=mask), torch.where(mask.unsqueeze(-1), product.encode(z), -1))
    decoded = product.codes_from_indices(indices)
    assert bool((decoded.movedim(1, -1)[~mask] == 0).all())
    torch.testing.assert_close(decoded.movedim(1, -1)[mask], z_q.movedim(1, -1)[mask])


def test_encode_and_decode_give_forwards_indices_and_values_without_changing_state(device):
    torch.manual_seed(3)
    product = ProductVectorQuantizer(4, 16, 2, ema=True).to(device)
    z = torch.randn(3, 8, 4, 4, device=device)
    before = copy.deepcopy(product.state_dict())
    tokens = product.encode(z)
    assert all(torch.equal(v, product.state_dict()[k]) for k, v in before.items())
    product.eval()
    z_q, _, indices = product(z)
    assert torch.equal(tokens, indices) and tokens.shape == (3, 4, 4, 4)
    assert torch.equal(product.codes_from_indices(tokens), z_q)
    assert product.codes_from_indices(tokens, dtype=torch.float16).dtype == torch.float16
    # Each group's decoding is its own codebook's rows.
    rows = product.codes_from_indices(tokens).movedim(1, -1).reshape(-1, 4, 2)
    for g, vq in enumerate(product.quantizers):
        assert torch.equal(rows[:, g], vq.embeddings.weight[tokens.reshape(-1, 4)[:, g]])


def test_rotation_gradient_and_half_precision_inputs(device):
    torch.manual_seed(4)
    product = ProductVectorQuantizer(2, 8, 3, gradient="rotation", dead_code_threshold=0.0).to(device).eval()
    z = torch.randn(10, 6, device=device, requires_grad=True)
    z_q, _, indices = product(z)
    g = torch.randn_like(z)
    z_q.backward(g)
    want = []
    for part, grad, vq, idx in zip(z.detach().split(3, 1), g.split(3, 1), product.quantizers, indices.unbind(-1)):
        part = part.clone().requires_grad_(True)
        rotate_to_codes(part, vq.embeddings.weight.detach()[idx]).backward(grad)
        want.append(part.grad)
    torch.testing.assert_close(z.grad, torch.cat(want, dim=1))
    half = z.detach().half()
    z_q16, _, idx16 = product(half)
    assert z_q16.dtype == torch.float16 and idx16.shape == (10, 2)


def test_options_go_to_every_group_and_bad_arguments_are_refused():
    product = ProductVectorQuantizer(3, 10, 4, beta=0.5, metric="cosine", ema=True)
    assert len(product.quantizers) == 3 and product.embedding_dim == 4
    assert all(vq.beta == 0.5 and vq.metric == "cosine" and vq.ema for vq in product.quantizers)
    # Codebooks of their own: not copies of one draw.
    assert not torch.equal(product.quantizers[0].embeddings.weight, product.quantizers[1].embeddings.weight)
    assert "groups=3" in repr(product) and len(product.codebook_usage()) == 3
    with pytest.raises(ValueError, match=r"z has 8 channels at dim 1, expected groups \* embedding_dim = 3 \* 4"):
        product(torch.randn(2, 8, 3, 3))
    with pytest.raises(TypeError, match="takes no heads"):
        ProductVectorQuantizer(2, 10, 4, heads=2)
    assert ProductVectorQuantizer(2, 10, 4, heads=1).quantizers[1].heads == 1  # (the default, said out loud)
    with pytest.raises(ValueError, match="groups must be an int >= 1"):
        ProductVectorQuantizer(0, 10, 4)
    with pytest.raises(TypeError, match="groups must be a positive int"):
        ProductVectorQuantizer(2.0, 10, 4)
    with pytest.raises(ValueError, match="end in a dimension of groups=3"):
        product.codes_from_indices(torch.zeros(5, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="indices must be -1"):
        product.codes_from_indices(torch.full((5, 3), -2))
    with pytest.raises(TypeError, match="indices must be a torch.Tensor"):
        product.codes_from_indices([[0, 1, 2]])
    with pytest.raises(ValueError, match="mask must have the shape"):
        product(torch.randn(2, 12, 3, 3), mask=torch.ones(2, 3, dtype=torch.bool))


def test_state_dict_round_trip_and_compile_without_graph_breaks():
    torch.manual_seed(5)
    product = ProductVectorQuantizer(2, 6, 3, dead_code_threshold=0.0)
    z = torch.randn(7, 6)
    product(z)  # a training step: running statistics to carry over
    other = ProductVectorQuantizer(2, 6, 3, dead_code_threshold=0.0)
    other.load_state_dict(product.state_dict())
    for a, b in zip(product.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(other.eval()(z)[2], product.eval()(z)[2])
    compiled = torch.compile(product, fullgraph=True, backend="aot_eager")
    for train in (True, False):
        product.train(train)
        torch._dynamo.reset()
        eager = product(z)
        got = compiled(z)
        assert torch.equal(got[2], eager[2]) and torch.equal(got[0], eager[0])
        torch.testing.assert_close(got[1], eager[1])


def test_groups_of_the_reference_search(device):
    # Against the plain search of each slice in its codebook.
    torch.manual_seed(6)
    product = ProductVectorQuantizer(3, 33, 5).to(device).eval()
    z = torch.randn(2, 17, 15, device=device)  # (B, N, C): channels last
    _, _, indices = product(z)
    for g, vq in enumerate(product.quantizers):
        want, _ = reference.nearest_code(z[..., 5 * g:5 * g + 5].reshape(-1, 5).cpu(),
                                         vq.embeddings.weight.detach().cpu())
        assert torch.equal(indices[..., g].reshape(-1).cpu(), want)
