import io
import math

import pytest
import torch
from torch import nn

from tuneonce.optimizer.groups import build_param_groups, peft_param_infos
from tuneonce.optimizer.lora_muon import LoRAMuon
from tuneonce.optimizer.param_spec import GroupSpec, ParamInfo, Role
from tuneonce.optimizer.reference import lora_muon_first_order_change, msign, projector

DT = torch.float64  # the algebra tests run in float64 so that they compare to ~1e-10


class Adapters:
    """LoRA pairs as raw parameters: W_i = s·up_i·down_i (PEFT layout: up = lora_B m×r, down = lora_A r×n)."""

    def __init__(self, shapes, *, scale=1.0, seed=0, zero_up=False, dtype=DT, unbalance=1.0):
        gen = torch.Generator().manual_seed(seed)
        self.scale = scale
        self.downs, self.ups, self.infos = [], [], []
        for i, (m, n, r) in enumerate(shapes):
            down = nn.Parameter((torch.randn(r, n, generator=gen, dtype=DT) / math.sqrt(n) * unbalance).to(dtype))
            up_init = torch.zeros(m, r, dtype=DT) if zero_up else torch.randn(m, r, generator=gen, dtype=DT) / math.sqrt(r)
            up = nn.Parameter((up_init / unbalance).to(dtype))
            self.downs.append(down)
            self.ups.append(up)
            for p, role, name in ((down, Role.LORA_A, f"l{i}.lora_A"), (up, Role.LORA_B, f"l{i}.lora_B")):
                spec = GroupSpec(role, fan_in=p.shape[1], fan_out=p.shape[0], base_fan_in=n, base_fan_out=m, lora_scale=scale)
                self.infos.append(ParamInfo(name, p, spec, pair=f"l{i}"))

    def weights(self) -> list[torch.Tensor]:
        return [self.scale * (up @ down) for up, down in zip(self.ups, self.downs)]

    def params(self) -> list[torch.Tensor]:
        return self.downs + self.ups

    def optimizer(self, **kwargs) -> LoRAMuon:
        lr = kwargs.pop("lr", 1e-2)
        wd = kwargs.pop("weight_decay", 0.0)
        return LoRAMuon(build_param_groups(self.infos, lr=lr, weight_decay=wd), lr=lr, weight_decay=wd, **kwargs)


def _linear_step(ad: Adapters, opt: LoRAMuon, Gs: list[torch.Tensor]) -> None:
    opt.zero_grad()
    sum((G * W).sum() for G, W in zip(Gs, ad.weights())).backward()
    opt.step()


def _nonlinear_step(ad: Adapters, opt: LoRAMuon, targets: list[torch.Tensor]) -> None:
    opt.zero_grad()
    sum(((torch.tanh(W) - T) ** 2).sum() for W, T in zip(ad.weights(), targets)).backward()
    opt.step()


SHAPES = [(24, 40, 4), (24, 40, 4), (24, 40, 4), (30, 12, 3)]  # three pairs batched together, one alone


def test_first_order_update_equals_projector_form():
    ad = Adapters(SHAPES, scale=0.5)
    lr = 1e-2
    opt = ad.optimizer(lr=lr)
    gen = torch.Generator().manual_seed(1)
    Gs = [torch.randn(m, n, generator=gen, dtype=DT) for m, n, _ in SHAPES]
    downs0 = [d.detach().clone() for d in ad.downs]
    ups0 = [u.detach().clone() for u in ad.ups]
    _linear_step(ad, opt, Gs)
    for G, d0, u0, d1, u1, (m, n, r) in zip(Gs, downs0, ups0, ad.downs, ad.ups, SHAPES):
        first_order = ad.scale * ((u1 - u0) @ d0 + u0 @ (d1 - d0))
        eta = lr * math.sqrt(m / n)  # spectral scaling
        expected = lora_muon_first_order_change(G, d0, u0, eta)  # −(η/2)·[msign(G·P_row) + msign(P_col·G)]
        torch.testing.assert_close(first_order, expected, rtol=1e-8, atol=1e-12)
        assert torch.linalg.matrix_norm(first_order, ord=2) <= eta * (1 + 1e-9)


