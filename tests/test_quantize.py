"""Quantized frozen base weights (modules/model/quantize.py): formats against closed forms, a tiny Flux transformer
predicting close to its float self, PEFT on top, identical optimizer groups, and a LoRA run through train()."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from torch import nn

from tuneonce.model.adapters import LoraSettings, add_lora
from tuneonce.model.families import get_family
from tuneonce.model.quantize import NF4_LEVELS, QuantLinear, quantize_linears, quantize_weight, weight_bytes_by_dtype
from tuneonce.model.roles import param_infos
from tuneonce.optimizer.groups import build_param_groups
from tuneonce.trainer.train import train
from tests.builders import FLOW_RUN, flux_transformer_inputs, tiny_train_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Relative L2 error of the tiny Flux transformer's output, quantized vs float32 (measured: bf16 0.2%, int8 0.6%,
# float8 3.6%, nf4 13%); bounds about twice that, far below what a broken format gives (~100%).
TOLERANCE = {"bfloat16": 0.01, "int8": 0.02, "float8": 0.08, "nf4": 0.25}


@pytest.fixture(scope="module")
def transformer(flux_base):
    return get_family("flux").load(flux_base)["transformer"]


def test_formats_match_their_closed_forms():
    w = torch.randn(24, 100, generator=torch.Generator().manual_seed(0))
    int8 = quantize_weight(w, "int8")
    row_scale = w.abs().amax(1, keepdim=True) / 127
    torch.testing.assert_close(int8["data"].float(), torch.round(w / row_scale).clamp(-127, 127))
    f8 = quantize_weight(w, "float8")
    scale = w.abs().amax(1, keepdim=True) / 448
    f8_ref = (w / scale).to(torch.float8_e4m3fn).float()
    torch.testing.assert_close(f8["data"].view(torch.float8_e4m3fn).float(), f8_ref)
    nf4 = quantize_weight(w, "nf4")
    assert nf4["data"].dtype == torch.uint8 and nf4["data"].numel() == (2400 + 63) // 64 * 32  # two codes a byte
    layer = QuantLinear(nn.Linear(100, 24), "nf4")
    with torch.no_grad():
        layer_w = nn.Linear(100, 24)
        layer_w.weight.copy_(w)
    deq = QuantLinear(layer_w, "nf4").weight
    blocks = torch.nn.functional.pad(w.reshape(-1), (0, 2432 - 2400)).reshape(-1, 64)
    absmax = blocks.abs().amax(1, keepdim=True)
    levels = torch.tensor(NF4_LEVELS)
    nearest = levels[((blocks / absmax).unsqueeze(-1) - levels).abs().argmin(-1)] * absmax  # independent rounding
    torch.testing.assert_close(deq, nearest.reshape(-1)[:2400].reshape(24, 100))
    assert layer.stored_bytes() == 2432 // 2 + 38 * 4  # 0.5 byte a (padded) weight + one float32 absmax per 64


@pytest.mark.parametrize("mode", list(TOLERANCE))
def test_quantized_tiny_flux_predicts_close_to_float(transformer, mode):
    kwargs = flux_transformer_inputs(transformer.config)
    quantized = copy.deepcopy(transformer)
    names = quantize_linears(quantized, mode)
    assert names and all(isinstance(quantized.get_submodule(n), QuantLinear) for n in names)
    assert not any(type(m) is nn.Linear for m in quantized.modules())
    with torch.no_grad():
        ref, got = transformer(**kwargs)[0], quantized(**kwargs)[0]
    error = float((got - ref).norm() / ref.norm())
    assert 0 < error < TOLERANCE[mode] or (mode == "bfloat16" and error < TOLERANCE[mode])
    bytes_by = weight_bytes_by_dtype(quantized)
    float_linear = sum(transformer.get_submodule(n).weight.numel() for n in names) * 4
    ratio = {"bfloat16": 2, "int8": 4, "float8": 4, "nf4": 8}[mode]
    assert float_linear / ratio <= bytes_by[mode] < float_linear / ratio * 1.2  # plus the scales


def test_backward_keeps_no_dequantized_weight(transformer):
    """The frozen matmul saves nothing for backward: saved bytes are the LoRA's and the activations', not W's."""
    layer = QuantLinear(nn.Linear(256, 256), "int8")
    x = torch.randn(2, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    assert all(t.numel() < 256 * 256 for t in saved)
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(2, -1))


def lora_groups(module: nn.Module) -> list[tuple]:
    settings = LoraSettings(rank=4, alpha=4.0, targets=("to_q", "to_k", "to_v", "proj_mlp"))
    add_lora(module, settings, component="transformer")
    infos = param_infos({"transformer": module})
    groups = build_param_groups(infos, lr=1e-3, weight_decay=0.1)
    return [(g["names"], {k: v for k, v in g.items() if k not in ("params", "names", "pairs")}) for g in groups]


def test_optimizer_sees_identical_roles_fans_and_depth(transformer):
    float_groups = lora_groups(copy.deepcopy(transformer))
    quantized = copy.deepcopy(transformer)
    quantize_linears(quantized, "nf4")
    assert lora_groups(quantized) == float_groups and len(float_groups) > 1


