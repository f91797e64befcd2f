"""What the optimizer will see of a model: depth, roles, widths, eps and weight decay per group.

Used by scripts/inspect_model.py. A model is a local diffusers folder (a whole pipeline with
model_index.json, or one component with config.json) or a built-in name (modules/model/builtin.py);
either is built on the meta device from its config, so even 30B-parameter models cost no memory.
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from tuneonce.model.architectures import architecture_for
from tuneonce.model.builtin import BUILTINS, build_from_config, build_meta_components, builtin_names, default_lora_targets
from tuneonce.model.depth import DepthOverride, DepthSource, backbone_components, model_depths
from tuneonce.model.roles import param_infos
from tuneonce.optimizer import scaling
from tuneonce.optimizer.param_spec import ParamInfo, Role

# pipeline components that can be trained (VAE, schedulers, tokenizers, safety checkers are skipped)
TRAINABLE_PREFIXES = ("unet", "transformer", "text_encoder", "prior", "decoder")
MUON_ROLES = (Role.MATRIX, Role.CONV, Role.LORA_A, Role.LORA_B)


def _is_trainable_component(name: str) -> bool:
    return name.startswith(TRAINABLE_PREFIXES)


def _component_name_for(folder: Path, module: nn.Module) -> str:
    if _is_trainable_component(folder.name):
        return folder.name
    arch = architecture_for(module)
    if arch is not None and arch.is_text_encoder:
        return "text_encoder"
    return "unet" if "UNet" in type(module).__name__ else "transformer"


def load_component(folder: str | Path, *, meta: bool = True) -> nn.Module:
    """One diffusers/transformers model folder (config.json) -> the real class; meta: shapes only, no weights."""
    import diffusers
    import transformers

    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{folder}: no config.json (not a diffusers/transformers model folder)")
    config = json.loads(config_path.read_text())
    if "_class_name" in config:  # diffusers
        cls = getattr(diffusers, config["_class_name"], None)
        if cls is None:
            raise ValueError(f"{config_path}: unknown diffusers class {config['_class_name']!r}")
        if meta:
            return build_from_config(cls.load_config(folder))
        return cls.from_pretrained(folder)
    architectures = config.get("architectures") or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is None:
        raise ValueError(f"{config_path}: no known transformers class in 'architectures' ({architectures})")
    if meta:
        hf_config = transformers.AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            return cls(hf_config)
    return cls.from_pretrained(folder)


def load_components(folder: str | Path, *, meta: bool = True) -> tuple[dict[str, nn.Module], str | None]:
    """A local diffusers folder -> ({component: model}, pipeline class or None).

    A pipeline folder (model_index.json) gives its trainable components (unet / transformer / text
    encoders); a single-component folder (config.json) gives that one model.
    """
    folder = Path(folder)
    index_path = folder / "model_index.json"
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        components = {
            name: load_component(folder / name, meta=meta)
            for name, value in index.items()
            if not name.startswith("_") and _is_trainable_component(name) and isinstance(value, list) and value[0]
        }
        if not components:
            raise ValueError(f"{index_path}: no unet / transformer / text_encoder components")
        return components, index.get("_class_name")
    module = load_component(folder, meta=meta)
    return {_component_name_for(folder, module): module}, None


def resolve_model(model: str) -> tuple[dict[str, nn.Module], str | None]:
    """MODEL argument -> (components on meta, pipeline class): a local folder or a built-in name."""
    path = Path(model)
    if path.exists():
        return load_components(path, meta=True)
    if model in BUILTINS:
        return build_meta_components(model), BUILTINS[model].pipeline
    raise ValueError(f"MODEL {model!r} is neither a local diffusers folder nor a built-in name ({', '.join(builtin_names())})")


def add_lora(components: Mapping[str, nn.Module], rank: int, *, alpha: float | None = None, names: list[str] | None = None,
             kind: str = "lora") -> None:
    """Freeze everything, then put a PEFT LoRA / LoHa / LoKr (`kind`; default targets, alpha = rank unless given)
    on `names`, through the trainer's injection (tuneonce.model.adapters.add_lora)."""
    from tuneonce.model.adapters import LoraSettings
    from tuneonce.model.adapters import add_lora as inject

    if rank < 1:
        raise ValueError(f"--lora-rank: expected a positive integer, got {rank}")
    names = names if names is not None else backbone_components(components)
    unknown = [n for n in names if n not in components]
    if unknown:
        raise ValueError(f"LoRA components {unknown} not in the model ({', '.join(components)})")
    for module in components.values():
        module.requires_grad_(False)
    for name in names:
        module = components[name]
        settings = LoraSettings(rank=rank, alpha=alpha if alpha is not None else rank,
                                targets=tuple(default_lora_targets(module)), kind=kind)
        inject(module, settings, component=name)


