"""Each Muon-family hyperparameter is still spelled in several places (the config schema, its *_KEYS lists, the
optimizer's signature, its defaults, muon_adv._PLAN_KEYS): until they come from one definition, these checks keep
the places in agreement, so a default changed in one place or a key missing in another fails here by name."""
import inspect

import pytest

from tuneonce.config.schema import ADAMUON_KEYS, LORA_MUON_KEYS, MUON_KEYS, OptimizerConfig
from tuneonce.optimizer import muon_adv
from tuneonce.optimizer.lora_muon import LoRAMuon
from tuneonce.optimizer.muon_adv import AdaMuon_adv, Muon_adv


def _signature_defaults(cls) -> dict:
    out = {}
    for klass in reversed(cls.__mro__):  # AdaMuon_adv adds beta2/eps to Muon_adv's keywords
        if "__init__" in vars(klass) and klass.__module__.startswith("tuneonce."):
            for name, p in inspect.signature(klass.__init__).parameters.items():
                if p.default is not inspect.Parameter.empty:
                    out[name] = p.default
    return out


@pytest.mark.parametrize("cls,keys", [(Muon_adv, MUON_KEYS), (AdaMuon_adv, ADAMUON_KEYS), (LoRAMuon, LORA_MUON_KEYS)])
def test_config_defaults_are_the_optimizer_defaults(cls, keys):
    config = OptimizerConfig()
    signature = _signature_defaults(cls)
    differ = {
        k: (getattr(config, k), signature.get(k, "missing")) for k in keys if signature.get(k) != getattr(config, k)
    }
    assert not differ, f"{cls.__name__}: config default vs constructor default: {differ}"


def test_every_constructor_key_but_the_learning_rates_rebuilds_the_muon_plan():
    """lr and adam_lr are read at every step; any other key may change what the bucketing plan fixed."""
    missing = [k for k in ADAMUON_KEYS if k not in ("lr", "adam_lr") and k not in muon_adv._PLAN_KEYS]
    assert not missing, f"muon_adv._PLAN_KEYS lacks {missing}"
