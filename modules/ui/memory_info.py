"""The memory panel: the planner's predicted peak (modules/trainer/memory_plan.py) of the page's config and, with
memory.budget_gb, what a run would pick to fit. The model is the one the depth panel shows (a local folder's
components or the published architecture, on the meta device: no weights are read); nothing is re-derived here.
"""
from __future__ import annotations

from pathlib import Path

COMPONENTS = ("unet", "transformer", "text_encoder")  # what the planner counts (a folder's VAE is skipped too)


def memory_report(config: dict, workdir: Path) -> dict:
    """{"rows": [[label, GiB text]], "peak", "budget"?, "notes"} or {"error": why}."""
    from tuneonce.ui.depth_info import _build_lock, _components

    try:
        from tuneonce.config.schema import TrainConfig
        from tuneonce.trainer import memory_plan as mp
    except ImportError as exc:
        return {"error": f"memory planner not available ({exc.name or exc})"}
    try:
        valid = TrainConfig.model_validate(config)
    except Exception:  # the form shows the errors next to the fields
        return {"error": "the memory plan needs a valid config"}
    if valid.method != "lora":
        return {"error": "the memory planner plans LoRA runs (method: lora)"}
    try:
        with _build_lock:
            _source, _pipeline, components = _components(config.get("model") or {}, workdir)
        components = {k: v for k, v in components.items() if k.startswith(COMPONENTS)}
        settings, budget = mp.settings_from_config(valid, backbone=mp.backbone_name(components))
        plan = mp.plan_memory(components, settings)
        out = {"rows": _rows(plan), "peak": _gib(plan.peak), "notes": []}
        if budget is not None:
            picked, changes = mp.pick_settings(components, settings, budget)
            fits = mp.fits(picked, budget)
            out["budget"] = {"gb": budget, "fits": fits, "peak": _gib(picked.peak),
                             "changes": changes if fits else changes[:-1]}  # fmt: skip
    except Exception as exc:  # a model the planner cannot read must not break the page
        return {"error": f"cannot plan memory: {exc}"}
    s = settings
    out["notes"].append(f"at {s.resolution}px, batch {s.batch}, LoRA rank {s.lora_rank}, {s.optimizer}; weights by "
                        f"storage, {mp.HEADROOM:.0%} of a budget kept free; predicted, not measured")  # fmt: skip
    return out


def _rows(plan) -> list[list[str]]:
    rows = [["weights", _gib(plan.weight_bytes)],
            ["adapters + gradients + optimizer", _gib(plan.adapters + plan.gradients + plan.optimizer_state)],
            ["activations", _gib(plan.activations)]]  # fmt: skip
    if plan.parked:
        rows.append(["parked after caching (CPU)", _gib(plan.parked)])
        rows.append(["peak while filling the caches", _gib(plan.caching_peak)])
        if plan.settings.samples:
            rows.append(["peak while sampling", _gib(plan.sampling_peak)])
    rows.append(["total (predicted peak)", _gib(plan.peak)])
    return rows


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"
