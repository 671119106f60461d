"""Convolutional AE, VAE and VQ-VAE for 32 x 32 RGB images (CIFAR-10 sized).

The three models share one encoder trunk (three stride-2 4x4 convolutions, 3 -> 64 -> 128 -> 256
channels, 32x32 -> 4x4) and one decoder trunk (the mirror image with transposed convolutions and a
sigmoid output), so their sizes match the article's: 9,711,235 parameters for the AE with a 1,024-d
latent, 13,906,563 for the VAE and 1,907,715 for the VQ-VAE with 4,096 codes of 128 dimensions.

Every model offers the same training interface, :meth:`loss_terms`, which returns a dict with

* ``"loss"``: the scalar to back-propagate,
* ``"recon"``: the (detached) reconstruction,
* ``"sse"``: summed squared error over the batch (detached),
* ``"objective"``: the batch sum of the per-image quantity the article reports as "Average loss"
  (squared error, plus ``kl_weight`` x KL for the VAE),

plus model-specific entries (``"kl"`` for the VAE; ``"vq_loss"`` and ``"indices"`` for the VQ-VAE).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from vqfast._checks import check_int, check_number

__all__ = ["ConvAE", "ConvVAE", "ConvVQVAE", "build_model", "MODEL_NAMES", "count_parameters"]

_FEATURES = 256 * 4 * 4  # channels x spatial size at the encoder's output


def _encoder_trunk() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=4, stride=2, padding=1),  # 32 -> 16
        nn.ReLU(),
        nn.Conv2d(64, 128, kernel_size=4, stride=2, padding=1),  # 16 -> 8
        nn.ReLU(),
        nn.Conv2d(128, 256, kernel_size=4, stride=2, padding=1),  # 8 -> 4
        nn.ReLU(),
    )


def _decoder_trunk() -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(256, 128, kernel_size=4, stride=2, padding=1),  # 4 -> 8
        nn.ReLU(),
        nn.ConvTranspose2d(128, 64, kernel_size=4, stride=2, padding=1),  # 8 -> 16
        nn.ReLU(),
        nn.ConvTranspose2d(64, 3, kernel_size=4, stride=2, padding=1),  # 16 -> 32
        nn.Sigmoid(),
    )


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``model``."""
    return sum(p.numel() for p in model.parameters())


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 at least (float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _sse(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # float32 even under bf16 autocast: the summed error over a batch loses digits in bf16.
    return F.mse_loss(_wide(recon), _wide(x), reduction="sum")


class ConvAE(nn.Module):
    """Plain convolutional autoencoder with a fully connected ``latent_dim`` bottleneck."""

    kind = "ae"

    def __init__(self, latent_dim: int = 1024) -> None:
        super().__init__()
        self.latent_dim = latent_dim = check_int(latent_dim, "latent_dim", minimum=1)
        self.encoder = _encoder_trunk()
        self.fc = nn.Linear(_FEATURES, latent_dim)
        self.decoder_input = nn.Linear(latent_dim, _FEATURES)
        self.decoder = _decoder_trunk()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, 32, 32) in [0, 1] -> latent vectors (B, latent_dim)."""
        return self.fc(self.encoder(x).flatten(1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent vectors (B, latent_dim) -> images (B, 3, 32, 32) in [0, 1]."""
        return self.decoder(self.decoder_input(z).view(-1, 256, 4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of ``x``."""
        return self.decode(self.encode(x))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction (the same as ``forward`` for the AE)."""
        return self(x)

    def loss_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Summed squared error over the batch (the article's AE loss) and its parts."""
        recon = self(x)
        sse = _sse(recon, x)
        return {"loss": sse, "recon": recon.detach(), "sse": sse.detach(), "objective": sse.detach()}


class ConvVAE(nn.Module):
    """Convolutional VAE with a diagonal Gaussian ``latent_dim`` posterior.

    The training objective is summed squared error + ``kl_weight`` x KL(q(z|x) || N(0, I)), both
    summed over the batch (``kl_weight`` 0.1 as in the article).
    """

    kind = "vae"

    def __init__(self, latent_dim: int = 1024, kl_weight: float = 0.1) -> None:
        super().__init__()
        self.latent_dim = latent_dim = check_int(latent_dim, "latent_dim", minimum=1)
        self.kl_weight = check_number(kl_weight, "kl_weight", minimum=0.0)
        self.encoder = _encoder_trunk()
        self.fc_mu = nn.Linear(_FEATURES, latent_dim)
        self.fc_logvar = nn.Linear(_FEATURES, latent_dim)
        self.decoder_input = nn.Linear(latent_dim, _FEATURES)
        self.decoder = _decoder_trunk()

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> ``(mu, logvar)``, each (B, latent_dim)."""
        h = self.encoder(x).flatten(1)
        return self.fc_mu(h), self.fc_logvar(h)

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """A draw ``mu + sigma * eps`` that is differentiable w.r.t. ``mu`` and ``logvar``."""
        return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent vectors (B, latent_dim) -> images (B, 3, 32, 32) in [0, 1]."""
        return self.decoder(self.decoder_input(z).view(-1, 256, 4, 4))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(reconstruction from a posterior draw, mu, logvar)``."""
        mu, logvar = self.encode(x)
        return self.decode(self.reparameterize(mu, logvar)), mu, logvar

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction: decode the posterior mean."""
        return self.decode(self.encode(x)[0])

    @staticmethod
    def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """KL(N(mu, exp(logvar)) || N(0, I)) summed over the batch and latent dimensions."""
        mu, logvar = _wide(mu), _wide(logvar)
        return 0.5 * torch.sum(mu.pow(2) + logvar.exp() - 1.0 - logvar)

    def loss_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Summed squared error + ``kl_weight`` x KL over the batch, and its parts."""
        recon, mu, logvar = self(x)
        sse = _sse(recon, x)
        kl = self.kl_divergence(mu, logvar)
        loss = sse + self.kl_weight * kl
        return {
            "loss": loss,
            "recon": recon.detach(),
            "sse": sse.detach(),
            "kl": kl.detach(),
            "objective": loss.detach(),
        }

    @torch.no_grad()
    def sample(self, n: int, device: torch.device | str | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` new images decoded from prior draws z ~ N(0, I) (in the model's dtype)."""
        n = check_int(n, "n", minimum=0)
        weight = self.decoder_input.weight
        if device is None:
            device = weight.device
        z = torch.randn(n, self.latent_dim, device=device, generator=generator, dtype=weight.dtype)
        return self.decode(z)

    @torch.no_grad()
    def blend(self, x1: torch.Tensor, x2: torch.Tensor,
              alphas: Sequence[float] | torch.Tensor = (0.0, 0.25, 0.5, 0.75, 1.0)) -> torch.Tensor:
        """Decode ``(1 - a) * mu(x1) + a * mu(x2)`` for each ``a`` in ``alphas``.

        ``a = 0`` gives the reconstruction of ``x1``, ``a = 1`` that of ``x2``. ``x1`` and ``x2``
        are single images (3, H, W) -> result (A, 3, H, W), or batches (B, 3, H, W) -> (A, B, 3, H, W).
        """
        single = x1.dim() == 3
        if single:
            x1, x2 = x1.unsqueeze(0), x2.unsqueeze(0)
        if x1.shape != x2.shape:
            raise ValueError(f"blend needs images of the same shape, got {tuple(x1.shape)} and {tuple(x2.shape)}")
        mu1, _ = self.encode(x1)
        mu2, _ = self.encode(x2)
        a = torch.as_tensor(alphas, dtype=mu1.dtype, device=mu1.device).reshape(-1, 1, 1)
        z = (1 - a) * mu1.unsqueeze(0) + a * mu2.unsqueeze(0)  # (A, B, latent)
        out = self.decode(z.flatten(0, 1)).unflatten(0, (a.shape[0], x1.shape[0]))
        return out[:, 0] if single else out


class ConvVQVAE(nn.Module):
    """Convolutional VQ-VAE: a 4x4 grid of ``embedding_dim``-d latents, each snapped to the nearest of
    ``num_embeddings`` codes by :class:`vqfast.VectorQuantizer`.

    ``beta`` weighs the commitment term (default 0.25, the layer's; the article weighs both VQ terms
    1:1, i.e. ``beta=1.0, dead_code_threshold=0`` reproduces its settings); both VQ terms are computed by the layer from the gathered codes before the straight-through step,
    so the codebook receives gradient and the decoder sees the codes' values.
    ``codebook_init="xavier_normal"`` re-initialises the codebook as the article does, unless the
    layer's own ``init`` is given (that one is kept); ``None`` keeps the layer's initialisation. Further
    keyword arguments go to ``VectorQuantizer``, except ``heads`` and ``channel_dim``: the convolutions
    around the layer produce and take ``embedding_dim`` channels at dim 1.
    The training loss is the mean squared error per pixel + the VQ loss.
    """

    kind = "vqvae"

    def __init__(self, num_embeddings: int = 4096, embedding_dim: int = 128, beta: float = 0.25,
                 codebook_init: str | None = "xavier_normal", **vq_kwargs: Any) -> None:
        super().__init__()
        from vqfast import VectorQuantizer  # deferred: keeps `import vqfast.models` light and acyclic

        if codebook_init not in ("xavier_normal", None):
            raise ValueError(f"codebook_init must be 'xavier_normal' or None, got {codebook_init!r}")
        fixed = [name for name, value in (("heads", vq_kwargs.get("heads", 1)),
                                          ("channel_dim", vq_kwargs.get("channel_dim"))) if value not in (1, None)]
        if fixed:
            raise ValueError(f"ConvVQVAE does not take {' or '.join(fixed)}: its convolutions produce and take "
                             f"embedding_dim ({embedding_dim}) channels at dim 1, one code each")
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.encoder = _encoder_trunk()
        self.encoder_output = nn.Conv2d(256, embedding_dim, kernel_size=1)
        self.quantizer = VectorQuantizer(num_embeddings, embedding_dim, beta=beta, **vq_kwargs)
        if codebook_init == "xavier_normal" and "init" not in vq_kwargs:
            with torch.no_grad():
                nn.init.xavier_normal_(self.quantizer.embeddings.weight)
        self.decoder_input = nn.Conv2d(embedding_dim, 256, kernel_size=1)
        self.decoder = _decoder_trunk()

    @property
    def embeddings(self) -> nn.Embedding:
        """The codebook (``num_embeddings`` x ``embedding_dim``)."""
        return self.quantizer.embeddings

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # The article's model holds its codebook at the top (``embeddings.weight``); the rest of its
        # names are this model's, so its checkpoints load as they are.
        article_key, key = prefix + "embeddings.weight", prefix + "quantizer.embeddings.weight"
        if article_key in state_dict and key not in state_dict:
            state_dict[key] = state_dict.pop(article_key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> continuous latents (B, embedding_dim, 4, 4), before quantization."""
        return self.encoder_output(self.encoder(x))

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(z_q, vq_loss, indices)`` for latents ``z``; indices are (B, 4, 4)."""
        return self.quantizer(z)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantized latents (B, embedding_dim, 4, 4) -> images (B, 3, 32, 32) in [0, 1]."""
        return self.decoder(self.decoder_input(z_q))

    def encode_indices(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> code indices (B, 4, 4): the compressed representation (the quantizer's search alone:
        in training mode too, its statistics and codebook stay as they are)."""
        return self.quantizer.encode(self.encode(x))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B, H, W) -> images: the decoder of the codes the quantizer outputs for them (unit
        codes with the cosine metric). With vqfast's layer, index -1 (a masked position's) decodes a zero
        code and other indices outside [0, num_embeddings) raise ValueError (not checked under
        ``torch.compile``); the article's VQ step, which has no masks, raises IndexError for -1 too. The codes come in the decoder's dtype
        (the codebook stays float32 in a ``.half()`` model; forward's ``z_q`` takes the input's dtype)."""
        return self.decode(self.quantizer.codes_from_indices(indices, dtype=self.decoder_input.weight.dtype))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(reconstruction, vq_loss, indices)``."""
        z_q, vq_loss, indices = self.quantize(self.encode(x))
        return self.decode(z_q), vq_loss, indices

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the codes: forward's reconstruction, from the quantizer's search alone (in
        training mode too, its statistics and codebook stay as they are; a training forward may restart
        codes). With the article's VQ step (stateless), its forward's reconstruction, whose straight-through
        sum may round away from the codes."""
        from vqfast import VectorQuantizer

        if isinstance(self.quantizer, VectorQuantizer):
            return self.decode_indices(self.encode_indices(x))
        return self(x)[0]

    def loss_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-pixel MSE + VQ loss (the article's VQ-VAE objective), and its parts."""
        recon, vq_loss, indices = self(x)
        sse = _sse(recon, x)
        # (An empty batch has no pixels: its error is 0, as the AE's and VAE's summed one is.)
        loss = sse / max(x.numel(), 1) + _wide(vq_loss)
        return {
            "loss": loss,
            "recon": recon.detach(),
            "sse": sse.detach(),
            "vq_loss": _wide(vq_loss.detach()),
            "indices": indices.detach(),
            "objective": sse.detach(),
        }


MODEL_NAMES = ("ae", "vae", "vqvae")


VQ_PRESETS = ("vqfast", "article")
VQ_IMPLS = ("vqfast", "article")


def vq_layer_options(vq_preset: str = "vqfast", beta: float | None = None,
                     vq_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The VQ-VAE quantizer's keyword arguments: the preset's ("vqfast": beta 0.25 and the layer's own
    dead-code restarts; "article": beta 1 and no restarts), then ``vq_kwargs``, then ``beta``."""
    if vq_preset not in VQ_PRESETS:
        raise ValueError(f"vq_preset must be one of {VQ_PRESETS}, got {vq_preset!r}")
    options: dict[str, Any] = {"beta": 0.25}
    if vq_preset == "article":
        options = {"beta": 1.0, "dead_code_threshold": 0.0}
    options.update(vq_kwargs or {})
    if beta is not None:
        options["beta"] = beta
    return options


def build_model(name: str, latent_dim: int = 1024, num_codes: int = 4096, code_dim: int = 128,
                beta: float | None = None, kl_weight: float = 0.1,
                codebook_init: str | None = "xavier_normal", vq_kwargs: dict[str, Any] | None = None,
                vq_preset: str = "vqfast", vq_impl: str = "vqfast") -> nn.Module:
    """Build ``"ae"``, ``"vae"`` or ``"vqvae"`` from the training options.

    ``vq_preset`` sets the VQ-VAE's quantizer defaults: "vqfast" (the layer's own: beta 0.25 and
    dead-code restarts) or "article" (beta 1 and no restarts, the article's settings with its defects
    fixed). ``beta`` and ``vq_kwargs`` override the preset; an ``init`` in ``vq_kwargs`` also overrides
    ``codebook_init``. ``vq_impl="article"`` replaces the VQ layer
    by the article's own VQ step with its defects fixed (:class:`vqfast.models.article.ArticleVQ`, plain
    PyTorch, builds the N x K x D distance tensor), for comparisons; it takes ``beta`` only.
    """
    if name == "ae":
        return ConvAE(latent_dim)
    if name == "vae":
        return ConvVAE(latent_dim, kl_weight=kl_weight)
    if name == "vqvae":
        preset = vq_layer_options(vq_preset, beta, vq_kwargs)
        if vq_impl not in VQ_IMPLS:
            raise ValueError(f"vq_impl must be one of {VQ_IMPLS}, got {vq_impl!r}")
        if vq_impl == "article" and vq_kwargs:
            raise ValueError(f"vq_kwargs ({', '.join(sorted(vq_kwargs))}) configure vqfast's VectorQuantizer, which "
                             f"vq_impl='article' replaces (the article's VQ step takes beta only: pass beta=)")
        model = ConvVQVAE(num_codes, code_dim, codebook_init=codebook_init, **preset)
        if vq_impl == "article":
            from vqfast.models.article import ArticleVQ

            # Same initial codebook as the layer it replaces, and the random stream left as if it had not
            # been built, so runs with either implementation start from identical weights and data order.
            with torch.random.fork_rng(devices=[]):
                article = ArticleVQ(num_codes, code_dim, beta=preset["beta"])
            with torch.no_grad():
                article.embeddings.weight.copy_(model.quantizer.embeddings.weight)
            model.quantizer = article
        return model
    raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
