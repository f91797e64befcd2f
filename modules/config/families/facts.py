"""The FamilyFacts row type (torch-free: read by config validation before torch is imported)."""
from __future__ import annotations

from dataclasses import dataclass

# LoRA target presets shared by several rows (module-name suffixes, PEFT/diffusers names).
UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
UNET_FEED_FORWARD = ("ff.net.0.proj", "ff.net.2")
CLIP_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
CLIP_FEED_FORWARD = ("fc1", "fc2")
# CLIP layers: transformers 4 (and 5's CLIPTextModelWithProjection) under text_model., 5's CLIPTextModel without.
CLIP_BLOCKS = ("text_model.encoder.layers.", "encoder.layers.")
JOINT_ATTENTION = UNET_ATTENTION + ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
JOINT_FEED_FORWARD = UNET_FEED_FORWARD + ("ff_context.net.0.proj", "ff_context.net.2")
T5_ATTENTION = ("SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o")
T5_FEED_FORWARD = ("DenseReluDense.wi_0", "DenseReluDense.wi_1", "DenseReluDense.wo")
LLM_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
LLM_FEED_FORWARD = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class FamilyFacts:
    """What one model family is. Field names the family classes share are copied onto them (ModelFamily)."""

    name: str  # config model.family
    pipeline_class_name: str  # diffusers pipeline class (model_index.json "_class_name")
    backbone_class: str  # diffusers class of the denoiser (kohya/modelspec detection, the dit/unet tables)
    objective: str  # "eps/v" (read from the scheduler) or "flow" (flow matching)
    backbone: str = "unet"  # pipeline component that is trained
    text_encoders: tuple[str, ...] = ("text_encoder",)  # every text encoder component
    tokenizers: tuple[str, ...] = ("tokenizer",)
    # Text encoders whose LoRA the family's diffusers loader reads back (config lora.train_text_encoders).
    lora_text_encoders: tuple[str, ...] = ("text_encoder",)
    # LoRA target presets (config lora.targets) as module-name suffixes; "all_linear" = every Linear layer.
    backbone_attention: tuple[str, ...] = UNET_ATTENTION
    backbone_feed_forward: tuple[str, ...] = UNET_FEED_FORWARD
    backbone_projections: tuple[str, ...] = ("proj_in", "proj_out")
    text_attention: tuple[str, ...] = CLIP_ATTENTION
    text_feed_forward: tuple[str, ...] = CLIP_FEED_FORWARD
    # Where the residual blocks live ("all_linear" adapts every Linear under these prefixes).
    backbone_blocks: tuple[str, ...] = ("down_blocks.", "mid_block.", "up_blocks.")
    text_encoder_blocks: tuple[str, ...] = CLIP_BLOCKS
    # kohya sd-scripts' ss_base_model_version and ss_network_module; modelspec.architecture.
    kohya_version: str = ""
    kohya_network_module: str = "networks.lora"
    modelspec_architecture: str = ""
    modelspec_without_guidance: str | None = None  # a variant without guidance embedding (Flux schnell)
    kohya_lora: bool = True  # LoRA files in kohya's layout are written (saving.format: kohya)
    lycoris: bool = False  # LoHa/LoKr files (kohya-layout UNets, tuneonce.model.lycoris_files)
    single_file_writer: str | None = None  # finetune as one original-layout file: "ldm", "bfl", "mmdit"
    builtin: str | None = None  # built-in architecture (tuneonce.model.builtin) the GUI falls back on

    @property
    def backbone_default_targets(self) -> tuple[str, ...]:
        """The "default" LoRA preset of the backbone (training's lora.targets default, inspect_model's table)."""
        return self.backbone_attention + self.backbone_feed_forward + self.backbone_projections

    @property
    def flow(self) -> bool:
        return self.objective == "flow"
