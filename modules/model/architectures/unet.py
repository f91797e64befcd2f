"""UNets: SD1.x, SD2.x, SDXL (diffusers UNet2DConditionModel).

Skip connections are concatenations, so every resnet and every transformer block of the down, mid
and up paths is on the main path (SDXL: 17 resnets + 70 transformer blocks = 87).
"""
from __future__ import annotations

from tuneonce.config.families import FAMILY_FACTS

_UNET_BLOCKS = (
    "down_blocks.*.resnets",
    "down_blocks.*.attentions.*.transformer_blocks",
    "mid_block.resnets",
    "mid_block.attentions.*.transformer_blocks",
    "up_blocks.*.resnets",
    "up_blocks.*.attentions.*.transformer_blocks",
)
# attention (self + cross), feed-forward and the Transformer2DModel in/out projections: the SD rows' default preset
_UNET_LORA = FAMILY_FACTS["sd15"].backbone_default_targets

ENTRIES: dict[str, dict] = {
    "UNet2DConditionModel": {"blocks": _UNET_BLOCKS, "lora_targets": _UNET_LORA},
}
