"""The Flux demo's base: a tiny Flux-architecture pipeline beside the SDXL demo's, sharing its data and VAE.

``prepare_flux_demo_base()`` writes ``workspace/demo/tiny_flux_base/`` (a FluxPipeline folder) from
- the SDXL demo's pretrained tiny VAE and CLIP text encoder + tokenizer (``prepare_demo_base``, shipped weights,
  seconds), so latents and prompts mean the same as in the SDXL demo; the VAE has 4 latent channels, so the
  transformer's tokens are 2x2 patches of 4 channels (16 features; real Flux: 16 channels, 64 features);
- a tiny T5 encoder and a tiny FluxTransformer2DModel with the dev guidance embedding (modules/model/tiny_flow.py),
  freshly initialised from a fixed seed: the transformer is not pretrained, so the demo LoRA learns the concept on
  top of an untrained denoiser (validation loss falls; samples show colours and layout rather than crisp shapes).
The concept datasets are the SDXL demo's (``workspace/demo/concept``, ``concept_val``).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
from transformers import CLIPTextModel, CLIPTokenizer

from modules.demo.prepare import MARKER_NAME, DecoderSettings, DemoSettings, decoder_hash, demo_paths, prepare_demo_base
from modules.model.tiny_flow import DYNAMIC_SHIFT, _t5, build_tiny_t5_tokenizer, tiny_flux_transformer

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
