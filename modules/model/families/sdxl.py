"""SDXL: two CLIP text encoders (penultimate hidden states concatenated, pooled output of the second) and the
size/crop micro-conditioning `time_ids` = (original h, w, crop top, left, target h, w)."""
from __future__ import annotations

from typing import Any

import torch

from tuneonce.config.families.sdxl import SDXL
from tuneonce.model.families.base import ModelFamily, TextEmbeddings


def _pairs(values: Any, batch_size: int, device: torch.device) -> torch.Tensor:
    """(B, 2) float tensor from a tensor, a list of pairs, or one pair shared by the batch."""
    t = torch.as_tensor(values, dtype=torch.float32, device=device)
    if t.ndim == 1:
        t = t.expand(batch_size, 2)
    return t


class SDXLFamily(ModelFamily):
    facts = SDXL

    def encode_text(self, components: dict[str, Any], captions: list[str]) -> TextEmbeddings:
        hidden_states, pooled = [], None
        for name, ids in zip(self.text_encoders, self.tokenize(components, captions)):
            encoder = components[name]
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            hidden_states.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's projected pooled output, as in StableDiffusionXLPipeline
        return {"encoder_hidden_states": torch.cat(hidden_states, dim=-1), "pooled": pooled}

    def conditioning(self, batch: dict[str, Any], text: TextEmbeddings, device: torch.device, dtype: torch.dtype) -> dict:
        pooled = text["pooled"]
        size = pooled.shape[0]
        target = batch.get("target_size")
        if target is None:  # no size info: the image is its own target (pixels, or latents times the VAE factor 8)
            target = tuple(batch["pixel_values"].shape[-2:]) if "pixel_values" in batch else tuple(
                8 * side for side in batch["latents"].shape[-2:]
            )
        time_ids = torch.cat(
            [
                _pairs(batch.get("original_size", target), size, device),
                _pairs(batch.get("crop_top_left", (0, 0)), size, device),
                _pairs(target, size, device),
            ],
            dim=1,
        )
        return {"added_cond_kwargs": {"text_embeds": pooled.to(device, dtype), "time_ids": time_ids.to(dtype)}}
