"""The loss of a batch drawn from several concepts: per-sample loss weights and the prior prediction.

A data folder (concept, modules/data/folders.py) may weight its samples' loss (`loss_weight`) and, as a
regularization concept, train on OneTrainer's "prior prediction": the target of its samples is what the frozen base
model predicts for the same noisy latents and captions, computed with every adapter switched off (PEFT's layers skip
their adapter while `disable_adapters` is set). The adapter is then pulled back towards the base on those captions,
the aim of DreamBooth's prior preservation (Ruiz et al. 2023) without generated class images.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from tuneonce.model.masked_loss import weighted_squared_error


def needs_concept_loss(batch: dict[str, Any]) -> bool:
    """True when the batch has a sample whose loss is weighted or whose target is the prior prediction."""
    weights, prior = batch.get("loss_weight"), batch.get("prior_prediction")
    return (weights is not None and bool((weights != 1).any())) or (prior is not None and bool(prior.any()))


@contextmanager
def adapters_off(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Every PEFT adapter layer inside `modules` skips its adapter (the base model) until the block ends.

    Sets the layers' own `_disable_adapters` flag rather than calling `enable_adapters`, which would also change
    `requires_grad` of the adapter weights (and so what the optimizer and DDP see).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for module in modules for m in module.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise ValueError("data.folders: prior_prediction needs an adapter to switch off (method: lora)")
    before = [layer._disable_adapters for layer in layers]
    try:
        for layer in layers:
            layer._disable_adapters = True
        yield
    finally:
        for layer, flag in zip(layers, before):
            layer._disable_adapters = flag


def concept_loss(
    objective: Any,
    batch: dict[str, Any],
    prediction: torch.Tensor,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    pixel_weights: torch.Tensor | None,
    base_prediction: Callable[[], torch.Tensor],
) -> torch.Tensor:
    """Mean over the batch of loss_weight × the per-sample loss (min-SNR weighted where the objective does); rows
    with `prior_prediction` measure the error to `base_prediction()` (called only when such a row exists)."""
    per_sample = objective.per_sample_loss(prediction, latents, noise, timesteps, pixel_weights)
    prior = batch["prior_prediction"].to(per_sample.device)
    if bool(prior.any()):
        with torch.no_grad():
            base = base_prediction()
        prior_loss = weighted_squared_error(prediction.float() - base.float(), pixel_weights)
        per_sample = torch.where(prior, prior_loss, per_sample)
    loss_weights = getattr(objective, "loss_weights", None)
    snr_weights = loss_weights(timesteps) if loss_weights is not None else None
    if snr_weights is not None:
        per_sample = per_sample * snr_weights
    return (per_sample * batch["loss_weight"].to(per_sample.device, per_sample.dtype)).mean()
