"""LoRA tensors in and out of PEFT models: the kohya/ComfyUI and diffusers/PEFT key layouts.

Layouts (docs/optimizer_math.md §9):
- kohya / ComfyUI: ``lora_unet_<module path with _>.lora_down.weight`` (PEFT lora_A), ``.lora_up.weight``
  (PEFT lora_B), ``.alpha`` (scalar; the network applies ``alpha / rank``), ``.dora_scale`` (DoRA magnitude).
  Text encoders: ``lora_te1_`` / ``lora_te2_`` for SDXL's two encoders, ``lora_te_`` for SD1.5's one.
- diffusers / PEFT: ``unet.<module path>.lora_A.weight``, ``.lora_B.weight``, ``.lora_magnitude_vector.weight``,
  ``text_encoder.…``, ``text_encoder_2.…``; alphas travel in the file metadata (``lora_adapter_metadata``).

Flux.1 / Chroma in the kohya layout use Black Forest Labs' module names (``lora_unet_double_blocks_0_img_attn_qkv``,
as sd-scripts writes them and ComfyUI / diffusers load them): our separate to_q/to_k/to_v (and single blocks'
proj_mlp) LoRAs become one LoRA of the fused projection, exactly: down factors stacked (rank = sum of ranks), up
factor block-diagonal. T5 text encoders are ``lora_te3_`` (kohya's prefix; diffusers 0.42 loads only CLIP's).

Module paths are the diffusers ones, which diffusers' ``load_lora_weights`` and ComfyUI both map; the few names
whose underscores diffusers' kohya converter cannot undo are written in the original SD (sgm) spelling instead.
Known limits of diffusers 0.42 (not of the files): its kohya converter keeps a single alpha for attention layers
when a file mixes alphas, and it drops kohya ``dora_scale`` keys; use the diffusers layout for DoRA in diffusers.
Its kohya-Flux converter splits ``single_blocks.N.linear1`` only at Flux.1's published width, drops the layers
outside the blocks (img_in, txt_in, time_in, vector_in, guidance_in, final_layer: it names them without the
``transformer.`` prefix), ignores final_layer alphas, and rejects ``lora_te3_`` (T5) keys; ComfyUI loads all of these.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from torch import nn

from tuneonce.config.families import ROWS

logger = logging.getLogger(__name__)

# Module paths that diffusers' kohya converter (which turns "_" into "." and repairs known names) cannot recover
# from the plain underscore spelling; kohya itself writes these in the sgm UNet's spelling, which it maps.
_KOHYA_SPECIAL_UNET_NAMES = {
    "add_embedding.linear_1": "label_emb_0_0",
    "add_embedding.linear_2": "label_emb_0_2",
}

UNET_COMPONENTS = ("unet", "transformer")
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' metadata key for per-component LoraConfigs


@dataclass
class LoraModuleWeights:
    """The adapter of one PEFT-wrapped module, in PEFT's orientation (down = lora_A, up = lora_B)."""

    component: str  # pipeline component: unet, text_encoder, text_encoder_2, transformer
    path: str  # module path inside the component, e.g. down_blocks.1.attentions.0.proj_in
    down: torch.Tensor  # r x in (conv: r x in x kh x kw)
    up: torch.Tensor  # out x r (conv: out x r x 1 x 1)
    alpha: float  # scale = alpha / r, also for rsLoRA (alpha is then the effective one)
    magnitude: torch.Tensor | None = None  # DoRA magnitude vector, PEFT's shape

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


def canonical_path(component: str, path: str) -> str:
    """The module path written to files: CLIP text encoders always under ``text_model.``.

    transformers 5 flattened CLIPTextModel (``encoder.layers.0...``) while CLIPTextModelWithProjection, older
    transformers, kohya and ComfyUI all spell ``text_model.encoder.layers.0...``; files use the latter.
    """
    if component.startswith("text_encoder") and not path.startswith(("text_model.", "text_projection")):
        return f"text_model.{path}"
    return path


