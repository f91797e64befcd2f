"""Tiny SDXL / SD1.5 pipelines (real classes, deterministic) and the cached demo base."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from tuneonce.data import synthetic
from tuneonce.demo import prepare as demo
from tuneonce.model.tiny import build_tiny_sd15, build_tiny_sdxl, tiny_pipeline_dir

PIPELINES = {"sdxl": StableDiffusionXLPipeline, "sd15": StableDiffusionPipeline}
BUILDERS = {"sdxl": build_tiny_sdxl, "sd15": build_tiny_sd15}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def unet_prediction(pipe, seed=0):
    generator = torch.Generator().manual_seed(seed)
    config = pipe.unet.config
    sample = torch.randn(2, config.in_channels, 16, 16, generator=generator)
    hidden = torch.randn(2, 77, config.cross_attention_dim, generator=generator)
    kwargs = {}
    if config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, pipe.text_encoder_2.config.projection_dim, generator=generator),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2),
        }
    with torch.no_grad():
        return pipe.unet(sample, torch.tensor([10, 900]), hidden, **kwargs).sample


@pytest.mark.parametrize("kind", ["sdxl", "sd15"])
def test_weights_follow_the_seed_and_leave_global_rng_alone(kind):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = BUILDERS[kind](seed=0)
    assert torch.equal(torch.rand(3), expected_next)  # building did not consume the caller's random stream
    second, other = BUILDERS[kind](seed=0), BUILDERS[kind](seed=1)
    for name in ("unet", "vae", "text_encoder"):
        a, b, c = (getattr(p, name).state_dict() for p in (first, second, other))
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert any(not torch.equal(a[k], c[k]) for k in a if a[k].numel() > 1), name


def test_sdxl_architecture_is_faithful():
    pipe = build_tiny_sdxl()
    unet, te1, te2 = pipe.unet, pipe.text_encoder, pipe.text_encoder_2
    assert type(te1) is CLIPTextModel and type(te2) is CLIPTextModelWithProjection
    config = unet.config
    assert config.addition_embed_type == "text_time"
    assert config.cross_attention_dim == te1.config.hidden_size + te2.config.hidden_size
    assert config.projection_class_embeddings_input_dim == 6 * config.addition_time_embed_dim + te2.config.projection_dim
    assert len(unet.down_blocks) >= 3 and len(unet.up_blocks) >= 3
    with_attention = [b for b in unet.down_blocks if getattr(b, "attentions", None)]
    assert len(with_attention) >= 2 and all(len(b.resnets) >= 1 for b in unet.down_blocks)
    transformer_blocks = sum(1 for n, _ in unet.named_modules() if n.split(".")[-2:-1] == ["transformer_blocks"])
    assert transformer_blocks >= 8
    assert pipe.vae_scale_factor == 4 and pipe.vae.config.latent_channels == config.in_channels


@pytest.mark.parametrize("kind", ["sdxl", "sd15"])
def test_saved_folder_loads_back_with_from_pretrained(kind, tmp_path_factory):
    folder = tiny_pipeline_dir(kind, tmp_path_factory)
    stamp = (folder / "model_index.json").stat().st_mtime_ns
    assert tiny_pipeline_dir(kind, tmp_path_factory) == folder  # reused, not rebuilt
    assert (folder / "model_index.json").stat().st_mtime_ns == stamp
    loaded = PIPELINES[kind].from_pretrained(folder)
    assert torch.equal(unet_prediction(loaded), unet_prediction(BUILDERS[kind](seed=0)))
    loaded.set_progress_bar_config(disable=True)
    image = loaded("a red circle", num_inference_steps=2, height=64, width=64, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3) and bool((image >= 0).all() and (image <= 1).all())


def test_tokenizer_knows_every_demo_caption_word():
    tokenizer = build_tiny_sdxl().tokenizer
    for word in synthetic.caption_vocabulary():
        assert tokenizer.tokenize(word) == [f"{word}</w>"], word
    ids = tokenizer("qj% unseen-words 42").input_ids
    assert tokenizer.unk_token_id not in ids[1:-1]  # unknown words fall back to characters, never <unk>
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert max(ids) < build_tiny_sdxl().text_encoder.config.vocab_size


SMALL = demo.DemoSettings(pretrain_images=8, autoencoder_images=8, vae_steps=2, vae_batch_size=2, unet_steps=2,
                          batch_size=4, concept_images=3, concept_val_images=2)
SMALL_DECODER = demo.DecoderSettings(pretrain_images=4, generic_images=4, steps=2, batch_size=2)
SMALL_UNET = demo.UNetSettings(images=4, steps=2)


def test_demo_base_is_built_then_cached(tmp_path, monkeypatch):
    missing_asset = tmp_path / "no_asset.safetensors"
    base = demo.prepare_demo_base(tmp_path, SMALL, asset_path=missing_asset, decoder=SMALL_DECODER, unet=None)
    assert base == tmp_path / "tiny_sdxl_base_v1"
    marker = json.loads((base / demo.MARKER_NAME).read_text())
    assert marker["source"] == "pretrained" and marker["settings_hash"] == demo.settings_hash(SMALL)
    assert marker["decoder_hash"] == demo.decoder_hash(SMALL, SMALL_DECODER) and marker["unet_hash"] is None
    assert len(list((tmp_path / "concept").glob("*.png"))) == 2 * 3  # each image with its loss mask
    assert len(list((tmp_path / "concept").glob("*-masklabel.png"))) == 3
    assert len(list((tmp_path / "concept_val").glob("*.txt"))) == 2
    assert "zxq" in (tmp_path / "concept" / "0000.txt").read_text()
    pipe = StableDiffusionXLPipeline.from_pretrained(base)
    assert pipe.vae.config.scaling_factor != pytest.approx(0.13025)  # measured from the trained VAE's latents

    def must_not_run(*args, **kwargs):
        raise AssertionError("cached demo base was rebuilt")

    monkeypatch.setattr(demo, "pretrain", must_not_run)
    assert demo.prepare_demo_base(tmp_path, SMALL, asset_path=missing_asset, decoder=SMALL_DECODER, unet=None) == base
    changed = demo.DemoSettings(**{**SMALL.__dict__, "unet_steps": 3})
    with pytest.raises(AssertionError, match="rebuilt"):  # other settings: the cache does not apply
        demo.prepare_demo_base(tmp_path, changed, asset_path=missing_asset, decoder=SMALL_DECODER, unet=None)
    other_decoder = demo.DecoderSettings(**{**SMALL_DECODER.__dict__, "steps": 3})
    with pytest.raises(AssertionError, match="rebuilt"):  # nor another decoder step (no asset holds it)
        demo.prepare_demo_base(tmp_path, SMALL, asset_path=missing_asset, decoder=other_decoder, unet=None)


def test_base_v2_is_v1_with_a_new_unet_pretrained_on_stars_too(tmp_path, monkeypatch):
    v1_asset = tmp_path / "v1.safetensors"
    pipe = build_tiny_sdxl(SMALL.seed)
    demo.save_asset(pipe, demo.settings_hash(SMALL), demo.decoder_hash(SMALL, SMALL_DECODER), v1_asset)
    trained = []
    real_train_unet = demo._train_unet
    monkeypatch.setattr(demo, "_train_unet", lambda p, images, captions, *a: (trained.append(captions),
                                                                                real_train_unet(p, images, captions, *a)))
    root = tmp_path / "demo"
    v1 = demo.prepare_demo_base(root, SMALL, asset_path=v1_asset, decoder=SMALL_DECODER, unet=None)
    v2 = demo.prepare_demo_base(root, SMALL, asset_path=v1_asset, decoder=SMALL_DECODER, unet=SMALL_UNET,
                                unet_asset_path=None)
    assert (v1, v2) == (root / "tiny_sdxl_base_v1", root / "tiny_sdxl_base")
    assert len(trained) == 1 and all(any(shape in c for c in trained[0]) for shape in ("star", "circle"))
    old, new = StableDiffusionXLPipeline.from_pretrained(v1), StableDiffusionXLPipeline.from_pretrained(v2)
    for name in ("vae", "text_encoder", "text_encoder_2"):  # v1's, unchanged
        a, b = getattr(old, name).state_dict(), getattr(new, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert not torch.equal(old.unet.conv_in.weight, new.unet.conv_in.weight)
    marker = json.loads((v2 / demo.MARKER_NAME).read_text())
    assert marker["unet_hash"] == demo.unet_hash(SMALL, SMALL_DECODER, SMALL_UNET)
    assert marker["source"] == "assets + pretrained UNet"

    # its shipped UNet file is used for its own recipe only
    unet_asset = demo.save_unet_asset(new, marker["unet_hash"], tmp_path / "unet.safetensors")
    monkeypatch.setattr(demo, "_train_unet", lambda *a: pytest.fail("UNet pretrained although shipped"))
    again = demo.prepare_demo_base(tmp_path / "demo2", SMALL, asset_path=v1_asset, decoder=SMALL_DECODER,
                                   unet=SMALL_UNET, unet_asset_path=unet_asset)
    loaded = StableDiffusionXLPipeline.from_pretrained(again).unet.state_dict()
    assert all(torch.equal(v.half().float(), loaded[k]) for k, v in new.unet.state_dict().items())
    other = demo.UNetSettings(**{**SMALL_UNET.__dict__, "lr": 1e-3})
    with pytest.raises(pytest.fail.Exception, match="although shipped"):
        demo.prepare_demo_base(tmp_path / "demo3", SMALL, asset_path=v1_asset, decoder=SMALL_DECODER, unet=other,
                               unet_asset_path=unet_asset)


def test_shipped_weights_are_used_only_for_their_settings(tmp_path, monkeypatch):
    pipe = build_tiny_sdxl(SMALL.seed)
    with torch.no_grad():
        pipe.unet.conv_in.weight.fill_(0.25)
    pipe.vae.register_to_config(scaling_factor=0.5)
    asset = demo.save_asset(pipe, demo.settings_hash(SMALL), demo.decoder_hash(SMALL, SMALL_DECODER),
                            tmp_path / "asset.safetensors")
    monkeypatch.setattr(demo, "pretrain", lambda *a, **k: (_ for _ in ()).throw(AssertionError("pretrained")))
    base = demo.prepare_demo_base(tmp_path / "demo", SMALL, asset_path=asset, decoder=SMALL_DECODER, unet=None)
    loaded = StableDiffusionXLPipeline.from_pretrained(base)
    assert torch.all(loaded.unet.conv_in.weight == 0.25) and loaded.vae.config.scaling_factor == 0.5
    other = demo.DemoSettings(**{**SMALL.__dict__, "seed": 5})
    with pytest.raises(AssertionError, match="pretrained"):
        demo.prepare_demo_base(tmp_path / "demo2", other, asset_path=asset, decoder=SMALL_DECODER, unet=None)


def _shipped_v1() -> StableDiffusionXLPipeline:
    pipe, settings = build_tiny_sdxl(demo.DemoSettings().seed), demo.DemoSettings()
    assert demo._load_asset(pipe, demo.ASSET_PATH, demo.settings_hash(settings),
                            demo.decoder_hash(settings, demo.DecoderSettings()))
    return pipe


@torch.no_grad()
def _denoising_losses(pipe: StableDiffusionXLPipeline, unets: list, paths: list) -> list[float]:
    """Each UNet's noise-prediction MSE on ``paths`` (captioned images) at 8 spread timesteps, same noise for all."""
    latents = pipe.vae.encode(demo._image_tensor(paths)).latent_dist.mean * pipe.vae.config.scaling_factor
    hidden, _, pooled, _ = pipe.encode_prompt([p.with_suffix(".txt").read_text().strip() for p in paths],
                                              device="cpu", do_classifier_free_guidance=False)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    timesteps = torch.linspace(100, 900, len(latents)).long()
    noisy = scheduler.add_noise(latents, noise, timesteps)
    added = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * len(latents))}
    return [F.mse_loss(unet(noisy, timesteps, hidden, added_cond_kwargs=added).sample, noise).item() for unet in unets]


