"""Muon_adv / AdaMuon_adv: update sizes, decay, routing, LoRA scale invariance, resume, errors, learning."""
import copy
import io
import math
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from tuneonce.optimizer import AdaMuon_adv, Muon_adv, reference

OPTIMIZERS = [Muon_adv, AdaMuon_adv]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _matrix_group(p: nn.Parameter, name: str, depth: int = 1, **extra) -> dict:
    return dict(params=[p], names=[name], role="matrix", fan_in=p.shape[1], fan_out=p.shape[0], depth=depth, **extra)


def _pair_groups(A: nn.Parameter, B: nn.Parameter, scale: float = 1.0, pair: str = "p0", depth: int = 1) -> list[dict]:
    r, fan_in = A.shape
    fan_out = B.shape[0]
    common = dict(base_fan_in=fan_in, base_fan_out=fan_out, lora_scale=scale, depth=depth, pairs=[pair])
    return [
        dict(params=[A], names=[f"{pair}.lora_A"], role="lora_a", fan_in=fan_in, fan_out=r, **common),
        dict(params=[B], names=[f"{pair}.lora_B"], role="lora_b", fan_in=r, fan_out=fan_out, **common),
    ]


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(24, 48)
        self.fc2 = nn.Linear(48, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def _peft_model(alpha: int, rank: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    base = _Net()
    return get_peft_model(base, LoraConfig(r=rank, lora_alpha=alpha, target_modules=["fc1", "fc2"]))


def _lora_groups(model: nn.Module, depth: int = 2) -> list[dict]:
    groups = []
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
            groups += _pair_groups(A, B, module.scaling["default"], pair=name, depth=depth)
    return groups


def _delta_w(model: nn.Module) -> list[torch.Tensor]:
    out = []
    for module in model.modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
            out.append(module.scaling["default"] * B.detach() @ A.detach())
    return out


def _regression_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = _gen(seed)
    x = torch.randn(64, 24, generator=gen)
    w = torch.randn(24, 8, generator=gen) / 5
    return x, torch.tanh(x @ w)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> list[float]:
    x, y = _regression_batch(seed)
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# ----------------------------------------------------------------------------------- update sizes


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("shape", [(48, 80), (8, 96), (96, 8)])  # iterative route, Gram wide, Gram tall
@pytest.mark.parametrize("method", ["newton_schulz", "polar_express", "exact"])
def test_spectral_norm_of_update_hits_target(cls, shape, method):
    W = nn.Parameter(torch.randn(*shape, generator=_gen(0)))
    W.grad = torch.randn(*shape, generator=_gen(1))
    W0 = W.detach().clone()
    lr = 3e-3
    opt = cls([_matrix_group(W, "w", depth=3)], lr=lr, weight_decay=0.0, orthogonalizer=method)
    opt.step()
    step_norm = torch.linalg.matrix_norm(W.detach() - W0, ord=2).item()
    target = lr * math.sqrt(shape[0] / shape[1])
    assert abs(step_norm / target - 1) < 0.02


def test_first_step_matches_independent_reference():
    """The first step is reference.py's: u = (1−β²)g (Nesterov from m = 0), O = U·f(σ̂)·Vᵀ with damping
    √(fan_in/fan_out)/L, Δ = lr·√(out/in)·O/σ_max(O)."""
    gen = _gen(5)
    shape, depth, beta, lr = (32, 72), 4, 0.95, 1e-2
    W = nn.Parameter(torch.randn(*shape, generator=gen))
    g = torch.randn(*shape, generator=gen) * 0.02  # ‖u‖_F comparable to the damping: both regimes matter
    W.grad = g.clone()
    W0 = W.detach().clone()
    Muon_adv([_matrix_group(W, "w", depth=depth)], lr=lr, beta1=beta, weight_decay=0.0).step()

    g64 = g.double()
    _, u = reference.momentum(torch.zeros_like(g64), g64, beta, nesterov=True)
    torch.testing.assert_close(u, (1 - beta**2) * g64)
    O = reference.orthogonalize(u, "newton_schulz", 5, damping=math.sqrt(shape[1] / shape[0]) / depth)
    expected = W0.double() - reference.scaled_update(O, lr, math.sqrt(shape[0] / shape[1]), spectral=True)
    torch.testing.assert_close(W.detach().double(), expected, atol=1e-6, rtol=1e-5)


def test_without_spectral_scaling_uses_keller_jordan_scale():
    W = nn.Parameter(torch.randn(96, 24, generator=_gen(0)))
    W.grad = torch.randn(96, 24, generator=_gen(1)) * 100  # far from the damping
    W0 = W.detach().clone()
    Muon_adv([_matrix_group(W, "w")], lr=1e-2, weight_decay=0.0, spectral_scaling=False, orthogonalizer="exact").step()
    s = torch.linalg.svdvals(W.detach() - W0)
    torch.testing.assert_close(s, torch.full_like(s, 1e-2 * 2.0), rtol=1e-4, atol=0)  # √max(1, 96/24) = 2


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("b_zero", [True, False])
def test_product_target_sets_first_order_delta_w(cls, b_zero):
    gen = _gen(3)
    A = nn.Parameter(torch.randn(4, 40, generator=gen) / 40**0.5)
    B = nn.Parameter(torch.zeros(56, 4) if b_zero else torch.randn(56, 4, generator=gen) * 0.1)
    A.grad, B.grad = torch.randn(4, 40, generator=gen), torch.randn(56, 4, generator=gen)
    A0, B0 = A.detach().clone(), B.detach().clone()
    s, lr = 0.5, 1e-3
    cls(_pair_groups(A, B, scale=s), lr=lr, weight_decay=0.0, lora_spectral_target="product").step()
    dA, dB = A.detach() - A0, B.detach() - B0
    first_order = s * (dB @ A0 + B0 @ dA)
    target = lr * math.sqrt(56 / 40)
    assert abs(torch.linalg.matrix_norm(first_order, ord=2).item() / target - 1) < 0.02


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_product_target_is_exact_for_every_pair_of_mixed_buckets(cls):
    """Pairs whose A share a bucket while their B do not (and the reverse), a pair at PEFT init (B = 0), a pair on
    the iterative route, and a pair whose A has no gradient: every pair with both updates gets
    ‖s·(ΔB·A + B·ΔA)‖₂ = lr·√(base_out/base_in) to fp32 rounding; the incomplete pair keeps B's own target."""
    gen = _gen(11)
    shapes = {"p0": (4, 40, 56), "p1": (4, 40, 24), "p2": (4, 32, 56), "p3": (6, 12, 10), "p4": (4, 40, 56)}
    scales = {"p0": 0.5, "p1": 2.0, "p2": 1.0, "p3": 1.0, "p4": 0.5}
    groups, factors = [], {}
    for pair, (r, fan_in, fan_out) in shapes.items():
        A = nn.Parameter(torch.randn(r, fan_in, generator=gen, dtype=torch.float64) / fan_in**0.5)
        B = nn.Parameter(torch.randn(fan_out, r, generator=gen, dtype=torch.float64) * (pair != "p2"))
        A.grad = None if pair == "p4" else torch.randn(r, fan_in, generator=gen, dtype=torch.float64)
        B.grad = torch.randn(fan_out, r, generator=gen, dtype=torch.float64)
        groups += _pair_groups(A, B, scale=scales[pair], pair=pair, depth=2)
        factors[pair] = (A, B, A.detach().clone(), B.detach().clone())
    lr = 1e-3
    opt = cls(groups, lr=lr, weight_decay=0.0, lora_spectral_target="product")
    for _ in range(2):  # the second step has ΔA ≠ 0 at p2 (B = 0 only at the start)
        before = {k: (A.detach().clone(), B.detach().clone()) for k, (A, B, _, _) in factors.items()}
        opt.step()
    for pair, (A, B, _, _) in factors.items():
        A0, B0 = before[pair]
        dA, dB = A.detach() - A0, B.detach() - B0
        r, fan_in, fan_out = shapes[pair]
        if pair == "p4":
            assert torch.equal(dA, torch.zeros_like(dA))
            own = lr * math.sqrt(fan_out / r) / scales[pair]  # B's factor target, 1/s folded into B's step
            assert torch.linalg.matrix_norm(dB, ord=2).item() == pytest.approx(own, rel=1e-5)
            continue
        first_order = scales[pair] * (dB @ A0 + B0 @ dA)
        norm = torch.linalg.matrix_norm(first_order, ord=2).item()
        assert norm == pytest.approx(lr * math.sqrt(fan_out / fan_in), rel=1e-5), pair


# ------------------------------------------------------------------------------------------ decay


def test_decay_is_inverse_fan_in_independent_of_peak_lr_and_follows_schedule():
    def decayed(fan_in: int, lr: float, schedule: float) -> float:
        W = nn.Parameter(torch.ones(16, fan_in))
        W.grad = torch.zeros_like(W)  # zero update: only the decay acts
        opt = Muon_adv([_matrix_group(W, "w")], lr=lr, weight_decay=0.2)
        opt.param_groups[0]["lr"] = lr * schedule  # what an LR scheduler does
        opt.step()
        return 1 - W.detach()[0, 0].item()

    assert decayed(64, 1e-3, 1.0) == pytest.approx(0.2 / 64, rel=1e-4)
    assert decayed(256, 1e-3, 1.0) == pytest.approx(decayed(64, 1e-3, 1.0) / 4, rel=1e-3)
    assert decayed(64, 1e-1, 1.0) == pytest.approx(decayed(64, 1e-3, 1.0), rel=1e-4)
    assert decayed(64, 1e-3, 0.5) == pytest.approx(0.5 * 0.2 / 64, rel=1e-3)


def test_lora_pair_decay_uses_base_fan_in():
    A, B = nn.Parameter(torch.ones(4, 80)), nn.Parameter(torch.ones(32, 4))
    A.grad, B.grad = torch.zeros_like(A), torch.zeros_like(B)
    Muon_adv(_pair_groups(A, B), lr=1e-3, weight_decay=0.5).step()
    product = (B.detach() @ A.detach())[0, 0].item() / 4
    assert product == pytest.approx(1 - 0.5 / 80, rel=1e-6)


def test_unscaled_decay_is_torch_style():
    W = nn.Parameter(torch.ones(16, 64))
    W.grad = torch.zeros_like(W)
    Muon_adv([_matrix_group(W, "w")], lr=0.1, weight_decay=0.2, width_scaled_weight_decay=False).step()
    assert W.detach()[0, 0].item() == pytest.approx(1 - 0.1 * 0.2)


# ---------------------------------------------------------------------------------------- routing


def _mixed_params(lora_scale: float = 1.0) -> tuple[list[dict], dict[str, nn.Parameter]]:
    gen = _gen(7)
    p = {
        "A": nn.Parameter(torch.randn(4, 32, generator=gen)),
        "B": nn.Parameter(torch.randn(48, 4, generator=gen)),
        "W": nn.Parameter(torch.randn(24, 32, generator=gen)),
        "conv": nn.Parameter(torch.randn(24, 2, 3, 3, generator=gen)),  # tall 24 x 18: iterative route
        "bias": nn.Parameter(torch.randn(24, generator=gen)),
        "emb": nn.Parameter(torch.randn(50, 16, generator=gen)),
        "mag": nn.Parameter(torch.randn(48, generator=gen)),
        "oft": nn.Parameter(torch.randn(6, 6, generator=gen)),
        "oft3": nn.Parameter(torch.randn(2, 3, 3, generator=gen)),
    }
    groups = _pair_groups(p["A"], p["B"], scale=lora_scale) + [
        _matrix_group(p["W"], "W"),
        dict(params=[p["conv"]], names=["conv"], role="conv", fan_in=18, fan_out=24),
        dict(params=[p["bias"]], names=["bias"], role="vector", fan_in=24, fan_out=24),
        dict(params=[p["emb"]], names=["emb"], role="embedding", fan_in=16, fan_out=50),
        dict(params=[p["mag"]], names=["mag"], role="dora_magnitude", fan_in=48, fan_out=48),
        dict(params=[p["oft"]], names=["oft"], role="oft", fan_in=6, fan_out=6),
        dict(params=[p["oft3"]], names=["oft3"], role="oft", fan_in=9, fan_out=2),
    ]
    for t in p.values():
        t.grad = torch.randn(t.shape, generator=gen)
    return groups, p


def _path(state: dict) -> str:
    if "momentum_buffer" in state:
        return "muon"
    return "adam" if "exp_avg_sq" in state else "signsgd"


@pytest.mark.parametrize(
    "kwargs,a_path,b_path",
    [
        ({}, "muon", "muon"),
        ({"lora_a_optimizer": "adam"}, "adam", "muon"),
        ({"lora_a_optimizer": "signsgd"}, "signsgd", "muon"),
        ({"lora_b_orthogonalize": False}, "muon", "adam"),
        ({"lora_b_orthogonalize": False, "lora_a_optimizer": "adam"}, "adam", "adam"),
    ],
)
def test_toggles_route_each_role(kwargs, a_path, b_path):
    groups, p = _mixed_params()
    opt = Muon_adv(groups, **kwargs)
    opt.step()
    paths = {name: _path(opt.state[t]) for name, t in p.items()}
    assert paths == {
        "A": a_path, "B": b_path, "W": "muon", "conv": "muon", "bias": "adam", "emb": "adam", "mag": "adam",
        "oft": "muon", "oft3": "adam",
    }  # fmt: skip
    # state: one momentum per Muon tensor (≤ 1× the parameters' bytes)
    assert opt.state[p["W"]]["momentum_buffer"].shape == p["W"].shape


def test_signsgd_on_lora_a_moves_every_entry_by_adam_lr():
    groups, p = _mixed_params()
    A0 = p["A"].detach().clone()
    Muon_adv(groups, lora_a_optimizer="signsgd", adam_lr=1e-3, weight_decay=0.0).step()
    torch.testing.assert_close((p["A"].detach() - A0).abs(), torch.full_like(A0, 1e-3), rtol=0, atol=2e-7)


def test_plain_model_parameters_work():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    opt = AdaMuon_adv(model.parameters(), lr=1e-2)
    x = torch.randn(4, 3, 6, 6)
    model(x).square().mean().backward()
    before = [t.detach().clone() for t in model.parameters()]
    opt.step()
    assert all(not torch.equal(b, t) for b, t in zip(before, model.parameters()))
    assert _path(opt.state[model[0].weight]) == "muon" and _path(opt.state[model[0].bias]) == "adam"


# ----------------------------------------------------------------------------------------- errors


def test_errors_name_the_parameter():
    with pytest.raises(ValueError, match="'v'.*1-D"):
        Muon_adv([dict(params=[nn.Parameter(torch.randn(5))], names=["v"], role="matrix", fan_in=5, fan_out=1)])
    with pytest.raises(ValueError, match="'empty'.*zero-size"):
        Muon_adv([dict(params=[nn.Parameter(torch.randn(0, 5))], names=["empty"], role="matrix", fan_in=5, fan_out=1)])
    with pytest.raises(ValueError, match="'w'.*unknown role 'dense'"):
        Muon_adv([dict(params=[nn.Parameter(torch.randn(4, 5))], names=["w"], role="dense")])
    A, B = nn.Parameter(torch.randn(2, 8)), nn.Parameter(torch.randn(8, 2))
    with pytest.raises(ValueError, match="'p0.lora_A'.*partner"):
        Muon_adv(_pair_groups(A, B)[:1])
    no_pairs = _pair_groups(A, B)
    del no_pairs[0]["pairs"]
    with pytest.raises(ValueError, match="'p0.lora_A'.*pair id"):
        Muon_adv(no_pairs)
    with pytest.raises(ValueError, match="'w'.*8 x 4"):
        Muon_adv([dict(params=[nn.Parameter(torch.randn(4, 8))], names=["w"], role="matrix", fan_in=4, fan_out=8)])
    with pytest.raises(ValueError, match="lora_a_optimizer"):
        Muon_adv(_pair_groups(A, B), lora_a_optimizer="sgd")


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_non_finite_gradient_skips_step_and_names_parameter(cls):
    groups, p = _mixed_params()
    opt = cls(groups)
    opt.step()
    for t in p.values():
        t.grad = torch.randn_like(t)
    p["B"].grad[3, 1] = float("nan")
    params_before = {k: t.detach().clone() for k, t in p.items()}
    state_before = copy.deepcopy(opt.state_dict())
    with pytest.warns(UserWarning, match="p0.lora_B"):
        opt.step()
    assert all(torch.equal(params_before[k], t) for k, t in p.items())
    state_after = opt.state_dict()["state"]
    for idx, st in state_before["state"].items():
        for key, value in st.items():
            after = state_after[idx][key]
            assert torch.equal(value, after) if torch.is_tensor(value) else value == after


# ------------------------------------------------------------------------------ invariances, lr = 0

MODES = [
    {},
    {"lora_spectral_target": "product"},
    {"lora_a_optimizer": "adam", "lora_b_orthogonalize": False},
    {"lora_a_optimizer": "signsgd"},
    {"spectral_scaling": False, "depth_scaled_eps": False},
    {"orthogonalizer": "polar_express", "ortho_route": "iterative", "nesterov": False},
]


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("mode", MODES)
def test_same_delta_w_for_alpha_r_and_2r(cls, mode):
    deltas = []
    for alpha in (4, 8):
        model = _peft_model(alpha)
        opt = cls(_lora_groups(model), lr=1e-2, adam_lr=1e-2, **mode)
        _train(model, opt, 3)
        deltas.append(_delta_w(model))
    for d_r, d_2r in zip(*deltas):
        assert d_r.abs().max() > 0
        torch.testing.assert_close(d_r, d_2r, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("mode", MODES + [{"state_dtype": "bfloat16"}])
def test_lr_zero_moves_nothing(cls, mode):
    groups, p = _mixed_params(lora_scale=2.0)
    before = {k: t.detach().clone() for k, t in p.items()}
    opt = cls(groups, lr=0.0, **mode)
    for _ in range(2):
        opt.step()
    assert all(torch.equal(before[k], t.detach()) for k, t in p.items())


# ---------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("mode", [{}, {"state_dtype": "bfloat16", "lora_a_optimizer": "adam"}, {"lora_spectral_target": "product"}])
def test_save_load_next_step_is_bit_identical(cls, mode):
    def fresh_grads(p: dict, seed: int) -> None:
        gen = _gen(seed)
        for t in p.values():
            t.grad = torch.randn(t.shape, generator=gen)

    groups, p = _mixed_params()
    opt = cls(groups, lr=1e-2, **mode)
    for seed in (10, 11):
        fresh_grads(p, seed)
        opt.step()
    buffer = io.BytesIO()
    torch.save({"params": {k: t.detach().clone() for k, t in p.items()}, "opt": opt.state_dict()}, buffer)
    fresh_grads(p, 12)
    opt.step()
    continued = {k: t.detach().clone() for k, t in p.items()}

    buffer.seek(0)
    saved = torch.load(buffer)
    groups2, p2 = _mixed_params()
    with torch.no_grad():
        for k, t in p2.items():
            t.copy_(saved["params"][k])
    opt2 = cls(groups2, lr=1e-2, **mode)
    opt2.load_state_dict(saved["opt"])
    fresh_grads(p2, 12)
    opt2.step()
    assert all(torch.equal(continued[k], t.detach()) for k, t in p2.items())


# ------------------------------------------------------------------------------- buckets, routes


def test_partial_gradients_in_a_bucket():
    """A tensor without gradient is left alone; its bucket mates step as if alone."""
    gen = _gen(8)
    W1, W2 = nn.Parameter(torch.randn(16, 24, generator=gen)), nn.Parameter(torch.randn(16, 24, generator=gen))
    solo = nn.Parameter(W1.detach().clone())
    grad = torch.randn(16, 24, generator=gen)
    opt = Muon_adv([_matrix_group(W1, "w1"), _matrix_group(W2, "w2")], lr=1e-2)
    opt_solo = Muon_adv([_matrix_group(solo, "solo")], lr=1e-2)
    W2_before = W2.detach().clone()
    for _ in range(2):
        W1.grad, W2.grad, solo.grad = grad.clone(), None, grad.clone()
        opt.step()
        opt_solo.step()
    torch.testing.assert_close(W1.detach(), solo.detach(), rtol=0, atol=1e-7)
    assert torch.equal(W2.detach(), W2_before) and torch.count_nonzero(opt.state[W2]["momentum_buffer"]) == 0


@pytest.mark.parametrize("method", ["newton_schulz", "exact"])
def test_gram_and_iterative_routes_give_the_same_steps(method):
    results = []
    for route in ("gram", "iterative"):
        model = _peft_model(4, seed=3)
        opt = Muon_adv(_lora_groups(model), lr=1e-2, ortho_route=route, orthogonalizer=method)
        _train(model, opt, 3)
        results.append(_delta_w(model))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


# ------------------------------------------------------------------------------------- learning


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("mode", [{}, {"lora_a_optimizer": "adam"}, {"lora_spectral_target": "product"}])
def test_lowers_the_loss_of_a_peft_lora_regression(cls, mode):
    model = _peft_model(4)
    opt = cls(_lora_groups(model), lr=5e-2, adam_lr=1e-2, **mode)
    losses = _train(model, opt, 25)
    assert losses[-1] < 0.7 * losses[0]


def test_bfloat16_state_tracks_float32_state():
    results = []
    for dtype in ("float32", "bfloat16"):
        model = _peft_model(4)
        opt = AdaMuon_adv(_lora_groups(model), lr=1e-2, state_dtype=dtype)
        results.append(_train(model, opt, 10))
        if dtype == "bfloat16":
            assert all(st["momentum_buffer"].dtype == torch.bfloat16 for st in opt.state.values())
    assert results[1][-1] == pytest.approx(results[0][-1], rel=0.05)
