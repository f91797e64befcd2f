"""LoRA target presets on every component of every family: each named preset matches layers on the transformers
version installed and on both CLIP naming schemes (transformers 4's `text_model.` prefix, 5's flattened
CLIPTextModel); Flux's defaults stay inside the blocks; kohya's network module in Flux files."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from torch import nn

from tuneonce.config.schema import LoraConfig as LoraSection
from tuneonce.model.adapters import add_lora, lora_target_names
from tuneonce.model.families import FAMILIES, get_family
from tuneonce.model.saving import save_lora
from tuneonce.model.tiny import build_tiny_pipeline
from tuneonce.model.tiny_flow import build_tiny_flow_pipeline
from tuneonce.trainer.train import lora_settings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_KIND = {"sd15": "sd15", "sd2": "sd15", "sdxl": "sdxl", "flux": "flux-dev", "chroma": "chroma", "sd3": "sd3",
             "zimage": "zimage", "qwenimage": "qwen-image"}  # fmt: skip


@pytest.fixture(scope="module")
def pipelines():
    cache = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = build_tiny_pipeline(kind) if kind in ("sd15", "sdxl") else build_tiny_flow_pipeline(kind)
        return cache[kind]

    return get


def _with_text_model_prefix(module: nn.Module) -> nn.Module:
    """The same layers under `text_model.` (transformers 4's CLIPTextModel naming) or without it (5's)."""
    inner = getattr(module, "text_model", None)
    if inner is not None:
        return inner  # the projection model keeps the prefix in 5: its inner model shows the flattened names
    outer = nn.Module()
    outer.text_model = module
    return outer


@pytest.mark.parametrize("family_name", sorted(FAMILIES))
def test_every_target_preset_matches_layers_of_every_component(family_name, pipelines):
    family = get_family(family_name)
    pipe = pipelines(TINY_KIND[family_name])
    for preset in ("default", "attn", "all_linear"):
        lora = LoraSection(targets=preset)
        backbone = lora_settings(family, lora, text_encoder=False)
        assert lora_target_names(getattr(pipe, family.backbone), backbone.targets, within=backbone.within), (
            f"{family_name} {family.backbone}: preset {preset} matches no layer"
        )
        text = lora_settings(family, lora, text_encoder=True)
        for name in family.text_encoders:
            encoder = getattr(pipe, name)
            found = lora_target_names(encoder, text.targets, within=text.within)
            assert found, f"{family_name} {name} ({type(encoder).__name__}): preset {preset} matches no layer"
            if "CLIP" in type(encoder).__name__:  # the other transformers major's names match the same layers
                other = lora_target_names(_with_text_model_prefix(encoder), text.targets, within=text.within)
                assert len(other) == len(found), f"{family_name} {name}: preset {preset} depends on the CLIP naming"


def test_clip_presets_adapt_the_same_layers_under_both_namings(pipelines):
    """all_linear on CLIP-L: every Linear of the encoder layers, with or without the text_model. prefix."""
    family = get_family("sdxl")
    clip = pipelines("sdxl").text_encoder
    settings = lora_settings(family, LoraSection(targets="all_linear"), text_encoder=True)
    layers = clip.config.num_hidden_layers
    expected = 6 * layers  # q, k, v, out_proj, fc1, fc2 per layer; not the (non-block) projection
    assert len(lora_target_names(clip, None, within=settings.within)) == expected
    assert len(lora_target_names(_with_text_model_prefix(clip), None, within=settings.within)) == expected


def test_flux_default_targets_leave_the_final_layer_out_unless_listed(pipelines):
    family = get_family("flux")
    transformer = pipelines("flux-dev").transformer
    default = lora_settings(family, LoraSection(), text_encoder=False)
    names = lora_target_names(transformer, default.targets, within=default.within)
    assert "single_transformer_blocks.0.proj_out" in names and "proj_out" not in names
    assert not [n for n in names if not n.startswith(("transformer_blocks.", "single_transformer_blocks."))]
    listed = lora_settings(family, LoraSection(targets=["proj_out"]), text_encoder=False)
    assert "proj_out" in lora_target_names(transformer, listed.targets, within=listed.within)


def test_flux_file_names_kohyas_flux_network_module(tmp_path):
    pipe = build_tiny_flow_pipeline("flux-dev")
    family = get_family("flux")
    add_lora(pipe.transformer, lora_settings(family, LoraSection(rank=2), text_encoder=False), component="transformer")
    add_lora(pipe.text_encoder, lora_settings(family, LoraSection(rank=2), text_encoder=True), component="text_encoder")
    path = save_lora(tmp_path / "flux.safetensors", {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder})
    with safe_open(str(path), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ss_network_module"] == "networks.lora_flux" and meta["ss_base_model_version"] == "flux1"
    assert not [k for k in keys if k.startswith("lora_unet_final_layer")]
    assert [k for k in keys if k.startswith("lora_te1_text_model_encoder_layers_0_")]
    sdxl = build_tiny_pipeline("sdxl")
    add_lora(sdxl.unet, lora_settings(get_family("sdxl"), LoraSection(rank=2), text_encoder=False), component="unet")
    path = save_lora(tmp_path / "sdxl.safetensors", {"unet": sdxl.unet})
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["ss_network_module"] == "networks.lora"


def test_adapter_injection_needs_no_transformers_peft_gate(pipelines, monkeypatch):
    """Adapters go in through PEFT's own API: transformers' add_adapter (version-gated) is never called."""
    import transformers.integrations.peft as hf_peft

    def refuse(*args, **kwargs):
        raise AssertionError("transformers' add_adapter was called")

    monkeypatch.setattr(hf_peft.PeftAdapterMixin, "add_adapter", refuse)
    clip = build_tiny_pipeline("sd15").text_encoder
    settings = lora_settings(get_family("sd15"), LoraSection(rank=2), text_encoder=True)
    names = add_lora(clip, settings, component="text_encoder")
    trainable = [n for n, p in clip.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert {n.split(".lora_")[0] for n in trainable} == set(names)
    out = clip(torch.tensor([[1, 2, 3]])).last_hidden_state
    assert torch.isfinite(out).all()
