"""The Flux demo base: its transformer comes from the shipped file only for that file's recipe (another recipe, or no
file, pretrains here), an old cached folder is rebuilt, and the shipped transformer really denoises its pretraining
domain (held-out draws, stars in magenta included) far better than a random init of its architecture."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file

from tuneonce.data import synthetic
from tuneonce.demo import flux
from tuneonce.demo.flux import (
    FLUX_FORMAT_VERSION, TRANSFORMER_ASSET_PATH, FluxPretrainSettings, held_out_validator, prepare_flux_demo_base,
)  # fmt: skip
from tuneonce.demo.prepare import MARKER_NAME
from tuneonce.model.tiny_flow import tiny_flux_transformer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _no_pretraining(*args, **kwargs):
    pytest.fail("the Flux transformer was pretrained although the shipped file matches its recipe")


@pytest.fixture(scope="module")
def shipped_base(tmp_path_factory) -> Path:
    """The Flux demo base prepared as train.py prepares it (SDXL demo base from its shipped files, then the Flux
    folder), with pretraining forbidden: the shipped transformer must be what it loads."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(flux, "_pretrain_here", _no_pretraining)
        return prepare_flux_demo_base(tmp_path_factory.mktemp("demo"))


def test_shipped_transformer_is_loaded_for_its_recipe_only(shipped_base: Path, monkeypatch) -> None:
    marker = json.loads((shipped_base / MARKER_NAME).read_text())
    assert marker["flux_format"] == FLUX_FORMAT_VERSION
    assert marker["transformer"] == f"shipped {TRANSFORMER_ASSET_PATH.name}"
    shipped = load_file(str(TRANSFORMER_ASSET_PATH))
    loaded = FluxPipeline.from_pretrained(shipped_base, local_files_only=True).transformer.state_dict()
    assert shipped.keys() == loaded.keys() and all(torch.equal(shipped[k].float(), loaded[k]) for k in shipped)

    root = shipped_base.parent
    calls = []

    def pretrain_here(pipe, settings, recipe):
        calls.append(recipe)
        return {"transformer": f"pretrained here ({recipe.steps} steps)"}

    monkeypatch.setattr(flux, "_pretrain_here", pretrain_here)
    other = dataclasses.replace(FluxPretrainSettings(), steps=2, images=8)  # another recipe: pretrained here
    assert prepare_flux_demo_base(root, pretrain=other) == shipped_base
    assert calls == [other]
    assert json.loads((shipped_base / MARKER_NAME).read_text())["transformer"] == "pretrained here (2 steps)"
    assert prepare_flux_demo_base(root, pretrain=FluxPretrainSettings(), asset_path=root / "missing.safetensors")
    assert calls == [other, FluxPretrainSettings()]  # no shipped file: pretrained here

    monkeypatch.setattr(flux, "_pretrain_here", _no_pretraining)
    prepare_flux_demo_base(root)  # the shipped recipe again: loaded, not pretrained
    # a folder cached by the previous format (random-init transformer, no recipe hash in its stamp) is rebuilt
    (shipped_base / MARKER_NAME).write_text(json.dumps({"flux_format": 2, "seed": 0, "source": marker["source"]}))
    torch.save({}, shipped_base / "stale.pt")
    prepare_flux_demo_base(root)
    assert not (shipped_base / "stale.pt").exists()
    assert json.loads((shipped_base / MARKER_NAME).read_text())["transformer_hash"] == marker["transformer_hash"]


def test_shipped_transformer_denoises_its_domain_far_better_than_its_init(shipped_base: Path) -> None:
    pipe = FluxPipeline.from_pretrained(shipped_base, local_files_only=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(flux.SEED)
        init = tiny_flux_transformer(guidance=True, latent_channels=pipe.vae.config.latent_channels)
    domain = FluxPretrainSettings().concept()
    magenta_stars = dataclasses.replace(synthetic.PRETRAIN_CONCEPT, shapes=("star",), colors=("magenta",))
    for concept in (domain, magenta_stars):  # held-out draws (seed + 500), fixed noise and timesteps
        held_out = held_out_validator(pipe, count=16, concept=concept)
        pretrained, random_init = held_out.loss(pipe.transformer), held_out.loss(init)
        assert pretrained < 0.25 * random_init, (concept.shapes, pretrained, random_init)
