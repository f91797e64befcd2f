"""Sample images from the configured prompts with the model being trained, saved as PNG.

Files: `<samples_dir>/step<step:06d>_<prompt index:02d>.png`. Each prompt has its own seed, so the images of two
steps (or two runs) differ only by what the model learned.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tuneonce.model.families.base import ModelFamily

SAMPLERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}


def sample_path(samples_dir: str | Path, step: int, index: int) -> Path:
    return Path(samples_dir) / f"step{step:06d}_{index:02d}.png"


@torch.no_grad()
def sample_images(
    family: ModelFamily,
    components: dict[str, Any],
    prompts: Sequence[Any],
    *,
    samples_dir: str | Path,
    step: int,
    sampler: str = "default",
    default_size: int = 512,
    device: torch.device | None = None,
) -> list[Path]:
    """`prompts`: objects with prompt, negative_prompt, seed, cfg, steps, width, height (the config's SamplePrompt)."""
    import diffusers

    pipeline = family.build_pipeline(components)
    if sampler != "default":
        if sampler not in SAMPLERS:
            raise ValueError(f"sampling.sampler: unknown sampler {sampler!r}; known: default, {', '.join(SAMPLERS)}")
        pipeline.scheduler = getattr(diffusers, SAMPLERS[sampler]).from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    backbone = components[family.backbone]
    was_training = backbone.training
    backbone.eval()
    device = device or backbone.device
    Path(samples_dir).mkdir(parents=True, exist_ok=True)
    written = []
    try:
        for index, p in enumerate(prompts):
            generator = torch.Generator(device=device).manual_seed(p.seed)
            image = pipeline(
                prompt=p.prompt,
                negative_prompt=p.negative_prompt or None,
                **family.guidance_kwargs(p.cfg),
                num_inference_steps=p.steps,
                width=p.width or default_size,
                height=p.height or default_size,
                generator=generator,
                **family.sampling_kwargs(components),
            ).images[0]
            path = sample_path(samples_dir, step, index)
            image.save(path)
            written.append(path)
    finally:
        backbone.train(was_training)
    return written
