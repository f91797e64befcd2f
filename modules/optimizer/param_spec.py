"""The contract between models and optimizers: what a parameter group may carry.

An optimizer param group is an ordinary torch dict (so it survives ``state_dict``) with
these extra keys, all optional except ``params``:

    role          one of Role's values ("matrix", "conv", "lora_a", ...)
    fan_in        input width of the matrix the group's tensors are (conv: in * kh * kw)
    fan_out       output width (conv: out channels)
    base_fan_in   LoRA factors: fan_in of the adapted (base) layer
    base_fan_out  LoRA factors: fan_out of the adapted layer
    lora_scale    LoRA factors: alpha / r of the adapter
    depth         residual depth L of the component the parameters belong to (>= 1)
    names         list of parameter names, parallel to params (for error messages)
    pairs         LoRA factors: list of pair ids parallel to params; an A and a B with the
                  same id are the two factors of one adapter
    lr, weight_decay   as in torch

All tensors of one group share role, fans, base fans, LoRA scale and depth (they may differ
in name and pair). The depth/roles code (modules/model/roles.py) fills ParamInfo from real
models; build_param_groups (modules/optimizer/groups.py) turns ParamInfos into groups.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch


class Role(str, Enum):
    MATRIX = "matrix"
    CONV = "conv"
    LORA_A = "lora_a"  # PEFT lora_A / kohya lora_down: r x fan_in
    LORA_B = "lora_b"  # PEFT lora_B / kohya lora_up: fan_out x r
    VECTOR = "vector"  # biases, norm scales: always the auxiliary Adam
    EMBEDDING = "embedding"  # token / position embeddings: always the auxiliary Adam
    DORA_MAGNITUDE = "dora_magnitude"
    OFT = "oft"

    @property
    def is_lora_factor(self) -> bool:
        return self in (Role.LORA_A, Role.LORA_B)


GROUP_KEYS = ("role", "fan_in", "fan_out", "base_fan_in", "base_fan_out", "lora_scale", "depth", "names", "pairs")


@dataclass(frozen=True)
class GroupSpec:
    """The per-group numbers an optimizer needs; equal specs may share one group."""

    role: Role
    fan_in: int
    fan_out: int
    depth: int = 1
    base_fan_in: int | None = None
    base_fan_out: int | None = None
    lora_scale: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "role", Role(self.role))
        if self.fan_in < 1 or self.fan_out < 1:
            raise ValueError(f"fan_in and fan_out must be >= 1, got fan_in={self.fan_in}, fan_out={self.fan_out}")
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")
        if self.role.is_lora_factor and (self.base_fan_in is None or self.base_fan_out is None):
            raise ValueError(f"role {self.role.value} needs base_fan_in and base_fan_out")
        if not self.lora_scale > 0:
            raise ValueError(f"lora_scale must be > 0, got {self.lora_scale}")

    def as_group_keys(self) -> dict:
        keys = {"role": self.role.value, "fan_in": self.fan_in, "fan_out": self.fan_out, "depth": self.depth}
        if self.role.is_lora_factor:
            keys.update(base_fan_in=self.base_fan_in, base_fan_out=self.base_fan_out, lora_scale=self.lora_scale)
        return keys


@dataclass
class ParamInfo:
    """One trainable parameter with everything the optimizer needs to know about it."""

    name: str
    param: torch.Tensor
    spec: GroupSpec
    component: str = "model"  # diffusers pipeline component name: unet, transformer, text_encoder, ...
    pair: str | None = None  # LoRA factors: id shared by the A and the B of one adapter
    extra: dict = field(default_factory=dict)


def infer_spec(param: torch.Tensor, depth: int = 1) -> GroupSpec:
    """Role and fans of a plain parameter from its shape (for drop-in use without metadata)."""
    if param.ndim <= 1:
        n = max(param.numel(), 1)
        return GroupSpec(Role.VECTOR, fan_in=n, fan_out=n, depth=depth)
    if param.ndim == 2:
        return GroupSpec(Role.MATRIX, fan_in=param.shape[1], fan_out=param.shape[0], depth=depth)
    fan_in = param[0].numel()
    return GroupSpec(Role.CONV, fan_in=max(fan_in, 1), fan_out=param.shape[0], depth=depth)
