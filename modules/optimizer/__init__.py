"""Muon-family optimizers that know each model's residual depth and each matrix's width.

The names below load on first use (PEP 562), so that the torch-free ``tuneonce.optimizer.hparams``, which the config
reads, can be imported without importing torch. (``tuneonce.optimizer.orthogonalize`` is the module of that name; its
function is ``tuneonce.optimizer.orthogonalize.orthogonalize``.)
"""
from importlib import import_module

_WHERE = {
    "adamw_step": "aux_adam",
    "signsgd_step": "aux_adam",
    "build_param_groups": "groups",
    "peft_param_infos": "groups",
    "LoRAMuon": "lora_muon",
    "AdaMuon_adv": "muon_adv",
    "Muon_adv": "muon_adv",
    "singular_value_map": "orthogonalize",
    "GroupSpec": "param_spec",
    "ParamInfo": "param_spec",
    "Role": "param_spec",
    "infer_spec": "param_spec",
}

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
    "peft_param_infos",
    "signsgd_step",
    "singular_value_map",
]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
