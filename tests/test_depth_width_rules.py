"""The depth/width rules of docs/optimizer_math.md §3 as closed forms."""
import math

import pytest
import torch

from tuneonce.optimizer import scaling


def test_closed_forms():
    assert scaling.spectral_target(1280, 640) == pytest.approx(math.sqrt(0.5))
    assert scaling.keller_jordan_scale(1280, 640) == 1.0 and scaling.keller_jordan_scale(640, 2560) == 2.0
    assert scaling.ns_damping(1280, 16, 87) == pytest.approx(math.sqrt(80) / 87)
    assert scaling.adamuon_eps(640, 2560, 2) == pytest.approx(1 / (2 * 1280))
    assert scaling.aux_adam_matrix_eps(16 * 1280, 57) == pytest.approx(1 / (57 * math.sqrt(16 * 1280)))


def test_eps_shrink_with_depth():
    assert scaling.ns_damping(64, 64, 10) == pytest.approx(scaling.ns_damping(64, 64, 1) / 10)
    assert scaling.adamuon_eps(64, 64, 4) == pytest.approx(scaling.adamuon_eps(64, 64, 1) / 4)


def test_width_decay_is_inverse_width_and_follows_only_the_schedule():
    assert scaling.width_decay(0.1, 1280, 1.0) == pytest.approx(0.1 / 1280)
    assert scaling.width_decay(0.1, 2560, 1.0) == pytest.approx(scaling.width_decay(0.1, 1280, 1.0) / 2)
    assert scaling.width_decay(0.1, 1280, 0.25) == pytest.approx(0.25 * 0.1 / 1280)
    # same schedule factor at different peak lrs: same decay
    assert scaling.schedule_factor(5e-4, 1e-3) == scaling.schedule_factor(5e-2, 1e-1) == 0.5
    assert scaling.schedule_factor(0.0, 0.0) == 0.0


def test_lora_pair_decay_makes_the_product_decay_like_a_dense_matrix():
    gen = torch.Generator().manual_seed(0)
    B, A = torch.randn(96, 4, generator=gen, dtype=torch.float64), torch.randn(4, 80, generator=gen, dtype=torch.float64)
    c = scaling.lora_pair_decay_multiplier(0.1, 80, 0.7)
    dense = 1 - scaling.width_decay(0.1, 80, 0.7)
    torch.testing.assert_close((c * B) @ (c * A), dense * (B @ A))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: scaling.spectral_target(0, 4), "fan_in"),
        (lambda: scaling.ns_damping(4, 4, 0), "depth"),
        (lambda: scaling.width_decay(-0.1, 4, 1.0), "weight_decay"),
        (lambda: scaling.width_decay(8.0, 4, 1.0), "fraction"),
        (lambda: scaling.schedule_factor(-1.0, 1.0), "learning rates"),
    ],
)
def test_bad_input_is_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _first_order_grams(A, B, dA, dB):
    """The 2r×2r Grams of Q = [A; ΔA] and P = [ΔB B] from r×r blocks, as the optimizer forms them."""
    gram_q = scaling.sym_blocks(A @ A.mT, A @ dA.mT, dA @ dA.mT)
    gram_p = scaling.sym_blocks(dB.mT @ dB, dB.mT @ B, B.mT @ B)
    return gram_q, gram_p


@pytest.mark.parametrize("case", ["general", "peft_init_b_zero", "first_step_da_zero", "rank_deficient_a"])
def test_lora_product_sigma_equals_dense_spectral_norm(case):
    """σ_max(ΔB·A + B·ΔA) from 2r×2r Grams only, against the dense SVD of the out×in change (fp32 inputs)."""
    gen = torch.Generator().manual_seed(7)
    n, r, fan_in, fan_out = 6, 4, 48, 40
    A = torch.randn(n, r, fan_in, generator=gen) / fan_in**0.5
    B = torch.randn(n, fan_out, r, generator=gen) * 0.02
    dA = torch.randn(n, r, fan_in, generator=gen) * 1e-3
    dB = torch.randn(n, fan_out, r, generator=gen) * 1e-3
    if case in ("peft_init_b_zero", "first_step_da_zero"):
        B.zero_()
    if case == "first_step_da_zero":  # PEFT's first step: grad_A = 0 when B = 0, so ΔA = 0 too
        dA.zero_()
    if case == "rank_deficient_a":
        A[:, -1] = A[:, 0]  # repeated row: A·Aᵀ singular
    sigma = scaling.lora_product_sigma(*_first_order_grams(A, B, dA, dB))
    dense = torch.linalg.matrix_norm((dB @ A + B @ dA).double(), ord=2)
    assert (dense > 0).all()
    assert sigma.dtype == torch.float32  # the optimizer's Grams are float32, and so is the tail
    torch.testing.assert_close(sigma.double(), dense, rtol=1e-5, atol=0)