def _strip_wrapper_prefix(name: str) -> str:
    # PeftModel wraps the model as base_model.model.<path>.
    prefix = "base_model.model."
    return name[len(prefix):] if name.startswith(prefix) else name


def lora_modules(model: nn.Module, adapter_name: str = "default") -> dict[str, LoraLayer]:
    """PEFT LoRA layers of ``model`` carrying ``adapter_name``, keyed by their module path."""
    found: dict[str, LoraLayer] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            found[_strip_wrapper_prefix(name)] = module
        elif isinstance(module, LoraLayer) and adapter_name in getattr(module, "lora_embedding_A", {}):
            raise ValueError(f"LoRA on embedding {name!r} cannot be written as a kohya/diffusers LoRA file")
    return found


def _effective_alpha(module: LoraLayer, adapter_name: str) -> float:
    # scaling is alpha/r (or alpha/sqrt(r) with rsLoRA); the file format always means alpha/r.
    return float(module.scaling[adapter_name]) * int(module.r[adapter_name])


def collect_lora_weights(components: Mapping[str, nn.Module], adapter_name: str = "default") -> list[LoraModuleWeights]:
    """Every LoRA adapter of every component, detached (no copies beyond what ``detach`` gives)."""
    weights: list[LoraModuleWeights] = []
    for component, model in components.items():
        for path, module in lora_modules(model, adapter_name).items():
            magnitude = None
            if module.use_dora.get(adapter_name, False):
                magnitude = module.lora_magnitude_vector[adapter_name].weight.detach()
            weights.append(
                LoraModuleWeights(
                    component=component,
                    path=canonical_path(component, path),
                    down=module.lora_A[adapter_name].weight.detach(),
                    up=module.lora_B[adapter_name].weight.detach(),
                    alpha=_effective_alpha(module, adapter_name),
                    magnitude=magnitude,
                )
            )
    if not weights:
        raise ValueError(f"no PEFT LoRA adapter named {adapter_name!r} found in components {sorted(components)}")
    return weights


def is_sdxl_like(components: Mapping[str, nn.Module]) -> bool:
    """SDXL (two text encoders, text_time conditioning) vs SD1.5-style naming of the text encoder prefix."""
    if "text_encoder_2" in components:
        return True
    unet = components.get("unet")
    config = getattr(unet, "config", None)
    return getattr(config, "addition_embed_type", None) == "text_time"


# Transformers whose kohya-layout LoRA uses BFL's module names (the rows of Flux and Chroma).
FLUX_LIKE_TRANSFORMERS = tuple(row.backbone_class for row in ROWS if row.kohya_lora and row.backbone == "transformer")
KOHYA_T5_PREFIX = "lora_te3"  # sd-scripts' prefix for the T5 encoder of Flux / SD3


def unwrapped_backbone(components: Mapping[str, nn.Module]) -> nn.Module | None:
    """The denoiser (transformer or unet) inside any DDP / PEFT wrapper; None if the components hold none."""
    model = components.get("transformer", components.get("unet"))
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def backbone_class(components: Mapping[str, nn.Module]) -> str:
    """Class name of the denoiser (unet or transformer), "" if none is among the components."""
    model = unwrapped_backbone(components)
    return type(model).__name__ if model is not None else ""


def is_flux_like(components: Mapping[str, nn.Module]) -> bool:
    """Flux.1 / Chroma: the kohya layout uses BFL's module names for these."""
    return backbone_class(components) in FLUX_LIKE_TRANSFORMERS


def _is_t5_path(path: str) -> bool:
    return ".SelfAttention." in path or ".DenseReluDense." in path or path.startswith(("encoder.block.", "text_model.encoder.block."))


def kohya_prefixes(sdxl: bool) -> dict[str, str]:
    """Component name -> kohya key prefix."""
    text = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"} if sdxl else {"text_encoder": "lora_te"}
    return {"unet": "lora_unet", "transformer": "lora_unet", **text}


