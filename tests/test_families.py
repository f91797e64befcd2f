"""Model families, objective, LR schedules, adapters and the optimizer factory, checked against diffusers' own code."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from tuneonce.config.schema import OptimizerConfig
from tuneonce.model.adapters import LoraSettings, add_lora, check_dora_compatible, lora_target_names
from tuneonce.model.families import family_of_pipeline, get_family
from tuneonce.optimizer.factory import OptimizerChain, build_optimizer
from tuneonce.optimizer.groups import peft_param_infos
from tuneonce.model.objective import DiffusionObjective, make_noise
from tuneonce.trainer.schedule import build_lr_scheduler, schedule_factor


@pytest.fixture(scope="module")
def sdxl(sdxl_base):
    return get_family("sdxl").load(sdxl_base)


# ---- objective ------------------------------------------------------------------------------------------------------
def _ddpm():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def test_noising_and_v_target_match_diffusers():
    sched = _ddpm()
    obj = DiffusionObjective(sched.alphas_cumprod, prediction_type="v_prediction")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(obj.add_noise(x0, noise, t), sched.add_noise(x0, noise, t))
    torch.testing.assert_close(obj.target(x0, noise, t), sched.get_velocity(x0, noise, t))
    assert torch.equal(DiffusionObjective(sched.alphas_cumprod).target(x0, noise, t), noise)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_min_snr_weights(kind):
    a = _ddpm().alphas_cumprod
    obj = DiffusionObjective(a, prediction_type=kind, min_snr_gamma=5.0)
    t = torch.tensor([10, 300, 900])
    snr = a[t] / (1 - a[t])
    expected = torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr if kind == "epsilon" else snr + 1)
    torch.testing.assert_close(obj.loss_weights(t), expected)
    if kind == "epsilon":  # below gamma the weight is 1: plain MSE
        assert obj.loss_weights(torch.tensor([999]))[0].item() == pytest.approx(1.0)
    # the weighted loss is the weighted mean of per-sample MSEs
    pred, x0, noise = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    per_sample = ((pred - obj.target(x0, noise, t)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(obj.loss(pred, x0, noise, t), (per_sample * expected).mean())


def test_timestep_sampling_distributions():
    a = _ddpm().alphas_cumprod
    g = torch.Generator().manual_seed(0)
    uniform = DiffusionObjective(a).sample_timesteps(20000, g, torch.device("cpu")).float()
    assert uniform.min() >= 0 and uniform.max() <= 999
    assert uniform.mean().item() == pytest.approx(499.5, abs=10)
    logit = DiffusionObjective(a, timestep_sampling="logit_normal", logit_mean=0.5, logit_std=0.8)
    u = (logit.sample_timesteps(20000, g, torch.device("cpu")).float() + 0.5) / 1000
    z = torch.log(u / (1 - u))
    assert z.mean().item() == pytest.approx(0.5, abs=0.03)
    assert z.std().item() == pytest.approx(0.8, abs=0.03)
    with pytest.raises(ValueError, match="timestep_sampling"):
        DiffusionObjective(a, timestep_sampling="cubic").sample_timesteps(2, g, torch.device("cpu"))


def test_noise_offset_shifts_channel_means():
    latents = torch.zeros(64, 4, 16, 16)
    plain = make_noise(latents, torch.Generator().manual_seed(1))
    offset = make_noise(latents, torch.Generator().manual_seed(1), noise_offset=0.5)
    shift = offset - plain
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift))  # one constant per (sample, channel)
    assert shift[:, :, 0, 0].std().item() == pytest.approx(0.5, abs=0.1)


# ---- schedules ------------------------------------------------------------------------------------------------------
def test_schedule_factors():
    f = lambda step, kind: schedule_factor(step, kind=kind, warmup_steps=4, total_steps=14)  # noqa: E731
    assert [f(s, "constant") for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert f(4, "linear") == 1.0 and f(9, "linear") == pytest.approx(0.5) and f(14, "linear") == 0.0
    assert f(9, "cosine") == pytest.approx(0.5) and f(6, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    assert f(100, "constant") == 1.0
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    sched = build_lr_scheduler(opt, kind="linear", warmup_steps=4, total_steps=14)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])
    with pytest.raises(ValueError, match="scheduler"):
        schedule_factor(5, kind="exponential", warmup_steps=0, total_steps=10)


# ---- families -------------------------------------------------------------------------------------------------------
def test_registry_and_folder_checks(sdxl_base, tmp_path):
    with pytest.raises(ValueError, match="unknown family 'flux2'"):
        get_family("flux2")
    with pytest.raises(ValueError, match="holds a StableDiffusionXLPipeline, not a sd15"):
        get_family("sd15").load(sdxl_base)
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        get_family("sdxl").load(tmp_path)
    from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline

    for cls, name in ((StableDiffusionXLPipeline, "sdxl"), (StableDiffusion3Pipeline, "sd3")):
        assert family_of_pipeline(cls.__new__(cls)).name == name  # matched by class, no weights needed
    with pytest.raises(ValueError, match="no model family uses the pipeline class object"):
        family_of_pipeline(object())


def test_sdxl_text_and_conditioning_match_the_pipeline(sdxl):
    family = get_family("sdxl")
    pipe = family.build_pipeline(sdxl)
    captions = ["a red circle", "a zxq star on a blue background"]
    with torch.no_grad():
        ours = family.encode_text(sdxl, captions)
        embeds, _, pooled, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False)
    torch.testing.assert_close(ours["encoder_hidden_states"], embeds)
    torch.testing.assert_close(ours["pooled"], pooled)
    batch = {"original_size": torch.tensor([[96, 80]] * 2), "crop_top_left": torch.tensor([[8, 0]] * 2),
             "target_size": torch.tensor([[64, 64]] * 2)}  # fmt: skip
    cond = family.conditioning(batch, ours, torch.device("cpu"), torch.float32)
    expected = pipe._get_add_time_ids(
        (96, 80), (8, 0), (64, 64), dtype=torch.float32, text_encoder_projection_dim=sdxl["text_encoder_2"].config.projection_dim
    )
    torch.testing.assert_close(cond["added_cond_kwargs"]["time_ids"], expected.expand(2, -1))


def test_objective_reads_prediction_type(sdxl):
    family = get_family("sdxl")
    assert family.build_objective(sdxl).prediction_type == sdxl["scheduler"].config.prediction_type
    assert family.build_objective(sdxl, prediction_type="v_prediction").prediction_type == "v_prediction"


# ---- adapters -------------------------------------------------------------------------------------------------------
def test_lora_targets_filter_and_freeze(sdxl_base):
    family = get_family("sdxl")
    unet = family.load(sdxl_base)["unet"]
    presets = family.backbone_target_presets()
    attn = lora_target_names(unet, presets["attn"])
    assert attn and all(n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or n.endswith("to_out.0") for n in attn)
    every = lora_target_names(unet, None, within=family.backbone_blocks)
    assert set(attn) < set(every) and not any(n.startswith("time_embedding") for n in every)
    only_up = lora_target_names(unet, presets["default"], layer_filter=r"^up_blocks\.")
    assert only_up and all(n.startswith("up_blocks.") for n in only_up)
    names = add_lora(unet, LoraSettings(rank=2, alpha=2, targets=presets["default"], layer_filter=r"^up_blocks\."), component="unet")
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".lora_")[0] for n in trainable} == set(names)
    with pytest.raises(ValueError, match="no layer of unet matches"):
        add_lora(unet, LoraSettings(targets=("nonexistent",)), component="unet")


def test_dora_with_spectral_scaling_is_an_error_unless_forced():
    with pytest.raises(ValueError, match="lora.dora: DoRA is incompatible with optimizer.spectral_scaling"):
        check_dora_compatible(dora=True, optimizer_type="muon_adv", spectral_scaling=True, force=False)
    check_dora_compatible(dora=True, optimizer_type="muon_adv", spectral_scaling=True, force=True)
    check_dora_compatible(dora=True, optimizer_type="adamw", spectral_scaling=True, force=False)
    check_dora_compatible(dora=True, optimizer_type="muon_adv", spectral_scaling=False, force=False)


# ---- optimizer factory ----------------------------------------------------------------------------------------------
def _lora_model():
    from peft import LoraConfig

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8))
    model.requires_grad_(False)
    from peft import inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["0", "2"]), model)
    model[1].requires_grad_(True)  # a 1-D parameter for the auxiliary optimizer
    return model


@pytest.mark.parametrize("kind", ["muon_adv", "adamuon_adv", "lora_muon", "adamw", "torch_muon", "prodigy"])
def test_factory_builds_each_optimizer_and_it_trains(kind):
    model = _lora_model()
    infos = peft_param_infos(model, depth=3)
    lr = 1.0 if kind == "prodigy" else 1e-2  # Prodigy's lr multiplies its own step-size estimate
    cfg = OptimizerConfig(type=kind, lr=lr, adam_lr=1e-2, text_encoder_lr={"text_encoder": None if kind == "prodigy" else 5e-3})
    opt = build_optimizer(cfg, infos)
    sched = build_lr_scheduler(opt, kind="constant", warmup_steps=0, total_steps=10)
    trained = {id(i.param) for i in infos}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == trained
    if kind == "torch_muon":
        assert isinstance(opt, OptimizerChain) and set(opt.optimizers) == {"muon", "adamw"}
        assert isinstance(opt.optimizers["muon"], torch.optim.Muon)
        assert all(p.ndim == 2 for g in opt.optimizers["muon"].param_groups for p in g["params"])
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 16, generator=g), torch.randn(64, 8, generator=g)
    losses = []
    for _ in range(10):
        loss = torch.nn.functional.mse_loss(model(x), y)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    assert losses[-1] < losses[0]
    state = opt.state_dict()
    opt.load_state_dict(state)


def test_prodigy_from_the_config_steps_exactly_as_prodigyopt_does():
    """The factory's Prodigy (groups, settings) against prodigyopt's own class built by hand on a copy of the model."""
    from prodigyopt import Prodigy

    cfg = OptimizerConfig(type="prodigy", lr=1.0, weight_decay=0.01, adam_betas=(0.9, 0.99), prodigy_d_coef=2.0,
                          prodigy_use_bias_correction=True, prodigy_safeguard_warmup=True, prodigy_growth_rate=1.5)
    ours, theirs = _lora_model(), _lora_model()
    opt = build_optimizer(cfg, peft_param_infos(ours, depth=3))
    ref = Prodigy([p for p in theirs.parameters() if p.requires_grad], lr=1.0, betas=(0.9, 0.99), weight_decay=0.01,
                  use_bias_correction=True, safeguard_warmup=True, d_coef=2.0, growth_rate=1.5)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 16, generator=g), torch.randn(32, 8, generator=g)
    for _ in range(6):
        for model, optimizer in ((ours, opt), (theirs, ref)):
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
    assert opt.param_groups[0]["d"] == pytest.approx(ref.param_groups[0]["d"], rel=1e-5) and opt.param_groups[0]["d"] > 1e-6
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_factory_errors():
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(OptimizerConfig(), [])
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        build_optimizer(SimpleNamespace(type="sgd", text_encoder_lr=None), peft_param_infos(_lora_model(), depth=1))
