"""The Flux demo's base: a tiny Flux-architecture pipeline beside the SDXL demo's, sharing its data and VAE.

``prepare_flux_demo_base()`` writes ``workspace/demo/tiny_flux_base/`` (a FluxPipeline folder) from
- the SDXL demo's pretrained tiny VAE and CLIP text encoder + tokenizer (``prepare_demo_base``, shipped weights,
  seconds), so latents and prompts mean the same as in the SDXL demo; the VAE has 4 latent channels, so the
  transformer's tokens are 2x2 patches of 4 channels (16 features; real Flux: 16 channels, 64 features);
- a tiny T5 encoder and a tiny FluxTransformer2DModel with the dev guidance embedding (modules/model/tiny_flow.py),
  freshly initialised from a fixed seed: the transformer is not pretrained, so the demo LoRA learns the concept on
  top of an untrained denoiser (validation loss falls; samples show colours and layout rather than crisp shapes).
The concept datasets are the SDXL demo's (``workspace/demo/concept``, ``concept_val``).
``pretrain_flux_transformer`` (below) can pretrain the transformer on the SDXL demo's pretraining domain; the LR
sweep's pretrained tiny DiT uses it (modules/sweep/models.py, source ``demo_flux``), the demo base does not (yet).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
from transformers import CLIPTextModel, CLIPTokenizer

from modules.demo.prepare import MARKER_NAME, DecoderSettings, DemoSettings, decoder_hash, demo_paths, prepare_demo_base
from modules.model.tiny_flow import DYNAMIC_SHIFT, _t5, build_tiny_t5_tokenizer, tiny_flux_transformer

logger = logging.getLogger(__name__)

FLUX_DEMO_BASE = "tiny_flux_base"
FLUX_FORMAT_VERSION = 2  # bump when the recipe below changes
SEED = 0


def flux_demo_base_dir(root: str | Path | None = None) -> Path:
    return demo_paths(root).base.parent / FLUX_DEMO_BASE


def prepare_flux_demo_base(
    root: str | Path | None = None, settings: DemoSettings = DemoSettings(), *, sdxl_base: Path | None = None
) -> Path:
    """Build (or reuse) the tiny Flux demo base next to the SDXL demo's; returns its folder. `sdxl_base`: take the
    VAE and CLIP from this SDXL folder instead of the prepared SDXL demo base (tests)."""
    if sdxl_base is None:
        sdxl_base = prepare_demo_base(root, settings)  # concept data + the pretrained VAE and CLIP
        source = decoder_hash(settings, DecoderSettings())  # covers the base recipe and the decoder step
    else:
        source = str(Path(sdxl_base).resolve())
    folder = flux_demo_base_dir(root)
    stamp = {"flux_format": FLUX_FORMAT_VERSION, "seed": SEED, "source": source}
    try:
        if json.loads((folder / MARKER_NAME).read_text()) == stamp:
            return folder
    except (OSError, ValueError):
        pass
    vae = AutoencoderKL.from_pretrained(sdxl_base / "vae")
    if vae.config.shift_factor is None:  # FluxPipeline decodes with latents / scale + shift
        vae.register_to_config(shift_factor=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        tokenizer_2 = build_tiny_t5_tokenizer()
        pipe = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **DYNAMIC_SHIFT),
            vae=vae,
            text_encoder=CLIPTextModel.from_pretrained(sdxl_base / "text_encoder"),
            tokenizer=CLIPTokenizer.from_pretrained(sdxl_base / "tokenizer"),
            text_encoder_2=_t5(tokenizer_2),
            tokenizer_2=tokenizer_2,
            transformer=tiny_flux_transformer(guidance=True, latent_channels=vae.config.latent_channels),
        )
    staging = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(staging, safe_serialization=True)
    (staging / MARKER_NAME).write_text(json.dumps(stamp))
    shutil.rmtree(folder, ignore_errors=True)
    staging.replace(folder)
    return folder


# ---------------------------------------------------------------------------------------- transformer pretraining
# The tiny Flux transformer above starts from random weights. `pretrain_flux_transformer` teaches it the SDXL demo
# base's pretraining domain (plain shapes in four colours) with the rectified-flow loss, through the Flux family's
# own latent encoding, text encoding, timestep sampling/shift, packing and velocity target, so it is trained exactly
# as the training loop would train it. The LR sweep's pretrained DiT (modules/sweep/models.py, source demo_flux)
# uses it.

# AdamW peak LR (cosine with warm-up, like the UNet's). Held-out flow loss after 1000 steps, batch 32 (init 2.33):
# 0.295 at 3e-3, 0.220 at 1e-2, 0.210 at 2e-2; 1e-2 leaves a factor-2 margin below the best.
FLUX_PRETRAIN_LR = 1e-2
HELD_OUT_SEED_OFFSET = 500  # held-out draws of the domain (its pretraining set: seed + 100, the decoder's: + 300)


def _family_parts(pipe: FluxPipeline, timestep_sampling: str = "uniform"):
    from modules.model.families import get_family

    family = get_family("flux")
    components = dict(pipe.components)
    return family, components, family.build_objective(components, timestep_sampling=timestep_sampling)


@torch.no_grad()
def domain_latents(pipe: FluxPipeline, count: int, size: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Latents (VAE means, shifted and scaled as the Flux family encodes them) and captions of `count` generated
    images of the demo's pretraining domain drawn with `seed`."""
    import tempfile

    from modules.data import synthetic
    from modules.demo.prepare import _image_tensor

    family, _, _ = _family_parts(pipe)
    with tempfile.TemporaryDirectory() as scratch:
        paths = synthetic.write_pretrain_dataset(Path(scratch), count=count, size=size, seed=seed)
        images = _image_tensor(paths)
        captions = [p.with_suffix(".txt").read_text().strip() for p in paths]
    pipe.vae.eval()
    latents = torch.cat([family.encode_latents(pipe.vae, chunk) for chunk in images.split(64)])
    return latents, captions


