"""Chroma: Flux's layout without CLIP and without modulation per block (ChromaTransformer2DModel); T5 only, with
the text attention mask the pipeline uses (padding masked except the first pad token)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tuneonce.config.families.chroma import CHROMA
from tuneonce.model.families.base import TextEmbeddings
from tuneonce.model.families.flux import FluxFamily


class ChromaFamily(FluxFamily):
    facts = CHROMA
    t5_tokenizer = "tokenizer"

    def encode_text(self, components: dict[str, Any], captions: list[str]) -> TextEmbeddings:
        t5 = components["text_encoder"]
        tokens = self.tokenize_one(components, "tokenizer", captions)
        mask = tokens.attention_mask.to(t5.device)
        hidden = t5(tokens.input_ids.to(t5.device), attention_mask=mask, output_hidden_states=False)[0]
        # As ChromaPipeline: the transformer sees the prompt and its first padding token, the rest is masked.
        positions = torch.arange(mask.shape[1], device=mask.device).expand(mask.shape[0], -1)
        keep = (positions <= mask.sum(dim=1, keepdim=True)).to(hidden.dtype)
        return {"encoder_hidden_states": hidden, "attention_mask": keep}

    def backbone_kwargs(self, backbone: nn.Module, text: TextEmbeddings, noisy: torch.Tensor) -> dict:
        """No pooled CLIP or guidance; the text mask extended by the always-visible image tokens
        (ChromaPipeline._prepare_attention_mask)."""
        batch, _, height, width = noisy.shape
        image_tokens = (height // 2) * (width // 2)
        text_mask = text["attention_mask"].to(noisy.device, noisy.dtype)
        image_mask = torch.ones(batch, image_tokens, device=noisy.device, dtype=noisy.dtype)
        return {"attention_mask": torch.cat([text_mask, image_mask], dim=1)}
