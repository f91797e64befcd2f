"""Text encoders (transformers classes): the layer list a prompt passes through.

A pipeline that reads an intermediate hidden state uses only the layers up to it; that readout is a
property of the pipeline, declared in ``pipelines.py``.
"""
from __future__ import annotations

_CLIP_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
# transformers 5 flattened CLIPTextModel (encoder.layers); the projection variant keeps text_model.
_CLIP = {"blocks": ("encoder.layers", "text_model.encoder.layers"), "lora_targets": _CLIP_TARGETS}
_T5 = {"blocks": ("encoder.block",), "lora_targets": ("q", "k", "v", "o", "wi_0", "wi_1", "wo")}
# LLM decoders used as encoders; a multimodal wrapper's vision tower is excluded from the default LoRA
_LLM_TARGETS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)
_LLM_BARE = {"blocks": ("layers",), "lora_targets": _LLM_TARGETS}
_LLM_CAUSAL = {"blocks": ("model.layers",), "lora_targets": _LLM_TARGETS}
_LLM_MULTIMODAL = {
    "blocks": ("model.language_model.layers",),
    "lora_targets": _LLM_TARGETS,
    "lora_exclude": ("model.visual", "model.vision_tower", "model.multi_modal_projector"),
}

ENTRIES: dict[str, dict] = {
    "CLIPTextModel": _CLIP,
    "CLIPTextModelWithProjection": _CLIP,
    "T5EncoderModel": _T5,
    "UMT5EncoderModel": _T5,
    "Qwen3Model": _LLM_BARE,
    "Qwen3ForCausalLM": _LLM_CAUSAL,
    "Qwen2_5_VLForConditionalGeneration": _LLM_MULTIMODAL,
    "Mistral3ForConditionalGeneration": _LLM_MULTIMODAL,
    "LlamaModel": _LLM_BARE,
    "LlamaForCausalLM": _LLM_CAUSAL,
    "Gemma2Model": _LLM_BARE,
    "Gemma2ForCausalLM": _LLM_CAUSAL,
}
