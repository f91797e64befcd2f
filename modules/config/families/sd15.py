"""Rows of Stable Diffusion 1.x and 2.x (class: tuneonce.model.families.sd15)."""
from tuneonce.config.families.facts import FamilyFacts

SD15 = FamilyFacts(
    name="sd15",
    pipeline_class_name="StableDiffusionPipeline",
    backbone_class="UNet2DConditionModel",
    objective="eps/v",
    kohya_version="sd_v1",
    modelspec_architecture="stable-diffusion-v1",
    lycoris=True,
    single_file_writer="ldm",
    builtin="sd15",
)
# SD 2.x differs in its text encoder (OpenCLIP-H) and default v-prediction, both read from the folder; the LDM
# single-file writer knows CLIP-L only.
SD2 = FamilyFacts(
    name="sd2",
    pipeline_class_name="StableDiffusionPipeline",
    backbone_class="UNet2DConditionModel",
    objective="eps/v",
    kohya_version="sd_v2",
    modelspec_architecture="stable-diffusion-v2",
    lycoris=True,
    builtin="sd21",
)
