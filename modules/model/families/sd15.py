"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, last hidden state as context."""
from __future__ import annotations

from typing import Any

from tuneonce.config.families.sd15 import SD2, SD15
from tuneonce.model.families.base import ModelFamily, TextEmbeddings


class SD15Family(ModelFamily):
    facts = SD15

    def build_pipeline(self, components: dict[str, Any]):
        # Training runs never carry a safety checker; say so, or diffusers warns on every sample.
        return self.pipeline_class(**components | {"requires_safety_checker": False})

    def encode_text(self, components: dict[str, Any], captions: list[str]) -> TextEmbeddings:
        encoder = components["text_encoder"]
        (ids,) = self.tokenize(components, captions)
        hidden = encoder(ids.to(encoder.device), return_dict=False)[0]
        return {"encoder_hidden_states": hidden}


class SD2Family(SD15Family):
    """SD 2.x differs only in its text encoder (OpenCLIP-H) and default v-prediction, both read from the folder."""

    facts = SD2
