"""One process of the multi-process tests (tests/test_distributed.py starts two of these; one launch for both tests,
since starting processes that import torch and diffusers is most of the cost).

``python tests/distributed_worker.py OUT_DIR [CONFIG]`` with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set:
joins a gloo process group, steps each optimizer of `step_all` with the same parameters and gradients as every
other rank, saves the parameters and how many matrices this rank orthogonalized to OUT_DIR/rank<R>.pt, then (with
CONFIG) trains through the CLI of scripts/train.py, whose accelerate Accelerator joins the same process group.
The test runs `step_all` in its own process (no process group) for the single-process reference.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tuneonce.optimizer.groups import build_param_groups  # noqa: E402
from tuneonce.optimizer.lora_muon import LoRAMuon  # noqa: E402
from tuneonce.optimizer.muon_adv import AdaMuon_adv, Muon_adv  # noqa: E402
from tuneonce.optimizer.param_spec import GroupSpec, ParamInfo, Role, infer_spec  # noqa: E402

STEPS = 2


class TinyNet(nn.Module):
    """Shapes chosen to make buckets of 3, 2 and 1 matrices (a bucket smaller than the world size) on both routes:
    48×48 (iterative), 48×24 (iterative), 8×48 (Gram, wide), 8×4·3·3 conv (Gram)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.fc_in = nn.Linear(32, 48)
        self.blocks = nn.ModuleList([nn.Linear(48, 48) for _ in range(3)])
        self.side = nn.Linear(24, 48)
        self.fc_out = nn.Linear(48, 8)

    def forward(self, image: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        h = self.fc_in(self.conv(image).flatten(1)[:, :32]) + self.side(side)
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return self.fc_out(h)


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 4, 2, 2, generator=gen), torch.randn(16, 24, generator=gen), torch.randn(16, 8, generator=gen)


class LoraLinear(nn.Module):
    """PEFT's LoRA layer in a few lines (importing peft costs a spawned process ~15 s here): base + s·B·A."""

    def __init__(self, base: nn.Linear, rank: int = 4, scale: float = 0.5) -> None:
        super().__init__()
        self.base, self.scale = base.requires_grad_(False), scale
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features) / base.in_features**0.5)
        self.lora_B = nn.Parameter(torch.randn(base.out_features, rank) * 0.1)  # nonzero: both factors move at once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * (x @ self.lora_A.mT) @ self.lora_B.mT


def _model(lora: bool) -> nn.Module:
    torch.manual_seed(0)
    model = TinyNet()
    if lora:
        model.requires_grad_(False)
        for name in ("fc_in", "side", "fc_out"):
            setattr(model, name, LoraLinear(getattr(model, name)))
        model.blocks = nn.ModuleList([LoraLinear(block) for block in model.blocks])
    return model


def _groups(model: nn.Module) -> list[dict]:
    infos = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            out, inp = module.base.weight.shape
            for role, p in ((Role.LORA_A, module.lora_A), (Role.LORA_B, module.lora_B)):
                spec = GroupSpec(role, fan_in=p.shape[1], fan_out=p.shape[0], depth=3, base_fan_in=inp, base_fan_out=out,
                                 lora_scale=module.scale)  # fmt: skip
                infos.append(ParamInfo(f"{name}.{role.value}", p, spec, pair=name))
    if not infos:
        infos = [ParamInfo(n, p, infer_spec(p, depth=3)) for n, p in model.named_parameters()]
    return build_param_groups(infos, lr=2e-2, weight_decay=0.1)


CASES = {
    "muon_finetune": (False, lambda g: Muon_adv(g, lr=2e-2)),
    "adamuon_lora_product": (True, lambda g: AdaMuon_adv(g, lr=2e-2, lora_spectral_target="product")),
    "muon_lora_polar_express": (True, lambda g: Muon_adv(g, lr=2e-2, orthogonalizer="polar_express")),
    "lora_muon": (True, lambda g: LoRAMuon(g, lr=2e-2, rebalance_every=2)),
}


def step_all() -> dict[str, dict]:
    """For each case: the trained parameters after STEPS steps and the matrices (pairs) orthogonalized per step."""
    results = {}
    for case, (lora, make) in CASES.items():
        model = _model(lora)
        optimizer = make(_groups(model))
        counts = []
        for step in range(STEPS):
            image, side, target = _data(step)
            optimizer.zero_grad()
            nn.functional.mse_loss(model(image, side), target).backward()
            optimizer.step()
            counts.append(optimizer.orthogonalized_last_step)
        params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        results[case] = {"params": params, "counts": counts}
    return results


def main() -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # env:// (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)
    results = step_all()
    torch.save(results, Path(sys.argv[1]) / f"rank{dist.get_rank()}.pt")
    if len(sys.argv) > 2:
        from tuneonce.trainer.cli import main as train_cli

        code = train_cli(["--config", sys.argv[2]])
        if code:
            sys.exit(code)
    dist.destroy_process_group()


if __name__ == "__main__":
    assert os.environ.get("WORLD_SIZE"), "run by tests/test_distributed.py with RANK/WORLD_SIZE/MASTER_* set"
    main()
