"""The demo base's decoder step: what it trains, how a prepared base gets it, and what the shipped decoder draws."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tuneonce.data import synthetic
from tuneonce.demo import prepare as demo
from tuneonce.model.tiny import build_tiny_sdxl

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETTINGS = demo.DemoSettings(concept_images=2, concept_val_images=1)
TINY_DECODER = demo.DecoderSettings(pretrain_images=2, generic_images=2, steps=2, batch_size=2, lr=1e-2)


def test_finetune_decoder_trains_only_the_decoding_path(tmp_path):
    vae = build_tiny_sdxl(0).vae
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    demo.finetune_decoder(vae, SETTINGS, TINY_DECODER, workdir=tmp_path)
    after = vae.state_dict()
    decoding = [k for k in after if k.startswith(demo.DECODER_PREFIXES)]
    assert decoding and all(not torch.equal(before[k], after[k]) for k in decoding if k.endswith("conv.weight"))
    assert all(torch.equal(before[k], after[k]) for k in after if k not in decoding)  # encoder, quant_conv
    assert not any(p.requires_grad for p in vae.parameters())
    # its images are new draws: none is a held-out validation image of the concept
    validation = synthetic.write_concept_dataset(tmp_path / "val", count=8, seed=SETTINGS.concept_val_seed)
    images = demo.decoder_training_images(SETTINGS, TINY_DECODER, tmp_path / "again")
    held_out = demo._image_tensor(validation)
    assert not any(torch.equal(image, other) for image in images for other in held_out)


def test_a_base_from_before_gets_the_shipped_decoder_in_place(tmp_path, monkeypatch):
    pipe = build_tiny_sdxl(SETTINGS.seed)
    digest, old_decoder = demo.settings_hash(SETTINGS), demo.decoder_hash(SETTINGS, TINY_DECODER)
    old_asset = demo.save_asset(pipe, digest, old_decoder, tmp_path / "old.safetensors")
    base = demo.prepare_demo_base(tmp_path / "demo", SETTINGS, asset_path=old_asset, decoder=TINY_DECODER, unet=None)
    unet_file = base / "unet" / "diffusion_pytorch_model.safetensors"
    unet_bytes, vae_before = unet_file.read_bytes(), load_file(base / "vae" / "diffusion_pytorch_model.safetensors")

    with torch.no_grad():  # a new decoder step: new decoding weights, everything else as shipped before
        for name, p in pipe.vae.named_parameters():
            if name.startswith(demo.DECODER_PREFIXES):
                p.add_(0.5)
    new_decoder = demo.DecoderSettings(**{**TINY_DECODER.__dict__, "steps": 3})
    new_asset = demo.save_asset(pipe, digest, demo.decoder_hash(SETTINGS, new_decoder), tmp_path / "new.safetensors")
    monkeypatch.setattr(demo, "pretrain", lambda *a, **k: pytest.fail("the base was rebuilt"))
    monkeypatch.setattr(demo, "_save_pipeline", lambda *a, **k: pytest.fail("the base was rebuilt"))
    assert demo.prepare_demo_base(tmp_path / "demo", SETTINGS, asset_path=new_asset, decoder=new_decoder,
                                  unet=None) == base

    assert unet_file.read_bytes() == unet_bytes
    vae_after = load_file(base / "vae" / "diffusion_pytorch_model.safetensors")
    shipped = load_file(new_asset)
    for key, value in vae_after.items():
        if key.startswith(demo.DECODER_PREFIXES):
            assert torch.equal(value, shipped[f"vae.{key}"].float()), key
        else:
            assert torch.equal(value, vae_before[key]), key
    marker = json.loads((base / demo.MARKER_NAME).read_text())
    assert marker["decoder_hash"] == demo.decoder_hash(SETTINGS, new_decoder) and marker["settings_hash"] == digest


def test_write_asset_decoder_wants_a_base_from_before_the_decoder_step(tmp_path):
    digest = demo.settings_hash(SETTINGS)
    for name, marker in (("missing", None), ("has_decoder", {"settings_hash": digest, "source": "pretrained",
                                                            "decoder_hash": "0123"}),
                         ("other_recipe", {"settings_hash": "0123", "source": "pretrained"})):
        folder = tmp_path / name
        folder.mkdir()
        if marker is not None:
            (folder / demo.MARKER_NAME).write_text(json.dumps(marker))
        with pytest.raises(ValueError, match=f"{name}: not a demo base pretrained with settings {digest}"):
            demo.write_asset_decoder(folder, SETTINGS, TINY_DECODER, tmp_path / "unused.safetensors")


def _concept_reconstructions(count: int = 4) -> tuple[np.ndarray, np.ndarray]:
    pipe = build_tiny_sdxl(demo.DemoSettings().seed)
    settings = demo.DemoSettings()
    assert demo._load_asset(pipe, demo.ASSET_PATH, demo.settings_hash(settings),
                            demo.decoder_hash(settings, demo.DecoderSettings()))
    rng_images = [synthetic.render_sample(synthetic.NEW_CONCEPT, np.random.default_rng([4242, i]), (64, 64))[0]
                  for i in range(count)]
    images = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in rng_images])).permute(0, 3, 1, 2)
    images = images / 127.5 - 1.0
    with torch.no_grad():
        decoded = pipe.vae.decode(pipe.vae.encode(images).latent_dist.mean).sample.clamp(-1, 1)
    to_rgb = lambda t: ((t.permute(0, 2, 3, 1).numpy() + 1) * 127.5)  # noqa: E731
    return to_rgb(images), to_rgb(decoded)


@pytest.mark.skipif(not demo.ASSET_PATH.is_file(), reason="shipped demo weights not present")
def test_shipped_decoder_draws_the_concepts_magenta_and_stripes():
    source, decoded = _concept_reconstructions()
    magenta, dark = np.array(synthetic.COLORS["magenta"]), np.array(synthetic.COLORS["magenta"]) // 3
    bright_band = np.linalg.norm(source - magenta, axis=-1) < 30  # inside the star, light stripes
    dark_band = np.linalg.norm(source - dark, axis=-1) < 30
    drawn_bright, drawn_dark = decoded[bright_band].mean(0), decoded[dark_band].mean(0)
    # magenta, not blue: red and blue both high, green low (the pretrained decoder drew these pixels blue)
    assert drawn_bright[0] > 150 and drawn_bright[2] > 120 and drawn_bright[1] < 100, drawn_bright
    # the stripes survive: light bands clearly brighter than dark ones
    assert drawn_bright.sum() > drawn_dark.sum() + 150, (drawn_bright, drawn_dark)


def test_demo_figure_puts_training_images_then_each_sampled_step(tmp_path):
    from scripts.demo_figure import TILE, compose

    concept = tmp_path / "concept"
    synthetic.write_concept_dataset(concept, count=16, seed=1)  # the demo's: white, gray and black backgrounds
    colours = {0: (255, 0, 0), 200: (0, 0, 255)}
    samples = tmp_path / "run" / "samples"
    samples.mkdir(parents=True)
    for step, colour in colours.items():
        for index in range(2):
            Image.new("RGB", (64, 64), colour).save(samples / f"step{step:06d}_{index:02d}.png")
    figure = np.asarray(compose(tmp_path / "run", concept))
    tile_centres = [8 + c * (TILE + 8) + TILE // 2 for c in range(3)]
    assert figure.shape[1] == 3 * (TILE + 8) + 8  # training images, step 0, step 200
    for column, colour in zip(tile_centres[1:], colours.values()):
        for row in range(2):  # one image per prompt
            assert tuple(figure[18 + row * (TILE + 8) + TILE // 2, column]) == colour
    with pytest.raises(FileNotFoundError, match="no sample images"):
        compose(tmp_path / "empty", concept)
    with pytest.raises(FileNotFoundError, match="no training image on a white and one on a black background"):
        compose(tmp_path / "run", tmp_path / "empty")


def test_the_trainer_finds_every_demo_base_preparer(tmp_path):
    """train.ensure_base_model finds the demo's preparers through the tuneonce.base_preparers entry points, by folder
    name, without importing the demo for other models: one must be registered for every demo base, and a folder of
    that name without the demo's marker (someone's own model) is left alone."""
    from tuneonce.demo import demo_paths
    from tuneonce.demo.flux import FLUX_DEMO_BASE
    from tuneonce.trainer.train import base_preparer

    demo = demo_paths(tmp_path)
    for name in (demo.base.name, demo.base_v1.name, FLUX_DEMO_BASE):
        prepare = base_preparer(name)
        assert callable(prepare), name
        own = tmp_path / "own" / name
        own.mkdir(parents=True)
        assert prepare(own) is False and list(own.iterdir()) == []
    assert base_preparer("my_model") is None