@pytest.mark.skipif(not demo.ASSET_PATH.is_file(), reason="shipped demo weights not present")
def test_shipped_demo_base_reconstructs_and_denoises(tmp_path):
    """The committed base really is pretrained: its VAE reconstructs new images, its UNet beats a fresh one."""
    pipe = _shipped_v1()
    paths = synthetic.write_pretrain_dataset(tmp_path / "held_out", count=8, size=64, seed=777)
    images = demo._image_tensor(paths)
    with torch.no_grad():
        reconstruction = pipe.vae.decode(pipe.vae.encode(images).latent_dist.mean).sample
    assert F.mse_loss(reconstruction, images).item() < 0.5 * images.var().item()
    losses = _denoising_losses(pipe, [pipe.unet, build_tiny_sdxl(demo.DemoSettings().seed).unet], paths)
    assert losses[0] < 0.7 * losses[1], losses


@pytest.mark.skipif(not demo.UNET_ASSET_PATH.is_file(), reason="shipped demo weights not present")
def test_shipped_v2_unet_denoises_stars_better_than_v1(tmp_path):
    """Base v2's UNet learned the star shape v1's never saw, and did not lose the old shapes."""
    pipe = _shipped_v1()
    settings, decoder, unet = demo.DemoSettings(), demo.DecoderSettings(), demo.UNetSettings()
    v2 = build_tiny_sdxl(unet.seed)
    assert demo._load_unet_asset(v2, demo.UNET_ASSET_PATH, demo.unet_hash(settings, decoder, unet))
    stars = dataclasses.replace(synthetic.PRETRAIN_CONCEPT, name="stars", shapes=("star",))
    # new draws: seeds the pretraining never used
    star_paths = synthetic.write_dataset(tmp_path / "stars", stars, count=8, seed=778)
    old_paths = synthetic.write_pretrain_dataset(tmp_path / "old", count=8, seed=779)
    on_stars = _denoising_losses(pipe, [v2.unet, pipe.unet], star_paths)
    on_old = _denoising_losses(pipe, [v2.unet, pipe.unet], old_paths)
    assert on_stars[0] < 0.9 * on_stars[1], on_stars
    assert on_old[0] < on_old[1], on_old
