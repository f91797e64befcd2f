"""The generic training loop: a step is a small function of (batch, state); everything else is an event hook.

`train_step(parts, batch)` runs one micro-batch (forward, backward, and on the last micro-batch of an accumulation
window: clipping, optimizer and LR-scheduler step). `run_loop` feeds batches, counts optimizer steps in `TrainState`
and calls the hooks (logging, sampling, validation, saving, later checkpointing) when a step completes. Nothing
here knows the model type: the family and the objective answer every model-specific question.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tuneonce.model.families.base import ModelFamily, TextEmbeddings
from tuneonce.trainer.concepts import adapters_off, concept_loss, needs_concept_loss
from tuneonce.model.masked_loss import latent_weights
from tuneonce.model.objective import make_noise


@dataclass
class TrainState:
    """What a resumed run needs besides weights and optimizer: counters and the noise generator's state."""

    step: int = 0  # completed optimizer steps
    epoch: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.epoch = int(state["step"]), int(state["epoch"])


class StopTraining(Exception):
    """Raised by a step hook to end the run after that step, without the end hooks (the run is not finished):
    Ctrl-C / SIGTERM once the step's checkpoint is written. `checkpoint` is where the run can resume from."""

    def __init__(self, step: int, checkpoint: Any = None) -> None:
        super().__init__(f"stopped after step {step}")
        self.step, self.checkpoint = step, checkpoint


@dataclass
class StepParts:
    """The fixed pieces a step works with (built once by train.py)."""

    family: ModelFamily
    components: dict[str, Any]
    objective: Any
    accelerator: Any  # accelerate.Accelerator
    optimizer: torch.optim.Optimizer  # what the loop steps: accelerate's wrapper only where it has work to do
    lr_scheduler: Any
    trained_modules: Sequence[torch.nn.Module]  # backbone first, then trained text encoders
    params: list[torch.Tensor]
    generator: torch.Generator
    max_grad_norm: float | None = None
    noise_offset: float = 0.0
    train_text: bool = False  # text encoders are trained: encode captions with gradients
    dtype: torch.dtype = torch.float32
    guard: Any = None  # trainer.guard.NonFiniteGuard: undoes non-finite steps (None: unguarded, e.g. benchmarks)

    @property
    def backbone(self) -> torch.nn.Module:
        return self.trained_modules[0]


def batch_latents(parts: StepParts, batch: dict[str, Any]) -> torch.Tensor:
    device = parts.accelerator.device
    if "latents" in batch:
        return batch["latents"].to(device, parts.dtype, non_blocking=True)
    with torch.no_grad():  # the latent distribution's mean, as the latent cache stores it
        vae = parts.components["vae"]
        return parts.family.encode_latents(vae, batch["pixel_values"].to(device, non_blocking=True)).to(parts.dtype)


def cached_text_to(text: TextEmbeddings, device: torch.device, dtype: torch.dtype) -> TextEmbeddings:
    """Cached text embeddings (stored in float32) on `device`, floating ones in the backbone's `dtype`."""
    return {k: v.to(device, dtype if v.is_floating_point() else v.dtype, non_blocking=True) for k, v in text.items()}


def batch_text(parts: StepParts, batch: dict[str, Any]) -> TextEmbeddings:
    if "text_embeddings" in batch:  # cached by the data pipeline
        return cached_text_to(batch["text_embeddings"], parts.accelerator.device, parts.dtype)
    captions = list(batch["caption"])
    if parts.train_text:
        return parts.family.encode_text(parts.components, captions)
    with torch.no_grad():
        return parts.family.encode_text(parts.components, captions)


