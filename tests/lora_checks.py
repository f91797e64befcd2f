"""Checks shared by the tests that train a LoRA through `train()` and load the saved file in diffusers."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from tuneonce.model.families import get_family

CPU = torch.device("cpu")


def check_lora_file_reproduces(family_name: str, base: Path, result, components: tuple[str, ...]) -> None:
    """diffusers' load_lora_weights takes every tensor of the file and then predicts what the trained model does."""
    from safetensors.torch import load_file

    family = get_family(family_name)
    (lora_file,) = result.saved
    saved = load_file(str(lora_file))
    assert {key.split(".")[0] for key in saved} == set(components)
    pipe = family.pipeline_class.from_pretrained(str(base), local_files_only=True)
    pipe.load_lora_weights(str(lora_file), adapter_name="trained")
    loaded = {}
    for component in components:
        for name, param in pipe.components[component].named_parameters():
            if ".lora_" in name:
                key = name.replace(".trained.", ".").replace(".base_layer", "")
                loaded[f"{component}.{key}"] = param
    missing = [k for k in saved if family.backbone in k and k not in loaded]
    assert not missing, f"keys diffusers did not load: {missing[:3]}"
    for key, value in saved.items():
        if key in loaded:
            torch.testing.assert_close(loaded[key], value)
    g = torch.Generator().manual_seed(0)
    latents, t = torch.randn(1, 16, 16, 16, generator=g), torch.tensor([0.7])
    trained = result.components
    with torch.no_grad():
        text = family.encode_text(trained, ["a zxq star"])
        reloaded_text = family.encode_text(pipe.components, ["a zxq star"])  # the text encoder LoRA, if any
        torch.testing.assert_close(reloaded_text["encoder_hidden_states"], text["encoder_hidden_states"])
        cond = family.conditioning({}, text, CPU, torch.float32)
        expected = family.predict(trained["transformer"].eval(), latents, t, text, cond)
        got = family.predict(pipe.transformer, latents, t, text, cond)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def assert_adapters_trained(result, idle: tuple[str, ...] = ()) -> None:
    """`idle`: adapted layers whose output nothing reads (no gradient), which must stay at their zero init."""
    assert result.steps == 2 and math.isfinite(result.final_loss)
    assert all(math.isfinite(v) for _, v in result.val_losses) and result.val_losses[0][1] != result.val_losses[-1][1]
    lora_b = {n: p for n, p in result.components["transformer"].named_parameters() if ".lora_B." in n}
    unmoved = [n.split(".lora_B.")[0] for n, p in lora_b.items() if not p.abs().sum() > 0]
    assert lora_b and unmoved == list(idle), f"LoRA B did not move off its zero init: {unmoved}"
    frozen = [n for n, p in result.components["transformer"].named_parameters() if p.requires_grad and ".lora_" not in n]
    assert not frozen
