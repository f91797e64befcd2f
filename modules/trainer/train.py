"""`run_training(config)`: one run wired end to end (model, adapters, optimizer, data, loop, outputs).

Output layout under `saving.output_dir`:
    <name>.safetensors              the final LoRA (kohya layout by default) — finetune: <name>/ diffusers folder,
                                    or <name>.safetensors in the original layout (saving.finetune_format: single_file)
    <name>-step000100.safetensors   intermediate saves (saving.save_every_n_steps / _epochs; Ctrl-C with
                                    saving.save_on_stop)
    checkpoints/step000100/         resumable checkpoints (saving.checkpoint_every_n_steps, Ctrl-C; checkpoint.py)
    samples/step000100_00.png       sample images (sampling.every_n_steps; step000000_* with sampling.at_start,
                                    the last step with sampling.at_end)

Nothing non-finite is written: a non-finite step is undone (trainer/guard.py), and every writer refuses NaN/inf.
    logs/metrics.jsonl, logs/tensorboard/   metrics (logging.log_dir overrides logs/)
    cache/                          latent / text-embedding caches (data.cache_dir overrides)
"""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import torch

from tuneonce.model.adapters import LoraSettings, add_lora, check_dora_compatible, enable_gradient_checkpointing
from tuneonce.model.families import ModelFamily, get_family
from tuneonce.model.quantize import quantize_components
from tuneonce.optimizer.factory import build_optimizer
from tuneonce.trainer.checkpoint import (
    Checkpointer, DataPosition, StopSignal, drop_metrics_after, find_checkpoint, list_checkpoints, restore_run,
    trained_parameters,
)  # fmt: skip
from tuneonce.trainer.ema import EMA
from tuneonce.trainer.layout import RunPaths  # noqa: F401  (callers import it from here too)
from tuneonce.trainer.guard import Diverged, NonFiniteGuard
from tuneonce.trainer.loop import LoopHooks, StepParts, StopTraining, TrainState, endless, run_loop
from tuneonce.trainer.metrics import METRICS_FILE, MetricsLogger, progress_bar
from tuneonce.trainer.schedule import build_lr_scheduler

logger = logging.getLogger("tuneonce.train")

EXIT_DIVERGED = 3  # the CLI's exit code when training diverged (cli.py lists them all)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RunResult:
    """What a finished run reports (also returned by `train`, used by tests and the benchmark)."""

    steps: int
    final_loss: float
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    saved: list[Path] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    components: dict[str, Any] = field(default_factory=dict, repr=False)  # the trained pipeline components
    resumed_from: Path | None = None  # the checkpoint this run continued
    interrupted: bool = False  # stopped by Ctrl-C / SIGTERM before the last step
    diverged: str | None = None  # why the run stopped on non-finite steps (trainer/guard.py); nothing final saved
    checkpoint: Path | None = None  # the checkpoint written when interrupted


# ---- model ----------------------------------------------------------------------------------------------------------
BASE_PREPARERS = "tuneonce.base_preparers"  # entry-point group: folder name -> preparer (tuneonce.demo.bases)


def base_preparer(name: str) -> Callable[[Path], bool] | None:
    """The preparer registered for a base folder named `name`, loaded only when one is (others never import it)."""
    found = entry_points(group=BASE_PREPARERS, name=name)
    return next(iter(found)).load() if found else None


def ensure_base_model(config: Any) -> None:
    """A base folder named like a registered preparer's (the embedded demo's: workspace/demo/tiny_sdxl_base, base v1's
    tiny_sdxl_base_v1, tiny_flux_base) is prepared on first use, with its concept datasets beside it (cached: later
    calls return at once); the preparer leaves a folder of that name without its marker file alone (someone's own
    model). Other names load no preparer (the demo code imports diffusers): a wrong path is reported at once."""
    base = Path(config.model.base_model)
    prepare = base_preparer(base.name)
    if prepare is not None and prepare(base):
        return
    if base.suffix == ".safetensors":  # a single-file checkpoint: family.load checks it and components_from
        return
    if not (base / "model_index.json").is_file():
        raise FileNotFoundError(f"model.base_model: {base} is not a diffusers folder (no model_index.json)")