def draw_noise(parts: StepParts, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise and timesteps of this process's samples. Under DDP every process draws them for the whole global batch
    from the same generator and keeps its own slice (the sampler gives rank r the r-th slice of each global batch), so
    N processes train on exactly the noise one process with the global batch would draw."""
    world, rank = parts.accelerator.num_processes, parts.accelerator.process_index
    n = latents.shape[0]
    everyone = latents if world == 1 else latents.new_empty((n * world, *latents.shape[1:]))
    noise = make_noise(everyone, parts.generator, parts.noise_offset)
    timesteps = parts.objective.sample_timesteps(
        everyone.shape[0], parts.generator, latents.device, latent_shape=tuple(everyone.shape)
    )  # flow objectives shift by resolution
    if world == 1:
        return noise, timesteps
    mine = slice(rank * n, (rank + 1) * n)
    return noise[mine], timesteps[mine]


def compute_loss(parts: StepParts, batch: dict[str, Any]) -> torch.Tensor:
    latents = batch_latents(parts, batch)
    text = batch_text(parts, batch)
    noise, timesteps = draw_noise(parts, latents)
    noisy = parts.objective.add_noise(latents, noise, timesteps)
    conditioning = parts.family.conditioning(batch, text, latents.device, parts.dtype)
    prediction = parts.family.predict(parts.backbone, noisy, timesteps, text, conditioning)
    weights = latent_weights(batch.get("mask_weights"), latents)  # data.masked_loss; None without masks
    if not needs_concept_loss(batch):
        return parts.objective.loss(prediction, latents, noise, timesteps, weights)

    def base_prediction() -> torch.Tensor:  # a regularization concept's prior prediction (trainer/concepts.py)
        with adapters_off(parts.trained_modules):
            base_text, base_conditioning = text, conditioning
            if parts.train_text and "text_embeddings" not in batch:  # trained text encoders: their base output too
                base_text = batch_text(parts, batch)
                base_conditioning = parts.family.conditioning(batch, base_text, latents.device, parts.dtype)
            return parts.family.predict(parts.backbone, noisy, timesteps, base_text, base_conditioning)

    return concept_loss(parts.objective, batch, prediction, latents, noise, timesteps, weights, base_prediction)


def train_step(parts: StepParts, batch: dict[str, Any]) -> torch.Tensor:
    """One micro-batch; clipping and the optimizer/scheduler step run when the accumulation window is complete.

    The trained modules were prepared by accelerate, so their forward already runs under the configured autocast
    (and DDP syncs gradients only on the last micro-batch inside `accumulate`).
    """
    accelerator = parts.accelerator
    with accelerator.accumulate(*parts.trained_modules):
        loss = compute_loss(parts, batch)
        accelerator.backward(loss)  # divides by the accumulation steps; scales the loss for fp16
        if accelerator.sync_gradients:
            average_text_encoder_grads(parts)
            guard = parts.guard
            grad_norm = None
            if guard is not None:
                guard.before_step()
            if parts.max_grad_norm is not None:
                grad_norm = accelerator.clip_grad_norm_(parts.params, parts.max_grad_norm)
            lr = parts.optimizer.param_groups[0]["lr"]
            grad_norm = grad_norm if isinstance(grad_norm, torch.Tensor) else None
            if guard is None or guard.may_step(loss, grad_norm, lr):
                parts.optimizer.step()
            parts.lr_scheduler.step()
            if guard is not None:  # one host sync; a non-finite step is undone here (trainer/guard.py)
                guard.after_step(guard.step, loss, grad_norm, lr)
            parts.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def average_text_encoder_grads(parts: StepParts) -> None:
    """Under DDP, average the gradients of trained text encoders over the processes (one all_reduce).

    Families encode text with the pipeline's own modules, not with accelerate's DDP wrappers, and DDP averages only
    gradients whose forward went through its wrapper (the backbone's). Gradients DDP did average are unchanged by a
    second average (they are equal on every process).
    """
    if parts.accelerator.num_processes == 1 or len(parts.trained_modules) < 2:
        return
    grads = [p.grad for m in parts.trained_modules[1:] for p in m.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= parts.accelerator.num_processes
    torch._foreach_copy_(grads, [chunk.view_as(g) for chunk, g in zip(flat.split([g.numel() for g in grads]), grads)])


StepHook = Callable[[TrainState, torch.Tensor], None]


@dataclass
class LoopHooks:
    """Called after each completed optimizer step with the state and that step's last micro-batch loss."""

    on_step: list[StepHook] = field(default_factory=list)
    on_end: list[Callable[[TrainState], None]] = field(default_factory=list)


def endless(batches: Callable[[], Iterable[dict[str, Any]]], state: TrainState) -> Iterator[dict[str, Any]]:
    """Batches across epochs: `batches()` yields the rest of the current epoch each call."""
    while True:
        empty = True
        for batch in batches():
            empty = False
            yield batch
        if empty:
            raise ValueError("data: the data loader yielded no batch")
        state.epoch += 1


def run_loop(
    parts: StepParts,
    batches: Iterator[dict[str, Any]],
    state: TrainState,
    *,
    total_steps: int,
    hooks: LoopHooks,
    step_fn: Callable[[StepParts, dict[str, Any]], torch.Tensor] = train_step,
) -> TrainState:
    for module in parts.trained_modules:
        module.train()
    accelerator = parts.accelerator
    while state.step < total_steps:
        if parts.guard is not None:
            parts.guard.step = state.step + 1
        loss = step_fn(parts, next(batches))
        if not accelerator.sync_gradients:
            continue
        state.step += 1
        for hook in hooks.on_step:
            hook(state, loss)
    for hook in hooks.on_end:
        hook(state)
    return state
