"""The Flux demo's base: a tiny Flux-architecture pipeline beside the SDXL demo's, sharing its data and VAE.

``prepare_flux_demo_base()`` writes ``workspace/demo/tiny_flux_base/`` (a FluxPipeline folder) from
- the SDXL demo's pretrained tiny VAE and CLIP text encoder + tokenizer (``prepare_demo_base``, shipped weights,
  seconds), so latents and prompts mean the same as in the SDXL demo; the VAE has 4 latent channels, so the
  transformer's tokens are 2x2 patches of 4 channels (16 features; real Flux: 16 channels, 64 features);
- a tiny T5 encoder (random init from a fixed seed: the captions' meaning reaches the transformer through CLIP's
  pooled embedding and T5's token identities) and a tiny FluxTransformer2DModel with the dev guidance embedding
  (modules/model/tiny_flow.py) pretrained with ``FluxPretrainSettings``: rectified flow on the SDXL demo base v2
  UNet's domain (plain circles, squares, triangles and stars in red/green/blue/yellow/magenta, the same 768 draws),
  4000 AdamW steps. That takes ~11 min on one CPU thread, so the weights ship in
  ``modules/demo/assets/tiny_flux_transformer.safetensors`` (fp16), used when the recipe hash in its metadata
  matches (``flux_transformer_hash``); ``python scripts/prepare_demo.py --flux`` reproduces it. The folder's marker
  holds the hashes, so a second call returns at once and a folder made with another recipe is rebuilt.
The concept datasets are the SDXL demo's (``workspace/demo/concept``, ``concept_val``).
The LR sweep's pretrained tiny DiT (lab/sweep/models.py, source ``demo_flux``) starts from the transformer's init
(``pretrain=None``) and pretrains it with ``pretrain_flux_transformer`` on base v1's domain (its defaults).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, CLIPTokenizer

from tuneonce.data import synthetic
from tuneonce.demo.prepare import (
    MARKER_NAME, DecoderSettings, DemoSettings, UNetSettings, decoder_hash, demo_paths, load_module_asset,
    prepare_demo_base, save_module_asset, train_steps,
)  # fmt: skip
from tuneonce.model.objective import make_noise
from tuneonce.model.tiny_flow import DYNAMIC_SHIFT, _t5, build_tiny_t5_tokenizer, tiny_flux_transformer
from tuneonce.util.files import staged_folder

logger = logging.getLogger(__name__)

FLUX_DEMO_BASE = "tiny_flux_base"
FLUX_FORMAT_VERSION = 3  # bump when the recipe below changes (3: the transformer is pretrained)
SEED = 0  # the T5's and the transformer's init
TRANSFORMER_ASSET_PATH = Path(__file__).resolve().parent / "assets" / "tiny_flux_transformer.safetensors"
TRANSFORMER_HASH_KEY = "flux_transformer_hash"  # the asset's metadata key holding its recipe hash
# AdamW peak LR (cosine with warm-up, like the UNet's). Held-out flow loss after 1000 steps, batch 32 (init 2.33):
# 0.295 at 3e-3, 0.220 at 1e-2, 0.210 at 2e-2; 1e-2 leaves a factor-2 margin below the best.
FLUX_PRETRAIN_LR = 1e-2
_V2 = UNetSettings()


@dataclass(frozen=True)
class FluxPretrainSettings:
    """The demo transformer's pretraining: the SDXL demo base v2 UNet's domain (plain circles, squares, triangles and
    stars in red/green/blue/yellow/magenta on three backgrounds, the same 768 draws), so the demo LoRA has a star to
    start from. Batch size and caption dropout are the DemoSettings'. Its hash keys the shipped transformer."""

    steps: int = 4000
    lr: float = FLUX_PRETRAIN_LR
    seed: int = 0  # the training generator (batches, noise, timesteps, caption dropout)
    images: int = _V2.images
    data_seed: int = _V2.data_seed
    shapes: tuple[str, ...] = _V2.shapes
    colors: tuple[str, ...] = _V2.colors
    timestep_sampling: str = "uniform"

    def concept(self) -> synthetic.Concept:
        return replace(synthetic.PRETRAIN_CONCEPT, name="flux_pretrain", shapes=self.shapes, colors=self.colors)


