"""Residual depth: every bundled published config on the meta device, against counts derived here from the
config numbers; pipeline readouts; trained depth; structural fallback; bad `depth:` values."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from torch import nn

from tuneonce.model.builtin import BUILTINS, build_from_config, build_meta_components, load_config
from tuneonce.model.depth import (
    DepthGuessWarning,
    component_depth,
    model_depths,
    resolve_depth_override,
)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "modules" / "model" / "configs"
CONFIG_STEMS = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def _unet_depth(cfg: dict) -> int:
    """Resnets + transformer blocks of down, mid and up paths, from the UNet config numbers."""
    stages = len(cfg["block_out_channels"])
    per_block = cfg["layers_per_block"]
    layers = cfg.get("transformer_layers_per_block", 1)
    layers = [layers] * stages if isinstance(layers, int) else list(layers)
    depth = 0
    for i, kind in enumerate(cfg["down_block_types"]):
        depth += per_block * (1 + (layers[i] if "CrossAttn" in kind else 0))
    depth += 2 + layers[-1]  # UNetMidBlock2DCrossAttn: two resnets around one transformer of layers[-1] blocks
    for i, kind in enumerate(cfg["up_block_types"]):
        depth += (per_block + 1) * (1 + (layers[::-1][i] if "CrossAttn" in kind else 0))
    return depth


def expected_depth(cfg: dict) -> int:
    """Depth from the raw published config, per the issue's rule, written independently of the registry."""
    cls = cfg["_class_name"]
    if cls == "UNet2DConditionModel":
        return _unet_depth(cfg)
    if cls in ("FluxTransformer2DModel", "ChromaTransformer2DModel", "Flux2Transformer2DModel", "HiDreamImageTransformer2DModel"):
        return cfg["num_layers"] + cfg["num_single_layers"]  # a double block counts once
    if cls == "AuraFlowTransformer2DModel":
        return cfg["num_mmdit_layers"] + cfg["num_single_dit_layers"]
    if cls == "ZImageTransformer2DModel":
        return cfg["n_layers"] + cfg["n_refiner_layers"]  # noise and context refiners run side by side
    if cls == "Lumina2Transformer2DModel":
        return cfg["num_layers"] + cfg["num_refiner_layers"]
    if cls in ("SD3Transformer2DModel", "QwenImageTransformer2DModel", "PixArtTransformer2DModel",
               "SanaTransformer2DModel", "WanTransformer3DModel"):
        return cfg["num_layers"]
    if cls in ("T5EncoderModel", "UMT5EncoderModel"):
        return cfg["num_layers"]
    if "text_config" in cfg:  # multimodal LLM: the prompt runs through the language model only
        return cfg["text_config"]["num_hidden_layers"]
    return cfg["num_hidden_layers"]  # CLIP and decoder LLMs


@lru_cache(maxsize=None)
def _meta(stem: str) -> nn.Module:
    return build_from_config(load_config(stem))


def test_every_builtin_names_existing_configs():
    used = {stem for model in BUILTINS.values() for stem in model.components.values()}
    assert used <= set(CONFIG_STEMS)
    assert set(CONFIG_STEMS) <= used, f"unused configs: {set(CONFIG_STEMS) - used}"
    for stem in CONFIG_STEMS:
        assert json.loads((CONFIG_DIR / f"{stem}.json").read_text())["_source"], stem


@pytest.mark.parametrize("stem", CONFIG_STEMS)
def test_published_config_depth_matches_count_from_config(stem):
    raw = json.loads((CONFIG_DIR / f"{stem}.json").read_text())
    model = _meta(stem)
    assert type(model).__name__ == raw["_class_name"]
    assert next(model.parameters()).device.type == "meta"
    result = component_depth(model, component="x")
    assert result.source == "registry"
    assert result.depth == expected_depth(raw)
    assert result.trained_depth == result.depth  # fresh models: every parameter requires grad


def test_published_depths_named_in_the_issue():
    assert component_depth(_meta("sdxl_unet")).depth == 87
    assert component_depth(_meta("flux1_dev_transformer")).depth == 57


@pytest.mark.parametrize(
    "name, component, stem, used",
    [
        ("sdxl", "text_encoder", "clip_l", lambda n: n - 1),  # hidden_states[-2]
        ("sdxl", "text_encoder_2", "clip_g", lambda n: n),  # its pooled output passes every layer
        ("z-image", "text_encoder", "qwen3_4b", lambda n: n - 1),  # hidden_states[-2]
        ("flux2-dev", "text_encoder", "mistral_small_31", lambda n: 30),  # layers (10, 20, 30)
        ("flux2-klein-4b", "text_encoder", "qwen3_4b_causal", lambda n: 27),  # layers (9, 18, 27)
        ("flux-dev", "text_encoder_2", "t5_xxl", lambda n: n),
    ],
)
def test_text_encoder_readout_counts_layers_up_to_it(name, component, stem, used):
    raw = json.loads((CONFIG_DIR / f"{stem}.json").read_text())
    depths = model_depths({component: _meta(stem)}, pipeline=BUILTINS[name].pipeline)
    assert depths[component].depth == used(expected_depth(raw))


