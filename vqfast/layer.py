"""``VectorQuantizer``: a drop-in VQ layer on the fused ops."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vqfast.functional import quantize

__all__ = ["VectorQuantizer"]


class VectorQuantizer(nn.Module):
    """Vector quantization with straight-through gradients.

    ``forward(z)`` takes (B, C, H, W) (channels at ``channel_dim=1``, as in conv nets), (B, N, C) or
    (N, C) (channels last) and returns ``(z_q, loss, indices)`` in the input's layout: z_q has the
    value of the nearest code and passes gradients straight to z; ``loss = mse(q, sg(z)) +
    beta * mse(z, sg(q))``; indices are int64 with the channel dimension removed. The codebook is
    ``self.embeddings`` (an ``nn.Embedding``), so its weights move by name (``embeddings.weight``).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        beta: float = 0.25,
        channel_dim: int | None = None,
        metric: str = "l2",
        init: str = "xavier_normal",
    ) -> None:
        super().__init__()
        if num_embeddings < 1 or embedding_dim < 1:
            raise ValueError(f"num_embeddings and embedding_dim must be >= 1, got {num_embeddings}, {embedding_dim}")
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.beta = float(beta)
        self.channel_dim = channel_dim
        self.metric = metric
        self.embeddings = nn.Embedding(num_embeddings, embedding_dim)
        if init == "xavier_normal":
            nn.init.xavier_normal_(self.embeddings.weight)
        elif init == "uniform":
            nn.init.uniform_(self.embeddings.weight, -1.0 / num_embeddings, 1.0 / num_embeddings)
        else:
            raise ValueError(f"init must be 'xavier_normal' or 'uniform', got {init!r}")

    def _channel_dim(self, z: Tensor) -> int:
        if self.channel_dim is not None:
            return self.channel_dim % z.dim()
        return 1 if z.dim() == 4 else z.dim() - 1

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if z.dim() < 2:
            raise ValueError(f"z must have a batch and a channel dimension, got shape {tuple(z.shape)}")
        cdim = self._channel_dim(z)
        if z.shape[cdim] != self.embedding_dim:
            raise ValueError(
                f"z has {z.shape[cdim]} channels at dim {cdim}, expected embedding_dim={self.embedding_dim} "
                f"(shape {tuple(z.shape)})"
            )
        z_last = z.movedim(cdim, -1)
        z_q, loss, indices = quantize(z_last, self.embeddings.weight, beta=self.beta, metric=self.metric)
        return z_q.movedim(-1, cdim), loss, indices

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, beta={self.beta}, metric={self.metric!r}"
