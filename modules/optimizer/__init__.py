"""Muon-family optimizers that know each model's residual depth and each matrix's width."""
from tuneonce.optimizer.aux_adam import adamw_step, signsgd_step
from tuneonce.optimizer.groups import build_param_groups, peft_param_infos
from tuneonce.optimizer.lora_muon import LoRAMuon
from tuneonce.optimizer.muon_adv import AdaMuon_adv, Muon_adv
from tuneonce.optimizer.orthogonalize import orthogonalize, singular_value_map
from tuneonce.optimizer.param_spec import GroupSpec, ParamInfo, Role, infer_spec

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
