"""The batched optimizers against the per-tensor statement of their math (modules/optimizer/reference.py).

Every combination of the switches the config passes to the optimizer (itertools.product over the booleans and
literals of OptimizerConfig: 192 for Muon_adv/AdaMuon_adv, times orthogonalizer × ortho_route as test
parameters; 8 for LoRAMuon), fp32 state (state_dtype bfloat16 rounds the state on purpose and is left to
test_muon_adv's bf16-tracks-fp32 test). Tensors: plain matrices of both aspect ratios and both routes, conv
weights, LoRA pairs of ranks 1 to 4 (conv pairs, PEFT's B = 0 init, pairs sharing a bucket), vectors and an
embedding, over three or four steps (momentum and second moments carry over), with weight decay on, a group
lr override, depths 1 to 3, and an LR schedule factor that changes every step (1, 0.6, 0.3).

The engine runs in float32, the reference in float64 from the same start and the same gradients. Tolerance:
per parameter, max|W_engine − W_ref| ≤ RTOL·max|W_ref − W_0| with RTOL = 1e-4, i.e. 1e-4 of how far the
reference moved it. Measured worst case over all combinations: 1.9e-5 (OMP_NUM_THREADS=1, this file), which is
float32 at work: W ~ 1 is stored to ~6e-8 against total steps of ~1e-2 (~1e-5), and the polynomial maps amplify
the rounding of small singular values. A wrong factor anywhere in the math (β, 1/s, √(fan_out/fan_in), a bias
correction, 1/L, s_t) moves a parameter by a sizeable fraction of its step (test_the_comparison_notices_...).
"""
import itertools
import math
from typing import Literal, get_args, get_origin

import pytest
import torch
from torch import nn

from tuneonce.config.schema import ADAMUON_KEYS, LORA_MUON_KEYS, OptimizerConfig
from tuneonce.optimizer import reference
from tuneonce.optimizer.lora_muon import LoRAMuon
from tuneonce.optimizer.muon_adv import AdaMuon_adv, Muon_adv

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RTOL = 1e-4
SCHEDULE = (1.0, 0.6, 0.3)  # lr_t / lr_peak of the steps (what an LR scheduler writes into group["lr"])

# The switches come from the config itself: every bool and Literal field the optimizer's constructor takes.
# orthogonalizer and ortho_route are test parameters of their own; state_dtype bfloat16 rounds the state on purpose
# (test_muon_adv checks that it tracks float32), so the comparison runs with float32 state.
AS_PARAMETERS = ("orthogonalizer", "ortho_route", "state_dtype")


def _config_switches(keys: tuple[str, ...]) -> dict[str, tuple]:
    out = {}
    for key in keys:
        annotation = OptimizerConfig.model_fields[key].annotation
        if annotation is bool:
            out[key] = (True, False)
        elif get_origin(annotation) is Literal:
            out[key] = get_args(annotation)
    return {k: v for k, v in out.items() if k not in AS_PARAMETERS}


def _config_choices(key: str) -> tuple:
    return get_args(OptimizerConfig.model_fields[key].annotation)


MUON_SWITCHES = _config_switches(ADAMUON_KEYS)
LORA_MUON_SWITCHES = {**_config_switches(LORA_MUON_KEYS), "rebalance_every": (0, 2)}  # 0 = off
MUON_HP = dict(
    lr=2e-2, beta1=0.9, weight_decay=0.5, ns_eps=0.05, adam_lr=1e-2, adam_betas=(0.8, 0.95), adam_eps=1e-3,
    adam_weight_decay=0.3,
)  # fmt: skip
ADAMUON_HP = dict(beta2=0.9, eps=0.05)


def _combos(switches: dict) -> list[dict]:
    return [dict(zip(switches, values)) for values in itertools.product(*switches.values())]


def _matrix(name, p, depth=1, **extra):
    role = "conv" if p.ndim > 2 else "matrix"
    return dict(params=[p], names=[name], role=role, fan_in=p[0].numel(), fan_out=p.shape[0], depth=depth, **extra)


def _pair(pair, A, B, scale, depth=2):
    common = dict(base_fan_in=A[0].numel(), base_fan_out=B.shape[0], lora_scale=scale, depth=depth, pairs=[pair])
    return [
        dict(params=[A], names=[f"{pair}.A"], role="lora_a", fan_in=A[0].numel(), fan_out=A.shape[0], **common),
        dict(params=[B], names=[f"{pair}.B"], role="lora_b", fan_in=B[0].numel(), fan_out=B.shape[0], **common),
    ]


