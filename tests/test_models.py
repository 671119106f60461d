"""ConvAE / ConvVAE / ConvVQVAE: sizes, shapes, the training interface and VQ gradient flow."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from vqfast.models import ConvAE, ConvVAE, ConvVQVAE, build_model, count_parameters, load_dataset


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """32 real CIFAR-10 images from the bundled sample."""
    return next(iter(DataLoader(load_dataset("sample", train=True), batch_size=32)))[0]


def test_parameter_counts_match_the_article() -> None:
    assert count_parameters(ConvAE(latent_dim=1024)) == 9_711_235
    # The VAE adds a second 4096 -> 1024 projection for the log-variance.
    assert count_parameters(ConvVAE(latent_dim=1024)) == 9_711_235 + 4096 * 1024 + 1024
    vq = ConvVQVAE(num_embeddings=4096, embedding_dim=128)
    assert count_parameters(vq) == 1_907_715  # "a 1.9MB large model"
    assert vq.embeddings.weight.shape == (4096, 128)


@pytest.mark.parametrize("name", ["ae", "vae", "vqvae"])
def test_encode_decode_shapes(name: str) -> None:
    model = build_model(name, latent_dim=64, num_codes=32, code_dim=16)
    x = torch.rand(5, 3, 32, 32)
    if name == "ae":
        z = model.encode(x)
        assert z.shape == (5, 64)
    elif name == "vae":
        mu, logvar = model.encode(x)
        assert mu.shape == logvar.shape == (5, 64)
        z = mu
    else:
        z = model.encode(x)
        assert z.shape == (5, 16, 4, 4)
        z_q, _, idx = model.quantize(z)
        assert idx.shape == (5, 4, 4) and idx.dtype == torch.int64
        z = z_q
    out = model.decode(z).detach()
    assert out.shape == x.shape
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0  # sigmoid output, like the pixels


@pytest.mark.parametrize("name", ["ae", "vae", "vqvae"])
def test_one_training_step_lowers_the_loss_on_real_images(name: str, images: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = build_model(name)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    torch.manual_seed(1)  # the same VAE noise draw before and after the step
    terms = model.loss_terms(images)
    for key in ("loss", "recon", "sse", "objective"):
        assert key in terms
    assert terms["recon"].shape == images.shape and not terms["recon"].requires_grad
    opt.zero_grad()
    terms["loss"].backward()
    opt.step()
    torch.manual_seed(1)
    with torch.no_grad():
        after = model.loss_terms(images)
    assert float(after["loss"]) < float(terms["loss"].detach())
    assert float(after["sse"]) < float(terms["sse"])


def test_reported_objective_is_the_articles_per_batch_sum(images: torch.Tensor) -> None:
    torch.manual_seed(0)
    ae = ConvAE(latent_dim=32)
    t = ae.loss_terms(images)
    expected = ((ae(images) - images) ** 2).sum()
    torch.testing.assert_close(t["objective"], expected.detach(), rtol=1e-5, atol=1e-3)
    vae = ConvVAE(latent_dim=32, kl_weight=0.1)
    t = vae.loss_terms(images)
    torch.testing.assert_close(t["objective"], t["sse"] + 0.1 * t["kl"])


def test_vae_kl_matches_torch_distributions() -> None:
    mu, logvar = torch.randn(4, 8), torch.randn(4, 8)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros(4, 8), torch.ones(4, 8))
    expected = torch.distributions.kl_divergence(q, p).sum()
    torch.testing.assert_close(ConvVAE.kl_divergence(mu, logvar), expected, rtol=1e-5, atol=1e-5)


def test_vae_sample_and_blend(images: torch.Tensor) -> None:
    torch.manual_seed(0)
    vae = ConvVAE(latent_dim=32).eval()
    s = vae.sample(6)
    assert s.shape == (6, 3, 32, 32)
    x1, x2 = images[0], images[1]
    strip = vae.blend(x1, x2, [0.0, 0.5, 1.0])
    assert strip.shape == (3, 3, 32, 32)
    with torch.no_grad():
        r1, r2 = vae.reconstruct(x1[None])[0], vae.reconstruct(x2[None])[0]
        mid = vae.decode(0.5 * (vae.encode(x1[None])[0] + vae.encode(x2[None])[0]))[0]
    torch.testing.assert_close(strip[0], r1)
    torch.testing.assert_close(strip[2], r2)
    torch.testing.assert_close(strip[1], mid)
    batched = vae.blend(images[:4], images[4:8], torch.linspace(0, 1, 5))
    assert batched.shape == (5, 4, 3, 32, 32)
    torch.testing.assert_close(batched[:, 2], vae.blend(images[2], images[6], torch.linspace(0, 1, 5)))


def test_vqvae_decodes_indices_as_its_quantizer_outputs_them_also_with_the_cosine_metric(images: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = ConvVQVAE(num_embeddings=64, embedding_dim=16, metric="cosine").eval()
    with torch.no_grad():
        recon, _, idx = model(images[:4])
        torch.testing.assert_close(model.decode_indices(idx), recon)
    with pytest.raises(ValueError, match=r"must lie in \[0, 64\)"):
        model.decode_indices(torch.full((1, 4, 4), 64))
    # The article's VQ step (fixed) in the same model decodes its indices too.
    article = build_model("vqvae", num_codes=16, code_dim=8, vq_impl="article").eval()
    with torch.no_grad():
        recon, _, idx = article(images[:2])
        torch.testing.assert_close(article.decode_indices(idx), recon)
        assert torch.equal(article.encode_indices(images[:2]), idx)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_vqvae_decodes_indices_in_the_models_dtype(images: torch.Tensor, dtype: torch.dtype) -> None:
    # A converted model keeps a float32 codebook (float64 stays float64): the codes are decoded in the
    # decoder's dtype, as forward's z_q (in the input's dtype) is.
    torch.manual_seed(0)
    model = ConvVQVAE(num_embeddings=64, embedding_dim=16).to(dtype).eval()
    x = images[:2].to(dtype)
    with torch.no_grad():
        recon, _, idx = model(x)
        decoded = model.decode_indices(model.encode_indices(x))
    assert decoded.dtype == dtype
    assert torch.equal(decoded, recon)


def test_vqvae_decoder_sees_the_codes_and_every_part_gets_gradient(images: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = ConvVQVAE(num_embeddings=64, embedding_dim=16)
    x = images[:8]
    terms = model.loss_terms(x)
    idx = terms["indices"]
    # The reconstruction is the decoding of the selected code vectors, not of the encoder output.
    with torch.no_grad():
        from_codes = model.decode_indices(idx)
    torch.testing.assert_close(terms["recon"], from_codes)
    terms["loss"].backward()
    # codebook loss -> used codes only; straight-through -> encoder; reconstruction -> decoder
    grad = model.embeddings.weight.grad
    used = torch.unique(idx)
    assert grad is not None and float(grad[used].abs().sum()) > 0
    unused = torch.ones(64, dtype=torch.bool)
    unused[used] = False
    assert float(grad[unused].abs().sum()) == 0.0
    assert float(model.encoder[0].weight.grad.abs().sum()) > 0
    assert float(model.encoder_output.weight.grad.abs().sum()) > 0
    assert float(model.decoder[0].weight.grad.abs().sum()) > 0
    model.eval()  # in training mode the layer may re-seed unused codes on every call
    assert torch.equal(model.encode_indices(x), model(x)[2])


def test_vqvae_options_reach_the_layer() -> None:
    m = ConvVQVAE(num_embeddings=16, embedding_dim=8, beta=0.5)
    assert m.quantizer.beta == 0.5
    torch.manual_seed(0)
    a = ConvVQVAE(num_embeddings=16, embedding_dim=8).embeddings.weight.detach()
    # xavier-normal on a (16, 8) matrix: std sqrt(2 / 24)
    assert 0.1 < float(a.std()) < 0.5
    with pytest.raises(ValueError):
        ConvVQVAE(num_embeddings=16, embedding_dim=8, codebook_init="bogus")
    # The layer's own init, when given, is kept (the article's xavier-normal would replace it).
    uniform = ConvVQVAE(num_embeddings=16, embedding_dim=8, init="uniform").embeddings.weight.detach()
    assert float(uniform.abs().max()) <= 1 / 16
    # The convolutions around the layer make embedding_dim channels at dim 1: no heads, no other layout.
    for option in (dict(heads=2), dict(channel_dim=-1)):
        with pytest.raises(ValueError, match="ConvVQVAE does not take"):
            ConvVQVAE(num_embeddings=16, embedding_dim=8, **option)


def test_model_options_are_checked_and_samples_follow_the_models_dtype() -> None:
    for bad in (0, -1, 2.5):
        with pytest.raises((ValueError, TypeError), match="latent_dim"):
            ConvAE(bad)
        with pytest.raises((ValueError, TypeError), match="latent_dim"):
            ConvVAE(bad)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="kl_weight"):
            ConvVAE(8, kl_weight=bad)
    vae = ConvVAE(8).double()
    assert vae.sample(2).dtype == torch.float64
    assert vae.sample(0).shape == (0, 3, 32, 32)
    with pytest.raises(ValueError, match="n must be"):
        vae.sample(-1)


def test_build_model_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown model"):
        build_model("gan")


def test_vq_presets():
    from vqfast.models.autoencoders import build_model

    import vqfast

    default = build_model("vqvae", num_codes=16, code_dim=8)
    assert isinstance(default.quantizer, vqfast.VectorQuantizer)  # the model is built on the layer
    assert default.quantizer.beta == 0.25 and default.quantizer.dead_code_threshold > 0
    article = build_model("vqvae", num_codes=16, code_dim=8, vq_preset="article")
    assert article.quantizer.beta == 1.0 and article.quantizer.dead_code_threshold == 0
    override = build_model("vqvae", num_codes=16, code_dim=8, vq_preset="article", beta=0.5)
    assert override.quantizer.beta == 0.5 and override.quantizer.dead_code_threshold == 0
    with pytest.raises(ValueError, match="vq_preset"):
        build_model("vqvae", vq_preset="best")


def test_article_vq_impl_matches_the_layer_with_article_settings():
    from vqfast.models.article import ArticleVQ
    from vqfast.models.autoencoders import build_model

    torch.manual_seed(0)
    article = build_model("vqvae", num_codes=32, code_dim=8, vq_preset="article", vq_impl="article")
    assert isinstance(article.quantizer, ArticleVQ) and article.quantizer.beta == 1.0
    layer = build_model("vqvae", num_codes=32, code_dim=8, vq_preset="article")
    layer.load_state_dict(article.state_dict())
    x = torch.rand(4, 3, 32, 32)
    a, b = article.loss_terms(x), layer.loss_terms(x)
    assert torch.equal(a["indices"], b["indices"])
    torch.testing.assert_close(a["loss"], b["loss"])
    with pytest.raises(ValueError, match="vq_impl"):
        build_model("vqvae", vq_impl="fast")


def test_both_vq_impls_start_from_the_same_weights_and_random_stream():
    from vqfast.models.autoencoders import build_model

    built = []
    for impl in ("article", "vqfast"):
        torch.manual_seed(3)
        model = build_model("vqvae", num_codes=32, code_dim=8, vq_preset="article", vq_impl=impl)
        built.append((model.state_dict(), torch.rand(4)))
    (article_state, article_next), (layer_state, layer_next) = built
    assert torch.equal(article_next, layer_next)
    for name, value in article_state.items():
        assert torch.equal(value, layer_state[name]), name


def test_an_explicit_layer_init_is_not_overwritten_by_the_articles():
    from vqfast.models.autoencoders import build_model

    torch.manual_seed(4)
    uniform = build_model("vqvae", num_codes=64, code_dim=8, vq_kwargs={"init": "uniform"})
    assert uniform.embeddings.weight.abs().max() <= 1 / 64
    xavier = build_model("vqvae", num_codes=64, code_dim=8)
    assert xavier.embeddings.weight.abs().max() > 1 / 64


def test_a_checkpoint_of_the_articles_model_loads_by_name():
    # The article's ConvDQ_VAE keeps its codebook at the top level, as ``embeddings.weight``, and has
    # none of the layer's statistics buffers.
    from vqfast.models.autoencoders import build_model

    torch.manual_seed(5)
    source = build_model("vqvae", num_codes=32, code_dim=8, vq_preset="article")
    article_state = {("embeddings.weight" if name == "quantizer.embeddings.weight" else name): value
                     for name, value in source.state_dict().items() if not name.startswith("quantizer.")
                     or name == "quantizer.embeddings.weight"}
    assert "embeddings.weight" in article_state and not any(k.startswith("quantizer.") for k in article_state)
    torch.manual_seed(6)
    model = build_model("vqvae", num_codes=32, code_dim=8, vq_preset="article")
    model.load_state_dict(article_state)
    assert torch.equal(model.embeddings.weight, source.embeddings.weight)
    assert bool(model.quantizer.initialized)  # loaded codes are not overwritten by a k-means init
    x = torch.rand(3, 3, 32, 32)
    model.eval(), source.eval()
    assert torch.equal(model(x)[2], source(x)[2])
    torch.testing.assert_close(model(x)[0], source(x)[0])


def test_vqvae_reconstruct_in_training_mode_leaves_the_codebook_alone(images: torch.Tensor) -> None:
    # A training forward restarts dead codes; reconstruct (the search alone) changes no state.
    torch.manual_seed(0)
    model = build_model("vqvae", num_codes=64, code_dim=16).train()
    codes = model.embeddings.weight.detach().clone()
    usage = model.quantizer.usage.clone()
    with torch.no_grad():
        first, second = model.reconstruct(images[:4]), model.reconstruct(images[:4])
    assert torch.equal(first, second)
    assert torch.equal(model.embeddings.weight, codes) and torch.equal(model.quantizer.usage, usage)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.reconstruct(images[:4]), model(images[:4])[0])


@pytest.mark.parametrize("name", ["ae", "vae", "vqvae"])
def test_losses_keep_float64_for_a_float64_model_and_an_empty_batch_costs_0(name: str, images: torch.Tensor) -> None:
    torch.manual_seed(0)
    small = {"ae": dict(latent_dim=16), "vae": dict(latent_dim=16), "vqvae": dict(num_codes=16, code_dim=8)}[name]
    model = build_model(name, **small).double().eval()
    terms = model.loss_terms(images[:2].double())
    assert all(terms[key].dtype == torch.float64 for key in ("loss", "sse", "objective"))
    recon = terms["recon"]
    assert recon.dtype == torch.float64 and terms["sse"].item() == pytest.approx(((recon - images[:2].double()) ** 2).sum().item(), rel=1e-12)
    assert float(build_model(name, **small).loss_terms(torch.zeros(0, 3, 32, 32))["loss"]) == 0.0


def test_vae_kl_is_computed_in_float64_for_float64_latents() -> None:
    mu = torch.full((2, 8), 1e-4, dtype=torch.float64)
    logvar = torch.full((2, 8), 1e-4, dtype=torch.float64)
    expected = 0.5 * float((mu ** 2 + logvar.exp() - 1 - logvar).sum())
    kl = ConvVAE.kl_divergence(mu, logvar)
    assert kl.dtype == torch.float64 and float(kl) == pytest.approx(expected, rel=1e-12)


def test_article_vq_step_takes_no_layer_options() -> None:
    with pytest.raises(ValueError, match="vq_impl='article'"):
        build_model("vqvae", num_codes=16, code_dim=8, vq_impl="article", vq_kwargs={"ema": True})


def test_loss_curve_places_each_epochs_batches_by_that_epochs_own_count() -> None:
    # A run resumed with another number of processes: epoch 1 had 4 batches per process, epoch 2 had 2,
    # and the unfinished epoch 3 runs at the current 3 per epoch.
    from vqfast.models import viz

    history = [{"epoch": 1, "avg_loss": 2.0, "batches": 4}, {"epoch": 2, "avg_loss": 1.0, "batches": 2}]
    xs = viz._batch_positions(4 + 2 + 2, history, 3)
    assert xs == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2 + 1 / 3, 2 + 2 / 3])
    # Records without a count (older runs) take the current one.
    assert viz._batch_positions(4, [{"epoch": 1, "avg_loss": 2.0}], 2) == pytest.approx([0.5, 1.0, 1.5, 2.0])


def test_picture_writers_take_one_image_and_refuse_empty_input(tmp_path, images: torch.Tensor) -> None:
    from PIL import Image

    from vqfast.models import viz

    path = viz.save_image_grid(images[0], tmp_path / "one.png", scale=1, padding=0)
    assert Image.open(path).size == (32, 32)  # one image, not a stretched (3, H, W) row
    for call in (lambda: viz.save_image_grid(images[:0], tmp_path / "e.png"),
                 lambda: viz.save_image_grid(images[:2], tmp_path / "e.png", nrow=0),
                 lambda: viz.save_reconstruction_grid(images[:0], images[:0], tmp_path / "e.png"),
                 lambda: viz.save_blend_strip(images[:0].unsqueeze(1), tmp_path / "e.png"),
                 lambda: viz.save_code_histogram(torch.ones(4, 4), tmp_path / "e.png"),
                 lambda: viz.save_code_histogram(torch.tensor([1.0, -1.0]), tmp_path / "e.png")):
        with pytest.raises(ValueError):
            call()
    assert not (tmp_path / "e.png").exists()
