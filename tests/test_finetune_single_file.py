"""saving.finetune_format: single_file — a full finetune saved as one .safetensors in the original layout (Flux /
Chroma: BFL transformer; SD3: MMDiT transformer; SDXL / SD1.5: LDM checkpoint) loads back through the same code path
as `model.base_model: file.safetensors` with exactly the trained weights, carries the run's metadata, and families
without a writer are a one-line config error.

diffusers' own `FluxTransformer2DModel.from_single_file` cannot read these tiny files: its Flux converter hard-codes
FLUX.1's width (3072). tests/test_single_file.py checks our BFL key map against that converter at the published width;
SD3 and SDXL files here are read by diffusers' `from_single_file` (through family.load)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tuneonce.config.rules import SINGLE_FILE_FAMILIES
from tuneonce.config import ConfigError, load_config
from tuneonce.model.families import get_family
from tuneonce.model.saving import SINGLE_FILE_WRITERS, finetune_state_dict, save_finetune_file
from tuneonce.model.single_file.flux_bfl import bfl_to_diffusers
from tuneonce.model.tiny import build_tiny_pipeline, tiny_pipeline_dir
from tuneonce.model.tiny_flow import build_tiny_flow_pipeline, tiny_flow_pipeline_dir
from tuneonce.trainer.train import train
from tests.builders import FLOW_RUN, tiny_train_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FINETUNE = {
    "method": "finetune",
    "validation": {"every_n_steps": 0, "folder": None},
    "saving": {"finetune_format": "single_file", "save_every_n_steps": 1},
}


def _metadata(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


def _assert_equal_states(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(loaded) == set(expected)
    different = [k for k in expected if not torch.equal(loaded[k], expected[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.parametrize("kind, family_name, architecture", [
    ("flux-dev", "flux", "flux-1-dev"),
    ("chroma", "chroma", "chroma"),
])  # fmt: skip
def test_flow_finetune_saves_one_bfl_file_that_loads_back(tmp_path_factory, data_dirs, kind, family_name, architecture):
    base = tiny_flow_pipeline_dir(kind, tmp_path_factory)
    out = tmp_path_factory.mktemp(f"{family_name}_single")
    cfg = tiny_train_config(family_name, base, data_dirs, out, defaults=FLOW_RUN, **FINETUNE)
    result = train(cfg, show_progress=False)

    final, intermediate = out / "run.safetensors", out / "run-step000001.safetensors"
    assert result.saved == [intermediate, final] and not (out / "run").exists()  # files, no diffusers folder
    trained = {k: v.float() for k, v in result.components["transformer"].state_dict().items()}
    # BFL names (fused qkv / linear1) and nothing else: what ComfyUI's "Load Diffusion Model" reads.
    raw = load_file(str(final))
    assert {"img_in.weight", "double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"} <= set(raw)
    assert not any(k.startswith(("transformer_blocks.", "vae.", "text_encoder")) for k in raw)
    _assert_equal_states(bfl_to_diffusers(raw), trained)

    # The same code path as model.base_model: run.safetensors (+ components_from for the VAE and text encoders).
    family = get_family(family_name)
    loaded = family.load(final, components_from=base)
    _assert_equal_states(loaded["transformer"].state_dict(), trained)
    fresh = family.load(base)["transformer"].state_dict()
    assert any(not torch.equal(fresh[k], v) for k, v in trained.items())  # training moved the weights

    # Intermediate saves follow the format: one step in, different weights, its own step count.
    first = family.load(intermediate, components_from=base)["transformer"].state_dict()
    assert any(not torch.equal(first[k], v) for k, v in trained.items())
    meta, meta_first = _metadata(final), _metadata(intermediate)
    assert (meta["ss_steps"], meta_first["ss_steps"]) == ("2", "1")
    assert meta["tuneonce_family"] == family_name and meta["tuneonce_method"] == "finetune"
    assert meta["tuneonce_layout"] == "bfl" and meta["modelspec.architecture"] == architecture
    assert meta["tuneonce_base_model"] == str(base) and meta["ss_output_name"] == "run"
    assert json.loads(meta["tuneonce_optimizer"]) == cfg.optimizer.model_dump(mode="json")
    assert set(json.loads(meta["tuneonce_depth"])) == {"transformer"}
    assert not any(k.startswith("ss_network") for k in meta)  # not a LoRA


def test_save_dtype_and_sd3_mmdit_file(tmp_path_factory, tmp_path):
    """SD3: the MMDiT transformer file reads back through diffusers' converter (family.load); saving.dtype bfloat16
    writes every float tensor as the trained one rounded to bfloat16."""
    pipe = build_tiny_flow_pipeline("sd3", seed=3)
    components = dict(pipe.components)
    path = save_finetune_file(tmp_path / "sd35.safetensors", "sd3", components, training={"steps": 7})
    loaded = get_family("sd3").load(path, components_from=tiny_flow_pipeline_dir("sd3", tmp_path_factory))
    _assert_equal_states(loaded["transformer"].state_dict(), pipe.transformer.state_dict())
    meta = _metadata(path)
    layout_facts = (meta["tuneonce_layout"], meta["modelspec.architecture"], meta["ss_steps"])
    assert layout_facts == ("mmdit", "stable-diffusion-3", "7")

    half = finetune_state_dict("sd3", components, dtype="bfloat16")
    full = finetune_state_dict("sd3", components)
    assert set(half) == set(full) and all(v.dtype == torch.bfloat16 for v in half.values())
    assert all(torch.equal(half[k], full[k].to(torch.bfloat16)) for k in full)


def test_sdxl_finetune_file_is_a_whole_ldm_checkpoint(tmp_path_factory, tmp_path):
    """SDXL / SD1.5 have an original-layout writer (UNet, VAE, both CLIPs): the file loads through diffusers'
    from_single_file with the local config folder, every component exact."""
    pipe = build_tiny_pipeline("sdxl", seed=3)
    with torch.no_grad():
        pipe.unet.conv_in.weight.add_(0.5)  # stands in for training: a weight no base has
    path = save_finetune_file(tmp_path / "sdxl.safetensors", "sdxl", pipe.components)
    family = get_family("sdxl")
    loaded = family.load(path, components_from=tiny_pipeline_dir("sdxl", tmp_path_factory))
    for name in ("unet", "vae", *family.text_encoders):
        _assert_equal_states(loaded[name].state_dict(), pipe.components[name].state_dict())
    assert _metadata(path)["modelspec.architecture"] == "stable-diffusion-xl-v1-base"


@pytest.mark.parametrize("family", ["sd2", "zimage", "qwenimage"])
def test_family_without_a_writer_is_a_one_line_config_error(tmp_path, family):
    """Rejected when the YAML loads, before any model does."""
    preset = tmp_path / "run.yaml"
    preset.write_text(
        f"model: {{family: {family}, base_model: models/{family}}}\nmethod: finetune\n"
        "data: {folders: [{path: imgs}], resolution: 64}\nschedule: {max_steps: 10}\n"
    )
    assert load_config(preset).saving.finetune_format == "diffusers"  # the default; presets without it keep loading
    with pytest.raises(ConfigError) as error:
        load_config(preset, ["saving.finetune_format=single_file"])
    message = str(error.value)
    assert "\n" not in message and "saving.finetune_format" in message
    assert f"single_file is not written for {family}; it works for flux, chroma, sd3, sdxl, sd15" in message
    lora = load_config(preset, ["saving.finetune_format=single_file", "method=lora", "saving.format=diffusers"])
    assert lora.method == "lora"  # a LoRA run does not use the finetune format
    assert set(SINGLE_FILE_WRITERS) == set(SINGLE_FILE_FAMILIES)
