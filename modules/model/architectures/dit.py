"""Diffusion transformers (diffusers classes): block lists and default LoRA targets.

Joint two-stream blocks (Flux/SD3 "double" blocks) count once each. ``refiners`` are the lists that
refine one stream before the main stack (Z-Image/Lumina2 noise/context refiners): the longest adds.
"""
from __future__ import annotations

_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
_JOINT_ATTN = _ATTN + ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
_GELU_FF = ("ff.net.0.proj", "ff.net.2")
_GELU_FF_CONTEXT = ("ff_context.net.0.proj", "ff_context.net.2")

_FLUX_LORA = _JOINT_ATTN + _GELU_FF + _GELU_FF_CONTEXT + ("proj_mlp", "proj_out")

ENTRIES: dict[str, dict] = {
    # Flux.1 dev/schnell: 19 double + 38 single = 57
    "FluxTransformer2DModel": {
        "blocks": ("transformer_blocks", "single_transformer_blocks"),
        "lora_targets": _FLUX_LORA,
    },
    # Chroma: Flux layout; the distilled guidance MLP is off the main path
    "ChromaTransformer2DModel": {
        "blocks": ("transformer_blocks", "single_transformer_blocks"),
        "lora_targets": _FLUX_LORA,
    },
    # Flux.2 dev / Klein: fused qkv+mlp projection in the single blocks
    "Flux2Transformer2DModel": {
        "blocks": ("transformer_blocks", "single_transformer_blocks"),
        "lora_targets": _JOINT_ATTN
        + ("ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out")
        + ("attn.to_qkv_mlp_proj", "attn.to_out"),
    },
    "SD3Transformer2DModel": {
        "blocks": ("transformer_blocks",),
        "lora_targets": _JOINT_ATTN + ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
        + _GELU_FF + _GELU_FF_CONTEXT,
    },
    "ZImageTransformer2DModel": {
        "blocks": ("layers",),
        "refiners": ("noise_refiner", "context_refiner"),
        "lora_targets": _ATTN + ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3"),
    },
    "Lumina2Transformer2DModel": {
        "blocks": ("layers",),
        "refiners": ("noise_refiner", "context_refiner"),
        "lora_targets": _ATTN + ("feed_forward.linear_1", "feed_forward.linear_2", "feed_forward.linear_3"),
    },
    "QwenImageTransformer2DModel": {
        "blocks": ("transformer_blocks",),
        "lora_targets": _JOINT_ATTN + ("img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"),
    },
    "HiDreamImageTransformer2DModel": {
        "blocks": ("double_stream_blocks", "single_stream_blocks"),
        "lora_targets": ("to_q", "to_k", "to_v", "to_out", "to_q_t", "to_k_t", "to_v_t", "to_out_t", "w1", "w2", "w3"),
    },
    "PixArtTransformer2DModel": {
        "blocks": ("transformer_blocks",),
        "lora_targets": _ATTN + _GELU_FF,
    },
    "SanaTransformer2DModel": {
        "blocks": ("transformer_blocks",),
        "lora_targets": _ATTN + ("ff.conv_inverted", "ff.conv_point"),
    },
    "AuraFlowTransformer2DModel": {
        "blocks": ("joint_transformer_blocks", "single_transformer_blocks"),
        "lora_targets": _JOINT_ATTN
        + ("ff.linear_1", "ff.linear_2", "ff.out_projection")
        + ("ff_context.linear_1", "ff_context.linear_2", "ff_context.out_projection"),
    },
    "WanTransformer3DModel": {
        "blocks": ("blocks",),
        "lora_targets": _ATTN + ("ffn.net.0.proj", "ffn.net.2"),
    },
}
