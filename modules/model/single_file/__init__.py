"""`model.base_model` as one `.safetensors` file, as users download them, loaded offline.

- Flux.1 (dev/schnell) and Chroma transformer files in Black Forest Labs' layout (also with ComfyUI's
  ``model.diffusion_model.`` prefix) or already in diffusers' layout: converted by our own key map
  (``flux_bfl``), sizes read from the tensors, the config from ``model.components_from``'s transformer/config.json
  or else the bundled published one (modules/model/configs) with every size the tensors tell overridden.
- SDXL / SD1.5 / SD2 LDM checkpoints and SD3/3.5 files: diffusers' ``from_single_file`` with ``config=`` the local
  ``model.components_from`` folder (its configs and tokenizers; nothing is downloaded); components the file lacks
  come from that folder too.

The VAE, text encoders, tokenizers and scheduler a transformer-only file lacks come from ``model.components_from``
(a diffusers folder of the same family), or a one-line error names what is missing.

Writers for the original layouts (``save_bfl_transformer``, ``ldm.save_ldm_checkpoint``,
``sd3_mmdit.diffusers_to_mmdit``) export finetunes as single files and let the tests check the loaders exactly.
Why diffusers' converter is not used for Flux/Chroma: it hard-codes Flux.1's width (3072, MLP 12288).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tuneonce.config.families import families_where
from tuneonce.model.single_file.flux_bfl import COMFY_PREFIX, bfl_to_diffusers, diffusers_to_bfl

if TYPE_CHECKING:
    from tuneonce.model.families.base import ModelFamily

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
# Families whose checkpoints are a transformer in BFL's layout, loaded through load_flux_transformer.
FLUX_LIKE = families_where(lambda row: row.single_file_writer == "bfl")


def is_single_file(path: str | Path) -> bool:
    return Path(path).suffix == ".safetensors"


def _file_keys(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"model.base_model: checkpoint file {path} does not exist")
    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


def detect_family(keys: list[str]) -> str:
    """The model family a checkpoint's key names belong to: flux, chroma, sd3, sdxl, sd2, sd15."""
    names = [key[len(COMFY_PREFIX):] if key.startswith(COMFY_PREFIX) else key for key in keys]
    has = lambda prefix: any(name.startswith(prefix) for name in names)  # noqa: E731
    if has("double_blocks.") or has("transformer_blocks.") and has("single_transformer_blocks."):
        return "chroma" if has("distilled_guidance_layer.") else "flux"
    if has("joint_blocks.") or has("transformer_blocks.") and has("pos_embed"):
        return "sd3"
    if any(key.startswith("conditioner.embedders.1.") for key in keys) or has("label_emb."):
        return "sdxl"
    if any(key.startswith("cond_stage_model.model.") for key in keys):
        return "sd2"
    if has("input_blocks.") or any(key.startswith("cond_stage_model.transformer.") for key in keys):
        return "sd15"
    raise ValueError(f"model.base_model: cannot tell which model {len(keys)} keys belong to (e.g. {', '.join(keys[:3])})")


def check_family(family: ModelFamily, path: Path, keys: list[str]) -> str:
    found = detect_family(keys)
    if found != family.name:
        raise ValueError(f"model.base_model: {path.name} is a {found} checkpoint, not {family.name}; check model.family")
    return found


# ---- Flux / Chroma -------------------------------------------------------------------------------------------------
def save_bfl_transformer(transformer: torch.nn.Module, path: str | Path, *, comfy_prefix: bool = False) -> Path:
    """Write a diffusers Flux/Chroma transformer as one file in BFL's original layout (as flux1-dev.safetensors)."""
    state = diffusers_to_bfl({k: v.detach().cpu().contiguous() for k, v in transformer.state_dict().items()})
    prefix = COMFY_PREFIX if comfy_prefix else ""
    save_file({prefix + k: v.contiguous() for k, v in state.items()}, str(path))
    return Path(path)


def _bundled_transformer_config(family: str, guidance: bool) -> dict[str, Any]:
    name = "chroma_transformer" if family == "chroma" else "flux1_dev_transformer" if guidance else "flux1_schnell_transformer"
    config = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _count(state: dict[str, torch.Tensor], prefix: str) -> int:
    return len({key[len(prefix):].split(".", 1)[0] for key in state if key.startswith(prefix)})


def flux_transformer_config(family: str, state: dict[str, torch.Tensor], base: dict[str, Any] | None) -> dict[str, Any]:
    """The transformer config: ``base`` (components_from's) or the bundled one, with every size the tensors tell."""
    guidance = "time_text_embed.guidance_embedder.linear_1.weight" in state
    config = dict(base) if base is not None else _bundled_transformer_config(family, guidance)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    head_dim = int(state["transformer_blocks.0.attn.norm_q.weight"].shape[0])
    inner_dim = int(state["x_embedder.weight"].shape[0])
    config |= {
        "num_layers": _count(state, "transformer_blocks."),
        "num_single_layers": _count(state, "single_transformer_blocks."),
        "in_channels": int(state["x_embedder.weight"].shape[1]),
        "joint_attention_dim": int(state["context_embedder.weight"].shape[1]),
        "attention_head_dim": head_dim,
        "num_attention_heads": inner_dim // head_dim,
    }
    out_channels = int(state["proj_out.weight"].shape[0])
    if out_channels != config["in_channels"] * config.get("patch_size", 1) ** 2:
        config["out_channels"] = out_channels
    if family == "flux":
        config["guidance_embeds"] = guidance
        config["pooled_projection_dim"] = int(state["time_text_embed.text_embedder.linear_1.weight"].shape[1])
    else:
        config["approximator_num_channels"] = int(state["distilled_guidance_layer.in_proj.weight"].shape[1])
        config["approximator_hidden_dim"] = int(state["distilled_guidance_layer.in_proj.weight"].shape[0])
        config["approximator_layers"] = _count(state, "distilled_guidance_layer.layers.")
    rope = config.get("axes_dims_rope", ())
    if sum(rope) != head_dim:
        raise ValueError(
            f"model.components_from: the transformer config's axes_dims_rope {list(rope)} does not sum to the "
            f"checkpoint's head dim {head_dim}; give a diffusers folder whose transformer/config.json fits the file"
        )
    return config


