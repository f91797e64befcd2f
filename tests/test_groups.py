import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from tuneonce.optimizer.groups import build_param_groups, peft_param_infos
from tuneonce.optimizer.param_spec import GroupSpec, ParamInfo, Role


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.to_q = nn.Linear(8, 12)
        self.to_k = nn.Linear(8, 12)
        self.proj = nn.Linear(12, 6)
        self.norm = nn.LayerNorm(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).mean(dim=(2, 3))
        return self.norm(self.proj(self.to_q(h) * self.to_k(h)))


def _peft_tiny(**config) -> nn.Module:
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["conv", "to_q", "to_k", "proj"], **config)
    return get_peft_model(Tiny(), cfg)


def _by_name(infos: list[ParamInfo]) -> dict[str, ParamInfo]:
    return {info.name.split("base_model.model.")[-1]: info for info in infos}


def test_peft_infos_read_factor_roles_fans_scale_and_pairs():
    model = _peft_tiny()
    infos = _by_name(peft_param_infos(model, depth=7, component="unet"))
    a, b = infos["to_q.lora_A.default.weight"], infos["to_q.lora_B.default.weight"]
    assert a.spec.role is Role.LORA_A and b.spec.role is Role.LORA_B
    assert (a.spec.fan_in, a.spec.fan_out) == (8, 4) and (b.spec.fan_in, b.spec.fan_out) == (4, 12)
    assert (a.spec.base_fan_in, a.spec.base_fan_out) == (8, 12) == (b.spec.base_fan_in, b.spec.base_fan_out)
    assert a.spec.lora_scale == pytest.approx(2.0) and a.spec.depth == 7 and a.component == "unet"
    assert a.pair == b.pair and a.pair != infos["to_k.lora_A.default.weight"].pair
    # conv LoRA: lora_A is a 3x3 conv, lora_B 1x1; fans from the base conv (3 * 3 * 3 in, 8 out)
    conv_a, conv_b = infos["conv.lora_A.default.weight"], infos["conv.lora_B.default.weight"]
    assert conv_a.spec.fan_in == 27 and conv_b.spec.fan_out == 8
    assert (conv_a.spec.base_fan_in, conv_a.spec.base_fan_out) == (27, 8)
    # frozen base weights are not listed; every trainable parameter is, exactly once
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(info.param) for info in infos.values()} == trainable
    assert len(infos) == len(trainable) == 8


def test_peft_infos_dora_magnitude_and_unfrozen_norm():
    model = _peft_tiny(use_dora=True)
    model.base_model.model.norm.weight.requires_grad_(True)
    infos = _by_name(peft_param_infos(model, depth=1))
    assert infos["to_k.lora_magnitude_vector.default.weight"].spec.role is Role.DORA_MAGNITUDE
    assert infos["norm.weight"].spec.role is Role.VECTOR


def test_build_param_groups_merges_equal_specs_and_keeps_lists_parallel():
    model = _peft_tiny()
    infos = peft_param_infos(model, depth=3)
    groups = build_param_groups(infos, lr=1e-3, weight_decay=0.1)
    # to_q and to_k adapters have equal specs: their A's share a group, their B's share a group
    q_a = next(g for g in groups if any(n.endswith("to_q.lora_A.default.weight") for n in g["names"]))
    assert len(q_a["params"]) == len(q_a["names"]) == len(q_a["pairs"]) == 2
    assert any(n.endswith("to_k.lora_A.default.weight") for n in q_a["names"])
    assert q_a["role"] == "lora_a" and q_a["base_fan_in"] == 8 and q_a["depth"] == 3 and q_a["lora_scale"] == 2.0
    assert q_a["lr"] == 1e-3 and q_a["weight_decay"] == 0.1
    for group in groups:
        for p, name in zip(group["params"], group["names"]):
            assert dict(model.named_parameters())[name] is p
    assert sum(len(g["params"]) for g in groups) == len(infos)
    # the groups are valid torch param groups
    torch.optim.SGD(groups, lr=1.0)


def test_lr_overrides_split_groups_by_component_then_role():
    spec = GroupSpec(Role.MATRIX, fan_in=4, fan_out=4)
    params = [nn.Parameter(torch.zeros(4, 4)) for _ in range(3)]
    infos = [
        ParamInfo("unet.w", params[0], spec, component="unet"),
        ParamInfo("te.w", params[1], spec, component="text_encoder"),
        ParamInfo("unet.v", params[2], spec, component="unet"),
    ]
    groups = build_param_groups(infos, lr=1e-3, weight_decay=0.0, lr_overrides={"text_encoder": 5e-4, "matrix": 2e-3})
    assert [(g["names"], g["lr"]) for g in groups] == [(["unet.w", "unet.v"], 2e-3), (["te.w"], 5e-4)]


def test_bad_input_names_the_parameter():
    spec = GroupSpec(Role.LORA_A, fan_in=4, fan_out=2, base_fan_in=4, base_fan_out=4)
    p = nn.Parameter(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="down.weight"):
        build_param_groups([ParamInfo("down.weight", p, spec)], lr=1e-3, weight_decay=0.0)
    matrix = GroupSpec(Role.MATRIX, fan_in=4, fan_out=2)
    with pytest.raises(ValueError, match="'b'.*'a'"):
        build_param_groups([ParamInfo("a", p, matrix), ParamInfo("b", p, matrix)], lr=1e-3, weight_decay=0.0)
    with pytest.raises(ValueError, match="lr_overrides\\['vector'\\]"):
        build_param_groups([], lr=1e-3, weight_decay=0.0, lr_overrides={"vector": -1.0})


def test_gpt2_conv1d_fans_read_in_out_not_swapped() -> None:
    """transformers' Conv1D stores (in, out): a LoRA on GPT-2's c_fc (32 -> 128) has base fans 32 in, 128 out."""
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import GPT2Config, GPT2Model

    from tuneonce.model.roles import param_infos

    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=16, vocab_size=50))
    fc = model.h[0].mlp.c_fc
    assert tuple(fc.weight.shape) == (32, 128)  # the layout this test is about
    full = {i.name: i.spec for i in param_infos({"text_encoder": model})}["h.0.mlp.c_fc.weight"]
    assert (full.role, full.fan_in, full.fan_out) == (Role.MATRIX, 32, 128)

    model.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["c_fc"], fan_in_fan_out=True), model)
    for infos in (peft_param_infos(model, depth=2), param_infos({"text_encoder": model})):
        specs = {i.name: i.spec for i in infos}
        a, b = specs["h.0.mlp.c_fc.lora_A.default.weight"], specs["h.0.mlp.c_fc.lora_B.default.weight"]
        assert (a.base_fan_in, a.base_fan_out) == (b.base_fan_in, b.base_fan_out) == (32, 128)
        assert (a.fan_in, a.fan_out, b.fan_in, b.fan_out) == (32, 4, 4, 128)
