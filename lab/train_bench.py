"""Steps/s of tuneonce's loop vs a minimal hand-written diffusers loop: same model, batch and optimizer, one process.

Our side is the real thing: `build_run` (accelerate, the family hooks, the objective, the data loader with cached
latents and text embeddings) driven by `run_loop` with per-step metrics logging to JSONL. The reference is what a
user would write by hand from the diffusers training examples: DDPMScheduler.add_noise, the UNet forward, an MSE,
backward, optimizer step, zero_grad, fed with the same cached batches (pre-collated, so it pays no data-loader
cost). Both get a fresh copy of the base model with the same LoRA layers and an optimizer built by the same
factory. Rounds alternate between the two so that machine noise hits both alike; the ratio is the median of the
per-round ratios (ours / reference, ≥ 1 means ours is as fast).
"""
from __future__ import annotations

import itertools
import statistics
import tempfile
import time
from typing import Any

import torch

from tuneonce.trainer.loop import LoopHooks, TrainState, endless, run_loop
from tuneonce.trainer.metrics import MetricsLogger
from tuneonce.trainer.train import DTYPES, build_run, param_infos_for


def _reference_setup(run) -> tuple[Any, Any, list[dict[str, torch.Tensor]], Any]:
    """A fresh UNet with the same LoRA layers, the same optimizer, and the run's batches pre-collated."""
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    from tuneonce.optimizer.factory import build_optimizer

    config, family = run.config, run.family
    components = family.load(
        config.model.base_model, dtype=DTYPES[config.model.train_dtype], components_from=config.model.components_from
    )
    unet = components["unet"].to(run.parts.accelerator.device)
    unet.requires_grad_(False)
    lora_layers = sorted(
        name.removesuffix(".lora_A.default") for name, _ in run.components["unet"].named_modules() if name.endswith(".lora_A.default")
    )
    rank, alpha = config.lora.rank, config.lora.effective_alpha
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True, target_modules=lora_layers))
    optimizer = build_optimizer(config.optimizer, param_infos_for(config, {"unet": unet}, family.pipeline_class_name))
    noise_scheduler = DDPMScheduler.from_config(components["scheduler"].config)
    device = run.parts.accelerator.device
    batches = []
    for batch in itertools.islice(iter(run.loader), 8):
        text = batch["text_embeddings"]
        size = batch["latents"].shape[0]
        time_ids = torch.cat([batch["original_size"], batch["crop_top_left"], batch["target_size"]], dim=1).float()
        batches.append({
            "latents": batch["latents"].to(device), "encoder_hidden_states": text["encoder_hidden_states"].to(device),
            "text_embeds": text["pooled"].to(device), "time_ids": time_ids.to(device), "size": size,
        })  # fmt: skip
    return unet, optimizer, batches, noise_scheduler


def _reference_steps(unet, optimizer, batches, noise_scheduler, steps: int) -> float:
    """The hand-written loop; returns steps/s."""
    unet.train()
    started = time.perf_counter()
    for batch in itertools.islice(itertools.cycle(batches), steps):
        latents = batch["latents"]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch["size"],), device=latents.device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(
            noisy, timesteps, encoder_hidden_states=batch["encoder_hidden_states"],
            added_cond_kwargs={"text_embeds": batch["text_embeds"], "time_ids": batch["time_ids"]},
        ).sample  # fmt: skip
        loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps / (time.perf_counter() - started)


def run_benchmark(config: Any, *, steps: int = 20, rounds: int = 5, warmup: int = 5) -> dict[str, Any]:
    """`config`: a TrainConfig with cached latents and text embeddings (the demo preset); periodic events
    (validation, sampling, saves) are turned off because they are not per-step costs."""
    if not (config.data.cache_latents and config.data.cache_text_embeddings):
        raise ValueError("bench: the benchmark compares steps on cached latents and text embeddings; enable both caches")
    with tempfile.TemporaryDirectory() as tmp:
        config = config.model_copy(deep=True)
        config.saving.output_dir = tmp
        config.validation.every_n_steps = 0
        config.sampling.every_n_steps = 0
        config.training.max_grad_norm = None  # the reference loop does not clip
        config.schedule.max_steps = warmup + rounds * steps
        run = build_run(config)
        reference = _reference_setup(run)
        metrics = MetricsLogger(run.paths.log_dir, tensorboard=False, jsonl=True)
        optimizer = run.parts.optimizer

        def log_step(state: TrainState, loss: torch.Tensor) -> None:  # what train()'s hook does every step
            metrics.log(state.step, {"loss": float(loss), "lr": optimizer.param_groups[0]["lr"], "epoch": state.epoch})

        state = TrainState()
        batches = endless(lambda: run.loader, state)
        hooks = LoopHooks(on_step=[log_step])

        def ours(n: int) -> float:
            started = time.perf_counter()
            run_loop(run.parts, batches, state, total_steps=state.step + n, hooks=hooks)
            return n / (time.perf_counter() - started)

        ours(warmup)
        _reference_steps(*reference, warmup)
        per_round = []
        for _ in range(rounds):
            per_round.append((ours(steps), _reference_steps(*reference, steps)))
        metrics.close()
    ours_rates = [a for a, _ in per_round]
    ref_rates = [b for _, b in per_round]
    return {
        "model": f"{config.model.family} {config.model.base_model}",
        "method": config.method,
        "optimizer": config.optimizer.type,
        "lora_rank": config.lora.rank,
        "batch_size": config.training.batch_size,
        "resolution": config.data.resolution,
        "steps_per_round": steps,
        "rounds": rounds,
        "torch_threads": torch.get_num_threads(),
        "device": str(run.parts.accelerator.device),
        "ours_steps_per_s": statistics.median(ours_rates),
        "reference_steps_per_s": statistics.median(ref_rates),
        "ratio": statistics.median(a / b for a, b in per_round),
        "per_round": [{"ours": a, "reference": b} for a, b in per_round],
    }
