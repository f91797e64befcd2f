"""Z-Image (ZImageTransformer2DModel): one Qwen3 text encoder read at its penultimate layer through the chat
template, a single-stream transformer that takes per-sample lists (latents with a frame axis, captions without
padding), and a flipped time convention (it is given 1 - sigma and predicts x0 - noise, the negated velocity)."""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from tuneonce.config.families.zimage import ZIMAGE
from tuneonce.model.families.base import TextEmbeddings
from tuneonce.model.families.flow import FlowMatchingFamily


def masked_rows(hidden: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Each sample's hidden states at its unmasked positions (the variable-length captions the pipelines pass)."""
    keep = mask.bool()
    return [hidden[i][keep[i]] for i in range(hidden.shape[0])]


class ZImageFamily(FlowMatchingFamily):
    facts = ZIMAGE
    t5_tokenizer = "tokenizer"  # the long-context tokenizer whose length sampling_kwargs passes
    t5_max_length = 512  # ZImagePipeline's default max_sequence_length
    text_layer: ClassVar[int] = -2  # hidden_states index the pipeline reads

    def encode_text(self, components: dict[str, Any], captions: list[str]) -> TextEmbeddings:
        """Penultimate Qwen3 states of the chat-formatted prompts, padded to a fixed length with their mask (so
        cached embeddings batch); `predict` drops the padding again, as the pipeline does."""
        encoder, tokenizer = components["text_encoder"], components["tokenizer"]
        chats = [
            tokenizer.apply_chat_template([{"role": "user", "content": caption}], tokenize=False, add_generation_prompt=True,
                                          enable_thinking=True)  # fmt: skip
            for caption in captions
        ]
        tokens = self.tokenize_one(components, "tokenizer", chats)
        mask = tokens.attention_mask.to(encoder.device)
        out = encoder(input_ids=tokens.input_ids.to(encoder.device), attention_mask=mask.bool(), output_hidden_states=True)
        return {"encoder_hidden_states": out.hidden_states[self.text_layer], "attention_mask": mask.to(out.hidden_states[-1].dtype)}

    def predict(
        self, backbone: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, text: TextEmbeddings, conditioning: dict
    ) -> torch.Tensor:
        dtype = noisy.dtype
        captions = masked_rows(text["encoder_hidden_states"].to(dtype), text["attention_mask"])
        out = backbone(
            list(noisy.unsqueeze(2).unbind(0)),  # (C, F=1, H, W) per sample
            (1 - timesteps).to(dtype),  # the transformer's t runs from noise (0) to data (1)
            captions,
            return_dict=False,
            **conditioning,
        )[0]
        return -torch.stack(out).squeeze(2)  # it predicts x0 - noise; the loop's target is noise - x0

    def guidance_kwargs(self, cfg: float) -> dict[str, Any]:
        """ZImagePipeline mixes pos + g * (pos - neg): g = cfg - 1 (0 turns guidance off, as Z-Image-Turbo samples)."""
        return {"guidance_scale": max(cfg - 1.0, 0.0)}
