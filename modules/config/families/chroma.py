"""Row of Chroma (class: tuneonce.model.families.chroma): Flux's layout, T5 only."""
from dataclasses import replace

from tuneonce.config.families.flux import FLUX

CHROMA = replace(
    FLUX,
    name="chroma",
    pipeline_class_name="ChromaPipeline",
    backbone_class="ChromaTransformer2DModel",
    text_encoders=("text_encoder",),
    tokenizers=("tokenizer",),
    lora_text_encoders=(),
    kohya_version="chroma",
    kohya_network_module="networks.lora_flux",  # kohya's Flux trainer writes lora_flux for Chroma too
    modelspec_architecture="chroma",
    modelspec_without_guidance=None,
)