def lora_settings(family: ModelFamily, lora: Any, *, text_encoder: bool) -> LoraSettings:
    """Adapter settings of one component; a target preset becomes that component's module-name suffixes."""
    presets = family.text_encoder_target_presets() if text_encoder else family.backbone_target_presets()
    blocks = family.text_encoder_blocks if text_encoder else family.backbone_blocks
    targets = lora.targets
    if isinstance(targets, str):
        suffixes, within = presets[targets], blocks
    elif text_encoder:  # a suffix list names backbone layers; text encoders use their attention + MLP layers
        suffixes, within = presets["default"], blocks
    else:  # the user's own suffixes match anywhere: listing `proj_out` opts Flux's final layer in
        suffixes, within = tuple(targets), ()
    layer_filter = None if text_encoder else lora.layer_filter
    return LoraSettings(
        rank=lora.rank, alpha=lora.effective_alpha, dropout=lora.dropout, dora=lora.dora, targets=suffixes,
        within=within, layer_filter=tuple(layer_filter) if isinstance(layer_filter, list) else layer_filter,
        kind=lora.type, lokr_factor=lora.lokr_factor, lokr_decompose_both=lora.lokr_decompose_both,
    )  # fmt: skip


def setup_trainable(config: Any, family: ModelFamily, components: dict[str, Any]) -> dict[str, torch.nn.Module]:
    """Freeze everything, then add adapters (lora) or unfreeze the backbone (finetune); returns trained modules."""
    for name, module in components.items():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
    backbone = components[family.backbone]
    trained: dict[str, torch.nn.Module] = {family.backbone: backbone}
    if config.method == "finetune":
        backbone.requires_grad_(True)
    else:
        lora = config.lora
        check_dora_compatible(
            dora=lora.dora, optimizer_type=config.optimizer.type,
            spectral_scaling=config.optimizer.spectral_scaling, force=lora.force_dora_with_spectral,
        )  # fmt: skip
        add_lora(backbone, lora_settings(family, lora, text_encoder=False), component=family.backbone)
        for name in lora.train_text_encoders.enabled():
            if name not in family.text_encoders:
                raise ValueError(f"lora.train_text_encoders.{name}: family {family.name} has no {name}")
            add_lora(components[name], lora_settings(family, lora, text_encoder=True), component=name)
            trained[name] = components[name]
        if lora.init_lora:
            from tuneonce.model.lora_files import load_lora_into_peft

            load_lora_into_peft(lora.init_lora, trained)
    if config.training.gradient_checkpointing:
        for module in trained.values():
            enable_gradient_checkpointing(module)
    return trained


def param_infos_for(config: Any, trained: dict[str, torch.nn.Module], pipeline: str | None = None):
    """ParamInfos (role, fans, depth, LoRA pairs) of every trainable parameter, from the depth/roles code."""
    from tuneonce.model.roles import param_infos

    return param_infos(trained, depth_source=config.model.depth_source, depth_override=config.model.depth, pipeline=pipeline)


# ---- data -----------------------------------------------------------------------------------------------------------
def encoder_id(config: Any, what: str) -> str:
    """Identity of an encoder for the caches: folder, its weights' size and mtime, dtype."""
    folder = Path(config.model.base_model).resolve()
    stamp = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in (folder / what).glob("*.safetensors"))
    return f"{folder}|{what}|{stamp}|{config.model.vae_dtype if what == 'vae' else config.model.train_dtype}"


IN_MEMORY_CACHE_ITEMS = 4096  # keep cached latents in RAM up to this many images (~1 GB of SDXL 1024px latents)