def kohya_module_name(component: str, path: str, sdxl: bool) -> str:
    """The kohya key stem of one module, e.g. lora_unet_down_blocks_1_attentions_0_proj_in."""
    prefixes = kohya_prefixes(sdxl)
    if component not in prefixes:
        raise ValueError(f"component {component!r} has no kohya prefix; known: {', '.join(sorted(prefixes))}")
    if component in UNET_COMPONENTS and path in _KOHYA_SPECIAL_UNET_NAMES:
        return f"{prefixes[component]}_{_KOHYA_SPECIAL_UNET_NAMES[path]}"
    return f"{prefixes[component]}_{path.replace('.', '_')}"


def _kohya_entries(stem: str, w: LoraModuleWeights) -> dict[str, torch.Tensor]:
    entries = {f"{stem}.lora_down.weight": w.down, f"{stem}.lora_up.weight": w.up,
               f"{stem}.alpha": torch.tensor(w.alpha, dtype=torch.float32)}  # fmt: skip
    if w.magnitude is not None:
        # kohya/LyCORIS/ComfyUI keep the per-output-channel norm as (out, 1) / (out, 1, 1, 1), PEFT as (out,)
        # / (1, out, 1, 1); same numbers, and ComfyUI picks the norm axis from this shape.
        entries[f"{stem}.dora_scale"] = w.magnitude.reshape(w.up.shape[0], *([1] * (w.down.ndim - 1)))
    return entries


def to_kohya_state_dict(weights: list[LoraModuleWeights], sdxl: bool) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for w in weights:
        state.update(_kohya_entries(kohya_module_name(w.component, w.path, sdxl), w))
    return state


def _module_out_features(model: nn.Module) -> dict[str, int]:
    """Output width of every Linear-like module by its unwrapped path (LoRA-wrapped or not)."""
    out: dict[str, int] = {}
    for name, module in model.named_modules():
        features = getattr(module, "out_features", None)
        if isinstance(features, int):
            out.setdefault(_strip_wrapper_prefix(name), features)
    return out


