"""Masked loss: weights from <name>-masklabel.png or the alpha channel follow crops and flips, reach the latent grid
by area averaging, and weight the MSE exactly as a hand computation does; missing / broken masks are reported."""
from __future__ import annotations

import logging
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tuneonce.data.dataset import DataSettings, FolderSpec, build_dataset
from tuneonce.model.tiny import tiny_pipeline_dir
from tuneonce.model.flow_objective import FlowMatchObjective
from tuneonce.model.masked_loss import latent_weights
from tuneonce.model.objective import DiffusionObjective
from tuneonce.trainer.train import train
from tests.builders import concept_data_dirs, tiny_train_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_weighted_mse_equals_hand_computation():
    # 16x16 pixel weights -> 2x2 latent grid: each latent pixel averages an 8x8 block
    pixels = torch.full((1, 1, 16, 16), 0.25)
    pixels[0, 0, :8, :8] = 1.0
    pixels[0, 0, 8:, 8:] = torch.tensor([[1.0, 0.0] * 4, [0.0, 1.0] * 4] * 4)  # checkerboard: mean 0.5
    latents = torch.zeros(1, 2, 2, 2)
    weights = latent_weights(pixels, latents)
    torch.testing.assert_close(weights, torch.tensor([[[[1.0, 0.25], [0.25, 0.5]]]]))

    err = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [0.0, 2.0]]]])
    noise = torch.randn(1, 2, 2, 2)
    # by hand: (1·1 + .25·4 + .25·9 + .5·16 + 0 + .25·1 + 0 + .5·4) / 8 = 14.5 / 8
    expected = (1 + 1 + 2.25 + 8 + 0.25 + 2) / 8
    objective = DiffusionObjective(alphas_cumprod=torch.linspace(0.99, 0.01, 10), prediction_type="epsilon")
    t = torch.tensor([3])
    loss = objective.loss(noise + err, latents, noise, t, weights)  # epsilon: the target is the noise
    assert float(loss) == pytest.approx(expected)
    assert float(objective.loss(noise + err, latents, noise, t)) == pytest.approx(float(err.pow(2).mean()))

    flow = FlowMatchObjective()
    target = flow.target(latents, noise, torch.tensor([0.5]))
    assert float(flow.loss(target + err, latents, noise, torch.tensor([0.5]), weights)) == pytest.approx(expected)