def check_images(config: Any, datasets: list[Any], device: torch.device) -> None:
    """One warning line when images are enlarged (data.upscale: true) or train below data.resolution (false); an
    InputError when the largest training image would not fit in memory to encode (preflight.check_image_memory)."""
    from tuneonce.trainer.preflight import available_memory_bytes, check_image_memory

    upscaled = [item for d in datasets for item in d.upscaled()]
    if upscaled:
        record, bucket, factor = max(upscaled, key=lambda item: item[2])
        logger.warning(
            "warning: data.upscale: %d images are enlarged to fill their bucket, up to %.1fx (%s: %dx%d -> %dx%d)",
            len(upscaled), factor, record.path.name, *record.size, *bucket,
        )  # fmt: skip
    smaller = [r for d in datasets for r in d.below_resolution()]
    if smaller:
        key, value = ("data.resolutions", config.data.resolutions) if config.data.resolutions else (
            "data.resolution", config.data.resolution)  # fmt: skip
        logger.warning(
            "warning: %s %s: %d images are smaller and train at their own size (largest %dx%d); "
            "data.upscale: true would enlarge them", key, value, len({r.path for r in smaller}),
            *max((r.size for r in smaller), key=lambda s: s[0] * s[1]),
        )  # fmt: skip
    largest = max((d.largest_size() for d in datasets), key=lambda s: s[0] * s[1])
    if device.type == "cuda":
        available = torch.cuda.mem_get_info(device)[0]
    else:
        available = available_memory_bytes()
    check_image_memory(config, largest, available, on_cpu=device.type == "cpu")


def build_data(config: Any, family: ModelFamily, components: dict[str, Any], paths: RunPaths, accelerator: Any,
               trains_text: bool, datasets: tuple[Any, Any] | None = None):
    from tuneonce.data.dataset import build_datasets

    train_set, val_set = datasets or build_datasets(config.data, config.validation, seed=config.training.seed)
    vae, device = components["vae"], accelerator.device

    def encode_images(pixels: torch.Tensor) -> torch.Tensor:
        return family.encode_latents(vae, pixels.to(device)).float().cpu()

    def encode_captions(captions: list[str]) -> dict[str, torch.Tensor]:
        return {k: v.float().cpu() for k, v in family.encode_text(components, captions).items()}

    # Under DDP the main process fills the caches first; the others then read its files instead of encoding again.
    with accelerator.main_process_first():
        for dataset in (train_set, val_set):
            if dataset is None:
                continue
            in_memory = len(dataset) <= IN_MEMORY_CACHE_ITEMS
            if config.data.cache_latents:
                dataset.cache_latents(encode_images, encoder_id=encoder_id(config, "vae"), cache_dir=paths.cache_dir, in_memory=in_memory)
            if config.data.cache_text_embeddings and not trains_text:
                ids = "+".join(encoder_id(config, name) for name in family.text_encoders)
                dataset.cache_text_embeddings(encode_captions, encoder_id=ids, cache_dir=paths.cache_dir, in_memory=in_memory)
    # Each process takes its slice of the same global batches (the sampler shards; the loader is not prepared).
    loader = train_set.dataloader(
        config.training.batch_size, num_replicas=accelerator.num_processes, rank=accelerator.process_index
    )
    return train_set, loader, val_set


