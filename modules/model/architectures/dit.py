"""Diffusion transformers (diffusers classes): block lists and default LoRA targets.

Joint two-stream blocks (Flux/SD3 "double" blocks) count once each. ``refiners`` are the lists that
refine one stream before the main stack (Z-Image/Lumina2 noise/context refiners): the longest adds.

The LoRA targets of the classes a trainable family uses are that family's row (tuneonce.config.families), so
inspect_model and training read one list; tests/test_family_rows.py checks the block lists against the rows.
"""
from __future__ import annotations

from tuneonce.config.families import FAMILY_FACTS

_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
_JOINT_ATTN = _ATTN + ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
_GELU_FF = ("ff.net.0.proj", "ff.net.2")


ENTRIES: dict[str, dict] = {
    # Flux.1 dev/schnell: 19 double + 38 single = 57
    "FluxTransformer2DModel": {
        "blocks": ("transformer_blocks", "single_transformer_blocks"),
        "lora_targets": FAMILY_FACTS["flux"].backbone_default_targets,
    },
    # Chroma: Flux layout; the distilled guidance MLP is off the main path
    "ChromaTransformer2DModel": {
        "blocks": ("transformer_blocks", "single_transformer_blocks"),
        "lora_targets": FAMILY_FACTS["chroma"].backbone_default_targets,
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
        # the suffixes also reach SD3.5 Medium's second attention (attn2.to_q ...) of its dual-attention blocks
        "lora_targets": FAMILY_FACTS["sd3"].backbone_default_targets,
    },
    "ZImageTransformer2DModel": {
        "blocks": ("layers",),
        "refiners": ("noise_refiner", "context_refiner"),
        "lora_targets": FAMILY_FACTS["zimage"].backbone_default_targets,
    },
    "Lumina2Transformer2DModel": {
        "blocks": ("layers",),
        "refiners": ("noise_refiner", "context_refiner"),
        "lora_targets": _ATTN + ("feed_forward.linear_1", "feed_forward.linear_2", "feed_forward.linear_3"),
    },
    "QwenImageTransformer2DModel": {
        "blocks": ("transformer_blocks",),
        "lora_targets": FAMILY_FACTS["qwenimage"].backbone_default_targets,
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