def test_float32_matches_float64_reference():
    ad32 = Adapters(SHAPES[:1], dtype=torch.float32)
    ad64 = Adapters(SHAPES[:1], dtype=DT)
    Gs = [torch.randn(24, 40, generator=torch.Generator().manual_seed(2))]
    opt32, opt64 = ad32.optimizer(), ad64.optimizer()
    for _ in range(3):
        _linear_step(ad32, opt32, Gs)
        _linear_step(ad64, opt64, [G.double() for G in Gs])
    w32, w64 = ad32.weights()[0].double(), ad64.weights()[0]
    assert (w32 - w64).norm() / w64.norm() < 1e-4


def test_alpha_is_divided_out():
    """The same adapted weight written with alpha = r and alpha = 2r follows the same trajectory."""
    base = Adapters(SHAPES, scale=1.0, seed=3)
    doubled = Adapters(SHAPES, scale=2.0, seed=3)
    with torch.no_grad():
        for p in doubled.params():
            p.div_(math.sqrt(2.0))
    gen = torch.Generator().manual_seed(4)
    targets = [0.5 * torch.randn(m, n, generator=gen, dtype=DT) for m, n, _ in SHAPES]
    opt_a, opt_b = base.optimizer(weight_decay=5.0), doubled.optimizer(weight_decay=5.0)
    for _ in range(3):
        _nonlinear_step(base, opt_a, targets)
        _nonlinear_step(doubled, opt_b, targets)
        for wa, wb in zip(base.weights(), doubled.weights()):
            torch.testing.assert_close(wa, wb, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("lr", [1e-3, 1e-2])
def test_split_decay_gives_width_scaled_dense_decay_independent_of_peak_lr(lr):
    ad = Adapters(SHAPES)
    opt = ad.optimizer(lr=lr, weight_decay=8.0)  # λ = 8/base_fan_in: 0.2 for n = 40, 2/3 for n = 12
    W0 = [w.detach().clone() for w in ad.weights()]
    for p in ad.params():
        p.grad = torch.zeros_like(p)  # no gradient: only the decay acts
    opt.step()
    for w0, w1, (_, n, _) in zip(W0, ad.weights(), SHAPES):
        torch.testing.assert_close(w1, (1 - 8.0 / n) * w0, rtol=1e-12, atol=1e-14)
    # a scheduler at half the peak lr halves the decay (s_t = lr_t / lr_peak), not lr itself
    for group in opt.param_groups:
        group["lr"] = lr / 2
    W1 = [w.detach().clone() for w in ad.weights()]
    opt.step()
    for w1, w2, (_, n, _) in zip(W1, ad.weights(), SHAPES):
        torch.testing.assert_close(w2, (1 - 4.0 / n) * w1, rtol=1e-12, atol=1e-14)


def test_plain_decay_is_lr_times_wd():
    ad = Adapters(SHAPES[:1])
    opt = ad.optimizer(lr=0.1, weight_decay=2.0, width_scaled_weight_decay=False)
    W0 = ad.weights()[0].detach().clone()
    for p in ad.params():
        p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(ad.weights()[0], (1 - 0.2) * W0, rtol=1e-12, atol=1e-14)


def test_rebalancing_changes_neither_weights_nor_updates():
    gen = torch.Generator().manual_seed(5)
    targets = [0.5 * torch.randn(m, n, generator=gen, dtype=DT) for m, n, _ in SHAPES]
    plain = Adapters(SHAPES, unbalance=30.0)
    balanced = Adapters(SHAPES, unbalance=30.0)
    opt_plain, opt_bal = plain.optimizer(), balanced.optimizer(rebalance_every=1)
    for _ in range(3):
        _nonlinear_step(plain, opt_plain, targets)
        _nonlinear_step(balanced, opt_bal, targets)
        for wp, wb in zip(plain.weights(), balanced.weights()):
            torch.testing.assert_close(wb, wp, rtol=1e-9, atol=1e-12)
    for down, up in zip(balanced.downs, balanced.ups):
        s_down, s_up = (torch.linalg.matrix_norm(x.detach(), ord=2) for x in (down, up))
        torch.testing.assert_close(s_down, s_up, rtol=1e-9, atol=0)
    s_down, s_up = (torch.linalg.matrix_norm(x.detach(), ord=2) for x in (plain.downs[0], plain.ups[0]))
    assert s_down / s_up > 100  # the un-rebalanced factors stay far apart


def test_zero_initialised_up_factor_is_guarded():
    ad = Adapters(SHAPES, zero_up=True)  # PEFT: lora_B = 0, so upᵀup is singular and down's gradient is zero
    lr = 1e-2
    opt = ad.optimizer(lr=lr)
    gen = torch.Generator().manual_seed(6)
    Gs = [torch.randn(m, n, generator=gen, dtype=DT) for m, n, _ in SHAPES]
    downs0 = [d.detach().clone() for d in ad.downs]
    _linear_step(ad, opt, Gs)
    for G, d0, d1, W, (m, n, r) in zip(Gs, downs0, ad.downs, ad.weights(), SHAPES):
        assert torch.equal(d1, d0)  # no gradient reached it, and the guard adds nothing
        # the only surviving term of the projector form (P_col = 0 for a zero factor)
        torch.testing.assert_close(W, -(lr * math.sqrt(m / n) / 2) * msign(G @ projector(d0.mT), r), rtol=1e-8, atol=1e-12)
    for _ in range(3):
        _linear_step(ad, opt, Gs)
    for d0, d1, up in zip(downs0, ad.downs, ad.ups):
        assert torch.isfinite(d1).all() and torch.isfinite(up).all()
        assert up.abs().max() > 0 and not torch.equal(d1, d0)


def _with_aux(ad: Adapters, **kwargs) -> tuple[LoRAMuon, nn.Parameter]:
    bias = nn.Parameter(torch.linspace(-1, 1, 7, dtype=DT))
    infos = ad.infos + [ParamInfo("bias", bias, GroupSpec(Role.VECTOR, fan_in=7, fan_out=7))]
    lr, wd = kwargs.pop("lr", 1e-2), kwargs.pop("weight_decay", 0.1)
    return LoRAMuon(build_param_groups(infos, lr=lr, weight_decay=wd), lr=lr, weight_decay=wd, **kwargs), bias


def _aux_and_linear_step(ad, opt, bias, Gs):
    opt.zero_grad()
    (sum((G * W).sum() for G, W in zip(Gs, ad.weights())) + (bias**2).sum()).backward()
    opt.step()


def test_lr_zero_moves_nothing():
    ad = Adapters(SHAPES, unbalance=10.0)
    opt, bias = _with_aux(ad, lr=0.0, weight_decay=1.0, rebalance_every=1, adam_lr=1e-1, adam_weight_decay=0.1)
    before = [p.detach().clone() for p in ad.params() + [bias]]
    Gs = [torch.ones(m, n, dtype=DT) for m, n, _ in SHAPES]
    for _ in range(2):
        _aux_and_linear_step(ad, opt, bias, Gs)
    for p, p0 in zip(ad.params() + [bias], before):
        assert torch.equal(p, p0)


def test_aux_adam_matches_torch_adamw():
    ad = Adapters(SHAPES[:1])
    opt, bias = _with_aux(ad, adam_lr=0.05, adam_betas=(0.8, 0.9), adam_eps=1e-6, adam_weight_decay=0.3)
    ref = nn.Parameter(bias.detach().clone())
    ref_opt = torch.optim.AdamW([ref], lr=0.05, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.3)
    Gs = [torch.zeros(24, 40, dtype=DT)]
    for _ in range(3):
        _aux_and_linear_step(ad, opt, bias, Gs)
        ref_opt.zero_grad()
        (ref**2).sum().backward()
        ref_opt.step()
    torch.testing.assert_close(bias, ref, rtol=1e-6, atol=1e-9)  # torch keeps its step count in float32


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
def test_state_dict_round_trip_is_bit_identical(state_dtype):
    gen = torch.Generator().manual_seed(7)
    targets = [0.5 * torch.randn(m, n, generator=gen) for m, n, _ in SHAPES]

    def make():
        ad = Adapters(SHAPES, dtype=torch.float32, seed=8)
        return ad, _with_aux(ad, state_dtype=state_dtype, rebalance_every=2)

    ad, (opt, bias) = make()
    for _ in range(3):
        _nonlinear_step(ad, opt, targets)
    buffer = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": [p.detach().clone() for p in ad.params() + [bias]]}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    ad2, (opt2, bias2) = make()
    with torch.no_grad():
        for p, value in zip(ad2.params() + [bias2], saved["params"]):
            p.copy_(value)
    opt2.load_state_dict(saved["opt"])
    assert opt2.state[ad2.downs[0]]["momentum"].dtype == {"float32": torch.float32, "bfloat16": torch.bfloat16}[state_dtype]
    for _ in range(2):
        _nonlinear_step(ad, opt, targets)
        _nonlinear_step(ad2, opt2, targets)
    for p, q in zip(ad.params() + [bias], ad2.params() + [bias2]):
        assert torch.equal(p, q)


def test_non_finite_gradient_is_named_and_skipped():
    ad = Adapters(SHAPES)
    opt = ad.optimizer()
    before = [p.detach().clone() for p in ad.params()]
    for p in ad.params():
        p.grad = torch.ones_like(p)
    ad.ups[2].grad[0, 0] = float("nan")
    with pytest.warns(UserWarning, match="l2.lora_B"):
        opt.step()
    assert all(torch.equal(p, p0) for p, p0 in zip(ad.params(), before))
    assert len(opt.state) == 0


def test_unpaired_factor_is_named():
    ad = Adapters(SHAPES[:2])
    infos = [info for info in ad.infos if info.name != "l1.lora_B"]
    with pytest.raises(ValueError, match="'l1.lora_A' has no lora_b partner"):
        LoRAMuon(build_param_groups(infos, lr=1e-3, weight_decay=0.0))
    with pytest.raises(ValueError, match="unknown role 'spline'"):
        LoRAMuon([{"params": [nn.Parameter(torch.zeros(2, 2))], "role": "spline", "fan_in": 2, "fan_out": 2}])


def test_plain_parameters_go_to_adam():
    layer = nn.Linear(4, 3)
    opt = LoRAMuon(layer.parameters(), adam_lr=0.1)
    assert sorted(g["role"] for g in opt.param_groups) == ["matrix", "vector"]
    layer(torch.randn(5, 4)).pow(2).sum().backward()
    w0 = layer.weight.detach().clone()
    opt.step()
    assert not torch.equal(layer.weight, w0) and "exp_avg" in opt.state[layer.weight]


def test_lowers_the_loss_of_a_small_peft_lora_problem():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    teacher = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    teacher.load_state_dict(student.state_dict())
    with torch.no_grad():  # the teacher differs by a rank-2 change of each layer
        for layer in (teacher[0], teacher[2]):
            out_f, in_f = layer.weight.shape
            layer.weight.add_(0.5 * torch.randn(out_f, 2) @ torch.randn(2, in_f) / math.sqrt(in_f))
    model = get_peft_model(student, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]))
    opt = LoRAMuon(build_param_groups(peft_param_infos(model, depth=2), lr=0.1, weight_decay=0.0), lr=0.1)
    x = torch.randn(64, 16)
    y = teacher(x).detach()
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses[::5]


