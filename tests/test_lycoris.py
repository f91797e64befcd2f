"""LyCORIS LoHa / LoKr through PEFT: optimizer roles, files in the LyCORIS/kohya key layout that ComfyUI maps, ΔW
rebuilt from the file by the LyCORIS formulas equal to what the trained PEFT layers add, and real train() runs.

diffusers 0.42's load_lora_weights does not take LoHa/LoKr keys for SD/SDXL (its kohya converter renames lora_down /
lora_up only; its LoKr converters are for Z-Image / Flux.2), so the files are checked against ComfyUI's key map and
the LyCORIS formulas, and each layer's output is compared with base weight + file ΔW.
"""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from tuneonce.model import lycoris_files
from tuneonce.model.adapters import LoraSettings, add_lora
from tuneonce.model.lora_files import canonical_path, kohya_module_name
from tuneonce.model.lycoris import lycoris_layers
from tuneonce.model.roles import param_infos
from tuneonce.model.saving import save_lora
from tuneonce.model.tiny import tiny_pipeline_dir
from tuneonce.optimizer.groups import build_param_groups
from tuneonce.optimizer.muon_adv import Muon_adv
from tuneonce.optimizer.param_spec import Role
from tuneonce.trainer.train import train
from tests.builders import tiny_train_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2", "conv1")
# ComfyUI (comfy/lora.py, model_lora_keys_clip): CLIP layers it maps, as lora_te*_text_model_encoder_layers_<i>_<name>
COMFY_CLIP_NAMES = ("mlp_fc1", "mlp_fc2", "self_attn_k_proj", "self_attn_q_proj", "self_attn_v_proj",
                    "self_attn_out_proj")  # fmt: skip
