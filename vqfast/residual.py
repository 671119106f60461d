"""Residual vector quantization: a stack of :class:`vqfast.VectorQuantizer` layers, each quantizing what
the previous ones left (as in SoundStream and EnCodec audio codecs)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from vqfast import reference
from vqfast._checks import check_bool, check_int, check_number, host_values
from vqfast.functional import rotate_to_codes
from vqfast.layer import GRADIENTS, VectorQuantizer


class ResidualVectorQuantizer(nn.Module):
    """``num_quantizers`` VectorQuantizers in a chain: the first quantizes ``z``, each next one the
    residual ``z - (sum of the codes so far)``, and ``z_q`` is the sum of all the codes.

    Plain PyTorch for one step::

        r = z; q_sum = 0; loss = 0
        for vq in quantizers:
            q, l, i = vq(r)            # each stage: its own codebook loss, and commitment of r to q
            q_sum = q_sum + q.detach(); r = r - q.detach(); loss = loss + l
        z_q = z + (q_sum - z).detach() # straight through, as one step

    ``forward(z, num_quantizers=None, mask=None)`` returns ``(z_q, loss, indices)`` (with ``heads=H``
    among the stages' options, indices end in (H, num_quantizers)): ``z_q`` in z's layout and
    dtype, whose value is the sum of the codes (summed in fp32 at least, then cast) and whose gradient
    goes to ``z`` once, unchanged (as in EnCodec, where vector-quantize-pytorch's ``ResidualVQ`` passes
    it once per stage); ``loss`` the sum of the stages' losses, every stage's commitment term reaching
    ``z`` through its residual (as in vector-quantize-pytorch, where EnCodec's later stages commit
    nothing to the encoder); ``indices`` int64 shaped like z without its channel dimension plus a last
    dimension of the layer's ``num_quantizers``. The ``num_quantizers`` argument (at most the layer's)
    runs only the first stages, e.g. for a lower bitrate at inference; the indices of stages not run
    are -1.
    ``quantizer_dropout``: in training, the probability that a batch (the whole batch, not each
    sample) uses only the first n stages, n drawn uniformly from 1 to ``num_quantizers``
    (SoundStream's quantizer dropout, so that one model serves every bitrate); the loss is then the
    sum over those n stages. n is drawn on the host from a generator of the layer's own, seeded with
    ``dropout_seed`` and kept in its state dict, so every rank of a distributed run draws the same n
    (the stages synchronise their statistics) and a resumed run draws what it would have. Stages left
    out get no gradient: under DistributedDataParallel pass ``find_unused_parameters=True``. The draw
    is a graph break under ``torch.compile`` (and each n its own graph), so ``fullgraph=True`` needs
    ``quantizer_dropout=0`` or eval mode.
    ``gradient="rotation"`` rotates z_q's gradient the way ``z`` is carried onto the sum of its codes
    (:func:`vqfast.rotate_to_codes`) instead of passing it straight through.
    Every other keyword argument (``beta``, ``ema``, ``init``, ``dead_code_threshold``, ``metric``,
    ``precision``, ``channel_dim``, ...) goes to each stage; the stages are ``self.quantizers``. With
    ``init="kmeans"`` a stage pools its rows only once the stages before it are initialised (from the
    batch in which the last of them runs k-means), so it clusters the residuals of their k-means codes.
    """

    def __init__(self, num_quantizers: int, num_embeddings: int, embedding_dim: int, *,
                 quantizer_dropout: float = 0.0, dropout_seed: int = 0, **vq_kwargs: Any) -> None:
        super().__init__()
        num_quantizers = check_int(num_quantizers, "num_quantizers", minimum=1)
        self.quantizer_dropout = check_number(quantizer_dropout, "quantizer_dropout", minimum=0.0)
        if self.quantizer_dropout > 1.0:
            raise ValueError(f"quantizer_dropout must be a probability in [0, 1], got {quantizer_dropout}")
        self.num_quantizers = num_quantizers
        # The chain's own: z_q's gradient reaches z once, from the sum of the codes (the stages' own
        # z_q gradients are not used).
        self.gradient = vq_kwargs.pop("gradient", "straight_through")
        if self.gradient not in GRADIENTS:
            raise ValueError(f"gradient must be one of {GRADIENTS}, got {self.gradient!r}")
        self.quantizers = nn.ModuleList(VectorQuantizer(num_embeddings, embedding_dim, **vq_kwargs)
                                        for _ in range(num_quantizers))
        seed = check_int(dropout_seed, "dropout_seed", minimum=0)
        if seed >= 2**64:  # what torch.Generator.manual_seed takes
            raise ValueError(f"dropout_seed must be below 2**64, got {seed}")
        self._dropout_generator = torch.Generator(device="cpu").manual_seed(seed)
        if seed != 0 and self.quantizer_dropout == 0.0:
            warnings.warn(f"ResidualVectorQuantizer: dropout_seed={seed} has no effect without a positive "
                          "quantizer_dropout", UserWarning, stacklevel=2)

    def _stages_for(self, num_quantizers: int | None) -> tuple[int, Tensor | None]:
        """The number of stages to run, and the dropout generator's state before a draw (None: no draw)."""
        if num_quantizers is not None:
            n = check_int(num_quantizers, "num_quantizers", minimum=1)
            if n > self.num_quantizers:
                raise ValueError(f"num_quantizers must be at most the layer's {self.num_quantizers}, got {n}")
            return n, None
        if self.training and self.quantizer_dropout > 0.0:
            before = self._dropout_generator.get_state()
            # A CPU generator: no device sync (and a CPU draw under torch.set_default_device("cuda") too).
            draw = torch.rand((), generator=self._dropout_generator, device="cpu")
            n = torch.randint(1, self.num_quantizers + 1, (), generator=self._dropout_generator, device="cpu")
            return (int(n) if float(draw) < self.quantizer_dropout else self.num_quantizers), before
        return self.num_quantizers, None

    def forward(self, z: Tensor, num_quantizers: int | None = None, mask: Tensor | None = None,
                ) -> tuple[Tensor, Tensor, Tensor]:
        """Quantize ``z`` with the first ``num_quantizers`` stages (all by default; see the class docstring).
        ``mask`` (bool, shaped like z without its channel dimension, False for padding) goes to every
        stage: rows left out get ``z_q = z`` and index -1 at every stage, and take no part in the losses
        or the statistics."""
        self.quantizers[0]._checked_channel_dim(z, mask)
        if mask is not None and torch.is_grad_enabled():
            (mask,) = reference.saveable(mask)  # (the selections below save it for their backward)
        if (num_quantizers is None and self.training and self.quantizer_dropout > 0.0
                and any(vq.training for vq in self.quantizers) and torch._C._are_functorch_transforms_active()):
            # Before the dropout draw, which vmap would refuse with advice that training stages then refuse.
            self.quantizers[0]._refuse_transformed_training(z)
        stages, before_draw = self._stages_for(num_quantizers)
        if before_draw is None:
            return self._quantize_stages(z, stages, mask)
        try:
            return self._quantize_stages(z, stages, mask)
        except BaseException:
            # A call that fails (on a device mismatch, say) uses up no draw: the draws of a resumed run,
            # and of the other ranks, would no longer match.
            self._dropout_generator.set_state(before_draw)
            raise

    def _quantize_stages(self, z: Tensor, stages: int, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        # In fp32 at least: 16-bit residuals and sums would round away what later stages refine.
        residual = z.to(torch.promote_types(z.dtype, torch.float32)) if z.is_floating_point() else z
        codes_sum = loss = None
        indices = []
        earlier_pending = False
        for vq in self.quantizers[:stages]:
            # k-means of a stage must see the residuals of the earlier stages' k-means codes.
            vq._kmeans_paused = earlier_pending
            try:
                z_q, stage_loss, stage_indices = vq(residual, mask=mask)
            finally:
                vq._kmeans_paused = False  # (for calls of the stage on its own)
            earlier_pending = earlier_pending or vq._needs_init
            codes = z_q.detach()  # the value of each stage's output is its code
            codes_sum = codes if codes_sum is None else codes_sum + codes
            loss = stage_loss if loss is None else loss + stage_loss
            residual = residual - codes
            indices.append(stage_indices)
        if stages < self.num_quantizers:
            unused = torch.full_like(indices[0], -1)
            indices += [unused] * (self.num_quantizers - stages)
        codes_sum = codes_sum.to(z.dtype)
        cdim = self.quantizers[0]._channel_dim(z)
        if mask is not None:
            # Padding: z itself (the stages' sum is z there only for finite padding: inf - inf is NaN).
            codes_sum = torch.where(mask.unsqueeze(cdim), codes_sum, z)
        if self.gradient == "rotation":
            # Each head's vector onto its own codes (one head: the position's whole vector).
            heads = self.quantizers[0].heads
            z_last, codes_last = z.movedim(cdim, -1), codes_sum.movedim(cdim, -1)
            rotated = rotate_to_codes(z_last.unflatten(-1, (heads, -1)), codes_last.unflatten(-1, (heads, -1)))
            z_q = rotated.flatten(-2).movedim(-1, cdim)
            if mask is not None:
                # Padding: z, gradient included (a rotation of z onto itself is the identity only
                # up to rounding).
                z_q = torch.where(mask.unsqueeze(cdim), z_q, z)
        else:
            # The sum of the codes exactly, gradient straight to z (z + (codes - z).detach() would round it).
            z_q = reference.straight_through(z, codes_sum)
        return z_q, loss, torch.stack(indices, dim=-1)

    @torch.no_grad()
    def encode(self, z: Tensor, num_quantizers: int | None = None, mask: Tensor | None = None) -> Tensor:
        """The indices :meth:`forward` gives for ``z`` in eval mode (all stages, or the first
        ``num_quantizers``; -1 for stages not run and rows ``mask`` leaves out), without changing any
        state: no statistics, k-means, restarts, EMA updates or dropout draw, in training mode too."""
        # Each module's own mode is restored: a stage put in eval mode on its own stays there.
        modes = [(m, m.training) for m in self.modules()]
        self.train(False)
        try:
            return self(z, num_quantizers=num_quantizers, mask=mask)[2]
        finally:
            for m, training in modes:
                m.training = training

    def codes_from_indices(self, indices: Tensor, check_indices: bool = True,
                           dtype: torch.dtype | None = None) -> Tensor:
        """The ``z_q`` values :meth:`forward` gives for ``indices`` (..., S): the sum of the codes of the
        first S stages (S at most the layer's num_quantizers: tokens of a lower bitrate may keep only
        the stages they used), -1 marking an unused stage (rows a mask left out, -1 at every stage,
        decode to zeros, where forward gave z); in the stages' layout and the codebooks'
        dtype (float32: for fp32, fp16 and bf16 z, forward's ``z_q`` is this cast to z's dtype), or in
        ``dtype`` when given, differentiable with respect to the codebooks. Other indices outside [0, K)
        raise ValueError (a host-side check that ``check_indices=False`` skips on the GPU, as in
        :func:`vqfast.gather`)."""
        check_indices = check_bool(check_indices, "check_indices")
        if not isinstance(indices, Tensor):
            raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        if indices.dim() < 2 or not 1 <= indices.shape[-1] <= self.num_quantizers:
            raise ValueError(f"indices must end in a dimension of at most num_quantizers={self.num_quantizers} "
                             f"stages (unused stages may be -1), got shape {tuple(indices.shape)}")
        if ((check_indices or indices.device.type != "cuda") and not torch.compiler.is_compiling()
                and indices.numel() and not indices.is_meta):
            lowest = int(host_values(indices).min())
            if lowest < -1:
                raise ValueError(f"indices must be -1 (an unused stage) or lie in [0, K), got {lowest}")
        total = None
        for stage, vq in enumerate(self.quantizers[:indices.shape[-1]]):
            # (Each stage decodes -1 to zeros.)
            codes = vq.codes_from_indices(indices[..., stage], check_indices=check_indices)
            total = codes if total is None else total + codes
        return total if dtype is None else total.to(dtype)

    def codebook_usage(self) -> list[dict[str, Any]]:
        """Each stage's :meth:`VectorQuantizer.codebook_usage`, in order."""
        return [vq.codebook_usage() for vq in self.quantizers]

    def get_extra_state(self) -> Tensor:
        """The quantizer-dropout generator's state (a uint8 tensor), saved as ``_extra_state``."""
        return self._dropout_generator.get_state()

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, Tensor):
            raise ValueError(f"_extra_state must be the dropout generator's state, a uint8 tensor; got {type(state).__name__}")
        expected = self._dropout_generator.get_state().shape
        if state.shape != expected:
            raise ValueError(f"_extra_state must be the dropout generator's state, shaped {tuple(expected)}; "
                             f"got {tuple(state.shape)}")
        # (A checkpoint loaded onto a GPU, or converted, still gives the generator its CPU bytes.)
        self._dropout_generator.set_state(state.to("cpu", torch.uint8))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # A state dict saved without the generator (e.g. by hand from the stages) keeps the current one.
        state_dict.setdefault(prefix + "_extra_state", self.get_extra_state())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        text = f"num_quantizers={self.num_quantizers}, quantizer_dropout={self.quantizer_dropout}"
        return text + (f", gradient={self.gradient!r}" if self.gradient != "straight_through" else "")