@pytest.mark.parametrize("m, n, r, grad_rank", [(16, 4, 8, 4), (512, 256, 8, 1)])
def test_rank_deficient_factors_and_gradients_stay_within_the_budget(m, n, r, grad_rank):
    """rank > fan_in, or rank-1 gradients (batch-1 modulation layers): fp32 Gram noise must not be inverted."""
    torch.manual_seed(0)
    down = nn.Parameter(torch.randn(r, n) / math.sqrt(n))
    up = nn.Parameter(torch.zeros(m, r))
    infos = [
        ParamInfo("a", down, GroupSpec(Role.LORA_A, fan_in=n, fan_out=r, base_fan_in=n, base_fan_out=m), pair="p"),
        ParamInfo("b", up, GroupSpec(Role.LORA_B, fan_in=r, fan_out=m, base_fan_in=n, base_fan_out=m), pair="p"),
    ]
    lr = 1e-2
    opt = LoRAMuon(build_param_groups(infos, lr=lr, weight_decay=0.0), lr=lr)
    budget = lr * math.sqrt(m / n)
    for _ in range(4):
        G = torch.randn(m, grad_rank) @ torch.randn(grad_rank, n)
        W0 = (up @ down).detach()
        opt.zero_grad()
        ((up @ down) * G).sum().backward()
        opt.step()
        step = torch.linalg.matrix_norm((up @ down).detach() - W0, ord=2)
        # first order ≤ budget; the rest is the second-order Δup·Δdown, large only while W is near zero
        # (inverting fp32 Gram noise instead gave 100-2000x the budget here)
        assert step <= 5 * budget
