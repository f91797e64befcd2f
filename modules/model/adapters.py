"""PEFT LoRA / DoRA on the backbone and optionally the text encoders, the layer filter, gradient checkpointing.

Adapters are injected in place through PEFT's own `inject_adapter_in_model`, so the UNet stays a UNet2DConditionModel
and the sampling pipeline, the savers and `load_lora_weights` see the classes they expect. Not through the
diffusers/transformers `add_adapter` integration: transformers gates it on a minimum PEFT version (5.24 demands
peft >= 0.22 before any release of it existed), and one code path for every component is simpler to keep exact.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

SPECTRAL_OPTIMIZERS = ("muon_adv", "adamuon_adv", "lora_muon")


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    dora: bool = False
    targets: tuple[str, ...] | None = ()  # module-name suffixes; None = every Linear layer under `within`
    # Name prefixes of the residual blocks; when given, only layers below them match (empty = the whole module).
    # Presets pass them, so a suffix such as Flux's `proj_out` cannot also catch the top-level final layer.
    within: tuple[str, ...] = ()
    layer_filter: str | tuple[str, ...] | None = None  # regex, or several regexes any of which must match
    kind: str = "lora"  # lora | loha | lokr (LyCORIS through PEFT: modules/model/lycoris.py)
    lokr_factor: int = -1
    lokr_decompose_both: bool = False


def check_dora_compatible(*, dora: bool, optimizer_type: str, spectral_scaling: bool, force: bool) -> None:
    """DoRA's magnitude vector rescales each column after the update, which undoes the spectral step size."""
    if dora and spectral_scaling and optimizer_type in SPECTRAL_OPTIMIZERS and not force:
        raise ValueError(
            f"lora.dora: DoRA is incompatible with optimizer.spectral_scaling of {optimizer_type} (its magnitude vector "
            "undoes the spectral step size); set optimizer.spectral_scaling: false or lora.force_dora_with_spectral: true"
        )


def _matches_filter(name: str, layer_filter: str | Sequence[str] | None) -> bool:
    if layer_filter is None or layer_filter == "" or layer_filter == ():
        return True
    patterns = [layer_filter] if isinstance(layer_filter, str) else layer_filter
    return any(re.search(p, name) is not None for p in patterns)


def lora_target_names(
    module: nn.Module,
    targets: Sequence[str] | None,
    layer_filter: str | Sequence[str] | None = None,
    within: Sequence[str] = (),
) -> list[str]:
    """Full names of the Linear/Conv2d layers below one of `within` (anywhere when it is empty) that pass the layer
    filter and whose name ends with one of `targets`; targets None: every Linear layer there."""
    found = []
    for name, sub in module.named_modules():
        if not isinstance(sub, (nn.Linear, nn.Conv2d)) or not _matches_filter(name, layer_filter):
            continue
        if within and not name.startswith(tuple(within)):
            continue
        if targets is None:
            if isinstance(sub, nn.Linear):
                found.append(name)
        elif any(name == t or name.endswith("." + t) for t in targets):
            found.append(name)
    return found


def add_lora(module: nn.Module, settings: LoraSettings, *, component: str, adapter_name: str = "default") -> list[str]:
    """Freeze `module`, inject a LoRA / DoRA / LoHa / LoKr adapter on the selected layers; returns their names."""
    from peft import LoraConfig, inject_adapter_in_model

    names = lora_target_names(module, settings.targets, settings.layer_filter, settings.within)
    if not names:
        raise ValueError(
            f"lora.targets: no layer of {component} matches targets {settings.targets or 'all'}"
            + (f" with layer_filter {settings.layer_filter!r}" if settings.layer_filter else "")
        )
    module.requires_grad_(False)
    # Exact names as a regex: PEFT full-matches a string target, so the filter cannot catch extra layers.
    pattern = "|".join(re.escape(n) for n in names)
    if settings.kind != "lora":
        from tuneonce.model import lycoris

        config = lycoris.peft_config(
            settings.kind, rank=settings.rank, alpha=settings.alpha, target_modules=f"^(?:{pattern})$",
            lokr_factor=settings.lokr_factor, lokr_decompose_both=settings.lokr_decompose_both,
        )  # fmt: skip
        inject_adapter_in_model(config, module, adapter_name=adapter_name)
        lycoris.init_like_lycoris(module, adapter_name, lokr_factor=settings.lokr_factor,
                                  decompose_both=settings.lokr_decompose_both)
        return names
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        use_dora=settings.dora,
        init_lora_weights=True,
        target_modules=f"^(?:{pattern})$",
    )
    inject_adapter_in_model(config, module, adapter_name=adapter_name)
    return names


def enable_gradient_checkpointing(module: nn.Module) -> None:
    if hasattr(module, "enable_gradient_checkpointing"):  # diffusers models
        module.enable_gradient_checkpointing()
    elif hasattr(module, "gradient_checkpointing_enable"):  # transformers models
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise ValueError(f"training.gradient_checkpointing: {type(module).__name__} does not support it")


def trainable_parameters(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]
