"""Flux.1 (dev and schnell): CLIP-L pooled + T5 hidden states, packed 2x2 latents with RoPE ids, the guidance
embedding of dev (schnell has none; read from the transformer's config), resolution-dependent timestep shift (dev)."""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from tuneonce.config.families.flux import FLUX
from tuneonce.model.families.base import TextEmbeddings
from tuneonce.model.families.flow import FlowMatchingFamily, latent_image_ids, pack_latents, unpack_latents, unwrap


class FluxFamily(FlowMatchingFamily):
    facts = FLUX
    # Guidance the distilled dev model is conditioned on while training (OneTrainer's default; samples use the
    # prompt's cfg). Schnell has no guidance input.
    train_guidance: ClassVar[float] = 1.0

    def encode_text(self, components: dict[str, Any], captions: list[str]) -> TextEmbeddings:
        clip, t5 = components["text_encoder"], components["text_encoder_2"]
        clip_ids, t5_ids = self.tokenize(components, captions)
        pooled = clip(clip_ids.to(clip.device), output_hidden_states=False).pooler_output
        hidden = t5(t5_ids.to(t5.device), output_hidden_states=False)[0]
        return {"encoder_hidden_states": hidden, "pooled": pooled}

    def backbone_kwargs(self, backbone: nn.Module, text: TextEmbeddings, noisy: torch.Tensor) -> dict:
        """What the transformer takes besides latents, timestep and ids (pooled CLIP, guidance)."""
        kwargs: dict[str, Any] = {"pooled_projections": text["pooled"].to(noisy.dtype)}
        if unwrap(backbone).config.guidance_embeds:
            device = text["pooled"].device
            kwargs["guidance"] = torch.full((noisy.shape[0],), self.train_guidance, device=device, dtype=torch.float32)
        return kwargs

    def predict(
        self, backbone: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, text: TextEmbeddings, conditioning: dict
    ) -> torch.Tensor:
        _, _, height, width = noisy.shape
        dtype, device = noisy.dtype, noisy.device
        context = text["encoder_hidden_states"].to(dtype)
        out = backbone(
            hidden_states=pack_latents(noisy),
            timestep=timesteps.to(dtype),  # sigma in [0, 1], as FluxPipeline passes timestep / 1000
            encoder_hidden_states=context,
            img_ids=latent_image_ids(height, width, device, dtype),
            txt_ids=torch.zeros(context.shape[1], 3, device=device, dtype=dtype),
            return_dict=False,
            **self.backbone_kwargs(backbone, text, noisy),
            **conditioning,
        )[0]
        return unpack_latents(out, height, width)
