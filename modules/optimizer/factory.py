"""Config → optimizer: the one place that turns ParamInfos and the `optimizer:` section into an optimizer.

Muon_adv / AdaMuon_adv / LoRAMuon get param groups from `build_param_groups` (roles, fans, depth) and the
constructor keywords of the config 1:1. `adamw` is torch.optim.AdamW over the same groups; `torch_muon` is
torch.optim.Muon on the 2-D matrices plus AdamW (the auxiliary settings) on everything else, because torch's Muon
accepts only 2-D parameters. `prodigy` is Prodigy (Mishchenko & Defazio, "Prodigy: An Expeditiously Adaptive
Parameter-Free Learner", 2023) from the prodigyopt package over the same groups as AdamW.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from tuneonce.optimizer.groups import build_param_groups
from tuneonce.optimizer.param_spec import ParamInfo, Role

_TORCH_MUON_ROLES = (Role.MATRIX, Role.LORA_A, Role.LORA_B)


class OptimizerChain(torch.optim.Optimizer):
    """Several optimizers stepped as one (param groups concatenated, so LR schedulers and accelerate see all)."""

    def __init__(self, optimizers: Mapping[str, torch.optim.Optimizer]) -> None:
        # Optimizer.__init__ is not called on purpose: the parts own the groups and the state.
        self.optimizers = dict(optimizers)
        self.defaults: dict[str, Any] = {}
        self.param_groups = [g for opt in self.optimizers.values() for g in opt.param_groups]
        self._optimizer_step_pre_hooks: dict = {}
        self._optimizer_step_post_hooks: dict = {}
        self._optimizer_state_dict_pre_hooks: dict = {}
        self._optimizer_state_dict_post_hooks: dict = {}
        self._optimizer_load_state_dict_pre_hooks: dict = {}
        self._optimizer_load_state_dict_post_hooks: dict = {}

    @property
    def state(self) -> dict:  # type: ignore[override]
        merged: dict = {}
        for opt in self.optimizers.values():
            merged.update(opt.state)
        return merged

    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers.values():
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:  # type: ignore[override]
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state_dict: dict) -> None:  # type: ignore[override]
        missing = set(self.optimizers) - set(state_dict)
        if missing:
            raise ValueError(f"optimizer state has no entry for {sorted(missing)}")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state_dict[name])

    def __repr__(self) -> str:
        return f"OptimizerChain({', '.join(f'{k}={type(v).__name__}' for k, v in self.optimizers.items())})"


def lr_overrides_from_config(cfg: Any) -> dict[str, float]:
    """Per-component peak LRs: the config's optimizer.text_encoder_lr entries that are set."""
    te = getattr(cfg, "text_encoder_lr", None)
    if te is None:
        return {}
    values = te.model_dump() if hasattr(te, "model_dump") else dict(te)
    return {name: float(lr) for name, lr in values.items() if lr is not None}


def build_optimizer(cfg: Any, infos: list[ParamInfo]) -> torch.optim.Optimizer:
    """`cfg` is the config's OptimizerConfig (or anything with the same attributes)."""
    if not infos:
        raise ValueError("optimizer: there are no trainable parameters (check method, lora.targets, lora.layer_filter)")
    kind = cfg.type
    overrides = lr_overrides_from_config(cfg)
    if kind in ("muon_adv", "adamuon_adv", "lora_muon"):
        from tuneonce.optimizer.lora_muon import LoRAMuon
        from tuneonce.optimizer.muon_adv import AdaMuon_adv, Muon_adv

        cls = {"muon_adv": Muon_adv, "adamuon_adv": AdaMuon_adv, "lora_muon": LoRAMuon}[kind]
        groups = build_param_groups(infos, lr=cfg.lr, weight_decay=cfg.weight_decay, lr_overrides=overrides)
        return cls(groups, **cfg.constructor_kwargs())
    if kind == "adamw":
        groups = build_param_groups(infos, lr=cfg.lr, weight_decay=cfg.weight_decay, lr_overrides=overrides)
        return torch.optim.AdamW(
            groups, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, weight_decay=cfg.weight_decay, foreach=True
        )
    if kind == "torch_muon":
        matrices = [i for i in infos if i.spec.role in _TORCH_MUON_ROLES and i.param.ndim == 2]
        rest = [i for i in infos if not (i.spec.role in _TORCH_MUON_ROLES and i.param.ndim == 2)]
        parts: dict[str, torch.optim.Optimizer] = {}
        if matrices:
            groups = build_param_groups(matrices, lr=cfg.lr, weight_decay=cfg.weight_decay, lr_overrides=overrides)
            parts["muon"] = torch.optim.Muon(
                groups, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.beta1, nesterov=cfg.nesterov,
                ns_steps=cfg.ns_steps, eps=cfg.ns_eps,
            )  # fmt: skip
        if rest:
            groups = build_param_groups(rest, lr=cfg.adam_lr, weight_decay=cfg.adam_weight_decay)
            parts["adamw"] = torch.optim.AdamW(
                groups, lr=cfg.adam_lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                weight_decay=cfg.adam_weight_decay, foreach=True,
            )  # fmt: skip
        return next(iter(parts.values())) if len(parts) == 1 else OptimizerChain(parts)
    if kind == "prodigy":
        from prodigyopt import Prodigy  # a dependency; imported here so the other optimizers load without it

        groups = build_param_groups(infos, lr=cfg.lr, weight_decay=cfg.weight_decay, lr_overrides=overrides)
        return Prodigy(
            groups, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
            decouple=cfg.prodigy_decouple, use_bias_correction=cfg.prodigy_use_bias_correction,
            safeguard_warmup=cfg.prodigy_safeguard_warmup, d0=cfg.prodigy_d0, d_coef=cfg.prodigy_d_coef,
            growth_rate=float("inf") if cfg.prodigy_growth_rate is None else cfg.prodigy_growth_rate,
        )  # fmt: skip
    raise ValueError(
        f"optimizer.type: unknown optimizer {kind!r}; known: muon_adv, adamuon_adv, lora_muon, adamw, torch_muon, prodigy"
    )