def _group_numbers(info: ParamInfo, *, weight_decay: float, adam_eps: float, adam_weight_decay: float) -> dict:
    """eps, weight decay and update norm one group gets (modules/optimizer/scaling.py, docs/optimizer_math.md §3)."""
    spec = info.spec
    if spec.role in MUON_ROLES:
        decay_fan_in = spec.base_fan_in if spec.role.is_lora_factor else spec.fan_in
        return {
            "ns_eps": scaling.ns_damping(spec.fan_in, spec.fan_out, spec.depth),
            "adam_eps": scaling.adamuon_eps(spec.fan_in, spec.fan_out, spec.depth),
            # per-step decay fraction at peak lr; for LoRA factors: of the adapted product s·B·A
            "weight_decay": scaling.width_decay(weight_decay, decay_fan_in, 1.0),
        }
    matrix_shaped = sum(1 for s in info.param.shape if s != 1) >= 2
    eps = scaling.aux_adam_matrix_eps(info.param.numel(), spec.depth) if matrix_shaped else adam_eps
    return {"ns_eps": None, "adam_eps": eps, "weight_decay": adam_weight_decay}


def inspect_components(
    components: Mapping[str, nn.Module],
    *,
    pipeline: str | None = None,
    weight_decay: float = 0.1,
    adam_eps: float = 1e-8,
    adam_weight_decay: float = 0.0,
    depth_source: DepthSource = "model",
    depth_override: DepthOverride = None,
) -> dict:
    """The report of scripts/inspect_model.py --json, in the shape tests/test_inspect_model.py checks.

    Muon-path groups (matrix, conv, LoRA factors) get ns_eps = √(fan_in/fan_out)/L, adam_eps =
    1/(L·√(fan_in·fan_out)) and weight_decay = wd/fan_in (the per-step fraction at the peak lr; for LoRA
    factors, of the adapted product, with the base layer's fan_in). Auxiliary-Adam groups (vectors,
    embeddings, DoRA magnitudes, OFT) get ns_eps None, the ordinary adam_eps (matrix-shaped:
    1/(L·√numel)) and the auxiliary AdamW weight decay.
    """
    depths = model_depths(components, pipeline=pipeline, depth_override=depth_override)
    infos = param_infos(components, depth_source=depth_source, depths=depths)
    report: dict = {"components": {}}
    for name, module in components.items():
        mine = [i for i in infos if i.component == name]
        # one row per distinct (role, fans, numbers): optimizer groups that differ only in base fans or
        # LoRA scale but get the same eps and decay are shown together
        groups: dict[tuple, dict] = {}
        for info in mine:
            numbers = _group_numbers(info, weight_decay=weight_decay, adam_eps=adam_eps, adam_weight_decay=adam_weight_decay)
            row = {"role": info.spec.role.value, "fan_in": info.spec.fan_in, "fan_out": info.spec.fan_out, **numbers}
            key = tuple(row.values())
            groups.setdefault(key, {**row, "count": 0})["count"] += 1
        report["components"][name] = {
            "class": type(module).__name__,
            "depth": depths[name].depth,
            "trained_depth": depths[name].trained_depth,
            "params": sum(i.param.numel() for i in mine),
            "roles": dict(Counter(i.spec.role.value for i in mine)),
            "groups": [_ordered(g) for g in sorted(groups.values(), key=lambda g: (g["role"], g["fan_in"], g["fan_out"]))],
        }
    return report


def _ordered(group: dict) -> dict:
    keys = ("role", "fan_in", "fan_out", "count", "ns_eps", "adam_eps", "weight_decay")
    return {k: group[k] for k in keys}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def format_report(report: dict, *, lr: float = 1e-3, total_params: Mapping[str, int] | None = None) -> str:
    """Human-readable tables, one per component; lr gives the spectral norm of a Muon update, lr·√(out/in)."""
    lines: list[str] = []
    for name, comp in report["components"].items():
        total = f" of {total_params[name]:,}" if total_params and name in total_params else ""
        lines.append(
            f"{name}: {comp['class']}  depth {comp['depth']}  trained depth {comp['trained_depth']}  "
            f"trainable params {comp['params']:,}{total}"
        )
        if not comp["groups"]:
            lines.append("  (frozen)")
            lines.append("")
            continue
        lines.append("  roles: " + ", ".join(f"{role} {count}" for role, count in sorted(comp["roles"].items())))
        lines.append(f"  {'role':<15}{'count':>6}{'fan_in':>8}{'fan_out':>8}{'ns_eps':>11}{'adam_eps':>11}{'decay/step':>12}{'lr*sqrt(o/i)':>13}")
        for g in comp["groups"]:
            update = lr * scaling.spectral_target(g["fan_in"], g["fan_out"]) if g["ns_eps"] is not None else None
            lines.append(
                f"  {g['role']:<15}{g['count']:>6}{g['fan_in']:>8}{g['fan_out']:>8}{_fmt(g['ns_eps']):>11}"
                f"{_fmt(g['adam_eps']):>11}{_fmt(g['weight_decay']):>12}{_fmt(update):>13}"
            )
        lines.append("")
    return "\n".join(lines)


def parse_depth_argument(text: str | None) -> DepthOverride:
    """--depth 87 -> 87; --depth unet=87,text_encoder=11 -> mapping. Values are checked by depth.py."""
    if text is None:
        return None
    if "=" not in text:
        return int(text) if text.strip().lstrip("-").isdigit() else text
    out: dict[str, object] = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        out[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value.strip()
    return out  # type: ignore[return-value]


def total_params(components: Mapping[str, nn.Module]) -> dict[str, int]:
    return {name: sum(p.numel() for p in module.parameters()) for name, module in components.items()}


__all__ = [
    "add_lora",
    "format_report",
    "inspect_components",
    "load_component",
    "load_components",
    "parse_depth_argument",
    "resolve_model",
    "total_params",
]
