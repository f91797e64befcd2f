"""The Muon family one tensor at a time: Muon_adv, AdaMuon_adv and LoRAMuon as plain math.

This is the statement of the algorithms that a reader can follow against the papers, the way torch keeps
``_single_tensor_adamw`` beside ``_multi_tensor_adamw``. The optimizers in muon_adv.py and lora_muon.py compute
the same steps batched per shape, in float32, split across processes; tests/test_optimizer_reference.py checks
them against these functions for every combination of the config's switches. Nothing here is fast or used in
training. Every function is short and names where its step comes from; the formulas and their sources are
written out in docs/optimizer_math.md (cited below as "math §n").

Notation: a matrix parameter W is viewed as fan_out × fan_in (a conv weight as out × in·kh·kw), L is the
residual depth of the model it belongs to, s_t = lr_t/lr_peak is the LR schedule's factor. A LoRA adapter adds
s·B·A to the base weight (PEFT's layout: A = lora_A is r × base_fan_in, B = lora_B is base_fan_out × r,
s = alpha/r).

Orthogonalization uses an SVD (float64 if the inputs are) and the scalar map of orthogonalize.singular_value_map,
not the engine's Newton–Schulz/Gram code: the batched routes must reproduce this map, whatever their route.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tuneonce.optimizer.orthogonalize import normalization_safety, singular_value_map
from tuneonce.optimizer.param_spec import Role, infer_spec

# Singular values at or below this fraction of the largest count as zero in the exact polar factor
# (the engine's cut, orthogonalize._EXACT_RANK_TOL).
EXACT_RANK_RTOL = 1e-6


# ------------------------------------------------------------------------------------ one parameter


@dataclass
class RefParam:
    """One parameter with its metadata (param_spec.py) and its group's hyperparameters (``hp``).

    The step functions update ``value`` and ``state`` in place; ``hp`` is the param group dict (lr, initial_lr,
    beta1, ...), shared by the parameters of one group so that an LR schedule changes it once.
    """

    value: Tensor
    role: Role
    fan_in: int
    fan_out: int
    depth: int
    hp: dict
    name: str = ""
    base_fan_in: int | None = None
    base_fan_out: int | None = None
    lora_scale: float = 1.0
    pair: str | None = None
    grad: Tensor | None = None
    state: dict = field(default_factory=dict)

    @property
    def matrix(self) -> tuple[int, int]:
        """The matrix view (rows, cols) of the tensor: conv weights are out × in·kh·kw."""
        v = self.value
        return (v.shape[0], v[0].numel()) if v.ndim >= 2 else (1, v.numel())


def ref_params_from_groups(param_groups: list[dict], dtype: torch.dtype = torch.float64) -> list[RefParam]:
    """Copies (in ``dtype``) of an optimizer's parameters, with the roles and fans its param groups give them."""
    out = []
    for group in param_groups:
        hp = {k: v for k, v in group.items() if k not in ("params", "names", "pairs")}
        hp.setdefault("initial_lr", hp["lr"])
        names = group.get("names") or [None] * len(group["params"])
        pairs = group.get("pairs") or [None] * len(group["params"])
        for p, name, pair in zip(group["params"], names, pairs):
            depth = int(group.get("depth", 1))
            if "role" in group:
                role = Role(group["role"])
                rows, cols = (p.shape[0], p[0].numel()) if p.ndim >= 2 else (1, p.numel())
                fan_in, fan_out = int(group.get("fan_in", cols)), int(group.get("fan_out", rows))
            else:
                spec = infer_spec(p, depth)
                role, fan_in, fan_out = spec.role, spec.fan_in, spec.fan_out
            out.append(RefParam(
                value=p.detach().to(dtype).clone(), role=role, fan_in=fan_in, fan_out=fan_out, depth=depth, hp=hp,
                name=name or "", base_fan_in=group.get("base_fan_in"), base_fan_out=group.get("base_fan_out"),
                lora_scale=float(group.get("lora_scale", 1.0)), pair=pair,
            ))  # fmt: skip
    return out


# ------------------------------------------------------------------------------- Muon: the core steps


