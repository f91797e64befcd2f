"""kohya's BFL LoRA layout for Flux / Chroma (saving.format: kohya): diffusers' own kohya-Flux converter loads every
key we write and the loaded pipeline predicts what our PEFT model predicts; fused projections are exact."""
from __future__ import annotations

import re

import pytest
import torch
from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
from peft import LoraConfig, inject_adapter_in_model
from safetensors import safe_open
from torch import nn

from tuneonce.model.lora_files import LoraModuleWeights, collect_lora_weights, to_kohya_bfl_state_dict
from tuneonce.model.saving import lora_state_dict, save_lora
from tuneonce.model.tiny_flow import build_tiny_flow_pipeline
from tests.builders import flux_transformer_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# diffusers 0.42's kohya-Flux converter splits single_blocks.N.linear1 at Flux.1's hard-coded widths (3072 x 3 +
# 12288), and names the layers outside the blocks (img_in, final_layer, ...) without the "transformer." prefix, so
# load_lora_weights drops them. The tiny pipelines load every other block layer; linear1 and the outer layers are
# checked against the converter's output directly below.
TINY_TARGETS = r"^(?!single_transformer_blocks\.\d+\.(attn\.to_[qkv]|proj_mlp)$)(single_)?transformer_blocks\.\d+\..*"
OUTER_LAYERS = ("x_embedder", "context_embedder", "proj_out", "norm_out.linear", "time_text_embed.timestep_embedder.linear_1",
                "time_text_embed.text_embedder.linear_2", "time_text_embed.guidance_embedder.linear_1")  # fmt: skip
CLIP_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _randomize_lora(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)


def _adapt(kind: str, *, rank_pattern=None, alpha_pattern=None, text: bool = False, targets: str = TINY_TARGETS,
           alpha: float = 8) -> tuple:
    pipe = build_tiny_flow_pipeline(kind)
    transformer = pipe.transformer
    names = [n for n, m in transformer.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(targets, n)]
    config = LoraConfig(r=4, lora_alpha=alpha, rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {},
                        target_modules="^(?:" + "|".join(map(re.escape, names)) + ")$")  # fmt: skip
    inject_adapter_in_model(config, transformer)
    _randomize_lora(transformer, 1)
    components = {"transformer": transformer}
    if text:
        inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=list(CLIP_TARGETS)), pipe.text_encoder)
        _randomize_lora(pipe.text_encoder, 2)
        components["text_encoder"] = pipe.text_encoder
    return pipe, components


