"""Z-Image and Qwen-Image on the generic loop: each family's text encoding, latents and prediction against the real
diffusers pipeline, and LoRA runs through `train()` whose files the pipelines' `load_lora_weights` load completely."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tuneonce.config.loading import load_config
from tuneonce.model.families import get_family
from tuneonce.model.families.flow import pack_latents, unpack_latents
from tuneonce.model.families.qwenimage import PROMPT_TEMPLATE, TEMPLATE_PREFIX_TOKENS
from tuneonce.model.tiny_flow import build_tiny_flow_pipeline, tiny_flow_pipeline_dir
from tuneonce.trainer.train import train
from tests.builders import FLOW_RUN, tiny_train_config
from tests.lora_checks import assert_adapters_trained, check_lora_file_reproduces

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]
KINDS = [("zimage", "zimage"), ("qwen-image", "qwenimage")]
PROMPTS = ["a zxq star on a white background", "a red circle"]  # different lengths: padding and masks matter


@pytest.fixture(scope="module")
def pipes():
    return {family: build_tiny_flow_pipeline(kind, seed=1) for kind, family in KINDS}


@pytest.mark.parametrize("family_name", ["zimage", "qwenimage"])
def test_prediction_matches_one_pipeline_euler_step(pipes, family_name):
    """From sigma 1 one Euler step to sigma 0 gives x - v: the pipeline's own prompt encoding, packing, RoPE shapes
    and timestep convention must produce the velocity the family predicts for the same latents."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe, family = pipes[family_name], get_family(family_name)
    latents = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    packs = family_name == "qwenimage"
    # Qwen-Image's terminal stretch divides by zero with a single step; without it sigma 1 -> 0 is unchanged.
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift_terminal=None)
    single = type(pipe)(**{**pipe.components, "scheduler": scheduler})
    with torch.no_grad():
        stepped = single(
            prompt=PROMPTS[0], latents=pack_latents(latents) if packs else latents, num_inference_steps=1, height=64,
            width=64, output_type="latent", **family.guidance_kwargs(1.0), **family.sampling_kwargs(pipe.components),
        ).images  # fmt: skip
        text = family.encode_text(pipe.components, PROMPTS[:1])
        velocity = family.predict(pipe.transformer, latents, torch.ones(1), text, {})
    stepped = unpack_latents(stepped, 16, 16) if packs else stepped
    torch.testing.assert_close(velocity, latents - stepped, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family_name, latent_hw", [("zimage", (16, 16)), ("qwenimage", (16, 16)), ("qwenimage", (128, 96))])
def test_training_shift_is_the_samplers(pipes, family_name, latent_hw):
    """Training timesteps are shifted as the folder's scheduler shifts sampling sigmas: Z-Image's fixed 3.0, Qwen-Image's
    exponential resolution-dependent shift (its terminal stretch only rescales the sampling schedule's end)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    from tuneonce.model.flow_objective import shift_sigmas

    pipe, family = pipes[family_name], get_family(family_name)
    objective = family.build_objective(pipe.components)
    config = pipe.scheduler.config
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config, shift_terminal=None)
    h, w = latent_hw
    mu = calculate_shift((h // 2) * (w // 2), config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift)
    sigmas = [0.9, 0.5, 0.1]
    scheduler.set_timesteps(sigmas=sigmas, mu=mu)
    ours = shift_sigmas(torch.tensor(sigmas), objective.shift_for((1, 16, h, w)))
    torch.testing.assert_close(ours, scheduler.sigmas[:3].float(), rtol=1e-5, atol=1e-6)


def test_zimage_text_is_the_pipelines_unpadded_penultimate_layer(pipes):
    pipe, family = pipes["zimage"], get_family("zimage")
    with torch.no_grad():
        expected = pipe._encode_prompt(list(PROMPTS), device=CPU, max_sequence_length=family.sequence_length(pipe.components, "tokenizer"))
        text = family.encode_text(pipe.components, list(PROMPTS))
    lengths = text["attention_mask"].sum(1).long().tolist()
    assert lengths == [len(e) for e in expected] and lengths[0] > lengths[1]
    for i, want in enumerate(expected):
        torch.testing.assert_close(text["encoder_hidden_states"][i, : lengths[i]], want)


def test_qwen_image_text_drops_exactly_the_system_prefix(pipes):
    pipe, family = pipes["qwenimage"], get_family("qwenimage")
    prefix = PROMPT_TEMPLATE.split("{}")[0]
    assert len(pipe.tokenizer(prefix).input_ids) == TEMPLATE_PREFIX_TOKENS  # as with the published tokenizer
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(list(PROMPTS), device=CPU)
        text = family.encode_text(pipe.components, list(PROMPTS))
    width = embeds.shape[1]  # the pipeline pads to the longest prompt, the family to a fixed length
    assert text["attention_mask"].shape[1] == family.sequence_length(pipe.components, "tokenizer") > width
    torch.testing.assert_close(text["attention_mask"][:, :width], mask.float())
    assert text["attention_mask"][:, width:].sum() == 0
    torch.testing.assert_close(text["encoder_hidden_states"][:, :width] * mask[..., None], embeds * mask[..., None])


def test_qwen_image_latents_invert_the_pipelines_decode_normalization(pipes):
    """The pipeline decodes `latents * std + mean` (per channel, on a frame axis); encoding must be its inverse."""
    pipe, family = pipes["qwenimage"], get_family("qwenimage")
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        raw = pipe.vae.encode(pixels.unsqueeze(2)).latent_dist.mean
        latents = family.encode_latents(pipe.vae, pixels)
    assert latents.shape == (2, 16, 16, 16)
    config = pipe.vae.config
    decoded_input = latents.unsqueeze(2) / (1.0 / torch.tensor(config.latents_std).view(1, 16, 1, 1, 1))
    torch.testing.assert_close(decoded_input + torch.tensor(config.latents_mean).view(1, 16, 1, 1, 1), raw, rtol=1e-5, atol=1e-5)


# ---- training runs ----------------------------------------------------------------------------------------------
# Qwen-Image's last block: its text-stream output is discarded, so the text queries, attention output and MLP get no
# gradient (the text keys and values still feed the image tokens).
QWEN_IDLE = ("transformer_blocks.2.attn.add_q_proj", "transformer_blocks.2.attn.to_add_out", "transformer_blocks.2.txt_mlp.net.0.proj", "transformer_blocks.2.txt_mlp.net.2")


@pytest.mark.parametrize(
    "kind, family_name, idle, architecture, depth",
    # Z-Image's depth: 2 main layers + the longer refiner chain (1 block); Qwen-Image: its 3 joint blocks.
    [("zimage", "zimage", (), "z-image", 3), ("qwen-image", "qwenimage", QWEN_IDLE, "qwen-image", 3)],
)
def test_lora_trains_and_loads_in_diffusers(tmp_path_factory, data_dirs, kind, family_name, idle, architecture, depth):
    from safetensors import safe_open

    base = tiny_flow_pipeline_dir(kind, tmp_path_factory)
    out = tmp_path_factory.mktemp(f"{family_name}_lora")
    result = train(tiny_train_config(family_name, base, data_dirs, out, defaults=FLOW_RUN), show_progress=False)
    assert_adapters_trained(result, idle=idle)
    check_lora_file_reproduces(family_name, base, result, ("transformer",))
    with safe_open(str(result.saved[0]), "pt") as saved:
        metadata = saved.metadata()
    assert metadata["modelspec.architecture"] == f"{architecture}/lora"
    assert json.loads(metadata["tuneonce_depth"]) == {"transformer": depth}


@pytest.mark.parametrize("family_name, cfg, negative", [("zimage", 1.0, None), ("qwenimage", 4.0, "blurry")])
def test_sampling_writes_an_image_through_the_pipeline(pipes, tmp_path, family_name, cfg, negative):
    """The loop's sampler with each family's guidance mapping (Z-Image: cfg - 1; Qwen-Image: true CFG)."""
    from types import SimpleNamespace

    from PIL import Image

    from tuneonce.trainer.sampling import sample_images

    prompt = SimpleNamespace(prompt=PROMPTS[0], negative_prompt=negative, seed=3, cfg=cfg, steps=2, width=64, height=64)
    (path,) = sample_images(get_family(family_name), pipes[family_name].components, [prompt], samples_dir=tmp_path, step=1)
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    assert pixels.shape == (64, 64, 3) and pixels.std() > 0  # decoded, not a blank or failed image


def test_wrong_family_for_folder_and_text_encoder_lora_are_clear_errors(tmp_path_factory, tmp_path):
    base = tiny_flow_pipeline_dir("zimage", tmp_path_factory)
    with pytest.raises(ValueError, match="holds a ZImagePipeline, not a qwenimage pipeline"):
        get_family("qwenimage").load(base)
    with pytest.raises(ValueError, match=r"lora\.train_text_encoders\.text_encoder: family zimage has no text_encoder"):
        tiny_train_config("zimage", base, (tmp_path, tmp_path), tmp_path, lora={"train_text_encoders": {"text_encoder": True}},
                          data={"cache_text_embeddings": False})  # fmt: skip
    with pytest.raises(ValueError, match=r"saving\.format: the kohya layout is not written for qwenimage"):
        tiny_train_config("qwenimage", base, (tmp_path, tmp_path), tmp_path, saving={"format": "kohya"})


@pytest.mark.parametrize("preset, family", [("zimage_lora", "zimage"), ("qwen_image_lora", "qwenimage")])
def test_presets_use_the_transfer_recipe(preset, family):
    cfg = load_config(ROOT / "training_presets" / f"{preset}.yaml")
    assert cfg.model.family == family and cfg.method == "lora" and cfg.saving.format == "diffusers"
    assert cfg.optimizer.type == "muon_adv" and (cfg.optimizer.lr, cfg.optimizer.weight_decay) == (1e-3, 0.1)
    assert cfg.optimizer.spectral_scaling and cfg.optimizer.depth_scaled_eps
