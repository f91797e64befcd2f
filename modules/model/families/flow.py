"""What Flux, Chroma and SD3 share: a transformer backbone trained on the flow-matching objective, T5 text, and
Flux-style 2x2 latent packing with RoPE position ids (Flux, Chroma).

The loop still hands every family unpacked (B, C, H, W) latents: packing happens inside `predict`, so the objective,
validation, the latent cache and noise offset stay model-agnostic.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from tuneonce.model.families.base import ModelFamily
from tuneonce.model.flow_objective import FlowMatchObjective



def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): each 2x2 patch becomes one token (FluxPipeline's layout)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even to pack 2x2 patches, got {h}x{w}")
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of pack_latents for latents of height x width."""
    b, _, channels = tokens.shape
    patches = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels // 4, height, width)


def latent_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(H/2 * W/2, 3) RoPE ids of the packed tokens: (0, row, column)."""
    rows, cols = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=dtype)


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside a DDP / accelerate wrapper (for its config)."""
    return getattr(module, "module", module)


class FlowMatchingFamily(ModelFamily):
    # Targets, blocks and text encoders come from the rows (tuneonce.config.families.flux.FLOW_TARGETS).
    t5_tokenizer: ClassVar[str] = "tokenizer_2"
    t5_max_length: ClassVar[int] = 512  # the pipeline's default max_sequence_length
    latent_patch_size: ClassVar[int] = 2  # latent pixels per token side (for the resolution-dependent shift)

    def default_prediction_type(self, components: dict[str, Any]) -> str:
        return "flow"

    def build_objective(self, components: dict[str, Any], *, prediction_type: str = "auto", **options) -> FlowMatchObjective:
        """Flow matching with the shift settings of the folder's scheduler; `options` as DiffusionObjective's."""
        if prediction_type not in ("auto", "flow"):
            raise ValueError(f"training.prediction_type: {self.name} trains on the flow-matching velocity; use auto, not {prediction_type!r}")
        if options.pop("min_snr_gamma", None) is not None:
            raise ValueError(f"training.min_snr_gamma: min-SNR weighting is for epsilon/v-prediction models, not {self.name}; set it null")
        return FlowMatchObjective.from_scheduler_config(components["scheduler"].config, patch_size=self.latent_patch_size, **options)

    def sequence_length(self, components: dict[str, Any], tokenizer: str) -> int:
        """Tokens per prompt: the T5 length the pipeline samples with (capped by the tokenizer), CLIP's 77."""
        model_max = int(components[tokenizer].model_max_length)
        return min(model_max, self.t5_max_length) if tokenizer == self.t5_tokenizer else model_max

    def tokenize(self, components: dict[str, Any], captions: list[str]) -> list[torch.Tensor]:
        return [self.tokenize_one(components, name, captions).input_ids for name in self.tokenizers]

    def tokenize_one(self, components: dict[str, Any], name: str, captions: list[str]):
        length = self.sequence_length(components, name)
        return components[name](captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt")

    def sampling_kwargs(self, components: dict[str, Any]) -> dict[str, Any]:
        return {"max_sequence_length": self.sequence_length(components, self.t5_tokenizer)}
