"""Depth- and width-aware numbers of the tuneonce recipe (docs/optimizer_math.md §3), as small pure functions.

Notation: a matrix W of shape (fan_out, fan_in) in a residual network of depth L. For LoRA factors,
A is (r, base_fan_in) and B is (base_fan_out, r).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def _check_fans(fan_in: int, fan_out: int, depth: int = 1) -> None:
    if fan_in < 1 or fan_out < 1:
        raise ValueError(f"fan_in and fan_out must be >= 1, got fan_in={fan_in}, fan_out={fan_out}")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")


def spectral_target(fan_in: int, fan_out: int) -> float:
    """Spectral norm of a unit-lr update: √(fan_out/fan_in) (spectral μP; Qiu et al. arXiv 2512.05620)."""
    _check_fans(fan_in, fan_out)
    return math.sqrt(fan_out / fan_in)


def keller_jordan_scale(fan_in: int, fan_out: int) -> float:
    """The update scale without spectral scaling: √max(1, rows/cols) (KellerJordan/Muon, torch.optim.Muon)."""
    _check_fans(fan_in, fan_out)
    return math.sqrt(max(1.0, fan_out / fan_in))


def ns_damping(fan_in: int, fan_out: int, depth: int) -> float:
    """Additive Newton–Schulz damping √(fan_in/fan_out)/L (docs/optimizer_math.md §3.1).

    It shrinks as 1/L (tracking gradients that shrink with depth); the seed's prose says it "grows
    with the model", which its own formula does not do: we follow the formula.
    """
    _check_fans(fan_in, fan_out, depth)
    return math.sqrt(fan_in / fan_out) / depth


def adamuon_eps(fan_in: int, fan_out: int, depth: int) -> float:
    """AdaMuon second-moment eps 1/(L·√(fan_in·fan_out)) (docs/optimizer_math.md §3.1)."""
    _check_fans(fan_in, fan_out, depth)
    return 1.0 / (depth * math.sqrt(fan_in * fan_out))


def aux_adam_matrix_eps(numel: int, depth: int) -> float:
    """AuxAdam eps on a matrix-shaped tensor: 1/(L·√numel); 1-D tensors keep the ordinary adam_eps."""
    _check_fans(numel, 1, depth)
    return 1.0 / (depth * math.sqrt(numel))


def schedule_factor(lr: float, initial_lr: float) -> float:
    """lr_t / lr_peak: how far the scheduler has scaled the group's lr (0 when the peak lr is 0)."""
    if lr < 0 or initial_lr < 0:
        raise ValueError(f"learning rates must be >= 0, got lr={lr}, initial_lr={initial_lr}")
    return lr / initial_lr if initial_lr > 0 else 0.0


def width_decay(weight_decay: float, fan_in: int, schedule_factor: float) -> float:
    """Fraction of a dense matrix removed per step: s_t·wd/fan_in (W ← (1 − that)·W).

    "Truly decoupled": multiplied by the schedule factor lr_t/lr_peak, never by lr itself, so it does
    not change when the peak lr is tuned (Qiu et al.; docs/optimizer_math.md §3.3).
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    _check_fans(fan_in, 1)
    fraction = schedule_factor * weight_decay / fan_in
    if fraction >= 1:
        raise ValueError(f"weight decay fraction per step {fraction} >= 1 (weight_decay={weight_decay}, fan_in={fan_in})")
    return fraction


def lora_pair_decay_multiplier(weight_decay: float, base_fan_in: int, schedule_factor: float) -> float:
    """Multiplier applied to EACH factor of a LoRA pair so that the product decays like a dense matrix.

    The adapted weight's delta is s·B·A. Decaying B ← c·B and A ← c·A decays the product by c², and the
    dense rule for the base layer asks for (1 − λ) with λ = s_t·wd/base_fan_in (the BASE layer's fan_in,
    not the factor's r). So c = √(1 − λ): LoRA-Muon's split decay (docs/optimizer_math.md §4.3, §6.2), applied to
    the 1/width rule.
    """
    return math.sqrt(1.0 - width_decay(weight_decay, base_fan_in, schedule_factor))


def sym_blocks(top_left: Tensor, top_right: Tensor, bottom_right: Tensor) -> Tensor:
    """The symmetric batch [[TL, TR], [TRᵀ, BR]] from its three distinct blocks."""
    top = torch.cat([top_left, top_right], dim=-1)
    bottom = torch.cat([top_right.mT, bottom_right], dim=-1)
    return torch.cat([top, bottom], dim=-2)


def lora_product_sigma(gram_q: Tensor, gram_p: Tensor) -> Tensor:
    """σ_max(P·Q) per batch entry, from G_Q = Q·Qᵀ and G_P = Pᵀ·P (symmetric PSD, (..., k, k)).

    For a LoRA pair, P = [ΔB B] and Q = [A; ΔA] (k = 2r), so P·Q = ΔB·A + B·ΔA is the first-order change
    of B·A, and its spectral norm comes from 2r×2r matrices only: σ² = λ_max(G_P·G_Q) = λ_max(Lᵀ·G_P·L)
    with G_Q = L·Lᵀ. Cholesky for L, because batched eigh with eigenvectors is two orders of magnitude
    slower than eigvalsh on CPU; a singular G_Q (ΔA = 0 on PEFT's first step, where B = 0) fails Cholesky
    and takes the eigh square root V·Λ^½ instead. Exact up to rounding: no iteration count, no estimate.

    Works in the Grams' dtype: float32 is enough, since every step keeps errors relative to each block's own
    scale (Cholesky is backward stable under diagonal scaling) as long as ΔB·A and B·ΔA do not cancel, and
    orthogonalized updates follow the gradient, so they add. Against a float64 SVD of the dense change: ≤ 4e-7
    relative for ‖ΔA‖/‖A‖, ‖ΔB‖/‖B‖ from 1e-6 to 1 (float64 here was 4× slower on CPU for the same answer).
    """
    chol, info = torch.linalg.cholesky_ex(gram_q)
    failed = info != 0
    if bool(failed.any()):
        lam, vec = torch.linalg.eigh(gram_q[failed])
        chol[failed] = vec * lam.clamp_min(0).sqrt().unsqueeze(-2)  # (V·Λ^½)(V·Λ^½)ᵀ = G_Q
    return torch.linalg.eigvalsh(chol.mT @ gram_p @ chol)[..., -1].clamp_min(0).sqrt()
