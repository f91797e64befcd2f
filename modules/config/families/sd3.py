"""Row of SD3 / SD3.5 (class: tuneonce.model.families.sd3)."""
from tuneonce.config.families.facts import FamilyFacts
from tuneonce.config.families.flux import FLOW_TARGETS

SD3 = FamilyFacts(
    name="sd3",
    pipeline_class_name="StableDiffusion3Pipeline",
    backbone_class="SD3Transformer2DModel",
    objective="flow",
    **FLOW_TARGETS,
    text_encoders=("text_encoder", "text_encoder_2", "text_encoder_3"),
    tokenizers=("tokenizer", "tokenizer_2", "tokenizer_3"),
    lora_text_encoders=("text_encoder", "text_encoder_2"),  # CLIP-L, CLIP-G (diffusers' SD3 loader skips T5)
    kohya_version="sd3",  # sd-scripts' SD3 value not verified here
    kohya_network_module="networks.lora_sd3",
    modelspec_architecture="stable-diffusion-3",
    kohya_lora=False,
    single_file_writer="mmdit",
)
