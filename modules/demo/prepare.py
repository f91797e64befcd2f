"""The embedded demo's base model and data: a tiny SDXL "pretrained" on generated shapes, plus a new concept.

``prepare_demo_base()`` writes, under ``workspace/demo/`` (relative to the repository root by default):

- ``tiny_sdxl_base/``: a diffusers folder (``StableDiffusionXLPipeline.from_pretrained`` loads it) whose VAE
  reconstructs the generated images and whose UNet denoises the pretraining domain (plain circles, squares,
  triangles in four colours);
- ``concept/`` and ``concept_val/``: the new concept the demo LoRA learns (magenta striped stars, trigger word
  ``zxq``) and held-out validation images of it.

Pretraining from scratch takes several minutes on a 2-core CPU, too long for the README's 3-minute demo, so the
pretrained weights ship in ``modules/demo/assets/tiny_sdxl_base.safetensors`` (fp16, ~3 MB) and are used when
their recorded settings hash matches; ``python scripts/prepare_demo.py --from-scratch`` reproduces them. Results
are cached: a marker file holds a content hash of the settings, so a second call returns at once.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionXLPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from modules.data import synthetic
from modules.model.tiny import build_tiny_sdxl

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DEMO_ROOT = REPO_ROOT / "workspace" / "demo"
ASSET_PATH = Path(__file__).resolve().parent / "assets" / "tiny_sdxl_base.safetensors"
MARKER_NAME = "tuneonce_demo.json"
FORMAT_VERSION = 1  # bump when the recipe below changes in a way the settings do not capture
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class DemoSettings:
    """Everything that determines the demo base and data (its hash keys the cache)."""

    seed: int = 0
    image_size: int = 64
    pretrain_images: int = 384
    autoencoder_images: int = 384  # generic shapes in every colour/texture, so the VAE can draw new concepts
    vae_steps: int = 300
    vae_batch_size: int = 8
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 1000
    unet_lr: float = 1.5e-3
    batch_size: int = 32
    caption_dropout: float = 0.1  # unconditional training for classifier-free guidance at sampling time
    concept_images: int = 16
    concept_seed: int = 1
    concept_val_images: int = 8
    concept_val_seed: int = 1001


@dataclass(frozen=True)
class DemoPaths:
    base: Path
    concept: Path
    concept_val: Path


def demo_paths(root: str | Path | None = None) -> DemoPaths:
    root = Path(root) if root is not None else DEFAULT_DEMO_ROOT
    return DemoPaths(base=root / "tiny_sdxl_base", concept=root / "concept", concept_val=root / "concept_val")


def settings_hash(settings: DemoSettings) -> str:
    """Content hash of the recipe: settings, format version and the tiny architecture's component configs."""
    pipe = build_tiny_sdxl(settings.seed)
    # diffusers' private config keys (e.g. _use_default_values, a list in set order) are not stable across runs
    configs = {name: {k: v for k, v in getattr(pipe, name).config.items() if not k.startswith("_")}
               for name in ("unet", "vae")}
    configs.update({name: getattr(pipe, name).config.to_dict() for name in ("text_encoder", "text_encoder_2")})
    for name in ("text_encoder", "text_encoder_2"):  # fields that vary with the transformers version
        for volatile in ("transformers_version", "_name_or_path", "dtype", "torch_dtype"):
            configs[name].pop(volatile, None)
    payload = json.dumps({"v": FORMAT_VERSION, "settings": asdict(settings), "configs": configs}, sort_keys=True,
                         default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _read_marker(folder: Path) -> dict:
    try:
        return json.loads((folder / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return {}


def _count_pngs(folder: Path) -> int:
    return len(list(folder.glob("*.png"))) if folder.is_dir() else 0


def prepare_demo_base(
    root: str | Path | None = None,
    settings: DemoSettings = DemoSettings(),
    *,
    from_scratch: bool = False,
    asset_path: Path = ASSET_PATH,
) -> Path:
    """Build (or reuse) the demo base pipeline and the concept datasets; returns the base folder.

    A second call with the same settings returns at once. ``from_scratch`` ignores the shipped weights and
    pretrains here (several minutes on a 2-core CPU).
    """
    paths = demo_paths(root)
    digest = settings_hash(settings)
    marker = _read_marker(paths.base)
    if (
        not from_scratch
        and marker.get("settings_hash") == digest
        and _count_pngs(paths.concept) == settings.concept_images
        and _count_pngs(paths.concept_val) == settings.concept_val_images
    ):
        return paths.base

    started = time.perf_counter()
    for folder, count, seed in ((paths.concept, settings.concept_images, settings.concept_seed),
                                (paths.concept_val, settings.concept_val_images, settings.concept_val_seed)):
        shutil.rmtree(folder, ignore_errors=True)
        synthetic.write_concept_dataset(folder, count=count, size=settings.image_size, seed=seed)

    pipe = build_tiny_sdxl(settings.seed)
    source = "assets"
    if from_scratch or not _load_asset(pipe, asset_path, digest):
        source = "pretrained"
        pretrain(pipe, settings)
    _save_pipeline(pipe, paths.base, {"settings_hash": digest, "source": source, "settings": asdict(settings),
                                      "seconds": round(time.perf_counter() - started, 1)})
    return paths.base


def _save_pipeline(pipe: StableDiffusionXLPipeline, folder: Path, marker: dict) -> None:
    staging = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(staging, safe_serialization=True)
    (staging / MARKER_NAME).write_text(json.dumps(marker, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    staging.replace(folder)


# --------------------------------------------------------------------------------------------- shipped weights

def save_asset(pipe: StableDiffusionXLPipeline, digest: str, path: Path = ASSET_PATH) -> Path:
    """Write the pretrained weights of all trainable components into one fp16 safetensors file."""
    tensors = {
        f"{name}.{key}": value.detach().to(torch.float16).contiguous()
        for name in COMPONENTS
        for key, value in getattr(pipe, name).state_dict().items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"settings_hash": digest, "vae_scaling_factor": repr(float(pipe.vae.config.scaling_factor))}
    save_file(tensors, str(path), metadata=metadata)
    return path


def _load_asset(pipe: StableDiffusionXLPipeline, path: Path, digest: str) -> bool:
    """Load shipped weights into ``pipe`` if they were made with these settings; False otherwise."""
    if not path.is_file():
        return False
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("settings_hash") != digest:
            logger.warning("%s was made with other demo settings (%s, now %s); pretraining from scratch",
                           path, metadata.get("settings_hash"), digest)
            return False
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    for name in COMPONENTS:
        prefix = f"{name}."
        state = {k[len(prefix):]: v.float() for k, v in tensors.items() if k.startswith(prefix)}
        getattr(pipe, name).load_state_dict(state, strict=True)
    pipe.vae.register_to_config(scaling_factor=float(metadata["vae_scaling_factor"]))
    return True


# ---------------------------------------------------------------------------------------------- pretraining

def _image_tensor(paths: list[Path]) -> torch.Tensor:
    arrays = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


def _cosine_lr(step: int, total: int, peak: float, warmup: int = 50) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pretrain(pipe: StableDiffusionXLPipeline, settings: DemoSettings, workdir: Path | None = None) -> None:
    """Train the tiny VAE to reconstruct generated images, then the UNet to denoise the pretraining domain."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        scratch_dir = Path(workdir or scratch)
        pretrain_paths = synthetic.write_pretrain_dataset(
            scratch_dir / "pretrain", count=settings.pretrain_images, size=settings.image_size, seed=settings.seed + 100)
        generic = []
        for texture in synthetic.TEXTURES:  # every shape, colour and texture: a general-purpose autoencoder
            concept = synthetic.Concept(name=f"generic_{texture}", shapes=synthetic.SHAPES,
                                        colors=tuple(synthetic.COLORS), backgrounds=tuple(synthetic.BACKGROUNDS),
                                        texture=texture)
            generic += synthetic.write_dataset(scratch_dir / concept.name, concept,
                                               count=settings.autoencoder_images // 2, size=settings.image_size,
                                               seed=settings.seed + 200)
        pretrain_images = _image_tensor(pretrain_paths)
        captions = [p.with_suffix(".txt").read_text().strip() for p in pretrain_paths]
        autoencoder_images = torch.cat([pretrain_images, _image_tensor(generic)])

    generator = torch.Generator().manual_seed(settings.seed)
    _train_vae(pipe, autoencoder_images, settings, generator)
    _train_unet(pipe, pretrain_images, captions, settings, generator)


def _train_vae(pipe, images: torch.Tensor, settings: DemoSettings, generator: torch.Generator) -> None:
    vae = pipe.vae
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0)
    for step in range(settings.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = _cosine_lr(step, settings.vae_steps, settings.vae_lr)
        batch = images[torch.randint(len(images), (settings.vae_batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        loss = F.mse_loss(reconstruction, batch) + settings.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == settings.vae_steps - 1:
            logger.info("demo vae step %d/%d loss %.4f", step + 1, settings.vae_steps, loss.item())
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in images.split(64)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))  # unit-variance latents, as SD does
    vae.requires_grad_(False)


@torch.no_grad()
def _encode_captions(pipe, captions: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    encoded = {}
    for caption in sorted(set(captions)):
        embeds, _, pooled, _ = pipe.encode_prompt(caption, device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        encoded[caption] = (embeds[0], pooled[0])
    return encoded


def _train_unet(pipe, images: torch.Tensor, captions: list[str], settings: DemoSettings,
                generator: torch.Generator) -> None:
    vae, unet = pipe.vae, pipe.unet
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in images.split(64)])
        latents = latents * vae.config.scaling_factor
    encoded = _encode_captions(pipe, captions)
    prompt_embeds = torch.stack([encoded[c][0] for c in captions])
    pooled_embeds = torch.stack([encoded[c][1] for c in captions])
    size = float(settings.image_size)
    time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]])  # original size, crop top-left, target size

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=settings.unet_lr, weight_decay=0.01)
    for step in range(settings.unet_steps):
        for group in optimizer.param_groups:
            group["lr"] = _cosine_lr(step, settings.unet_steps, settings.unet_lr)
        index = torch.randint(len(latents), (settings.batch_size,), generator=generator)
        clean = latents[index]
        hidden, pooled = prompt_embeds[index].clone(), pooled_embeds[index].clone()
        dropped = torch.rand(settings.batch_size, generator=generator) < settings.caption_dropout
        hidden[dropped] = 0.0  # the pipeline's unconditional input (force_zeros_for_empty_prompt)
        pooled[dropped] = 0.0
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (settings.batch_size,),
                                  generator=generator)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        prediction = unet(noisy, timesteps, hidden, added_cond_kwargs={
            "text_embeds": pooled, "time_ids": time_ids.expand(settings.batch_size, -1)}).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == settings.unet_steps - 1:
            logger.info("demo unet step %d/%d loss %.4f", step + 1, settings.unet_steps, loss.item())
    unet.eval()
    unet.requires_grad_(False)
