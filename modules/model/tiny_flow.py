"""Tiny, deterministic Flux / Chroma / SD3 pipelines built from the real diffusers and transformers classes.

Same architectures as the published checkpoints at toy widths: FluxTransformer2DModel (double + single stream
blocks, RoPE image/text ids, guidance embedding for dev, none for schnell), ChromaTransformer2DModel (T5 only,
pruned modulation), SD3Transformer2DModel (joint blocks, CLIP-L + CLIP-G + T5), an AutoencoderKL with 16 latent
channels and the published scaling/shift factors, FlowMatchEulerDiscreteScheduler with the published shift
settings. Tokenizers are written here (CLIP BPE from tiny.py, a small unigram T5 tokenizer), so nothing is
downloaded and `save_pretrained` / `from_pretrained` round-trip like real folders.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    ChromaPipeline,
    ChromaTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5Tokenizer

from tuneonce.model.tiny import (
    FLUX_VAE_FACTORS, SD3_VAE_FACTORS, TOKENIZER_WORDS, _text_config, build_tiny_tokenizer, flow_vae as _vae,
)
from tuneonce.model.tiny_qwen import QWEN_BUILDERS
from tuneonce.util.files import staged_folder

FLOW_KINDS: tuple[str, ...] = ("flux-dev", "flux-schnell", "chroma", "sd3", "zimage", "qwen-image")  # last two: tiny_qwen.py
T5_MAX_LENGTH = 32  # tiny T5 context (the real ones use 256 / 512)
T5_HIDDEN = 32

# Published scheduler settings (FLUX.1-dev and Chroma: resolution-dependent shift; schnell: none; SD3: 3.0).
DYNAMIC_SHIFT = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                     max_image_seq_len=4096)  # fmt: skip
SCHNELL_SHIFT = dict(shift=1.0, use_dynamic_shifting=False)
SD3_SHIFT = dict(shift=3.0, use_dynamic_shifting=False)


def build_tiny_t5_tokenizer(max_length: int = T5_MAX_LENGTH) -> T5Tokenizer:
    """A unigram T5 tokenizer (sentencepiece-style "▁word" pieces) over the demo words; any other text falls back
    to single characters, as every printable ASCII character is a piece."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(chr(c), -10.0) for c in range(33, 127)]
    pieces += [("▁" + word, -1.0) for word in TOKENIZER_WORDS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def _t5(tokenizer: T5Tokenizer) -> T5EncoderModel:
    config = T5Config(
        vocab_size=len(tokenizer), d_model=T5_HIDDEN, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        dense_act_fn="gelu_new", is_gated_act=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return T5EncoderModel(config)


def tiny_flux_transformer(guidance: bool, latent_channels: int = 16) -> FluxTransformer2DModel:
    """Flux's transformer at toy width: 2 double-stream + 4 single-stream blocks, tokens of 2x2 latent patches."""
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=2, num_single_layers=4, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=T5_HIDDEN, pooled_projection_dim=32, guidance_embeds=guidance,
        axes_dims_rope=(4, 6, 6),
    )  # fmt: skip


def _build_flux(guidance: bool) -> FluxPipeline:
    tokenizer = build_tiny_tokenizer()
    tokenizer_2 = build_tiny_t5_tokenizer()
    text_encoder = CLIPTextModel(_text_config(tokenizer, hidden=32, layers=2, projection_dim=32))
    transformer = tiny_flux_transformer(guidance)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **(DYNAMIC_SHIFT if guidance else SCHNELL_SHIFT))
    return FluxPipeline(
        scheduler=scheduler, vae=_vae(FLUX_VAE_FACTORS), text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=_t5(tokenizer_2), tokenizer_2=tokenizer_2, transformer=transformer,
    )  # fmt: skip


def _build_chroma() -> ChromaPipeline:
    tokenizer = build_tiny_t5_tokenizer()
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=T5_HIDDEN, axes_dims_rope=(4, 6, 6), approximator_num_channels=16,
        approximator_hidden_dim=32, approximator_layers=2,
    )  # fmt: skip
    return ChromaPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **DYNAMIC_SHIFT), vae=_vae(FLUX_VAE_FACTORS),
        text_encoder=_t5(tokenizer), tokenizer=tokenizer, transformer=transformer,
    )  # fmt: skip


def _build_sd3() -> StableDiffusion3Pipeline:
    tokenizer = build_tiny_tokenizer()
    tokenizer_2 = build_tiny_tokenizer(pad_token="!")
    tokenizer_3 = build_tiny_t5_tokenizer()
    # CLIP-L and CLIP-G hidden states are concatenated (16 + 16) and zero-padded to T5's width (32).
    text_encoder = CLIPTextModelWithProjection(_text_config(tokenizer, hidden=16, layers=2, projection_dim=16))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, hidden=16, layers=2, projection_dim=16))
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=T5_HIDDEN, caption_projection_dim=32, pooled_projection_dim=32, out_channels=16,
        pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm",  # SD3.5's dual attention + qk norm
    )  # fmt: skip
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **SD3_SHIFT),
        vae=_vae(SD3_VAE_FACTORS), text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, text_encoder_3=_t5(tokenizer_3), tokenizer_3=tokenizer_3,
    )  # fmt: skip


def build_tiny_flow_pipeline(kind: str, seed: int = 0):
    """A tiny pipeline of `kind` (FLOW_KINDS) with weights determined by `seed`."""
    builders = {"flux-dev": lambda: _build_flux(True), "flux-schnell": lambda: _build_flux(False),
                "chroma": _build_chroma, "sd3": _build_sd3, **QWEN_BUILDERS}  # fmt: skip
    if kind not in builders:
        raise ValueError(f"unknown tiny flow pipeline kind {kind!r}; expected one of {', '.join(FLOW_KINDS)}")
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state untouched
        torch.manual_seed(seed)
        pipe = builders[kind]()
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # as from_pretrained returns them
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flow_pipeline_dir(kind: str, where, seed: int = 0) -> Path:
    """A saved tiny pipeline folder under `where` (pytest's tmp_path_factory or a directory), built once."""
    base = Path(where.getbasetemp()) if hasattr(where, "getbasetemp") else Path(where)
    folder = base / f"tiny_{kind}_seed{seed}"
    if not (folder / "model_index.json").is_file():
        with staged_folder(folder) as staging:  # the folder appears complete or not at all
            build_tiny_flow_pipeline(kind, seed).save_pretrained(staging, safe_serialization=True)
    return folder