def fuse_lora_parts(parts: list[LoraModuleWeights | None], rows: list[int], name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One LoRA (down, up, alpha) acting exactly as the given LoRAs on stacked output rows.

    ``parts[i]`` adapts output rows ``rows[i]`` (None: no LoRA there, its up rows stay zero). The fused down factor
    stacks the parts' down factors (rank = sum of ranks), the up factor is block-diagonal. If the parts' scales
    alpha/r differ, each up block carries its own scale and the fused alpha equals its rank (scale 1).
    """
    present = [p for p in parts if p is not None]
    if any(p.magnitude is not None for p in present):
        raise ValueError(f"{name}: a DoRA magnitude cannot be fused into one BFL module; set saving.format: diffusers")
    if any(p.down.ndim != 2 for p in present):
        raise ValueError(f"{name}: only Linear LoRAs can be fused")
    scales = [p.alpha / p.rank for p in present]
    total = sum(p.rank for p in present)
    same_scale = all(s == scales[0] for s in scales)
    down = torch.cat([p.down for p in present], dim=0)
    up = present[0].up.new_zeros(sum(rows), total)
    row, col = 0, 0
    for part, height in zip(parts, rows):
        if part is not None:
            if part.up.shape[0] != height:
                raise ValueError(f"{name}: LoRA of {part.path} has {part.up.shape[0]} output rows, the model {height}")
            up[row:row + height, col:col + part.rank] = part.up if same_scale else part.up * (part.alpha / part.rank)
            col += part.rank
        row += height
    return down, up, scales[0] * total if same_scale else float(total)


def to_kohya_bfl_state_dict(weights: list[LoraModuleWeights], transformer: nn.Module) -> dict[str, torch.Tensor]:
    """kohya keys with BFL module names for a Flux/Chroma transformer's LoRAs (text encoders: lora_te1 / lora_te3).

    A LoRA on a module with no BFL counterpart is an error naming it (the file would silently lose it otherwise).
    """
    from tuneonce.model.single_file.flux_bfl import flux_modules, swap_halves

    backbone = {w.path: w for w in weights if w.component in UNET_COMPONENTS}
    rows = _module_out_features(transformer)
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for module in flux_modules(set(backbone)):
        stem = f"lora_unet_{module.bfl.replace('.', '_')}"
        parts = [backbone.get(path) for path in module.parts]
        if len(parts) == 1:
            (only,) = parts
            down, up, alpha = only.down, only.up, only.alpha
            if only.magnitude is not None:
                magnitude = only.magnitude.reshape(up.shape[0], *([1] * (down.ndim - 1)))
                state[f"{stem}.dora_scale"] = swap_halves(magnitude) if module.swap_halves else magnitude
        else:
            down, up, alpha = fuse_lora_parts(parts, [rows[path] for path in module.parts], stem)
        state[f"{stem}.lora_down.weight"] = down
        state[f"{stem}.lora_up.weight"] = swap_halves(up) if module.swap_halves else up
        state[f"{stem}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        used.update(path for path, part in zip(module.parts, parts) if part is not None)
    unmapped = sorted(set(backbone) - used)
    if unmapped:
        raise ValueError(
            f"kohya BFL layout: no BFL module for the LoRA on transformer.{unmapped[0]}"
            + (f" (+{len(unmapped) - 1} more)" if len(unmapped) > 1 else "")
            + "; drop it from lora.targets or set saving.format: diffusers"
        )
    text = [w for w in weights if w.component not in UNET_COMPONENTS]
    for w in text:
        if _is_t5_path(w.path):
            stem = f"{KOHYA_T5_PREFIX}_{_strip_text_model(w.path).replace('.', '_')}"
        else:
            stem = kohya_module_name(w.component, w.path, sdxl=True)  # CLIP-L is lora_te1 in Flux files
        state.update(_kohya_entries(stem, w))
    return state


def _split_fused(stem: str, down: torch.Tensor, up: torch.Tensor, alpha: float, parts: tuple[str, ...],
                 rows: list[int], ranks: dict[str, int]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Per-part (down, up, alpha) of one fused BFL LoRA, for the parts the model adapts (with their ranks).

    Exact in both cases that occur: our block-diagonal files (ranks add up, each part its own rank block) and a
    fused LoRA trained as one (every part's rank equals the file's: all parts share the down factor).
    """
    file_rank = int(down.shape[0])
    scale = alpha / file_rank
    row_blocks = dict(zip(parts, torch.split(up, rows, dim=0)))
    adapted = [p for p in parts if p in ranks]
    for part in parts:
        if part not in ranks and row_blocks[part].abs().sum() > 0:
            raise ValueError(f"{stem}: the file adapts {part}, which has no LoRA in the model (add it to lora.targets)")
    out: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    col = 0
    block_diagonal = sum(ranks[p] for p in adapted) == file_rank
    for part in adapted if block_diagonal else ():
        block, end = row_blocks[part], col + ranks[part]
        if torch.count_nonzero(block[:, :col]) or torch.count_nonzero(block[:, end:]):
            block_diagonal = False
            break
        out[part] = (down[col:end], block[:, col:end], scale * ranks[part])
        col += ranks[part]
    if block_diagonal:
        return out
    if all(ranks[p] == file_rank for p in adapted):
        return {part: (down, row_blocks[part], alpha) for part in adapted}
    wanted = ", ".join(f"{p}: {ranks[p]}" for p in adapted)
    raise ValueError(f"{stem}: a fused rank-{file_rank} LoRA does not split into the model's ranks ({wanted})")


def kohya_bfl_to_module_keys(tensors: dict[str, torch.Tensor], components: Mapping[str, nn.Module],
                             adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """A kohya BFL Flux/Chroma LoRA in per-module kohya keys of ``components`` (the inverse of
    ``to_kohya_bfl_state_dict``); text encoder keys pass through, T5's ``lora_te3_`` renamed to its component."""
    from tuneonce.model.single_file.flux_bfl import flux_modules, swap_halves

    transformer = components["transformer"]
    ranks = {path: int(layer.r[adapter_name]) for path, layer in lora_modules(transformer, adapter_name).items()}
    rows = _module_out_features(transformer)
    table = {f"lora_unet_{m.bfl.replace('.', '_')}": m for m in flux_modules(set(rows))}
    prefixes = kohya_prefixes(is_sdxl_like(components))
    t5 = [c for c in components if c.startswith("text_encoder") and any(_is_t5_path(p) for p in lora_modules(components[c], adapter_name))]
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        stem, _, suffix = key.partition(".")
        if stem.startswith(f"{KOHYA_T5_PREFIX}_") and t5:
            out[f"{prefixes[t5[0]]}_{stem[len(KOHYA_T5_PREFIX) + 1:]}.{suffix}"] = value
        elif stem not in table:
            out[key] = value  # text encoders, or a key the generic loader then reports as unmatched
    for stem, module in table.items():
        if f"{stem}.lora_down.weight" not in tensors:
            continue
        down, up = tensors[f"{stem}.lora_down.weight"], tensors.get(f"{stem}.lora_up.weight")
        if up is None:
            raise ValueError(f"{stem}: needs both its lora_down and lora_up weights")
        up = swap_halves(up) if module.swap_halves else up
        alpha = float(tensors[f"{stem}.alpha"].item()) if f"{stem}.alpha" in tensors else float(down.shape[0])
        if len(module.parts) == 1:
            pieces = {module.parts[0]: (down, up, alpha)}
            if f"{stem}.dora_scale" in tensors:
                scale = tensors[f"{stem}.dora_scale"]
                out[f"{kohya_module_name('transformer', module.parts[0], True)}.dora_scale"] = (
                    swap_halves(scale) if module.swap_halves else scale
                )
        else:
            pieces = _split_fused(stem, down, up, alpha, module.parts, [rows[p] for p in module.parts], ranks)
        for part, (part_down, part_up, part_alpha) in pieces.items():
            name = kohya_module_name("transformer", part, True)
            out[f"{name}.lora_down.weight"] = part_down
            out[f"{name}.lora_up.weight"] = part_up
            out[f"{name}.alpha"] = torch.tensor(part_alpha)
    return out


def to_diffusers_state_dict(weights: list[LoraModuleWeights]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for w in weights:
        stem = f"{w.component}.{w.path}"
        state[f"{stem}.lora_A.weight"] = w.down
        state[f"{stem}.lora_B.weight"] = w.up
        if w.magnitude is not None:
            state[f"{stem}.lora_magnitude_vector.weight"] = w.magnitude
    return state


# ---------------------------------------------------------------------------------------------------- loading

_KOHYA_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha", ".dora_scale": "magnitude"}
_DIFFUSERS_SUFFIXES = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",
    ".alpha": "alpha",
}


def detect_layout(keys: list[str]) -> str:
    """"kohya" or "diffusers" from the key names; a clear error otherwise."""
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        return "kohya"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "diffusers"
    sample = ", ".join(keys[:3])
    raise ValueError(f"not a kohya or diffusers/PEFT LoRA file (keys look like: {sample})")


def _split_suffix(key: str, suffixes: dict[str, str]) -> tuple[str, str] | None:
    for suffix, kind in suffixes.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], kind
    return None


def _key_index(components: Mapping[str, nn.Module], adapter_name: str, layout: str, sdxl: bool):
    """Map a file's key stem to (component, path, layer) for every LoRA layer of the model."""
    index: dict[str, tuple[str, str, LoraLayer]] = {}
    for component, model in components.items():
        for raw_path, layer in lora_modules(model, adapter_name).items():
            for path in dict.fromkeys((canonical_path(component, raw_path), raw_path)):
                if layout == "kohya":
                    index[kohya_module_name(component, path, sdxl)] = (component, raw_path, layer)
                    if component == "text_encoder":  # accept either SD1.5's or SDXL's te1 spelling
                        index[kohya_module_name(component, path, not sdxl)] = (component, raw_path, layer)
                else:
                    index[f"{component}.{path}"] = (component, raw_path, layer)
    return index


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA file must be a .safetensors file: {path}")
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})


