"""Rules spanning several fields. Each rule is a small function whose docstring is its one-line summary
(listed in configs/SCHEMA.md); it returns (dotted_key, message) for each violation.

Shared by validation (TrainConfig), the CLI and the GUI (through ``validate_dict``).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from tuneonce.config.families import FAMILY_FACTS, ROWS, families_where

if TYPE_CHECKING:
    from tuneonce.config.schema import TrainConfig

Problem = tuple[str, str]
MUON_FAMILY = ("muon_adv", "adamuon_adv", "lora_muon")

# Derived from the family rows (tuneonce.config.families), kept under their old names for callers.
FAMILY_TEXT_ENCODERS: dict[str, tuple[str, ...]] = {row.name: row.lora_text_encoders for row in ROWS}
FLOW_FAMILIES = families_where(lambda row: row.flow)
# Families whose full finetune saves as one original-layout file (tuneonce.model.saving.SINGLE_FILE_WRITERS).
SINGLE_FILE_FAMILIES = families_where(lambda row: row.single_file_writer is not None)
LYCORIS_FAMILIES = families_where(lambda row: row.lycoris)  # kohya-layout UNet files (model/lycoris_files.py)

def dora_vs_spectral(cfg: TrainConfig) -> list[Problem]:
    """DoRA with spectral scaling (Muon family) is an error unless lora.force_dora_with_spectral."""
    lora, opt = cfg.lora, cfg.optimizer
    if (
        cfg.method == "lora"
        and lora.dora
        and opt.spectral_scaling
        and opt.type in MUON_FAMILY
        and not lora.force_dora_with_spectral
    ):
        return [(
            "lora.dora",
            "DoRA's magnitude scaling fights optimizer.spectral_scaling; set optimizer.spectral_scaling: false "
            "or lora.force_dora_with_spectral: true",
        )]
    return []


def lora_muon_needs_lora(cfg: TrainConfig) -> list[Problem]:
    """optimizer.type lora_muon needs method lora and plain (non-DoRA) adapters."""
    if cfg.optimizer.type != "lora_muon":
        return []
    if cfg.method != "lora":
        return [("optimizer.type", "lora_muon trains LoRA factors only; use it with method: lora")]
    if cfg.lora.dora:
        return [("optimizer.type", "lora_muon does not train DoRA adapters; set lora.dora: false")]
    return []


def prodigy_has_one_lr(cfg: TrainConfig) -> list[Problem]:
    """optimizer.type prodigy estimates one step size for all parameters: no separate text-encoder LR."""
    if cfg.optimizer.type != "prodigy":
        return []
    return [
        (f"optimizer.text_encoder_lr.{name}", "prodigy takes one LR for every parameter (or 0 to freeze); set it null")
        for name, lr in cfg.optimizer.text_encoder_lr.model_dump().items()
        if lr is not None and lr not in (0, cfg.optimizer.lr)
    ]


def text_encoders_exist(cfg: TrainConfig) -> list[Problem]:
    """lora.train_text_encoders may only name encoders the family has (sd15/sd2: one, sdxl: two)."""
    if cfg.method != "lora":
        return []
    encoders = FAMILY_TEXT_ENCODERS.get(cfg.model.family, ())
    return [
        (
            f"lora.train_text_encoders.{name}",
            f"family {cfg.model.family} has no {name} (it has: {', '.join(encoders) or 'none'})",
        )
        for name in cfg.lora.train_text_encoders.enabled()
        if name not in encoders
    ]


def text_cache_is_static(cfg: TrainConfig) -> list[Problem]:
    """data.cache_text_embeddings needs frozen text encoders and no tag shuffling."""
    if not cfg.data.cache_text_embeddings:
        return []
    out = []
    if cfg.method == "lora" and cfg.lora.train_text_encoders.enabled():
        out.append((
            "data.cache_text_embeddings",
            "cannot cache text embeddings while training a text encoder; set it false",
        ))
    if cfg.data.shuffle_tags or any(f.shuffle_tags for f in cfg.data.folders):
        out.append((
            "data.cache_text_embeddings",
            "cached embeddings cannot follow shuffled tags; set data.shuffle_tags: false or this false",
        ))
    return out


def concept_settings(cfg: TrainConfig) -> list[Problem]:
    """data.folders[i].prior_prediction needs role regularization and an adapter (method lora)."""
    out = []
    for i, folder in enumerate(cfg.data.folders):
        if not folder.prior_prediction:
            continue
        key = f"data.folders.{i}.prior_prediction"
        if folder.role != "regularization":
            out.append((key, "only a folder with role: regularization can train on the prior prediction"))
        if cfg.method != "lora":
            out.append((key, "the prior prediction needs an adapter to switch off; use method: lora"))
    if all(f.role == "regularization" for f in cfg.data.folders):
        out.append(("data.folders", "every folder has role: regularization; at least one must train (role: train)"))
    return out


def latent_cache_is_static(cfg: TrainConfig) -> list[Problem]:
    """data.random_crop cannot be combined with data.cache_latents."""
    if cfg.data.random_crop and cfg.data.cache_latents:
        return [("data.random_crop", "cached latents cannot be cropped anew each epoch; set data.cache_latents: false")]
    return []


def sizes_fit(cfg: TrainConfig) -> list[Problem]:
    """data.resolution(s) and data.bucket_step are multiples of 8; bucket_min <= bucket_max."""
    data = cfg.data
    out = []
    if data.resolution % 8:
        out.append(("data.resolution", f"must be a multiple of 8, got {data.resolution}"))
    odd = [r for r in data.resolutions or () if r % 8]
    if odd:
        out.append(("data.resolutions", f"every resolution must be a multiple of 8, got {odd}"))
    if data.resolutions is not None and len(set(data.resolutions)) != len(data.resolutions):
        out.append(("data.resolutions", f"lists a resolution twice: {data.resolutions}"))
    if data.bucketing:
        if data.bucket_step % 8:
            out.append(("data.bucket_step", f"must be a multiple of 8, got {data.bucket_step}"))
        if data.bucket_min > data.bucket_max:
            out.append(("data.bucket_min", f"{data.bucket_min} is larger than data.bucket_max {data.bucket_max}"))
    return out


def run_length(cfg: TrainConfig) -> list[Problem]:
    """Exactly one of schedule.max_steps and schedule.epochs; warm-up no longer than max_steps."""
    s = cfg.schedule
    if s.max_steps is None and s.epochs is None:
        return [("schedule.max_steps", "set schedule.max_steps or schedule.epochs")]
    if s.max_steps is not None and s.epochs is not None:
        return [("schedule.epochs", "set only one of schedule.max_steps and schedule.epochs (the other to null)")]
    if s.max_steps is not None and s.warmup_steps > s.max_steps:
        return [("schedule.warmup_steps", f"{s.warmup_steps} is longer than schedule.max_steps {s.max_steps}")]
    return []


def sampling_has_prompts(cfg: TrainConfig) -> list[Problem]:
    """sampling.every_n_steps > 0 or sampling.at_end needs at least one prompt."""
    if cfg.sampling.every_n_steps and not cfg.sampling.prompts:
        return [("sampling.prompts", "sampling.every_n_steps is set but there are no prompts")]
    if cfg.sampling.at_end and not cfg.sampling.prompts:
        return [("sampling.prompts", "sampling.at_end is set but there are no prompts")]
    return []


def validation_has_data(cfg: TrainConfig) -> list[Problem]:
    """validation: at most one of folder and split_fraction; one of them when every_n_steps > 0."""
    v = cfg.validation
    if v.folder is not None and v.split_fraction is not None:
        return [("validation.split_fraction", "set only one of validation.folder and validation.split_fraction")]
    if v.every_n_steps and v.folder is None and v.split_fraction is None:
        return [("validation.folder", "validation.every_n_steps is set: give a folder or a split_fraction")]
    return []


def flow_family_settings(cfg: TrainConfig) -> list[Problem]:
    """Flux/Chroma/SD3: prediction_type auto, no min-SNR, the default (flow) sampler; SD3 LoRA files in diffusers layout
    (Flux/Chroma write kohya's BFL layout)."""
    if cfg.model.family not in FLOW_FAMILIES:
        return []
    family, out = cfg.model.family, []
    if cfg.training.prediction_type != "auto":
        out.append(("training.prediction_type", f"{family} trains on the flow-matching velocity; set it to auto"))
    if cfg.training.min_snr_gamma is not None:
        out.append(("training.min_snr_gamma", f"min-SNR weighting is for epsilon/v-prediction models, not {family}; set it null"))
    if cfg.sampling.sampler != "default":
        out.append(("sampling.sampler", f"{family} samples with its flow-matching scheduler; set it to default"))
    if cfg.method == "lora" and cfg.saving.format == "kohya" and not FAMILY_FACTS[family].kohya_lora:
        out.append(("saving.format", f"the kohya layout is not written for {family} yet; set saving.format: diffusers"))
    return out


def single_file_has_writer(cfg: TrainConfig) -> list[Problem]:
    """saving.finetune_format single_file needs a family with a writer: flux, chroma, sd3, sdxl, sd15."""
    family = cfg.model.family
    single_file = cfg.method == "finetune" and cfg.saving.finetune_format == "single_file"
    if single_file and family not in SINGLE_FILE_FAMILIES:
        return [(
            "saving.finetune_format",
            f"single_file is not written for {family}; it works for {', '.join(SINGLE_FILE_FAMILIES)} (use diffusers)",
        )]
    return []


def init_lora_is_safetensors(cfg: TrainConfig) -> list[Problem]:
    """lora.init_lora must be a .safetensors file."""
    path = cfg.lora.init_lora
    if cfg.method == "lora" and path is not None and not path.endswith(".safetensors"):
        return [("lora.init_lora", f"must be a .safetensors file, got {path!r}")]
    return []



def lycoris_settings(cfg: TrainConfig) -> list[Problem]:
    """lora.type loha/lokr: SD-family UNets, kohya layout; no DoRA, dropout, init_lora, lora_muon; lokr_factor != 0."""
    lora = cfg.lora
    if cfg.method != "lora" or lora.type == "lora":
        return []
    kind, out = lora.type, []
    if cfg.model.family not in LYCORIS_FAMILIES:
        out.append(("lora.type", f"{kind} files are written for {', '.join(LYCORIS_FAMILIES)}, not {cfg.model.family}"))
    if cfg.saving.format != "kohya":
        out.append(("saving.format", f"{kind} is written in the LyCORIS/kohya layout only; set saving.format: kohya"))
    if lora.dora:
        out.append(("lora.dora", f"DoRA is a LoRA option; set lora.dora: false with lora.type {kind}"))
    if lora.dropout:
        out.append(("lora.dropout", f"input dropout is a LoRA option; set lora.dropout: 0 with lora.type {kind}"))
    if lora.init_lora:
        out.append(("lora.init_lora", f"starting from a file is supported for lora.type lora only, not {kind}"))
    if cfg.optimizer.type == "lora_muon":
        out.append(("optimizer.type", f"lora_muon trains LoRA pairs only; use muon_adv or adamuon_adv with {kind}"))
    if kind == "lokr" and lora.lokr_factor == 0:
        out.append(("lora.lokr_factor", "must be -1 (near the square root) or a positive factor, got 0"))
    return out


def memory_settings(cfg: TrainConfig) -> list[Problem]:
    """memory.quantize.denoiser, memory.offload_blocks and memory.budget_gb need method lora (a finetune trains the
    base weights; the planner models LoRA runs); offloading needs training.gradient_checkpointing."""
    out = []
    if cfg.method == "finetune" and cfg.memory.budget_gb is not None:
        out.append(("memory.budget_gb", "the memory planner plans LoRA runs (it quantizes and offloads the frozen "
                                        "denoiser); set it to null or use method: lora"))
    if cfg.method == "finetune" and cfg.memory.quantize.denoiser != "none":
        out.append((
            "memory.quantize.denoiser",
            f"{cfg.memory.quantize.denoiser} stores the denoiser frozen; a full finetune trains it: set it to none "
            "or use method: lora",
        ))
    if cfg.memory.offload_blocks and cfg.method == "finetune":
        out.append(("memory.offload_blocks", "offloading streams frozen weights only; set it to 0 or use method: lora"))
    elif cfg.memory.offload_blocks and not cfg.training.gradient_checkpointing:
        out.append((
            "memory.offload_blocks",
            "offloaded blocks are brought back for the backward by recomputing them; set "
            "training.gradient_checkpointing: true",
        ))
    return out


RULES: tuple[Callable[[TrainConfig], list[Problem]], ...] = (
    dora_vs_spectral,
    lora_muon_needs_lora,
    prodigy_has_one_lr,
    text_encoders_exist,
    text_cache_is_static,
    latent_cache_is_static,
    concept_settings,
    sizes_fit,
    run_length,
    sampling_has_prompts,
    validation_has_data,
    init_lora_is_safetensors,
    flow_family_settings,
    single_file_has_writer,
    lycoris_settings,
    memory_settings,
)


def check_rules(cfg: TrainConfig) -> list[Problem]:
    """Every cross-field violation of ``cfg``; empty when it is consistent."""
    return [problem for rule in RULES for problem in rule(cfg)]


def config_warnings(cfg: TrainConfig) -> list[str]:
    """Legal but probably unintended settings, printed by the CLI (never fatal)."""
    out: list[str] = []
    lora, opt = cfg.lora, cfg.optimizer
    if cfg.method == "lora" and opt.type in MUON_FAMILY and opt.spectral_scaling and lora.effective_alpha != lora.rank:
        out.append(
            f"lora.alpha {lora.effective_alpha:g} != rank {lora.rank}: with spectral scaling the alpha/rank factor "
            "fights the scaling (set alpha: null or equal to rank)"
        )
    if cfg.data.keep_tokens and not cfg.data.shuffle_tags:
        out.append("data.keep_tokens only applies with data.shuffle_tags: true")
    if cfg.training.timestep_sampling != "logit_normal" and (cfg.training.logit_mean, cfg.training.logit_std) != (0, 1):
        out.append("training.logit_mean/logit_std are set but training.timestep_sampling is not logit_normal")
    sampling = cfg.sampling
    if sampling.prompts and not (sampling.every_n_steps or sampling.at_start or sampling.at_end):
        out.append("sampling.prompts are never sampled: set sampling.every_n_steps, at_start or at_end")
    if cfg.training.mixed_precision == "fp16" and cfg.model.train_dtype == "bfloat16":
        out.append("training.mixed_precision fp16 with model.train_dtype bfloat16: pick one half type")
    return out
