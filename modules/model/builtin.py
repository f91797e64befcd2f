"""Built-in architectures: real diffusers/transformers classes built from bundled published configs.

``build_meta_components("sdxl")`` gives ``{"unet": UNet2DConditionModel, "text_encoder": CLIPTextModel,
"text_encoder_2": CLIPTextModelWithProjection}`` on the meta device: every parameter has its real
shape, nothing is allocated and nothing is downloaded. The VAE is left out (it is never trained).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from tuneonce.model.architectures import architecture_for

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class BuiltinModel:
    pipeline: str  # the diffusers pipeline class (decides text-encoder readouts)
    components: dict[str, str]  # pipeline component name -> config file stem in configs/


_SD3 = {"text_encoder": "clip_l_projection", "text_encoder_2": "clip_g", "text_encoder_3": "t5_xxl"}

BUILTINS: dict[str, BuiltinModel] = {
    "sd15": BuiltinModel("StableDiffusionPipeline", {"unet": "sd15_unet", "text_encoder": "clip_l"}),
    "sd21": BuiltinModel("StableDiffusionPipeline", {"unet": "sd21_unet", "text_encoder": "openclip_h"}),
    "sdxl": BuiltinModel(
        "StableDiffusionXLPipeline", {"unet": "sdxl_unet", "text_encoder": "clip_l", "text_encoder_2": "clip_g"}
    ),
    "sd35-medium": BuiltinModel("StableDiffusion3Pipeline", {"transformer": "sd35_medium_transformer", **_SD3}),
    "sd35-large": BuiltinModel("StableDiffusion3Pipeline", {"transformer": "sd35_large_transformer", **_SD3}),
    "flux-dev": BuiltinModel(
        "FluxPipeline", {"transformer": "flux1_dev_transformer", "text_encoder": "clip_l", "text_encoder_2": "t5_xxl"}
    ),
    "flux-schnell": BuiltinModel(
        "FluxPipeline",
        {"transformer": "flux1_schnell_transformer", "text_encoder": "clip_l", "text_encoder_2": "t5_xxl"},
    ),
    "chroma": BuiltinModel("ChromaPipeline", {"transformer": "chroma_transformer", "text_encoder": "t5_xxl"}),
    "z-image": BuiltinModel("ZImagePipeline", {"transformer": "z_image_transformer", "text_encoder": "qwen3_4b"}),
    "qwen-image": BuiltinModel(
        "QwenImagePipeline", {"transformer": "qwen_image_transformer", "text_encoder": "qwen25_vl_7b"}
    ),
    "flux2-dev": BuiltinModel(
        "Flux2Pipeline", {"transformer": "flux2_dev_transformer", "text_encoder": "mistral_small_31"}
    ),
    "flux2-klein-4b": BuiltinModel(
        "Flux2KleinPipeline", {"transformer": "flux2_klein_4b_transformer", "text_encoder": "qwen3_4b_causal"}
    ),
    "hidream": BuiltinModel(
        "HiDreamImagePipeline",
        {
            "transformer": "hidream_i1_transformer",
            "text_encoder": "clip_l_projection",
            "text_encoder_2": "clip_g",
            "text_encoder_3": "t5_xxl",
            "text_encoder_4": "llama31_8b",
        },
    ),
    "pixart-sigma": BuiltinModel("PixArtSigmaPipeline", {"transformer": "pixart_sigma_transformer", "text_encoder": "t5_xxl"}),
    "sana": BuiltinModel("SanaPipeline", {"transformer": "sana_1600m_transformer", "text_encoder": "gemma2_2b"}),
    "lumina2": BuiltinModel("Lumina2Pipeline", {"transformer": "lumina2_transformer", "text_encoder": "gemma2_2b"}),
    "auraflow": BuiltinModel("AuraFlowPipeline", {"transformer": "auraflow_transformer", "text_encoder": "pile_t5_xl"}),
    "wan21-t2v-14b": BuiltinModel("WanPipeline", {"transformer": "wan21_t2v_14b_transformer", "text_encoder": "umt5_xxl"}),
}


@lru_cache(maxsize=None)
def load_config(stem: str) -> dict:
    """A bundled config as a dict (keys starting with '_' other than '_class_name' removed)."""
    path = CONFIG_DIR / f"{stem}.json"
    if not path.is_file():
        raise ValueError(f"no bundled config {stem!r} (looked for {path})")
    raw = json.loads(path.read_text())
    if "_class_name" not in raw:
        raise ValueError(f"{path}: missing '_class_name'")
    return {k: v for k, v in raw.items() if k == "_class_name" or not k.startswith("_")}


def build_from_config(config: dict, device: torch.device | str = "meta") -> nn.Module:
    """Instantiate the real diffusers or transformers class named by config['_class_name'] on `device`."""
    import diffusers
    import transformers

    class_name = config["_class_name"]
    kwargs = {k: v for k, v in config.items() if not k.startswith("_") and k != "model_type"}
    with torch.device(device):
        if hasattr(diffusers, class_name) and issubclass(getattr(diffusers, class_name), diffusers.ModelMixin):
            return getattr(diffusers, class_name).from_config(kwargs)
        if hasattr(transformers, class_name):
            cls = getattr(transformers, class_name)
            return cls(cls.config_class(**kwargs))
    raise ValueError(f"config class {class_name!r} is neither a diffusers model nor a transformers model")


def builtin_names() -> list[str]:
    return sorted(BUILTINS)


def get_builtin(name: str) -> BuiltinModel:
    try:
        return BUILTINS[name]
    except KeyError:
        raise ValueError(f"unknown built-in model {name!r}; known: {', '.join(builtin_names())}") from None


def build_meta_components(name: str) -> dict[str, nn.Module]:
    """Pipeline component name -> real model on the meta device, from the bundled published configs."""
    model = get_builtin(name)
    return {component: build_from_config(load_config(stem)) for component, stem in model.components.items()}


_ADAPTABLE = (nn.Linear, nn.modules.conv._ConvNd)


def default_lora_targets(module: nn.Module) -> list[str]:
    """Module-name suffixes for PEFT ``LoraConfig(target_modules=...)``: attention, feed-forward, projections.

    The registry's suffixes are checked against the model: a suffix that also names something PEFT
    cannot adapt (Flux.2's ``attn.to_out`` is a Linear in single blocks but a ModuleList in double
    blocks) or reaches into an excluded part (a VL encoder's vision tower) is replaced by the full
    names of the layers it should hit.
    """
    arch = architecture_for(module)
    if arch is None:
        raise ValueError(
            f"no default LoRA targets for {type(module).__name__}; set the LoRA target_modules in the config"
        )
    named = [(name, child) for name, child in module.named_modules() if name]
    targets: list[str] = []
    for suffix in arch.lora_targets:
        hits = [(name, child) for name, child in named if name == suffix or name.endswith("." + suffix)]
        wanted = [
            name for name, child in hits
            if isinstance(child, _ADAPTABLE) and not name.startswith(tuple(p + "." for p in arch.lora_exclude))
        ]
        targets.extend([suffix] if len(wanted) == len(hits) and hits else wanted)
    if not targets:
        raise ValueError(f"the default LoRA targets of {type(module).__name__} match no Linear/Conv layer")
    return targets


__all__ = [
    "BUILTINS",
    "BuiltinModel",
    "build_from_config",
    "build_meta_components",
    "builtin_names",
    "default_lora_targets",
    "get_builtin",
    "load_config",
]
