"""What the network is trained to predict: noise, timesteps, targets and per-sample loss weights.

An objective is the only place that knows the diffusion process. The loop calls

    t = objective.sample_timesteps(batch, generator)
    noisy = objective.add_noise(latents, noise, t)
    loss = objective.loss(prediction, latents, noise, t)

so a flow-matching family (Flux, SD3) adds a FlowMatchObjective with the same four methods and the loop stays as it
is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from tuneonce.model.masked_loss import weighted_squared_error

PredictionType = Literal["epsilon", "v_prediction"]
TimestepSampling = Literal["uniform", "logit_normal"]


def make_noise(latents: torch.Tensor, generator: torch.Generator | None, noise_offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise like `latents`; `noise_offset` adds a per-(sample, channel) constant (Guttenberg's offset noise),
    which lets the model learn to change an image's mean brightness."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator, device=latents.device)
        noise = noise + noise_offset * offset.to(latents.dtype)
    return noise


def sample_unit_interval(
    batch_size: int,
    sampling: TimestepSampling,
    generator: torch.Generator | None,
    device: torch.device,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> torch.Tensor:
    """u in (0, 1): uniform, or sigmoid of a normal (SD3's logit-normal, mass around the middle of the schedule)."""
    if sampling == "uniform":
        return torch.rand(batch_size, generator=generator, device=device)
    if sampling == "logit_normal":
        z = torch.randn(batch_size, generator=generator, device=device)
        return torch.sigmoid(logit_mean + logit_std * z)
    raise ValueError(f"timestep_sampling must be 'uniform' or 'logit_normal', got {sampling!r}")


@dataclass
class DiffusionObjective:
    """DDPM-style discrete objective (SD1.5, SD2, SDXL): epsilon or v-prediction, optional min-SNR weighting."""

    alphas_cumprod: torch.Tensor  # (T,), from the model's noise scheduler
    prediction_type: PredictionType = "epsilon"
    timestep_sampling: TimestepSampling = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    min_snr_gamma: float | None = None

    def __post_init__(self) -> None:
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {self.prediction_type!r}")
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {self.min_snr_gamma}")
        self.alphas_cumprod = self.alphas_cumprod.to(torch.float32)
        self._cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def _coefficients(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # sqrt(a_bar), sqrt(1 - a_bar), snr = a_bar / (1 - a_bar), moved to the device once.
        if device not in self._cache:
            a = self.alphas_cumprod.to(device)
            self._cache[device] = (a.sqrt(), (1 - a).sqrt(), a / (1 - a))
        return self._cache[device]

    def sample_timesteps(
        self, batch_size: int, generator: torch.Generator | None, device: torch.device, latent_shape: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        """`latent_shape` is unused here (flow objectives shift timesteps by resolution)."""
        u = sample_unit_interval(batch_size, self.timestep_sampling, generator, device, self.logit_mean, self.logit_std)
        return (u * self.num_timesteps).long().clamp_(0, self.num_timesteps - 1)

    def fixed_timesteps(self, count: int, device: torch.device) -> torch.Tensor:
        """`count` timesteps spread evenly over the schedule (midpoints of equal bins), for validation."""
        t = (torch.arange(count, dtype=torch.float64) + 0.5) * self.num_timesteps / count
        return t.long().clamp_(0, self.num_timesteps - 1).to(device)

    def _per_sample(self, values: torch.Tensor, t: torch.Tensor, ndim: int, dtype: torch.dtype) -> torch.Tensor:
        return values[t].to(dtype).reshape(-1, *([1] * (ndim - 1)))

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sqrt_a, sqrt_1ma, _ = self._coefficients(latents.device)
        return self._per_sample(sqrt_a, t, latents.ndim, latents.dtype) * latents + self._per_sample(
            sqrt_1ma, t, latents.ndim, latents.dtype
        ) * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        sqrt_a, sqrt_1ma, _ = self._coefficients(latents.device)
        # v = sqrt(a_bar) * eps - sqrt(1 - a_bar) * x0  (Salimans & Ho)
        return self._per_sample(sqrt_a, t, noise.ndim, noise.dtype) * noise - self._per_sample(
            sqrt_1ma, t, latents.ndim, latents.dtype
        ) * latents

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        return self._coefficients(t.device)[2][t]

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor | None:
        """Min-SNR-gamma (Hang et al. 2023): min(snr, g)/snr for epsilon, min(snr, g)/(snr + 1) for v."""
        if self.min_snr_gamma is None:
            return None
        snr = self.snr(t)
        clipped = snr.clamp(max=self.min_snr_gamma)
        return clipped / snr if self.prediction_type == "epsilon" else clipped / (snr + 1)

    def loss(self, prediction: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
             pixel_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Mean over the batch of the (weighted) per-sample MSE, computed in fp32; `pixel_weights` (B, 1, h, w): the
        masked loss's weights on the latent grid (modules/model/masked_loss.py)."""
        per_sample = self.per_sample_loss(prediction, latents, noise, t, pixel_weights)
        weights = self.loss_weights(t)
        if weights is not None:
            per_sample = per_sample * weights
        return per_sample.mean()

    def per_sample_loss(
        self, prediction: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
        pixel_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        target = self.target(latents, noise, t)
        err = prediction.float() - target.float()
        return weighted_squared_error(err, pixel_weights)

