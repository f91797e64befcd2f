"""Diffusers SD1.5 / SDXL pipelines written as one checkpoint in the original LDM / sgm layout (what A1111, ComfyUI
and kohya read, and what users download): the inverse of diffusers' ``from_single_file`` converters.

- UNet under ``model.diffusion_model.``: input_blocks / middle_block / output_blocks numbered as the original code
  builds them (``layers_per_block + 1`` entries per resolution), resnets ``in_layers`` / ``out_layers`` /
  ``emb_layers`` / ``skip_connection``; transformer blocks keep their names.
- VAE under ``first_stage_model.``: ``down.i.block.j``, ``mid.block_1`` / ``attn_1`` / ``block_2``, the decoder's
  ``up`` stages in reverse order, attention projections as 1x1 convolutions.
- Text encoders: SD1.5's CLIP-L under ``cond_stage_model.transformer.``; SDXL's CLIP-L under
  ``conditioner.embedders.0.transformer.`` and OpenCLIP-G under ``conditioner.embedders.1.model.`` (fused
  ``in_proj``, ``resblocks``, ``text_projection`` transposed).

Used to export a finetune as a single file and, in the tests, to check that a file in the original layout loads
back through ``model.base_model`` exactly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
                "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip
VAE_RESNET_NAMES = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}  # fmt: skip


def _rename(rest: str, names: dict[str, str]) -> str:
    for ours, theirs in names.items():
        if rest == ours or rest.startswith(ours + "."):
            return theirs + rest[len(ours):]
    return rest


def unet_key_map(unet: nn.Module) -> dict[str, str]:
    """diffusers UNet2DConditionModel key -> LDM key (without the ``model.diffusion_model.`` prefix)."""
    config = unet.config
    per_level = config.layers_per_block + 1 if isinstance(config.layers_per_block, int) else None
    if per_level is None:
        raise ValueError("a UNet with per-level layers_per_block has no single LDM numbering")
    out: dict[str, str] = {}
    for key in unet.state_dict():
        parts = key.split(".")
        if parts[0] == "down_blocks":
            i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                ldm = f"input_blocks.{per_level * i + j + 1}.0.{_rename(rest, RESNET_NAMES)}"
            elif kind == "attentions":
                ldm = f"input_blocks.{per_level * i + j + 1}.1.{rest}"
            else:  # downsamplers.0.conv
                ldm = f"input_blocks.{per_level * (i + 1)}.0.op.{rest.split('.', 1)[1]}"
        elif parts[0] == "up_blocks":
            i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                ldm = f"output_blocks.{per_level * i + j}.0.{_rename(rest, RESNET_NAMES)}"
            elif kind == "attentions":
                ldm = f"output_blocks.{per_level * i + j}.1.{rest}"
            else:  # upsamplers.0.conv sits after the resnet (and the attention, if the level has one)
                has_attention = "CrossAttn" in config.up_block_types[i]
                ldm = f"output_blocks.{per_level * i + per_level - 1}.{2 if has_attention else 1}.{rest}"
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            ldm = f"middle_block.{2 * j}.{_rename(rest, RESNET_NAMES)}" if kind == "resnets" else f"middle_block.1.{rest}"
        else:
            ldm = _rename(key, UNET_TOP)
            if ldm == key:
                raise ValueError(f"no LDM name for UNet key {key}")
        out[key] = ldm
    return out


def vae_key_map(vae: nn.Module) -> dict[str, str]:
    """diffusers AutoencoderKL key -> LDM key (without ``first_stage_model.``)."""
    levels = len(vae.config.block_out_channels)
    out: dict[str, str] = {}
    for key in vae.state_dict():
        parts = key.split(".")
        side = parts[0]
        if parts[1] in ("down_blocks", "up_blocks"):
            i, kind = int(parts[2]), parts[3]
            stage = f"down.{i}" if side == "encoder" else f"up.{levels - 1 - i}"
            if kind == "resnets":
                ldm = f"{side}.{stage}.block.{parts[4]}.{_rename('.'.join(parts[5:]), VAE_RESNET_NAMES)}"
            else:  # downsamplers.0.conv / upsamplers.0.conv
                ldm = f"{side}.{stage}.{'downsample' if kind == 'downsamplers' else 'upsample'}.{'.'.join(parts[5:])}"
        elif parts[1] == "mid_block":
            kind, j, rest = parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                ldm = f"{side}.mid.block_{j + 1}.{_rename(rest, VAE_RESNET_NAMES)}"
            else:
                ldm = f"{side}.mid.attn_1.{_rename(rest, VAE_ATTENTION_NAMES)}"
        else:
            ldm = key.replace("conv_norm_out", "norm_out")
        out[key] = ldm
    return out


def _clip_state(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """CLIP text model weights under the ``text_model.`` names every original checkpoint uses."""
    state = encoder.state_dict()
    return {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v for k, v in state.items()}


def open_clip_state(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection (OpenCLIP-G) in open_clip's layout: fused in_proj, resblocks, ln_final."""
    state = _clip_state(encoder)
    out: dict[str, torch.Tensor] = {
        "token_embedding.weight": state.pop("text_model.embeddings.token_embedding.weight"),
        "positional_embedding": state.pop("text_model.embeddings.position_embedding.weight"),
        "ln_final.weight": state.pop("text_model.final_layer_norm.weight"),
        "ln_final.bias": state.pop("text_model.final_layer_norm.bias"),
        "text_projection": state.pop("text_projection.weight").T.contiguous(),  # open_clip: x @ text_projection
    }
    layers = len({k.split(".")[3] for k in state if k.startswith("text_model.encoder.layers.")})
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}  # fmt: skip
    for i in range(layers):
        ours, theirs = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for param in ("weight", "bias"):
            out[f"{theirs}attn.in_proj_{param}"] = torch.cat([state.pop(f"{ours}self_attn.{p}_proj.{param}") for p in "qkv"])
            for mine, original in names.items():
                out[f"{theirs}{original}.{param}"] = state.pop(f"{ours}{mine}.{param}")
    if state:
        raise ValueError(f"no open_clip name for {', '.join(sorted(state)[:3])}")
    return out


def ldm_checkpoint(components: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The whole pipeline (unet, vae, text encoders) as one original-layout state dict; SDXL if it has two encoders."""
    unet, vae = components["unet"], components["vae"]
    state = {f"model.diffusion_model.{ldm}": unet.state_dict()[key] for key, ldm in unet_key_map(unet).items()}
    vae_state = vae.state_dict()
    for key, ldm in vae_key_map(vae).items():
        value = vae_state[key]
        if ".mid.attn_1." in ldm and ldm.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # the original VAE attention uses 1x1 convolutions
        state[f"first_stage_model.{ldm}"] = value
    if components.get("text_encoder_2") is not None:
        state |= {f"conditioner.embedders.0.transformer.{k}": v for k, v in _clip_state(components["text_encoder"]).items()}
        state |= {f"conditioner.embedders.1.model.{k}": v for k, v in open_clip_state(components["text_encoder_2"]).items()}
    else:
        state |= {f"cond_stage_model.transformer.{k}": v for k, v in _clip_state(components["text_encoder"]).items()}
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_ldm_checkpoint(components: dict[str, Any], path: str | Path) -> Path:
    """Write an SD1.5 / SDXL pipeline's weights as one original-layout .safetensors file."""
    save_file(ldm_checkpoint(components), str(path))
    return Path(path)
