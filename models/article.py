"""The article's VQ step with its defects fixed, in plain PyTorch: the baseline vqfast is measured against.

Fixed as the README ("Differences from the article") describes: the distance is the squared difference
summed over D (the article takes a square root of signed differences), both losses come from the
gathered codes ``q``, and the straight-through step is ``z + (q - z).detach()`` (the article's form has
the value of ``z``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ArticleVQ", "search_broadcast", "search_matmul"]


def search_broadcast(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The article's search, fixed: squared differences summed over D (builds an N x K x D tensor)."""
    return ((z[:, None, :] - codebook[None, :, :]) ** 2).sum(-1).argmin(1)


def search_matmul(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """||c||^2 - 2 z.c, then argmin: ranks codes like the squared distance (||z||^2 is constant per row)."""
    return ((codebook * codebook).sum(1) - 2 * (z @ codebook.t())).argmin(1)


class ArticleVQ(nn.Module):
    """The article's ``vector_quantize`` + losses, fixed; a drop-in for ``vqfast.VectorQuantizer`` on
    (B, C, H, W) input, returning ``(z_q, loss, indices)``.

    ``search="broadcast"`` keeps the article's N x K x D distance tensor; ``"matmul"`` uses the
    ||c||^2 - 2 z.c form (an N x K matrix).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, beta: float = 1.0, search: str = "broadcast") -> None:
        super().__init__()
        if search not in ("broadcast", "matmul"):
            raise ValueError(f"search must be 'broadcast' or 'matmul', got {search!r}")
        self.beta = beta
        self.search = search
        self.embeddings = nn.Embedding(num_embeddings, embedding_dim)
        nn.init.xavier_normal_(self.embeddings.weight)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        find = search_broadcast if self.search == "broadcast" else search_matmul
        with torch.no_grad():
            indices = find(flat, self.embeddings.weight)
        q = self.embeddings(indices)
        loss = F.mse_loss(q, flat.detach()) + self.beta * F.mse_loss(flat, q.detach())
        z_q = flat + (q - flat).detach()
        return z_q.view(b, h, w, c).permute(0, 3, 1, 2), loss, indices.view(b, h, w)

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """The indices (B, H, W) :meth:`forward` gives for ``z``, from the search alone, like
        ``VectorQuantizer.encode`` (``ConvVQVAE.encode_indices`` calls it on either layer)."""
        b, c, h, w = z.shape
        find = search_broadcast if self.search == "broadcast" else search_matmul
        return find(z.permute(0, 2, 3, 1).reshape(-1, c), self.embeddings.weight).view(b, h, w)

    def codes_from_indices(self, indices: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The codes at ``indices`` (B, H, W) as (B, C, H, W), like ``VectorQuantizer.codes_from_indices``
        (an index outside [0, K) raises, as ``nn.Embedding`` does); in ``dtype`` if given."""
        codes = self.embeddings(indices).permute(0, 3, 1, 2)
        return codes if dtype is None else codes.to(dtype)
