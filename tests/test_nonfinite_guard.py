"""The non-finite guard on its own: an undone step leaves weights and optimizer state bit-identical to before it (so
the run continues exactly as if the batch had been skipped), a first step undone leaves a fresh optimizer, too many
bad steps in a row stop the run, and no writer puts NaN/inf into a file."""
from __future__ import annotations

import json

import pytest
import torch

from tuneonce.optimizer.muon_adv import Muon_adv
from tuneonce.trainer import checkpoint as ckpt
from tuneonce.trainer.guard import Diverged, NonFiniteGuard
from tuneonce.trainer.metrics import MetricsLogger, read_metrics
from tuneonce.util.files import NonFiniteError, atomic_save

OPTIMIZERS = {
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    "muon_adv": lambda params: Muon_adv(params, lr=1e-2),
}


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def step(net, optimizer, guard, number: int, *, poison: str | None = None) -> bool:
    """One guarded step on a fixed batch; `poison` makes the loss, a gradient or the updated weights non-finite."""
    g = torch.Generator().manual_seed(number)
    x, y = torch.randn(5, 8, generator=g), torch.randn(5, 4, generator=g)
    loss = ((net(x) - y) ** 2).mean()
    if poison == "loss":
        loss = loss * float("inf")
    loss.backward()
    if poison == "grad":
        next(net.parameters()).grad[0, 0] = float("nan")
    ok = True
    if guard is not None:
        guard.before_step()
    optimizer.step()
    if poison == "weights":  # an update that overflowed, as lr=1e30 makes it
        with torch.no_grad():
            list(net.parameters())[2].mul_(1e30).mul_(1e30)
    if guard is not None:
        guard.step = number
        ok = guard.after_step(number, loss.detach(), None, 1e-2)
    optimizer.zero_grad(set_to_none=True)
    return ok


def state_of(net, optimizer) -> dict[str, torch.Tensor]:
    out = {f"w.{k}": v.detach().clone() for k, v in net.state_dict().items()}
    for i, st in enumerate(optimizer.state.values()):
        for k, v in st.items():
            out[f"s{i}.{k}"] = v.detach().clone() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
    return out


def guarded(net, optimizer, max_bad: int = 3) -> NonFiniteGuard:
    names = [n for n, _ in net.named_parameters()]
    return NonFiniteGuard(list(net.parameters()), names, optimizer, max_bad=max_bad)


@pytest.mark.parametrize("poison", ["loss", "grad", "weights"])
@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_undone_step_is_a_skipped_batch(kind, poison):
    net, ref = model(), model()
    opt, ref_opt = OPTIMIZERS[kind](list(net.parameters())), OPTIMIZERS[kind](list(ref.parameters()))
    guard = guarded(net, opt)
    assert step(net, opt, guard, 1) and step(ref, ref_opt, None, 1)
    before = state_of(net, opt)
    assert not step(net, opt, guard, 2, poison=poison)  # undone
    after = state_of(net, opt)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert step(net, opt, guard, 3) and step(ref, ref_opt, None, 3)  # the reference never saw batch 2
    ours, theirs = state_of(net, opt), state_of(ref, ref_opt)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert guard.consecutive == 0 and guard.total == 1


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_undone_first_step_leaves_a_fresh_optimizer(kind):
    net, ref = model(), model()
    opt, ref_opt = OPTIMIZERS[kind](list(net.parameters())), OPTIMIZERS[kind](list(ref.parameters()))
    guard = guarded(net, opt)
    assert not step(net, opt, guard, 1, poison="weights")
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), ref.parameters()))
    assert step(net, opt, guard, 2) and step(ref, ref_opt, None, 2)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), ref.parameters()))


def test_max_bad_steps_in_a_row_raise_diverged_with_one_line(caplog):
    net = model()
    opt = OPTIMIZERS["muon_adv"](list(net.parameters()))
    guard = guarded(net, opt, max_bad=2)
    assert not step(net, opt, guard, 1, poison="grad")
    assert step(net, opt, guard, 2)  # a good step resets the count
    assert not step(net, opt, guard, 3, poison="grad")
    with pytest.raises(Diverged) as stop:
        step(net, opt, guard, 4, poison="grad")
    message = str(stop.value)
    assert "\n" not in message and "2 non-finite steps in a row" in message
    assert "training.max_nonfinite_steps 2" in message
    warned = [r.getMessage() for r in caplog.records if "step undone" in r.getMessage()]
    assert len(warned) == 3 and "step 3: non-finite gradient" in warned[1] and "0.weight" in warned[1]
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_writers_refuse_non_finite_tensors(tmp_path):
    tensors = {"a": torch.ones(3), "b": torch.tensor([1.0, float("nan"), float("inf")])}
    with pytest.raises(NonFiniteError, match=r"refusing to write .*x\.safetensors: 2 of 6 values .* in b"):
        atomic_save(tensors, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []
    snapshot = ckpt.Snapshot(step=1, epoch=0, weights=tensors, optimizer={}, lr_scheduler={}, sampler={}, ema=None,
                             rng=ckpt.capture_rng(torch.Generator()), config={})  # fmt: skip
    with pytest.raises(ckpt.CheckpointError, match="step000001 not written: refusing to write"):
        ckpt.save_checkpoint(tmp_path / "checkpoints", snapshot)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_metrics_stay_json(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log(1, {"loss": float("nan"), "lr": 1e30})
    logger.log(2, {"loss": 0.5, "lr": float("inf")})
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert records == read_metrics(tmp_path / "metrics.jsonl")
    assert records[0]["loss"] is None and records[0]["nonfinite"] is True and records[0]["lr"] == 1e30
    assert records[1]["lr"] is None and records[1]["loss"] == 0.5 and records[1]["nonfinite"] is True


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_without_backup_bad_gradients_skip_the_step_and_bad_weights_stop(kind):
    """training.nonfinite_backup false (finetunes): nothing is copied; a NaN gradient skips the optimizer step,
    weights that turn non-finite end the run at once."""
    net, ref = model(), model()
    opt, ref_opt = OPTIMIZERS[kind](list(net.parameters())), OPTIMIZERS[kind](list(ref.parameters()))
    guard = NonFiniteGuard(list(net.parameters()), [n for n, _ in net.named_parameters()], opt, max_bad=3, backup=False)
    assert step(net, opt, guard, 1) and step(ref, ref_opt, None, 1)
    before = state_of(net, opt)
    g = torch.Generator().manual_seed(2)
    loss = (net(torch.randn(5, 8, generator=g)) ** 2).mean()
    loss.backward()
    next(net.parameters()).grad[0, 0] = float("nan")
    guard.before_step()
    assert not guard.may_step(loss.detach(), None, 1e-2)  # the loop does not call optimizer.step
    assert not guard.after_step(2, loss.detach(), None, 1e-2) and guard.consecutive == 1
    opt.zero_grad(set_to_none=True)
    after = state_of(net, opt)
    assert all(torch.equal(after[k], before[k]) for k in before) and guard._param_backup is None
    assert step(net, opt, guard, 3) and step(ref, ref_opt, None, 3)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), ref.parameters()))
    with pytest.raises(Diverged, match="weights turned non-finite in step 4 .*training.nonfinite_backup"):
        step(net, opt, guard, 4, poison="weights")
