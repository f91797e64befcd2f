"""Optimizer step benchmark on the exact tensor shapes of a real backbone (scripts/bench_optimizer.py; lab code, not in the wheel).

The backbone is built on the meta device from its published config (modules/model/builtin.py), a PEFT LoRA
is injected on the default targets (or, with full=True, a representative slice of the backbone's own weights
is taken), and only then are real tensors of those shapes made on the chosen device. Each optimizer steps the
same parameters and fixed gradients; the step time is the median over `steps` timed steps after a warm-up.

`orthogonalized` counts the matrices that really took an orthogonalized path (read from each optimizer's own
routing), `matrices` those with ≥ 2 dimensions: a silent fallback to Adam shows as orthogonalized < matrices.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tuneonce.optimizer.groups import build_param_groups
from tuneonce.optimizer.param_spec import ParamInfo

# The slice of the backbone that --full benchmarks (a whole SDXL UNet does not fit a small machine in fp32).
FULL_SLICES: dict[str, tuple[str, ...]] = {
    "tiny-sd15": ("down_blocks.1.",),
    "tiny-sdxl": ("down_blocks.1.",),
    "sd15": ("down_blocks.1.",),
    "sd21": ("down_blocks.1.",),
    "sdxl": ("down_blocks.1.",),
    "flux-dev": ("transformer_blocks.0.", "single_transformer_blocks.0."),
    "flux-schnell": ("transformer_blocks.0.", "single_transformer_blocks.0."),
}


@dataclass
class Workload:
    model: str
    rank: int | None  # None for --full
    component: str
    infos: list[ParamInfo]  # real tensors on the benchmark device, each with a fixed .grad

    @property
    def params(self) -> list[nn.Parameter]:
        return [info.param for info in self.infos]

    @property
    def matrices(self) -> int:
        return sum(1 for p in self.params if p.ndim >= 2)


def build_workload(model: str, *, rank: int | None, full: bool = False, device: str = "cpu",
                   slices: tuple[str, ...] | None = None, seed: int = 0) -> Workload:  # fmt: skip
    """Meta backbone → ParamInfos (real depth, roles, fans) → real tensors of the same shapes on `device`."""
    from tuneonce.model.architectures.pipelines import BACKBONE_COMPONENTS
    from tuneonce.model.builtin import build_from_config, get_builtin, load_config
    from tuneonce.model.inspect import add_lora
    from tuneonce.model.roles import param_infos

    if model.startswith("tiny-"):  # toy-width real classes (modules/model/tiny.py): smoke tests
        from tuneonce.model.tiny import TINY_KINDS, build_tiny_pipeline

        kind = model.removeprefix("tiny-")
        if kind not in TINY_KINDS:
            raise ValueError(f"unknown tiny model {model!r}; known: {', '.join('tiny-' + k for k in TINY_KINDS)}")
        pipe = build_tiny_pipeline(kind)
        component, module, pipeline = "unet", pipe.unet, type(pipe).__name__
    else:
        builtin = get_builtin(model)
        backbone = [name for name in builtin.components if name in BACKBONE_COMPONENTS]
        if len(backbone) != 1:
            raise ValueError(f"model {model!r}: expected one backbone component, found {backbone}")
        component, pipeline = backbone[0], builtin.pipeline
        module = build_from_config(load_config(builtin.components[component]))  # meta device
    components = {component: module}
    if full:
        prefixes = slices or FULL_SLICES.get(model)
        if not prefixes:
            raise ValueError(f"--full: no default slice for {model!r}; pass --slice with module-name prefixes")
        module.requires_grad_(False)
        for name, p in module.named_parameters():
            if name.startswith(tuple(prefixes)):
                p.requires_grad_(True)
    else:
        if rank is None or rank < 1:
            raise ValueError(f"--rank must be a positive integer, got {rank}")
        add_lora(components, rank, names=[component])
    infos = param_infos(components, pipeline=pipeline)
    if not infos:
        raise ValueError(f"model {model!r}: nothing to benchmark (slice {slices} matched no parameter)")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    real = []
    for info in infos:
        shape = tuple(info.param.shape)
        # mid-training values: both LoRA factors nonzero (PEFT's zero lora_B would hide the general path)
        std = 0.02 if info.spec.role.value != "lora_a" else 1.0 / max(info.param[0].numel(), 1) ** 0.5
        param = nn.Parameter((torch.randn(shape, generator=gen) * std).to(device))
        param.grad = (torch.randn(shape, generator=gen) * 1e-3).to(device)
        real.append(ParamInfo(info.name, param, info.spec, info.component, info.pair, info.extra))
    return Workload(model, None if full else rank, component, real)


def _optimizers(work: Workload, *, lr: float = 1e-3, weight_decay: float = 0.1) -> dict[str, Callable[[], torch.optim.Optimizer]]:
    """Name → constructor, in table order. Ours get the real param groups; the peers plain parameters."""
    from tuneonce.optimizer import AdaMuon_adv, LoRAMuon, Muon_adv

    def groups() -> list[dict]:
        return build_param_groups(work.infos, lr=lr, weight_decay=weight_decay)

    def torch_muon() -> torch.optim.Optimizer:
        from tuneonce.optimizer.factory import OptimizerChain

        flat = [p for p in work.params if p.ndim == 2]
        rest = [p for p in work.params if p.ndim != 2]
        parts = {"muon": torch.optim.Muon(flat, lr=lr, weight_decay=weight_decay)} if flat else {}
        if rest:
            parts["adamw"] = torch.optim.AdamW(rest, lr=1e-4, foreach=True)
        return OptimizerChain(parts)

    makers: dict[str, Callable[[], torch.optim.Optimizer]] = {
        "adamw": lambda: torch.optim.AdamW(work.params, lr=lr, weight_decay=weight_decay, foreach=True),
        "torch_muon": torch_muon,
    }
    try:
        import adv_optm

        makers["adv_optm_muon_adv"] = lambda: adv_optm.Muon_adv(work.params, lr=lr)
        makers["adv_optm_adamuon_adv"] = lambda: adv_optm.AdaMuon_adv(work.params, lr=lr)
    except ImportError:
        pass
    makers["muon_adv"] = lambda: Muon_adv(groups(), lr=lr, weight_decay=weight_decay)
    if work.rank is not None:
        makers["muon_adv_product"] = lambda: Muon_adv(groups(), lr=lr, weight_decay=weight_decay, lora_spectral_target="product")
        makers["muon_adv_b_orth_a_adam"] = lambda: Muon_adv(groups(), lr=lr, weight_decay=weight_decay, lora_a_optimizer="adam")
        makers["muon_adv_a_signsgd"] = lambda: Muon_adv(groups(), lr=lr, weight_decay=weight_decay, lora_a_optimizer="signsgd")
    makers["adamuon_adv"] = lambda: AdaMuon_adv(groups(), lr=lr, weight_decay=weight_decay)
    if work.rank is not None:
        makers["lora_muon"] = lambda: LoRAMuon(groups(), lr=lr, weight_decay=weight_decay)
    return makers


def orthogonalized_count(opt: torch.optim.Optimizer) -> int:
    """How many tensors this optimizer (after one step) sends through an orthogonalization, from its own routing."""
    from tuneonce.optimizer import LoRAMuon, Muon_adv
    from tuneonce.optimizer.factory import OptimizerChain

    if isinstance(opt, OptimizerChain):
        return sum(orthogonalized_count(part) for part in opt.optimizers.values())
    if isinstance(opt, LoRAMuon):
        buckets, _ = opt._build_plan()
        return sum(2 * len(pairs) for pairs in buckets.values())
    if isinstance(opt, Muon_adv):  # AdaMuon_adv included
        return sum(1 for m in opt._get_plan().members.values() if m.path == "muon")
    if isinstance(opt, torch.optim.Muon):
        return sum(len(g["params"]) for g in opt.param_groups)
    if type(opt).__module__.startswith("adv_optm"):
        # adv_optm decides per tensor on its first step and records it in the state
        return sum(1 for state in opt.state.values() if state.get("is_muon"))
    return 0


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the tensors held in the optimizer state (each storage counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def visit(value) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            key = (value.data_ptr(), value.nbytes)
            if key not in seen:
                seen.add(key)
                total += value.nbytes
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)

    visit(dict(opt.state))
    return total


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_optimizer(make: Callable[[], torch.optim.Optimizer], work: Workload, *, steps: int, warmup: int,
                   device: str) -> dict:  # fmt: skip
    initial = [p.detach().clone() for p in work.params]
    opt = make()
    for _ in range(warmup):
        opt.step()
    _sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        opt.step()
        _sync(device)
        times.append(time.perf_counter() - start)
    result = {
        "median_ms": statistics.median(times) * 1e3,
        "state_bytes": state_bytes(opt),
        "orthogonalized": orthogonalized_count(opt),
        "matrices": work.matrices,
    }
    with torch.no_grad():
        for p, value in zip(work.params, initial):
            p.copy_(value)
    del opt
    return result


def run_benchmark(model: str, *, rank: int | None, full: bool = False, device: str = "cpu", steps: int = 5,
                  warmup: int = 1, only: list[str] | None = None, slices: tuple[str, ...] | None = None) -> dict:  # fmt: skip
    """The whole benchmark as one JSON-ready dict (see scripts/bench_optimizer.py)."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"--steps must be >= 1 and warm-up >= 0, got steps={steps}, warmup={warmup}")
    work = build_workload(model, rank=rank, full=full, device=device, slices=slices)
    makers = _optimizers(work)
    if only:
        unknown = sorted(set(only) - set(makers))
        if unknown:
            raise ValueError(f"--only: unknown optimizer(s) {unknown}; available: {', '.join(makers)}")
        makers = {name: make for name, make in makers.items() if name in only or name == "adamw"}
    results = {name: time_optimizer(make, work, steps=steps, warmup=warmup, device=device) for name, make in makers.items()}
    base = results["adamw"]["median_ms"]
    for r in results.values():
        r["ratio_to_adamw"] = r["median_ms"] / base
    param_bytes = sum(p.nbytes for p in work.params)
    return {
        "model": model,
        "rank": rank if not full else None,
        "full": full,
        "device": device,
        "steps": steps,
        "tensors": len(work.params),
        "param_bytes": param_bytes,
        "results": {
            name: {k: r[k] for k in ("median_ms", "ratio_to_adamw", "state_bytes", "orthogonalized", "matrices")}
            for name, r in results.items()
        },
    }


def format_table(report: dict) -> str:
    what = f"rank {report['rank']} LoRA" if report["rank"] is not None else "full slice"
    lines = [
        f"{report['model']} {what}: {report['tensors']} tensors, {report['param_bytes'] / 2**20:.1f} MiB params, "
        f"{report['device']}, median of {report['steps']} steps",
        f"{'optimizer':<24} {'median ms':>10} {'x AdamW':>8} {'state/params':>13} {'orthogonalized':>15}",
    ]
    for name, r in report["results"].items():
        lines.append(
            f"{name:<24} {r['median_ms']:>10.1f} {r['ratio_to_adamw']:>8.2f} "
            f"{r['state_bytes'] / report['param_bytes']:>13.2f} {r['orthogonalized']:>7}/{r['matrices']:<7}"
        )
    return "\n".join(lines)
