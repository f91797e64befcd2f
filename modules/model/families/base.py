"""The model-family interface: everything the generic loop needs to know about one kind of diffusion model.

A family loads its components from a local diffusers folder through the real `from_pretrained`, names its trainable
backbone and text encoders, encodes prompts, builds the backbone's extra conditioning (SDXL's size/crop ids) and the
training objective. The loop calls these hooks and never asks which model it has; a flow-matching family (Flux,
SD3) overrides `build_objective`, `encode_latents` and `predict` and nothing else changes.
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from tuneonce.config.families import FamilyFacts
from tuneonce.model.objective import DiffusionObjective

TextEmbeddings = dict[str, torch.Tensor]
# Row fields the classes carry as attributes (the hooks below read them as self.<field>).
ROW_FIELDS = (
    "name", "pipeline_class_name", "backbone", "text_encoders", "tokenizers", "backbone_attention",
    "backbone_feed_forward", "backbone_projections", "text_attention", "text_feed_forward", "backbone_blocks",
    "text_encoder_blocks",
)


class ModelFamily(ABC):
    # The family's row; a subclass that sets it gets the row's shared fields below as class attributes.
    facts: ClassVar[FamilyFacts]
    name: ClassVar[str]
    pipeline_class_name: ClassVar[str]  # diffusers pipeline class (model_index.json "_class_name")
    backbone: ClassVar[str]
    text_encoders: ClassVar[tuple[str, ...]]
    tokenizers: ClassVar[tuple[str, ...]]
    # LoRA target presets (config lora.targets) as module-name suffixes; None = every Linear layer.
    backbone_attention: ClassVar[tuple[str, ...]]
    backbone_feed_forward: ClassVar[tuple[str, ...]]
    backbone_projections: ClassVar[tuple[str, ...]]
    text_attention: ClassVar[tuple[str, ...]]
    text_feed_forward: ClassVar[tuple[str, ...]]
    # Where the residual blocks live ("all_linear" adapts every Linear under these prefixes).
    backbone_blocks: ClassVar[tuple[str, ...]]
    text_encoder_blocks: ClassVar[tuple[str, ...]]

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        row = cls.__dict__.get("facts")
        if row is not None:
            for field in ROW_FIELDS:
                setattr(cls, field, getattr(row, field))

    def backbone_target_presets(self) -> dict[str, tuple[str, ...] | None]:
        return {"default": self.facts.backbone_default_targets, "attn": self.backbone_attention, "all_linear": None}

    def text_encoder_target_presets(self) -> dict[str, tuple[str, ...] | None]:
        attn, ff = self.text_attention, self.text_feed_forward
        return {"default": attn + ff, "attn": attn, "all_linear": None}

    # ---- loading -------------------------------------------------------------------------------------------------
    @property
    def pipeline_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def check_folder(self, path: str | Path, field: str = "model.base_model") -> Path:
        """A clear error for a missing folder or a folder holding another family's pipeline (`field` names the
        config key the folder came from)."""
        folder = Path(path)
        index = folder / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(f"{field}: {folder} is not a diffusers folder (no model_index.json)")
        class_name = json.loads(index.read_text()).get("_class_name", "")
        accepted = (self.pipeline_class_name, *self.compatible_pipelines())
        if class_name not in accepted:
            raise ValueError(
                f"{field}: {folder} holds a {class_name}, not a {self.name} pipeline "
                f"({' or '.join(accepted)}); check model.family"
            )
        return folder

    def compatible_pipelines(self) -> tuple[str, ...]:
        return ()

    def load(
        self, path: str | Path, *, dtype: torch.dtype = torch.float32, components_from: str | Path | None = None
    ) -> dict[str, Any]:
        """Components (unet, vae, text encoders, tokenizers, scheduler) from a local folder, or from a single
        `.safetensors` checkpoint plus the diffusers folder `components_from` (tuneonce.model.single_file); never
        downloads."""
        from tuneonce.model.single_file import is_single_file, load_single_file

        if is_single_file(path):
            return load_single_file(self, path, dtype=dtype, components_from=components_from)
        if components_from is not None:
            raise ValueError(f"model.components_from: only used when model.base_model is a .safetensors file, not the folder {path}")
        folder = self.check_folder(path)
        pipeline = self.pipeline_class.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
        return dict(pipeline.components)

    def build_pipeline(self, components: dict[str, Any]):
        """A sampling pipeline sharing the (possibly adapted) training modules."""
        return self.pipeline_class(**components)

    def sampling_kwargs(self, components: dict[str, Any]) -> dict[str, Any]:
        """Extra keyword arguments of the pipeline call when sampling (e.g. the T5 length the model trains with)."""
        return {}

    def guidance_kwargs(self, cfg: float) -> dict[str, Any]:
        """The pipeline call's classifier-free guidance for a sample prompt's `cfg` (1 disables it)."""
        return {"guidance_scale": cfg}

    # ---- objective -----------------------------------------------------------------------------------------------
    def default_prediction_type(self, components: dict[str, Any]) -> str:
        return components["scheduler"].config.get("prediction_type", "epsilon")

    def build_objective(self, components: dict[str, Any], *, prediction_type: str = "auto", **options) -> DiffusionObjective:
        """`options`: timestep_sampling, logit_mean, logit_std, min_snr_gamma (see DiffusionObjective)."""
        from diffusers import DDPMScheduler

        # The training noise schedule is the DDPM one with the sampler's beta settings (as diffusers' scripts do).
        ddpm = DDPMScheduler.from_config(components["scheduler"].config)
        kind = self.default_prediction_type(components) if prediction_type == "auto" else prediction_type
        return DiffusionObjective(ddpm.alphas_cumprod.clone(), prediction_type=kind, **options)

    # ---- latents -------------------------------------------------------------------------------------------------
    def encode_latents(self, vae: nn.Module, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled VAE latents of pixels in [-1, 1]; with no generator the distribution's mean (deterministic)."""
        dist = vae.encode(pixels.to(vae.dtype)).latent_dist
        latents = dist.mean if generator is None else dist.sample(generator)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    # ---- text ----------------------------------------------------------------------------------------------------
    def tokenize(self, components: dict[str, Any], captions: list[str]) -> list[torch.Tensor]:
        ids = []
        for name in self.tokenizers:
            tok = components[name]
            ids.append(
                tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
            )
        return ids

    @abstractmethod
    def encode_text(self, components: dict[str, Any], captions: list[str]) -> TextEmbeddings:
        """Text embeddings the backbone is conditioned on (on the text encoders' device)."""

    # ---- backbone ------------------------------------------------------------------------------------------------
    def conditioning(self, batch: dict[str, Any], text: TextEmbeddings, device: torch.device, dtype: torch.dtype) -> dict:
        """Extra keyword arguments of the backbone's forward besides the text (none for SD1.5)."""
        return {}

    def predict(
        self, backbone: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, text: TextEmbeddings, conditioning: dict
    ) -> torch.Tensor:
        return backbone(noisy, timesteps, encoder_hidden_states=text["encoder_hidden_states"], return_dict=False, **conditioning)[0]
