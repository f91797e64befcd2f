"""Layer statistics of a sweep model, to explain why a best LR moves between models (docs/lr_transfer.md,
"Mechanism").

For every layer the LoRA adapts (the sweep's `default` targets), on a batch of the concept's latents at fixed
timesteps and noise: fan_in, fan_out, the RMS of the layer's input (sigma_in), the RMS gain of the frozen weight
(|W0 x| / |x|, measured on those inputs) and its spectral norm over the spectral condition's sqrt(fan_out/fan_in)
("A Spectral Condition for Feature Learning", Yang, Simon & Bernstein). Medians over layers summarise a model.

    python scripts/sweep_lr.py --config sweeps/v2.yaml --out runs/sweep_v2 --probe
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

import torch


@torch.no_grad()
def layer_statistics(model_dir: Path, concept_dir: Path, *, images: int = 8, seed: int = 0) -> list[dict]:
    """Per adapted layer: name, fan_in, fan_out, sigma_in, gain, spectral_ratio (see module docstring)."""
    from diffusers import DiffusionPipeline

    from tuneonce.config.schema import LoraConfig
    from tuneonce.demo.flux import family_parts
    from tuneonce.demo.prepare import _image_tensor
    from tuneonce.model.adapters import lora_target_names
    from tuneonce.model.objective import make_noise
    from tuneonce.trainer.train import lora_settings

    pipe = DiffusionPipeline.from_pretrained(model_dir, local_files_only=True)
    family, components, objective = family_parts(pipe)
    backbone = components[family.backbone]
    settings = lora_settings(family, LoraConfig(rank=8), text_encoder=False)
    names = lora_target_names(backbone, settings.targets, settings.layer_filter, settings.within)
    paths = sorted(concept_dir.glob("*.png"))[:images]
    latents = family.encode_latents(pipe.vae, _image_tensor(paths))
    captions = [p.with_suffix(".txt").read_text().strip() for p in paths]
    text = family.encode_text(components, captions)
    generator = torch.Generator().manual_seed(seed)
    noise = make_noise(latents, generator)
    t = objective.sample_timesteps(len(latents), generator, latents.device, latent_shape=tuple(latents.shape))

    stats: dict[str, dict] = {}

    def hook(name: str, layer: torch.nn.Module):
        def record(_module, inputs, output):
            x = inputs[0]
            weight = layer.weight
            if weight.ndim == 4:  # a conv: channels are the features
                x_feat, y_feat = x.movedim(1, -1), output.movedim(1, -1)
                matrix = weight.reshape(weight.shape[0], -1)
            else:
                x_feat, y_feat, matrix = x, output, weight
            if getattr(layer, "bias", None) is not None:
                y_feat = y_feat - layer.bias
            fan_out, fan_in = matrix.shape
            sigma = torch.linalg.matrix_norm(matrix.double(), ord=2).item()
            stats[name] = {"name": name, "fan_in": fan_in, "fan_out": fan_out,
                           "sigma_in": x_feat.pow(2).mean().sqrt().item(),
                           "gain": (y_feat.norm() / x_feat.norm()).item() if weight.ndim == 2 else
                           (y_feat.pow(2).sum() / x.pow(2).sum()).sqrt().item(),
                           "spectral_ratio": sigma / math.sqrt(fan_out / fan_in)}  # fmt: skip
        return record

    modules = dict(backbone.named_modules())
    handles = [modules[n].register_forward_hook(hook(n, modules[n])) for n in names]
    try:
        cond = family.conditioning({"latents": latents}, text, latents.device, latents.dtype)
        family.predict(backbone, objective.add_noise(latents, noise, t), t, text, cond)
    finally:
        for h in handles:
            h.remove()
    return [stats[n] for n in names if n in stats]


def write_layer_statistics(spec, out_dir: Path) -> Path:
    """<out_dir>/layer_stats.json: {model: {"summary": medians, "layers": rows}} for every model of `spec`'s axes."""
    import json

    from lab.sweep.models import prepare_data, prepare_model

    torch.manual_seed(0)
    concept, _ = prepare_data(out_dir / "data", spec.train_images, spec.val_images)
    names = dict.fromkeys(v if a.varies == "model" else spec.base_model for a in spec.axes for v in a.values)
    result = {}
    for name in names:
        rows = layer_statistics(prepare_model(spec.models[name], out_dir / "models"), concept)
        result[name] = {"summary": summary(rows), "layers": rows}
        print(name, {k: round(v, 4) for k, v in result[name]["summary"].items()}, flush=True)
    path = out_dir / "layer_stats.json"
    path.write_text(json.dumps(result, indent=1), encoding="utf-8")
    return path


def summary(rows: list[dict]) -> dict:
    """Medians over layers (and the count)."""
    keys = ("fan_in", "fan_out", "sigma_in", "gain", "spectral_ratio")
    return {"layers": len(rows), **{k: statistics.median(r[k] for r in rows) for k in keys}}
