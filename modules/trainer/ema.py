"""Exponential moving average (EMA) of the trained weights.

After every `update_every`-th optimizer step: ``shadow ← d·shadow + (1 − d)·param`` with ``d = decay^update_every``,
so the averaging horizon (about 1/(1 − decay) optimizer steps) does not depend on how often the average is updated.
With ``warmup`` the n-th update (n = 0, 1, …) uses ``min(d, (1 + n)/(10 + n))`` (the warm-up OneTrainer and diffusers
use), so the first averages are not dominated by the initial weights (a LoRA's zero B).

The shadow copies are float32 whatever the weights' dtype (a 0.999 step is below bf16's resolution) and live on the
CPU with ``on_cpu`` (saves accelerator memory; each update then copies the weights over). The trainer uses them for
the saved files, validation and samples (as OneTrainer saves its EMA weights): ``applied()`` swaps them in and back.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

WARMUP_OFFSET = 10  # d_n = (1 + n) / (10 + n): 0.1 at the first update, 0.9 by the 80th, 0.99 by the 890th


class EMA:
    def __init__(
        self,
        params: Mapping[str, torch.Tensor],
        *,
        decay: float,
        update_every: int = 1,
        warmup: bool = True,
        on_cpu: bool = False,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"training.ema.decay must be in [0, 1), got {decay}")
        if update_every < 1:
            raise ValueError(f"training.ema.update_every must be >= 1, got {update_every}")
        if not params:
            raise ValueError("EMA: no trained parameters to average")
        self.params = dict(params)
        self.decay, self.update_every, self.warmup = decay, update_every, warmup
        self.num_updates = 0
        self.shadow = {
            name: p.detach().to(device="cpu" if on_cpu else p.device, dtype=torch.float32, copy=True)
            for name, p in self.params.items()
        }

    def decay_at(self, n: int) -> float:
        """The factor d of the n-th update (0-based)."""
        d = self.decay**self.update_every
        return min(d, (1 + n) / (WARMUP_OFFSET + n)) if self.warmup else d

    @torch.no_grad()
    def update(self, step: int) -> bool:
        """Called with the number of completed optimizer steps; averages on every `update_every`-th. Returns whether
        it did."""
        if step % self.update_every:
            return False
        weight = 1.0 - self.decay_at(self.num_updates)
        shadows = list(self.shadow.values())
        sources = [p.detach().to(device=s.device, dtype=torch.float32) for p, s in zip(self.params.values(), shadows)]
        torch._foreach_lerp_(shadows, sources, weight)  # s + w·(p − s) = d·s + (1 − d)·p
        self.num_updates += 1
        return True

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The EMA weights in the trained parameters for the duration of the block; the training weights after."""
        backup = {name: p.detach().clone() for name, p in self.params.items()}
        try:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(self.shadow[name])
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(backup[name])

    def state_dict(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates, "shadow": dict(self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        shadow = state["shadow"]
        if shadow.keys() != self.shadow.keys():
            missing, extra = sorted(self.shadow.keys() - shadow.keys()), sorted(shadow.keys() - self.shadow.keys())
            raise ValueError(f"EMA state does not match the trained parameters: missing {missing[:3]}, unexpected {extra[:3]}")
        for name, tensor in shadow.items():
            if tensor.shape != self.shadow[name].shape:
                raise ValueError(f"EMA state: {name} has shape {tuple(tensor.shape)}, the parameter {tuple(self.shadow[name].shape)}")
            self.shadow[name].copy_(tensor)
        self.num_updates = int(state["num_updates"])