def flux_demo_base_dir(root: str | Path | None = None) -> Path:
    return demo_paths(root).base.parent / FLUX_DEMO_BASE


def _config_of(transformer: FluxTransformer2DModel) -> dict:
    return {k: v for k, v in transformer.config.items() if not k.startswith("_")}  # private keys are not stable


def flux_transformer_hash(source: str, recipe: FluxPretrainSettings, settings: DemoSettings = DemoSettings()) -> str:
    """Content hash of the pretrained transformer's recipe: the VAE/CLIP it learned through (`source`: the SDXL demo
    base's recipe hash), the demo settings (batch, caption dropout), the pretraining settings, the init seed and the
    architecture."""
    with torch.random.fork_rng(devices=[]):  # building it draws an init: keep the caller's RNG as it was
        config = _config_of(tiny_flux_transformer(guidance=True, latent_channels=4))  # the demo VAE's 4 channels
    payload = {"v": FLUX_FORMAT_VERSION, "source": source, "init_seed": SEED, "settings": asdict(settings),
               "pretrain": asdict(recipe), "config": config}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_transformer_asset(transformer: FluxTransformer2DModel, digest: str,
                           path: Path = TRANSFORMER_ASSET_PATH) -> Path:
    """Write the pretrained transformer as one fp16 safetensors file whose metadata holds its recipe hash."""
    return save_module_asset(transformer, path, TRANSFORMER_HASH_KEY, digest)


def load_transformer_asset(transformer: FluxTransformer2DModel, path: Path, digest: str) -> bool:
    """Load the shipped transformer into `transformer` if it was made with this recipe; False otherwise."""
    return load_module_asset(transformer, path, TRANSFORMER_HASH_KEY, digest)


def prepare_flux_demo_base(
    root: str | Path | None = None,
    settings: DemoSettings = DemoSettings(),
    *,
    sdxl_base: Path | None = None,
    pretrain: FluxPretrainSettings | None = FluxPretrainSettings(),
    asset_path: Path | None = TRANSFORMER_ASSET_PATH,
) -> Path:
    """Build (or reuse) the tiny Flux demo base next to the SDXL demo's; returns its folder. `sdxl_base`: take the
    VAE and CLIP from this SDXL folder instead of the prepared SDXL demo base (tests). `pretrain`: the transformer's
    pretraining recipe, loaded from `asset_path` when that file was made with it, else run here (~11 min on one CPU
    thread); None keeps the transformer at its init (the LR sweep's `demo_flux` source pretrains it itself)."""
    if sdxl_base is None:
        sdxl_base = prepare_demo_base(root, settings)  # concept data + the pretrained VAE and CLIP
        source = decoder_hash(settings, DecoderSettings())  # covers the base recipe and the decoder step
    else:
        source = str(Path(sdxl_base).resolve())
    folder = flux_demo_base_dir(root)
    digest = flux_transformer_hash(source, pretrain, settings) if pretrain is not None else None
    stamp = {"flux_format": FLUX_FORMAT_VERSION, "seed": SEED, "source": source, "transformer_hash": digest}
    try:
        if {k: v for k, v in json.loads((folder / MARKER_NAME).read_text()).items() if k in stamp} == stamp:
            return folder
    except (OSError, ValueError, AttributeError):
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
    marker = dict(stamp, transformer="init")
    if pretrain is not None:
        if asset_path is not None and load_transformer_asset(pipe.transformer, asset_path, digest):
            marker["transformer"] = f"shipped {asset_path.name}"
        else:
            marker.update(_pretrain_here(pipe, settings, pretrain))
    with staged_folder(folder) as staging:
        pipe.save_pretrained(staging, safe_serialization=True)
        (staging / MARKER_NAME).write_text(json.dumps(marker, indent=2))
    return folder


