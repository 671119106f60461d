"""Checks shared by the tests: the precision rule of the README ("Precision"), computed in float64."""

from __future__ import annotations

import os
from importlib.util import find_spec

import torch


def triton_usable() -> bool:
    """Whether the Triton backend can run here: on a GPU, or through the interpreter (conftest.py sets
    TRITON_INTERPRET=1 without one)."""
    if find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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


def near_tie_rows(c, ties, triples, g):
    """Rows just off the midpoint of two random codes ``a`` and ``b``, nearer to ``a``; and rows just off
    the point equally far from three codes ``three`` (one triple per row), nearer to the first."""
    k = c.shape[0]
    a = torch.randint(0, k, (ties,), generator=g)
    b = (a + 1 + torch.randint(0, k - 1, (ties,), generator=g)) % k
    pairs = 0.5 * (c[a] + c[b]) + 1e-5 * (c[a] - c[b])
    three = torch.randperm(k, generator=g)[: 3 * triples].view(triples, 3)
    p, q, r = (c[three[:, i]].double() for i in range(3))
    # The point p + x (q - p) + y (r - p) equally far from p, q and r: a 2 x 2 linear system per row.
    u, v = q - p, r - p
    gram = torch.stack([torch.stack([(u * u).sum(1), (u * v).sum(1)], 1),
                        torch.stack([(u * v).sum(1), (v * v).sum(1)], 1)], 1)
    xy = torch.linalg.solve(gram, 0.5 * torch.stack([(u * u).sum(1), (v * v).sum(1)], 1))
    centre = p + xy[:, :1] * u + xy[:, 1:] * v
    return a, b, pairs, three, (centre + 1e-5 * (p - centre)).float()


def assert_compiled_steps_match(layer: torch.nn.Module, z: torch.Tensor, mask: torch.Tensor | None = None,
                                steps: int = 2) -> None:
    """``torch.compile(fullgraph=True)`` of a copy of ``layer`` gives the eager training forwards' outputs
    (the same random draws: each step seeds both runs alike) and ends with the same codebook."""
    import copy

    twin = copy.deepcopy(layer)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    kwargs = {} if mask is None else {"mask": mask}
    for step in range(steps):
        torch.manual_seed(10 + step)
        eager = layer(z, **kwargs)
        torch.manual_seed(10 + step)
        got = compiled(z, **kwargs)
        assert torch.equal(got[2], eager[2]) and torch.equal(got[0], eager[0])
        torch.testing.assert_close(got[1], eager[1])
    torch.testing.assert_close(twin.embeddings.weight, layer.embeddings.weight)
