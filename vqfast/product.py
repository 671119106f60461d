"""Product quantization: each position's channels split into groups, each group quantized with a
codebook of its own (wav2vec 2.0's grouped codebooks; vector-quantize-pytorch's separate codebook per
head)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vqfast._checks import check_bool, check_int
from vqfast.layer import VectorQuantizer, _checked_input


class ProductVectorQuantizer(nn.Module):
    """``groups`` VectorQuantizers side by side: each position's ``groups * embedding_dim`` channels are
    ``groups`` consecutive slices of ``embedding_dim``, slice g quantized by ``self.quantizers[g]``
    with its own codebook, statistics, restarts and k-means. ``groups`` codebooks of K codes name
    K ** groups distinct vectors, where one layer with ``heads=groups`` shares a single codebook
    among the slices.

    Plain PyTorch for one step::

        parts = z.split(embedding_dim, dim=channel_dim)
        outs = [vq(part) for vq, part in zip(quantizers, parts)]
        z_q = torch.cat([o[0] for o in outs], dim=channel_dim)
        loss = torch.stack([o[1] for o in outs]).mean()
        indices = torch.stack([o[2] for o in outs], dim=-1)

    ``forward(z, mask=None)`` returns ``(z_q, loss, indices)``: ``z_q`` in z's layout and dtype, each
    slice's value its code and its gradient each group's own (straight through, or rotated with
    ``gradient="rotation"``); ``loss`` the mean of the groups' losses (with the default losses, the
    same mean over all channels as one layer's); ``indices`` int64 shaped like z without its channel
    dimension plus a last dimension of ``groups``. ``mask`` (bool, z's shape without the channels,
    False for padding) goes to every group: rows left out keep ``z_q = z`` and index -1 in every group.
    Every keyword argument besides ``groups`` (``beta``, ``ema``, ``init``, ``dead_code_threshold``,
    ``metric``, ``precision``, ``channel_dim``, ...) goes to each group's layer; ``heads`` above 1 is not
    taken (the groups are the heads, each with a codebook of its own). Each group's codebook methods
    (``set_codebook``, ``codebook_usage``) are on ``self.quantizers[g]``.
    """

    def __init__(self, groups: int, num_embeddings: int, embedding_dim: int, **vq_kwargs: Any) -> None:
        super().__init__()
        groups = check_int(groups, "groups", minimum=1)
        if vq_kwargs.get("heads", 1) != 1:
            raise TypeError("ProductVectorQuantizer takes no heads: its groups are heads with a codebook each "
                            "(for heads sharing one codebook, use VectorQuantizer(heads=...))")
        self.groups = groups
        self.quantizers = nn.ModuleList(VectorQuantizer(num_embeddings, embedding_dim, **vq_kwargs)
                                        for _ in range(groups))

    @property
    def embedding_dim(self) -> int:
        """The channels of one group (of each code)."""
        return self.quantizers[0].embedding_dim

    def _checked_channel_dim(self, z: Tensor, mask: Tensor | None) -> int:
        first = self.quantizers[0]
        return _checked_input(z, mask, first.channel_dim, self.groups * first.embedding_dim,
                              f"groups * embedding_dim = {self.groups} * {first.embedding_dim}")

    def forward(self, z: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Quantize each group of ``z``'s channels with its own codebook (see the class docstring)."""
        cdim = self._checked_channel_dim(z, mask)
        outs = [vq(part, mask=mask) for vq, part in zip(self.quantizers, z.split(self.embedding_dim, dim=cdim))]
        z_q = torch.cat([out[0] for out in outs], dim=cdim)
        if z.is_contiguous():
            # (cat keeps the groups' layout, channels last for (B, C, H, W): callers of a drop-in layer view it.)
            z_q = z_q.contiguous()
        loss = torch.stack([out[1] for out in outs]).mean()
        return z_q, loss, torch.stack([out[2] for out in outs], dim=-1)

    @torch.no_grad()
    def encode(self, z: Tensor, mask: Tensor | None = None) -> Tensor:
        """The indices :meth:`forward` gives for ``z`` in eval mode (-1 where ``mask`` is False), without
        changing any state (each group's :meth:`VectorQuantizer.encode`)."""
        cdim = self._checked_channel_dim(z, mask)
        parts = z.split(self.embedding_dim, dim=cdim)
        return torch.stack([vq.encode(part, mask=mask) for vq, part in zip(self.quantizers, parts)], dim=-1)

    def codes_from_indices(self, indices: Tensor, check_indices: bool = True,
                           dtype: torch.dtype | None = None) -> Tensor:
        """The ``z_q`` values :meth:`forward` gives for ``indices`` (..., groups): each group's codes
        (:meth:`VectorQuantizer.codes_from_indices`, -1 decoding to zeros) side by side in forward's
        layout; float32 (the codebooks' dtype), or ``dtype`` when given; differentiable with respect to
        the codebooks."""
        check_indices = check_bool(check_indices, "check_indices")
        if not isinstance(indices, Tensor):
            raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
        if indices.dim() < 2 or indices.shape[-1] != self.groups:
            raise ValueError(f"indices must end in a dimension of groups={self.groups}, got shape "
                             f"{tuple(indices.shape)}")
        # Indices of P positions and a group each decode to P + 1 dimensions, as z had.
        cdim = self.quantizers[0]._channel_dim_of(indices.dim(), f"codes from indices of shape {tuple(indices.shape)}")
        codes = [vq.codes_from_indices(indices[..., g], check_indices=check_indices, dtype=dtype)
                 for g, vq in enumerate(self.quantizers)]
        return torch.cat(codes, dim=cdim)

    def codebook_usage(self) -> list[dict[str, Any]]:
        """Each group's :meth:`VectorQuantizer.codebook_usage`, in order."""
        return [vq.codebook_usage() for vq in self.quantizers]

    def extra_repr(self) -> str:
        return f"groups={self.groups}"
