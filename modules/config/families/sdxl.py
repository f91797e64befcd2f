"""Row of SDXL (class: tuneonce.model.families.sdxl)."""
from tuneonce.config.families.facts import FamilyFacts

SDXL = FamilyFacts(
    name="sdxl",
    pipeline_class_name="StableDiffusionXLPipeline",
    backbone_class="UNet2DConditionModel",
    objective="eps/v",
    text_encoders=("text_encoder", "text_encoder_2"),
    tokenizers=("tokenizer", "tokenizer_2"),
    lora_text_encoders=("text_encoder", "text_encoder_2"),
    kohya_version="sdxl_base_v1-0",
    modelspec_architecture="stable-diffusion-xl-v1-base",
    lycoris=True,
    single_file_writer="ldm",
    builtin="sdxl",
)
