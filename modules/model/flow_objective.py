"""Rectified-flow (flow-matching) objective of Flux, Chroma and SD3: a straight path from data to noise.

With sigma ("t") in [0, 1]:  x_t = (1 - t) * x0 + t * noise, and the network predicts the velocity noise - x0.
Training timesteps are drawn uniformly or logit-normally in (0, 1) and then shifted towards the noisy end,

    t' = s * t / (1 + (s - 1) * t),

with a fixed shift s (SD3: 3.0, Flux schnell: 1.0) or, where the model's scheduler uses dynamic shifting
(Flux dev, Chroma), a resolution-dependent s = exp(mu), mu linear in the image's token count between
(base_image_seq_len, base_shift) and (max_image_seq_len, max_shift) — the same shift the sampler applies.

It answers the loop's four calls like DiffusionObjective (sample_timesteps, add_noise, loss, per_sample_loss, plus
fixed_timesteps for validation); timesteps are float sigmas, and each family scales them for its backbone.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tuneonce.model.masked_loss import weighted_squared_error
from tuneonce.model.objective import TimestepSampling, sample_unit_interval


def dynamic_shift_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """mu of Flux's resolution-dependent shift: linear in the number of image tokens."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """s * t / (1 + (s - 1) * t): s > 1 moves timesteps towards noise; s = 1 leaves them as they are."""
    if shift == 1.0:
        return sigmas
    return shift * sigmas / (1 + (shift - 1) * sigmas)


@dataclass
class FlowMatchObjective:
    timestep_sampling: TimestepSampling = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0  # fixed shift (used when dynamic_shift is off)
    dynamic_shift: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    patch_size: int = 2  # latent pixels per token side: tokens = (h / p) * (w / p)

    def __post_init__(self) -> None:
        if not self.shift > 0:
            raise ValueError(f"flow-matching shift must be > 0, got {self.shift}")
        if self.max_image_seq_len <= self.base_image_seq_len:
            raise ValueError(
                f"max_image_seq_len ({self.max_image_seq_len}) must exceed base_image_seq_len ({self.base_image_seq_len})"
            )

    @classmethod
    def from_scheduler_config(cls, config: Any, *, patch_size: int = 2, **options) -> FlowMatchObjective:
        """The shift settings a FlowMatchEulerDiscreteScheduler config (scheduler_config.json) samples with."""
        get = config.get if hasattr(config, "get") else lambda key, default: getattr(config, key, default)
        return cls(
            shift=float(get("shift", 1.0)),
            dynamic_shift=bool(get("use_dynamic_shifting", False)),
            base_shift=float(get("base_shift", 0.5) or 0.5),
            max_shift=float(get("max_shift", 1.15) or 1.15),
            base_image_seq_len=int(get("base_image_seq_len", 256) or 256),
            max_image_seq_len=int(get("max_image_seq_len", 4096) or 4096),
            patch_size=patch_size,
            **options,
        )

    def shift_for(self, latent_shape: Sequence[int] | None) -> float:
        """The shift s for latents of this shape ((B, C, H, W)); dynamic shifting needs the shape."""
        if not self.dynamic_shift:
            return self.shift
        if latent_shape is None:
            raise ValueError("dynamic timestep shifting needs the latent shape (sample_timesteps(..., latent_shape=...))")
        height, width = latent_shape[-2], latent_shape[-1]
        tokens = (height // self.patch_size) * (width // self.patch_size)
        mu = dynamic_shift_mu(tokens, self.base_image_seq_len, self.max_image_seq_len, self.base_shift, self.max_shift)
        return math.exp(mu)

    def sample_timesteps(
        self,
        batch_size: int,
        generator: torch.Generator | None,
        device: torch.device,
        latent_shape: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Float sigmas in (0, 1), shifted for the latents' resolution."""
        u = sample_unit_interval(batch_size, self.timestep_sampling, generator, device, self.logit_mean, self.logit_std)
        return shift_sigmas(u, self.shift_for(latent_shape))

    def fixed_timesteps(self, count: int, device: torch.device) -> torch.Tensor:
        """`count` sigmas at the midpoints of equal bins of [0, 1] (unshifted: the whole path, equally weighted)."""
        return ((torch.arange(count, dtype=torch.float32) + 0.5) / count).to(device)

    @staticmethod
    def _per_sample(t: torch.Tensor, ndim: int, dtype: torch.dtype) -> torch.Tensor:
        return t.to(dtype).reshape(-1, *([1] * (ndim - 1)))

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = self._per_sample(t, latents.ndim, latents.dtype)
        return (1 - sigma) * latents + sigma * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise - latents

    def per_sample_loss(
        self, prediction: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
        pixel_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        err = prediction.float() - self.target(latents, noise, t).float()
        return weighted_squared_error(err, pixel_weights)

    def loss(self, prediction: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
             pixel_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Mean over the batch of the per-sample MSE to the velocity, in fp32 (uniform weighting, as SD3/Flux train);
        `pixel_weights`: the masked loss's weights on the latent grid."""
        return self.per_sample_loss(prediction, latents, noise, t, pixel_weights).mean()
