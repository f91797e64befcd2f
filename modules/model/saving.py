"""Writing what training produced: LoRA .safetensors files (kohya or diffusers layout), diffusers folders, and
full finetunes as one file in the original (BFL / MMDiT / LDM) layout.

Every write is atomic: a LoRA file goes to a temporary file in the same folder and is moved into place with
``os.replace``; a finetuned pipeline is saved into a temporary folder that is renamed when complete. An interrupted
save never leaves a half-written file where users (or a resume) would pick it up.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from tuneonce.config.families import FAMILY_FACTS, ROWS
from tuneonce.model import lycoris_files
from tuneonce.model.lora_files import (
    LORA_ADAPTER_METADATA_KEY,
    LoraModuleWeights,
    backbone_class,
    collect_lora_weights,
    diffusers_adapter_metadata,
    is_flux_like,
    is_sdxl_like,
    to_diffusers_state_dict,
    to_kohya_bfl_state_dict,
    to_kohya_state_dict,
    unwrapped_backbone,
)
from tuneonce.util.files import atomic_save, check_finite

LoraLayout = Literal["kohya", "diffusers"]
LORA_LAYOUTS: tuple[str, ...] = ("kohya", "diffusers")
SAVE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _tuneonce_version() -> str:
    try:
        from importlib.metadata import version

        return version("tuneonce")
    except Exception:  # not installed as a distribution (running from a checkout)
        return "0.1.0"


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """None keeps the trained dtype; otherwise one of float32 / float16 / bfloat16."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"save dtype {dtype!r} is not one of {', '.join(SAVE_DTYPES)}")
    return SAVE_DTYPES[dtype]


def base_model_version(components: Mapping[str, nn.Module], sdxl: bool | None = None) -> tuple[str, str]:
    """(kohya's ss_base_model_version, modelspec architecture) of the model the LoRA was trained on.

    kohya sd-scripts' values: sd_v1, sd_v2, sdxl_base_v1-0, flux1, chroma; "sd3" for SD3/3.5 (sd-scripts' SD3 value
    not verified here).
    """
    model = unwrapped_backbone(components)
    name = type(model).__name__
    config = getattr(model, "config", None)
    for row in ROWS:  # a transformer class names its family; the UNet families share one class
        if row.backbone != "unet" and row.backbone_class == name:
            plain = row.modelspec_without_guidance is not None and not getattr(config, "guidance_embeds", True)
            return row.kohya_version, row.modelspec_without_guidance if plain else row.modelspec_architecture
    if is_sdxl_like(components) if sdxl is None else sdxl:
        row = FAMILY_FACTS["sdxl"]
    elif getattr(config, "cross_attention_dim", None) == 1024:
        row = FAMILY_FACTS["sd2"]
    else:
        row = FAMILY_FACTS["sd15"]
    return row.kohya_version, row.modelspec_architecture


# kohya sd-scripts' network module per ss_base_model_version (its Flux trainer writes lora_flux, also for Chroma).
KOHYA_NETWORK_MODULES = {
    row.kohya_version: row.kohya_network_module for row in ROWS if row.kohya_network_module != "networks.lora"
}