def _tiny_flux() -> nn.Module:
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(
            num_layers=3, num_single_layers=4, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=16, pooled_projection_dim=8, in_channels=4, axes_dims_rope=(2, 2, 4),
        )


def test_trained_depth_counts_only_blocks_with_trainable_params():
    model = _tiny_flux()
    model.requires_grad_(False)
    model.transformer_blocks[1].ff.net[2].weight.requires_grad_(True)
    for p in model.single_transformer_blocks[3].parameters():
        p.requires_grad_(True)
    model.proj_out.weight.requires_grad_(True)  # outside any block: no depth
    result = component_depth(model)
    assert (result.depth, result.trained_depth) == (7, 2)
    assert result.for_optimizer("model") == 7
    assert result.for_optimizer("trained") == 2


def test_refiners_add_the_longest_chain_and_trained_depth_follows():
    from diffusers import ZImageTransformer2DModel

    with torch.device("meta"):
        model = ZImageTransformer2DModel(dim=64, n_layers=3, n_refiner_layers=2, n_heads=2, n_kv_heads=2,
                                         cap_feat_dim=16, axes_dims=[8, 12, 12])
    assert component_depth(model).depth == 3 + 2
    model.requires_grad_(False)
    for block in model.context_refiner:
        block.requires_grad_(True)
    model.layers[0].requires_grad_(True)
    assert component_depth(model).trained_depth == 2 + 1


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))


class UnknownNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.stages = nn.ModuleList([_Block(8) for _ in range(5)])
        self.heads = nn.ModuleList([nn.Linear(8, 2), nn.Dropout()])  # mixed list: not blocks


def test_unknown_class_takes_structural_guess_with_warning():
    with pytest.warns(DepthGuessWarning, match=r"UnknownNet.*stages\(5\)"):
        result = component_depth(UnknownNet(), component="transformer")
    assert (result.depth, result.source) == (5, "guess")


def test_override_replaces_guess_without_warning(recwarn):
    depths = model_depths({"transformer": UnknownNet()}, depth_override=12)
    assert depths["transformer"].depth == 12 and depths["transformer"].source == "override"
    assert not [w for w in recwarn if issubclass(w.category, DepthGuessWarning)]


def test_model_without_blocks_is_an_error_not_a_silent_depth():
    with pytest.raises(ValueError, match=r"residual blocks of Sequential.*depth:"):
        component_depth(nn.Sequential(nn.Linear(3, 3)), component="transformer")


def test_int_override_goes_to_the_backbone_mapping_to_named_components():
    components = build_meta_components("sd15")
    assert resolve_depth_override(40, components) == {"unet": 40}
    assert resolve_depth_override({"text_encoder": 6}, components) == {"text_encoder": 6}
    # a pipeline component that is not loaded (not trained) is skipped, a typo is not
    assert resolve_depth_override({"text_encoder_2": 6}, components) == {}
    depths = model_depths(components, depth_override={"unet": 40, "text_encoder": 6})
    assert (depths["unet"].depth, depths["text_encoder"].depth) == (40, 6)


@pytest.mark.parametrize(
    "value, message",
    [
        ("abc", r"depth: expected a positive integer or a mapping.*'abc'"),
        (0, r"depth: expected a positive integer residual depth, got 0"),
        (-3, r"depth: expected a positive integer residual depth, got -3"),
        (2.5, r"depth: expected a positive integer or a mapping.*2.5"),
        (True, r"depth: expected a positive integer or a mapping.*True"),
        ({"unet": "deep"}, r"depth.unet: expected a positive integer residual depth, got 'deep'"),
        ({"unte": 40}, r"depth.unte: unknown component 'unte'; components: unet, text_encoder"),
    ],
)
def test_bad_depth_value_is_a_clear_error(value, message):
    components = {"unet": _meta("sd15_unet"), "text_encoder": _meta("clip_l")}
    with pytest.raises(ValueError, match=message):
        model_depths(components, depth_override=value)


def test_wrapped_models_are_unwrapped(recwarn):
    from peft import LoraConfig, get_peft_model

    model = _tiny_flux()
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["to_q"]))
    result = component_depth(wrapped)
    assert (result.class_name, result.depth, result.source) == ("FluxTransformer2DModel", 7, "registry")
    assert not [w for w in recwarn if issubclass(w.category, DepthGuessWarning)]