# ---- the run --------------------------------------------------------------------------------------------------------
def total_optimizer_steps(config: Any, batches_per_epoch: int) -> int:
    if config.schedule.max_steps is not None:
        return config.schedule.max_steps
    return max(1, config.schedule.epochs * batches_per_epoch // config.training.gradient_accumulation)


def save_outputs(config: Any, family: ModelFamily, components: dict[str, Any], trained: dict[str, torch.nn.Module],
                 paths: RunPaths, suffix: str, depth: dict[str, int], step: int | None = None) -> Path:
    """The LoRA file (saving.format layout) or, for a finetune, a diffusers folder or one original-layout file
    (saving.finetune_format); `suffix` marks intermediates, `step` the optimizer steps trained (metadata)."""
    from tuneonce.model import saving

    name = f"{config.saving.name}{suffix}"
    tcfg = config.training
    training = {"batch_size": tcfg.batch_size, "gradient_accumulation": tcfg.gradient_accumulation, "seed": tcfg.seed,
                "resolution": config.data.resolution, "max_steps": config.schedule.max_steps}  # fmt: skip
    if step is not None:
        training["steps"] = step
    run_facts = {"base_model": str(config.model.base_model), "optimizer": config.optimizer.model_dump(mode="json"),
                 "depth": depth, "training": training}  # fmt: skip
    if config.method == "finetune" and config.saving.finetune_format == "single_file":
        return saving.save_finetune_file(
            paths.output_dir / f"{name}.safetensors", family.name, components, dtype=config.saving.dtype, **run_facts
        )
    if config.method == "finetune":
        return saving.save_diffusers_folder(family.build_pipeline(components), paths.output_dir / name, dtype=config.saving.dtype)
    return saving.save_lora(
        paths.output_dir / f"{name}.safetensors", trained, layout=config.saving.format, dtype=config.saving.dtype,
        **run_facts,
    )


@dataclass
class Run:
    """Everything a run is made of, built once by `build_run`; `train` drives it, the benchmark times it."""

    config: Any
    family: ModelFamily
    components: dict[str, Any]  # unwrapped modules (what pipelines and savers see)
    trained: dict[str, torch.nn.Module]
    parts: StepParts
    infos: list
    loader: Any
    val_set: Any
    paths: RunPaths
    total_steps: int
    parking: Any = None  # trainer.parking.Parking: the encoders / VAE parked in CPU memory after caching


def optimizer_to_step(accelerator: Any, prepared: Any) -> torch.optim.Optimizer:
    """accelerate's optimizer wrapper does real work only with an fp16 grad scaler, XLA or DeepSpeed; elsewhere its
    per-step bookkeeping (about 1 ms per step on this CPU) is pure overhead, and the loop steps the optimizer itself
    only when gradients are synced, which is all the wrapper would add."""
    from accelerate.utils import DistributedType

    if accelerator.scaler is not None or accelerator.distributed_type in (DistributedType.XLA, DistributedType.DEEPSPEED):
        return prepared
    return prepared.optimizer


def check_room_for(config: Any, paths: RunPaths, trained: dict[str, torch.nn.Module]) -> None:
    """Free space in saving.output_dir for the final file and one checkpoint of the trained parameters."""
    from tuneonce.trainer.preflight import check_free_space, trained_output_bytes

    n = sum(p.numel() for module in trained.values() for p in module.parameters() if p.requires_grad)
    need, how = trained_output_bytes(config, n)
    check_free_space("saving.output_dir", paths.output_dir, None, need, how)


def build_run(config: Any) -> Run:
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    from tuneonce.data.dataset import build_datasets
    from tuneonce.trainer.preflight import check_outputs

    check_outputs(config)  # the CLI checked too; the GUI and the API start here
    paths = RunPaths.from_config(config)
    # Cheap checks first: the base model's path (the demo's base is prepared here, with its datasets), then the
    # data scan (image headers and captions), before accelerate or a model is loaded.
    ensure_base_model(config)
    datasets = build_datasets(config.data, config.validation, seed=config.training.seed)
    tcfg = config.training
    if tcfg.mixed_precision == "fp16" and PartialState().device.type == "cpu":  # accelerate would train in float32
        raise ValueError("training.mixed_precision: fp16 autocast needs a GPU (on CPU accelerate skips it and the run "
                         "is float32); use bf16 or no here, or model.train_dtype: float16 for half weights")
    accelerator = Accelerator(
        mixed_precision=tcfg.mixed_precision, gradient_accumulation_steps=tcfg.gradient_accumulation,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )  # under DDP: adapters the forward never reaches (SDXL's last text-encoder layer) get no gradient
    set_seed(tcfg.seed)
    device = accelerator.device
    check_images(config, [d for d in datasets if d is not None], device)  # before the model loads
    paths.output_dir.mkdir(parents=True, exist_ok=True)

    family = get_family(config.model.family)
    components = family.load(
        config.model.base_model, dtype=DTYPES[config.model.train_dtype], components_from=config.model.components_from
    )
    if components["vae"].dtype != DTYPES[config.model.vae_dtype]:
        components["vae"].to(dtype=DTYPES[config.model.vae_dtype])
    if config.memory.budget_gb is not None:  # the planner picks quantization, checkpointing, offloading to fit
        from tuneonce.trainer.budget import apply_budget

        config, line = apply_budget(config, family, components)
        if accelerator.is_main_process:
            print(line, flush=True)
    quantize_components(components, config.memory.quantize.by_component(family.backbone))  # before PEFT wraps
    trained = setup_trainable(config, family, components)
    check_room_for(config, paths, trained)
    offloader = None
    if config.memory.offload_blocks:  # the first N blocks stay in CPU memory and stream in (modules/model/offload.py)
        from tuneonce.model.offload import offload_backbone

        offloader = offload_backbone(components[family.backbone], family.backbone_blocks, config.memory.offload_blocks,
                                     compute=device)  # fmt: skip
    trains_text = len(trained) > 1
    # The encoders and VAE go first, to fill the caches; the parked ones leave before the denoiser arrives.
    from tuneonce.trainer.parking import Parking, parked_names

    parking = Parking(components, parked_names(config, family.text_encoders, trains_text), compute=device)
    for name, module in components.items():
        if name != family.backbone and isinstance(module, torch.nn.Module):
            module.to(device)
    _, loader, val_set = build_data(config, family, components, paths, accelerator, trains_text, datasets)
    parking.park()
    if offloader is not None:
        offloader.place()
    else:
        components[family.backbone].to(device)
    objective = family.build_objective(
        components, prediction_type=tcfg.prediction_type, timestep_sampling=tcfg.timestep_sampling,
        logit_mean=tcfg.logit_mean, logit_std=tcfg.logit_std, min_snr_gamma=tcfg.min_snr_gamma,
    )  # fmt: skip

    infos = param_infos_for(config, trained, family.pipeline_class_name)
    optimizer = build_optimizer(config.optimizer, infos)
    total_steps = total_optimizer_steps(config, len(loader))
    lr_scheduler = build_lr_scheduler(
        optimizer, kind=config.schedule.scheduler, warmup_steps=config.schedule.warmup_steps, total_steps=total_steps
    )
    # Only trained modules and the optimizer go through accelerate (DDP wrapping, autocast, grad sync).
    # (accelerate must not move an offloaded backbone's blocks onto the device: they are placed already)
    placement = None if offloader is None else [False] * (len(trained) + 1)
    prepared = accelerator.prepare(*trained.values(), optimizer, device_placement=placement)
    parts = StepParts(
        family=family, components=components, objective=objective, accelerator=accelerator,
        optimizer=optimizer_to_step(accelerator, prepared[-1]),
        lr_scheduler=lr_scheduler, trained_modules=list(prepared[:-1]), params=[info.param for info in infos],
        generator=torch.Generator(device=device).manual_seed(tcfg.seed), max_grad_norm=tcfg.max_grad_norm,  # same on every rank: loop.draw_noise
        noise_offset=tcfg.noise_offset, train_text=trains_text, dtype=DTYPES[config.model.train_dtype],
        guard=NonFiniteGuard(
            [info.param for info in infos], [info.name for info in infos], optimizer,
            max_bad=tcfg.max_nonfinite_steps, use_loss=accelerator.num_processes == 1,
            backup=tcfg.nonfinite_backup if tcfg.nonfinite_backup is not None else config.method == "lora",
            use_grads=accelerator.scaler is None,
        ),
    )  # fmt: skip
    return Run(config, family, components, trained, parts, infos, loader, val_set, paths, total_steps, parking)


class RunEvents:
    """What happens around the steps: logging, validation, samples and saves (main process only for files)."""

    def __init__(self, run: Run, result: RunResult, *, show_progress: bool, ema: EMA | None = None,
                 position: DataPosition | None = None) -> None:
        self.run, self.result, self.config, self.ema, self.position = run, result, run.config, ema, position
        accelerator = run.parts.accelerator
        self.main = accelerator.is_main_process
        logging_cfg = self.config.logging
        self.metrics = MetricsLogger(
            run.paths.log_dir, tensorboard=logging_cfg.tensorboard and self.main, jsonl=logging_cfg.jsonl and self.main,
            wandb=wandb_sink(self.config, run.paths.log_dir) if self.main else None,
        )
        self.bar = progress_bar(run.total_steps, disable=not show_progress or not self.main)
        self.depth = {info.component: info.spec.depth for info in run.infos}  # depth used, saved as metadata
        self.validator = None
        if run.val_set is not None and self.config.validation.every_n_steps:
            from tuneonce.trainer.validation import Validator

            self.validator = Validator(
                run.family, run.components, run.parts.objective,
                list(run.val_set.dataloader(self.config.training.batch_size, shuffle=False)),
                num_timesteps=self.config.validation.num_timesteps, seed=self.config.validation.seed,
                device=accelerator.device, dtype=run.parts.dtype, encode_text_each_time=run.parts.train_text,
                autocast=accelerator.autocast,
            )  # fmt: skip
        self.last_epoch = 0

    def weights(self) -> AbstractContextManager:
        """The weights that validation, samples and saved files use: the EMA's when it is on (as OneTrainer saves)."""
        return self.ema.applied() if self.ema is not None else nullcontext()

    def finished_epochs(self, state: TrainState) -> int:
        """Epochs whose last batch has been trained on. `state.epoch` moves on only when the next epoch's first
        batch is drawn, one step too late for an epoch's save; the data position knows at once."""
        if self.position is None:
            return state.epoch
        at = self.position.state_dict()
        return at["epoch"] + (at["position"] >= len(self.position.sampler))

    def resumed(self, state: TrainState) -> None:
        self.last_epoch = self.finished_epochs(state)
        self.bar.n = self.bar.last_print_n = state.step
        self.bar.refresh()

    def validate(self, state: TrainState) -> None:
        if self.validator is None or (self.result.val_losses and self.result.val_losses[-1][0] == state.step):
            return
        with self.weights():
            value = self.validator.loss(self.run.parts.backbone)
        self.result.val_losses.append((state.step, value))
        self.metrics.log(state.step, {"val_loss": value})
        self.bar.write(f"step {state.step}: validation loss {value:.5f}")

    def sample(self, state: TrainState) -> None:
        from tuneonce.trainer.sampling import sample_images

        if self.main and self.config.sampling.prompts:
            parking = self.run.parking.borrowed() if self.run.parking is not None else nullcontext()
            with self.weights(), parking:
                made = sample_images(
                    self.run.family, self.run.components, self.config.sampling.prompts, samples_dir=self.run.paths.samples_dir,
                    step=state.step, sampler=self.config.sampling.sampler, default_size=self.config.data.resolution,
                    device=self.run.parts.accelerator.device,
                )  # fmt: skip
            self.result.samples += made
            self.metrics.log_images(state.step, made, [p.prompt for p in self.config.sampling.prompts])

    def save(self, suffix: str, step: int) -> None:
        if self.main:
            run = self.run
            with self.weights():
                path = save_outputs(self.config, run.family, run.components, run.trained, run.paths, suffix, self.depth, step)
                self.result.saved.append(path)

    def on_step(self, state: TrainState, loss: torch.Tensor) -> None:
        cfg, total = self.config, self.run.total_steps
        if state.step % cfg.logging.every_n_steps == 0 or state.step == total:
            accelerator = self.run.parts.accelerator
            value = float(accelerator.reduce(loss, "mean") if accelerator.num_processes > 1 else loss)  # the global batch's
            lr = self.run.parts.optimizer.param_groups[0]["lr"]
            self.result.final_loss = value
            values = {"loss": value, "lr": lr, "epoch": state.epoch}
            guard = self.run.parts.guard
            if guard is not None and guard.last_step_bad:
                values["undone"] = True  # the guard restored the weights of before this step
            self.metrics.log(state.step, values)
            self.bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}", refresh=False)
        self.bar.update(1)
        if cfg.validation.every_n_steps and state.step % cfg.validation.every_n_steps == 0:
            self.validate(state)
        if cfg.sampling.every_n_steps and state.step % cfg.sampling.every_n_steps == 0:
            self.sample(state)
        if state.step < total:
            if cfg.saving.save_every_n_steps and state.step % cfg.saving.save_every_n_steps == 0:
                self.save(f"-step{state.step:06d}", state.step)
            finished = self.finished_epochs(state)
            if cfg.saving.save_every_n_epochs and finished > self.last_epoch:
                self.last_epoch = finished
                if finished % cfg.saving.save_every_n_epochs == 0:
                    self.save(f"-epoch{finished:04d}", state.step)

    def on_end(self, state: TrainState) -> None:
        self.result.steps = state.step
        self.validate(state)
        self.save("", state.step)  # the file first: it is what the run is for (samples can take minutes on CPU)
        every = self.config.sampling.every_n_steps
        if self.config.sampling.at_end and (not every or state.step % every):  # unless just made
            self.sample(state)

    def close(self) -> None:
        self.bar.close()
        self.metrics.close()