def test_lora_on_nf4_base_trains_and_loads_on_the_float_base(flux_base, data_dirs, tmp_path):
    cfg = tiny_train_config(
        "flux", flux_base, data_dirs, tmp_path, defaults=FLOW_RUN, memory={"quantize": {"denoiser": "nf4"}},
        schedule={"max_steps": 6}, validation={"every_n_steps": 6}, optimizer={"lr": 3e-3},
    )  # fmt: skip
    result = train(cfg, show_progress=False)
    transformer = result.components["transformer"]
    assert any(isinstance(m, QuantLinear) for m in transformer.modules())
    (first, before), (last, after) = result.val_losses[0], result.val_losses[-1]
    assert (first, last) == (0, 6) and after < before, result.val_losses
    # the file has the float run's keys and diffusers loads every one of them on the float base
    (path,) = result.saved
    saved = load_file(str(path))
    family = get_family("flux")
    pipe = family.pipeline_class.from_pretrained(str(flux_base), local_files_only=True)
    pipe.load_lora_weights(str(path), adapter_name="trained")
    loaded = {f"transformer.{n.replace('.trained.', '.').replace('.base_layer', '')}": p
              for n, p in pipe.transformer.named_parameters() if ".lora_" in n}
    assert saved.keys() == loaded.keys()
    for key, value in saved.items():
        torch.testing.assert_close(loaded[key], value)
    # the float base + LoRA predicts like the quantized training model, within nf4's tolerance
    kwargs = flux_transformer_inputs(pipe.transformer.config)
    with torch.no_grad():
        ref, got = transformer.eval()(**kwargs)[0], pipe.transformer(**kwargs)[0]
    assert float((got - ref).norm() / ref.norm()) < TOLERANCE["nf4"]


def test_finetune_on_a_quantized_base_is_a_config_error(flux_base, data_dirs, tmp_path):
    with pytest.raises(ValidationError, match=r"memory\.quantize\.denoiser: nf4 stores the denoiser frozen"):
        tiny_train_config("flux", flux_base, data_dirs, tmp_path, defaults=FLOW_RUN, method="finetune",
                          memory={"quantize": {"denoiser": "nf4"}})
    with pytest.raises(ValidationError, match="memory.quantize.text_encoder"):
        tiny_train_config("flux", flux_base, data_dirs, tmp_path, memory={"quantize": {"text_encoder": "int4"}})


@pytest.mark.parametrize("dora", [False, True])
def test_peft_on_a_quantized_layer_equals_peft_on_its_dequantized_float_layer(dora):
    """PEFT's LoRA / DoRA (which reads the base weight's norm) on a QuantLinear behaves exactly like on a plain
    Linear holding the dequantized weight: forward and the adapters' gradients."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(48, 40))
    quantized = copy.deepcopy(source)
    quantize_linears(quantized, "nf4")
    plain = copy.deepcopy(source)
    with torch.no_grad():
        plain[0].weight.copy_(quantized[0].weight)
    x = torch.randn(5, 48)
    outs, grads = [], []
    for model in (quantized, plain):
        torch.manual_seed(1)
        inject_adapter_in_model(LoraConfig(r=4, target_modules=["0"], use_dora=dora, init_lora_weights=False), model)
        model.requires_grad_(False)
        trained = [p for n, p in model.named_parameters() if "lora_" in n]
        for p in trained:
            p.requires_grad_(True)
        out = model(x)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append([p.grad for p in trained])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_quantized_text_encoders_train_in_bfloat16(flux_base, data_dirs, tmp_path):
    cfg = tiny_train_config(
        "flux", flux_base, data_dirs, tmp_path, defaults=FLOW_RUN,
        memory={"quantize": {"denoiser": "float8", "text_encoder": "int8", "text_encoder_2": "nf4"}},
        lora={"train_text_encoders": {"text_encoder": True}}, data={"cache_text_embeddings": False},
        model={"family": "flux", "base_model": str(flux_base), "train_dtype": "bfloat16"},
    )  # fmt: skip
    result = train(cfg, show_progress=False)
    modes = {name: {m.mode for m in result.components[name].modules() if isinstance(m, QuantLinear)}
             for name in ("transformer", "text_encoder", "text_encoder_2")}  # fmt: skip
    assert modes == {"transformer": {"float8"}, "text_encoder": {"int8"}, "text_encoder_2": {"nf4"}}
    clip_b = [p for n, p in result.components["text_encoder"].named_parameters() if ".lora_B." in n]
    assert clip_b and all(p.abs().sum() > 0 for p in clip_b) and all(p.dtype == torch.bfloat16 for p in clip_b)
    assert all(math.isfinite(v) for _, v in result.val_losses)


def test_quantizing_a_component_the_model_lacks_names_the_field(flux_base, data_dirs, tmp_path):
    cfg = tiny_train_config("flux", flux_base, data_dirs, tmp_path, defaults=FLOW_RUN,
                            memory={"quantize": {"text_encoder_3": "int8"}})
    with pytest.raises(ValueError, match="memory.quantize.text_encoder_3: this model has no component text_encoder_3"):
        train(cfg, show_progress=False)
