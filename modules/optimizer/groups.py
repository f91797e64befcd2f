"""Turn ParamInfos into torch param groups, and read ParamInfos off a model with PEFT LoRA adapters.

`build_param_groups` is the one place where per-parameter metadata (modules/optimizer/param_spec.py)
becomes optimizer param groups: parameters with an equal GroupSpec and an equal lr share a group, and
the group carries `names` / `pairs` lists parallel to `params`.

`peft_param_infos` is the simple helper for models wrapped by PEFT (LoRA, DoRA) when only a plain
depth number is known; modules/model/roles.py fills the same ParamInfos from real models.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from tuneonce.optimizer.param_spec import GroupSpec, ParamInfo, Role, infer_spec


def build_param_groups(
    infos: list[ParamInfo],
    *,
    lr: float,
    weight_decay: float,
    lr_overrides: Mapping[str, float] | None = None,
) -> list[dict]:
    """Merge ParamInfos with equal GroupSpec and equal lr into torch param groups.

    lr_overrides maps a component name ("text_encoder") or a role value ("lora_a", "vector") to an lr;
    a component match wins over a role match. Groups come out in order of first appearance.
    """
    overrides = dict(lr_overrides or {})
    for key, value in overrides.items():
        if not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"lr_overrides[{key!r}] must be a number >= 0, got {value!r}")
    if lr < 0:
        raise ValueError(f"lr must be >= 0, got {lr}")

    groups: dict[tuple[GroupSpec, float], dict] = {}
    seen: dict[int, str] = {}
    for info in infos:
        if not isinstance(info.spec, GroupSpec):
            raise ValueError(f"parameter {info.name!r}: spec must be a GroupSpec, got {type(info.spec).__name__}")
        if id(info.param) in seen:
            raise ValueError(f"parameter {info.name!r} is the same tensor as {seen[id(info.param)]!r}")
        seen[id(info.param)] = info.name
        if info.spec.role.is_lora_factor and not info.pair:
            raise ValueError(f"LoRA factor {info.name!r} (role {info.spec.role.value}) has no pair id")
        group_lr = float(overrides.get(info.component, overrides.get(info.spec.role.value, lr)))
        key = (info.spec, group_lr)
        if key not in groups:
            groups[key] = {
                "params": [],
                "names": [],
                "pairs": [],
                **info.spec.as_group_keys(),
                "lr": group_lr,
                "weight_decay": weight_decay,
            }
        group = groups[key]
        group["params"].append(info.param)
        group["names"].append(info.name)
        group["pairs"].append(info.pair)
    return list(groups.values())


def adapted_layer_fans(base: nn.Module) -> tuple[int, int]:
    """fan_in, fan_out of the layer a LoRA adapts (conv: in/groups * kernel elements, out channels).

    transformers' Conv1D (GPT-2) stores its weight as (in, out), the transpose of nn.Linear: read its
    nx / nf instead of the weight's shape, or fan_in and fan_out come out swapped.
    """
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if isinstance(base, nn.modules.conv._ConvNd):
        weight = base.weight
        return weight[0].numel(), weight.shape[0]
    if type(base).__name__ == "Conv1D" and isinstance(getattr(base, "nf", None), int):
        return base.weight.shape[0], base.nf
    weight = getattr(base, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim >= 2:
        return weight[0].numel(), weight.shape[0]
    raise ValueError(f"cannot read fan_in/fan_out of the layer adapted by a LoRA ({type(base).__name__})")


def _factor_spec(weight: torch.Tensor, role: Role, base_in: int, base_out: int, scale: float, depth: int) -> GroupSpec:
    return GroupSpec(
        role,
        fan_in=max(weight[0].numel(), 1),
        fan_out=weight.shape[0],
        depth=depth,
        base_fan_in=base_in,
        base_fan_out=base_out,
        lora_scale=float(scale),
    )


def peft_param_infos(model: nn.Module, depth: int, component: str = "model") -> list[ParamInfo]:
    """ParamInfos for every trainable parameter of a model carrying PEFT LoRA/DoRA adapters.

    lora_A / lora_B weights become LORA_A / LORA_B with the base layer's fans and PEFT's `scaling`
    (alpha/r) as lora_scale; the pair id is "<module path>:<adapter name>". DoRA magnitudes, LoRA
    biases and embedding adapters get their own roles (they belong to the auxiliary Adam); any other
    trainable parameter gets its role from its shape (infer_spec).
    """
    from peft.tuners.lora import LoraLayer  # local: importing peft is slow and only needed here

    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    infos: list[ParamInfo] = []
    claimed: set[int] = set()

    def add(name: str, param: torch.Tensor, spec: GroupSpec, pair: str | None = None) -> None:
        if param.requires_grad and id(param) not in claimed:
            claimed.add(id(param))
            infos.append(ParamInfo(name=name, param=param, spec=spec, component=component, pair=pair))

    for path, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        for adapter, down in module.lora_A.items():
            up = module.lora_B[adapter]
            a_name, b_name = f"{path}.lora_A.{adapter}.weight", f"{path}.lora_B.{adapter}.weight"
            if getattr(up, "groups", 1) != 1:
                # grouped conv: lora_B is block-diagonal, not an out x r matrix; no LoRA pair math applies
                add(a_name, down.weight, infer_spec(down.weight, depth))
                add(b_name, up.weight, infer_spec(up.weight, depth))
                continue
            base_in, base_out = adapted_layer_fans(base)
            scale = module.scaling[adapter]
            pair = f"{path}:{adapter}"
            add(a_name, down.weight, _factor_spec(down.weight, Role.LORA_A, base_in, base_out, scale, depth), pair)
            add(b_name, up.weight, _factor_spec(up.weight, Role.LORA_B, base_in, base_out, scale, depth), pair)
            if getattr(up, "bias", None) is not None:
                add(f"{path}.lora_B.{adapter}.bias", up.bias, infer_spec(up.bias, depth))
        for adapter, magnitude in module.lora_magnitude_vector.items():
            weight = magnitude.weight
            spec = GroupSpec(Role.DORA_MAGNITUDE, fan_in=max(weight.numel(), 1), fan_out=max(weight.numel(), 1), depth=depth)
            add(f"{path}.lora_magnitude_vector.{adapter}.weight", weight, spec)
        for table_name in ("lora_embedding_A", "lora_embedding_B"):
            for adapter, table in getattr(module, table_name, {}).items():
                spec = GroupSpec(Role.EMBEDDING, fan_in=table.shape[-1], fan_out=table.shape[0], depth=depth)
                add(f"{path}.{table_name}.{adapter}", table, spec)

    for name, param in model.named_parameters():
        add(name, param, infer_spec(param, depth))
    return infos