def wandb_sink(config: Any, log_dir: Path) -> Any:
    """The W&B run of logging.wandb (None when off); it gets the resolved config as its run config."""
    settings = config.logging.wandb
    if not settings.enabled:
        return None
    from tuneonce.trainer.wandb_log import WandbSink

    return WandbSink(project=settings.project, mode=settings.mode, log_dir=log_dir, name=config.saving.name,
                     config=config.model_dump(mode="json"))  # fmt: skip


def build_ema(config: Any, run: Run) -> EMA | None:
    ema = config.training.ema
    if not ema.enabled:
        return None
    return EMA(trained_parameters(run.trained), decay=ema.decay, update_every=ema.update_every, warmup=ema.warmup, on_cpu=ema.on_cpu)


def train(config: Any, *, show_progress: bool = True) -> RunResult:
    """Build the run, resume it from a checkpoint (`resume:`) or validate (and sample, `sampling.at_start`) once at
    step 0 (the baseline), train with checkpoints, and save; Ctrl-C / SIGTERM stop after the current step with a
    checkpoint. Returns what happened."""
    started = time.perf_counter()
    run = build_run(config)
    accelerator = run.parts.accelerator
    result = RunResult(steps=0, final_loss=float("nan"), components=run.components)
    ema = build_ema(config, run)
    snapshot = find_checkpoint(config.resume, run.paths.output_dir, rank=accelerator.process_index) if config.resume else None
    if snapshot is not None and accelerator.is_main_process and config.logging.jsonl:
        drop_metrics_after(run.paths.log_dir / METRICS_FILE, snapshot.step)  # the killed run's steps are redone
    state, position = TrainState(), DataPosition(run.loader.batch_sampler)
    events = RunEvents(run, result, show_progress=show_progress, ema=ema, position=position)
    saving = config.saving
    checkpointer = Checkpointer(run, position, ema, every=saving.checkpoint_every_n_steps, keep_last=saving.keep_last_n_checkpoints)
    on_step = ([lambda state, loss: ema.update(state.step)] if ema else []) + [events.on_step, checkpointer.on_step]
    try:
        if snapshot is None:
            events.validate(state)
            if config.sampling.at_start:
                events.sample(state)
        else:
            restore_run(snapshot, run, state, ema)
            events.resumed(state)
            result.resumed_from = snapshot.path
            logger.info("resumed from %s (step %d)", snapshot.path, state.step)
        batches = position.track(endless(lambda: run.loader, state))
        with StopSignal() as checkpointer.stop:
            run_loop(run.parts, batches, state, total_steps=run.total_steps, hooks=LoopHooks(on_step, [events.on_end]))
        result.steps = state.step
    except StopTraining as stopped:
        result.steps, result.interrupted, result.checkpoint = stopped.step, True, stopped.checkpoint
        if saving.save_on_stop:  # the weights so far, as OneTrainer saves on stop; named as an intermediate save
            events.save(f"-step{stopped.step:06d}", stopped.step)
    except Diverged as diverged:
        result.steps, result.diverged = diverged.step, str(diverged)
        found = list_checkpoints(checkpointer.root)
        result.checkpoint = found[-1] if found else None
    finally:
        events.close()
    result.seconds = time.perf_counter() - started
    return result


