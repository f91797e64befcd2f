"""memory.budget_gb at the start of a run: the planner picks settings that fit and they replace the config's.

The rule: with a budget set, the planner owns training.gradient_checkpointing, memory.quantize.* and
memory.offload_blocks, starting from what the config says and only ever making them smaller (it turns
checkpointing on, never off; replaces a component's storage by a smaller one only; offloads more blocks, never
fewer). Without a budget the config is used as written. It plans on the loaded components (CPU memory, before
quantization and before anything reaches the accelerator), so the numbers are the model's own.
"""
from __future__ import annotations

from typing import Any

from tuneonce.trainer.memory_plan import GIB, HEADROOM, fits, pick_settings, settings_from_config
from tuneonce.trainer.preflight import InputError


def apply_budget(config: Any, family: Any, components: dict[str, Any]) -> tuple[Any, str]:
    """(the config with the picked settings, the line to print); InputError when nothing fits."""
    budget = config.memory.budget_gb
    backbone = family.backbone
    settings, _ = settings_from_config(config, backbone=backbone)
    plan, changes = pick_settings(components, settings, budget)
    if not fits(plan, budget):
        tried = "; ".join(changes[:-1]) or "the settings as written"
        raise InputError(f"memory.budget_gb: {budget:g} GiB is too small for this run: even with {tried} the "
                         f"predicted peak is {plan.peak / GIB:.2f} GiB (the planner keeps {HEADROOM:.0%} free)")
    picked = plan.settings
    quantize = {("denoiser" if name == backbone else name): mode for name, mode in picked.quantize.items()}
    training = config.training.model_copy(update={"gradient_checkpointing": picked.checkpointing})
    memory = config.memory.model_copy(update={"quantize": config.memory.quantize.model_copy(update=quantize),
                                              "offload_blocks": picked.offload_blocks})  # fmt: skip
    config = config.model_copy(update={"training": training, "memory": memory})
    what = "picked " + ", ".join(changes) if changes else "fits as written"
    return config, f"memory.budget_gb {budget:g} GiB: {what}; predicted peak {plan.peak / GIB:.2f} GiB"