COMFY_SUFFIXES = {
    "loha": [{"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}],
    "lokr": [{"lokr_w1", "lokr_w2", "alpha"}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"},
             {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "alpha"},
             {"lokr_w1_a", "lokr_w1_b", "lokr_w2", "alpha"}],
}  # fmt: skip


def comfy_key_map(base, pipeline_class=StableDiffusionPipeline) -> dict[str, tuple[int, ...]]:
    """The key map ComfyUI builds for SD1.x / SDXL (comfy/lora.py), stem -> shape of the weight it patches, written
    from its naming rules: every diffusers UNet weight as lora_unet_<diffusers path, dots as underscores> (ComfyUI
    maps these through comfy.utils.unet_to_diffusers to the ldm key), and the CLIP encoder layers as
    lora_te_text_model_encoder_layers_<i>_<name> (SDXL: lora_te1_ / lora_te2_).
    """
    pipe = pipeline_class.from_pretrained(base)
    keys = {f"lora_unet_{k[:-len('.weight')].replace('.', '_')}": tuple(v.shape)
            for k, v in pipe.unet.state_dict().items() if k.endswith(".weight") and v.ndim >= 2}  # fmt: skip
    encoders = {"lora_te1": pipe.text_encoder, "lora_te2": pipe.text_encoder_2} if hasattr(pipe, "text_encoder_2") \
        else {"lora_te": pipe.text_encoder}
    for prefix, encoder in encoders.items():
        state = encoder.state_dict()
        for i in range(encoder.config.num_hidden_layers):
            for name in COMFY_CLIP_NAMES:
                module = name.replace("mlp_", "mlp.").replace("self_attn_", "self_attn.")
                weight = next(v for k, v in state.items() if k.endswith(f"layers.{i}.{module}.weight"))
                keys[f"{prefix}_text_model_encoder_layers_{i}_{name}"] = tuple(weight.shape)
    return keys


def adapt(base, kind: str, *, rank=4, alpha=2.0, seed=0, **options) -> dict[str, nn.Module]:
    """LoHa / LoKr on UNet and text encoder through add_lora, with random ('trained') factors."""
    pipe = StableDiffusionPipeline.from_pretrained(base)
    add_lora(pipe.unet, LoraSettings(rank=rank, alpha=alpha, kind=kind, targets=UNET_TARGETS, **options),
             component="unet")
    add_lora(pipe.text_encoder, LoraSettings(rank=rank, alpha=alpha, kind=kind, targets=("q_proj", "fc1"), **options),
             component="text_encoder")
    components = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    g = torch.Generator().manual_seed(seed)
    for model in components.values():
        for p in model.parameters():
            if p.requires_grad:
                p.data = torch.randn(p.shape, generator=g) * 0.2
    return components


def check_file(path, components, base, kind: str) -> dict[str, torch.Tensor]:
    """Every key in ComfyUI's key map with the LyCORIS suffixes; file ΔW == PEFT ΔW; each layer's output == its
    base layer with W + file ΔW (independent of PEFT's get_delta_weight)."""
    tensors = load_file(str(path))
    assert all(torch.isfinite(v).all() for v in tensors.values())
    key_map = comfy_key_map(base)
    stems: dict[str, set[str]] = {}
    for key in tensors:
        stem, suffix = key.split(".", 1)
        stems.setdefault(stem, set()).add(suffix)
    unknown = sorted(set(stems) - set(key_map))
    assert not unknown, f"stems ComfyUI does not map: {unknown[:3]}"
    assert all(s in COMFY_SUFFIXES[kind] for s in stems.values()), Counter(map(frozenset, stems.values()))
    layers = {}
    for component, model in components.items():
        for path_, layer in lycoris_layers(model).items():
            layers[kohya_module_name(component, canonical_path(component, path_), False)] = layer
    assert set(layers) == set(stems)
    reference = lycoris_files.peft_delta_weights(components, sdxl=False)
    for stem, layer in layers.items():
        delta = lycoris_files.delta_weight(tensors, stem, key_map[stem])
        torch.testing.assert_close(delta, reference[stem], rtol=1e-5, atol=1e-6, msg=stem)
        base_layer = layer.get_base_layer()
        linear = isinstance(base_layer, nn.Linear)
        x = torch.randn(2, *((base_layer.in_features,) if linear else (base_layer.in_channels, 4, 4)))
        with torch.no_grad():
            if isinstance(base_layer, nn.Linear):
                expected = nn.functional.linear(x, base_layer.weight + delta, base_layer.bias)
            else:
                expected = base_layer._conv_forward(x, base_layer.weight + delta, base_layer.bias)
            torch.testing.assert_close(layer.eval()(x), expected, rtol=1e-4, atol=1e-5, msg=stem)
    return tensors


@pytest.mark.parametrize("kind,options", [("loha", {}), ("lokr", {}), ("lokr", {"lokr_factor": 4}),
                                          ("lokr", {"lokr_decompose_both": True})])  # fmt: skip
def test_files_match_comfyui_key_map_and_peft_delta(sd15_base, tmp_path, kind, options):
    components = adapt(sd15_base, kind, **options)
    path = save_lora(tmp_path / f"{kind}.safetensors", components)
    tensors = check_file(path, components, sd15_base, kind)
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya" and f'"algo": "{kind}"' in meta["ss_network_args"]
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2")
    if kind == "lokr":
        suffixes = Counter(frozenset(k.split(".", 1)[1] for k in tensors if k.startswith(s + "."))
                           for s in {k.split(".")[0] for k in tensors})  # fmt: skip
        assert len(suffixes) >= 2, suffixes  # full and decomposed factors both exercised
        if options.get("lokr_decompose_both"):
            assert any("lokr_w1_a" in s for s in suffixes)


def test_lokr_full_factors_fold_alpha_into_w1(sd15_base, tmp_path):
    # rank 64 >= half of every factor: no layer is decomposed, so loaders apply no alpha/r; PEFT does (0.5 here)
    components = adapt(sd15_base, "lokr", rank=64, alpha=32.0)
    path = save_lora(tmp_path / "full.safetensors", components)
    tensors = check_file(path, components, sd15_base, "lokr")
    assert not any(k.endswith(("_a", "_b")) for k in tensors)
    layer = next(iter(lycoris_layers(components["unet"]).values()))
    assert layer.scaling["default"] == 0.5


def test_roles_and_muon_groups(sd15_base):
    for kind in ("loha", "lokr"):
        components = adapt(sd15_base, kind, rank=4, alpha=2.0)
        infos = param_infos(components)
        unet = components["unet"]
        n_layers = len(lycoris_layers(unet)) + len(lycoris_layers(components["text_encoder"]))
        by_name = {i.name: i for i in infos}
        assert len(infos) == sum(p.requires_grad for m in components.values() for p in m.parameters())
        if kind == "loha":
            assert Counter(i.spec.role for i in infos) == {Role.LORA_A: 2 * n_layers, Role.LORA_B: 2 * n_layers}
            layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
            base = unet.get_submodule(layer).get_base_layer().weight.shape
            w1a, w2a = by_name[f"{layer}.hada_w1_a.default"], by_name[f"{layer}.hada_w2_a.default"]
            w2b = by_name[f"{layer}.hada_w2_b.default"]
            assert (w2a.spec.role, w2b.spec.role) == (Role.LORA_B, Role.LORA_A) and w2a.pair == w2b.pair != w1a.pair
            assert (w2b.spec.base_fan_in, w2b.spec.base_fan_out) == (base[1], base[0])
            assert (w1a.spec.lora_scale, w2a.spec.lora_scale, w2b.spec.lora_scale) == (1.0, 0.5, 0.5)
            conv = "down_blocks.0.resnets.0.conv1"  # 3x3 conv: factors are (out, r) / (r, in·9) matrices
            w = unet.get_submodule(conv).get_base_layer().weight.shape
            spec = by_name[f"{conv}.hada_w1_b.default"].spec
            assert (spec.fan_in, spec.base_fan_in, spec.base_fan_out) == (w[1] * 9, w[1] * 9, w[0])
        else:
            layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
            w1 = by_name[f"{layer}.lokr_w1.default"]
            shape = unet.get_submodule(layer).lokr_w1["default"].shape
            assert (w1.spec.role, w1.spec.fan_in, w1.spec.fan_out, w1.pair) == (Role.MATRIX, shape[1], shape[0], None)
            conv = "down_blocks.0.resnets.0.conv1"
            w2 = by_name[f"{conv}.lokr_w2.default"] if f"{conv}.lokr_w2.default" in by_name else None
            pairs = [i for i in infos if i.spec.role.is_lora_factor]
            assert all(i.spec.lora_scale == 1.0 for i in pairs)
            for info in pairs:  # the pair's base fans are those of its Kronecker factor, not of the layer
                module = info.extra["module"]
                factor = info.name.rsplit(".", 2)[-2][:len("lokr_w2")]
                rebuilt = (components["unet"] if module in dict(unet.named_modules()) else components["text_encoder"]
                           ).get_submodule(module)  # fmt: skip
                a, b = getattr(rebuilt, f"{factor}_a")["default"], getattr(rebuilt, f"{factor}_b")["default"]
                assert (info.spec.base_fan_in, info.spec.base_fan_out) == (b.shape[1], a.shape[0])
            if w2 is not None:
                assert w2.spec.role in (Role.CONV, Role.MATRIX)
        # Muon_adv accepts the groups (every pair complete) and steps every factor that has a gradient
        optimizer = Muon_adv(build_param_groups(infos, lr=1e-3, weight_decay=0.0))
        before = {i.name: i.param.detach().clone() for i in infos}
        for info in infos:
            info.param.grad = torch.randn_like(info.param)
        optimizer.step()
        moved = [n for n, i in by_name.items() if not torch.equal(before[n], i.param)]
        assert len(moved) == len(infos)
        assert all(bool(torch.isfinite(i.param.detach()).all()) for i in infos)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_train_writes_lycoris_file_that_matches_the_trained_model(sd15_base, data_dirs, tmp_path, kind):
    cfg = tiny_train_config(
        "sd15", sd15_base, data_dirs, tmp_path,
        lora={"type": kind, "rank": 4, "alpha": 2.0, "train_text_encoders": {"text_encoder": True}},
        schedule={"max_steps": 2}, validation={"every_n_steps": 2}, data={"cache_text_embeddings": False},
    )  # fmt: skip
    result = train(cfg, show_progress=False)
    assert result.steps == 2 and math.isfinite(result.final_loss)
    assert all(math.isfinite(v) for _, v in result.val_losses)
    (path,) = result.saved
    trained = {name: result.components[name] for name in ("unet", "text_encoder")}
    tensors = check_file(path, trained, sd15_base, kind)
    deltas = lycoris_files.peft_delta_weights(trained, sdxl=False)
    assert any(float(d.abs().max()) > 0 for d in deltas.values())  # training moved ΔW off its zero init
    assert any(k.startswith("lora_te_") for k in tensors) and any(k.startswith("lora_unet_") for k in tensors)


def test_config_rules_name_the_field(sd15_base, data_dirs, tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="lora.dora"):
        tiny_train_config("sd15", sd15_base, data_dirs, tmp_path, lora={"type": "loha", "dora": True})
    with pytest.raises(ValidationError, match="saving.format"):
        tiny_train_config("sd15", sd15_base, data_dirs, tmp_path, lora={"type": "lokr"}, saving={"format": "diffusers"})
    with pytest.raises(ValidationError, match="lora.lokr_factor"):
        tiny_train_config("sd15", sd15_base, data_dirs, tmp_path, lora={"type": "lokr", "lokr_factor": 0})


def test_sdxl_files_use_comfyui_names_for_both_text_encoders(tmp_path_factory, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    base = tiny_pipeline_dir("sdxl", tmp_path_factory)
    key_map = comfy_key_map(base, StableDiffusionXLPipeline)
    for kind in ("loha", "lokr"):
        pipe = StableDiffusionXLPipeline.from_pretrained(base)
        components = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
        add_lora(pipe.unet, LoraSettings(rank=4, kind=kind, targets=UNET_TARGETS), component="unet")
        for name in ("text_encoder", "text_encoder_2"):
            add_lora(components[name], LoraSettings(rank=4, kind=kind, targets=("q_proj", "fc2")), component=name)
        for p in (p for m in components.values() for p in m.parameters() if p.requires_grad):
            p.data = torch.randn_like(p) * 0.2
        tensors = load_file(str(save_lora(tmp_path / f"{kind}.safetensors", components)))
        stems = {k.split(".")[0] for k in tensors}
        assert stems <= set(key_map), sorted(stems - set(key_map))[:3]
        assert {s.split("_text_model")[0] for s in stems if s.startswith("lora_te")} == {"lora_te1", "lora_te2"}
        reference = lycoris_files.peft_delta_weights(components)
        assert set(reference) == stems
        for stem, delta in reference.items():
            torch.testing.assert_close(lycoris_files.delta_weight(tensors, stem, key_map[stem]), delta, msg=stem)


def test_inspect_model_reports_lycoris_roles(capsys):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import inspect_model

    reports = {}
    for kind in ("lora", "loha", "lokr"):
        assert inspect_model.main(["sdxl", "--lora-rank", "4", "--lora-type", kind, "--json"]) == 0
        reports[kind] = json.loads(capsys.readouterr().out)["components"]["unet"]
    lora, loha, lokr = reports["lora"], reports["loha"], reports["lokr"]
    # LoHa: two LoRA pairs per adapted layer, on the same layers as LoRA (722 in SDXL's UNet)
    assert loha["roles"] == {"lora_a": 2 * lora["roles"]["lora_a"], "lora_b": 2 * lora["roles"]["lora_b"]}
    # LoKr: the small Kronecker factor of every layer is a matrix, the other a matrix or a pair
    assert lokr["roles"]["matrix"] >= lora["roles"]["lora_a"] and lokr["params"] < lora["params"]
    assert lokr["params"] == sum(g["count"] * g["fan_in"] * g["fan_out"] for g in lokr["groups"])


@pytest.mark.parametrize("name", ["demo_sdxl_loha.yaml", "demo_sdxl_lokr.yaml"])
def test_example_presets_validate(name):
    from pathlib import Path

    from tuneonce.config.loading import load_config

    cfg = load_config(Path(__file__).resolve().parent.parent / "training_presets" / "examples" / name)
    assert cfg.lora.type == name.split("_")[-1].removesuffix(".yaml") and cfg.lora.effective_alpha == cfg.lora.rank


def test_loha_run_resumes_from_a_checkpoint_bit_identically(sd15_base, data_dirs, tmp_path):
    def config(out, **extra):
        return tiny_train_config(
            "sd15", sd15_base, data_dirs, out, lora={"type": "loha", "rank": 4}, schedule={"max_steps": 4},
            validation={"every_n_steps": 4}, saving={"checkpoint_every_n_steps": 2}, **extra,
        )  # fmt: skip

    reference = train(config(tmp_path / "reference"), show_progress=False)
    resumed_out = tmp_path / "resumed"
    checkpoint = tmp_path / "reference" / "checkpoints" / "step000002"
    assert checkpoint.is_dir()
    resumed = train(config(resumed_out, resume=str(checkpoint)), show_progress=False)
    assert resumed.steps == reference.steps == 4
    from tuneonce.trainer.metrics import read_metrics

    trained_steps = [r["step"] for r in read_metrics(resumed_out / "logs" / "metrics.jsonl") if "loss" in r]
    assert trained_steps == [3, 4]  # it went on from the checkpoint, it did not start over
    ours = load_file(str(resumed_out / "run.safetensors"))
    theirs = load_file(str(tmp_path / "reference" / "run.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