def path(p: RefParam) -> str:
    """Which update a tensor takes: "muon", "adam" or "signsgd" (math §4, §7).

    Matrices and conv weights take Muon; vectors, embeddings and DoRA magnitudes the auxiliary Adam (Keller
    Jordan's Muon post: Muon is for hidden-layer matrices only). LoRA B goes through Muon unless
    ``lora_b_orthogonalize`` is off; LoRA A takes ``lora_a_optimizer`` (OneTrainer PR #1314 asked for these
    toggles; its author later found sign-SGD gives A an update RMS of 1 at every rank).
    """
    hp = p.hp
    if p.role in (Role.VECTOR, Role.EMBEDDING, Role.DORA_MAGNITUDE):
        return "adam"
    if p.role is Role.OFT:
        return "muon" if p.value.ndim == 2 else "adam"
    if p.role is Role.LORA_B and not hp["lora_b_orthogonalize"]:
        return "adam"
    if p.role is Role.LORA_A and hp["lora_a_optimizer"] != "muon":
        return hp["lora_a_optimizer"]
    return "muon"


def lora_gradient_scale(p: RefParam) -> float:
    """1/s for LoRA B, else 1: the factor by which B's gradient and B's step are multiplied (math §4.1).

    With B̃ = s·B the adapter is B̃·A at scale 1: grad_B̃ = grad_B/s and ΔB = ΔB̃/s. Dividing s out makes the
    update of s·B·A, and the damping's regime, independent of alpha (the alpha/r factor otherwise "fights the
    scaling", OneTrainer PR #1263).
    """
    return 1.0 / p.lora_scale if p.role is Role.LORA_B else 1.0


def momentum(m: Tensor, g: Tensor, beta: float, nesterov: bool) -> tuple[Tensor, Tensor]:
    """m' = β·m + (1−β)·g; returns (m', u) with u = g + β·(m' − g) under Nesterov, else u = m' (math §1.1).

    Keller Jordan's Muon post (Nesterov momentum as in modded-nanogpt), in the "EMA" form m ← lerp(m, g, 1−β).
    """
    m_new = beta * m + (1 - beta) * g
    u = g + beta * (m_new - g) if nesterov else m_new
    return m_new, u


def ns_damping(p: RefParam) -> float:
    """The additive damping of the Frobenius normalization (math §3.1).

    depth_scaled_eps: √(fan_in/fan_out)/L (the depth-scaled orthogonalization eps of Qiu et al.,
    "Hyperparameter Transfer Enables Consistent Gains of Matrix-Preconditioned Optimizers Across Scales", as
    adopted by OneTrainer PR #1263); else the fixed ns_eps.
    """
    if p.hp["depth_scaled_eps"]:
        return math.sqrt(p.fan_in / p.fan_out) / p.depth
    return p.hp["ns_eps"]


def orthogonalize(u: Tensor, method: str, steps: int, damping: float) -> Tensor:
    """O = U·diag(f(σ̂))·Vᵀ for u = U·diag(σ)·Vᵀ, σ̂ = σ/(‖u‖_F·safety + damping) (math §2).

    f is the singular-value map of the method: Keller Jordan's quintic Newton–Schulz iterated ``steps`` times,
    Polar Express (Amsel et al., "The Polar Express: Optimal Matrix Sign Methods and Their Application to the
    Muon Algorithm"; safety 1.01), or the exact polar factor (f = 1 above a rank cut of EXACT_RANK_RTOL·σ_max).
    """
    U, S, Vh = torch.linalg.svd(u, full_matrices=False)
    if method == "exact":
        f = (S > S.max() * EXACT_RANK_RTOL).to(S.dtype)
    else:
        f = singular_value_map(S / (u.norm() * normalization_safety(method) + damping), method, steps)
    return (U * f) @ Vh


def spectral_norm(X: Tensor) -> Tensor:
    return torch.linalg.matrix_norm(X, ord=2)


def update_scale(p: RefParam) -> float:
    """Size of a unit-lr update (math §3.2).

    spectral_scaling: the spectral norm √(fan_out/fan_in) ("A Spectral Condition for Feature Learning", Yang,
    Simon & Bernstein; Qiu et al. for Muon); otherwise Keller Jordan's √max(1, fan_out/fan_in) applied to O.
    """
    if p.hp["spectral_scaling"]:
        return math.sqrt(p.fan_out / p.fan_in)
    return math.sqrt(max(1.0, p.fan_out / p.fan_in))


