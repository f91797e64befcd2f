"""Regularization concepts with OneTrainer's prior prediction: the target of a regularization sample is the base
model's own prediction (adapter switched off), so a fresh adapter has exactly zero loss there, and once the main
concept has moved the adapter, that loss is positive and its gradient pulls the adapter's output back to the base."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from tuneonce.data.dataset import collate_batch
from tuneonce.data.synthetic import write_concept_dataset
from tuneonce.model.tiny import tiny_pipeline_dir
from tuneonce.model.tiny_flow import tiny_flow_pipeline_dir
from tuneonce.trainer import loop
from tuneonce.trainer.train import build_run
from tests.builders import FLOW_RUN, concept_data_dirs, tiny_train_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REG_WEIGHT = 0.5


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("prior")
    train_dir, val_dir = concept_data_dirs(root, train_count=4)
    write_concept_dataset(root / "reg", count=2, size=64, seed=9)
    for txt in (root / "reg").glob("*.txt"):  # class captions, as kohya's regularization folders carry
        txt.write_text("a star on a white background")
    return train_dir, val_dir, root / "reg"


def frozen_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy with PEFT's own switch turning every adapter off (independent of trainer/concepts.py)."""
    frozen = copy.deepcopy(module)
    for layer in frozen.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.enable_adapters(False)
    return frozen


# flux: a flow family, with a trained CLIP text encoder whose base output the prior prediction must use too
@pytest.mark.parametrize(("family", "kind"), [("sd15", "lora"), ("sd15", "loha"), ("flux", "lora")])
def test_prior_prediction_starts_at_zero_and_pulls_back_to_the_base(data, tmp_path_factory, family, kind):
    train_dir, val_dir, reg_dir = data
    flow = family == "flux"
    base = tiny_flow_pipeline_dir("flux-dev", tmp_path_factory) if flow else tiny_pipeline_dir(family, tmp_path_factory)
    folders = [{"path": str(train_dir)},
               {"path": str(reg_dir), "role": "regularization", "prior_prediction": True, "loss_weight": REG_WEIGHT}]
    out = tmp_path_factory.mktemp("out")
    lora = {"type": kind, "train_text_encoders": {"text_encoder": flow}}
    config = tiny_train_config(family, base, (train_dir, val_dir), out, defaults=FLOW_RUN if flow else None,
                               data={"folders": folders, "cache_text_embeddings": not flow}, lora=lora,
                               optimizer={"type": "adamw", "lr": 1e-2})
    run = build_run(config)
    parts, dataset = run.parts, run.loader.dataset
    reg_items = [dataset[i] for i in range(len(dataset)) if dataset[i]["prior_prediction"]]
    main_items = [dataset[i] for i in range(len(dataset)) if not dataset[i]["prior_prediction"]]
    assert len(reg_items) == 2 and len(main_items) == 4
    assert all(item["loss_weight"] == REG_WEIGHT for item in reg_items)
    reg_batch = collate_batch(reg_items)

    calls: list[tuple[tuple, torch.Tensor]] = []
    predict = parts.family.predict

    def recording(backbone, *args):
        output = predict(backbone, *args)
        calls.append((args, output.detach().clone()))
        return output

    parts.family.predict = recording

    def reg_loss() -> torch.Tensor:
        parts.generator.manual_seed(1234)  # the same noise and timesteps every time
        calls.clear()
        return loop.compute_loss(parts, reg_batch)

    # A fresh adapter adds exactly nothing: the prediction is the target.
    assert reg_loss().item() == 0.0
    assert len(calls) == 2 and torch.equal(calls[0][1], calls[1][1])

    # Train on the main concept only; the adapter moves away from the base.
    for step in range(6):
        loop.train_step(parts, collate_batch(main_items[step % 2 * 2:][:2]))
    loss = reg_loss()
    (args, adapted), (base_args, target) = calls
    assert loss.item() > 0
    # The target is the base model itself: a copy of the UNet with the adapter switched off independently
    # (PEFT's own switch on a deep copy) predicts the same values from the same inputs.
    frozen = frozen_copy(parts.backbone)
    with torch.no_grad():
        assert torch.equal(predict(frozen, *base_args), target)
        assert not torch.equal(predict(frozen, *args), adapted)
        if flow:  # the base text too: the trained encoder's base output, not the adapted one
            components = {**run.components, "text_encoder": frozen_copy(run.components["text_encoder"])}
            base_text = parts.family.encode_text(components, list(reg_batch["caption"]))
            assert all(torch.equal(base_args[2][k], v) for k, v in base_text.items())
            assert not all(torch.equal(args[2][k], v) for k, v in base_text.items())
    expected = REG_WEIGHT * (adapted - target).pow(2).flatten(1).mean(1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)

    # Its gradient pulls the adapter's prediction back towards the base: one small gradient step lowers it.
    params = [p for p in parts.params if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    norm = torch.stack([g.norm() for g in grads if g is not None]).norm()
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is not None:
                p.sub_(g, alpha=float(0.2 / norm))
    after = reg_loss()
    assert after.item() < loss.item()
    # the switch is undone after the base prediction: every adapter layer is active and trainable again
    layers = [m for m in parts.backbone.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and not any(layer.disable_adapters for layer in layers)
    assert all(p.requires_grad for p in params)


def test_example_preset_validates():
    from tuneonce.config.loading import load_config

    root = Path(__file__).resolve().parent.parent
    cfg = load_config(root / "training_presets" / "examples" / "demo_sdxl_prior_preservation.yaml")
    reg = cfg.data.folders[1]
    assert reg.role == "regularization" and reg.prior_prediction and reg.default_caption == "a star"