@torch.no_grad()
def _encode_captions(pipe: FluxPipeline, captions: list[str]) -> dict[str, torch.Tensor]:
    """The family's text embeddings (T5 hidden states, CLIP pooled) of each caption, stacked in caption order."""
    family, components, _ = _family_parts(pipe)
    unique = sorted(set(captions))
    encoded = family.encode_text(components, unique)
    rows = torch.tensor([unique.index(c) for c in captions])
    return {key: value[rows] for key, value in encoded.items()}


def held_out_validator(pipe: FluxPipeline, settings: DemoSettings = DemoSettings(), *, count: int = 64,
                       num_timesteps: int = 4, seed: int = 1234):
    """The training loop's Validator on `count` held-out images of the pretraining domain: `.loss(pipe.transformer)`
    is the flow-matching loss at fixed timesteps with fixed noise, so two states of the transformer compare exactly."""
    from modules.trainer.validation import Validator

    family, components, objective = _family_parts(pipe)
    latents, captions = domain_latents(pipe, count, settings.image_size, settings.seed + HELD_OUT_SEED_OFFSET)
    batches = [{"latents": latents[i:i + 16], "caption": captions[i:i + 16]} for i in range(0, count, 16)]
    return Validator(family, components, objective, batches, num_timesteps=num_timesteps, seed=seed,
                     device=torch.device("cpu"), dtype=torch.float32, encode_text_each_time=False)


def pretrain_flux_transformer(pipe: FluxPipeline, settings: DemoSettings = DemoSettings(), steps: int = 1000,
                              lr: float = FLUX_PRETRAIN_LR, *, timestep_sampling: str = "uniform",
                              log_every: int = 100) -> list[float]:
    """Train `pipe.transformer` (in place) on the rectified-flow loss over the SDXL demo base's pretraining images
    (`settings.pretrain_images` draws, seed `settings.seed + 100`, as the UNet's): AdamW with the demo's cosine
    schedule, batch `settings.batch_size`, caption dropout `settings.caption_dropout` (the empty caption, as the data
    pipeline drops captions) for classifier-free guidance, gradient clipping at 1. Deterministic given
    `settings.seed`. Returns the training loss of every step."""
    from modules.demo.prepare import _cosine_lr
    from modules.trainer.objective import make_noise

    if steps < 1 or not lr > 0:
        raise ValueError(f"pretrain_flux_transformer: steps must be >= 1 and lr > 0, got steps={steps}, lr={lr}")
    family, components, objective = _family_parts(pipe, timestep_sampling)
    latents, captions = domain_latents(pipe, settings.pretrain_images, settings.image_size, settings.seed + 100)
    text = _encode_captions(pipe, captions)
    empty = _encode_captions(pipe, [""])
    transformer = pipe.transformer
    transformer.requires_grad_(True)
    transformer.train()
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(settings.seed)
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _cosine_lr(step, steps, lr)
        index = torch.randint(len(latents), (settings.batch_size,), generator=generator)
        clean = latents[index]
        dropped = torch.rand(settings.batch_size, generator=generator) < settings.caption_dropout
        batch_text = {key: torch.where(dropped.view(-1, *[1] * (value.ndim - 1)), empty[key], value[index])
                      for key, value in text.items()}  # fmt: skip
        noise = make_noise(clean, generator)
        t = objective.sample_timesteps(settings.batch_size, generator, clean.device, latent_shape=tuple(clean.shape))
        prediction = family.predict(transformer, objective.add_noise(clean, noise, t), t, batch_text, {})
        loss = objective.loss(prediction, clean, noise, t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % log_every == 0 or step == steps - 1:
            logger.info("flux transformer step %d/%d loss %.4f", step + 1, steps, losses[-1])
    transformer.eval()
    transformer.requires_grad_(False)
    return losses
