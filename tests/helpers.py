"""Checks shared by the tests: the precision rule of DESIGN.md, computed in float64."""

from __future__ import annotations

import torch


def fp64_distances(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Full (N, K) squared distances in float64 (small test shapes only)."""
    z64 = z.detach().double().cpu()
    c64 = codebook.detach().double().cpu()
    return ((z64[:, None, :] - c64[None, :, :]) ** 2).sum(-1)


def chosen_gap(z: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """(d_chosen - d_min) / (||z||^2 + d_min) per row, in float64."""
    d = fp64_distances(z, codebook)
    d_min = d.min(1).values
    d_chosen = d.gather(1, indices.cpu().long()[:, None])[:, 0]
    znorm = (z.detach().double().cpu() ** 2).sum(1)
    return (d_chosen - d_min) / (znorm + d_min).clamp_min(1e-30)


def unambiguous_rows(z: torch.Tensor, codebook: torch.Tensor, rel_gap: float = 1e-4) -> torch.Tensor:
    """Rows whose best and second-best fp64 distances differ clearly (no near-ties)."""
    d = fp64_distances(z, codebook)
    if d.shape[1] < 2:
        return torch.ones(d.shape[0], dtype=torch.bool)
    two = d.topk(2, dim=1, largest=False).values
    scale = (z.detach().double().cpu() ** 2).sum(1) + two[:, 0]
    return (two[:, 1] - two[:, 0]) > rel_gap * scale.clamp_min(1e-30)