def _file_alpha(parts, component: str, module_path: str, rank: int, metadata_alphas: Mapping[str, float]) -> float:
    """The alpha a file means for one module (effective, i.e. scale = alpha / rank)."""
    if "alpha" in parts:
        return float(parts["alpha"][1].item())
    for path in (canonical_path(component, module_path), module_path, _strip_text_model(module_path)):
        if f"{component}.{path}" in metadata_alphas:
            return metadata_alphas[f"{component}.{path}"]
    if f"{component}.*" in metadata_alphas:
        return metadata_alphas[f"{component}.*"]
    return float(rank)  # no alpha anywhere: kohya's and diffusers' convention is alpha = rank (scale 1)


def _copy_into(target: torch.Tensor, value: torch.Tensor, key: str, reshape: bool = False) -> None:
    if reshape and target.numel() == value.numel():  # DoRA magnitudes: (out,), (out, 1), (1, out, 1, 1), ...
        value = value.reshape(target.shape)
    if target.shape != value.shape:
        raise ValueError(f"LoRA file key {key}: shape {tuple(value.shape)} does not fit the model's {tuple(target.shape)}")
    target.copy_(value.to(dtype=target.dtype, device=target.device))


def _strip_text_model(path: str) -> str:
    return path[len("text_model."):] if path.startswith("text_model.") else path


