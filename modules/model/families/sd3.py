"""SD3 / SD3.5: CLIP-L and CLIP-G penultimate hidden states (concatenated, zero-padded to T5's width) followed by
T5's along the sequence; pooled = both CLIPs' projected outputs; unpacked latents (the transformer patchifies)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tuneonce.config.families.sd3 import SD3
from tuneonce.model.families.base import TextEmbeddings
from tuneonce.model.families.flow import FlowMatchingFamily, unwrap


class SD3Family(FlowMatchingFamily):
    facts = SD3
    t5_tokenizer = "tokenizer_3"
    t5_max_length = 256  # StableDiffusion3Pipeline's default max_sequence_length

    def encode_text(self, components: dict[str, Any], captions: list[str]) -> TextEmbeddings:
        clip_hidden, pooled = [], []
        for name, tokenizer in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
            encoder = components[name]
            ids = self.tokenize_one(components, tokenizer, captions).input_ids
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            pooled.append(out[0])
            clip_hidden.append(out.hidden_states[-2])
        clip = torch.cat(clip_hidden, dim=-1)
        t5 = components.get("text_encoder_3")
        if t5 is not None:
            ids = self.tokenize_one(components, "tokenizer_3", captions).input_ids
            t5_hidden = t5(ids.to(t5.device))[0]
        else:  # SD3 without T5, as the pipeline does: zeros of the transformer's joint width
            width = unwrap(components["transformer"]).config.joint_attention_dim
            t5_hidden = torch.zeros(clip.shape[0], self.t5_max_length, width, device=clip.device, dtype=clip.dtype)
        clip = F.pad(clip, (0, t5_hidden.shape[-1] - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5_hidden.to(clip.dtype)], dim=-2), "pooled": torch.cat(pooled, dim=-1)}

    def sampling_kwargs(self, components: dict[str, Any]) -> dict[str, Any]:
        if components.get("tokenizer_3") is None:
            return {}
        return super().sampling_kwargs(components)

    def predict(
        self, backbone: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, text: TextEmbeddings, conditioning: dict
    ) -> torch.Tensor:
        dtype = noisy.dtype
        return backbone(
            hidden_states=noisy,
            timestep=(timesteps * 1000).to(dtype),  # SD3's transformer takes sigma * num_train_timesteps
            encoder_hidden_states=text["encoder_hidden_states"].to(dtype),
            pooled_projections=text["pooled"].to(dtype),
            return_dict=False,
            **conditioning,
        )[0]
