"""``encode``: the indices of a forward, from the search alone, with no change of state in training mode."""

from __future__ import annotations

import copy

import pytest
import torch

from vqfast import ResidualVectorQuantizer, VectorQuantizer


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("shape,options", [((2, 4, 3, 5), dict()), ((2, 7, 4), dict(metric="cosine")),
                                           ((9, 4), dict(precision="fp32", ema=True)), ((3, 4, 6), dict(channel_dim=1))],
                         ids=["BCHW", "BNC-cosine", "NC-fp32-ema", "BCT"])
def test_encode_gives_forwards_indices_and_changes_nothing(device, shape, options):
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4, init="kmeans", **options).to(device)
    z = torch.randn(shape, device=device, requires_grad=True)
    before = _state(vq)
    indices = vq.encode(z)  # in training mode, before k-means ran
    assert vq.training and vq._needs_init and vq.kmeans_pool.shape[0] == 0
    for key, value in _state(vq).items():
        assert torch.equal(value, before[key]), key
    assert not indices.requires_grad and indices.dtype == torch.int64
    assert torch.equal(indices, copy.deepcopy(vq).eval()(z)[2])
    mask = torch.rand(indices.shape, generator=torch.Generator().manual_seed(1)).to(device) < 0.5
    assert torch.equal(vq.encode(z, mask=mask), torch.where(mask, indices, -1))
    with pytest.raises(ValueError, match="channels"):
        vq.encode(torch.randn(2, 5, device=device))


def test_residual_encode_gives_eval_forwards_indices_and_changes_nothing(device):
    torch.manual_seed(1)
    rvq = ResidualVectorQuantizer(3, 16, 4, channel_dim=1, quantizer_dropout=1.0).to(device)
    z = torch.randn(2, 4, 6, device=device)
    rvq(z)  # a training step, so that the state is not the initial one
    before, generator = _state(rvq), rvq.get_extra_state().clone()
    indices = rvq.encode(z)
    assert rvq.training and torch.equal(rvq.get_extra_state(), generator)  # no dropout draw
    for key, value in _state(rvq).items():
        assert torch.equal(value, before[key]), key
    assert torch.equal(indices, copy.deepcopy(rvq).eval()(z)[2])
    assert bool((rvq.encode(z, num_quantizers=2)[..., 2] == -1).all())
