"""Parameter roles and widths: a tiny real UNet with a PEFT LoRA saved and loaded back, full finetuning,
kohya / LyCORIS names, DoRA; and the ParamInfos feed the optimizer's param groups."""
from __future__ import annotations

import copy
import math
from collections import Counter, defaultdict

import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from tuneonce.model.builtin import build_from_config, default_lora_targets, load_config
from tuneonce.model.depth import component_depth, model_depths
from tuneonce.model.inspect import load_components
from tuneonce.model.roles import param_infos
from tuneonce.optimizer.groups import build_param_groups
from tuneonce.optimizer.param_spec import Role

RANK, ALPHA = 4, 8
TINY_UNET = dict(
    block_out_channels=(8, 16), layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2), cross_attention_dim=16,
    attention_head_dim=2, norm_num_groups=4, sample_size=8,
)
# down: 1 resnet | 1 resnet + 2 transformer blocks; mid: 2 resnets + 2 blocks; up: 2 resnets + 2x2 blocks | 2 resnets
TINY_UNET_DEPTH = 1 + (1 + 2) + (2 + 2) + (2 + 2 * 2) + 2
# LoRA on to_q / to_k / ff.net.2 of up_blocks.0.attentions.1 (2 transformer blocks) and one resnet conv
LORA_TARGETS = r".*up_blocks\.0\.attentions\.1\..*\.(to_q|to_k|ff\.net\.2)|.*down_blocks\.1\.resnets\.0\.conv1"
TRAINED_BLOCKS = 2 + 1


def _tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY_UNET)


def _base_fans(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    return layer.in_channels * math.prod(layer.kernel_size), layer.out_channels


@pytest.fixture(scope="module")
def saved_lora(tmp_path_factory):
    """A tiny UNet saved with save_pretrained and its LoRA saved with diffusers' save_lora_adapter."""
    folder = tmp_path_factory.mktemp("tiny")
    unet = _tiny_unet()
    unet.save_pretrained(folder / "unet")
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=LORA_TARGETS), unet)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_()  # nonzero B, so loading back is visible
    unet.save_lora_adapter(folder / "lora")
    return folder, {n: p.detach().clone() for n, p in unet.named_parameters() if "lora_" in n}


def _check_lora_infos(unet: nn.Module, infos) -> None:
    assert Counter(i.spec.role for i in infos) == {Role.LORA_A: 11, Role.LORA_B: 11}
    pairs = defaultdict(list)
    for info in infos:
        pairs[info.pair].append(info.spec.role)
        layer_path = info.pair.split(":")[0]
        base = unet.get_submodule(layer_path).get_base_layer()
        base_in, base_out = _base_fans(base)
        spec = info.spec
        assert (spec.base_fan_in, spec.base_fan_out) == (base_in, base_out), info.name
        if spec.role is Role.LORA_A:
            assert (spec.fan_in, spec.fan_out) == (base_in, RANK), info.name
        else:
            assert (spec.fan_in, spec.fan_out) == (RANK, base_out), info.name
        assert spec.lora_scale == ALPHA / RANK
        assert info.component == "unet"
    assert all(sorted(roles) == [Role.LORA_A, Role.LORA_B] for roles in pairs.values())
    conv = [i for i in infos if "conv1" in i.name and i.spec.role is Role.LORA_A][0]
    assert conv.spec.fan_in == 8 * 3 * 3  # conv LoRA A: in channels x kernel elements


def test_peft_lora_loaded_back_roles_widths_and_trained_depth(saved_lora):
    folder, saved = saved_lora
    components, pipeline = load_components(folder / "unet", meta=False)
    assert pipeline is None and list(components) == ["unet"]
    unet = components["unet"]
    unet.load_lora_adapter(
        folder / "lora", weight_name="pytorch_lora_weights.safetensors", prefix=None, adapter_name="default"
    )
    loaded = {n: p for n, p in unet.named_parameters() if "lora_" in n}
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[n], saved[n]) for n in saved)

    depths = model_depths(components)
    assert (depths["unet"].depth, depths["unet"].trained_depth) == (TINY_UNET_DEPTH, TRAINED_BLOCKS)

    infos = param_infos(components)
    assert {i.name for i in infos} == set(saved)  # exactly the trainable LoRA tensors
    _check_lora_infos(unet, infos)
    assert {i.spec.depth for i in infos} == {TINY_UNET_DEPTH}
    trained = param_infos(components, depth_source="trained")
    assert {i.spec.depth for i in trained} == {TRAINED_BLOCKS}