def _lora_modules(model: nn.Module) -> set[str]:
    return {n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A." in n}


@pytest.mark.parametrize("kind", ["flux-dev", "chroma"])
def test_diffusers_loads_every_key_and_predicts_the_same(kind, tmp_path):
    # add_k_proj with another rank and alpha: the fused txt_attn.qkv then carries per-part scales in its up factor.
    pipe, components = _adapt(kind, rank_pattern={"add_k_proj": 2}, alpha_pattern={"add_k_proj": 5}, text=kind == "flux-dev")
    path = save_lora(tmp_path / "lora.safetensors", components, layout="kohya")
    with safe_open(str(path), framework="pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert "lora_unet_double_blocks_1_txt_attn_qkv.lora_up.weight" in keys
    assert not any("transformer_blocks" in k or "to_q" in k for k in keys)
    expected_version = {"flux-dev": ("flux1", "flux-1-dev/lora"), "chroma": ("chroma", "chroma/lora")}[kind]
    assert (metadata["ss_base_model_version"], metadata["modelspec.architecture"]) == expected_version

    fresh = build_tiny_flow_pipeline(kind)
    fresh.load_lora_weights(str(path))  # diffusers raises on any kohya key its converter leaves over
    assert _lora_modules(fresh.transformer) == _lora_modules(pipe.transformer)
    inputs = flux_transformer_inputs(pipe.transformer.config)
    with torch.no_grad():
        ours, theirs = pipe.transformer(**inputs)[0], fresh.transformer(**inputs)[0]
        base = build_tiny_flow_pipeline(kind).transformer(**inputs)[0]
    assert (ours - base).abs().max() > 1e-2  # the LoRA changes the output, so equality below means something
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    if "text_encoder" in components:
        ids = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            torch.testing.assert_close(fresh.text_encoder(ids).pooler_output, pipe.text_encoder(ids).pooler_output)


def test_outer_layers_match_diffusers_converter():
    """img_in, txt_in, time/vector/guidance_in and final_layer (whose adaLN halves are swapped): the converter's
    factors act exactly as ours. (alpha = rank: diffusers 0.42 ignores the alpha of final_layer keys.)"""
    _, components = _adapt("flux-dev", targets="|".join(map(re.escape, OUTER_LAYERS)), alpha=4)
    weights = collect_lora_weights(components)
    assert sorted(w.path for w in weights) == sorted(OUTER_LAYERS)
    converted = _convert_kohya_flux_lora_to_diffusers(to_kohya_bfl_state_dict(weights, components["transformer"]))
    for w in weights:
        prefix = w.path if f"{w.path}.lora_A.weight" in converted else f"transformer.{w.path}"
        delta = converted[f"{prefix}.lora_B.weight"] @ converted[f"{prefix}.lora_A.weight"]
        torch.testing.assert_close(delta, w.up @ w.down * (w.alpha / w.rank), rtol=1e-5, atol=1e-6)


def _synthetic(path: str, rows: int, rank: int, alpha: float, seed: int, columns: int = 3072) -> LoraModuleWeights:
    g = torch.Generator().manual_seed(seed)
    return LoraModuleWeights("transformer", path, torch.randn(rank, columns, generator=g), torch.randn(rows, rank, generator=g), alpha)


@pytest.mark.parametrize("with_mlp", [True, False])
def test_single_block_linear1_at_flux_width_is_exact(with_mlp):
    """to_q/to_k/to_v/proj_mlp fused into linear1 at Flux.1's real width (where diffusers' converter works): what
    the converter gives back acts exactly as the separate LoRAs (proj_mlp without LoRA: exactly zero)."""
    with torch.device("meta"):  # only the shapes of the model are read
        block = nn.Module()
        block.attn = nn.Module()
        for name in ("to_q", "to_k", "to_v"):
            setattr(block.attn, name, nn.Linear(3072, 3072))
        block.proj_mlp = nn.Linear(3072, 12288)
        transformer = nn.Module()
        transformer.single_transformer_blocks = nn.ModuleList([block])
    prefix = "single_transformer_blocks.0."
    parts = {f"{prefix}attn.to_q": _synthetic(f"{prefix}attn.to_q", 3072, 2, 4.0, 0),
             f"{prefix}attn.to_k": _synthetic(f"{prefix}attn.to_k", 3072, 2, 4.0, 1),
             f"{prefix}attn.to_v": _synthetic(f"{prefix}attn.to_v", 3072, 2, 4.0, 2)}  # fmt: skip
    if with_mlp:
        parts[f"{prefix}proj_mlp"] = _synthetic(f"{prefix}proj_mlp", 12288, 2, 4.0, 3)
    state = to_kohya_bfl_state_dict(list(parts.values()), transformer)
    assert set(state) == {f"lora_unet_single_blocks_0_linear1.{k}" for k in ("lora_down.weight", "lora_up.weight", "alpha")}

    converted = _convert_kohya_flux_lora_to_diffusers(dict(state))
    probe = torch.randn(3072, 3, generator=torch.Generator().manual_seed(9))  # compare the maps on a few vectors
    for path in (f"{prefix}attn.to_q", f"{prefix}attn.to_k", f"{prefix}attn.to_v", f"{prefix}proj_mlp"):
        a, b = converted[f"transformer.{path}.lora_A.weight"], converted[f"transformer.{path}.lora_B.weight"]
        part = parts.get(path)
        expected = part.up @ (part.down @ probe) * (part.alpha / part.rank) if part else torch.zeros(b.shape[0], 3)
        torch.testing.assert_close(b @ (a @ probe), expected, rtol=1e-5, atol=1e-3)


def test_bad_input_is_one_clear_line():
    weights = [_synthetic("some.unknown_layer", 8, 2, 2.0, 0, columns=8)]
    with pytest.raises(ValueError, match=r"no BFL module for the LoRA on transformer\.some\.unknown_layer; .*saving\.format: diffusers"):
        to_kohya_bfl_state_dict(weights, nn.Module())
    _, components = _adapt("flux-dev")
    with pytest.raises(ValueError, match="kohya layout is written for Flux/Chroma transformers, not SD3Transformer2DModel"):
        sd3 = build_tiny_flow_pipeline("sd3").transformer
        inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q"]), sd3)
        lora_state_dict({"transformer": sd3}, "kohya")
    dora = [w for w in collect_lora_weights(components) if w.path == "transformer_blocks.0.attn.to_q"]
    dora[0].magnitude = torch.ones(dora[0].up.shape[0])
    with pytest.raises(ValueError, match=r"lora_unet_double_blocks_0_img_attn_qkv: a DoRA magnitude cannot be fused"):
        to_kohya_bfl_state_dict(dora, components["transformer"])


def test_base_model_version_per_family():
    """kohya's ss_base_model_version values (sd-scripts: flux1, chroma, sdxl_base_v1-0, sd_v1) and modelspec names."""
    from tuneonce.model.saving import base_model_version

    versions = {kind: base_model_version({"transformer": build_tiny_flow_pipeline(kind).transformer})
                for kind in ("flux-dev", "flux-schnell", "chroma", "sd3")}  # fmt: skip
    assert versions == {"flux-dev": ("flux1", "flux-1-dev"), "flux-schnell": ("flux1", "flux-1-schnell"),
                        "chroma": ("chroma", "chroma"), "sd3": ("sd3", "stable-diffusion-3")}  # fmt: skip


def test_config_accepts_kohya_for_flux_and_chroma_only(tmp_path):
    from tests.builders import tiny_train_config

    for family in ("flux", "chroma"):
        config = tiny_train_config(family, tmp_path, (tmp_path, tmp_path), tmp_path, saving={"format": "kohya"})
        assert config.saving.format == "kohya"
    with pytest.raises(ValueError, match=r"saving\.format"):
        tiny_train_config("sd3", tmp_path, (tmp_path, tmp_path), tmp_path, saving={"format": "kohya"})


def _peft_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}


def test_kohya_bfl_file_loads_back_into_peft(tmp_path):
    """Our own files (every layer, linear1 included, mixed ranks/alphas, T5) read back factor for factor; a fused
    LoRA trained as one (all parts share its down factor) loads too, acting as the file says."""
    from tuneonce.model.lora_files import load_lora_into_peft

    every_linear = r"(single_)?transformer_blocks\.\d+\..*|x_embedder|proj_out"
    # proj_mlp with its own rank at the same scale alpha/r (fused parts with different scales come back with the
    # scale folded into their up factor: same LoRA, other factors; covered by the diffusers test above).
    pipe, components = _adapt("chroma", targets=every_linear, rank_pattern={"proj_mlp": 2}, alpha_pattern={"proj_mlp": 4})
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"]), pipe.text_encoder)
    _randomize_lora(pipe.text_encoder, 5)
    components["text_encoder"] = pipe.text_encoder
    path = save_lora(tmp_path / "lora.safetensors", components, layout="kohya")
    with safe_open(str(path), framework="pt") as handle:
        assert any(k.startswith("lora_te3_encoder_block_0_") for k in handle.keys())

    _, fresh = _adapt("chroma", targets=every_linear, rank_pattern={"proj_mlp": 2}, alpha=1)
    fresh_text = build_tiny_flow_pipeline("chroma").text_encoder
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=1, target_modules=["q", "v"]), fresh_text)
    fresh["text_encoder"] = fresh_text
    load_lora_into_peft(path, fresh)
    for name, model in components.items():
        expected, got = _peft_state(model), _peft_state(fresh[name])
        assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected), name
    inputs = flux_transformer_inputs(pipe.transformer.config)
    with torch.no_grad():
        torch.testing.assert_close(fresh["transformer"](**inputs)[0], pipe.transformer(**inputs)[0], rtol=1e-6, atol=1e-6)

    # A fused qkv LoRA as other trainers write it: one rank-2 LoRA over q, k and v (not block-diagonal).
    g = torch.Generator().manual_seed(6)
    down, up = torch.randn(2, 32, generator=g), torch.randn(96, 2, generator=g)
    stem = "lora_unet_double_blocks_0_img_attn_qkv"
    from safetensors.torch import save_file

    save_file({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(1.0)},
              str(tmp_path / "fused.safetensors"))  # fmt: skip
    _, shared = _adapt("chroma", targets=r"transformer_blocks\.0\.attn\.to_[qkv]", rank_pattern={"to_q": 2, "to_k": 2, "to_v": 2})
    load_lora_into_peft(tmp_path / "fused.safetensors", shared)
    for i, part in enumerate(("to_q", "to_k", "to_v")):
        layer = shared["transformer"].get_submodule(f"transformer_blocks.0.attn.{part}")
        delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
        torch.testing.assert_close(delta, up[32 * i:32 * (i + 1)] @ down * 0.5)
