"""The memory planner (modules/trainer/memory_plan.py) against measured peaks of reduced real architectures, the
budget picker, and scripts/inspect_model.py --memory."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tuneonce.model.activations import SavedActivations
from tuneonce.model.builtin import build_meta_components
from tuneonce.trainer.memory_measure import measure_step, reduced_model, step_inputs
from tuneonce.trainer.memory_plan import GIB, PlanSettings, pick_settings, plan_memory

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import inspect_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOLERANCE = 0.15  # the bound on predicted / measured peak

# (architecture, blocks, heads, resolution, text tokens, storage): mid-size = the real classes at 2 blocks per list and
# 4 heads (nf4 on Flux and Qwen-Image is also covered, checkpointed and offloaded, below)
MID = [("flux-dev", 2, 4, 256, 64, "none"), ("flux-dev", 2, 4, 256, 64, "nf4"), ("qwen-image", 2, 4, 256, 64, "none"),
       ("sdxl", 2, 4, 256, 77, "none"), ("sdxl", 2, 4, 256, 77, "int8")]


def test_saved_activation_count_is_exact_on_a_closed_form():
    """Linear(8->16) on x (4x8, requires grad) then tanh: autograd keeps x (for dW) and tanh's output."""
    layer = nn.Linear(8, 16)
    x = torch.randn(4, 8, requires_grad=True)
    with SavedActivations(layer) as saved:
        torch.tanh(layer(x)).sum()
    assert saved.total == (4 * 8 + 4 * 16) * 4  # the weight (a parameter) is not counted


@pytest.mark.parametrize("arch,blocks,heads,resolution,text,mode", MID, ids=[f"{m[0]}-{m[-1]}" for m in MID])
def test_prediction_within_tolerance_of_measured_peak(arch, blocks, heads, resolution, text, mode):
    model = reduced_model(arch, blocks=blocks, heads=heads)
    backbone = "unet" if arch == "sdxl" else "transformer"
    settings = PlanSettings(resolution=resolution, batch=1, train_dtype="float32", activation_dtype="float32",
                            quantize={backbone: mode}, lora_rank=4, optimizer="adamw", text_tokens=text)  # fmt: skip
    plan = plan_memory({backbone: model}, settings)
    measured = measure_step(model, step_inputs(model, resolution, 1, text), mode=mode, rank=4, optimizer="adamw")
    assert measured.activations > 0.2 * measured.peak  # the activation model is what is being tested
    assert abs(plan.peak / measured.peak - 1) < TOLERANCE, (plan.as_dict(), measured)
    assert abs(plan.activations / measured.activations - 1) < TOLERANCE
    assert abs(plan.weight_bytes / measured.weight_bytes - 1) < 0.01  # weights are counted, not modelled
    assert plan.adapters == measured.adapters


@pytest.mark.parametrize("arch,offload", [("flux-dev", 3), ("qwen-image", 2)])
def test_checkpointed_and_offloaded_prediction_within_tolerance(arch, offload):
    model = reduced_model(arch, blocks=2, heads=4)
    settings = PlanSettings(resolution=256, batch=1, train_dtype="float32", activation_dtype="float32",
                            quantize={"transformer": "nf4"}, lora_rank=4, optimizer="adamw", text_tokens=64,
                            checkpointing=True, offload_blocks=offload)  # fmt: skip
    plan = plan_memory({"transformer": model}, settings)
    measured = measure_step(model, step_inputs(model, 256, 1, 64), mode="nf4", rank=4, checkpointing=True,
                            offload_blocks=offload)  # fmt: skip
    assert abs(plan.peak / measured.peak - 1) < TOLERANCE, (plan.as_dict(), measured)
    assert abs(plan.activations / measured.activations - 1) < TOLERANCE
    assert plan.weights == pytest.approx(measured.weights)  # incl. what offloading takes off the device


def test_checkpointing_quantization_and_offload_each_lower_the_flux_dev_prediction():
    components = build_meta_components("flux-dev")
    base = PlanSettings(resolution=1024)
    plain = plan_memory(components, base)
    assert 22 * GIB < plain.weights["bfloat16"] < 36 * GIB  # 12B transformer + T5-XXL + CLIP-L in bf16
    ckpt = plan_memory(components, PlanSettings(resolution=1024, checkpointing=True))
    nf4 = plan_memory(components, PlanSettings(resolution=1024, checkpointing=True, quantize={"transformer": "nf4"}))
    off = plan_memory(components, PlanSettings(resolution=1024, checkpointing=True, quantize={"transformer": "nf4"},
                                               offload_blocks=20))  # fmt: skip
    assert plain.peak > ckpt.peak > nf4.peak > off.peak and off.offload_saves > 0
    assert ckpt.activations < plain.activations / 5


