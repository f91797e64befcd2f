"""Learning-rate schedules with linear warm-up, as factors of the peak LR (torch LambdaLR).

The factor is what Muon_adv's decoupled weight decay multiplies by (lr_t / lr_peak), so it is kept a pure function
of the step: tests and the optimizer see the same numbers.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Literal

import torch

ScheduleKind = Literal["constant", "linear", "cosine"]


def schedule_factor(step: int, *, kind: ScheduleKind, warmup_steps: int, total_steps: int) -> float:
    """lr_t / lr_peak at optimizer step `step` (0-based): linear warm-up from 1/(warmup+1), then the decay."""
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps} and {total_steps}")
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"schedule.scheduler must be one of constant, linear, cosine, got {kind!r}")


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, *, kind: ScheduleKind, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    schedule_factor(0, kind=kind, warmup_steps=warmup_steps, total_steps=total_steps)  # validate early
    factor = partial(schedule_factor, kind=kind, warmup_steps=warmup_steps, total_steps=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
