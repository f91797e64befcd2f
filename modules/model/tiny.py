"""Tiny, deterministic SDXL / SD1.5 pipelines built from the real diffusers and transformers classes.

They keep the architecture of the real models (UNet2DConditionModel with several down/up stages of resnets and
transformer blocks, SDXL's two CLIP text encoders and its text_time added conditioning, an AutoencoderKL, a CLIP
BPE tokenizer) at toy widths, so tests and the embedded demo exercise the same code paths as real checkpoints,
including ``save_pretrained`` / ``from_pretrained``. Nothing is downloaded: the tokenizer's vocab.json and
merges.txt are written here.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Literal

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from tuneonce.util.files import staged_folder

TinyKind = Literal["sdxl", "sd15"]
TINY_KINDS: tuple[str, ...] = ("sdxl", "sd15")

# Words the tokenizer knows as whole tokens (demo captions: shapes, colors, textures, trigger words). Any other
# text still tokenizes, character by character: every single byte is in the vocabulary.
TOKENIZER_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "on", "in", "with", "and", "photo", "picture", "image", "drawing", "painting",
    "shape", "shapes", "object", "background", "small", "large", "big", "tiny", "centered", "left", "right",
    "top", "bottom", "middle", "corner", "plain", "dark", "light", "bright", "pale",
    "circle", "circles", "square", "squares", "triangle", "triangles", "star", "stars", "ring", "rings",
    "cross", "diamond", "ellipse", "rectangle", "stripe", "stripes", "striped", "dot", "dots", "dotted",
    "checker", "checkered", "grid", "solid", "outline", "filled", "hollow", "gradient", "noise", "textured",
    "red", "green", "blue", "yellow", "orange", "purple", "pink", "cyan", "magenta", "white", "black", "gray",
    "grey", "brown", "teal", "gold", "silver",
    "sks", "ohwx", "zxq", "concept", "style", "token", "tuneonce", "demo",
)

VAE_SCALING_FACTOR_SDXL = 0.13025  # SDXL's value; the demo base replaces it with 1/std of its own latents
VAE_SCALING_FACTOR_SD15 = 0.18215
TOKENIZER_MAX_LENGTH = 77  # CLIP's context length, as in the real checkpoints


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte mapped to a printable unicode character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: repeatedly merge the adjacent pair with the lowest merge rank."""
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), len(ranks) + 1), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank > len(ranks):
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2:]
    return pieces


def tokenizer_vocab_and_merges(words: tuple[str, ...] = TOKENIZER_WORDS) -> tuple[dict[str, int], list[str]]:
    """A small CLIP BPE vocabulary: all bytes (alone and word-final) plus merges making each word one token.

    For each word, merges are added until BPE (with all merges so far) yields a single token. A new merge ranks
    after every earlier one, so it never fires inside an earlier word, which already reduces to one token by
    earlier merges: every listed word stays a single token.
    """
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        pieces = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            ranks[(pieces[0], pieces[1])] = len(ranks)
            tokens.append(pieces[0] + pieces[1])
            pieces = _bpe(pieces, ranks)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    return vocab, [f"{a} {b}" for (a, b), _ in sorted(ranks.items(), key=lambda item: item[1])]


