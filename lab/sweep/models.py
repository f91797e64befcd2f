"""Base models and data of a sweep, built once and cached under the sweep's output folder.

- `demo`: the embedded demo's base v1 (tuneonce.demo: tiny SDXL pretrained on generated shapes; see sweep_demo_base).
- `tiny_sdxl`: tuneonce.model.tiny's SDXL pipeline with its UNet rebuilt at `width_multiplier` x the channels and/or
  `depth_multiplier` x the resnets and transformer blocks per stage; with `pretrain_steps` > 0 it is pretrained by
  the demo's own recipe (tuneonce.demo.prepare.pretrain, that many UNet steps), else it keeps its deterministic init.
- `tiny_flow`: a tuneonce.model.tiny_flow pipeline (e.g. flux-schnell) at its deterministic init.
- `demo_flux`: the Flux demo's architecture built from the `demo` base (tuneonce.demo.flux.prepare_flux_demo_base: its
  VAE and CLIP, a tiny T5 and Flux transformer), the transformer pretrained on the demo's pretraining domain by
  tuneonce.demo.flux.pretrain_flux_transformer (`pretrain_steps`, `pretrain_lr`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import torch

from lab.sweep.spec import ModelSpec
from tuneonce.util.files import staged_folder

MARKER = "tuneonce_sweep_model.json"


# ModelSpec fields added after models were cached under runs/*/models: at their default value they stay out of the
# digest, so specs that do not set them keep the digest (and cache) they had (unet_w128 took 54 min to pretrain).
LATER_FIELDS = ("pretrain_lr",)


def _spec_digest(spec: ModelSpec, inputs: dict | None = None) -> str:
    """Cache key of a model folder: the spec without its name, plus `inputs` (e.g. hashes of files it is built from)."""
    defaults = {f.name: f.default for f in dataclasses.fields(ModelSpec)}
    payload = {k: v for k, v in dataclasses.asdict(spec).items()
               if k != "name" and not (k in LATER_FIELDS and v == defaults[k])}  # fmt: skip
    if inputs:
        payload["inputs"] = inputs
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def scaled_unet_config(config: dict, width_multiplier: int, depth_multiplier: int) -> dict:
    """A UNet2DConditionModel config with channels x width and blocks per stage x depth (public keys only)."""
    out = {k: v for k, v in config.items() if not k.startswith("_")}
    out["block_out_channels"] = tuple(c * width_multiplier for c in config["block_out_channels"])
    out["layers_per_block"] = config["layers_per_block"] * depth_multiplier
    layers = config["transformer_layers_per_block"]
    out["transformer_layers_per_block"] = (
        tuple(t * depth_multiplier for t in layers) if isinstance(layers, (list, tuple)) else layers * depth_multiplier
    )
    return out


def build_tiny_sdxl_variant(spec: ModelSpec):
    """The tiny SDXL pipeline with its UNet rebuilt at the spec's width and depth (deterministic from spec.seed)."""
    from diffusers import UNet2DConditionModel

    from tuneonce.model.tiny import build_tiny_sdxl

    pipe = build_tiny_sdxl(spec.seed)
    if spec.width_multiplier != 1 or spec.depth_multiplier != 1:
        config = scaled_unet_config(dict(pipe.unet.config), spec.width_multiplier, spec.depth_multiplier)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            pipe.register_modules(unet=UNet2DConditionModel.from_config(config))
    return pipe


def sweep_demo_base() -> Path:
    """The demo base the sweep's `demo` source stands for: base v1 (workspace/demo/tiny_sdxl_base_v1), the one
    docs/lr_transfer_v1.md measured; the demo itself moved on to v2 (a UNet pretrained longer, with stars)."""
    from tuneonce.demo import prepare_demo_base

    return prepare_demo_base(unet=None)