def _mask_image(width: int, height: int) -> Image.Image:
    """An asymmetric mask: white left third and a grey bar at the top."""
    array = np.zeros((height, width), dtype=np.uint8)
    array[:, : width // 3] = 255
    array[: height // 4, :] = 128
    return Image.fromarray(array, mode="L")


def _settings(folder, **masked) -> DataSettings:
    return DataSettings.from_config({
        "folders": [{"path": str(folder)}], "resolution": 64, "bucketing": False, "random_flip": 1.0,
        "random_crop": True, "masked_loss": {"enabled": True, **masked},
    })  # fmt: skip


def test_masks_follow_crop_and_flip_and_unmasked_weight(tmp_path):
    # the image shows its own mask, so after the item's crop + flip its pixels must equal the weights
    for i, (w, h) in enumerate([(96, 64), (64, 112)]):
        mask = _mask_image(w, h)
        mask.convert("RGB").save(tmp_path / f"{i}.png")
        mask.save(tmp_path / f"{i}-masklabel.png")
    dataset = build_dataset(_settings(tmp_path), seed=3)
    assert sorted(r.path.name for r in dataset.records) == ["0.png", "1.png"]  # masks are not images
    for index in range(len(dataset)):
        for epoch in range(3):  # different crops per epoch
            item = dataset[(epoch, 0, index)]
            assert item["flipped"]
            shown = (item["pixel_values"][0] + 1) / 2
            assert item["mask_weights"].shape == (1, 64, 64)
            assert float((item["mask_weights"][0] - shown).abs().max()) <= 1.5 / 255
            assert float(item["mask_weights"][0, -1, -1]) == 1.0  # flipped: the white third is now on the right
    weighted = build_dataset(_settings(tmp_path, unmasked_weight=0.25), seed=3)[(0, 0, 0)]["mask_weights"]
    plain = dataset[(0, 0, 0)]["mask_weights"]
    torch.testing.assert_close(weighted, 0.25 + 0.75 * plain)
    assert "mask_weights" not in build_dataset(_settings(tmp_path, enabled=False), seed=3)[0]


def test_alpha_channel_source(tmp_path):
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[..., :3] = 90
    rgba[:, 16:40, 3] = 255
    rgba[:, 40:, 3] = 51
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    settings = DataSettings.from_config({"folders": [{"path": str(tmp_path)}], "resolution": 64, "bucketing": False,
                                         "masked_loss": {"enabled": True, "source": "alpha"}})  # fmt: skip
    weights = build_dataset(settings, seed=0)[0]["mask_weights"][0]
    torch.testing.assert_close(weights, torch.from_numpy(rgba[..., 3] / 255.0).float())


def test_missing_mask_is_skipped_with_a_warning_and_broken_mask_is_an_error(tmp_path, caplog):
    for name in ("a", "b"):
        Image.new("RGB", (64, 64), (200, 10, 10)).save(tmp_path / f"{name}.png")
    _mask_image(64, 64).save(tmp_path / "a-masklabel.png")
    with caplog.at_level(logging.WARNING, logger="tuneonce.data"):
        dataset = build_dataset(_settings(tmp_path), seed=0)
    assert [r.path.name for r in dataset.records] == ["a.png"]
    assert [m for m in (r.getMessage() for r in caplog.records) if "b.png" in m and "b-masklabel.png" in m]

    (tmp_path / "b-masklabel.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ValueError, match=r"data.masked_loss: cannot read mask .*b-masklabel\.png") as info:
        build_dataset(_settings(tmp_path), seed=0)
    assert "\n" not in str(info.value)

    (tmp_path / "b-masklabel.png").unlink()
    (tmp_path / "a-masklabel.png").unlink()
    with pytest.raises(ValueError, match="none of the 2 training images has a mask"):
        build_dataset(_settings(tmp_path), seed=0)


@pytest.fixture(scope="module")
def masked_run(tmp_path_factory):
    base = tiny_pipeline_dir("sd15", tmp_path_factory)
    train_dir, val_dir = concept_data_dirs(tmp_path_factory.mktemp("masked_data"), train_count=4)
    black = tmp_path_factory.mktemp("black_masks")
    for image in sorted(train_dir.glob("*.png")):
        shutil.copy(image, black / image.name)
        shutil.copy(image.with_suffix(".txt"), black / image.with_suffix(".txt").name)
        Image.new("L", Image.open(image).size, 0).save(black / f"{image.stem}-masklabel.png")

    def run(folder, out, **masked):
        cfg = tiny_train_config("sd15", base, (folder, val_dir), out, schedule={"max_steps": 2},
                                validation={"every_n_steps": 2},
                                data={"masked_loss": masked} if masked else {})  # fmt: skip
        return train(cfg, show_progress=False)

    return run, train_dir, black


def test_train_with_masks(masked_run, tmp_path):
    run, plain_dir, black_dir = masked_run
    # all-black masks with unmasked_weight 0: the loss is exactly 0 and the adapter never moves
    zero = run(black_dir, tmp_path / "zero", enabled=True, unmasked_weight=0.0)
    assert zero.final_loss == 0.0 and zero.val_losses[0][1] == zero.val_losses[-1][1]
    # unmasked_weight 1: every weight is 1, so the run equals the unmasked one step for step
    ones = run(black_dir, tmp_path / "ones", enabled=True, unmasked_weight=1.0)
    plain = run(plain_dir, tmp_path / "plain")
    assert math.isfinite(plain.final_loss) and plain.final_loss > 0
    assert ones.final_loss == pytest.approx(plain.final_loss, rel=1e-6)
    assert [v for _, v in ones.val_losses] == pytest.approx([v for _, v in plain.val_losses], rel=1e-6)


def test_example_preset_validates():
    from pathlib import Path

    from tuneonce.config.loading import load_config

    root = Path(__file__).resolve().parent.parent
    cfg = load_config(root / "training_presets" / "examples" / "demo_sdxl_masked_loss.yaml")
    assert cfg.data.masked_loss.enabled and cfg.data.masked_loss.unmasked_weight == 0.1
