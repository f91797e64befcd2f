#!/usr/bin/env python
"""How far demo LoRAs move the base model's prediction on a class prompt and on the concept prompt (prior
preservation's aim: the class stays as it was while the concept is learned). Figures in docs/concepts.md.

    python scripts/measure_prior.py output/demo_sdxl_lora/demo_sdxl_lora.safetensors \\
        output/demo_sdxl_prior_preservation/demo_sdxl_prior_preservation.safetensors

Fixed inputs: the demo's held-out images (workspace/demo/concept_val) encoded by the base's VAE, noised at
timesteps 100/300/500/700/900 with seeded noise; the number is mean((LoRA prediction - base prediction)²).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TIMESTEPS = (100, 300, 500, 700, 900)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("loras", nargs="+", type=Path, help="kohya-layout LoRA files of the tiny SDXL demo")
    parser.add_argument("--base", default="workspace/demo/tiny_sdxl_base")
    parser.add_argument("--images", type=Path, default=Path("workspace/demo/concept_val"))
    parser.add_argument("--class-prompt", default="a star on a white background")
    parser.add_argument("--concept-prompt", default="a zxq star on a white background")
    args = parser.parse_args()
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(args.base, dtype=torch.float32)
    images = sorted(args.images.glob("*.png"))
    pixels = torch.stack([
        torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
        for p in images
    ])
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    noise = torch.randn((len(TIMESTEPS), *latents.shape), generator=torch.Generator().manual_seed(1))
    n, (height, width) = latents.shape[0], pixels.shape[-2:]
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(n, 1)

    def prediction(prompt: str) -> torch.Tensor:
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False)
        out = []
        with torch.no_grad():
            for i, t in enumerate(TIMESTEPS):
                ts = torch.full((n,), t)
                noisy = pipe.scheduler.add_noise(latents, noise[i], ts)
                added = {"text_embeds": pooled.repeat(n, 1), "time_ids": time_ids}
                out.append(pipe.unet(noisy, ts, encoder_hidden_states=embeds.repeat(n, 1, 1),
                                     added_cond_kwargs=added).sample)
        return torch.stack(out)

    prompts = {"class": args.class_prompt, "concept": args.concept_prompt}
    base = {name: prediction(prompt) for name, prompt in prompts.items()}
    print(f"{'LoRA':<60} {'class':>10} {'concept':>10}")
    for lora in args.loras:
        pipe.load_lora_weights(str(lora), adapter_name="measured")
        change = {name: float((prediction(prompt) - base[name]).pow(2).mean()) for name, prompt in prompts.items()}
        print(f"{str(lora):<60} {change['class']:>10.3e} {change['concept']:>10.3e}")
        pipe.unload_lora_weights()


if __name__ == "__main__":
    main()
