"""The typed training config: one pydantic model per YAML section, every field described.

Rules that span several fields live in rules.py (one place, shared by the CLI, the
GUI and ``validate_dict``). Paths in a config are used as written: relative paths resolve
against the current working directory (run presets from the repository root); only
``base:`` (handled by the loader) resolves relative to the file that names it.

Field names mirror the optimizer constructors 1:1 (``optimizer:`` section), so
``OptimizerConfig.constructor_kwargs()`` can be passed straight to Muon_adv & co.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Re-exported: the rules live in their own module; TrainConfig runs them after field validation.
from tuneonce.config.rules import FAMILY_TEXT_ENCODERS, MUON_FAMILY, check_rules, config_warnings  # noqa: F401
# The optimizer hyperparameters' defaults, bounds and descriptions are defined once, beside the optimizers.
from tuneonce.optimizer.hparams import (
    HPARAMS, LORA_A_OPTIMIZERS, LORA_SPECTRAL_TARGETS, ORTHO_ROUTES, ORTHOGONALIZERS, SPECS, STATE_DTYPES,
    AdaMuonHParams, LoRAMuonHParams, MuonHParams,
)  # fmt: skip

CONFIG_VERSION = 2  # bump together with a step in migrations.py

Family = Literal["sd15", "sd2", "sdxl", "flux", "chroma", "sd3", "zimage", "qwenimage"]
Method = Literal["lora", "finetune"]
Dtype = Literal["float32", "bfloat16", "float16"]
OptimizerType = Literal["muon_adv", "adamuon_adv", "lora_muon", "adamw", "torch_muon", "prodigy"]
# default: the architecture's attention + feed-forward + projection layers (modules/model/architectures);
# attn: attention projections only; all_linear: every nn.Linear inside the residual blocks.
LoraTargetPreset = Literal["default", "attn", "all_linear"]
Depth = Annotated[int, Field(ge=1)]
Beta = Annotated[float, Field(ge=0, lt=1)]


class Section(BaseModel):
    """Base of every section: unknown keys are errors, defaults are validated too."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class RuleViolation(ValueError):
    """Rules spanning several fields were broken; ``problems`` lists (dotted_key, message)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        key, message = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(f"{key}: {message}{more}")
        self.problems = problems


# --------------------------------------------------------------------------- model


class ModelConfig(Section):
    family: Family = Field(description="Model family: selects loading, LoRA targets and the training objective.")
    base_model: str = Field(
        min_length=1,
        description=(
            "Local diffusers folder of the base model, or one .safetensors checkpoint as downloaded (SDXL/SD1.5 LDM, "
            "Flux.1/Chroma BFL transformer, SD3.5); relative paths resolve against the working directory."
        ),
    )
    components_from: str | None = Field(
        default=None,
        description=(
            "Diffusers folder of the same family supplying what a single-file base_model lacks (VAE, text encoders, "
            "tokenizers, scheduler, configs); only with a .safetensors base_model."
        ),
    )
    train_dtype: Dtype = Field(
        default="float32", description="dtype the denoiser and text encoders are loaded in for training."
    )
    vae_dtype: Dtype = Field(default="float32", description="dtype of the VAE (encodes images to latents).")
    depth: Depth | dict[str, Depth] | None = Field(
        default=None,
        description=(
            "Residual depth L override: one int for the backbone (unet/transformer), or a mapping "
            "component -> int (e.g. {unet: 87, text_encoder: 12}); null counts it from the model."
        ),
    )
    depth_source: Literal["model", "trained"] = Field(
        default="model",
        description=(
            "How depth is counted when not overridden: 'model' = all residual blocks of the component; "
            "'trained' = only blocks holding trained modules (the rule of OneTrainer PR #1263)."
        ),
    )


# --------------------------------------------------------------------------- lora


class TextEncoderFlags(Section):
    text_encoder: bool = Field(default=False, description="Train a LoRA on the first text encoder (CLIP-L).")
    text_encoder_2: bool = Field(default=False, description="Train a LoRA on the second text encoder (SDXL: CLIP-G).")
    text_encoder_3: bool = Field(default=False, description="Train a LoRA on the third text encoder (SD3: T5).")

    def enabled(self) -> list[str]:
        return [name for name, on in self.model_dump().items() if on]


class LoraConfig(Section):
    rank: int = Field(default=16, ge=1, le=4096, description="LoRA rank r (inner dimension of the two factors).")
    alpha: float | None = Field(
        default=None,
        gt=0,
        description="LoRA alpha (scale alpha/r); null means alpha = rank, which spectral scaling wants.",
    )
    targets: LoraTargetPreset | list[str] = Field(
        default="default",
        description=(
            "Modules that get a LoRA: 'default' (the architecture's attention + feed-forward + projection layers), "
            "'attn' (attention only), 'all_linear' (every Linear in the residual blocks) - presets stay inside the "
            "residual blocks - or a list of module-name suffixes matched anywhere (e.g. [to_q, to_k, to_v, to_out.0]; "
            "listing proj_out also trains Flux's final layer, which kohya's Flux loader drops)."
        ),
    )
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA branch input.")
    layer_filter: str | list[str] | None = Field(
        default=None,
        description="Regex (or list of regexes) on full module names; only matching target modules get a LoRA.",
    )
    train_text_encoders: TextEncoderFlags = Field(
        default_factory=TextEncoderFlags, description="Per text encoder: train a LoRA on it too."
    )
    type: Literal["lora", "loha", "lokr"] = Field(
        default="lora",
        description=(
            "Adapter: lora (low-rank B·A; with dora: DoRA), loha (LyCORIS LoHa, Hadamard product of two rank-r "
            "products), lokr (LyCORIS LoKr, Kronecker product); loha/lokr files use the LyCORIS/kohya key layout."
        ),
    )
    lokr_factor: int = Field(
        default=-1, ge=-1, description="LoKr: split each dimension near this factor (-1: near its square root)."
    )
    lokr_decompose_both: bool = Field(
        default=False, description="LoKr: also write the small Kronecker factor as a rank-r product."
    )
    dora: bool = Field(default=False, description="Use DoRA (weight-decomposed LoRA) instead of plain LoRA.")
    force_dora_with_spectral: bool = Field(
        default=False,
        description="Allow DoRA together with optimizer.spectral_scaling (they fight; only for experiments).",
    )
    init_lora: str | None = Field(
        default=None, description="LoRA .safetensors file to start from (kohya or diffusers layout); null starts fresh."
    )

    @property
    def effective_alpha(self) -> float:
        return float(self.rank) if self.alpha is None else self.alpha


# --------------------------------------------------------------------------- data


class DataFolder(Section):
    path: str = Field(min_length=1, description="Folder of images with same-name caption files.")
    repeats: int = Field(default=1, ge=1, description="How many times each image of this folder counts per epoch.")
    default_caption: str = Field(default="", description="Caption of images in this folder without a caption file.")
    # Concept settings (OneTrainer's concepts, kohya's subsets): null inherits the data section's value.
    caption_extension: str | None = Field(
        default=None, pattern=r"^\.[A-Za-z0-9_.-]+$", description="Caption file extension here; null = data's."
    )
    caption_prefix: str = Field(
        default="", description="Fixed text (trigger / class words) put before every caption of this folder."
    )
    caption_dropout: float | None = Field(
        default=None, ge=0.0, le=1.0, description="Caption dropout here; null = data's."
    )
    shuffle_tags: bool | None = Field(
        default=None, description="Shuffle tags here (the prefix stays first); null = data's."
    )
    keep_tokens: int | None = Field(default=None, ge=0, description="Leading tags kept when shuffling; null = data's.")
    loss_weight: float = Field(default=1.0, ge=0.0, description="Multiplies the loss of this folder's samples.")
    role: Literal["train", "regularization"] = Field(
        default="train", description="regularization: prior preservation images (kohya's reg_data_dir)."
    )
    prior_prediction: bool = Field(
        default=False,
        description=(
            "Regularization only (OneTrainer's prior prediction): the target is the base model's own prediction "
            "with the adapter off, on these images and captions, instead of their noise (LoRA / LyCORIS only)."
        ),
    )


class MaskedLossConfig(Section):
    enabled: bool = Field(
        default=False,
        description=(
            "Weight each latent pixel's loss by the image's mask (downsampled to the latent grid; follows crops and "
            "flips). Training images without a mask are skipped with a warning naming them; a mask that cannot be "
            "read is an error naming it. The validation loss stays unmasked."
        ),
    )
    unmasked_weight: float = Field(
        default=0.0, ge=0.0, le=1.0,
        description="Loss weight where the mask is black (white = 1; grey blends linearly): w = u + (1 - u)·mask.",
    )  # fmt: skip
    source: Literal["masklabel", "alpha"] = Field(
        default="masklabel",
        description=(
            "masklabel: a grayscale <name>-masklabel.png beside each image (OneTrainer's naming; never trained on "
            "as an image); alpha: the image's own alpha channel (kohya's alpha_mask)."
        ),
    )


class DataConfig(Section):
    folders: list[DataFolder] = Field(
        min_length=1,
        description=(
            "Image folders (concepts) to train on. Each item: path, repeats, default_caption and the concept's own "
            "caption_extension, caption_prefix, caption_dropout, shuffle_tags, keep_tokens (null = this section's), "
            "loss_weight, role (train | regularization), prior_prediction."
        ),
    )
    resolution: int = Field(
        default=1024, ge=16, le=8192, description="Training side length in pixels (bucket area = resolution^2)."
    )
    resolutions: list[Annotated[int, Field(ge=16, le=8192)]] | None = Field(
        default=None, min_length=1,
        description=(
            "Train at several resolutions, e.g. [512, 768, 1024]: every image at each one, in that resolution's "
            "buckets (batches never mix sizes; latents cached per size); null = [resolution]."
        ),
    )
    bucketing: bool = Field(
        default=True, description="Aspect-ratio bucketing; off center-crops every image to a square."
    )
    bucket_step: int = Field(default=64, ge=8, description="Bucket side lengths are multiples of this (pixels).")
    bucket_min: int = Field(default=256, ge=8, description="Smallest bucket side length (pixels).")
    bucket_max: int = Field(default=2048, ge=8, description="Largest bucket side length (pixels).")
    random_flip: float = Field(
        default=0.0, ge=0.0, le=1.0, description="Probability of a horizontal flip (true means 0.5)."
    )
    random_crop: bool = Field(
        default=False, description="Random instead of center crop to the bucket (not with cache_latents)."
    )
    caption_dropout: float = Field(
        default=0.0, ge=0.0, le=1.0, description="Probability of training a sample with an empty caption."
    )
    shuffle_tags: bool = Field(default=False, description="Shuffle comma-separated caption tags every time.")
    keep_tokens: int = Field(default=0, ge=0, description="Number of leading tags kept in place when shuffling.")
    caption_extension: str = Field(
        default=".txt", pattern=r"^\.[A-Za-z0-9_.-]+$", description="Extension of caption files, with the dot."
    )
    cache_latents: bool = Field(default=True, description="Encode images once and cache the latents on disk.")
    cache_text_embeddings: bool = Field(
        default=True, description="Encode captions once and cache the embeddings on disk (frozen text encoders only)."
    )
    cache_dir: str | None = Field(
        default=None, description="Folder for the caches; null uses <saving.output_dir>/cache."
    )
    num_workers: int = Field(default=0, ge=0, description="DataLoader worker processes (0 = load in the main process).")
    masked_loss: MaskedLossConfig = Field(
        default_factory=MaskedLossConfig, description="Weight the loss per pixel by a mask per image."
    )
    upscale: bool = Field(
        default=False,
        description=(
            "Upscale images smaller than their bucket; false (kohya's bucket_no_upscale) trains such an image at "
            "its own size, shrunk to the multiple of 8 that fits, in its own bucket."
        ),
    )

    @field_validator("random_flip", mode="before")
    @classmethod
    def _flip_bool(cls, value: object) -> object:
        return {True: 0.5, False: 0.0}[value] if isinstance(value, bool) else value


# --------------------------------------------------------------------------- optimizer


class TextEncoderLR(Section):
    text_encoder: float | None = Field(default=None, ge=0, description="LR of the first text encoder; null = lr.")
    text_encoder_2: float | None = Field(default=None, ge=0, description="LR of the second text encoder; null = lr.")
    text_encoder_3: float | None = Field(default=None, ge=0, description="LR of the third text encoder; null = lr.")


# Constructor keywords of each optimizer class (modules/optimizer), in field order of its hyperparameter dataclass.
MUON_KEYS = MuonHParams.keys()
ADAMUON_KEYS = AdaMuonHParams.keys()
LORA_MUON_KEYS = LoRAMuonHParams.keys()
CONSTRUCTOR_KEYS: dict[str, tuple[str, ...]] = {kind: cls.keys() for kind, cls in HPARAMS.items()}


def _hparam(name: str) -> Any:
    """The config field of an optimizer hyperparameter: default, bounds and description from hparams.SPECS."""
    spec = SPECS[name]
    return Field(default=spec.default, description=spec.description, **spec.bounds)


class OptimizerConfig(Section):
    type: OptimizerType = Field(
        default="muon_adv",
        description=(
            "muon_adv / adamuon_adv / lora_muon: tuneonce's depth- and width-aware optimizers; "
            "adamw: torch.optim.AdamW (lr, weight_decay, adam_betas, adam_eps); "
            "torch_muon: torch.optim.Muon on matrices (lr, weight_decay, beta1, nesterov, ns_steps, ns_eps) "
            "+ AdamW on the rest (adam_lr, adam_betas, adam_eps, adam_weight_decay); "
            "prodigy: Prodigy (the prodigyopt package; lr 1 as a multiplier of its own step-size estimate, "
            "weight_decay, adam_betas, adam_eps and the prodigy_* fields)."
        ),
    )
    lr: float = _hparam("lr")
    beta1: float = _hparam("beta1")
    nesterov: bool = _hparam("nesterov")
    weight_decay: float = _hparam("weight_decay")
    ns_steps: int = _hparam("ns_steps")
    ns_eps: float = _hparam("ns_eps")
    orthogonalizer: Literal[ORTHOGONALIZERS] = _hparam("orthogonalizer")
    ortho_route: Literal[ORTHO_ROUTES] = _hparam("ortho_route")
    spectral_scaling: bool = _hparam("spectral_scaling")
    lora_spectral_target: Literal[LORA_SPECTRAL_TARGETS] = _hparam("lora_spectral_target")
    depth_scaled_eps: bool = _hparam("depth_scaled_eps")
    width_scaled_weight_decay: bool = _hparam("width_scaled_weight_decay")
    lora_b_orthogonalize: bool = _hparam("lora_b_orthogonalize")
    lora_a_optimizer: Literal[LORA_A_OPTIMIZERS] = _hparam("lora_a_optimizer")
    state_dtype: Literal[STATE_DTYPES] = _hparam("state_dtype")
    adam_lr: float = _hparam("adam_lr")
    adam_betas: tuple[Beta, Beta] = _hparam("adam_betas")
    adam_eps: float = _hparam("adam_eps")
    adam_weight_decay: float = _hparam("adam_weight_decay")
    beta2: float = _hparam("beta2")
    eps: float = _hparam("eps")
    rebalance_every: int = _hparam("rebalance_every")
    rebalance_power: float = _hparam("rebalance_power")
    text_encoder_lr: TextEncoderLR = Field(
        default_factory=TextEncoderLR, description="Separate peak LR per text encoder (null = optimizer.lr)."
    )
    prodigy_d_coef: float = Field(
        default=1.0, gt=0, description="Prodigy: multiplier of the estimated step size d (prodigy)."
    )
    prodigy_d0: float = Field(default=1e-6, gt=0, description="Prodigy: initial estimate of d (prodigy).")
    prodigy_safeguard_warmup: bool = Field(
        default=False, description="Prodigy: leave the LR out of the d estimate, which warm-up would skew (prodigy)."
    )
    prodigy_use_bias_correction: bool = Field(
        default=False, description="Prodigy: Adam's bias correction in the step (prodigy)."
    )
    prodigy_decouple: bool = Field(
        default=True, description="Prodigy: decoupled (AdamW-style) weight decay; false adds it to the gradient (prodigy)."
    )
    prodigy_growth_rate: float | None = Field(
        default=None, gt=1, description="Prodigy: most d may grow per step (factor; null = unlimited) (prodigy)."
    )

    def constructor_kwargs(self) -> dict:
        """Keyword arguments for the tuneonce optimizer class of ``type`` (empty for adamw/torch_muon)."""
        keys = CONSTRUCTOR_KEYS.get(self.type, ())
        return {k: getattr(self, k) for k in keys}


# --------------------------------------------------------------------------- schedule / training


class ScheduleConfig(Section):
    scheduler: Literal["constant", "linear", "cosine"] = Field(
        default="constant", description="LR schedule after warm-up: constant, linear decay to 0, or cosine to 0."
    )
    warmup_steps: int = Field(default=0, ge=0, description="Linear warm-up steps from 0 to the peak LR.")
    max_steps: int | None = Field(default=None, ge=1, description="Optimizer steps to train; set this or epochs.")
    epochs: int | None = Field(default=None, ge=1, description="Epochs to train; set this or max_steps.")


class EMAConfig(Section):
    enabled: bool = Field(
        default=False,
        description="Keep an exponential moving average of the trained weights; saved files, validation and samples use it.",
    )
    decay: float = Field(
        default=0.999, ge=0, lt=1, description="EMA decay per optimizer step (averages over about 1/(1-decay) steps)."
    )
    update_every: int = Field(
        default=1, ge=1, description="Update the average every N optimizer steps (with decay^N, same horizon)."
    )
    warmup: bool = Field(
        default=True, description="Warm-up: the n-th update uses min(decay, (1+n)/(10+n)), so early averages follow training."
    )
    on_cpu: bool = Field(default=False, description="Keep the EMA weights in CPU memory (saves accelerator memory).")


class TrainingConfig(Section):
    batch_size: int = Field(
        default=1, ge=1,
        description="Images per micro-batch on each process (GPU); the global batch of one optimizer step is "
        "batch_size × processes × gradient_accumulation.",
    )
    gradient_accumulation: int = Field(default=1, ge=1, description="Micro-batches per optimizer step.")
    max_grad_norm: float | None = Field(
        default=1.0, gt=0, description="Clip the gradient norm to this; null disables clipping."
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(default="no", description="accelerate autocast mode.")
    gradient_checkpointing: bool = Field(default=False, description="Recompute activations to save memory.")
    seed: int = Field(default=42, ge=0, description="Seed of everything random in the run (data order, noise, init).")
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = Field(
        default="auto", description="Training target; auto reads it from the model's scheduler config."
    )
    timestep_sampling: Literal["uniform", "logit_normal"] = Field(
        default="uniform", description="Distribution of training timesteps."
    )
    logit_mean: float = Field(default=0.0, description="Mean of the logit-normal timestep distribution.")
    logit_std: float = Field(default=1.0, gt=0, description="Std of the logit-normal timestep distribution.")
    min_snr_gamma: float | None = Field(
        default=None, gt=0, description="Min-SNR loss weighting gamma (5 is common); null disables it."
    )
    noise_offset: float = Field(default=0.0, ge=0, description="Noise offset (per-channel constant added to noise).")
    ema: EMAConfig = Field(default_factory=EMAConfig, description="Exponential moving average of the trained weights.")
    max_nonfinite_steps: int = Field(
        default=3, ge=1,
        description="A step whose loss, gradient or updated weights are not finite is undone (weights and optimizer "
        "state restored) and named in a warning; after this many such steps in a row the run stops with exit code 3, "
        "keeping its last good checkpoint and writing no final file.",
    )
    nonfinite_backup: bool | None = Field(
        default=None,
        description="Keep a copy of the trained weights and optimizer state to undo a non-finite step (costs their "
        "memory once more); without it a bad loss or gradient still skips the step, but weights that turn "
        "non-finite stop the run at once. null: on for method lora, off for finetune.",
    )


# --------------------------------------------------------------------------- sampling / validation


class SamplePrompt(Section):
    prompt: str = Field(description="Prompt text.")
    negative_prompt: str = Field(default="", description="Negative prompt.")
    seed: int = Field(default=0, ge=0, description="Seed of the initial noise (same seed = comparable images).")
    cfg: float = Field(default=7.0, ge=0, description="Classifier-free guidance scale (1 disables CFG).")
    steps: int = Field(default=30, ge=1, le=1000, description="Inference steps.")
    width: int | None = Field(default=None, ge=16, description="Image width in pixels; null = data.resolution.")
    height: int | None = Field(default=None, ge=16, description="Image height in pixels; null = data.resolution.")


class SamplingConfig(Section):
    every_n_steps: int = Field(
        default=0, ge=0,
        description="Sample images every N optimizer steps (0 = never; at_start / at_end add step 0 / the end).",
    )
    at_start: bool = Field(
        default=False, description="Also sample before the first step (step 0: the base model, for before/after)."
    )
    at_end: bool = Field(
        default=False,
        description="Also sample the final model after the last step (when every_n_steps did not just sample it).",
    )
    sampler: Literal["default", "ddim", "euler", "euler_ancestral", "dpmpp_2m", "unipc"] = Field(
        default="default", description="Inference scheduler; default = the one saved with the base model."
    )
    prompts: list[SamplePrompt] = Field(default_factory=list, description="Prompts to sample, each with its settings.")


class ValidationConfig(Section):
    every_n_steps: int = Field(
        default=0, ge=0, description="Held-out validation loss every N optimizer steps (0 = never)."
    )
    folder: str | None = Field(default=None, description="Folder of held-out images with captions.")
    split_fraction: float | None = Field(
        default=None, gt=0, lt=1, description="Hold out this fraction of the training images instead of a folder."
    )
    num_timesteps: int = Field(
        default=4, ge=1, le=1000, description="Fixed, evenly spaced timesteps each validation image is scored at."
    )
    seed: int = Field(default=1234, ge=0, description="Seed of the fixed validation noise (and of the split).")


# --------------------------------------------------------------------------- saving / logging


class SavingConfig(Section):
    output_dir: str = Field(default="output", min_length=1, description="Folder for the trained files.")
    name: str = Field(
        default="tuneonce",
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Base name of saved files (letters, digits, _ . -).",
    )
    format: Literal["kohya", "diffusers"] = Field(
        default="kohya",
        description="LoRA file layout: kohya/ComfyUI (lora_unet_...) or diffusers/PEFT.",
    )
    finetune_format: Literal["diffusers", "single_file"] = Field(
        default="diffusers",
        description=(
            "What a full finetune saves: a diffusers folder <name>/, or one <name>.safetensors in the original "
            "layout ComfyUI/Forge/A1111 load (Flux/Chroma: the transformer in BFL's layout; SD3/3.5: the "
            "transformer as MMDiT; SDXL/SD1.5: the whole LDM checkpoint). Intermediate saves follow it."
        ),
    )
    save_every_n_steps: int | None = Field(default=None, ge=1, description="Intermediate save every N steps.")
    save_every_n_epochs: int | None = Field(default=None, ge=1, description="Intermediate save every N epochs.")
    checkpoint_every_n_steps: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Write a resumable checkpoint (weights, optimizer, LR scheduler, RNG, data position, EMA) every N steps "
            "to <output_dir>/checkpoints/stepNNNNNN; Ctrl-C / SIGTERM also writes one. null: only on Ctrl-C."
        ),
    )
    keep_last_n_checkpoints: int = Field(
        default=2, ge=0, description="Keep the newest N checkpoints, delete older ones (0 keeps all)."
    )
    save_on_stop: bool = Field(
        default=True,
        description=(
            "On Ctrl-C / SIGTERM also write <name>-stepNNNNNN.safetensors (the LoRA; a finetune as finetune_format) "
            "of the weights so far, beside the resumable checkpoint."
        ),
    )
    dtype: Dtype = Field(default="float32", description="dtype of the saved weights.")


class WandbConfig(Section):
    enabled: bool = Field(
        default=False,
        description="Also log metrics and sample images to Weights & Biases (needs the optional wandb extra).",
    )
    project: str = Field(default="tuneonce", min_length=1, description="W&B project name.")
    mode: Literal["offline", "online"] = Field(
        default="offline",
        description=(
            "offline: write the run under <log_dir>/wandb (no account or network; upload later with `wandb sync`); "
            "online: stream to the W&B server (needs `wandb login`)."
        ),
    )


class LoggingConfig(Section):
    tensorboard: bool = Field(default=True, description="Write TensorBoard event files.")
    jsonl: bool = Field(default=True, description="Write metrics as one JSON object per line (metrics.jsonl).")
    log_dir: str | None = Field(default=None, description="Folder for logs; null uses <saving.output_dir>/logs.")
    every_n_steps: int = Field(default=1, ge=1, description="Log metrics every N optimizer steps.")
    wandb: WandbConfig = Field(default_factory=WandbConfig, description="Weights & Biases, beside TensorBoard/JSONL.")


# --------------------------------------------------------------------------- memory

QuantMode = Literal["none", "bfloat16", "float8", "int8", "nf4"]


class QuantizeConfig(Section):
    denoiser: QuantMode = Field(
        default="none",
        description=(
            "Storage of the frozen denoiser's Linear weights (weight-only; LoRA/DoRA factors and optimizer state stay "
            "in model.train_dtype): none (train_dtype), bfloat16, float8 (e4m3, per-row scale), int8 (per-row "
            "absmax), nf4 (QLoRA's 4-bit normal float, blocks of 64). Not with method: finetune."
        ),
    )
    text_encoder: QuantMode = Field(default="none", description="Storage of the first text encoder's Linear weights.")
    text_encoder_2: QuantMode = Field(default="none", description="Storage of the 2nd text encoder's Linear weights.")
    text_encoder_3: QuantMode = Field(default="none", description="Storage of the third text encoder's Linear weights.")

    def by_component(self, backbone: str) -> dict[str, str]:
        """Pipeline component name -> mode, for the components that are quantized (backbone: unet/transformer)."""
        modes = {backbone: self.denoiser, **{k: v for k, v in self.model_dump().items() if k != "denoiser"}}
        return {name: mode for name, mode in modes.items() if mode != "none"}


class MemoryConfig(Section):
    quantize: QuantizeConfig = Field(
        default_factory=QuantizeConfig, description="Quantized storage of frozen base weights, per component."
    )
    offload_blocks: int = Field(
        default=0,
        ge=0,
        description=(
            "Keep this many of the denoiser's residual blocks in CPU memory and stream each to the accelerator just "
            "ahead of its use (forward and backward, overlapped on a CUDA side stream); 0 keeps all on the "
            "accelerator. Frozen weights only (method: lora)."
        ),
    )
    budget_gb: float | None = Field(
        default=None,
        gt=0,
        description=(
            "Accelerator memory budget in GiB (method: lora). At the start of a run the planner turns on gradient "
            "checkpointing, quantization and offload_blocks as needed to fit (keeping 10% free), starting from the "
            "settings above and never making one larger, and prints what it picked and the predicted peak; a budget "
            "nothing fits stops the run (exit 2). null: the settings above are used as written. "
            "scripts/inspect_model.py --memory shows the same plan."
        ),
    )


# --------------------------------------------------------------------------- the whole config


class TrainConfig(Section):
    config_version: int = Field(
        default=CONFIG_VERSION, ge=1, description="Schema version of this file; older versions are migrated on load."
    )
    model: ModelConfig = Field(description="The base model.")
    method: Method = Field(default="lora", description="lora: train adapters; finetune: train the full denoiser.")
    resume: str | None = Field(
        default=None,
        min_length=1,
        description=(
            "Continue a run: 'latest' (the newest loadable checkpoint in <saving.output_dir>/checkpoints; starts "
            "fresh when there is none) or a checkpoint folder; null starts fresh."
        ),
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapter settings (method: lora).")
    data: DataConfig = Field(description="Training images and their processing.")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="Optimizer and its switches.")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="Run length and LR schedule.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Loop settings.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Sample images during training.")
    validation: ValidationConfig = Field(default_factory=ValidationConfig, description="Held-out validation loss.")
    saving: SavingConfig = Field(default_factory=SavingConfig, description="Where and how results are saved.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Metrics logging.")
    memory: MemoryConfig = Field(
        default_factory=MemoryConfig, description="Quantized frozen weights and block offloading (README: Memory)."
    )

    @model_validator(mode="after")
    def _cross_field_rules(self) -> "TrainConfig":
        problems = check_rules(self)
        if self.config_version != CONFIG_VERSION:
            problems.insert(0, ("config_version", f"must be {CONFIG_VERSION}; older files load through load_config"))
        if problems:
            raise RuleViolation(problems)
        return self