def _model(seed: int, with_plain: bool = True) -> list[dict]:
    """Param groups of a small model: every tensor kind the Muon family meets."""
    gen = torch.Generator().manual_seed(seed)

    def param(*shape, scale=1.0):
        return nn.Parameter(torch.randn(*shape, generator=gen) * scale)

    groups = []
    if with_plain:
        groups += [
            _matrix("wide", param(8, 24), depth=3),  # iterative route under auto
            _matrix("wide_fast", param(8, 24), depth=1, lr=4e-2),  # same bucket, its own lr and depth
            _matrix("tall", param(24, 6), depth=2),  # Gram route under auto
            _matrix("conv", param(6, 2, 3, 3), depth=2),  # 6 × 18
            _matrix("conv_wide", param(4, 4, 3, 3), depth=2),  # 4 × 36: Gram route under auto
            dict(params=[param(16)], names=["bias"], role="vector", fan_in=16, fan_out=16, depth=2),
            dict(params=[param(10, 8)], names=["emb"], role="embedding", fan_in=8, fan_out=10, depth=2),
        ]
    groups += _pair("r2", param(2, 24, scale=0.2), param(16, 2, scale=0.5), scale=0.5)
    groups += _pair("r4", param(4, 24, scale=0.2), param(16, 4, scale=0.3), scale=2.0)
    groups += _pair("r4_init", param(4, 24, scale=0.2), nn.Parameter(torch.zeros(16, 4)), scale=1.0)  # PEFT: B = 0
    groups += _pair("conv_r3", param(3, 2, 3, 3, scale=0.3), param(6, 3, 1, 1, scale=0.4), scale=1.0, depth=3)
    return groups


def _grads(params: list[torch.Tensor], gen: torch.Generator) -> list[torch.Tensor]:
    """Gradients of mixed sizes: some well below the damping (linear regime), some far above (orthogonal)."""
    sizes = (0.05, 1.0, 20.0)
    return [torch.randn(p.shape, generator=gen) * sizes[i % len(sizes)] for i, p in enumerate(params)]


def _set_schedule(opt: torch.optim.Optimizer, refs: list[reference.RefParam], factor: float) -> None:
    for group in opt.param_groups:
        group["lr"] = group["initial_lr"] * factor
    for hp in {id(r.hp): r.hp for r in refs}.values():
        hp["lr"] = hp["initial_lr"] * factor


def _run(opt: torch.optim.Optimizer, ref_step, schedule=SCHEDULE, seed: int = 123) -> list[tuple[str, float]]:
    """Step the engine and the reference side by side; return (name, relative distance) per parameter."""
    params = [p for g in opt.param_groups for p in g["params"]]
    names = [n for g in opt.param_groups for n in g["names"]]
    refs = reference.ref_params_from_groups(opt.param_groups)
    start = [r.value.clone() for r in refs]
    gen = torch.Generator().manual_seed(seed)
    for factor in schedule:
        _set_schedule(opt, refs, factor)
        for p, r, g in zip(params, refs, _grads(params, gen)):
            p.grad, r.grad = g, g.double()
        opt.step()
        ref_step(refs)
    errors = []
    for name, p, r, w0 in zip(names, params, refs, start):
        moved = (r.value - w0).abs().max().item()
        assert moved > 0, f"{name}: the reference did not move it, so the comparison says nothing"
        errors.append((name, (p.detach().double() - r.value).abs().max().item() / moved))
    return errors


def _check(errors: list[tuple[str, float]], combo: dict) -> None:
    bad = [(name, f"{err:.1e}") for name, err in errors if not err <= RTOL]
    assert not bad, f"{combo}: engine differs from reference.py by more than {RTOL} of the step: {bad}"


# The tensors one switch combination gets, cycling through the variants (their periods are coprime to each other
# and to the switches' so every variant meets many combinations): the matrix by shape and route under "auto", the
# LoRA pair by rank (PEFT's B = 0 init, a conv pair), the tensor of the auxiliary Adam by shape.
MATRICES = [(8, 24), (24, 6), (6, 2, 3, 3), (4, 4, 3, 3), (10, 14)]  # wide, tall (Gram), conv, conv (Gram), near-square
PAIRS = [  # (A shape, B shape, s, B zero)
    ((2, 24), (16, 2), 0.5, False),
    ((4, 24), (16, 4), 2.0, False),
    ((3, 2, 3, 3), (6, 3, 1, 1), 1.0, False),
    ((4, 24), (16, 4), 1.0, True),
    ((1, 12), (20, 1), 4.0, False),
    ((3, 10), (30, 3), 0.25, False),
    ((2, 9), (9, 2), 1.0, False),
]
AUX = [(16,), (10, 8), (7,)]  # vector, embedding (matrix-shaped: its eps is depth-scaled), vector


