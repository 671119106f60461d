"""Multi-head VQ (``heads``): each position's channels are ``heads`` vectors of ``embedding_dim``, each
quantized with the one codebook: the layer on those vectors as rows, with indices ending in ``heads``."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import assert_compiled_steps_match
from vqfast import ResidualVectorQuantizer, VectorQuantizer, rotate_to_codes


def _step(layer, z, mask=None):
    z = z.detach().clone().requires_grad_(True)
    z_q, loss, indices = layer(z) if mask is None else layer(z, mask=mask)
    upstream = torch.linspace(-1.0, 1.0, z_q.numel(), device=z.device).reshape(z_q.shape)
    ((z_q * upstream).sum() + loss).backward()
    grad_c = layer.embeddings.weight.grad
    return z_q.detach(), loss.detach(), indices, z.grad, None if grad_c is None else grad_c.clone()


@pytest.mark.parametrize("options", [dict(), dict(ema=True), dict(metric="cosine")], ids=["default", "ema", "cosine"])
def test_heads_are_rows_of_the_one_codebook(device, options):
    torch.manual_seed(0)
    heads = VectorQuantizer(16, 4, heads=3, **options).to(device)
    rows = VectorQuantizer(16, 4, **options).to(device)
    rows.load_state_dict(heads.state_dict())
    z = torch.randn(2, 5, 12, device=device)  # (B, N, heads * D)
    torch.manual_seed(1)  # the same restart draws
    z_q, loss, indices, grad_z, grad_c = _step(heads, z)
    torch.manual_seed(1)
    z_q1, loss1, indices1, grad_z1, grad_c1 = _step(rows, z.reshape(2, 15, 4))
    assert indices.shape == (2, 5, 3) and torch.equal(indices.reshape(2, 15), indices1)
    assert torch.equal(z_q.reshape(2, 15, 4), z_q1) and torch.equal(loss, loss1)
    torch.testing.assert_close(grad_z.reshape(2, 15, 4), grad_z1)
    if grad_c1 is not None:
        torch.testing.assert_close(grad_c, grad_c1)
    for name, value in rows.state_dict().items():
        torch.testing.assert_close(heads.state_dict()[name], value, msg=name)
    assert int(heads.batch_counts.sum()) == 30


def test_channels_first_heads_masks_encode_and_decoding(device):
    torch.manual_seed(2)
    vq = VectorQuantizer(16, 4, heads=2, dead_code_threshold=0.0).to(device)
    x = torch.randn(2, 8, 3, 5, device=device)  # (B, heads * D, H, W)
    z_q, _, indices = vq(x)
    assert indices.shape == (2, 3, 5, 2)
    # Head h of position (b, i, j) is channels [4h, 4h + 4) there.
    rows = x.permute(0, 2, 3, 1).reshape(-1, 2, 4)
    assert torch.equal(vq.eval()(rows.reshape(-1, 8))[2].reshape(2, 3, 5, 2), indices)
    assert torch.equal(vq.encode(x), indices)
    assert torch.equal(vq.codes_from_indices(indices), z_q)
    mask = torch.rand(2, 3, 5, generator=torch.Generator().manual_seed(3)).to(device) < 0.5
    masked = vq(x, mask=mask)
    assert torch.equal(masked[2], torch.where(mask.unsqueeze(-1), indices, -1))
    assert torch.equal(masked[0], torch.where(mask.unsqueeze(1), z_q, x))
    assert torch.equal(vq.encode(x, mask=mask), masked[2])
    decoded = vq.codes_from_indices(masked[2])
    assert torch.equal(decoded, torch.where(mask.unsqueeze(1), z_q, 0.0))


def test_residual_stages_with_heads(device):
    torch.manual_seed(4)
    rvq = ResidualVectorQuantizer(3, 16, 4, heads=2, channel_dim=1).to(device)
    z = torch.randn(2, 8, 7, device=device)
    z_q, loss, indices = rvq(z)
    assert indices.shape == (2, 7, 2, 3) and torch.isfinite(loss)
    assert torch.allclose(rvq.codes_from_indices(indices), z_q, atol=1e-6)
    assert torch.equal(rvq.encode(z), rvq.eval()(z)[2])


def test_bad_heads_and_shapes():
    with pytest.raises(ValueError, match="heads"):
        VectorQuantizer(8, 4, heads=0)
    vq = VectorQuantizer(8, 4, heads=3)
    with pytest.raises(ValueError, match=r"heads \* embedding_dim = 3 \* 4"):
        vq(torch.randn(5, 4))
    with pytest.raises(ValueError, match="end in a dimension of heads=3"):
        vq.codes_from_indices(torch.zeros(5, 2, dtype=torch.int64))
    assert "heads=3" in repr(vq) and "heads" not in repr(copy.deepcopy(VectorQuantizer(8, 4)))


def test_heads_compile_without_graph_breaks(device):
    torch.manual_seed(5)
    vq = VectorQuantizer(16, 4, heads=2).to(device)
    z = torch.randn(3, 5, 8, device=device)
    mask = torch.arange(5, device=device)[None, :] < torch.tensor([[5], [3], [1]], device=device)
    assert_compiled_steps_match(vq, z, mask)


def test_residual_rotation_rotates_each_head_on_its_own(device):
    """A gradient on one head's z_q reaches that head's z only, as in one layer with heads."""
    torch.manual_seed(6)
    rvq = ResidualVectorQuantizer(2, 16, 4, heads=2, gradient="rotation", dead_code_threshold=0.0).to(device)
    z = torch.randn(3, 8, device=device, requires_grad=True)
    upstream = torch.zeros(3, 8, device=device)
    upstream[:, 4:] = 1.0
    (rvq(z)[0] * upstream).sum().backward()
    assert bool((z.grad[:, :4] == 0).all()) and bool((z.grad[:, 4:] != 0).any())
    z_q = rvq.eval()(z)[0].detach()
    rows = z.detach().reshape(6, 4).requires_grad_(True)
    rotate_to_codes(rows, z_q.reshape(6, 4)).backward(upstream.reshape(6, 4))
    torch.testing.assert_close(z.grad.reshape(6, 4), rows.grad)