def run_metadata(
    *,
    version: tuple[str, str],
    kind: str,
    layout: str,
    implementation: str,
    base_model: str = "",
    output_name: str = "",
    optimizer: Mapping[str, Any] | None = None,
    depth: Mapping[str, int] | int | None = None,
    training: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """The metadata every file of a run carries (all strings): what it was trained from and how.

    ``version``: (ss_base_model_version, modelspec architecture) from ``base_model_version``; ``kind`` "lora" makes
    the modelspec architecture ``<architecture>/lora``, "" leaves it as the model's (a finetuned checkpoint).
    ``training`` may carry ss-style facts the trainer knows (steps, resolution, ...); each becomes ``ss_<name>``.
    """
    ss_version, architecture = version
    meta: dict[str, str] = {
        "ss_base_model_version": ss_version,
        "ss_v2": str(ss_version == "sd_v2"),
        "ss_sd_model_name": Path(base_model).name if base_model else "",
        "ss_output_name": output_name,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{architecture}/{kind}" if kind else architecture,
        "modelspec.implementation": implementation,
        "modelspec.title": output_name,
        "tuneonce_version": _tuneonce_version(),
        "tuneonce_layout": layout,
        "tuneonce_base_model": base_model,
    }
    if optimizer is not None:
        meta["tuneonce_optimizer"] = json.dumps(dict(optimizer), sort_keys=True, default=str)
        if "type" in optimizer:
            meta["ss_optimizer"] = str(optimizer["type"])
        if "lr" in optimizer:
            meta["ss_learning_rate"] = str(optimizer["lr"])
    if depth is not None:
        meta["tuneonce_depth"] = json.dumps(depth if isinstance(depth, int) else dict(depth), sort_keys=True)
    for key, value in (training or {}).items():
        meta[f"ss_{key}"] = value if isinstance(value, str) else json.dumps(value, default=str)
    return meta


def lora_metadata(
    weights: list[LoraModuleWeights],
    *,
    sdxl: bool,
    layout: str,
    base_model: str = "",
    output_name: str = "",
    optimizer: Mapping[str, Any] | None = None,
    depth: Mapping[str, int] | int | None = None,
    training: Mapping[str, Any] | None = None,
    version: tuple[str, str] | None = None,
) -> dict[str, str]:
    """Safetensors metadata of a LoRA file: ``run_metadata`` plus kohya's ss_network_* keys and tuneonce's
    rank/alpha/components. ``version`` None picks SDXL or SD1 from ``sdxl``.
    """
    if version is None:
        row = FAMILY_FACTS["sdxl" if sdxl else "sd15"]
        version = (row.kohya_version, row.modelspec_architecture)
    rank = Counter(w.rank for w in weights).most_common(1)[0][0]
    alpha = Counter(w.alpha for w in weights).most_common(1)[0][0]
    dora = any(w.magnitude is not None for w in weights)
    conv = [w for w in weights if w.down.ndim == 4]
    network_args: dict[str, str] = {}
    if conv:
        network_args["conv_dim"] = str(Counter(w.rank for w in conv).most_common(1)[0][0])
        network_args["conv_alpha"] = str(Counter(w.alpha for w in conv).most_common(1)[0][0])
    if dora:
        network_args["dora_wd"] = "True"
    components = sorted({w.component for w in weights})
    text_encoder_trained = any(c.startswith("text_encoder") for c in components)
    meta = run_metadata(
        version=version, kind="lora", layout=layout, implementation="diffusers", base_model=base_model,
        output_name=output_name, optimizer=optimizer, depth=depth, training=training,
    )  # fmt: skip
    meta |= {
        "ss_network_module": KOHYA_NETWORK_MODULES.get(version[0], "networks.lora"),
        "ss_network_dim": str(rank),
        "ss_network_alpha": _number(alpha),
        "ss_network_args": json.dumps(network_args),
        "ss_network_train_unet_only": str(not text_encoder_trained),
        "ss_network_train_text_encoder_only": str(not any(c in ("unet", "transformer") for c in components)),
        "tuneonce_components": json.dumps(components),
        "tuneonce_rank": str(rank),
        "tuneonce_alpha": _number(alpha),
        "tuneonce_dora": str(dora),
        "tuneonce_num_modules": str(len(weights)),
    }
    return meta


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def lora_state_dict(
    components: Mapping[str, nn.Module],
    layout: LoraLayout = "kohya",
    *,
    dtype: str | torch.dtype | None = None,
    adapter_name: str = "default",
    sdxl: bool | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors ``save_lora`` writes (contiguous CPU copies), for callers that want them in memory."""
    if layout not in LORA_LAYOUTS:
        raise ValueError(f"LoRA layout {layout!r} is not one of {', '.join(LORA_LAYOUTS)}")
    weights = collect_lora_weights(components, adapter_name)
    sdxl = is_sdxl_like(components) if sdxl is None else sdxl
    if layout == "diffusers":
        state = to_diffusers_state_dict(weights)
    elif is_flux_like(components):
        state = to_kohya_bfl_state_dict(weights, components["transformer"])
    elif "transformer" in components:
        raise ValueError(f"the kohya layout is written for Flux/Chroma transformers, not {backbone_class(components)}; set saving.format: diffusers")
    else:
        state = to_kohya_state_dict(weights, sdxl)
    target = resolve_dtype(dtype)
    return {
        key: value.detach().to("cpu", dtype=target if target is not None and not key.endswith(".alpha") else None)
        .contiguous()
        .clone()
        for key, value in state.items()
    }


def save_lora(
    path: str | Path,
    components: Mapping[str, nn.Module],
    *,
    layout: LoraLayout = "kohya",
    dtype: str | torch.dtype | None = None,
    adapter_name: str = "default",
    base_model: str = "",
    output_name: str | None = None,
    optimizer: Mapping[str, Any] | None = None,
    depth: Mapping[str, int] | int | None = None,
    training: Mapping[str, Any] | None = None,
    sdxl: bool | None = None,
) -> Path:
    """Save the PEFT LoRA adapters of ``components`` ({"unet": ..., "text_encoder": ..., ...}) as one file.

    ``layout`` "kohya" (default; loads in ComfyUI, A1111/Forge, kohya, and diffusers' ``load_lora_weights``; Flux
    and Chroma with BFL module names, fused projections as one LoRA) or
    "diffusers" (PEFT key names, alphas in diffusers' ``lora_adapter_metadata``). ``dtype`` None keeps the trained
    dtype. ``sdxl`` picks lora_te1/lora_te2 vs lora_te naming; inferred from the components when None.
    Returns the written path.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA output path must end in .safetensors: {path}")
    sdxl = is_sdxl_like(components) if sdxl is None else sdxl
    if lycoris_files.has_lycoris(components, adapter_name):
        return _save_lycoris(path, components, layout=layout, dtype=dtype, adapter_name=adapter_name, sdxl=sdxl,
                             base_model=base_model, output_name=output_name, optimizer=optimizer, depth=depth,
                             training=training)  # fmt: skip
    tensors = lora_state_dict(components, layout, dtype=dtype, adapter_name=adapter_name, sdxl=sdxl)
    weights = collect_lora_weights(components, adapter_name)
    metadata = lora_metadata(
        weights,
        sdxl=sdxl,
        layout=layout,
        base_model=base_model,
        output_name=output_name if output_name is not None else path.stem,
        optimizer=optimizer,
        depth=depth,
        training=training,
        version=base_model_version(components, sdxl),
    )
    metadata["format"] = "pt"
    if layout == "diffusers":
        metadata[LORA_ADAPTER_METADATA_KEY] = json.dumps(diffusers_adapter_metadata(weights), indent=2, sort_keys=True)
    atomic_save(tensors, path, metadata)
    return path


def _save_lycoris(path: Path, components: Mapping[str, nn.Module], *, layout: str, dtype, adapter_name: str, sdxl: bool,
                  output_name: str | None, **facts: Any) -> Path:
    """A LoHa / LoKr file (lycoris_files.py) with kohya's LyCORIS metadata (ss_network_module lycoris.kohya)."""
    if layout != "kohya":
        raise ValueError(f"saving.format: LoHa/LoKr files are written in the kohya/LyCORIS layout only, not {layout!r}")
    if "unet" not in components:
        kind = backbone_class(components)
        raise ValueError(f"lora.type: LoHa/LoKr files are written for SD-family UNets, not {kind}")
    tensors, info = lycoris_files.lycoris_state_dict(components, sdxl=sdxl, adapter_name=adapter_name,
                                                     dtype=resolve_dtype(dtype))  # fmt: skip
    layers = [m for c in components.values() for m in lycoris_files.lycoris_layers(c, adapter_name).values()]
    lokr_options = {}
    if info["algo"] == "lokr":
        first = layers[0]
        lokr_options = {"lokr_factor": getattr(first, "tuneonce_lokr_factor", None),
                        "decompose_both": getattr(first, "tuneonce_decompose_both", None)}  # fmt: skip
    components_trained = sorted(c for c, m in components.items() if lycoris_files.lycoris_layers(m, adapter_name))
    meta = run_metadata(
        version=base_model_version(components, sdxl), kind="lora", layout=layout, implementation="diffusers",
        output_name=output_name if output_name is not None else path.stem, **facts,
    )  # fmt: skip
    meta |= {
        "ss_network_module": lycoris_files.KOHYA_LYCORIS_MODULE,
        "ss_network_dim": str(info["rank"]),
        "ss_network_alpha": _number(info["alpha"]),
        "ss_network_args": json.dumps(lycoris_files.lycoris_network_args(info, **lokr_options)),
        "ss_network_train_unet_only": str(not any(c.startswith("text_encoder") for c in components_trained)),
        "ss_network_train_text_encoder_only": str("unet" not in components_trained),
        "tuneonce_components": json.dumps(components_trained),
        "tuneonce_rank": str(info["rank"]),
        "tuneonce_alpha": _number(info["alpha"]),
        "tuneonce_adapter": info["algo"],
        "tuneonce_num_modules": str(info["modules"]),
        "format": "pt",
    }
    atomic_save(tensors, path, meta)
    return path


def _convert_safetensors_dtype(path: Path, dtype: torch.dtype) -> None:
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    converted = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(converted, str(path), metadata=metadata)


def save_diffusers_folder(pipeline, folder: str | Path, *, dtype: str | torch.dtype | None = None) -> Path:
    """Save a (finetuned) diffusers pipeline with ``save_pretrained``, atomically replacing ``folder``.

    Written into a temporary sibling folder first; the old folder (if any) is swapped out only once the new one is
    complete. ``dtype`` converts the floating-point weights of the written files (the in-memory model is left as
    it is); None keeps the training dtype.
    """
    folder = Path(folder)
    check_finite(
        ((f"{name}.{key}", value) for name, module in pipeline.components.items() if isinstance(module, nn.Module)
         for key, value in module.state_dict().items()), folder,
    )  # fmt: skip
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    target = resolve_dtype(dtype)
    try:
        pipeline.save_pretrained(staging, safe_serialization=True)
        if target is not None:
            for weights_file in staging.rglob("*.safetensors"):
                _convert_safetensors_dtype(weights_file, target)
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            folder.replace(old)
        staging.replace(folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


# ---- full finetunes as one file in the original layout (saving.finetune_format: single_file) ----------------------
def _bfl_state(components: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    from tuneonce.model.single_file.flux_bfl import diffusers_to_bfl

    return diffusers_to_bfl(unwrapped_backbone(components).state_dict())


def _mmdit_state(components: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    from tuneonce.model.single_file.sd3_mmdit import diffusers_to_mmdit

    return diffusers_to_mmdit(unwrapped_backbone(components).state_dict())


def _ldm_state(components: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    from tuneonce.model.single_file.ldm import ldm_checkpoint

    # The writer knows CLIP-L, not SD2's OpenCLIP-H layout.
    if base_model_version(components)[0] == FAMILY_FACTS["sd2"].kohya_version:
        raise ValueError("saving.finetune_format: single_file has no writer for SD2 (OpenCLIP-H); use diffusers")
    return ldm_checkpoint(dict(components))


@dataclass(frozen=True)
class SingleFileWriter:
    """How one family's finetune becomes one file: the layout's name, modelspec implementation and the state dict."""

    layout: str
    implementation: str
    state: Callable[[Mapping[str, nn.Module]], dict[str, torch.Tensor]]


BFL = SingleFileWriter("bfl", "https://github.com/black-forest-labs/flux", _bfl_state)  # transformer only
STABILITY = "https://github.com/Stability-AI/generative-models"  # modelspec.implementation of Stability's layouts
MMDIT = SingleFileWriter("mmdit", STABILITY, _mmdit_state)  # transformer only
LDM = SingleFileWriter("ldm", STABILITY, _ldm_state)  # UNet + VAE + CLIP
WRITERS = {writer.layout: writer for writer in (BFL, MMDIT, LDM)}
# The families whose row names a writer (as tuneonce.config.rules.SINGLE_FILE_FAMILIES).
SINGLE_FILE_WRITERS: dict[str, SingleFileWriter] = {
    row.name: WRITERS[row.single_file_writer] for row in ROWS if row.single_file_writer is not None
}


def single_file_writer(family: str) -> SingleFileWriter:
    if family not in SINGLE_FILE_WRITERS:
        raise ValueError(
            f"saving.finetune_format: single_file is not written for {family}; it works for "
            f"{', '.join(SINGLE_FILE_WRITERS)} (use diffusers)"
        )
    return SINGLE_FILE_WRITERS[family]


def finetune_state_dict(family: str, components: Mapping[str, nn.Module], *, dtype: str | torch.dtype | None = None
                        ) -> dict[str, torch.Tensor]:
    """The tensors ``save_finetune_file`` writes: the family's original layout, floats in ``dtype``, on the CPU.

    Tensors are popped one by one so a 12B transformer's fused copies are not held twice during the conversion."""
    target = resolve_dtype(dtype)
    state = single_file_writer(family).state(components)
    return {key: _saved_tensor(state.pop(key), target) for key in list(state)}


def _saved_tensor(value: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A CPU tensor as saved: floating-point values in ``dtype`` (None keeps theirs), integers as they are."""
    keep = dtype is None or not value.is_floating_point()
    return value.detach().to("cpu", dtype=None if keep else dtype).contiguous()


def save_finetune_file(
    path: str | Path,
    family: str,
    components: Mapping[str, nn.Module],
    *,
    dtype: str | torch.dtype | None = None,
    base_model: str = "",
    optimizer: Mapping[str, Any] | None = None,
    depth: Mapping[str, int] | int | None = None,
    training: Mapping[str, Any] | None = None,
) -> Path:
    """A full finetune as one ``.safetensors`` in the layout users load it in, written atomically with the run's
    metadata: Flux/Chroma the transformer in BFL's layout (as flux1-dev.safetensors; ComfyUI "Load Diffusion
    Model"), SD3/3.5 the transformer in the MMDiT layout, SDXL/SD1.5 the whole pipeline as an LDM checkpoint.
    Loads back as ``model.base_model`` (with ``model.components_from`` for transformer-only files)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"finetune output path must end in .safetensors: {path}")
    writer = single_file_writer(family)
    tensors = finetune_state_dict(family, components, dtype=dtype)
    metadata = run_metadata(
        version=base_model_version(components), kind="", layout=writer.layout, implementation=writer.implementation,
        base_model=base_model, output_name=path.stem, optimizer=optimizer, depth=depth, training=training,
    )  # fmt: skip
    metadata |= {"format": "pt", "tuneonce_family": family, "tuneonce_method": "finetune"}
    atomic_save(tensors, path, metadata)
    return path