def _pretrain_here(pipe: FluxPipeline, settings: DemoSettings, recipe: FluxPretrainSettings) -> dict:
    """Pretrain the transformer with `recipe`, measuring the held-out flow loss before and after (for the marker)."""
    logger.info("pretraining the Flux demo transformer: %d steps, about 11 min on one CPU thread (4000 steps)",
                recipe.steps)
    concept = recipe.concept()
    held_out = held_out_validator(pipe, settings, concept=concept)
    before = held_out.loss(pipe.transformer)
    started = time.perf_counter()
    pretrain_flux_transformer(pipe, replace(settings, seed=recipe.seed), recipe.steps, recipe.lr,
                              timestep_sampling=recipe.timestep_sampling, concept=concept, images=recipe.images,
                              data_seed=recipe.data_seed)
    seconds = time.perf_counter() - started
    after = held_out.loss(pipe.transformer)
    logger.info("Flux demo transformer: held-out flow loss %.4f -> %.4f (%.0f s)", before, after, seconds)
    return {"transformer": f"pretrained here ({recipe.steps} steps)", "pretrain": asdict(recipe),
            "held_out_flow_loss": {"init": before, "pretrained": after}, "pretrain_seconds": round(seconds, 1)}


# ---------------------------------------------------------------------------------------- transformer pretraining
# `pretrain_flux_transformer` teaches the tiny Flux transformer a domain of generated shapes (default: the SDXL demo
# base v1's, plain shapes in four colours, as the LR sweep's pretrained DiT, source demo_flux, uses; the demo base:
# FluxPretrainSettings' v2 domain) with the rectified-flow loss, through the Flux family's own latent encoding, text
# encoding, timestep sampling/shift, packing and velocity target, so it is trained exactly as the training loop would
# train it.

HELD_OUT_SEED_OFFSET = 500  # held-out draws of the domain (its pretraining set: seed + 100, the decoder's: + 300)


def family_parts(pipe, timestep_sampling: str = "uniform"):
    """The family of the pipeline (Flux, or another flow DiT such as SD3 for the LR sweep), its components
    and objective."""
    from tuneonce.model.families import family_of_pipeline

    family = family_of_pipeline(pipe)
    components = dict(pipe.components)
    return family, components, family.build_objective(components, timestep_sampling=timestep_sampling)


@torch.no_grad()
def domain_latents(pipe: FluxPipeline, count: int, size: int, seed: int,
                   concept: synthetic.Concept = synthetic.PRETRAIN_CONCEPT) -> tuple[torch.Tensor, list[str]]:
    """Latents (VAE means, shifted and scaled as the Flux family encodes them) and captions of `count` generated
    images of `concept` (default: the SDXL demo base v1's pretraining domain) drawn with `seed`."""
    import tempfile

    from tuneonce.demo.prepare import _image_tensor

    family, _, _ = family_parts(pipe)
    with tempfile.TemporaryDirectory() as scratch:
        paths = synthetic.write_dataset(Path(scratch), concept, count=count, size=size, seed=seed)
        images = _image_tensor(paths)
        captions = [p.with_suffix(".txt").read_text().strip() for p in paths]
    pipe.vae.eval()
    latents = torch.cat([family.encode_latents(pipe.vae, chunk) for chunk in images.split(64)])
    return latents, captions


@torch.no_grad()
def _encode_captions(pipe: FluxPipeline, captions: list[str]) -> dict[str, torch.Tensor]:
    """The family's text embeddings (T5 hidden states, CLIP pooled) of each caption, stacked in caption order."""
    family, components, _ = family_parts(pipe)
    unique = sorted(set(captions))
    encoded = family.encode_text(components, unique)
    rows = torch.tensor([unique.index(c) for c in captions])
    return {key: value[rows] for key, value in encoded.items()}