def test_meta_loading_gives_the_same_specs(saved_lora):
    folder, _ = saved_lora
    components, _ = load_components(folder / "unet", meta=True)
    unet = components["unet"]
    assert next(unet.parameters()).device.type == "meta"
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=LORA_TARGETS), unet)
    meta_infos = param_infos(components)
    _check_lora_infos(unet, meta_infos)

    real = _tiny_unet()
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=LORA_TARGETS), real)
    real_specs = {i.name: i.spec for i in param_infos({"unet": real})}
    assert {i.name: i.spec for i in meta_infos} == real_specs


def test_full_finetune_roles_cover_every_parameter_once():
    unet = _tiny_unet()
    text = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, vocab_size=100, max_position_embeddings=12))
    components = {"unet": unet, "text_encoder": text}
    infos = param_infos(components)
    by_name = {(i.component, i.name): i.spec for i in infos}
    expected = {(c, n) for c, m in components.items() for n, p in m.named_parameters()}
    assert by_name.keys() == expected

    conv_in = by_name[("unet", "conv_in.weight")]
    assert (conv_in.role, conv_in.fan_in, conv_in.fan_out) == (Role.CONV, 4 * 3 * 3, 8)
    # GEGLU input projection of a 16-wide block: 16 -> 2 x 4 x 16 (not square, so fan_in/fan_out order shows)
    spec = by_name[("unet", "up_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight")]
    assert (spec.role, spec.fan_in, spec.fan_out) == (Role.MATRIX, 16, 128)
    for (component, name), spec in by_name.items():
        param = components[component].get_parameter(name)
        if param.ndim == 1:
            assert spec.role is Role.VECTOR, name
    token = by_name[("text_encoder", "embeddings.token_embedding.weight")]
    assert (token.role, token.fan_in, token.fan_out) == (Role.EMBEDDING, 100, 16)
    assert by_name[("text_encoder", "embeddings.position_embedding.weight")].role is Role.EMBEDDING
    assert {s.depth for (c, _), s in by_name.items() if c == "text_encoder"} == {2}
    assert {s.depth for (c, _), s in by_name.items() if c == "unet"} == {TINY_UNET_DEPTH}


class _KohyaLoRA(nn.Module):
    def __init__(self, lin: int, lout: int, rank: int, alpha: float, conv: bool = False) -> None:
        super().__init__()
        if conv:
            self.lora_down = nn.Conv2d(lin, rank, 3, bias=False)
            self.lora_up = nn.Conv2d(rank, lout, 1, bias=False)
        else:
            self.lora_down = nn.Linear(lin, rank, bias=False)
            self.lora_up = nn.Linear(rank, lout, bias=False)
        self.register_buffer("alpha", torch.tensor(alpha))


