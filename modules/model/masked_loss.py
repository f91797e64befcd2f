"""Masked loss: the data pipeline's per-pixel weights (modules/data/masks.py) on the latent grid.

Each latent pixel gets the mean weight of the image pixels it covers (area averaging, as the VAE's 8x8 patches do),
and the per-sample loss is the mean over channels and positions of w·(prediction - target)² (kohya's masked loss;
not renormalised by the mask's area, so a mostly-black mask lowers the loss scale as well as its focus).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def latent_weights(pixel_weights: torch.Tensor | None, latents: torch.Tensor) -> torch.Tensor | None:
    """(B, 1, h, w) weights on the latent grid of `latents` (B, C, h, w) from (B, 1, H, W) pixel weights; None
    passes through (no mask in the batch)."""
    if pixel_weights is None:
        return None
    if pixel_weights.ndim != 4 or pixel_weights.shape[0] != latents.shape[0] or pixel_weights.shape[1] != 1:
        raise ValueError(
            f"mask weights must be (B, 1, H, W) for latents {tuple(latents.shape)}, got {tuple(pixel_weights.shape)}"
        )
    weights = F.adaptive_avg_pool2d(pixel_weights.float(), latents.shape[-2:])
    return weights.to(latents.device)


def weighted_squared_error(err: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Per-sample mean of weights·err² over every non-batch axis (weights broadcast over channels)."""
    squared = err.pow(2)
    if weights is not None:
        squared = squared * weights
    return squared.flatten(1).mean(1)