def build_tiny_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A CLIPTokenizer loaded through from_pretrained from files written here (no hub access)."""
    vocab, merges = tokenizer_vocab_and_merges()
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        return CLIPTokenizer.from_pretrained(folder, model_max_length=TOKENIZER_MAX_LENGTH, pad_token=pad_token)


def _text_config(tokenizer: CLIPTokenizer, hidden: int, layers: int, projection_dim: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=TOKENIZER_MAX_LENGTH,
        projection_dim=projection_dim,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _tiny_vae(scaling_factor: float) -> AutoencoderKL:
    # Three stages: 4x downsampling (64 px images -> 16x16x4 latents), the encoder/decoder blocks of SD's VAE.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
        force_upcast=False,
    )


# Flux/SD3-style VAE latent statistics, published: (scaling_factor, shift_factor). Here (not in tiny_flow) so that
# tiny_flow and tiny_qwen both build on it without importing each other.
FLUX_VAE_FACTORS = (0.3611, 0.1159)
SD3_VAE_FACTORS = (1.5305, 0.0609)


def flow_vae(factors: tuple[float, float]) -> AutoencoderKL:
    # Flux/SD3's VAE: 16 latent channels, no quant convs; three stages (64 px -> 16x16 latents).
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=16, norm_num_groups=8, sample_size=64,
        scaling_factor=factors[0], shift_factor=factors[1], use_quant_conv=False, use_post_quant_conv=False,
        force_upcast=False,
    )  # fmt: skip


def _scheduler() -> EulerDiscreteScheduler:
    # The noise schedule of SD1.5 / SDXL checkpoints.
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        timestep_spacing="leading",
        steps_offset=1,
    )


def _build_sdxl() -> StableDiffusionXLPipeline:
    tokenizer = build_tiny_tokenizer()
    tokenizer_2 = build_tiny_tokenizer(pad_token="!")  # SDXL's second tokenizer pads with "!"
    text_encoder = CLIPTextModel(_text_config(tokenizer, hidden=32, layers=2, projection_dim=32))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, hidden=48, layers=2, projection_dim=32))
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        # SDXL's layout: a plain first stage, then cross-attention stages with deeper transformers further down.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 32, 64),
        layers_per_block=1,  # SDXL has 2; 1 keeps a training step well under 0.1 s on a 2-core CPU
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 2, 4),  # diffusers' legacy name: the number of heads, as in SDXL's config
        norm_num_groups=8,
        cross_attention_dim=32 + 48,  # concatenated hidden states of both encoders
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + 32,  # 6 size/crop ids + pooled te2 output
    )
    return StableDiffusionXLPipeline(
        vae=_tiny_vae(VAE_SCALING_FACTOR_SDXL),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_scheduler(),
        force_zeros_for_empty_prompt=True,
    )


def _build_sd15() -> StableDiffusionPipeline:
    tokenizer = build_tiny_tokenizer()
    text_encoder = CLIPTextModel(_text_config(tokenizer, hidden=32, layers=2, projection_dim=32))
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        attention_head_dim=(2, 2, 4),
        norm_num_groups=8,
        cross_attention_dim=32,
    )
    return StableDiffusionPipeline(
        vae=_tiny_vae(VAE_SCALING_FACTOR_SD15),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build(kind: str, seed: int):
    if kind not in TINY_KINDS:
        raise ValueError(f"unknown tiny pipeline kind {kind!r}; expected one of {', '.join(TINY_KINDS)}")
    # Weights come from torch's global RNG during construction; fork it so callers' RNG state is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = _build_sdxl() if kind == "sdxl" else _build_sd15()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_sdxl(seed: int = 0) -> StableDiffusionXLPipeline:
    """A tiny SDXL-architecture pipeline with weights determined by ``seed``."""
    return _build("sdxl", seed)


def build_tiny_sd15(seed: int = 0) -> StableDiffusionPipeline:
    """A tiny SD1.5-architecture pipeline with weights determined by ``seed``."""
    return _build("sd15", seed)


def build_tiny_pipeline(kind: str, seed: int = 0):
    """``build_tiny_sdxl`` or ``build_tiny_sd15`` by name ("sdxl" / "sd15")."""
    return _build(kind, seed)


def save_tiny_pipeline(kind: str, folder: str | Path, seed: int = 0) -> Path:
    """Build and ``save_pretrained`` a tiny pipeline as a diffusers folder; returns the folder."""
    folder = Path(folder)
    build_tiny_pipeline(kind, seed).save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_pipeline_dir(kind: str, where, seed: int = 0) -> Path:
    """Test fixture helper: a saved tiny pipeline folder, built once per ``where`` and reused.

    ``where`` is pytest's ``tmp_path_factory`` (the folder goes under its session base temp) or any directory.
    Load it with ``StableDiffusionXLPipeline.from_pretrained`` / ``StableDiffusionPipeline.from_pretrained``
    (or the family loaders), the path users take.
    """
    base = Path(where.getbasetemp()) if hasattr(where, "getbasetemp") else Path(where)
    folder = base / f"tiny_{kind}_seed{seed}"
    if not (folder / "model_index.json").is_file():
        with staged_folder(folder) as staging:  # the folder appears complete or not at all
            save_tiny_pipeline(kind, staging, seed)
    return folder