def diffusers_adapter_metadata(weights: list[LoraModuleWeights]) -> dict[str, object]:
    """diffusers' ``lora_adapter_metadata``: a LoraConfig per component, keys prefixed "<component>.".

    Ranks and alphas that differ from the component's most common one go into rank_pattern / alpha_pattern keyed
    by full module path (as diffusers itself does), so every module's alpha / rank survives exactly.
    """
    packed: dict[str, object] = {}
    for component in dict.fromkeys(w.component for w in weights):
        mine = [w for w in weights if w.component == component]
        rank = Counter(w.rank for w in mine).most_common(1)[0][0]
        alpha = Counter(w.alpha for w in mine).most_common(1)[0][0]
        config = {
            "r": rank,
            "lora_alpha": alpha,
            "rank_pattern": {w.path: w.rank for w in mine if w.rank != rank},
            "alpha_pattern": {w.path: w.alpha for w in mine if w.alpha != alpha},
            "target_modules": sorted(w.path for w in mine),
            "use_dora": any(w.magnitude is not None for w in mine),
            "use_rslora": False,  # alphas above are already the effective alpha/r ones
            "lora_bias": False,
        }
        packed.update({f"{component}.{key}": value for key, value in config.items()})
        if component.startswith("text_encoder"):
            # PEFT matches these names as suffixes: without "text_model." they fit the flattened CLIPTextModel of
            # transformers 5 and the nested one alike.
            for key in ("rank_pattern", "alpha_pattern"):
                packed[f"{component}.{key}"] = {_strip_text_model(p): v for p, v in config[key].items()}
            packed[f"{component}.target_modules"] = [_strip_text_model(p) for p in config["target_modules"]]
    return packed


