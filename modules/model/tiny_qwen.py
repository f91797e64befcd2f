"""Tiny, deterministic Z-Image and Qwen-Image pipelines built from the real diffusers and transformers classes.

Same architectures as the published checkpoints at toy widths:
- Z-Image: ZImageTransformer2DModel (noise/context refiners + single-stream layers, 2x2 patches), a Qwen3Model text
  encoder read at hidden_states[-2] through the Qwen3 chat template, Flux's 16-channel AutoencoderKL factors and
  the published static shift 3.0 (Z-Image-Turbo's scheduler).
- Qwen-Image: QwenImageTransformer2DModel (MMDiT), a Qwen2.5-VL text encoder (text part used; a one-block vision
  tower exists because the class has one), AutoencoderKLQwenImage (causal 3D VAE with a frame dimension and
  per-channel latent mean/std) and the published resolution-dependent shift settings.

The byte-level BPE tokenizer is written here (Qwen2Tokenizer over the demo words and the words of Qwen-Image's system
prompt, so that prompt prefix is exactly the 34 tokens the pipeline drops, as with the real tokenizer).
"""
from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen3Config, Qwen3Model

from tuneonce.model.tiny import FLUX_VAE_FACTORS, TOKENIZER_WORDS, _bpe, _bytes_to_unicode, flow_vae

QWEN_TOKENIZER_MAX_LENGTH = 96  # tiny context: Qwen-Image's 34-token system prefix + up to 62 prompt tokens
QWEN_HIDDEN = 32
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Words of Qwen-Image's system prompt and the chat roles, whole tokens as in the real vocabulary.
TEMPLATE_WORDS = ("system", "user", "assistant", "Describe", "by", "detailing", "color", "size", "texture", "quantity",
                  "text", "spatial", "relationships", "objects")  # fmt: skip
# Qwen3's chat template reduced to what prompts use: one user turn and the generation prompt (with thinking
# disabled it appends an empty think block, as the real template does).
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)

# Published scheduler settings: Z-Image-Turbo a fixed shift; Qwen-Image an exponential resolution-dependent one.
ZIMAGE_SHIFT = dict(shift=3.0, use_dynamic_shifting=False)
QWEN_IMAGE_SHIFT = dict(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
                        max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")  # fmt: skip


def byte_level_vocab_and_merges(words: tuple[str, ...]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """GPT-2-style byte-level BPE (Qwen's): every byte is a token, and merges make each word one token both alone and
    after a space ("Ġword"). As in tiny.py, a new merge ranks after all earlier ones, so earlier words stay whole."""
    alphabet = _bytes_to_unicode()
    tokens = list(alphabet.values())
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        for form in (word, alphabet[ord(" ")] + word):
            pieces = _bpe(list(form), ranks)
            while len(pieces) > 1:
                ranks[(pieces[0], pieces[1])] = len(ranks)
                tokens.append(pieces[0] + pieces[1])
                pieces = _bpe(pieces, ranks)
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens + list(QWEN_SPECIAL_TOKENS)))}
    return vocab, [pair for pair, _ in sorted(ranks.items(), key=lambda item: item[1])]


def build_tiny_qwen_tokenizer() -> Qwen2Tokenizer:
    """A Qwen2Tokenizer (right padding with <|endoftext|>, chat template) that saves and loads like the real one."""
    vocab, merges = byte_level_vocab_and_merges(TOKENIZER_WORDS + TEMPLATE_WORDS)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, model_max_length=QWEN_TOKENIZER_MAX_LENGTH,
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
    )  # fmt: skip
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def _special_ids(tokenizer: Qwen2Tokenizer) -> dict[str, int]:
    return {"bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"), "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>")}


def _qwen3(tokenizer: Qwen2Tokenizer) -> Qwen3Model:
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=QWEN_HIDDEN, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256, rope_theta=1e6,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, **_special_ids(tokenizer),
    )  # fmt: skip
    return Qwen3Model(config)


def _qwen25_vl(tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLForConditionalGeneration:
    vocab = len(tokenizer)
    text = dict(
        vocab_size=vocab + 4, hidden_size=QWEN_HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rope_theta=1e6,
        rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},  # halves of the 8-wide heads (real: 16, 24, 24)
        pad_token_id=tokenizer.pad_token_id, **_special_ids(tokenizer),
    )  # fmt: skip
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=QWEN_HIDDEN, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[0])  # fmt: skip
    # The image/video marker ids sit past the tokenizer's vocabulary: text prompts never contain them.
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=vocab, video_token_id=vocab + 1,
        vision_start_token_id=vocab + 2, vision_end_token_id=vocab + 3, tie_word_embeddings=False,
    )  # fmt: skip
    return Qwen2_5_VLForConditionalGeneration(config)


def build_zimage() -> ZImagePipeline:
    tokenizer = build_tiny_qwen_tokenizer()
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=2, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, cap_feat_dim=QWEN_HIDDEN, axes_dims=[8, 12, 12], axes_lens=[256, 64, 64],
    )  # fmt: skip
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **ZIMAGE_SHIFT), vae=flow_vae(FLUX_VAE_FACTORS),
        text_encoder=_qwen3(tokenizer), tokenizer=tokenizer, transformer=transformer,
    )  # fmt: skip


def _qwen_vae() -> AutoencoderKLQwenImage:
    # Two spatial downsamples (64 px -> 16x16 latents, like the other tiny VAEs); the published latent mean/std.
    return AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True])


def build_qwen_image() -> QwenImagePipeline:
    tokenizer = build_tiny_qwen_tokenizer()
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=3, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=QWEN_HIDDEN, axes_dims_rope=(4, 6, 6),
    )  # fmt: skip
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **QWEN_IMAGE_SHIFT), vae=_qwen_vae(),
        text_encoder=_qwen25_vl(tokenizer), tokenizer=tokenizer, transformer=transformer,
    )  # fmt: skip


# Built (seeded, eval mode) and saved through tiny_flow.build_tiny_flow_pipeline / tiny_flow_pipeline_dir.
QWEN_BUILDERS = {"zimage": build_zimage, "qwen-image": build_qwen_image}