def _combination_groups(i: int, combo: dict, gen: torch.Generator) -> list[dict]:
    """One matrix, one LoRA pair and one auxiliary tensor, in param groups that carry the combination's switches
    (every switch is read per group), at depth 1 + i % 3 and, every third combination, a group lr of 2x."""
    keys = dict(combo, depth=1 + i % 3, **({"lr": 2 * MUON_HP["lr"]} if i % 3 == 2 else {}))
    shape = MATRICES[i % len(MATRICES)]
    W = nn.Parameter(torch.randn(*shape, generator=gen))
    a_shape, b_shape, s, b_zero = PAIRS[i % len(PAIRS)]
    A = nn.Parameter(torch.randn(*a_shape, generator=gen) * 0.3)
    B = nn.Parameter(torch.zeros(*b_shape) if b_zero else torch.randn(*b_shape, generator=gen) * 0.3)
    aux = nn.Parameter(torch.randn(*AUX[i % len(AUX)], generator=gen))
    role = "vector" if aux.ndim == 1 else "embedding"
    return [
        {**_matrix(f"c{i}.W", W), **keys},
        *({**g, **keys} for g in _pair(f"c{i}.pair", A, B, scale=s)),
        dict(params=[aux], names=[f"c{i}.aux"], role=role, fan_in=aux.shape[-1], fan_out=aux.shape[0], **keys),
    ]


@pytest.mark.parametrize("route", _config_choices("ortho_route"))
@pytest.mark.parametrize("method", _config_choices("orthogonalizer"))
@pytest.mark.parametrize("cls", [Muon_adv, AdaMuon_adv])
def test_muon_engine_matches_reference_for_every_switch_combination(cls, method, route):
    """All 192 combinations of the switches at once, each in param groups of its own: one optimizer, so the
    engine's buckets mix tensors of different switches (as they do for a per-component LR)."""
    assert len(_combos(MUON_SWITCHES)) >= 192  # nesterov, spectral, depth eps, width decay, B ortho, target, A opt
    adaptive = cls is AdaMuon_adv
    gen = torch.Generator().manual_seed(7)
    combos = _combos(MUON_SWITCHES)
    groups = [g for i, combo in enumerate(combos) for g in _combination_groups(i, combo, gen)]
    extra = ADAMUON_HP if adaptive else {}
    opt = cls(groups, orthogonalizer=method, ortho_route=route, **MUON_HP, **extra)
    errors = _run(opt, lambda refs: reference.muon_adv_step(refs, adaptive=adaptive))
    for i, combo in enumerate(combos):
        _check([(name, err) for name, err in errors if name.startswith(f"c{i}.")], combo)


@pytest.mark.parametrize("route", _config_choices("ortho_route"))
@pytest.mark.parametrize("method", _config_choices("orthogonalizer"))
@pytest.mark.parametrize("cls", [Muon_adv, AdaMuon_adv])
@pytest.mark.parametrize("target", ["factor", "product"])
def test_muon_engine_matches_reference_on_a_model(cls, method, route, target):
    """The richer model (_model): pairs of several ranks sharing buckets, every tensor kind at once."""
    adaptive = cls is AdaMuon_adv
    extra = ADAMUON_HP if adaptive else {}
    opt = cls(_model(seed=1), orthogonalizer=method, ortho_route=route, lora_spectral_target=target, **MUON_HP, **extra)
    _check(_run(opt, lambda refs: reference.muon_adv_step(refs, adaptive=adaptive)), {"lora_spectral_target": target})


@pytest.mark.parametrize("combo", _combos(LORA_MUON_SWITCHES), ids=str)
def test_lora_muon_engine_matches_reference_for_every_switch_combination(combo):
    groups = _model(seed=2, with_plain=False)
    gen = torch.Generator().manual_seed(3)
    plain = [nn.Parameter(torch.randn(16, 24, generator=gen)), nn.Parameter(torch.randn(16, generator=gen))]
    groups += [
        dict(params=[plain[0]], names=["plain"], role="matrix", fan_in=24, fan_out=16),
        dict(params=[plain[1]], names=["bias"], role="vector", fan_in=16, fan_out=16),
    ]
    hp = {k: v for k, v in MUON_HP.items() if k != "ns_eps"}
    opt = LoRAMuon(groups, rebalance_power=1.0, **hp, **combo)
    _check(_run(opt, reference.lora_muon_step, schedule=SCHEDULE + (0.8,)), combo)


def test_the_comparison_notices_a_wrong_factor():
    """The tolerance is tight enough to see a plausible mistake: 1/s not divided out of LoRA B's gradient."""
    opt = Muon_adv(_model(seed=1), **MUON_HP)
    original = reference.lora_gradient_scale
    try:
        reference.lora_gradient_scale = lambda p: 1.0
        errors = dict(_run(opt, reference.muon_adv_step))
    finally:
        reference.lora_gradient_scale = original
    assert errors["r4.B"] > 100 * RTOL and errors["wide"] <= RTOL
    assert math.isfinite(errors["r2.B"])

