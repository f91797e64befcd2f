"""The optimizer hyperparameters have one definition (modules/optimizer/hparams.py): the optimizers' defaults and
keywords, the config fields (default, bounds, choices, SCHEMA.md text), the factory's keywords and Muon_adv's plan
keys all come from it, and it loads without torch."""
import subprocess
import sys
import typing
from dataclasses import fields

import pytest
import torch
from pydantic import ValidationError

from tuneonce.config.schema import CONSTRUCTOR_KEYS, OptimizerConfig
from tuneonce.optimizer import hparams, muon_adv
from tuneonce.optimizer.hparams import HPARAMS, SPECS, AdaMuonHParams, LoRAMuonHParams, MuonHParams
from tuneonce.optimizer.lora_muon import LoRAMuon
from tuneonce.optimizer.muon_adv import AdaMuon_adv, Muon_adv
from tuneonce.optimizer.orthogonalize import METHODS, ROUTES

OPTIMIZERS = {"muon_adv": Muon_adv, "adamuon_adv": AdaMuon_adv, "lora_muon": LoRAMuon}


def _params():
    return [torch.nn.Parameter(torch.randn(4, 6))]


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_optimizer_defaults_are_the_dataclass_and_config_defaults(kind):
    cls = OPTIMIZERS[kind]
    assert cls.HParams is HPARAMS[kind]
    defaults = cls(_params()).defaults
    assert defaults == HPARAMS[kind]().as_dict()
    config = OptimizerConfig(type=kind)
    assert defaults == config.constructor_kwargs()  # what the factory passes (CONSTRUCTOR_KEYS)
    assert tuple(defaults) == CONSTRUCTOR_KEYS[kind]


@pytest.mark.parametrize("name", sorted(SPECS))
def test_config_field_reads_the_spec(name):
    spec, info = SPECS[name], OptimizerConfig.model_fields[name]
    assert info.default == spec.default
    assert info.description == spec.description
    if spec.choices:
        assert typing.get_args(info.annotation) == spec.choices
    bounds = {
        k: getattr(m, k) for m in info.metadata for k in ("ge", "gt", "le", "lt") if getattr(m, k, None) is not None
    }
    assert bounds == spec.bounds


def test_every_spec_is_a_field_of_some_optimizer_and_every_field_has_a_spec():
    used = {f.name for cls in HPARAMS.values() for f in fields(cls)}
    assert used == set(SPECS)
    for cls in HPARAMS.values():
        for f in fields(cls):
            assert f.metadata["spec"] is SPECS[f.name] and f.default == SPECS[f.name].default, f.name


def test_config_bounds_come_from_the_spec():
    """A bound of the spec is enforced by the config, naming the field."""
    with pytest.raises(ValidationError, match="ns_steps"):
        OptimizerConfig(ns_steps=SPECS["ns_steps"].bounds["le"] + 1)
    with pytest.raises(ValidationError, match="orthogonalizer"):
        OptimizerConfig(orthogonalizer="svd")


def test_plan_keys_are_the_hyperparameters_flagged_plan_and_the_param_spec_keys():
    """lr and adam_lr are read at every step; any other key may change what the bucketing plan fixed."""
    flagged = {name for name, spec in SPECS.items() if spec.plan}
    assert set(AdaMuonHParams.keys()) - {"lr", "adam_lr"} <= set(muon_adv._PLAN_KEYS)
    assert {"lr", "adam_lr"}.isdisjoint(muon_adv._PLAN_KEYS)
    assert set(muon_adv._PLAN_KEYS) & set(SPECS) == flagged & set(AdaMuonHParams.keys())


def test_choices_are_what_the_optimizer_implements():
    assert hparams.ORTHOGONALIZERS == METHODS
    assert hparams.ORTHO_ROUTES == ROUTES
    assert tuple(muon_adv._STATE_DTYPES) == hparams.STATE_DTYPES


def test_keywords_and_a_dataclass_instance_both_set_hyperparameters():
    opt = Muon_adv(_params(), lr=0.1, hparams=MuonHParams(beta1=0.9, adam_betas=[0.8, 0.99]))
    assert (opt.defaults["lr"], opt.defaults["beta1"], opt.defaults["adam_betas"]) == (0.1, 0.9, (0.8, 0.99))
    assert AdaMuon_adv(_params(), 0.02, beta2=0.5).defaults["beta2"] == 0.5  # positional lr still works
    assert LoRAMuon(_params(), hparams=LoRAMuonHParams(rebalance_every=3)).defaults["rebalance_every"] == 3


@pytest.mark.parametrize("cls,key", [(Muon_adv, "beta2"), (LoRAMuon, "nesterov"), (AdaMuon_adv, "betas")])
def test_unknown_keyword_is_a_type_error_naming_it(cls, key):
    with pytest.raises(TypeError, match=rf"{cls.__name__} got unexpected keyword arguments \['{key}'\]"):
        cls(_params(), **{key: 0.5})


def test_hparams_and_the_config_load_without_torch():
    code = (
        "import sys\n"
        "import tuneonce.optimizer.hparams, tuneonce.config.schema\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
