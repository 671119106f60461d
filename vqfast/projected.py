"""Vector quantization in a smaller space than the data's: a linear map down to the codebook's dimension,
a :class:`vqfast.VectorQuantizer` there, and a linear map back (factorised codes, as in ViT-VQGAN;
vector-quantize-pytorch's ``codebook_dim``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vqfast import reference
from vqfast._checks import check_int
from vqfast.layer import VectorQuantizer, _channel_dim_for, _checked_input


class ProjectedVectorQuantizer(nn.Module):
    """A :class:`VectorQuantizer` of ``num_embeddings`` codes of ``codebook_dim`` that quantizes data of
    ``embedding_dim`` channels through two linear maps. Plain PyTorch for one step::

        zc = project_in(z)               # nn.Linear(embedding_dim, heads * codebook_dim), on the channels
        qc, loss, indices = vq(zc)       # vq = VectorQuantizer(num_embeddings, codebook_dim, heads=heads)
        z_q = project_out(qc)            # nn.Linear(heads * codebook_dim, embedding_dim)

    The search, the losses (so the commitment term trains ``project_in``) and the codebook's upkeep run
    in the small space, on ``self.quantizer``; ``project_out`` learns from z_q's gradient, which
    reaches ``project_in`` and ``z`` through the quantizer as its ``gradient`` option says (straight
    through by default). A small codebook dimension (8 to
    32, often with ``metric="cosine"``) keeps large codebooks in use and makes the search cheap.

    ``forward(z, mask=None)`` returns ``(z_q, loss, indices)`` in z's layout, as the layer does: channels
    at dim 1 for inputs of 4 or more dimensions, last otherwise, or at ``channel_dim``. Rows that
    ``mask`` leaves out keep ``z_q = z`` (with its gradient; in z_q's dtype, e.g. bf16 under autocast,
    where ``project_out`` gives bf16) and index -1, and reach neither projection
    (NaN padding leaves their gradients finite). ``encode(z, mask=None)`` gives forward's indices in
    eval mode; ``decode(indices)`` the ``z_q`` they stand for (``project_out`` of the codes; zeros for
    index -1 go through it too). Every other option goes to the :class:`VectorQuantizer`
    (``beta``, ``metric``, ``ema``, ``dead_code_threshold``, ``heads``, ...); its statistics and
    codebook methods (``codebook_usage()``, ``set_codebook()``) are on ``self.quantizer``. z is in the
    projections' dtype (as for any ``nn.Linear``; autocast casts it).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, codebook_dim: int, channel_dim: int | None = None,
                 **quantizer_options: Any) -> None:
        super().__init__()
        self.embedding_dim = check_int(embedding_dim, "embedding_dim", minimum=1)
        self.codebook_dim = check_int(codebook_dim, "codebook_dim", minimum=1)
        self.channel_dim = None if channel_dim is None else check_int(channel_dim, "channel_dim")
        # Channels last in the small space, whatever z's layout (the projections work on the last dim).
        self.quantizer = VectorQuantizer(num_embeddings, self.codebook_dim, channel_dim=-1, **quantizer_options)
        width = self.quantizer.heads * self.codebook_dim
        self.project_in = nn.Linear(self.embedding_dim, width)
        self.project_out = nn.Linear(width, self.embedding_dim)

    @property
    def num_embeddings(self) -> int:
        return self.quantizer.num_embeddings

    @property
    def heads(self) -> int:
        return self.quantizer.heads

    def _channel_dim(self, z: Tensor, mask: Tensor | None = None) -> int:
        """Where z's channels are, as :class:`VectorQuantizer` finds them; checks z's type and width, and
        ``mask`` against z."""
        return _checked_input(z, mask, self.channel_dim, self.embedding_dim, f"embedding_dim={self.embedding_dim}")

    def forward(self, z: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Quantize ``z`` in the codebook's space; returns ``(z_q, loss, indices)`` (see the class docstring)."""
        cdim = self._channel_dim(z, mask)
        z_last = z.movedim(cdim, -1)
        if mask is None:
            q_small, loss, indices = self.quantizer(self.project_in(z_last))
            z_q = self.project_out(q_small)
        else:
            # (A copy that autograd may save: a mask made under inference mode cannot be.)
            (kept,) = reference.saveable(mask.unsqueeze(-1))
            # Padding reaches neither projection: NaN there would make their weights' gradients NaN.
            q_small, loss, indices = self.quantizer(self.project_in(torch.where(kept, z_last, 0.0)), mask=mask)
            z_q = self.project_out(q_small)
            z_q = torch.where(kept, z_q, z_last.to(z_q.dtype))
        z_q = z_q.movedim(-1, cdim)
        # Channels-first z gives channels-last rows; callers of a drop-in layer may .view() z_q.
        return (z_q.contiguous() if z.is_contiguous() else z_q), loss, indices

    @torch.no_grad()
    def encode(self, z: Tensor, mask: Tensor | None = None) -> Tensor:
        """The indices :meth:`forward` gives for ``z`` in eval mode, from the search alone (see
        :meth:`VectorQuantizer.encode`). Plain PyTorch: ``vq.encode(project_in(z))``."""
        cdim = self._channel_dim(z, mask)
        z_last = z.movedim(cdim, -1)
        if mask is not None:
            z_last = torch.where(mask.unsqueeze(-1), z_last, 0.0)
        return self.quantizer.encode(self.project_in(z_last), mask=mask)

    def decode(self, indices: Tensor, check_indices: bool = True) -> Tensor:
        """The ``z_q`` that :meth:`forward` gives for these indices, in its layout: channels at dim 1 for
        indices of 3 or more position dimensions (with ``heads`` > 1 the last dimension of indices is
        not one), or at ``channel_dim``; last otherwise. Plain PyTorch: ``project_out(codebook[indices])``.
        Index -1 decodes to ``project_out`` of zeros, its bias."""
        codes = self.quantizer.codes_from_indices(indices, check_indices=check_indices,
                                                  dtype=self.project_out.weight.dtype)
        z_q = self.project_out(codes)
        positions = indices.dim() - (self.heads > 1)
        cdim = _channel_dim_for(self.channel_dim, positions + 1, f"codes from indices of shape {tuple(indices.shape)}")
        return z_q.movedim(-1, cdim).contiguous()

    def extra_repr(self) -> str:
        return f"embedding_dim={self.embedding_dim}, codebook_dim={self.codebook_dim}, channel_dim={self.channel_dim}"
