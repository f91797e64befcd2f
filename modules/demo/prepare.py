"""The embedded demo's base model and data: a tiny SDXL "pretrained" on generated shapes, plus a new concept.

``prepare_demo_base()`` writes, under ``workspace/demo/`` (by default the repository's in a checkout, else
``$TUNEONCE_HOME/demo``, default ``~/.cache/tuneonce/demo``; tuneonce.paths):

- ``tiny_sdxl_base/``: base v2, the demo's: a diffusers folder (``StableDiffusionXLPipeline.from_pretrained`` loads
  it) whose VAE reconstructs the generated images and whose UNet denoises the pretraining domain (plain circles,
  squares, triangles and stars in five colours on three backgrounds);
- ``concept/`` and ``concept_val/``: the new concept the demo LoRA learns (magenta striped stars, trigger word
  ``zxq``) and held-out validation images of it;
- with ``unet=None``: ``tiny_sdxl_base_v1/``, base v1, whose UNet saw neither stars nor magenta, for 1000 steps;
  the LR sweep (docs/lr_transfer_v1.md) ran on it, so it is kept as it is.

Base v1's recipe has two steps: ``pretrain`` (VAE, then UNet; the sweeps build their width/depth variants with it
too) and ``finetune_decoder``, which trains only the VAE decoder on the frozen encoder's latent means, so the pictures
show the magenta and the stripes the latents carry (the pretrained decoder, trained on noisy posterior samples,
drew them blue and blurred). Base v2 adds a third, ``pretrain_unet_v2``: v1's VAE and text encoders with the UNet
pretrained anew, 3x longer and on a domain with plain stars and magenta (v1's UNet drew blobs, so the demo LoRA could
teach the concept's colour but not its shape; see UNetSettings).

Pretraining from scratch takes about an hour on a 2-core CPU, too long for the README's 3-minute demo, so the
weights ship in ``modules/demo/assets/``: ``tiny_sdxl_base.safetensors`` (v1, every component, fp16, ~4 MB) and
``tiny_sdxl_unet_v2.safetensors`` (v2's UNet), used when their recorded recipe hashes match;
``python scripts/prepare_demo.py --from-scratch`` reproduces them. Results are cached: a marker file holds the
hashes, so a second call returns at once. A base prepared before the decoder step gets the shipped decoder in place
(only its VAE file changes).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionXLPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tuneonce import paths
from tuneonce.data import synthetic
from tuneonce.model.tiny import build_tiny_sdxl
from tuneonce.util.files import staged_folder

logger = logging.getLogger(__name__)

DEFAULT_DEMO_ROOT = paths.home() / "demo"  # workspace/demo in a checkout, else $TUNEONCE_HOME or the cache folder
ASSET_PATH = Path(__file__).resolve().parent / "assets" / "tiny_sdxl_base.safetensors"  # base v1, every component
UNET_ASSET_PATH = ASSET_PATH.with_name("tiny_sdxl_unet_v2.safetensors")  # base v2's UNet (the rest is v1's)
MARKER_NAME = "tuneonce_demo.json"
FORMAT_VERSION = 1  # bump when the recipe below changes in a way the settings do not capture
DECODER_FORMAT_VERSION = 1  # likewise for finetune_decoder
UNET_FORMAT_VERSION = 1  # likewise for pretrain_unet_v2
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
DECODER_PREFIXES = ("post_quant_conv.", "decoder.")  # the VAE's decoding path: what finetune_decoder trains


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
class DecoderSettings:
    """The decoder fine-tune after pretraining (its own hash, so the pretraining recipe and hash stay as they are)."""

    seed: int = 0
    pretrain_images: int = 384  # the base's domain (new draws, not its pretraining images)
    generic_images: int = 512  # per texture: every shape, colour and background, concept-like ones included
    steps: int = 800
    batch_size: int = 8
    lr: float = 2e-3
    latent_noise: float = 0.05  # small jitter on the latent means: sampled latents are never exact


@dataclass(frozen=True)
class UNetSettings:
    """Base v2: the UNet pretrained anew from its init, 3x longer and on a wider domain (plain stars and plain magenta
    shapes as well), on v1's VAE and text encoders. v1's UNet (1000 steps, neither) drew blobs, so a 200-step demo
    LoRA on it learned the concept's colour and stripes but not its shape; with stars but without magenta, it learned
    shape and stripes but drew them blue or orange. The concept's stripes and trigger word stay new. v1 stays as it
    is: the LR sweep (docs/lr_transfer_v1.md) ran on it."""

    seed: int = 0  # the UNet's init and the training generator
    images: int = 768
    data_seed: int = 100
    shapes: tuple[str, ...] = synthetic.SHAPES
    colors: tuple[str, ...] = synthetic.PRETRAIN_CONCEPT.colors + ("magenta",)
    steps: int = 3000
    lr: float = 2e-3


@dataclass(frozen=True)
class DemoPaths:
    base: Path  # base v2: the demo's
    base_v1: Path  # base v1: the LR sweep's
    concept: Path
    concept_val: Path


def demo_paths(root: str | Path | None = None) -> DemoPaths:
    root = Path(root) if root is not None else DEFAULT_DEMO_ROOT
    return DemoPaths(base=root / "tiny_sdxl_base", base_v1=root / "tiny_sdxl_base_v1", concept=root / "concept",
                     concept_val=root / "concept_val")


@functools.cache  # it builds the tiny pipeline; decoder_hash and unet_hash ask for it again
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


def decoder_hash(settings: DemoSettings, decoder: DecoderSettings) -> str:
    """Content hash of the decoder step on top of the base recipe ``settings``."""
    payload = json.dumps({"v": DECODER_FORMAT_VERSION, "base": settings_hash(settings), "decoder": asdict(decoder)},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def unet_hash(settings: DemoSettings, decoder: DecoderSettings, unet: UNetSettings) -> str:
    """Content hash of base v2's UNet stage on top of the v1 recipe (``settings`` + ``decoder``)."""
    payload = json.dumps({"v": UNET_FORMAT_VERSION, "base": decoder_hash(settings, decoder), "unet": asdict(unet)},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _read_marker(folder: Path) -> dict:
    try:
        return json.loads((folder / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return {}


def _count_pngs(folder: Path, suffix: str = "") -> int:
    """Images (suffix "") or their loss masks (suffix "-masklabel") in `folder`."""
    if not folder.is_dir():
        return 0
    return sum(1 for p in folder.glob("*.png") if p.stem.endswith("-masklabel") == bool(suffix))


def prepare_demo_base(
    root: str | Path | None = None,
    settings: DemoSettings = DemoSettings(),
    *,
    from_scratch: bool = False,
    asset_path: Path = ASSET_PATH,
    decoder: DecoderSettings = DecoderSettings(),
    unet: UNetSettings | None = UNetSettings(),
    unet_asset_path: Path | None = UNET_ASSET_PATH,
) -> Path:
    """Build (or reuse) the demo base pipeline and the concept datasets; returns the base folder: base v2
    (``unet`` given: the demo's, ``tiny_sdxl_base``) or v1 (``unet=None``: the LR sweep's, ``tiny_sdxl_base_v1``).

    A second call with the same settings returns at once. ``from_scratch`` ignores the shipped weights and
    pretrains here (about half an hour for v1 and as long again for v2's UNet on a 2-core CPU);
    ``unet_asset_path=None`` pretrains only v2's UNet here.
    """
    paths = demo_paths(root)
    folder = paths.base if unet is not None else paths.base_v1
    digest, decoder_digest = settings_hash(settings), decoder_hash(settings, decoder)
    unet_digest = unet_hash(settings, decoder, unet) if unet is not None else None
    marker = _read_marker(folder)
    data_ready = (_count_pngs(paths.concept) == _count_pngs(paths.concept, "-masklabel") == settings.concept_images
                  and _count_pngs(paths.concept_val) == settings.concept_val_images)
    if (not from_scratch and data_ready and marker.get("settings_hash") == digest
            and marker.get("unet_hash") == unet_digest):
        if marker.get("decoder_hash") == decoder_digest:
            return folder
        if _refresh_decoder(folder, marker, asset_path, decoder_digest):
            return folder

    started = time.perf_counter()
    for data, count, seed in ((paths.concept, settings.concept_images, settings.concept_seed),
                              (paths.concept_val, settings.concept_val_images, settings.concept_val_seed)):
        shutil.rmtree(data, ignore_errors=True)
        # the training concept carries its stars' loss masks (data.masked_loss example preset)
        synthetic.write_concept_dataset(data, count=count, size=settings.image_size, seed=seed,
                                        masks=data == paths.concept)

    pipe = build_tiny_sdxl(settings.seed)
    source = "assets"
    if from_scratch or not _load_asset(pipe, asset_path, digest, decoder_digest):
        source = "pretrained"
        pretrain(pipe, settings)
        finetune_decoder(pipe.vae, settings, decoder)
    marker = {"settings_hash": digest, "decoder_hash": decoder_digest, "unet_hash": unet_digest, "source": source,
              "settings": asdict(settings), "decoder": asdict(decoder)}
    if unet is not None:
        if from_scratch or unet_asset_path is None or not _load_unet_asset(pipe, unet_asset_path, unet_digest):
            marker["source"] = f"{source} + pretrained UNet"
            pretrain_unet_v2(pipe, settings, unet)
        marker["unet"] = asdict(unet)
    _save_pipeline(pipe, folder, {**marker, "seconds": round(time.perf_counter() - started, 1)})
    return folder


def _refresh_decoder(base: Path, marker: dict, asset_path: Path, decoder_digest: str) -> bool:
    """Give a base prepared with another decoder the shipped one, in place: only the VAE's decoding weights change,
    so runs on this base keep their encoder, UNet and text encoders bit for bit. False if the asset lacks it."""
    shipped = _asset_tensors(asset_path, marker["settings_hash"], decoder_digest)
    weights = base / "vae" / "diffusion_pytorch_model.safetensors"
    if shipped is None or not weights.is_file():
        return False
    state = load_file(str(weights))
    decoding = {k: shipped[0][f"vae.{k}"] for k in state if k.startswith(DECODER_PREFIXES)}
    state.update({k: v.to(state[k].dtype) for k, v in decoding.items()})
    staging = weights.with_name(f".{weights.name}.partial")
    save_file(state, str(staging), metadata={"format": "pt"})
    staging.replace(weights)  # atomic: a run loading the base sees the old file or the new one
    marker = {**marker, "decoder_hash": decoder_digest, "decoder_from": asset_path.name}
    (base / MARKER_NAME).write_text(json.dumps(marker, indent=2))
    logger.info("demo base %s: VAE decoder refreshed from %s", base, asset_path)
    return True


def _save_pipeline(pipe: StableDiffusionXLPipeline, folder: Path, marker: dict) -> None:
    with staged_folder(folder) as staging:
        pipe.save_pretrained(staging, safe_serialization=True)
        (staging / MARKER_NAME).write_text(json.dumps(marker, indent=2))


# --------------------------------------------------------------------------------------------- shipped weights

def save_asset(pipe: StableDiffusionXLPipeline, digest: str, decoder_digest: str, path: Path = ASSET_PATH) -> Path:
    """Write the prepared weights of all trainable components into one fp16 safetensors file."""
    tensors = {
        f"{name}.{key}": value.detach().to(torch.float16).contiguous()
        for name in COMPONENTS
        for key, value in getattr(pipe, name).state_dict().items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"settings_hash": digest, "decoder_hash": decoder_digest,
                "vae_scaling_factor": repr(float(pipe.vae.config.scaling_factor))}
    save_file(tensors, str(path), metadata=metadata)
    return path


def _asset_tensors(path: Path, digest: str, decoder_digest: str) -> tuple[dict[str, torch.Tensor], float] | None:
    """The shipped tensors and VAE scaling factor if made with these settings; None otherwise."""
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        made_with = (metadata.get("settings_hash"), metadata.get("decoder_hash"))
        if made_with != (digest, decoder_digest):
            logger.warning("%s was made with other demo settings (%s/%s, now %s/%s)", path, *made_with, digest,
                           decoder_digest)
            return None
        return {key: handle.get_tensor(key) for key in handle.keys()}, float(metadata["vae_scaling_factor"])


def _load_asset(pipe: StableDiffusionXLPipeline, path: Path, digest: str, decoder_digest: str) -> bool:
    """Load shipped weights into ``pipe`` if they were made with these settings; False otherwise."""
    shipped = _asset_tensors(path, digest, decoder_digest)
    if shipped is None:
        return False
    tensors, scaling_factor = shipped
    for name in COMPONENTS:
        prefix = f"{name}."
        state = {k[len(prefix):]: v.float() for k, v in tensors.items() if k.startswith(prefix)}
        getattr(pipe, name).load_state_dict(state, strict=True)
    pipe.vae.register_to_config(scaling_factor=scaling_factor)
    return True


def save_module_asset(module: torch.nn.Module, path: Path, hash_key: str, digest: str) -> Path:
    """Write one pretrained component as an fp16 safetensors file whose metadata ``hash_key`` holds its recipe hash."""
    tensors = {key: value.detach().to(torch.float16).contiguous() for key, value in module.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={hash_key: digest})
    return path


def load_module_asset(module: torch.nn.Module, path: Path, hash_key: str, digest: str) -> bool:
    """Load a shipped component into ``module`` if it was made with this recipe; False otherwise."""
    if not path.is_file():
        return False
    with safe_open(str(path), framework="pt") as handle:
        made_with = (handle.metadata() or {}).get(hash_key)
        if made_with != digest:
            logger.warning("%s was made with another recipe (%s %s, now %s)", path, hash_key, made_with, digest)
            return False
        state = {key: handle.get_tensor(key).float() for key in handle.keys()}
    module.load_state_dict(state, strict=True)
    return True


def save_unet_asset(pipe: StableDiffusionXLPipeline, unet_digest: str, path: Path = UNET_ASSET_PATH) -> Path:
    """Write base v2's UNet into its own file (the other components are v1's, in ASSET_PATH)."""
    return save_module_asset(pipe.unet, path, "unet_hash", unet_digest)


def _load_unet_asset(pipe: StableDiffusionXLPipeline, path: Path, unet_digest: str) -> bool:
    return load_module_asset(pipe.unet, path, "unet_hash", unet_digest)


def write_asset_decoder(pretrained_base: Path, settings: DemoSettings = DemoSettings(),
                        decoder: DecoderSettings = DecoderSettings(), path: Path = ASSET_PATH) -> Path:
    """Run only the decoder step on ``pretrained_base`` (a base pretrained here before the decoder step existed)
    and put its result into the shipped file; every other tensor of the file is kept byte for byte."""
    from diffusers import AutoencoderKL

    digest, marker = settings_hash(settings), _read_marker(pretrained_base)
    if marker.get("settings_hash") != digest or marker.get("source") != "pretrained" or "decoder_hash" in marker:
        raise ValueError(f"{pretrained_base}: not a demo base pretrained with settings {digest} before the decoder "
                         f"step (its marker: {marker or 'missing'})")
    with safe_open(str(path), framework="pt") as handle:
        if (handle.metadata() or {}).get("settings_hash") != digest:
            raise ValueError(f"{path}: made with other demo settings than {digest}")
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = dict(handle.metadata())
    vae = AutoencoderKL.from_pretrained(pretrained_base / "vae")
    finetune_decoder(vae, settings, decoder)
    for key, value in vae.state_dict().items():
        if key.startswith(DECODER_PREFIXES):
            tensors[f"vae.{key}"] = value.to(torch.float16).contiguous()
    save_file(tensors, str(path), metadata={**metadata, "decoder_hash": decoder_hash(settings, decoder)})
    return path


# ---------------------------------------------------------------------------------------------- pretraining

def _image_tensor(paths: list[Path]) -> torch.Tensor:
    arrays = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


def _cosine_lr(step: int, total: int, peak: float, warmup: int = 50) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_steps(parameters: list[torch.nn.Parameter], step_loss: Callable[[], torch.Tensor], *, steps: int, lr: float,
                name: str, weight_decay: float = 0.0, clip: float | None = None, log_every: int = 100) -> list[float]:
    """The demo's pretraining loop: AdamW on ``parameters`` for ``steps`` steps of the cosine schedule (peak ``lr``),
    each on ``step_loss()`` (which draws its own batch), gradients clipped to ``clip`` if given, a log line every
    ``log_every`` steps. Returns every step's loss."""
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _cosine_lr(step, steps, lr)
        loss = step_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(parameters, clip)
        optimizer.step()
        losses.append(loss.item())
        if step % log_every == 0 or step == steps - 1:
            logger.info("demo %s step %d/%d loss %.4f", name, step + 1, steps, losses[-1])
    return losses


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


def pretrain_unet_v2(pipe: StableDiffusionXLPipeline, settings: DemoSettings, unet: UNetSettings,
                     workdir: Path | None = None) -> None:
    """Base v2's UNet stage: replace the UNet by a fresh init and pretrain it on the wider domain (plain
    ``unet.shapes`` in ``unet.colors`` on the pretraining backgrounds) with v1's frozen VAE and text encoders."""
    import tempfile

    domain = dataclasses.replace(synthetic.PRETRAIN_CONCEPT, name="pretrain_v2", shapes=unet.shapes,
                                 colors=unet.colors)
    with tempfile.TemporaryDirectory() as scratch:
        paths = synthetic.write_dataset(Path(workdir or scratch) / domain.name, domain, count=unet.images,
                                        size=settings.image_size, seed=unet.data_seed)
        images = _image_tensor(paths)
        captions = [p.with_suffix(".txt").read_text().strip() for p in paths]
    pipe.register_modules(unet=build_tiny_sdxl(unet.seed).unet)
    stage = dataclasses.replace(settings, unet_steps=unet.steps, unet_lr=unet.lr)
    _train_unet(pipe, images, captions, stage, torch.Generator().manual_seed(unet.seed))


def _train_vae(pipe, images: torch.Tensor, settings: DemoSettings, generator: torch.Generator) -> None:
    vae = pipe.vae
    vae.train()

    def reconstruction_loss() -> torch.Tensor:
        batch = images[torch.randint(len(images), (settings.vae_batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        return F.mse_loss(reconstruction, batch) + settings.vae_kl_weight * posterior.kl().mean()

    train_steps(list(vae.parameters()), reconstruction_loss, steps=settings.vae_steps, lr=settings.vae_lr, name="vae",
                log_every=50)
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

    def denoising_loss() -> torch.Tensor:
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
        return F.mse_loss(prediction, noise)

    train_steps(list(unet.parameters()), denoising_loss, steps=settings.unet_steps, lr=settings.unet_lr, name="unet",
                weight_decay=0.01, clip=1.0)
    unet.eval()
    unet.requires_grad_(False)


# ------------------------------------------------------------------------------------------- decoder fine-tune

def decoder_training_images(settings: DemoSettings, decoder: DecoderSettings, workdir: Path) -> torch.Tensor:
    """New draws of the base's domain plus every shape, colour, background and texture (never the concept's
    held-out validation images: those come from the concept's own seed)."""
    paths = synthetic.write_pretrain_dataset(workdir / "pretrain", count=decoder.pretrain_images,
                                             size=settings.image_size, seed=settings.seed + 300)
    for texture in synthetic.TEXTURES:
        concept = synthetic.Concept(name=f"generic_{texture}", shapes=synthetic.SHAPES,
                                    colors=tuple(synthetic.COLORS), backgrounds=tuple(synthetic.BACKGROUNDS),
                                    texture=texture)
        paths += synthetic.write_dataset(workdir / concept.name, concept, count=decoder.generic_images,
                                         size=settings.image_size, seed=settings.seed + 301)
    return _image_tensor(paths)


def finetune_decoder(vae, settings: DemoSettings, decoder: DecoderSettings, workdir: Path | None = None) -> None:
    """Train the VAE's decoding path (post_quant_conv + decoder) to reconstruct images from the frozen encoder's
    latent means, which is what the UNet learned to produce; the encoder and the scaling factor stay as they are."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        images = decoder_training_images(settings, decoder, Path(workdir or scratch))
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in images.split(64)])
    trained = [p for name, p in vae.named_parameters() if name.startswith(DECODER_PREFIXES)]
    vae.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    generator = torch.Generator().manual_seed(decoder.seed)
    vae.train()

    def decoding_loss() -> torch.Tensor:
        index = torch.randint(len(images), (decoder.batch_size,), generator=generator)
        noisy = latents[index] + decoder.latent_noise * torch.randn(latents[index].shape, generator=generator)
        return F.mse_loss(vae.decode(noisy).sample, images[index])

    train_steps(trained, decoding_loss, steps=decoder.steps, lr=decoder.lr, name="decoder")
    vae.eval()
    vae.requires_grad_(False)
