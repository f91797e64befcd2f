"""Flux / Chroma / SD3 on the generic loop: the flow objective against closed forms and diffusers' scheduler, each
family's text encoding + prediction against one Euler step of the real diffusers pipeline, and LoRA runs from
saved tiny folders whose files diffusers' `load_lora_weights` loads back to the trained prediction."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tuneonce.config.schema import TrainConfig
from tuneonce.model.families import get_family
from tuneonce.model.families.flow import latent_image_ids, pack_latents, unpack_latents
from tuneonce.model.tiny_flow import build_tiny_flow_pipeline, tiny_flow_pipeline_dir
from tuneonce.model.flow_objective import FlowMatchObjective, dynamic_shift_mu, shift_sigmas
from tuneonce.trainer.train import train
from tests.builders import FLOW_RUN, tiny_train_config
from tests.lora_checks import assert_adapters_trained, check_lora_file_reproduces

CPU = torch.device("cpu")


# ---- the objective ---------------------------------------------------------------------------------------------
def test_flow_objective_path_and_target_closed_form():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 16, 4, 6, generator=g), torch.randn(3, 16, 4, 6, generator=g)
    t = torch.tensor([0.0, 0.25, 1.0])
    objective = FlowMatchObjective()
    noisy = objective.add_noise(x0, noise, t)
    for i, ti in enumerate(t.tolist()):
        torch.testing.assert_close(noisy[i], (1 - ti) * x0[i] + ti * noise[i])
    torch.testing.assert_close(noisy[0], x0[0])  # t = 0 is the data, t = 1 pure noise
    torch.testing.assert_close(noisy[2], noise[2])
    prediction = torch.randn(x0.shape, generator=g)
    expected = ((prediction - (noise - x0)) ** 2).mean()
    torch.testing.assert_close(objective.loss(prediction, x0, noise, t), expected)
    assert objective.loss(noise - x0, x0, noise, t).item() == 0.0


def test_static_shift_matches_closed_form_and_logit_normal_median():
    shift = 3.0
    objective = FlowMatchObjective(shift=shift)
    u = torch.rand(1000, generator=torch.Generator().manual_seed(5))
    t = objective.sample_timesteps(1000, torch.Generator().manual_seed(5), CPU)
    torch.testing.assert_close(t, shift * u / (1 + (shift - 1) * u))
    assert (t >= u).all()  # s > 1 moves every timestep towards noise
    logit = FlowMatchObjective(timestep_sampling="logit_normal", logit_mean=0.0, logit_std=1.0)
    samples = logit.sample_timesteps(20000, torch.Generator().manual_seed(1), CPU)
    assert samples.median().item() == pytest.approx(0.5, abs=0.02)
    assert ((samples > 0) & (samples < 1)).all()


@pytest.mark.parametrize("latent_hw", [(16, 16), (128, 128), (96, 160)])
def test_dynamic_shift_matches_flux_sampler(latent_hw):
    """The training shift at a resolution equals the one FluxPipeline's scheduler samples with."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    pipe_config = {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                   "base_image_seq_len": 256, "max_image_seq_len": 4096}  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **pipe_config)
    objective = FlowMatchObjective.from_scheduler_config(scheduler.config)
    h, w = latent_hw
    tokens = (h // 2) * (w // 2)
    mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
    assert dynamic_shift_mu(tokens) == pytest.approx(mu)
    sigmas = [0.9, 0.5, 0.1]
    scheduler.set_timesteps(sigmas=sigmas, mu=mu)
    ours = shift_sigmas(torch.tensor(sigmas), objective.shift_for((1, 16, h, w)))
    torch.testing.assert_close(ours, scheduler.sigmas[:3].float(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="latent shape"):
        objective.sample_timesteps(2, None, CPU)


def test_pack_unpack_and_ids_match_flux_pipeline():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 6, 10)
    packed = pack_latents(latents)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(latents, 2, 16, 6, 10))
    torch.testing.assert_close(unpack_latents(packed, 6, 10), latents)
    ids = FluxPipeline._prepare_latent_image_ids(2, 3, 5, CPU, torch.float32)
    torch.testing.assert_close(latent_image_ids(6, 10, CPU, torch.float32), ids)
    with pytest.raises(ValueError, match="must be even"):
        pack_latents(torch.zeros(1, 16, 5, 4))


# ---- families against the real pipelines -----------------------------------------------------------------------
@pytest.mark.parametrize("kind, family_name", [("flux-dev", "flux"), ("flux-schnell", "flux"), ("chroma", "chroma"), ("sd3", "sd3")])
def test_family_prediction_matches_one_pipeline_euler_step(kind, family_name):
    """From sigma 1 one Euler step to sigma 0 gives x - v: the pipeline's own text encoding, packing, ids,
    guidance and timestep scaling must produce the velocity the family predicts for the same latents."""
    pipe = build_tiny_flow_pipeline(kind, seed=1)
    family = get_family(family_name)
    prompt = "a zxq star on a white background"
    latents = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    packs = family_name != "sd3"
    with torch.no_grad():
        stepped = pipe(
            prompt=prompt, latents=pack_latents(latents) if packs else latents, num_inference_steps=1, guidance_scale=1.0,
            height=64, width=64, output_type="latent", **family.sampling_kwargs(pipe.components),
        ).images  # fmt: skip
        text = family.encode_text(pipe.components, [prompt])
        velocity = family.predict(pipe.transformer, latents, torch.ones(1), text, family.conditioning({}, text, CPU, torch.float32))
    stepped = unpack_latents(stepped, 16, 16) if packs else stepped
    torch.testing.assert_close(velocity, latents - stepped, rtol=1e-4, atol=1e-5)