def run_training(config: Any) -> int:
    """Entry point of the CLI: train, print where the results are, return the exit code."""
    result = train(config)
    if result.resumed_from is not None:
        print(f"resumed from {result.resumed_from}")
    if result.diverged:
        kept = f"last good checkpoint: {result.checkpoint}" if result.checkpoint else "no checkpoint was written"
        print(f"error: {result.diverged}; {kept}", file=sys.stderr)
        return EXIT_DIVERGED
    if result.interrupted:
        print(f"stopped after step {result.steps}; checkpoint {result.checkpoint} (continue with --resume latest)")
        for path in result.saved:
            print(f"saved {path}")
        return 130  # like a shell's Ctrl-C
    print(f"trained {result.steps} steps in {result.seconds:.1f}s; final loss {result.final_loss:.4f}")
    if result.val_losses and result.val_losses[0][0] != 0:  # resumed: the step-0 baseline is in the first run's log
        print(f"validation loss {result.val_losses[-1][1]:.5f} at step {result.val_losses[-1][0]}")
    elif result.val_losses:
        first, last = result.val_losses[0][1], result.val_losses[-1][1]
        print(f"validation loss {first:.5f} -> {last:.5f} ({last / first:.3f}x)")
    for path in result.saved:
        print(f"saved {path}")
    return 0
