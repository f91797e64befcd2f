"""Black Forest Labs' original Flux.1 / Chroma layout (as in flux1-dev.safetensors, ComfyUI and kohya) <-> diffusers.

One table of modules serves both the single-file checkpoints and kohya's BFL LoRA names. Every size comes from the
tensors (diffusers' own converter hard-codes the 3072-wide Flux.1), so toy models convert like the published ones.

Differences between the layouts:
- fused projections: ``double_blocks.i.img_attn.qkv`` = diffusers' to_q, to_k, to_v stacked along the output axis
  (``txt_attn.qkv`` likewise for add_q/k/v_proj); ``single_blocks.i.linear1`` = to_q, to_k, to_v, proj_mlp;
- ``final_layer.adaLN_modulation.1`` holds (shift, scale) where diffusers' ``norm_out.linear`` holds (scale, shift);
- RMSNorm gains are ``.scale`` in BFL, ``.weight`` in diffusers;
- ComfyUI's full checkpoints prefix every key with ``model.diffusion_model.``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

COMFY_PREFIX = "model.diffusion_model."


@dataclass(frozen=True)
class BflModule:
    """One BFL module and the diffusers modules it holds, stacked in this order along the output axis."""

    bfl: str
    parts: tuple[str, ...]
    swap_halves: bool = False  # final_layer.adaLN_modulation.1: (shift, scale) vs diffusers' (scale, shift)


def _block_indices(keys: list[str], pattern: str) -> list[int]:
    found = {int(m.group(1)) for key in keys if (m := re.match(pattern, key))}
    return sorted(found)


def flux_modules(diffusers_module_names: set[str]) -> list[BflModule]:
    """The BFL modules of a Flux/Chroma transformer whose diffusers modules are ``diffusers_module_names``.

    Only modules the model has are listed (Chroma has no per-block modulation, schnell no guidance embedder).
    """
    names = sorted(diffusers_module_names)
    table: list[BflModule] = [
        BflModule("img_in", ("x_embedder",)),
        BflModule("txt_in", ("context_embedder",)),
        BflModule("final_layer.linear", ("proj_out",)),
        BflModule("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap_halves=True),
        BflModule("distilled_guidance_layer.in_proj", ("distilled_guidance_layer.in_proj",)),
        BflModule("distilled_guidance_layer.out_proj", ("distilled_guidance_layer.out_proj",)),
    ]
    for bfl, ours in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"), ("guidance_in", "guidance_embedder")):
        table += [BflModule(f"{bfl}.in_layer", (f"time_text_embed.{ours}.linear_1",)),
                  BflModule(f"{bfl}.out_layer", (f"time_text_embed.{ours}.linear_2",))]  # fmt: skip
    for k in _block_indices(names, r"distilled_guidance_layer\.layers\.(\d+)\."):
        table += [BflModule(f"distilled_guidance_layer.layers.{k}.in_layer", (f"distilled_guidance_layer.layers.{k}.linear_1",)),
                  BflModule(f"distilled_guidance_layer.layers.{k}.out_layer", (f"distilled_guidance_layer.layers.{k}.linear_2",))]  # fmt: skip
    for i in _block_indices(names, r"transformer_blocks\.(\d+)\."):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        table += [
            BflModule(f"{b}img_attn.qkv", (f"{d}attn.to_q", f"{d}attn.to_k", f"{d}attn.to_v")),
            BflModule(f"{b}txt_attn.qkv", (f"{d}attn.add_q_proj", f"{d}attn.add_k_proj", f"{d}attn.add_v_proj")),
            BflModule(f"{b}img_attn.proj", (f"{d}attn.to_out.0",)),
            BflModule(f"{b}txt_attn.proj", (f"{d}attn.to_add_out",)),
            BflModule(f"{b}img_mlp.0", (f"{d}ff.net.0.proj",)),
            BflModule(f"{b}img_mlp.2", (f"{d}ff.net.2",)),
            BflModule(f"{b}txt_mlp.0", (f"{d}ff_context.net.0.proj",)),
            BflModule(f"{b}txt_mlp.2", (f"{d}ff_context.net.2",)),
            BflModule(f"{b}img_mod.lin", (f"{d}norm1.linear",)),
            BflModule(f"{b}txt_mod.lin", (f"{d}norm1_context.linear",)),
        ]
    for i in _block_indices(names, r"single_transformer_blocks\.(\d+)\."):
        s, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        table += [
            BflModule(f"{b}linear1", (f"{s}attn.to_q", f"{s}attn.to_k", f"{s}attn.to_v", f"{s}proj_mlp")),
            BflModule(f"{b}linear2", (f"{s}proj_out",)),
            BflModule(f"{b}modulation.lin", (f"{s}norm.linear",)),
        ]
    present = set(diffusers_module_names)
    return [m for m in table if any(p in present for p in m.parts)]


def flux_norm_gains(diffusers_module_names: set[str]) -> dict[str, str]:
    """BFL RMSNorm gain key -> diffusers key (``.scale`` -> ``.weight``)."""
    names = sorted(diffusers_module_names)
    out: dict[str, str] = {}
    for i in _block_indices(names, r"transformer_blocks\.(\d+)\."):
        d, b = f"transformer_blocks.{i}.attn.", f"double_blocks.{i}."
        out |= {f"{b}img_attn.norm.query_norm.scale": f"{d}norm_q.weight", f"{b}img_attn.norm.key_norm.scale": f"{d}norm_k.weight",
                f"{b}txt_attn.norm.query_norm.scale": f"{d}norm_added_q.weight",
                f"{b}txt_attn.norm.key_norm.scale": f"{d}norm_added_k.weight"}  # fmt: skip
    for i in _block_indices(names, r"single_transformer_blocks\.(\d+)\."):
        s, b = f"single_transformer_blocks.{i}.attn.", f"single_blocks.{i}."
        out |= {f"{b}norm.query_norm.scale": f"{s}norm_q.weight", f"{b}norm.key_norm.scale": f"{s}norm_k.weight"}
    for k in _block_indices(names, r"distilled_guidance_layer\.norms\.(\d+)"):
        out[f"distilled_guidance_layer.norms.{k}.scale"] = f"distilled_guidance_layer.norms.{k}.weight"
    return {bfl: ours for bfl, ours in out.items() if ours.rsplit(".", 1)[0] in diffusers_module_names}


def swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """(a, b) -> (b, a) along the output axis; its own inverse."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _module_names(keys) -> set[str]:
    return {key.rsplit(".", 1)[0] for key in keys}


