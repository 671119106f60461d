"""ProjectedVectorQuantizer: quantization in the codebook's smaller space between two linear maps."""

from __future__ import annotations

import pytest
import torch

from vqfast import ProjectedVectorQuantizer, reference


@pytest.mark.parametrize("shape,channel_dim,index_shape", [
    ((3, 12, 4, 5), None, (3, 4, 5)),   # (B, C, H, W): channels at dim 1
    ((3, 7, 12), None, (3, 7)),         # (B, N, C): channels last
    ((9, 12), None, (9,)),              # (N, C)
    ((3, 12, 7), 1, (3, 7)),            # (B, C, T) with channel_dim
])
def test_rows_are_searched_in_the_codebooks_space_and_mapped_back(device, shape, channel_dim, index_shape):
    torch.manual_seed(0)
    vq = ProjectedVectorQuantizer(40, 12, 4, channel_dim=channel_dim).to(device).eval()
    z = torch.randn(*shape, device=device)
    z_q, loss, indices = vq(z)
    assert z_q.shape == z.shape and indices.shape == index_shape and indices.dtype == torch.int64
    cdim = (1 if z.dim() >= 4 else z.dim() - 1) if channel_dim is None else channel_dim
    rows = vq.project_in(z.movedim(cdim, -1)).reshape(-1, 4).detach()
    codebook = vq.quantizer.embeddings.weight.detach()
    expected, _ = reference.nearest_code(rows, codebook)
    assert torch.equal(indices.reshape(-1), expected)
    with torch.no_grad():
        manual = vq.project_out(codebook[expected]).reshape(*z.movedim(cdim, -1).shape).movedim(-1, cdim)
    torch.testing.assert_close(z_q, manual)
    torch.testing.assert_close(loss, 1.25 * (codebook[expected] - rows).pow(2).mean())
    assert torch.equal(vq.encode(z), indices)
    torch.testing.assert_close(vq.decode(indices), z_q)


def test_gradients_reach_both_projections_the_codebook_and_z(device):
    torch.manual_seed(1)
    vq = ProjectedVectorQuantizer(16, 10, 3, dead_code_threshold=0.0).to(device)
    z = torch.randn(20, 10, device=device, requires_grad=True)
    z_q, loss, _ = vq(z)
    (z_q.sum() + loss).backward()
    for name, t in (("z", z), ("project_in", vq.project_in.weight), ("project_out", vq.project_out.weight),
                    ("codebook", vq.quantizer.embeddings.weight)):
        assert t.grad is not None and bool(t.grad.abs().sum() > 0), name
    # Straight through the quantizer: z's gradient from z_q alone is project_in^T project_out^T 1.
    z.grad = None
    z_q, _, _ = vq(z)
    z_q.sum().backward()
    w_in, w_out = vq.project_in.weight.detach(), vq.project_out.weight.detach()
    expected = (torch.ones(20, 10, device=device) @ w_out @ w_in)
    torch.testing.assert_close(z.grad, expected)


def test_masked_rows_keep_z_and_index_minus_one(device):
    torch.manual_seed(2)
    vq = ProjectedVectorQuantizer(16, 6, 2, heads=2).to(device)
    z = torch.randn(2, 5, 6, device=device, requires_grad=True)
    mask = torch.tensor([[True, True, False, True, False], [False, True, True, True, True]], device=device)
    z_q, loss, indices = vq(z, mask=mask)
    assert indices.shape == (2, 5, 2)
    assert bool((indices[~mask] == -1).all()) and bool((indices[mask] >= 0).all())
    assert torch.equal(z_q[~mask], z[~mask])
    z_q.sum().backward()
    assert torch.equal(z.grad[~mask], torch.ones_like(z[~mask]))  # padding passes its gradient through
    decoded = vq.decode(indices)
    assert decoded.shape == z.shape
    torch.testing.assert_close(decoded[mask], z_q[mask].detach())


def test_bad_options_and_inputs_are_refused():
    with pytest.raises(ValueError, match="codebook_dim"):
        ProjectedVectorQuantizer(8, 4, 0)
    with pytest.raises(TypeError, match="embedding_dim"):
        ProjectedVectorQuantizer(8, 4.0, 2)
    with pytest.raises(ValueError, match="metric"):
        ProjectedVectorQuantizer(8, 4, 2, metric="dot")  # (the quantizer's own options are checked by it)
    vq = ProjectedVectorQuantizer(8, 4, 2)
    with pytest.raises(ValueError, match="5 channels at dim 1, expected embedding_dim=4"):
        vq(torch.randn(2, 5, 3, 3))
    with pytest.raises(TypeError, match="floating-point"):
        vq(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="out of range"):
        ProjectedVectorQuantizer(8, 4, 2, channel_dim=3)(torch.randn(2, 4))
    assert "codebook_dim=2" in repr(vq) and vq.num_embeddings == 8 and vq.heads == 1


def test_padding_of_nan_reaches_neither_projection_and_inference_masks_work(device):
    torch.manual_seed(3)
    vq = ProjectedVectorQuantizer(16, 6, 4).to(device)
    z = torch.randn(2, 5, 6, device=device)
    with torch.inference_mode():
        mask = torch.tensor([[True, True, False, True, False], [False, True, True, True, True]], device=device)
    z[~mask] = float("nan")
    z.requires_grad_(True)
    z_q, loss, indices = vq(z, mask=mask)
    keep = mask.clone()  # (the layer takes the inference-mode mask; the test's own indexing cannot)
    (z_q[keep].sum() + loss).backward()
    for name, t in (("project_in", vq.project_in.weight), ("project_out", vq.project_out.weight),
                    ("codebook", vq.quantizer.embeddings.weight)):
        assert bool(torch.isfinite(t.grad).all()), name
    assert bool((indices[~keep] == -1).all()) and bool(torch.isfinite(z_q[keep]).all())
    assert torch.equal(vq.encode(z.detach(), mask=mask), torch.where(mask, vq.eval().encode(z.detach().nan_to_num()), -1))


def test_layouts_of_z_q_decode_and_mask_errors_follow_zs():
    torch.manual_seed(4)
    vq = ProjectedVectorQuantizer(16, 12, 4).eval()
    z = torch.randn(2, 12, 3, 5)
    z_q, _, indices = vq(z)
    assert z_q.is_contiguous() and z_q.view(2, -1).shape == (2, 180)  # (callers of a drop-in layer may .view())
    heads = ProjectedVectorQuantizer(16, 12, 3, channel_dim=1, heads=2).eval()
    seq = torch.randn(2, 12, 9)
    z_q, _, indices = heads(seq)
    assert indices.shape == (2, 9, 2)
    torch.testing.assert_close(heads.decode(indices), z_q)
    with pytest.raises(ValueError, match=r"z \(2, 12, 9\), channels at dim 1"):
        heads(seq, mask=torch.ones(2, 12, dtype=torch.bool))