def test_budget_picks_settings_that_fit_and_says_what():
    components = build_meta_components("flux-dev")
    plan, changes = pick_settings(components, PlanSettings(resolution=1024), 12)
    assert plan.peak <= 12 * GIB and "training.gradient_checkpointing: true" in changes
    assert any(c.startswith("memory.quantize.denoiser:") for c in changes)
    generous, none = pick_settings(components, PlanSettings(resolution=512), 200)
    assert none == [] and generous.settings.quantize == {}


def test_inspect_model_memory_cli(capsys, tmp_path):
    assert inspect_model.main(["flux-dev", "--memory", "--budget-gb", "16", "--resolution", "512"]) == 0
    out = capsys.readouterr().out
    assert "predicted peak accelerator memory" in out and "to fit 16 GiB:" in out and "weights bfloat16" in out
    assert inspect_model.main(["sdxl", "--memory", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["plan"]["peak_bytes"] == pytest.approx(sum(report["plan"][k] for k in (
        "weight_bytes", "adapters", "gradients", "optimizer_state", "activations")))
    config = tmp_path / "run.yaml"
    config.write_text("model: {family: flux, base_model: x}\ndata: {folders: [{path: d}], resolution: 512}\n"
                      "schedule: {max_steps: 1}\nmemory: {quantize: {denoiser: int8}, budget_gb: 40}\n")
    assert inspect_model.main(["flux-dev", "--memory", "--config", str(config), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["plan"]["settings"]["quantize"] == {"transformer": "int8"} and report["budget_gb"] == 40
    assert "int8" in report["plan"]["weights"]
    assert inspect_model.main(["nonesuch", "--memory"]) == 2
    assert "nonesuch" in capsys.readouterr().err
    assert inspect_model.main(["sdxl", "--memory", "--budget-gb", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --budget-gb: expected a positive number of GiB, got 0"


def test_bench_memory_json_has_every_mode(capsys):
    import bench_memory

    argv = ["--model", "flux-dev", "--blocks", "2", "--heads", "1", "--resolution", "64", "--text-tokens", "8",
            "--steps", "1", "--json"]
    assert bench_memory.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["results"]) == ["bf16", "float8", "int8", "nf4", "nf4+offload"]
    for row in report["results"].values():
        assert {"peak_bytes", "predicted_peak_bytes", "weight_bytes", "step_s"} <= row.keys()
        assert abs(row["predicted_peak_bytes"] / row["peak_bytes"] - 1) < TOLERANCE
    weights = [report["results"][m]["weight_bytes"] for m in ("bf16", "int8", "nf4", "nf4+offload")]
    assert weights == sorted(weights, reverse=True) and weights[-1] < weights[-2]  # offloading takes blocks off
    assert bench_memory.main(["--model", "sd99"]) == 2 and "--model" in capsys.readouterr().err


def test_budget_never_makes_a_chosen_setting_larger_and_spares_parked_encoders():
    components = build_meta_components("flux-dev")
    encoders = ["text_encoder", "text_encoder_2"]
    chosen = PlanSettings(resolution=1024, quantize={"transformer": "nf4", "text_encoder_2": "float8"},
                          offload_blocks=30, checkpointing=True)  # fmt: skip
    plan, changes = pick_settings(components, chosen, 16)
    s = plan.settings
    assert s.quantize["transformer"] == "nf4" and s.quantize["text_encoder_2"] == "float8" and s.offload_blocks >= 30
    assert not any("denoiser" in c or "text_encoder_2" in c for c in changes)
    # parked encoders (cached embeddings, no sampling) leave the training peak: 16 GiB needs only the denoiser
    parked, changes = pick_settings(components, PlanSettings(resolution=1024, parked=encoders), 16)
    assert parked.settings.quantize == {"transformer": "int8"} and parked.parked > 9 * GIB
    assert changes == ["training.gradient_checkpointing: true", "memory.quantize.denoiser: int8"]
    resident, _ = pick_settings(components, PlanSettings(resolution=1024), 16)
    assert resident.settings.offload_blocks > 0  # the same budget with the encoders kept on the accelerator
    # sampling borrows them back beside the denoiser: then they are quantized too
    sampled, changes = pick_settings(components, PlanSettings(resolution=1024, parked=encoders, samples=True), 12)
    assert "memory.quantize.text_encoder_2: int8" in changes and sampled.peak == sampled.sampling_peak
