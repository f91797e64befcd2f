"""Validation loss on held-out images with fixed timesteps and fixed noise, so two runs compare exactly.

Every held-out batch is encoded once (VAE mean, no sampling) and scored at `num_timesteps` evenly spaced timesteps
with noise drawn once from `seed`. The score is the plain (unweighted) MSE of the objective's target, averaged over
images and timesteps, so runs with different loss weightings (min-SNR) stay comparable.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from tuneonce.model.families.base import ModelFamily, TextEmbeddings
from tuneonce.trainer.loop import cached_text_to


@dataclass
class _FixedBatch:
    batch: dict[str, Any]  # the collated batch without pixels (captions, size/crop conditioning)
    latents: torch.Tensor
    noises: list[torch.Tensor]  # one per fixed timestep
    text: TextEmbeddings | None  # None when text encoders are trained: re-encoded every time


class Validator:
    def __init__(
        self,
        family: ModelFamily,
        components: dict[str, Any],
        objective,
        batches: Iterable[dict[str, Any]],
        *,
        num_timesteps: int,
        seed: int,
        device: torch.device,
        dtype: torch.dtype,
        encode_text_each_time: bool,
        autocast: Callable[[], AbstractContextManager] = nullcontext,
    ) -> None:
        self.family, self.components, self.objective = family, components, objective
        self.device, self.dtype, self.autocast = device, dtype, autocast
        self.encode_text_each_time = encode_text_each_time
        self.timesteps = objective.fixed_timesteps(num_timesteps, device)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        self.fixed: list[_FixedBatch] = []
        with torch.no_grad():
            for batch in batches:
                latents = self._latents(batch)
                noises = [torch.randn(latents.shape, generator=generator).to(device, latents.dtype) for _ in self.timesteps]
                text = None if encode_text_each_time else self._text(batch)
                rest = {k: v for k, v in batch.items() if k not in ("pixel_values", "latents")}
                self.fixed.append(_FixedBatch(rest, latents, noises, text))
        if not self.fixed:
            raise ValueError("validation: the held-out set is empty")

    def _latents(self, batch: dict[str, Any]) -> torch.Tensor:
        if "latents" in batch:
            return batch["latents"].to(self.device, self.dtype)
        vae = self.components["vae"]
        return self.family.encode_latents(vae, batch["pixel_values"].to(self.device)).to(self.dtype)

    def _text(self, batch: dict[str, Any]) -> TextEmbeddings:
        if "text_embeddings" in batch:  # cached by the data pipeline
            return cached_text_to(batch["text_embeddings"], self.device, self.dtype)
        return self.family.encode_text(self.components, list(batch["caption"]))

    @torch.no_grad()
    def loss(self, backbone: torch.nn.Module) -> float:
        was_training = backbone.training
        backbone.eval()
        total, count = torch.zeros((), dtype=torch.float64, device=self.device), 0
        try:
            with self.autocast():
                for fixed in self.fixed:
                    text = fixed.text if fixed.text is not None else self._text(fixed.batch)
                    size = fixed.latents.shape[0]
                    cond = self.family.conditioning(fixed.batch | {"latents": fixed.latents}, text, self.device, self.dtype)
                    for t_value, noise in zip(self.timesteps, fixed.noises):
                        t = t_value.expand(size)
                        noisy = self.objective.add_noise(fixed.latents, noise, t)
                        prediction = self.family.predict(backbone, noisy, t, text, cond)
                        total += self.objective.per_sample_loss(prediction, fixed.latents, noise, t).sum().double()
                        count += size
        finally:
            backbone.train(was_training)
        return float(total / count)
