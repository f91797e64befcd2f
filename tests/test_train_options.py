"""Loop options no other test runs: epoch-wise intermediate saves and half precision on CPU (tiny SDXL, a few steps)."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from tuneonce.trainer.train import train
from tests.builders import tiny_train_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN_IMAGES, BATCH = 4, 2  # two optimizer steps per epoch
DATA_TRAIN_IMAGES = TRAIN_IMAGES  # the conftest data_dirs fixture's training images


def run(sdxl_base, data_dirs, out, **sections):
    defaults = {"training": {"batch_size": BATCH, "seed": 3}, "validation": {"every_n_steps": 0}}
    return train(tiny_train_config("sdxl", sdxl_base, data_dirs, out, defaults=defaults, **sections),
                 show_progress=False)


def test_save_every_n_epochs_writes_each_finished_epoch(sdxl_base, data_dirs, tmp_path):
    # 7 steps: epochs 1-3 end after steps 2, 4, 6; every 2nd epoch saves epoch 2, beside step saves every 2 steps
    run(sdxl_base, data_dirs, tmp_path, schedule={"max_steps": 7},
        saving={"save_every_n_epochs": 2, "save_every_n_steps": 2})
    names = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert names == ["run-epoch0002.safetensors", "run-step000002.safetensors", "run-step000004.safetensors",
                     "run-step000006.safetensors", "run.safetensors"], names
    saved = {name: load_file(tmp_path / name) for name in names}
    epoch = saved["run-epoch0002.safetensors"]
    assert epoch.keys() == saved["run.safetensors"].keys() and any(".lora_up." in k for k in epoch)

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    # the epoch-2 file holds the weights right after epoch 2's last batch (step 4), not a step later
    assert same(epoch, saved["run-step000004.safetensors"])
    assert not same(epoch, saved["run-step000002.safetensors"]) and not same(epoch, saved["run-step000006.safetensors"])


def test_fp16_weights_train_on_cpu(sdxl_base, data_dirs, tmp_path):
    result = run(sdxl_base, data_dirs, tmp_path / "fp16", model={"train_dtype": "float16"},
                 schedule={"max_steps": 2}, validation={"every_n_steps": 2}, saving={"dtype": "float32"})
    unet = result.components["unet"]
    assert {p.dtype for n, p in unet.named_parameters() if ".lora_" not in n} == {torch.float16}
    lora_b = [p for n, p in unet.named_parameters() if ".lora_B." in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # every up-projection left its zero init
    assert math.isfinite(result.final_loss) and all(math.isfinite(v) for _, v in result.val_losses)
    saved = load_file(result.saved[-1])
    assert saved and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in saved.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 autocast is real on a GPU")
def test_fp16_autocast_on_cpu_is_a_clear_error(sdxl_base, data_dirs, tmp_path):
    # accelerate skips fp16 autocast on CPU without a word: the run would silently be float32
    with pytest.raises(ValueError, match=r"^training\.mixed_precision: fp16 .*bf16") as error:
        run(sdxl_base, data_dirs, tmp_path / "amp", training={"mixed_precision": "fp16"})
    assert "\n" not in str(error.value)


def test_prodigy_trains_through_the_loop_with_warmup_and_a_schedule(sdxl_base, data_dirs, tmp_path):
    """optimizer.type prodigy through the loop: warm-up from lr 0 (Prodigy skips its estimate then), cosine, a file."""
    result = run(sdxl_base, data_dirs, tmp_path, schedule={"max_steps": 4, "warmup_steps": 1, "scheduler": "cosine"},
                 optimizer={"type": "prodigy", "lr": 1.0, "prodigy_safeguard_warmup": True,
                            "prodigy_use_bias_correction": True})
    assert result.steps == 4 and math.isfinite(result.final_loss)
    lora_b = [p for n, p in result.components["unet"].named_parameters() if ".lora_B." in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)
    assert (tmp_path / "run.safetensors").is_file()
