"""Frozen encoders leave the accelerator once the caches are filled.

With data.cache_latents every batch carries its latents, and with data.cache_text_embeddings (frozen text encoders
only, a config rule) its text embeddings, so the VAE and the text encoders sit idle through training. They are
moved to CPU memory ("parked") right after the caches are filled, and borrowed back onto the accelerator only for
sampling, then parked again. Validation reads the same caches and needs neither. Sampling on CPU instead would save
the copy (seconds over PCIe) but costs far more: a T5-XXL prompt encode or a 1024 px VAE decode on CPU takes tens of
seconds. The planner (memory_plan.py) counts parked components only while caching and sampling.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch


def move(module: torch.nn.Module, device: torch.device | str) -> None:
    """The one place a parked component moves (tests record the moves here)."""
    module.to(device)


class Parking:
    """Moves `names` of `components` between the compute device and `park` (CPU memory)."""

    def __init__(self, components: Mapping[str, Any], names: list[str], compute: torch.device | str,
                 park: torch.device | str = "cpu") -> None:  # fmt: skip
        self.components = components
        self.names = [n for n in names if isinstance(components.get(n), torch.nn.Module)]
        self.compute, self.park_device = torch.device(compute), torch.device(park)
        self.parked = False

    def park(self) -> None:
        for name in self.names:
            move(self.components[name], self.park_device)
        self.parked = bool(self.names)
        if self.parked and self.compute.type == "cuda":
            torch.cuda.empty_cache()  # hand the freed blocks back, so the training peak can use them

    @contextmanager
    def borrowed(self) -> Iterator[None]:
        """The parked components on the compute device for the block's duration (sampling), parked again after."""
        if not self.parked:
            yield
            return
        for name in self.names:
            move(self.components[name], self.compute)
        try:
            yield
        finally:
            self.park()


def parked_names(config: Any, text_encoders: tuple[str, ...], trains_text: bool) -> list[str]:
    """The VAE with data.cache_latents; the text encoders with data.cache_text_embeddings when none is trained."""
    names = ["vae"] if config.data.cache_latents else []
    if config.data.cache_text_embeddings and not trains_text:
        names += list(text_encoders)
    return names
