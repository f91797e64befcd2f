"""Row of Flux.1 dev/schnell (class: tuneonce.model.families.flux)."""
from tuneonce.config.families.facts import (
    CLIP_ATTENTION, CLIP_BLOCKS, CLIP_FEED_FORWARD, JOINT_ATTENTION, JOINT_FEED_FORWARD, T5_ATTENTION, T5_FEED_FORWARD,
    FamilyFacts,
)

# What the flow-matching transformer families share (MM-DiT joint blocks, CLIP and/or T5 text).
FLOW_TARGETS = dict(
    backbone="transformer",
    backbone_attention=JOINT_ATTENTION,
    backbone_feed_forward=JOINT_FEED_FORWARD,
    backbone_projections=(),
    backbone_blocks=("transformer_blocks.",),
    text_attention=CLIP_ATTENTION + T5_ATTENTION,
    text_feed_forward=CLIP_FEED_FORWARD + T5_FEED_FORWARD,
    text_encoder_blocks=CLIP_BLOCKS + ("encoder.block.",),  # + T5
)

FLUX = FamilyFacts(
    name="flux",
    pipeline_class_name="FluxPipeline",
    backbone_class="FluxTransformer2DModel",
    objective="flow",
    **FLOW_TARGETS | dict(
        backbone_projections=("proj_mlp", "proj_out"),  # the single-stream blocks' fused MLP in / attention+MLP out
        backbone_blocks=("transformer_blocks.", "single_transformer_blocks."),
    ),
    text_encoders=("text_encoder", "text_encoder_2"),
    tokenizers=("tokenizer", "tokenizer_2"),
    lora_text_encoders=("text_encoder",),  # CLIP-L; its T5 (text_encoder_2) LoRA is not loaded by diffusers' loader
    kohya_version="flux1",
    kohya_network_module="networks.lora_flux",
    modelspec_architecture="flux-1-dev",
    modelspec_without_guidance="flux-1-schnell",
    single_file_writer="bfl",
)
