"""Measured memory of one LoRA training step on reduced-depth real architectures (calibration, tests, bench).

`reduced_model("flux-dev", blocks=2, heads=4)` builds the real diffusers class from the bundled published config
(modules/model/configs) with fewer blocks and heads; `measure_step` runs one forward + backward + optimizer step
and reports bytes by kind, the activations counted exactly by modules/model/activations.py.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from tuneonce.model.activations import SavedActivations
from tuneonce.model.builtin import BUILTINS, build_from_config, load_config
from tuneonce.model.quantize import quantize_linears, weight_bytes_by_dtype

REDUCIBLE = ("flux-dev", "qwen-image", "sdxl")


def reduced_model(arch: str, *, blocks: int = 2, heads: int = 4, seed: int = 0) -> nn.Module:
    """The backbone of a built-in architecture with `blocks` blocks per block list and `heads` attention heads
    (SDXL: channels 64/128/256, transformer depth 1/1/blocks); float32 on CPU, seeded."""
    if arch not in REDUCIBLE:
        raise ValueError(f"--model: expected one of {', '.join(REDUCIBLE)}, got {arch!r}")
    stem = BUILTINS[arch].components["unet" if arch == "sdxl" else "transformer"]
    config = dict(load_config(stem))
    if arch == "sdxl":
        config.update(block_out_channels=[64, 128, 256], transformer_layers_per_block=[1, 1, blocks],
                      attention_head_dim=[1, 2, heads], cross_attention_dim=256, addition_time_embed_dim=32,
                      projection_class_embeddings_input_dim=256 + 6 * 32)  # fmt: skip
    else:
        config.update(num_layers=blocks, num_attention_heads=heads, joint_attention_dim=256)
        if "num_single_layers" in config:
            config.update(num_single_layers=blocks, pooled_projection_dim=64)
    torch.manual_seed(seed)
    return build_from_config(config, device="cpu")


def step_inputs(model: nn.Module, resolution: int, batch: int, text_tokens: int, seed: int = 0) -> dict:
    """Forward keyword arguments at `resolution` px (latents 8x smaller, DiTs pack 2x2 patches)."""
    g = torch.Generator().manual_seed(seed)
    cls, cfg = type(model).__name__, model.config
    side = resolution // 16
    if cls == "UNet2DConditionModel":
        lat = resolution // 8
        return dict(sample=torch.randn(batch, cfg.in_channels, lat, lat, generator=g),
                    timestep=torch.full((batch,), 500),
                    encoder_hidden_states=torch.randn(batch, text_tokens, cfg.cross_attention_dim, generator=g),
                    added_cond_kwargs={"text_embeds": torch.randn(batch, 256, generator=g),
                                       "time_ids": torch.randn(batch, 6, generator=g)}, return_dict=False)  # fmt: skip
    hidden = torch.randn(batch, side * side, cfg.in_channels, generator=g)
    text = torch.randn(batch, text_tokens, cfg.joint_attention_dim, generator=g)
    if cls == "QwenImageTransformer2DModel":
        return dict(hidden_states=hidden, encoder_hidden_states=text, timestep=torch.full((batch,), 0.4),
                    encoder_hidden_states_mask=torch.ones(batch, text_tokens, dtype=torch.long),
                    img_shapes=[(1, side, side)] * batch, return_dict=False)  # fmt: skip
    grid = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(side * 1.0), torch.arange(side * 1.0),
                                      indexing="ij"), -1).reshape(-1, 3)  # fmt: skip
    out = dict(hidden_states=hidden, encoder_hidden_states=text, timestep=torch.full((batch,), 0.4), img_ids=grid,
               txt_ids=torch.zeros(text_tokens, 3),
               pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
               return_dict=False)  # fmt: skip
    if cfg.guidance_embeds:
        out["guidance"] = torch.full((batch,), 3.5)
    return out


def add_default_lora(model: nn.Module, rank: int) -> None:
    """Freeze `model` and put a LoRA of `rank` on its default targets, through the trainer's injection."""
    from tuneonce.model.adapters import LoraSettings, add_lora
    from tuneonce.model.builtin import default_lora_targets

    settings = LoraSettings(rank=rank, alpha=rank, targets=tuple(default_lora_targets(model)))
    add_lora(model, settings, component=type(model).__name__)


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class StepMeasure:
    weights: dict[str, int]
    adapters: int
    gradients: int
    optimizer_state: int
    activations: int
    seconds: float
    loss: float

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def peak(self) -> int:
        return self.weight_bytes + self.adapters + self.gradients + self.optimizer_state + self.activations


def _block_names(model: nn.Module) -> list[str]:
    from tuneonce.model.offload import block_names

    if type(model).__name__ == "UNet2DConditionModel":
        return [n for n, m in model.named_modules() if type(m).__name__ in ("ResnetBlock2D", "BasicTransformerBlock")]
    return block_names(model)


def measure_step(model: nn.Module, inputs: dict, *, mode: str = "none", rank: int = 4, optimizer: str = "adamw",
                 checkpointing: bool = False, offload_blocks: int = 0, steps: int = 1) -> StepMeasure:
    """Quantize `model` (in place), add a LoRA on the default targets, run one training step on CPU; bytes by kind.

    Activations: without checkpointing, the saved-tensor bytes (exact). With it, what the checkpointed forward still
    saves (the block inputs the checkpoints hold, the layers outside the blocks) + the largest block's saved bytes
    (measured by a forward without checkpointing first): the backward recomputes one block at a time.
    `offload_blocks`: the first N blocks stream through modules/model/offload.py; weights then count what is on
    the compute device at most.
    `steps` > 1: `seconds` is the median time of the steps after the first."""
    quantize_linears(model, mode)
    add_default_lora(model, rank)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    else:
        opt = torch.optim.SGD(trainable, lr=1e-4, momentum=0.9)
    blocks = _block_names(model)
    largest_block = 0
    if checkpointing or offload_blocks:
        with SavedActivations(model, blocks) as probe:
            model(**inputs)
        largest_block = max(probe.per_block.values())
        model.enable_gradient_checkpointing()
    offloader = None
    if offload_blocks:
        from tuneonce.model.offload import BlockOffloader, block_names

        order = block_names(model)
        offloader = BlockOffloader(model, order[:offload_blocks], storage="cpu", compute="cpu", order=order)
    weights = weight_bytes_by_dtype(model)
    adapters = _tensor_bytes(trainable)
    weights[str(trainable[0].dtype).removeprefix("torch.")] -= adapters
    started = time.perf_counter()
    with SavedActivations(model, blocks) as saved:
        out = model(**inputs)[0]
        loss = out.float().pow(2).mean()
    loss.backward()
    opt.step()
    times = [time.perf_counter() - started]
    for _ in range(steps - 1):
        started = time.perf_counter()
        opt.zero_grad()
        model(**inputs)[0].float().pow(2).mean().backward()
        opt.step()
        times.append(time.perf_counter() - started)
    seconds = sorted(times[1:])[len(times[1:]) // 2] if steps > 1 else times[0]
    activations = saved.total
    if checkpointing or offload_blocks:
        activations += largest_block
    if offloader is not None:
        if offloader.peak_resident_bytes != offloader.offloaded_bytes():
            weights["offloaded (in CPU memory)"] = offloader.peak_resident_bytes - offloader.offloaded_bytes()
        offloader.remove()
    state = _tensor_bytes(t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.ndim)
    return StepMeasure(weights, adapters, adapters, state, activations, seconds, float(loss.detach()))


__all__ = ["REDUCIBLE", "StepMeasure", "add_default_lora", "measure_step", "reduced_model", "step_inputs"]