def scaled_update(O: Tensor, lr: float, scale: float, spectral: bool) -> Tensor:
    """Δ = lr·scale·O/σ_max(O) with spectral scaling (its spectral norm is exactly lr·scale), else lr·scale·O.

    An all-zero O gives Δ = 0.
    """
    sigma = spectral_norm(O)
    if sigma == 0:
        return torch.zeros_like(O)
    return lr * scale * (O / sigma if spectral else O)


def adamuon_eps(p: RefParam) -> float:
    """AdaMuon's eps: 1/(L·√(fan_in·fan_out)) with depth_scaled_eps (OneTrainer PR #1263), else ``eps`` (math §3.1)."""
    if p.hp["depth_scaled_eps"]:
        return 1.0 / (p.depth * math.sqrt(p.fan_in * p.fan_out))
    return p.hp["eps"]


def adamuon_precondition(
    O: Tensor, v: Tensor, beta2: float, step: int, eps: float, spectral: bool
) -> tuple[Tensor, Tensor]:
    """AdaMuon's element-wise second moment of the orthogonalized update (math §5; AdaMuon paper, Si et al.).

    v' = β₂·v + (1−β₂)·O², Õ = O/(√(v'/(1−β₂ᵗ)) + eps). Without spectral scaling Õ is rescaled to ‖O‖_F, so
    that Keller Jordan's scale applies to an update of the orthogonalized size. Returns (Õ, v').
    """
    v_new = beta2 * v + (1 - beta2) * O * O
    out = O / ((v_new / (1 - beta2**step)).sqrt() + eps)
    if not spectral and out.norm() > 0:
        out = out * (O.norm() / out.norm())
    return out, v_new


def decay_multiplier(p: RefParam) -> float:
    """d in W ← d·W − Δ (math §3.3).

    width_scaled_weight_decay: d = 1 − s_t·wd/fan_in, "truly decoupled" (multiplied by the schedule factor, not
    by lr; Qiu et al.; OneTrainer PR #1263). For a LoRA factor each factor gets √(1 − s_t·wd/base_fan_in), so
    the product decays like the dense base layer (the split decay of "LoRA-Muon", Cesista et al.). Otherwise
    torch's d = 1 − lr·wd.
    """
    hp = p.hp
    wd = hp["weight_decay"]
    if wd == 0:
        return 1.0
    s_t = schedule_factor(hp)
    if not hp["width_scaled_weight_decay"]:
        return 1.0 - hp["lr"] * wd
    if p.role.is_lora_factor:
        return math.sqrt(1.0 - s_t * wd / p.base_fan_in)
    return 1.0 - s_t * wd / p.fan_in


def schedule_factor(hp: dict) -> float:
    """s_t = lr_t/lr_peak (0 when the peak lr is 0)."""
    return hp["lr"] / hp["initial_lr"] if hp["initial_lr"] > 0 else 0.0


def lora_product_multiplier(a: RefParam, b: RefParam, delta_a: Tensor, delta_b: Tensor) -> float:
    """lora_spectral_target='product': κ such that ‖s·(κΔB·A + B·κΔA)‖₂ = lr·√(base_fan_out/base_fan_in) (math §4.2).

    The first-order change of the adapter is s·(ΔB·A + B·ΔA); giving it the base layer's spectral target makes
    the pair's step independent of rank r (per-factor targets only cancel r in ΔB·ΔA, not in ΔB·A at PEFT's
    B = 0 init). The dense product is formed here; the engine gets σ_max from 2r×2r Grams (scaling.py).
    """
    A, B = a.value.reshape(a.matrix), b.value.reshape(b.matrix)
    first_order = a.lora_scale * (delta_b.reshape(b.matrix) @ A + B @ delta_a.reshape(a.matrix))
    sigma = spectral_norm(first_order)
    if sigma == 0:
        return 1.0
    return float(a.hp["lr"] * math.sqrt(a.base_fan_out / a.base_fan_in) / sigma)


# ------------------------------------------------------------------------------- the auxiliary optimizers