def load_flux_transformer(family: str, path: Path, *, dtype: torch.dtype, components_from: Path | None) -> torch.nn.Module:
    """The diffusers transformer of a BFL (or diffusers-layout) Flux/Chroma file, exactly its weights."""
    from accelerate import init_empty_weights
    from diffusers import ChromaTransformer2DModel, FluxTransformer2DModel

    raw = load_file(str(path))
    bfl = any(k.startswith(("double_blocks.", COMFY_PREFIX + "double_blocks.")) for k in raw)
    converted = bfl_to_diffusers(raw) if bfl else raw
    del raw
    # Own aligned copies (not views into the file buffer), like the tensors a freshly built model holds; popped one
    # by one so a 12B checkpoint is not held twice.
    state = {k: converted.pop(k).to(dtype=dtype, copy=True) for k in list(converted)}
    base_file = components_from / "transformer" / "config.json" if components_from is not None else None
    base = json.loads(base_file.read_text()) if base_file is not None and base_file.is_file() else None
    config = flux_transformer_config(family, state, base)
    cls = ChromaTransformer2DModel if family == "chroma" else FluxTransformer2DModel
    with init_empty_weights():  # parameters on the meta device; buffers (Chroma's mod_proj) real
        model = cls.from_config(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        raise ValueError(f"model.base_model: {path.name} does not fit {cls.__name__}: {first[1].strip() if len(first) > 1 else first[0]}") from None
    return model.eval()


# ---- components from a folder ------------------------------------------------------------------------------------
def _check_components_folder(family: ModelFamily, path: Path, components_from: str | Path | None, provided: tuple[str, ...]) -> Path:
    if components_from is None:
        raise ValueError(
            f"model.components_from: {path.name} holds only the {family.name} {', '.join(provided)}; set "
            f"model.components_from to a diffusers {family.name} folder for the VAE, text encoders, tokenizers and scheduler"
        )
    folder = family.check_folder(components_from, field="model.components_from")
    index = json.loads((folder / "model_index.json").read_text())
    needed = [name for name, spec in index.items() if not name.startswith("_") and isinstance(spec, list)
              and spec[0] is not None and name not in provided]  # fmt: skip
    missing = [name for name in needed if not (folder / name).is_dir()]
    if missing:
        raise ValueError(f"model.components_from: {folder} lacks {', '.join(missing)} (needed beside {path.name})")
    return folder


def load_single_file(
    family: ModelFamily, path: str | Path, *, dtype: torch.dtype = torch.float32, components_from: str | Path | None = None
) -> dict[str, Any]:
    """Pipeline components (as ``ModelFamily.load`` returns) from a single-file checkpoint; never downloads."""
    path = Path(path)
    check_family(family, path, _file_keys(path))
    if family.name in FLUX_LIKE:
        folder = _check_components_folder(family, path, components_from, (family.backbone,))
        transformer = load_flux_transformer(family.name, path, dtype=dtype, components_from=folder)
        pipeline = family.pipeline_class.from_pretrained(str(folder), transformer=transformer, dtype=dtype, local_files_only=True)
        return dict(pipeline.components)
    if components_from is None:
        raise ValueError(
            f"model.components_from: {family.name} single files carry no configs or tokenizers offline; set "
            f"model.components_from to a diffusers {family.name} folder"
        )
    folder = family.check_folder(components_from, field="model.components_from")
    keys = _file_keys(path)
    # diffusers fills a component the file lacks from the config folder only if it finds diffusers-named weights
    # there (not transformers' model.safetensors): load those from the folder here and pass them in.
    index = json.loads((folder / "model_index.json").read_text())
    missing = {name: _load_component(folder, name, index[name], dtype)
               for name, prefixes in ORIGINAL_COMPONENT_PREFIXES.items()
               if name in index and not any(k.startswith(prefixes) for k in keys)}  # fmt: skip
    pipeline = family.pipeline_class.from_single_file(
        str(path), config=str(folder), local_files_only=True, torch_dtype=dtype, **missing
    )
    return dict(pipeline.components)


# Key prefixes of each pipeline component inside original single-file checkpoints (SD1/SD2, SDXL, SD3/3.5).
ORIGINAL_COMPONENT_PREFIXES: dict[str, tuple[str, ...]] = {
    "vae": ("first_stage_model.", "vae."),
    "text_encoder": ("cond_stage_model.", "conditioner.embedders.0.", "text_encoders.clip_l."),
    "text_encoder_2": ("conditioner.embedders.1.", "text_encoders.clip_g."),
    "text_encoder_3": ("text_encoders.t5xxl.",),
}


def _load_component(folder: Path, name: str, entry: list, dtype: torch.dtype) -> Any:
    """One model component of a diffusers folder, by its model_index.json `entry` [library, class] (None if it has
    none)."""
    import importlib

    library, class_name = entry
    if class_name is None:
        return None
    if not (folder / name).is_dir():
        raise ValueError(f"model.components_from: {folder} lacks {name}, which the single file does not hold either")
    cls = getattr(importlib.import_module(library), class_name)
    return cls.from_pretrained(str(folder / name), torch_dtype=dtype)
