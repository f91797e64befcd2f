"""EMA of the trained weights: the update rule against hand-computed averages, swapping in and out, state round trip,
and a training run whose saved file and validation use the average."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tuneonce.model.tiny import tiny_pipeline_dir
from tuneonce.trainer.ema import EMA
from tuneonce.trainer.train import train
from tests.builders import concept_data_dirs, tiny_train_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def weights(*values: float) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.tensor(values))


def test_two_updates_match_the_hand_computed_average():
    p = weights(1.0, -2.0)
    ema = EMA({"p": p}, decay=0.9, warmup=False)
    with torch.no_grad():
        p.copy_(torch.tensor([3.0, 0.0]))
        assert ema.update(1)
        p.copy_(torch.tensor([5.0, 4.0]))
        assert ema.update(2)
    # s1 = 0.9*s0 + 0.1*p1, s2 = 0.9*s1 + 0.1*p2
    s1 = [0.9 * 1.0 + 0.1 * 3.0, 0.9 * -2.0 + 0.1 * 0.0]
    s2 = [0.9 * s1[0] + 0.1 * 5.0, 0.9 * s1[1] + 0.1 * 4.0]
    torch.testing.assert_close(ema.shadow["p"], torch.tensor(s2), rtol=1e-6, atol=1e-7)
    assert ema.num_updates == 2


def test_warmup_and_update_every():
    p = weights(0.0)
    ema = EMA({"p": p}, decay=0.999, warmup=True)
    assert [ema.decay_at(n) for n in (0, 1)] == [pytest.approx(1 / 10), pytest.approx(2 / 11)]
    with torch.no_grad():
        p.fill_(10.0)
        ema.update(1)  # d = 0.1: the average jumps most of the way
    torch.testing.assert_close(ema.shadow["p"], torch.tensor([9.0]))

    q = weights(0.0)
    sparse = EMA({"q": q}, decay=0.9, update_every=2, warmup=False)
    with torch.no_grad():
        q.fill_(1.0)
    assert not sparse.update(1) and sparse.num_updates == 0
    assert sparse.update(2)  # d = 0.9^2, so the horizon in optimizer steps stays that of decay 0.9
    torch.testing.assert_close(sparse.shadow["q"], torch.tensor([1 - 0.81]), rtol=1e-6, atol=1e-7)


def test_applied_swaps_the_average_in_and_back_exactly():
    p = torch.nn.Parameter(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16))
    ema = EMA({"p": p}, decay=0.5, warmup=False, on_cpu=True)
    assert ema.shadow["p"].dtype == torch.float32 and ema.shadow["p"].device.type == "cpu"
    trained = p.detach().clone()
    with torch.no_grad():
        p.add_(1.0)
        after_step = p.detach().clone()
        ema.update(1)
    with ema.applied():
        assert torch.equal(p, ((trained.float() + after_step.float()) / 2).to(torch.bfloat16))
    assert torch.equal(p, after_step)


def test_state_round_trip_and_mismatch():
    p = weights(1.0, 2.0)
    ema = EMA({"p": p}, decay=0.9, warmup=False)
    with torch.no_grad():
        p.mul_(3)
    ema.update(1)
    other = EMA({"p": weights(0.0, 0.0)}, decay=0.9, warmup=False)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadow["p"], ema.shadow["p"]) and other.num_updates == 1
    with pytest.raises(ValueError, match=r"missing \['p'\]"):
        other.load_state_dict({"num_updates": 1, "shadow": {"q": torch.zeros(2)}})
    with pytest.raises(ValueError, match="training.ema.decay"):
        EMA({"p": p}, decay=1.0)


def test_training_saves_and_validates_the_average(tmp_path_factory):
    """decay 0.9999 without warm-up keeps the average next to the initial weights (LoRA B = 0): the saved file's up
    factors stay ~1e-4 of the trained ones and the final validation loss stays the step-0 one."""
    base = tiny_pipeline_dir("sd15", tmp_path_factory)
    data = concept_data_dirs(tmp_path_factory.mktemp("ema_data"), train_count=4)
    out = tmp_path_factory.mktemp("ema_run")
    cfg = tiny_train_config(
        "sd15", base, data, out, schedule={"max_steps": 2}, validation={"every_n_steps": 2},
        training={"ema": {"enabled": True, "decay": 0.9999, "warmup": False}},
    )  # fmt: skip
    result = train(cfg, show_progress=False)
    trained_b = max(p.abs().max().item() for n, p in result.components["unet"].named_parameters() if ".lora_B." in n)
    saved_up = max(t.abs().max().item() for k, t in load_file(out / "run.safetensors").items() if "lora_up" in k)
    assert trained_b > 0 and 0 < saved_up < 1e-3 * trained_b
    first, last = result.val_losses[0][1], result.val_losses[-1][1]
    assert last == pytest.approx(first, rel=1e-5)
