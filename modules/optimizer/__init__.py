"""Muon-family optimizers that know each model's residual depth and each matrix's width."""
from modules.optimizer.aux_adam import adamw_step, signsgd_step
from modules.optimizer.groups import build_param_groups, peft_param_infos
from modules.optimizer.lora_muon import LoRAMuon
from modules.optimizer.muon_adv import AdaMuon_adv, Muon_adv
from modules.optimizer.orthogonalize import orthogonalize, singular_value_map
from modules.optimizer.param_spec import GroupSpec, ParamInfo, Role, infer_spec

__all__ = [
    "AdaMuon_adv",
    "Muon_adv",
    "GroupSpec",
    "LoRAMuon",
    "ParamInfo",
    "Role",
    "adamw_step",
    "build_param_groups",
    "infer_spec",
    "orthogonalize",
    "peft_param_infos",
    "signsgd_step",
    "singular_value_map",
]