class _LoHa(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hada_w1_a = nn.Parameter(torch.zeros(48, 4))
        self.hada_w1_b = nn.Parameter(torch.zeros(4, 32))
        self.hada_w2_a = nn.Parameter(torch.zeros(48, 4))
        self.hada_w2_b = nn.Parameter(torch.zeros(4, 32))
        self.register_buffer("alpha", torch.tensor(2.0))


class _LoKr(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lokr_w1 = nn.Parameter(torch.zeros(4, 4))
        self.lokr_w2_a = nn.Parameter(torch.zeros(12, 2))
        self.lokr_w2_b = nn.Parameter(torch.zeros(2, 8))


def test_kohya_and_lycoris_names():
    network = nn.Module()
    network.lora_unet_mid_block_attentions_0_proj_in = _KohyaLoRA(32, 48, rank=8, alpha=4.0)
    network.lora_unet_conv_in = _KohyaLoRA(6, 16, rank=4, alpha=4.0, conv=True)
    network.lora_unet_mid_block_attentions_0_proj_out = _LoHa()
    network.lora_te1_fc1 = _LoKr()
    network.lora_te1_fc1.dora_scale = nn.Parameter(torch.ones(1, 96))
    specs = {i.name: (i.spec, i.pair) for i in param_infos({"unet": network}, depth_override=9)}

    down, pair = specs["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"]
    assert (down.role, down.fan_in, down.fan_out, down.base_fan_in, down.base_fan_out) == (Role.LORA_A, 32, 8, 32, 48)
    assert down.lora_scale == 4.0 / 8 and down.depth == 9
    up, up_pair = specs["lora_unet_mid_block_attentions_0_proj_in.lora_up.weight"]
    assert (up.role, up.fan_in, up.fan_out) == (Role.LORA_B, 8, 48) and up_pair == pair

    conv_down, _ = specs["lora_unet_conv_in.lora_down.weight"]
    assert (conv_down.fan_in, conv_down.base_fan_in, conv_down.base_fan_out) == (6 * 9, 6 * 9, 16)
    assert conv_down.lora_scale == 1.0

    w1a, w1a_pair = specs["lora_unet_mid_block_attentions_0_proj_out.hada_w1_a"]
    w1b, w1b_pair = specs["lora_unet_mid_block_attentions_0_proj_out.hada_w1_b"]
    w2a, w2a_pair = specs["lora_unet_mid_block_attentions_0_proj_out.hada_w2_a"]
    assert (w1a.role, w1a.fan_in, w1a.fan_out, w1a.base_fan_in, w1a.base_fan_out) == (Role.LORA_B, 4, 48, 32, 48)
    assert (w1b.role, w1b.fan_in, w1b.fan_out) == (Role.LORA_A, 32, 4)
    # alpha/r scales the Hadamard product once: on branch 2 (LyCORIS zero-inits hada_w2_a), not on both branches
    assert w1a_pair == w1b_pair != w2a_pair and w1a.lora_scale == 1.0 and w2a.lora_scale == 2.0 / 4

    assert specs["lora_te1_fc1.lokr_w1"][0].role is Role.MATRIX
    w2b, _ = specs["lora_te1_fc1.lokr_w2_b"]
    assert (w2b.role, w2b.fan_in, w2b.fan_out, w2b.base_fan_in, w2b.base_fan_out) == (Role.LORA_A, 8, 2, 8, 12)
    assert specs["lora_te1_fc1.dora_scale"][0].role is Role.DORA_MAGNITUDE


def test_dora_and_param_groups_contract():
    unet = _tiny_unet()
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, use_dora=True, target_modules=["to_q", "to_v"]), unet)
    infos = param_infos({"unet": unet})
    roles = Counter(i.spec.role for i in infos)
    n_layers = sum(1 for n, _ in unet.named_modules() if n.endswith(("to_q", "to_v")))
    assert roles == {Role.LORA_A: n_layers, Role.LORA_B: n_layers, Role.DORA_MAGNITUDE: n_layers}

    groups = build_param_groups(infos, lr=1e-3, weight_decay=0.1)
    assert sum(len(g["params"]) for g in groups) == len(infos)
    for group in groups:
        assert group["depth"] == TINY_UNET_DEPTH
        if group["role"] in ("lora_a", "lora_b"):
            assert group["lora_scale"] == 1.0 and None not in group["pairs"]


def _with_few_layers(stem: str) -> dict:
    """A bundled config with 2 language and 2 vision layers (meta construction time grows with layers)."""
    cfg = copy.deepcopy(load_config(stem))
    cfg["text_config"]["num_hidden_layers"] = 2
    vision = cfg["vision_config"]
    vision["depth" if "depth" in vision else "num_hidden_layers"] = 2
    return cfg


@pytest.mark.parametrize("stem", ["flux2_klein_4b_transformer", "qwen25_vl_7b", "mistral_small_31"])
def test_default_lora_targets_reach_every_block_and_only_real_layers(stem):
    cfg = load_config(stem) if stem.startswith("flux2") else _with_few_layers(stem)
    model = build_from_config(cfg)
    targets = default_lora_targets(model)
    model.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=targets), model)  # raises on a non-Linear target
    depth = component_depth(model)
    assert depth.trained_depth == depth.depth  # every residual block holds an adapter
    adapted = [name for name, _ in model.named_modules() if name.endswith(".lora_A")]
    assert adapted and not [n for n in adapted if "visual" in n or "vision_tower" in n]
    if stem.startswith("flux2"):  # double blocks: 8 attention + 4 feed-forward; single: fused in + out
        assert len(adapted) == cfg["num_layers"] * 12 + cfg["num_single_layers"] * 2


def test_default_lora_targets_unknown_class_is_an_error():
    with pytest.raises(ValueError, match="no default LoRA targets for Sequential"):
        default_lora_targets(nn.Sequential(nn.Linear(2, 2)))
