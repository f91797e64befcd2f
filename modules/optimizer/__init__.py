"""Muon-family optimizers that know each model's residual depth and each matrix's width."""
from modules.optimizer.aux_adam import adamw_step, signsgd_step
from modules.optimizer.muon_adv import AdaMuon_adv, Muon_adv
from modules.optimizer.orthogonalize import orthogonalize, singular_value_map
from modules.optimizer.param_spec import GroupSpec, ParamInfo, Role, infer_spec

__all__ = [
    "AdaMuon_adv",
    "Muon_adv",
    "GroupSpec",
    "ParamInfo",
    "Role",
    "adamw_step",
    "infer_spec",
    "orthogonalize",
    "signsgd_step",
    "singular_value_map",
]
