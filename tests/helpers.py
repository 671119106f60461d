"""Checks shared by the tests: the precision rule of the README ("Precision"), computed in float64."""

from __future__ import annotations

import torch


def fp64_distances(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Full (N, K) squared distances in float64, on the CPU (keep N x K moderate).

    Small problems use exact differences; large ones the expanded form on the inputs' device, whose
    float64 rounding (~1e-16 relative) is far below every tolerance used with it.
    """
    n, k, d = z.shape[0], codebook.shape[0], codebook.shape[1]
    if n * k * d <= 1 << 24:
        z64 = z.detach().double().cpu()
        c64 = codebook.detach().double().cpu()
        return ((z64[:, None, :] - c64[None, :, :]) ** 2).sum(-1)
    z64 = z.detach().double()
    c64 = codebook.detach().double()
    d2 = (z64 * z64).sum(1, keepdim=True) + (c64 * c64).sum(1) - 2.0 * z64 @ c64.t()
    return d2.clamp_min(0).cpu()


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