def adamw(
    p: Tensor, g: Tensor, m: Tensor, v: Tensor, step: int, lr: float, betas: tuple[float, float], eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Adam without decay (applied separately): p − lr·m̂/(√v̂ + eps); returns (p, m, v) (Kingma & Ba; torch AdamW)."""
    beta1, beta2 = betas
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    m_hat, v_hat = m / (1 - beta1**step), v / (1 - beta2**step)
    return p - lr * m_hat / (v_hat.sqrt() + eps), m, v


def signum(p: Tensor, g: Tensor, m: Tensor, lr: float, beta: float) -> tuple[Tensor, Tensor]:
    """Sign-SGD with momentum (signum, Bernstein et al. "signSGD"): m' = β·m + (1−β)·g, p − lr·sign(m')."""
    m = beta * m + (1 - beta) * g
    return p - lr * torch.sign(m), m


def aux_adam_eps(p: RefParam) -> float:
    """Aux Adam eps: 1/(L·√numel) on matrix-shaped tensors with depth_scaled_eps (OneTrainer PR #1263), else
    adam_eps (1-D tensors always)."""
    if p.hp["depth_scaled_eps"] and p.value.ndim >= 2:
        return 1.0 / (p.depth * math.sqrt(p.value.numel()))
    return p.hp["adam_eps"]


def aux_step(p: RefParam, kind: str) -> None:
    """The auxiliary AdamW / signum step of one tensor (math §7).

    lr = adam_lr·s_t (times 1/s for LoRA B, whose gradient is also divided by s). Decay: a LoRA factor keeps
    the pair rule of decay_multiplier when width_scaled_weight_decay; everything else is torch-style
    1 − adam_lr·s_t·adam_weight_decay.
    """
    hp, st = p.hp, p.state
    inv = lora_gradient_scale(p)
    g = p.grad * inv
    lr = hp["adam_lr"] * schedule_factor(hp)
    if p.role.is_lora_factor and hp["width_scaled_weight_decay"]:
        decay = decay_multiplier(p)
    else:
        decay = 1.0 - lr * hp["adam_weight_decay"]
    st["step"] = st.get("step", 0) + 1
    st.setdefault("exp_avg", torch.zeros_like(p.value))
    if kind == "signsgd":
        p.value, st["exp_avg"] = signum(decay * p.value, g, st["exp_avg"], lr * inv, hp["adam_betas"][0])
        return
    st.setdefault("exp_avg_sq", torch.zeros_like(p.value))
    p.value, st["exp_avg"], st["exp_avg_sq"] = adamw(
        decay * p.value, g, st["exp_avg"], st["exp_avg_sq"], st["step"], lr * inv, tuple(hp["adam_betas"]),
        aux_adam_eps(p),
    )


# ------------------------------------------------------------------------------- Muon_adv / AdaMuon_adv


def muon_direction(p: RefParam, adaptive: bool) -> Tensor:
    """One Muon-path tensor up to the pair rule: momentum, orthogonalization, AdaMuon, spectral scale.

    Returns the update Δ (matrix view) with W ← d·W − Δ; stores the new momentum (and second moment) in p.state.
    """
    hp, st = p.hp, p.state
    inv = lora_gradient_scale(p)
    g = p.grad.reshape(p.matrix) * inv
    m, u = momentum(st.get("momentum_buffer", torch.zeros_like(g)), g, hp["beta1"], hp["nesterov"])
    st["momentum_buffer"] = m
    O = orthogonalize(u, hp["orthogonalizer"], hp["ns_steps"], ns_damping(p))
    st["step"] = st.get("step", 0) + 1
    if adaptive:
        v = st.get("exp_avg_sq", torch.zeros_like(O))
        eps, spectral = adamuon_eps(p), hp["spectral_scaling"]
        O, st["exp_avg_sq"] = adamuon_precondition(O, v, hp["beta2"], st["step"], eps, spectral)
    return scaled_update(O, hp["lr"], update_scale(p) * inv, hp["spectral_scaling"])


def muon_adv_step(params: list[RefParam], adaptive: bool = False) -> None:
    """One step of Muon_adv (adaptive=False) or AdaMuon_adv (adaptive=True) over every parameter with a gradient.

    Muon path: Δ = muon_direction, then the product rule for LoRA pairs, then W ← d·W − κ·Δ.
    Everything else: aux_step. Parameters without a gradient are left alone (state included).
    """
    live = [p for p in params if p.grad is not None]
    deltas = {id(p): muon_direction(p, adaptive) for p in live if path(p) == "muon"}
    kappa: dict[int, float] = {}
    by_pair: dict[str, dict[Role, RefParam]] = {}
    for p in live:
        if p.role.is_lora_factor and id(p) in deltas:
            by_pair.setdefault(p.pair, {})[p.role] = p
    for factors in by_pair.values():
        a, b = factors.get(Role.LORA_A), factors.get(Role.LORA_B)
        if a is None or b is None or not (a.hp["spectral_scaling"] and a.hp["lora_spectral_target"] == "product"):
            continue  # with one factor off the Muon path, the other keeps its own (factor) target
        kappa[id(a)] = kappa[id(b)] = lora_product_multiplier(a, b, deltas[id(a)], deltas[id(b)])
    for p in live:
        if id(p) in deltas:
            delta = kappa.get(id(p), 1.0) * deltas[id(p)]
            p.value = decay_multiplier(p) * p.value - delta.reshape(p.value.shape)
        else:
            aux_step(p, path(p))


# ------------------------------------------------------------------------------------------ LoRAMuon


def msign(X: Tensor, rank: int | None = None, rtol: float = 1e-6) -> Tensor:
    """The matrix sign U·Vᵀ of X's SVD over its nonzero singular values: the first ``rank`` ones, or those above
    rtol·σ_max (σ below count as zero: LoRAMuon's engine uses 1e-3 for float32 Grams, see lora_muon._rank_rtol)."""
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    k = int((S > S.max() * rtol).sum()) if rank is None else rank
    return U[:, :k] @ Vh[:k]


def projector(cols: Tensor, rtol: float = 1e-6) -> Tensor:
    """Orthogonal projector on the column space of ``cols`` (zero for a zero matrix)."""
    U, S, _ = torch.linalg.svd(cols, full_matrices=False)
    U = U[:, : int((S > S.max() * rtol).sum())]
    return U @ U.mT


def inverse_sqrt(F: Tensor, gram_of_rows: bool, rtol: float = 1e-6) -> Tensor:
    """(F·Fᵀ)^{-1/2} (gram_of_rows) or (Fᵀ·F)^{-1/2}, as a pseudo-inverse: σ(F) ≤ rtol·σ_max count as zero.

    From F's SVD, so the r×r inverse square root is never formed from a squared (noisier) Gram here.
    """
    U, S, Vh = torch.linalg.svd(F, full_matrices=False)
    inv = torch.where(S > S.max() * rtol, 1.0 / S.clamp_min(torch.finfo(S.dtype).tiny), torch.zeros_like(S))
    V = U if gram_of_rows else Vh.mT
    return (V * inv) @ V.mT


def lora_muon_first_order_change(G: Tensor, down: Tensor, up: Tensor, eta: float) -> Tensor:
    """The LoRA-Muon step of the adapted weight for a gradient G, to first order (math §6; Cesista et al.).

    −(η/2)·[msign(G·P_row) + msign(P_col·G)], P_row the projector on down's row space, P_col on up's column space:
    each factor's half is the spectral steepest-descent direction in its own tangent space.
    """
    return -(eta / 2) * (msign(G @ projector(down.mT)) + msign(projector(up) @ G))


def lora_muon_pair_directions(
    down: Tensor, up: Tensor, m_down: Tensor, m_up: Tensor, rtol: float
) -> tuple[Tensor, Tensor]:
    """LoRA-Muon's factor directions (math §6): with R_down = (down·downᵀ)^{-1/2}, R_up = (upᵀ·up)^{-1/2},

        D_up = msign(m_up·R_down)·R_down,   D_down = R_up·msign(R_up·m_down),

    For momenta of a gradient G of the adapted weight (m_up ∝ G·downᵀ, m_down ∝ upᵀ·G) this makes
    D_up·down = msign(G·P_row) and up·D_down = msign(P_col·G) (lora_muon_first_order_change), each of spectral
    norm 1. msign's are taken over the nonzero singular values (rank cut ``rtol``), so a zero factor has R = 0
    (the guard for PEFT's zero-initialised lora_B): its partner does not move.
    """
    R_down = inverse_sqrt(down, gram_of_rows=True, rtol=rtol)
    R_up = inverse_sqrt(up, gram_of_rows=False, rtol=rtol)
    X_up, X_down = m_up @ R_down, R_up @ m_down
    return R_up @ msign(X_down, rtol=rtol), msign(X_up, rtol=rtol) @ R_down


def lora_muon_decay(hp: dict, base_fan_in: int) -> float:
    """q of the split decay: each factor × q and its step ÷ q, so the product sees (1 − λ) (math §6.2).

    λ = s_t·wd/base_fan_in with width_scaled_weight_decay, else lr·wd (torch); q = √(1 − λ).
    """
    if hp["width_scaled_weight_decay"]:
        lam = schedule_factor(hp) * hp["weight_decay"] / base_fan_in
    else:
        lam = hp["lr"] * hp["weight_decay"]
    return math.sqrt(1.0 - lam)


def lora_muon_rebalance(down: RefParam, up: RefParam, power: float) -> None:
    """Gauge rebalancing (math §6.3): c = (σ_max(down)/σ_max(up))^{power/2}; up·c, down/c, m_up/c, m_down·c.

    The product up·down and every later update are unchanged (the update is invariant to factor rescaling).
    """
    s_down, s_up = spectral_norm(down.value.reshape(down.matrix)), spectral_norm(up.value.reshape(up.matrix))
    if s_down == 0 or s_up == 0:
        return
    c = float((s_down / s_up) ** (power / 2))
    up.value, down.value = up.value * c, down.value / c
    up.state["momentum"], down.state["momentum"] = up.state["momentum"] / c, down.state["momentum"] * c


def lora_muon_step(params: list[RefParam], rtol: float = 1e-3) -> None:
    """One LoRAMuon step: every (lora_A, lora_B) pair by the LoRA-Muon rule, everything else by AdamW.

    ``rtol``: the rank cut of the pseudo-inverses (1e-3·σ_max matches the engine's float32 Grams).
    The pair step, η = lr·√(base_fan_out/base_fan_in) with spectral_scaling (else lr):
        m ← β·m + (1−β)·g for both factors (raw gradients: msign is scale-invariant)
        up   ← q·up   − (η/(2·s·q))·D_up          down ← q·down − (η/(2·s·q))·D_down
    then, every rebalance_every steps of the pair, lora_muon_rebalance.
    """
    pairs: dict[str, dict[Role, RefParam]] = {}
    for p in params:
        if p.role.is_lora_factor:
            pairs.setdefault(p.pair, {})[p.role] = p
        elif p.grad is not None:
            hp, st = p.hp, p.state
            lr = hp["adam_lr"] * schedule_factor(hp)
            st["step"] = st.get("step", 0) + 1
            st.setdefault("exp_avg", torch.zeros_like(p.value))
            st.setdefault("exp_avg_sq", torch.zeros_like(p.value))
            p.value, st["exp_avg"], st["exp_avg_sq"] = adamw(
                (1 - lr * hp["adam_weight_decay"]) * p.value, p.grad, st["exp_avg"], st["exp_avg_sq"], st["step"], lr,
                tuple(hp["adam_betas"]), hp["adam_eps"],
            )  # fmt: skip
    for factors in pairs.values():
        down, up = factors[Role.LORA_A], factors[Role.LORA_B]
        if down.grad is None and up.grad is None:
            continue
        for f in (down, up):
            g = f.grad if f.grad is not None else torch.zeros_like(f.value)
            f.state["momentum"] = f.hp["beta1"] * f.state.get("momentum", torch.zeros_like(g)) + (1 - f.hp["beta1"]) * g
            f.state["step"] = f.state.get("step", 0) + 1
        D_down, D_up = lora_muon_pair_directions(
            down.value.reshape(down.matrix), up.value.reshape(up.matrix),
            down.state["momentum"].reshape(down.matrix), up.state["momentum"].reshape(up.matrix), rtol,
        )  # fmt: skip
        for f, D in ((down, D_down), (up, D_up)):
            hp = f.hp
            eta = hp["lr"] * (math.sqrt(f.base_fan_out / f.base_fan_in) if hp["spectral_scaling"] else 1.0)
            q = lora_muon_decay(hp, f.base_fan_in)
            f.value = q * f.value - (eta / (2 * f.lora_scale * q)) * D.reshape(f.value.shape)
        every = up.hp["rebalance_every"]
        if every and down.state["step"] % every == 0 and down.hp["lr"] > 0 and up.hp["lr"] > 0:
            lora_muon_rebalance(down, up, up.hp["rebalance_power"])