# ---- training runs ----------------------------------------------------------------------------------------------
def make_config(family: str, base: Path, data_dirs, out: Path, **sections) -> TrainConfig:
    return tiny_train_config(family, base, data_dirs, out, defaults=FLOW_RUN, **sections)


def test_flux_dev_lora_with_clip_trains_and_loads_in_diffusers(tmp_path_factory, data_dirs):
    base = tiny_flow_pipeline_dir("flux-dev", tmp_path_factory)
    cfg = make_config(
        "flux", base, data_dirs, tmp_path_factory.mktemp("flux_lora"),
        lora={"train_text_encoders": {"text_encoder": True}}, data={"cache_text_embeddings": False},
    )  # fmt: skip
    result = train(cfg, show_progress=False)
    assert_adapters_trained(result)
    clip_b = [p for n, p in result.components["text_encoder"].named_parameters() if ".lora_B." in n]
    assert clip_b and all(p.abs().sum() > 0 for p in clip_b)
    check_lora_file_reproduces("flux", base, result, ("transformer", "text_encoder"))


def test_sd3_lora_trains_and_loads_in_diffusers(tmp_path_factory, data_dirs):
    base = tiny_flow_pipeline_dir("sd3", tmp_path_factory)
    result = train(make_config("sd3", base, data_dirs, tmp_path_factory.mktemp("sd3_lora")), show_progress=False)
    # The last joint block is context_pre_only: its text-token queries feed nothing.
    assert_adapters_trained(result, idle=("transformer_blocks.2.attn.add_q_proj",))
    check_lora_file_reproduces("sd3", base, result, ("transformer",))


# ---- bad input --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "sections, key",
    [
        ({"training": {"min_snr_gamma": 5.0}}, "training.min_snr_gamma"),
        ({"training": {"prediction_type": "epsilon"}}, "training.prediction_type"),
        ({"sampling": {"sampler": "ddim"}}, "sampling.sampler"),
        ({"lora": {"train_text_encoders": {"text_encoder_2": True}}, "data": {"cache_text_embeddings": False}},
         "lora.train_text_encoders.text_encoder_2"),
    ],
)
def test_flow_family_config_errors_name_the_key(tmp_path, sections, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        make_config("flux", tmp_path, (tmp_path, tmp_path), tmp_path, **sections)


def test_wrong_family_for_folder_is_a_clear_error(tmp_path_factory):
    base = tiny_flow_pipeline_dir("sd3", tmp_path_factory)
    with pytest.raises(ValueError, match="holds a StableDiffusion3Pipeline, not a flux pipeline"):
        get_family("flux").load(base)


def test_chroma_lora_trains_and_loads_in_diffusers(tmp_path_factory, data_dirs):
    base = tiny_flow_pipeline_dir("chroma", tmp_path_factory)
    result = train(make_config("chroma", base, data_dirs, tmp_path_factory.mktemp("chroma_lora")), show_progress=False)
    assert_adapters_trained(result)
    check_lora_file_reproduces("chroma", base, result, ("transformer",))


@pytest.mark.parametrize("kind, family_name", [("chroma", "chroma"), ("sd3", "sd3"), ("zimage", "zimage"),
                                              ("qwen-image", "qwenimage")])
def test_flow_full_finetune_saves_a_diffusers_folder(tmp_path_factory, data_dirs, kind, family_name):
    """Full finetune on the flow families: Muon_adv on the transformer's matrices, the saved folder reloads with
    exactly the trained transformer and untouched other components."""
    base = tiny_flow_pipeline_dir(kind, tmp_path_factory)
    out = tmp_path_factory.mktemp(f"{kind}_ft")
    cfg = make_config(family_name, base, data_dirs, out, method="finetune", validation={"every_n_steps": 0, "folder": None})
    result = train(cfg, show_progress=False)
    assert result.steps == 2 and math.isfinite(result.final_loss)
    family = get_family(family_name)
    fresh, saved = family.load(base), family.load(out / "run")
    trained = result.components["transformer"].state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in saved["transformer"].state_dict().items())
    moved = [k for k, v in fresh["transformer"].state_dict().items() if not torch.equal(v, trained[k])]
    # attention matrices moved, not just the Adam side (Z-Image names its blocks' attention "attention")
    assert any(k.endswith(".weight") and ("attn" in k or "attention" in k) for k in moved)
    for name in ("vae", *family.text_encoders):
        fresh_sd = fresh[name].state_dict()
        assert all(torch.equal(v, fresh_sd[k]) for k, v in saved[name].state_dict().items()), f"{name} changed"