def diffusers_to_bfl(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers Flux/Chroma transformer state dict in BFL's layout (what flux1-dev.safetensors holds)."""
    modules = _module_names(state)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for module in flux_modules(modules):
        for param in ("weight", "bias"):
            keys = [f"{part}.{param}" for part in module.parts]
            missing = [k for k in keys if k not in state]
            if len(missing) == len(keys):
                continue
            if missing:
                raise ValueError(f"cannot fuse {module.bfl}.{param}: the model has no {', '.join(missing)}")
            fused = torch.cat([state[k] for k in keys], dim=0)
            out[f"{module.bfl}.{param}"] = swap_halves(fused) if module.swap_halves else fused
            used.update(keys)
    for bfl, ours in flux_norm_gains(modules).items():
        out[bfl] = state[ours]
        used.add(ours)
    left = sorted(set(state) - used)
    if left:
        raise ValueError(f"no BFL name for {len(left)} transformer key(s): {', '.join(left[:5])}")
    return out


def bfl_split_sizes(module: BflModule, fused_rows: int, inner_dim: int) -> list[int]:
    """Output rows of each part of a fused BFL module: q, k, v are inner_dim wide, linear1's MLP part the rest."""
    if len(module.parts) == 1:
        return [fused_rows]
    sizes = [inner_dim] * 3 + ([fused_rows - 3 * inner_dim] if len(module.parts) == 4 else [])
    if sum(sizes) != fused_rows or min(sizes) <= 0:
        raise ValueError(f"{module.bfl}: {fused_rows} output rows do not split into {module.parts} at width {inner_dim}")
    return sizes


def strip_comfy_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Transformer keys without ComfyUI's ``model.diffusion_model.`` prefix (other keys, e.g. a VAE, dropped)."""
    if not any(key.startswith(COMFY_PREFIX) for key in state):
        return state
    return {key[len(COMFY_PREFIX):]: value for key, value in state.items() if key.startswith(COMFY_PREFIX)}


def bfl_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A BFL Flux/Chroma transformer state dict in diffusers' layout; sizes read from the tensors."""
    state = strip_comfy_prefix(state)
    if "img_in.weight" not in state:
        raise ValueError("not a BFL Flux/Chroma transformer: no img_in.weight")
    inner_dim = int(state["img_in.weight"].shape[0])
    # The diffusers module names this checkpoint implies: every BFL module, mapped back through the table.
    implied = _implied_diffusers_modules(state)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for module in flux_modules(implied):
        for param in ("weight", "bias"):
            key = f"{module.bfl}.{param}"
            if key not in state:
                continue
            fused = swap_halves(state[key]) if module.swap_halves else state[key]
            sizes = bfl_split_sizes(module, int(fused.shape[0]), inner_dim)
            for part, piece in zip(module.parts, torch.split(fused, sizes, dim=0)):
                out[f"{part}.{param}"] = piece.contiguous()
            used.add(key)
    for bfl, ours in flux_norm_gains(implied).items():
        if bfl in state:
            out[ours] = state[bfl]
            used.add(bfl)
    left = sorted(set(state) - used)
    if left:
        raise ValueError(f"{len(left)} BFL key(s) with no diffusers counterpart: {', '.join(left[:5])}")
    return out


def _implied_diffusers_modules(state: dict[str, torch.Tensor]) -> set[str]:
    """Diffusers module names (with every part of fused modules) for the block counts found in a BFL state dict."""
    keys = list(state)
    names: set[str] = {"x_embedder", "context_embedder", "proj_out", "norm_out.linear", "distilled_guidance_layer.in_proj",
                       "distilled_guidance_layer.out_proj"}  # fmt: skip
    for ours in ("timestep_embedder", "text_embedder", "guidance_embedder"):
        names |= {f"time_text_embed.{ours}.linear_1", f"time_text_embed.{ours}.linear_2"}
    for k in _block_indices(keys, r"distilled_guidance_layer\.layers\.(\d+)\."):
        names |= {f"distilled_guidance_layer.layers.{k}.linear_1", f"distilled_guidance_layer.layers.{k}.linear_2"}
    for k in _block_indices(keys, r"distilled_guidance_layer\.norms\.(\d+)\."):
        names.add(f"distilled_guidance_layer.norms.{k}")
    for i in _block_indices(keys, r"double_blocks\.(\d+)\."):
        d = f"transformer_blocks.{i}."
        names |= {f"{d}{m}" for m in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
                  "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
                  "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear", "norm1_context.linear", "attn.norm_q",
                  "attn.norm_k", "attn.norm_added_q", "attn.norm_added_k")}  # fmt: skip
    for i in _block_indices(keys, r"single_blocks\.(\d+)\."):
        s = f"single_transformer_blocks.{i}."
        names |= {f"{s}{m}" for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out", "norm.linear",
                                      "attn.norm_q", "attn.norm_k")}  # fmt: skip
    return names
