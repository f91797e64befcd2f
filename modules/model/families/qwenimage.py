"""Qwen-Image (QwenImageTransformer2DModel): the Qwen2.5-VL language model's last hidden states of the prompt in the
pipeline's system template (whose 34 prefix tokens are dropped), Flux-style 2x2 packed latents with per-image RoPE
shapes, and a causal 3D VAE (frame axis, per-channel latent mean/std instead of one scale and shift)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tuneonce.config.families.qwenimage import QWENIMAGE
from tuneonce.model.families.base import TextEmbeddings
from tuneonce.model.families.flow import FlowMatchingFamily, pack_latents, unpack_latents

# QwenImagePipeline.prompt_template_encode and prompt_template_encode_start_idx (the template's prefix length in
# tokens of the published tokenizer).
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
TEMPLATE_PREFIX_TOKENS = 34


def latent_stats(vae: nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE config's per-channel latent mean and std, shaped (1, C, 1, 1, 1) like 5D latents."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape)
    std = torch.tensor(vae.config.latents_std).view(shape)
    return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)


class QwenImageFamily(FlowMatchingFamily):
    facts = QWENIMAGE
    t5_tokenizer = "tokenizer"
    t5_max_length = 512  # QwenImagePipeline's default max_sequence_length (prompt tokens after the template prefix)

    def sequence_length(self, components: dict[str, Any], tokenizer: str) -> int:
        """Prompt tokens kept after the template prefix: the pipeline's 512, within the tokenizer's context."""
        return min(int(components[tokenizer].model_max_length) - TEMPLATE_PREFIX_TOKENS, self.t5_max_length)

    def encode_latents(self, vae: nn.Module, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalized (B, 16, H, W) latents of one-frame videos: (z - mean) / std, the inverse of the pipeline's decode."""
        dist = vae.encode(pixels.to(vae.dtype).unsqueeze(2)).latent_dist
        latents = dist.mean if generator is None else dist.sample(generator)
        mean, std = latent_stats(vae, latents)
        return ((latents - mean) / std).squeeze(2)

    def encode_text(self, components: dict[str, Any], captions: list[str]) -> TextEmbeddings:
        """Last hidden states of the templated prompts without the system prefix, padded to a fixed length with their
        mask (the pipeline pads to the longest prompt; masked padding changes nothing the transformer computes)."""
        encoder, tokenizer = components["text_encoder"], components["tokenizer"]
        length = self.sequence_length(components, "tokenizer") + TEMPLATE_PREFIX_TOKENS
        tokens = tokenizer([PROMPT_TEMPLATE.format(c) for c in captions], padding="max_length", max_length=length,
                           truncation=True, return_tensors="pt")  # fmt: skip
        mask = tokens.attention_mask.to(encoder.device)
        out = encoder(input_ids=tokens.input_ids.to(encoder.device), attention_mask=mask, output_hidden_states=True)
        hidden = out.hidden_states[-1][:, TEMPLATE_PREFIX_TOKENS:]
        return {"encoder_hidden_states": hidden, "attention_mask": mask[:, TEMPLATE_PREFIX_TOKENS:].to(hidden.dtype)}

    def predict(
        self, backbone: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, text: TextEmbeddings, conditioning: dict
    ) -> torch.Tensor:
        batch, _, height, width = noisy.shape
        dtype = noisy.dtype
        out = backbone(
            hidden_states=pack_latents(noisy),
            timestep=timesteps.to(dtype),  # sigma in [0, 1], as the pipeline passes timestep / 1000
            encoder_hidden_states=text["encoder_hidden_states"].to(dtype),
            encoder_hidden_states_mask=text["attention_mask"].to(noisy.device),
            img_shapes=[(1, height // 2, width // 2)] * batch,  # (frames, token rows, token columns) per image
            return_dict=False,
            **conditioning,
        )[0]
        return unpack_latents(out, height, width)

    def guidance_kwargs(self, cfg: float) -> dict[str, Any]:
        """Qwen-Image's classifier-free guidance is `true_cfg_scale` (its `guidance_scale` feeds a guidance embedding
        that the published transformer does not have; none is passed in training either)."""
        return {"true_cfg_scale": cfg}
