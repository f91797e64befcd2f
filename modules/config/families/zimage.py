"""Row of Z-Image (class: tuneonce.model.families.zimage)."""
from tuneonce.config.families.facts import LLM_ATTENTION, LLM_FEED_FORWARD, FamilyFacts
from tuneonce.config.families.flux import FLOW_TARGETS

ZIMAGE = FamilyFacts(
    name="zimage",
    pipeline_class_name="ZImagePipeline",
    backbone_class="ZImageTransformer2DModel",
    objective="flow",
    **FLOW_TARGETS | dict(
        backbone_attention=("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0"),
        backbone_feed_forward=("feed_forward.w1", "feed_forward.w2", "feed_forward.w3"),
        backbone_blocks=("layers.", "noise_refiner.", "context_refiner."),
        text_attention=LLM_ATTENTION,
        text_feed_forward=LLM_FEED_FORWARD,
        text_encoder_blocks=("layers.", "model.layers."),
    ),
    lora_text_encoders=(),  # diffusers' Z-Image LoRA loader takes the transformer only
    kohya_version="z_image",  # no sd-scripts value known; named after the model
    modelspec_architecture="z-image",
    kohya_lora=False,
)
