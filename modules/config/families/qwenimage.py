"""Row of Qwen-Image (class: tuneonce.model.families.qwenimage)."""
from tuneonce.config.families.facts import LLM_ATTENTION, LLM_FEED_FORWARD, FamilyFacts
from tuneonce.config.families.flux import FLOW_TARGETS

QWENIMAGE = FamilyFacts(
    name="qwenimage",
    pipeline_class_name="QwenImagePipeline",
    backbone_class="QwenImageTransformer2DModel",
    objective="flow",
    **FLOW_TARGETS | dict(
        backbone_feed_forward=("img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"),
        text_attention=LLM_ATTENTION,
        text_feed_forward=LLM_FEED_FORWARD,
        text_encoder_blocks=("model.language_model.layers.", "model.layers."),  # transformers >= 4.52, older
    ),
    lora_text_encoders=(),  # diffusers' Qwen-Image LoRA loader takes the transformer only
    kohya_version="qwen_image",
    modelspec_architecture="qwen-image",
    kohya_lora=False,
)