DEMO_DIT_SOURCES = ("demo_flux", "demo_sd3")
DEMO_FLUX_INPUTS = (("vae", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors"))


def build_demo_flux(spec: ModelSpec, sdxl_base: Path, workdir: Path):
    """The Flux demo pipeline on `sdxl_base`'s VAE and CLIP, its transformer pretrained for spec.pretrain_steps;
    returns (pipeline, how its weights were made, held-out flow losses of the transformer before and after)."""
    from diffusers import FluxPipeline

    from tuneonce.demo.flux import (
        FLUX_PRETRAIN_LR,
        held_out_validator,
        prepare_flux_demo_base,
        pretrain_flux_transformer,
    )
    from tuneonce.demo.prepare import DemoSettings

    shutil.rmtree(workdir, ignore_errors=True)
    base = prepare_flux_demo_base(workdir, sdxl_base=sdxl_base, pretrain=None)  # at init: pretrained below
    pipe = FluxPipeline.from_pretrained(base, local_files_only=True)
    shutil.rmtree(workdir, ignore_errors=True)
    if spec.source == "demo_sd3":
        pipe = demo_sd3_pipeline(pipe, spec)
    if spec.width_multiplier != 1 or spec.depth_multiplier != 1:
        pipe.register_modules(transformer=scaled_flow_transformer(pipe.transformer, spec))
    if not spec.pretrain_steps:
        return pipe, "Flux demo base, transformer at its deterministic init", {}
    settings, lr = DemoSettings(seed=spec.seed), spec.pretrain_lr or FLUX_PRETRAIN_LR
    held_out = held_out_validator(pipe, settings)
    before = held_out.loss(pipe.transformer)
    pretrain_flux_transformer(pipe, settings, spec.pretrain_steps, lr)
    after = held_out.loss(pipe.transformer)
    kind = "SD3-type" if spec.source == "demo_sd3" else "Flux demo"
    how = f"{kind} base, transformer pretrained {spec.pretrain_steps} flow-matching steps at lr {lr:g}"
    return pipe, how, {"held_out_flow_loss": {"init": before, "pretrained": after}}


def scaled_flow_transformer(transformer, spec: ModelSpec):
    """The same DiT class at `width_multiplier` x the attention heads (head dimension kept, as muP widens a
    transformer) and `depth_multiplier` x the blocks of every stack, at a fresh init from spec.seed."""
    config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    heads = config["num_attention_heads"] * spec.width_multiplier
    if not heads >= 1 or not float(heads).is_integer():
        raise ValueError(f"width_multiplier {spec.width_multiplier} gives {heads} attention heads; need a whole number")
    config["num_attention_heads"] = int(heads)
    for key in ("num_layers", "num_single_layers"):
        if key in config:
            config[key] *= spec.depth_multiplier
    if "caption_projection_dim" in config:  # SD3 projects the text to the transformer's width
        config["caption_projection_dim"] = int(config["caption_projection_dim"] * spec.width_multiplier)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        return type(transformer).from_config(config)


def demo_sd3_pipeline(flux_pipe, spec: ModelSpec):
    """An SD3-type (MMDiT) pipeline on the same VAE as the Flux demo (the SDXL demo base v1's, 4 latent channels):
    6 joint blocks at width 32 (2 heads of 16, Flux demo's width and block count), SD3.5's qk norm, 2x2 patches; the
    tiny SD3 pipeline's own CLIP-L/CLIP-G/T5 text encoders at their fixed-seed init (the captions reach the
    transformer through token identities, as the Flux demo's T5 does)."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from tuneonce.model.tiny_flow import build_tiny_flow_pipeline

    tiny = build_tiny_flow_pipeline("sd3", spec.seed)
    latent = flux_pipe.vae.config.latent_channels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=latent, out_channels=latent, num_layers=6,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=tiny.transformer.config.joint_attention_dim,
            caption_projection_dim=32, pooled_projection_dim=tiny.transformer.config.pooled_projection_dim,
            pos_embed_max_size=32, qk_norm="rms_norm",
        )  # fmt: skip
    components = {**tiny.components, "vae": flux_pipe.vae, "transformer": transformer}
    return StableDiffusion3Pipeline(**components)


def prepare_model(spec: ModelSpec, cache_dir: Path) -> Path:
    """The diffusers folder of `spec`, built on first use (a marker with the spec's hash keys the cache)."""
    if spec.source == "demo":
        return sweep_demo_base()
    folder = cache_dir / spec.name
    sdxl_base = sweep_demo_base() if spec.source in DEMO_DIT_SOURCES else None
    # demo_flux copies the demo base's VAE and CLIP: a changed file there must rebuild it
    inputs = {n: _file_digest(sdxl_base / n / f) for n, f in DEMO_FLUX_INPUTS} if sdxl_base else None
    digest = _spec_digest(spec, inputs)
    try:
        if json.loads((folder / MARKER).read_text())["digest"] == digest:
            return folder
    except (OSError, ValueError, KeyError):
        pass
    measured = {}
    if spec.source == "tiny_flow":
        from tuneonce.model.tiny_flow import build_tiny_flow_pipeline

        pipe = build_tiny_flow_pipeline(spec.kind, spec.seed)
        how = "deterministic init"
    elif spec.source in DEMO_DIT_SOURCES:
        pipe, how, measured = build_demo_flux(spec, sdxl_base, cache_dir / f".{spec.name}.build")
    else:
        pipe = build_tiny_sdxl_variant(spec)
        how = "deterministic init"
        if spec.pretrain_steps:
            from tuneonce.demo.prepare import DemoSettings, pretrain

            pretrain(pipe, dataclasses.replace(DemoSettings(seed=spec.seed), unet_steps=spec.pretrain_steps))
            how = f"demo recipe, {spec.pretrain_steps} UNet steps"
    with staged_folder(folder) as staging:
        pipe.save_pretrained(staging, safe_serialization=True)
        (staging / MARKER).write_text(json.dumps({"digest": digest, "spec": dataclasses.asdict(spec), "weights": how,
                                                  **measured}))
    return folder


def prepare_data(root: Path, train_images: int, val_images: int) -> tuple[Path, Path]:
    """The demo's new concept (same generator and seeds as tuneonce.demo) and its held-out validation images."""
    from tuneonce.data import synthetic

    train_dir, val_dir = root / f"concept_{train_images}", root / f"concept_val_{val_images}"
    for folder, count, seed in ((train_dir, train_images, 1), (val_dir, val_images, 1001)):
        if len(list(folder.glob("*.png"))) != count:
            shutil.rmtree(folder, ignore_errors=True)
            synthetic.write_concept_dataset(folder, count=count, seed=seed)
    return train_dir, val_dir
