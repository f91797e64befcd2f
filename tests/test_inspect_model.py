"""scripts/inspect_model.py: built-in names and local diffusers folders, the --json shape, and
the numbers it prints recomputed here from the formulas of docs/optimizer_math.md §3."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import inspect_model  # noqa: E402

COMPONENT_KEYS = {"class", "depth", "trained_depth", "params", "roles", "groups"}
GROUP_KEYS = {"role", "fan_in", "fan_out", "count", "ns_eps", "adam_eps", "weight_decay"}


def _run_json(capsys, *argv: str) -> dict:
    assert inspect_model.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_builtin_sdxl_lora_json_shape_and_numbers(capsys):
    report = _run_json(capsys, "sdxl", "--lora-rank", "4", "--wd", "0.1")
    assert set(report) == {"components"}
    assert set(report["components"]) == {"unet", "text_encoder", "text_encoder_2"}
    for comp in report["components"].values():
        assert set(comp) == COMPONENT_KEYS
        assert all(set(g) == GROUP_KEYS for g in comp["groups"])

    unet = report["components"]["unet"]
    assert unet["class"] == "UNet2DConditionModel"
    resnets = 2 * 3 + 2 + 3 * 3  # SDXL: 2 per down stage, 2 in the mid block, 3 per up stage
    assert (unet["depth"], unet["trained_depth"]) == (87, 87 - resnets)  # LoRA sits in transformer blocks only
    assert unet["roles"] == {"lora_a": 722, "lora_b": 722}  # docs/optimizer_math.md §10: 722 adapted modules
    assert unet["params"] == sum(g["count"] * g["fan_in"] * g["fan_out"] for g in unet["groups"])
    assert unet["params"] * 16 / 4 == pytest.approx(42.6e6, rel=2e-3)  # docs/optimizer_math.md §10 at rank 16
    for g in unet["groups"]:
        assert g["ns_eps"] == pytest.approx(math.sqrt(g["fan_in"] / g["fan_out"]) / 87)
        assert g["adam_eps"] == pytest.approx(1 / (87 * math.sqrt(g["fan_in"] * g["fan_out"])))
        if g["role"] == "lora_a":  # the adapted layer's fan_in is A's fan_in
            assert g["weight_decay"] == pytest.approx(0.1 / g["fan_in"])
    for name, layers in (("text_encoder", 12 - 1), ("text_encoder_2", 32)):  # CLIP-L read at hidden_states[-2]
        comp = report["components"][name]
        assert (comp["depth"], comp["trained_depth"], comp["params"], comp["groups"]) == (layers, 0, 0, [])


def test_builtin_full_finetune_depth_source_trained_and_aux_groups(capsys):
    report = _run_json(capsys, "flux2-klein-4b", "--wd", "0.2", "--adam-eps", "1e-7", "--depth-source", "trained")
    transformer = report["components"]["transformer"]
    assert (transformer["depth"], transformer["trained_depth"]) == (5 + 20, 5 + 20)
    assert transformer["roles"].get("vector", 0) > 0 and transformer["roles"]["matrix"] > 0
    for g in transformer["groups"]:
        if g["role"] == "matrix":
            assert g["weight_decay"] == pytest.approx(0.2 / g["fan_in"])
            assert g["ns_eps"] == pytest.approx(math.sqrt(g["fan_in"] / g["fan_out"]) / 25)
        elif g["role"] == "vector":
            assert (g["ns_eps"], g["adam_eps"], g["weight_decay"]) == (None, 1e-7, 0.0)
    assert report["components"]["text_encoder"]["depth"] == 27  # Klein reads Qwen3 layers (9, 18, 27)


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pipe")
    torch.manual_seed(0)
    UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16, attention_head_dim=2,
        norm_num_groups=4, sample_size=8,
    ).save_pretrained(folder / "unet")
    CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                                 vocab_size=100, max_position_embeddings=12)).save_pretrained(folder / "text_encoder")
    index = {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"],
        "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "safety_checker": [None, None],
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def test_local_pipeline_folder(tiny_pipeline, capsys):
    report = _run_json(capsys, str(tiny_pipeline), "--lora-rank", "2", "--depth", "unet=5")
    unet, text = report["components"]["unet"], report["components"]["text_encoder"]
    # down 1 | 1 + 1, mid 2 + 1, up 2 + 2 | 2 would be 12; the override wins
    assert (unet["depth"], unet["class"]) == (5, "UNet2DConditionModel")
    assert unet["roles"]["lora_a"] == unet["roles"]["lora_b"] > 0
    assert (text["depth"], text["trained_depth"], text["class"]) == (3, 0, "CLIPTextModel")


def test_local_component_folder_and_table(tiny_pipeline, capsys):
    assert inspect_model.main([str(tiny_pipeline / "unet")]) == 0
    out = capsys.readouterr().out
    assert "unet: UNet2DConditionModel  depth 12  trained depth 12" in out
    assert "conv" in out and "matrix" in out and "vector" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["no-such-model"], "error: MODEL 'no-such-model' is neither a local diffusers folder nor a built-in name"),
        (["sd15", "--depth", "unet=zero"], "error: depth.unet: expected a positive integer residual depth, got 'zero'"),
        (["sd15", "--depth", "0"], "error: depth: expected a positive integer residual depth, got 0"),
        (["sd15", "--lora-rank", "4", "--lora-components", "vae"], "error: LoRA components ['vae'] not in the model"),
    ],
)
def test_bad_arguments_are_one_line_errors(capsys, argv, message):
    assert inspect_model.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err
