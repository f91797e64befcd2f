"""Predicted peak accelerator memory of a LoRA run, and a picker that fits a budget.

peak = weights (by storage dtype, quantized layers at their stored size; offloaded blocks leave, the two largest
       stay for the streaming) + adapters (LoRA factors) + their gradients + optimizer state (Muon_adv / LoRA-Muon
       1x, AdaMuon / AdamW 2x the adapter bytes, halved with state_dtype bfloat16) + activations.
Activations (what autograd keeps between forward and backward) per residual block are k x batch x tokens x width x
bytes, with k per block class measured on CPU with modules/model/activations.py (saved-tensor bytes, exact): Flux
double block 18.2, single block 17.1, Qwen-Image block 19.0, SDXL transformer block 27 (with its proj_in/out),
ResNet block 5 (of its input bytes). With gradient checkpointing each block keeps only its input (k = 1) and one
block is recomputed at a time. tests/test_memory_plan.py checks the prediction against measured peaks of reduced
real architectures. Not modelled: the allocator's fragmentation and the backward's short-lived temporaries (the
budget picker keeps HEADROOM free for them).

Parked components (modules/trainer/parking.py: the VAE with data.cache_latents, frozen text encoders with
data.cache_text_embeddings) leave the accelerator once the caches are filled, so the training peak leaves them out.
Two other moments can be higher and are counted too: filling the caches (the encoders and VAE alone on the
accelerator, the denoiser arrives after) and sampling (the parked components borrowed back beside the denoiser, its
adapters and the optimizer state; the training activations are freed by then, inference ones are not modelled).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from torch import nn

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Bytes per weight of a quantized Linear: data + per-row float32 scale (int8/float8) or one per 64 (nf4).
QUANT_BYTES = {"bfloat16": 2.0, "float8": 1.0, "int8": 1.0, "nf4": 0.5 + 4 / 64}
OPTIMIZER_STATES = {"muon_adv": 1, "lora_muon": 1, "torch_muon": 1, "adamuon_adv": 2, "adamw": 2}
# Saved-activation bytes of one block / (batch x tokens x width x element bytes), measured on CPU (float32, LoRA on
# the default targets); see the module docstring.
BLOCK_K = {
    "FluxTransformerBlock": 18.2, "FluxSingleTransformerBlock": 17.1, "QwenImageTransformerBlock": 19.0,
    "ChromaSingleTransformerBlock": 17.1, "ChromaTransformerBlock": 18.2, "JointTransformerBlock": 18.5,
    "BasicTransformerBlock": 27.0, "ResnetBlock2D": 5.0,
}  # fmt: skip
DEFAULT_K = 18.5
OUTSIDE_BLOCKS_K = 1.0  # embedders and the final layer, in units of one token x width
# Text tokens the trainer feeds each DiT (T5 512 for Flux/Chroma, 77 + 256 for SD3, a typical Qwen2.5-VL prompt).
TEXT_TOKENS = {"FluxTransformer2DModel": 512, "ChromaTransformer2DModel": 512, "SD3Transformer2DModel": 333,
               "QwenImageTransformer2DModel": 256}  # fmt: skip
MODES = ("none", "bfloat16", "float8", "int8", "nf4")
HEADROOM = 0.10  # of a budget kept free for what the plan does not model (allocator fragmentation, temporaries)


@dataclass
class PlanSettings:
    resolution: int = 1024
    batch: int = 1
    train_dtype: str = "bfloat16"
    activation_dtype: str = "bfloat16"  # bf16 autocast / bf16 weights store bf16 activations
    quantize: dict[str, str] = field(default_factory=dict)  # component -> mode
    lora_rank: int = 16
    optimizer: str = "muon_adv"
    state_dtype: str = "float32"
    checkpointing: bool = False
    offload_blocks: int = 0
    text_tokens: int | None = None
    parked: list[str] = field(default_factory=list)  # components off the accelerator once the caches are filled
    samples: bool = False  # sample images during the run (parked components are borrowed back for it)


@dataclass
class Block:
    name: str
    kind: str
    weight_bytes: float
    tokens: int  # per sample
    width: int


@dataclass
class MemoryPlan:
    weights: dict[str, float]  # storage kind -> bytes on the accelerator
    adapters: float
    gradients: float
    optimizer_state: float
    activations: float
    offload_saves: float
    settings: PlanSettings
    parked: float = 0.0  # bytes of the parked components (in CPU memory while training)
    encoders: float = 0.0  # bytes of every component but the denoiser (on the accelerator while caching)

    @property
    def weight_bytes(self) -> float:
        return sum(self.weights.values())

    @property
    def training_peak(self) -> float:
        return self.weight_bytes + self.adapters + self.gradients + self.optimizer_state + self.activations

    @property
    def caching_peak(self) -> float:
        """Filling the caches: the encoders and VAE on the accelerator before the denoiser is placed."""
        return self.encoders if self.parked else 0.0

    @property
    def sampling_peak(self) -> float:
        """Sampling: the parked components borrowed back; the training activations are freed."""
        if not (self.parked and self.settings.samples):
            return 0.0
        return self.weight_bytes + self.parked + self.adapters + self.gradients + self.optimizer_state

    @property
    def peak(self) -> float:
        return max(self.training_peak, self.caching_peak, self.sampling_peak)

    def as_dict(self) -> dict:
        return {"weights": self.weights, "weight_bytes": self.weight_bytes, "adapters": self.adapters,
                "gradients": self.gradients, "optimizer_state": self.optimizer_state,
                "activations": self.activations, "offload_saves": self.offload_saves, "parked": self.parked,
                "training_peak_bytes": self.training_peak, "caching_peak_bytes": self.caching_peak,
                "sampling_peak_bytes": self.sampling_peak, "peak_bytes": self.peak,
                "settings": asdict(self.settings)}  # fmt: skip


def backbone_name(components: Mapping[str, nn.Module]) -> str:
    for name in ("transformer", "unet"):
        if name in components:
            return name
    raise ValueError(f"no unet/transformer among the components ({', '.join(components)})")


def lora_target_layers(module: nn.Module) -> list[nn.Linear]:
    """The layers the architecture's default LoRA targets hit (those of modules/model/builtin.py)."""
    from tuneonce.model.builtin import default_lora_targets

    suffixes = default_lora_targets(module)
    return [sub for name, sub in module.named_modules()
            if isinstance(sub, nn.Linear) and any(name == s or name.endswith("." + s) for s in suffixes)]  # fmt: skip