def held_out_validator(pipe: FluxPipeline, settings: DemoSettings = DemoSettings(), *, count: int = 64,
                       num_timesteps: int = 4, seed: int = 1234,
                       concept: synthetic.Concept = synthetic.PRETRAIN_CONCEPT):
    """The training loop's Validator on `count` held-out images of the pretraining domain `concept` (drawn with
    `settings.seed + HELD_OUT_SEED_OFFSET`): `.loss(pipe.transformer)` is the flow-matching loss at fixed timesteps
    with fixed noise, so two states of the transformer compare exactly."""
    from tuneonce.trainer.validation import Validator

    family, components, objective = family_parts(pipe)
    latents, captions = domain_latents(pipe, count, settings.image_size, settings.seed + HELD_OUT_SEED_OFFSET,
                                       concept)
    batches = [{"latents": latents[i:i + 16], "caption": captions[i:i + 16]} for i in range(0, count, 16)]
    return Validator(family, components, objective, batches, num_timesteps=num_timesteps, seed=seed,
                     device=torch.device("cpu"), dtype=torch.float32, encode_text_each_time=False)


def pretrain_flux_transformer(pipe, settings: DemoSettings = DemoSettings(), steps: int = 1000,
                              lr: float = FLUX_PRETRAIN_LR, *, timestep_sampling: str = "uniform",
                              log_every: int = 100, concept: synthetic.Concept = synthetic.PRETRAIN_CONCEPT,
                              images: int | None = None, data_seed: int | None = None) -> list[float]:
    """Train `pipe.transformer` (in place; a Flux or other flow-DiT pipeline, trained through its family's encoding,
    objective and prediction) on the rectified-flow loss over `images` draws (default
    `settings.pretrain_images`) of `concept` with `data_seed` (default `settings.seed + 100`); the defaults are the
    SDXL demo base v1's pretraining images, as the LR sweep's `flux_pre` uses. AdamW with the demo's cosine
    schedule, batch `settings.batch_size`, caption dropout `settings.caption_dropout` (the empty caption, as the data
    pipeline drops captions) for classifier-free guidance, gradient clipping at 1. Deterministic given
    `settings.seed`. Returns the training loss of every step."""
    if steps < 1 or not lr > 0:
        raise ValueError(f"pretrain_flux_transformer: steps must be >= 1 and lr > 0, got steps={steps}, lr={lr}")
    family, components, objective = family_parts(pipe, timestep_sampling)
    images = settings.pretrain_images if images is None else images
    data_seed = settings.seed + 100 if data_seed is None else data_seed
    latents, captions = domain_latents(pipe, images, settings.image_size, data_seed, concept)
    text = _encode_captions(pipe, captions)
    empty = _encode_captions(pipe, [""])
    transformer = pipe.transformer
    transformer.requires_grad_(True)
    transformer.train()
    generator = torch.Generator().manual_seed(settings.seed)

    def flow_loss() -> torch.Tensor:
        index = torch.randint(len(latents), (settings.batch_size,), generator=generator)
        clean = latents[index]
        dropped = torch.rand(settings.batch_size, generator=generator) < settings.caption_dropout
        batch_text = {key: torch.where(dropped.view(-1, *[1] * (value.ndim - 1)), empty[key], value[index])
                      for key, value in text.items()}  # fmt: skip
        noise = make_noise(clean, generator)
        t = objective.sample_timesteps(settings.batch_size, generator, clean.device, latent_shape=tuple(clean.shape))
        prediction = family.predict(transformer, objective.add_noise(clean, noise, t), t, batch_text, {})
        return objective.loss(prediction, clean, noise, t)

    losses = train_steps(list(transformer.parameters()), flow_loss, steps=steps, lr=lr, name="flux transformer",
                         weight_decay=0.01, clip=1.0, log_every=log_every)
    transformer.eval()
    transformer.requires_grad_(False)
    return losses
