"""LoHa / LoKr files in the LyCORIS key layout that kohya sd-scripts, A1111/Forge and ComfyUI load.

Keys per adapted module, with the same ``lora_unet_…`` / ``lora_te…`` stems as kohya LoRA files (lora_files.py):
  LoHa  <stem>.hada_w1_a (out, r), .hada_w1_b (r, in·kh·kw), .hada_w2_a, .hada_w2_b, .alpha
        ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha / r, reshaped to the layer's weight shape
  LoKr  <stem>.lokr_w1 (a, c) or .lokr_w1_a / .lokr_w1_b, .lokr_w2 (b, d[, kh, kw]) or .lokr_w2_a / .lokr_w2_b, .alpha
        ΔW = kron(w1, w2) · alpha / r when a factor is decomposed (r: the inner width of w2_b, else of w1_b),
        and kron(w1, w2) with no scale when both are full (the loaders ignore alpha then; PEFT does not, so
        its alpha/r is folded into lokr_w1 here)
``delta_weight`` rebuilds ΔW from such a file by these formulas, independently of PEFT (tests use it).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from tuneonce.model.lora_files import canonical_path, is_sdxl_like, kohya_module_name
from tuneonce.model.lycoris import LOHA_NAMES, LOKR_NAMES, lycoris_kind, lycoris_layers

KOHYA_LYCORIS_MODULE = "lycoris.kohya"  # ss_network_module of LyCORIS networks trained with sd-scripts


def has_lycoris(components: Mapping[str, nn.Module], adapter_name: str = "default") -> bool:
    return any(lycoris_layers(m, adapter_name) for m in components.values() if isinstance(m, nn.Module))


def _layer_entries(layer: nn.Module, kind: str, adapter: str) -> tuple[dict[str, torch.Tensor], int]:
    """File tensors (suffix -> tensor) of one PEFT LoHa / LoKr layer, and its rank as the loaders read it."""
    scale, rank = float(layer.scaling[adapter]), int(layer.r[adapter])
    if kind == "loha":
        out = {name: getattr(layer, name)[adapter].detach() for name in LOHA_NAMES}
        out["alpha"] = torch.tensor(scale * rank, dtype=torch.float32)
        return out, rank
    out = {}
    for name in LOKR_NAMES:
        if adapter in getattr(layer, name):
            out[name] = getattr(layer, name)[adapter].detach()
    if adapter in layer.lokr_t2:
        raise ValueError("LoKr with use_effective_conv2d (lokr_t2) is not written; tuneonce does not create it")
    if "lokr_w1_b" in out or "lokr_w2_b" in out:
        out["alpha"] = torch.tensor(scale * rank, dtype=torch.float32)
    else:  # both factors full: the loaders apply no scale, so PEFT's alpha/r goes into w1
        out["lokr_w1"] = out["lokr_w1"] * scale
        out["alpha"] = torch.tensor(float(rank), dtype=torch.float32)
    return out, rank


def lycoris_state_dict(components: Mapping[str, nn.Module], *, sdxl: bool | None = None, adapter_name: str = "default",
                       dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every LoHa / LoKr tensor of every component under its kohya stem (contiguous CPU copies), and facts for the
    metadata (kind, rank, alpha, conv rank)."""
    sdxl = is_sdxl_like(components) if sdxl is None else sdxl
    state: dict[str, torch.Tensor] = {}
    kinds, ranks, alphas, conv = Counter(), Counter(), Counter(), Counter()
    for component, model in components.items():
        for path, layer in lycoris_layers(model, adapter_name).items():
            kind = lycoris_kind(layer)
            stem = kohya_module_name(component, canonical_path(component, path), sdxl)
            entries, rank = _layer_entries(layer, kind, adapter_name)
            for suffix, value in entries.items():
                target = dtype if dtype is not None and suffix != "alpha" else None
                state[f"{stem}.{suffix}"] = value.to("cpu", dtype=target).contiguous().clone()
            kinds[kind] += 1
            alpha = float(layer.scaling[adapter_name]) * rank
            (conv if isinstance(layer.get_base_layer(), nn.Conv2d) else ranks)[(rank, alpha)] += 1
            alphas[alpha] += 1
    if not kinds:
        raise ValueError(f"no PEFT LoHa/LoKr adapter named {adapter_name!r} in components {sorted(components)}")
    if len(kinds) > 1:
        raise ValueError(f"one file holds one LyCORIS algorithm; found {dict(kinds)}")
    (rank, alpha), _ = (ranks or conv).most_common(1)[0]
    facts = {"algo": next(iter(kinds)), "rank": rank, "alpha": alpha, "modules": sum(kinds.values()),
             "conv": conv.most_common(1)[0][0] if conv else None}  # fmt: skip
    return state, facts


def lycoris_network_args(facts: Mapping[str, Any], *, lokr_factor: int | None = None,
                         decompose_both: bool | None = None) -> dict[str, str]:
    """kohya's ss_network_args for a LyCORIS network (strings, as sd-scripts writes them)."""
    args = {"algo": facts["algo"]}
    if facts["conv"] is not None:
        args |= {"conv_dim": str(facts["conv"][0]), "conv_alpha": _number(facts["conv"][1])}
    if facts["algo"] == "lokr":
        if lokr_factor is not None:
            args["factor"] = str(lokr_factor)
        if decompose_both is not None:
            args["decompose_both"] = str(decompose_both)
    return args


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def delta_weight(tensors: Mapping[str, torch.Tensor], stem: str, shape: tuple[int, ...]) -> torch.Tensor:
    """ΔW of one module from a LyCORIS file's tensors by the LyCORIS formulas (module docstring), in `shape`."""
    t = {k[len(stem) + 1:]: v.float() for k, v in tensors.items() if k.startswith(stem + ".")}
    alpha = float(t["alpha"]) if "alpha" in t else None
    if "hada_w1_a" in t:
        rank = t["hada_w1_b"].shape[0]
        delta = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        return (delta * (alpha / rank if alpha is not None else 1.0)).reshape(shape)
    if not any(k.startswith("lokr_") for k in t):
        raise ValueError(f"{stem}: no hada_ or lokr_ tensors in the file")
    rank = None
    w1 = t.get("lokr_w1")
    if w1 is None:
        w1, rank = t["lokr_w1_a"] @ t["lokr_w1_b"], t["lokr_w1_b"].shape[0]
    w2 = t.get("lokr_w2")
    if w2 is None:
        w2, rank = t["lokr_w2_a"] @ t["lokr_w2_b"], t["lokr_w2_b"].shape[0]
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    scale = alpha / rank if alpha is not None and rank is not None else 1.0
    return (torch.kron(w1, w2) * scale).reshape(shape)


def peft_delta_weights(components: Mapping[str, nn.Module], *, sdxl: bool | None = None,
                       adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """kohya stem -> PEFT's own ΔW (``get_delta_weight``) of every LoHa / LoKr layer."""
    sdxl = is_sdxl_like(components) if sdxl is None else sdxl
    out = {}
    for component, model in components.items():
        for path, layer in lycoris_layers(model, adapter_name).items():
            with torch.no_grad():
                out[kohya_module_name(component, canonical_path(component, path), sdxl)] = (
                    layer.get_delta_weight(adapter_name).detach().float()
                )
    return out


__all__ = ["delta_weight", "has_lycoris", "lycoris_network_args", "lycoris_state_dict", "peft_delta_weights"]
