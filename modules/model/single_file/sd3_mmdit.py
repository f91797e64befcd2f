"""A diffusers SD3 / SD3.5 transformer in Stability's original MMDiT layout (``model.diffusion_model.joint_blocks...``,
as sd3.5_large.safetensors ships it): the inverse of diffusers' SD3 single-file converter, which reads every size
from the tensors and so loads toy models too.

Differences: q/k/v fused into ``attn.qkv`` (``x_block`` for image tokens, ``context_block`` for text, ``attn2`` for
SD3.5's dual attention); RMSNorm gains ``ln_q`` / ``ln_k``; the last block's context modulation and the final
layer's hold (shift, scale) where diffusers holds (scale, shift).
"""
from __future__ import annotations

import re

import torch

from tuneonce.model.single_file.flux_bfl import BflModule, swap_halves

MMDIT_PREFIX = "model.diffusion_model."


def mmdit_modules(diffusers_module_names: set[str]) -> list[BflModule]:
    """Original module <- diffusers module(s) for the blocks a model has (BflModule: fused parts, halves swap)."""
    blocks = sorted({int(m.group(1)) for n in diffusers_module_names if (m := re.match(r"transformer_blocks\.(\d+)\.", n))})
    last = blocks[-1] if blocks else -1
    table = [
        BflModule("x_embedder.proj", ("pos_embed.proj",)),
        BflModule("t_embedder.mlp.0", ("time_text_embed.timestep_embedder.linear_1",)),
        BflModule("t_embedder.mlp.2", ("time_text_embed.timestep_embedder.linear_2",)),
        BflModule("y_embedder.mlp.0", ("time_text_embed.text_embedder.linear_1",)),
        BflModule("y_embedder.mlp.2", ("time_text_embed.text_embedder.linear_2",)),
        BflModule("context_embedder", ("context_embedder",)),
        BflModule("final_layer.linear", ("proj_out",)),
        BflModule("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap_halves=True),
    ]
    for i in blocks:
        d, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        table += [
            BflModule(f"{x}attn.qkv", (f"{d}attn.to_q", f"{d}attn.to_k", f"{d}attn.to_v")),
            BflModule(f"{x}attn.proj", (f"{d}attn.to_out.0",)),
            BflModule(f"{x}attn.ln_q", (f"{d}attn.norm_q",)),
            BflModule(f"{x}attn.ln_k", (f"{d}attn.norm_k",)),
            BflModule(f"{x}attn2.qkv", (f"{d}attn2.to_q", f"{d}attn2.to_k", f"{d}attn2.to_v")),
            BflModule(f"{x}attn2.proj", (f"{d}attn2.to_out.0",)),
            BflModule(f"{x}attn2.ln_q", (f"{d}attn2.norm_q",)),
            BflModule(f"{x}attn2.ln_k", (f"{d}attn2.norm_k",)),
            BflModule(f"{x}adaLN_modulation.1", (f"{d}norm1.linear",)),
            BflModule(f"{x}mlp.fc1", (f"{d}ff.net.0.proj",)),
            BflModule(f"{x}mlp.fc2", (f"{d}ff.net.2",)),
            BflModule(f"{c}attn.qkv", (f"{d}attn.add_q_proj", f"{d}attn.add_k_proj", f"{d}attn.add_v_proj")),
            BflModule(f"{c}attn.proj", (f"{d}attn.to_add_out",)),
            BflModule(f"{c}attn.ln_q", (f"{d}attn.norm_added_q",)),
            BflModule(f"{c}attn.ln_k", (f"{d}attn.norm_added_k",)),
            BflModule(f"{c}adaLN_modulation.1", (f"{d}norm1_context.linear",), swap_halves=i == last),
            BflModule(f"{c}mlp.fc1", (f"{d}ff_context.net.0.proj",)),
            BflModule(f"{c}mlp.fc2", (f"{d}ff_context.net.2",)),
        ]
    return [m for m in table if any(p in diffusers_module_names for p in m.parts)]


def diffusers_to_mmdit(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers SD3Transformer2DModel state dict in the original MMDiT layout (with ComfyUI's prefix)."""
    modules = {key.rsplit(".", 1)[0] for key in state}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    if "pos_embed.pos_embed" in state:
        out["pos_embed"] = state["pos_embed.pos_embed"]
        used.add("pos_embed.pos_embed")
    for module in mmdit_modules(modules):
        for param in ("weight", "bias"):
            keys = [f"{part}.{param}" for part in module.parts]
            if not all(k in state for k in keys):
                continue
            fused = torch.cat([state[k] for k in keys], dim=0)
            out[f"{module.bfl}.{param}"] = swap_halves(fused) if module.swap_halves else fused
            used.update(keys)
    left = sorted(set(state) - used)
    if left:
        raise ValueError(f"no MMDiT name for {len(left)} transformer key(s): {', '.join(left[:5])}")
    return {MMDIT_PREFIX + k: v for k, v in out.items()}