def _alphas_from_diffusers_metadata(metadata: Mapping[str, str]) -> dict[str, float]:
    """Effective alpha of each ``component.path`` named or patterned in a diffusers file's metadata."""
    raw = metadata.get(LORA_ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    packed = json.loads(raw)
    alphas: dict[str, float] = {}
    for key, value in packed.items():
        if not key.endswith(".lora_alpha"):
            continue
        component = key[: -len(".lora_alpha")]
        rslora = bool(packed.get(f"{component}.use_rslora", False))
        rank = int(packed.get(f"{component}.r", 1))
        rank_pattern = packed.get(f"{component}.rank_pattern", {}) or {}
        alpha_pattern = packed.get(f"{component}.alpha_pattern", {}) or {}
        alphas[f"{component}.*"] = float(value) * (rank**0.5 if rslora else 1.0)
        for path, alpha in alpha_pattern.items():
            module_rank = int(rank_pattern.get(path, rank))
            alphas[f"{component}.{path}"] = float(alpha) * (module_rank**0.5 if rslora else 1.0)
    return alphas


@torch.no_grad()
def load_lora_into_peft(
    path: str | Path, components: Mapping[str, nn.Module], adapter_name: str = "default"
) -> list[str]:
    """Copy a kohya or diffusers LoRA file into the PEFT adapters already injected in ``components``.

    Every key of the file must find its module (else ValueError listing the unmatched keys) and fit its shape.
    A file's alpha replaces the adapter's, so the loaded LoRA acts exactly as saved. Modules of the model that
    the file does not cover keep their initialisation (logged). Returns the loaded ``component.path`` names.
    """
    tensors, metadata = read_lora_file(path)
    layout = detect_layout(list(tensors))
    if layout == "kohya" and is_flux_like(components):
        tensors = kohya_bfl_to_module_keys(tensors, components, adapter_name)
    index = _key_index(components, adapter_name, layout, is_sdxl_like(components))
    suffixes = _KOHYA_SUFFIXES if layout == "kohya" else _DIFFUSERS_SUFFIXES

    grouped: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    unmatched: list[str] = []
    for key, value in tensors.items():
        split = _split_suffix(key, suffixes)
        if split is None or split[0] not in index:
            unmatched.append(key)
            continue
        grouped.setdefault(split[0], {})[split[1]] = (key, value)
    if unmatched:
        shown = ", ".join(sorted(unmatched)[:10]) + (f" (+{len(unmatched) - 10} more)" if len(unmatched) > 10 else "")
        raise ValueError(f"{path}: {len(unmatched)} key(s) match no LoRA module of the model: {shown}")

    metadata_alphas = _alphas_from_diffusers_metadata(metadata) if layout == "diffusers" else {}
    loaded: list[str] = []
    for stem, parts in grouped.items():
        component, module_path, layer = index[stem]
        if "down" not in parts or "up" not in parts:
            raise ValueError(f"{path}: module {stem} needs both its down/A and up/B weights")
        _copy_into(layer.lora_A[adapter_name].weight, parts["down"][1], parts["down"][0])
        _copy_into(layer.lora_B[adapter_name].weight, parts["up"][1], parts["up"][0])
        rank = int(layer.r[adapter_name])
        alpha = _file_alpha(parts, component, module_path, rank, metadata_alphas)
        layer.lora_alpha[adapter_name] = alpha
        layer.scaling[adapter_name] = alpha / rank
        if "magnitude" in parts:
            if not layer.use_dora.get(adapter_name, False):
                raise ValueError(f"{path}: {parts['magnitude'][0]} is a DoRA magnitude but the model's adapter is plain LoRA")
            _copy_into(layer.lora_magnitude_vector[adapter_name].weight, parts["magnitude"][1], parts["magnitude"][0], reshape=True)
        loaded.append(f"{component}.{module_path}")
    missing = sorted({f"{c}.{p}" for c, p, _ in index.values()} - set(loaded))
    if missing:
        logger.warning("%s covers %d of %d LoRA modules; %d keep their initial weights (e.g. %s)",
                       path, len(loaded), len(loaded) + len(missing), len(missing), missing[0])
    return loaded