def _module_weight_bytes(module: nn.Module, mode: str, dtype_bytes: int) -> dict[str, float]:
    """Storage bytes of a (meta or real) module whose Linear weights are kept in `mode`."""
    from tuneonce.model.quantize import QuantLinear

    out: dict[str, float] = {}
    linear_weights = set()
    for sub in module.modules():
        if isinstance(sub, QuantLinear):
            out[sub.mode] = out.get(sub.mode, 0) + sub.stored_bytes()
            linear_weights.add(id(sub.qdata))
            if sub.qscale is not None:
                linear_weights.add(id(sub.qscale))
        elif type(sub) is nn.Linear and mode != "none":
            n = sub.weight.numel()
            rows = sub.weight.shape[0]
            stored = n * QUANT_BYTES[mode] + (rows * 4 if mode in ("int8", "float8") else 0)
            out[mode] = out.get(mode, 0) + stored
            linear_weights.add(id(sub.weight))
    rest = sum(p.numel() for p in [*module.parameters(), *module.buffers()] if id(p) not in linear_weights)
    float_key = {4: "float32", 2: "bfloat16"}.get(dtype_bytes, f"{dtype_bytes}B")
    out[float_key] = out.get(float_key, 0) + rest * dtype_bytes
    return out


def residual_blocks(backbone: nn.Module, resolution: int, text_tokens: int | None) -> list[Block]:
    """The backbone's residual blocks with the tokens and width each processes at `resolution` (per sample)."""
    config = dict(getattr(backbone, "config", {}))
    cls = type(backbone).__name__
    blocks = []
    if "UNet" in cls:
        channels = list(config["block_out_channels"])
        side = resolution // 8
        for name, sub in backbone.named_modules():
            kind = type(sub).__name__
            if kind not in ("ResnetBlock2D", "BasicTransformerBlock"):
                continue
            level = _unet_level(name, len(channels))
            tokens = (side // 2**level) ** 2
            width = channels[level] * (2 if name.startswith("up_blocks.") and kind == "ResnetBlock2D" else 1)
            blocks.append(Block(name, kind, _bytes_of(sub), tokens, width))
        return blocks
    width = config.get("num_attention_heads", 1) * config.get("attention_head_dim", 1)
    text = text_tokens if text_tokens is not None else TEXT_TOKENS.get(cls, 256)
    image = (resolution // 16) ** 2  # 8x VAE, 2x2 patches (Flux/Qwen pack latents, SD3/Z-Image patch_size 2)
    for name, sub in backbone.named_children():
        if isinstance(sub, nn.ModuleList):
            for i, block in enumerate(sub):
                blocks.append(Block(f"{name}.{i}", type(block).__name__, _bytes_of(block), image + text, width))
    return blocks


def _unet_level(name: str, levels: int) -> int:
    parts = name.split(".")
    if parts[0] == "down_blocks":
        return int(parts[1])
    if parts[0] == "up_blocks":
        return levels - 1 - int(parts[1])
    return levels - 1  # mid block


def _bytes_of(module: nn.Module) -> float:
    return float(sum(p.numel() * p.element_size() for p in [*module.parameters(), *module.buffers()]))


def activation_bytes(blocks: list[Block], settings: PlanSettings) -> float:
    per = settings.batch * DTYPE_BYTES[settings.activation_dtype]
    units = [b.tokens * b.width for b in blocks]
    ks = [BLOCK_K.get(b.kind, DEFAULT_K) for b in blocks]
    outside = OUTSIDE_BLOCKS_K * (max(units) if units else 0)
    if not settings.checkpointing:
        return per * (sum(k * u for k, u in zip(ks, units)) + outside)
    # checkpointed: each block keeps its input; the backward recomputes one block at a time
    return per * (sum(units) + max((k * u for k, u in zip(ks, units)), default=0) + outside)


def plan_memory(components: Mapping[str, nn.Module], settings: PlanSettings) -> MemoryPlan:
    """The predicted peak of a LoRA run on `components` (meta or real modules, no LoRA injected yet)."""
    backbone_key = backbone_name(components)
    backbone = components[backbone_key]
    dtype_bytes = DTYPE_BYTES[settings.train_dtype]
    weights: dict[str, float] = {}
    parked = encoders = 0.0
    for name, module in components.items():
        if not isinstance(module, nn.Module):
            continue
        if name == "vae":  # stored in model.vae_dtype, never quantized
            dtype = next((str(t.dtype).removeprefix("torch.") for t in module.parameters()), "float32")
            stored = {dtype: _bytes_of(module)}
        else:
            stored = _module_weight_bytes(module, settings.quantize.get(name, "none"), dtype_bytes)
        if name != backbone_key:
            encoders += sum(stored.values())
        if name in settings.parked:
            parked += sum(stored.values())
            continue
        for key, value in stored.items():
            weights[key] = weights.get(key, 0) + value
    adapters = sum(settings.lora_rank * (m.in_features + m.out_features) for m in lora_target_layers(backbone))
    adapters *= dtype_bytes
    state = adapters * OPTIMIZER_STATES[settings.optimizer] * (0.5 if settings.state_dtype == "bfloat16" else 1.0)
    if dtype_bytes == 2 and settings.state_dtype == "float32":
        state *= 2  # fp32 state for bf16 factors
    blocks = residual_blocks(backbone, settings.resolution, settings.text_tokens)
    saves = offload_saving(backbone, settings)
    if saves:
        weights["offloaded (in CPU memory)"] = -saves
    return MemoryPlan(weights, adapters, adapters, state, activation_bytes(blocks, settings), saves, settings, parked,
                      encoders)  # fmt: skip


def offload_saving(backbone: nn.Module, settings: PlanSettings) -> float:
    """Bytes the offloaded blocks (the first `offload_blocks` of modules/model/offload.py's order: a DiT's blocks, a
    UNet's down/mid/up blocks) free on the accelerator: their stored weights, less the two largest of them (at most
    two are on the device at once: the one computing and the one arriving)."""
    from tuneonce.model.offload import block_names

    names = block_names(backbone)[: settings.offload_blocks]
    if not names:
        return 0.0
    mode = settings.quantize.get("transformer", settings.quantize.get("unet", "none"))
    dtype_bytes = DTYPE_BYTES[settings.train_dtype]
    stored = [sum(_module_weight_bytes(backbone.get_submodule(n), mode, dtype_bytes).values()) for n in names]
    return sum(stored) - sum(sorted(stored)[-2:])


def pick_settings(
    components: Mapping[str, nn.Module], base: PlanSettings, budget_gb: float
) -> tuple[MemoryPlan, list[str]]:
    """The least lossy settings whose predicted peak fits `budget_gb` (GiB, 2^30 bytes) less HEADROOM, trying in
    order: as given; gradient checkpointing; int8 weights (denoiser and the text encoders that stay on the
    accelerator, then the parked ones too; int8 is as small as float8 and 6x more exact on the tiny Flux of
    tests/test_quantize.py), then offloading up to half the blocks; nf4 likewise, then offloading more and more
    blocks. Nothing is made larger than `base` has it: a component's mode changes only to a smaller one, offloading
    only grows, checkpointing is never turned off. Returns the plan and what was changed (empty: it fits as given;
    when nothing fits, the last entry says so: see `fits`)."""
    from tuneonce.model.offload import block_names

    budget = budget_gb * GIB * (1 - HEADROOM)
    backbone = backbone_name(components)
    encoders = [n for n in components if n.startswith("text_encoder")]
    staying = [e for e in encoders if e not in base.parked]
    n_blocks = len(block_names(components[backbone]))
    ckpt = PlanSettings(**{**asdict(base), "checkpointing": True})
    candidates: list[tuple[PlanSettings, str | None]] = [(base, None), (ckpt, None)]
    for mode, most in (("int8", n_blocks // 2), ("nf4", n_blocks)):
        quant = {c: _smaller(base.quantize.get(c, "none"), mode, base.train_dtype) for c in [backbone, *staying]}
        quantized = PlanSettings(**{**asdict(ckpt), "quantize": {**base.quantize, **quant}})
        candidates.append((quantized, mode))
        candidates += [(PlanSettings(**{**asdict(quantized), "offload_blocks": n}), mode)
                       for n in range(2, most + 1, 2) if n > base.offload_blocks]  # fmt: skip
    for settings, mode in candidates:
        tries = [settings]
        if mode is not None and staying != encoders:  # parked encoders count only while caching and sampling
            more = {e: _smaller(base.quantize.get(e, "none"), mode, base.train_dtype) for e in encoders}
            tries.append(PlanSettings(**{**asdict(settings), "quantize": {**settings.quantize, **more}}))
        for settings in tries:
            plan = plan_memory(components, settings)
            if plan.peak <= budget:
                return plan, describe_changes(base, settings, backbone)
    return plan, [*describe_changes(base, settings, backbone),
                  f"does not fit {budget_gb:g} GiB even so (needs {plan.peak / GIB:.1f} GiB)"]


def fits(plan: MemoryPlan, budget_gb: float) -> bool:
    """Whether a plan's peak leaves HEADROOM of `budget_gb` free (what pick_settings aims for)."""
    return plan.peak <= budget_gb * GIB * (1 - HEADROOM)


def _smaller(current: str, mode: str, train_dtype: str) -> str:
    """The smaller storage of two modes (the current one on a tie: int8 does not replace a chosen float8)."""
    size = lambda m: DTYPE_BYTES[train_dtype] if m == "none" else QUANT_BYTES[m]  # noqa: E731
    return mode if size(mode) < size(current) else current


def describe_changes(base: PlanSettings, picked: PlanSettings, backbone: str) -> list[str]:
    """The config lines that turn `base` into `picked` (field: value)."""
    out = ["training.gradient_checkpointing: true"] if picked.checkpointing and not base.checkpointing else []
    for component, mode in picked.quantize.items():
        if base.quantize.get(component, "none") != mode:
            out.append(f"memory.quantize.{'denoiser' if component == backbone else component}: {mode}")
    if picked.offload_blocks != base.offload_blocks:
        out.append(f"memory.offload_blocks: {picked.offload_blocks}")
    return out


def format_plan(plan: MemoryPlan, *, title: str = "") -> str:
    gb = lambda b: f"{b / GIB:8.2f} GiB"  # noqa: E731
    s = plan.settings
    lines = [f"predicted peak accelerator memory{title}: {gb(plan.peak).strip()}",
             f"  at {s.resolution}px, batch {s.batch}, LoRA rank {s.lora_rank}, {s.optimizer}, "
             f"checkpointing {'on' if s.checkpointing else 'off'}, offload_blocks {s.offload_blocks}"]  # fmt: skip
    rows = [(f"weights {key}", value) for key, value in sorted(plan.weights.items(), key=lambda kv: -kv[1])
            if value >= 0]  # the offloaded blocks' negative entry is the "offloading saves" row
    rows += [("adapters (LoRA factors)", plan.adapters), ("adapter gradients", plan.gradients),
             ("optimizer state", plan.optimizer_state), ("activations", plan.activations)]  # fmt: skip
    if plan.offload_saves:
        rows.append(("offloading saves (CPU memory)", -plan.offload_saves))
    if plan.parked:
        rows += [("parked after caching (CPU memory)", plan.parked),
                 ("peak while training", plan.training_peak), ("peak while filling the caches", plan.caching_peak)]
        if s.samples:
            rows.append(("peak while sampling", plan.sampling_peak))
    lines += [f"  {label:<34}{gb(value)}" for label, value in rows]
    return "\n".join(lines)


__all__ = ["MemoryPlan", "PlanSettings", "activation_bytes", "describe_changes", "fits", "format_plan",
           "parked_by_config", "pick_settings", "plan_memory", "residual_blocks"]


def settings_from_config(config, *, backbone: str) -> tuple[PlanSettings, float | None]:
    """PlanSettings of a TrainConfig (its resolution, batch, LoRA rank, optimizer, dtypes, memory section) and its
    memory.budget_gb."""
    mixed = {"bf16": "bfloat16", "fp16": "float16"}.get(config.training.mixed_precision)
    quant = config.memory.quantize.by_component(backbone)
    settings = PlanSettings(
        resolution=config.data.resolution, batch=config.training.batch_size, train_dtype=config.model.train_dtype,
        activation_dtype=mixed or config.model.train_dtype, quantize=quant, lora_rank=config.lora.rank,
        optimizer=config.optimizer.type, state_dtype=config.optimizer.state_dtype,
        checkpointing=config.training.gradient_checkpointing, offload_blocks=config.memory.offload_blocks,
        parked=parked_by_config(config, ("text_encoder", "text_encoder_2", "text_encoder_3")),
        samples=bool(config.sampling.prompts) and bool(
            config.sampling.every_n_steps or config.sampling.at_start or config.sampling.at_end),
    )  # fmt: skip
    return settings, config.memory.budget_gb


def parked_by_config(config, text_encoders: tuple[str, ...]) -> list[str]:
    """Components that leave the accelerator once the caches are filled (the rule of modules/trainer/parking.py)."""
    from tuneonce.trainer.parking import parked_names

    trains_text = config.method == "lora" and bool(config.lora.train_text_encoders.enabled())
    return parked_names(config, text_encoders, trains_text)


def memory_report(components: Mapping[str, nn.Module], settings: PlanSettings, budget_gb: float | None) -> dict:
    """What `inspect_model.py --memory` prints: the plan as given and, with a budget, the picked one."""
    plan = plan_memory(components, settings)
    report = {"plan": plan.as_dict(), "text": format_plan(plan)}
    if budget_gb is not None:
        picked, changes = pick_settings(components, settings, budget_gb)
        report["budget_gb"] = budget_gb
        report["picked"] = {"changes": changes, "plan": picked.as_dict()}
        if not changes:
            report["text"] += f"\nfits {budget_gb:g} GiB as given (with {HEADROOM:.0%} free)"
        else:
            report["text"] += f"\nto fit {budget_gb:g} GiB: " + "; ".join(changes) + "\n"
            report["text"] += format_plan(picked, title=" (picked)")
    return report
