"""LoRAMuon: spectral steepest descent on the low-rank manifold (Cesista et al., arXiv 2606.12921;
docs/optimizer_math.md §6).

Naming. The paper writes W = W₀ + A·Bᵀ with A: m×r, B: n×r. PEFT writes W = W₀ + s·lora_B·lora_A with
lora_B: m×r (the paper's A) and lora_A: r×n (the paper's Bᵀ), s = alpha/r. This file keeps PEFT's layout:
`up` = lora_B (m×r, tall), `down` = lora_A (r×n, wide); momenta `m_up`, `m_down` are the momenta of the
raw gradients of those tensors.

The update of one pair, η = lr·√(base_fan_out/base_fan_in) with spectral scaling (else lr):
    R_down = (down·downᵀ)^{-1/2},  R_up = (upᵀ·up)^{-1/2}                      (r×r, batched eigh)
    Δup   = −(η/2s)·msign(m_up·R_down)·R_down                                   (m×r)
    Δdown = −(η/2s)·R_up·msign(R_up·m_down)                                     (r×n)
so that the first-order change of the adapted weight is s·(Δup·down + up·Δdown) =
−(η/2)·[msign(G·P_row) + msign(P_col·G)] (P: projectors on down's row space and up's column space), of spectral
norm ≤ η whatever the rank, the LoRA scale or the balance of the factors. msign is scale-invariant, so the momenta
may carry s and the loss scale: only the step divides s out.
Both msign's run in r×r: with X = m_up·R_down, XᵀX = R_down·(m_upᵀm_up)·R_down, and msign(X)·R_down =
m_up·[R_down·(XᵀX)^{-1/2}·R_down], so the only m- or n-sized work is four Gram products and two final products
per shape, batched over every pair of that shape.

Split weight decay: each factor is multiplied by q = √(1 − λ) and its step divided by q, so the product sees
dense Muon's (1 − λ)·W. λ = s_t·wd/base_fan_in with width_scaled_weight_decay (s_t = lr_t/lr_peak, "truly
decoupled"), else lr·wd as in torch's AdamW.

Parameters that are not LoRA pairs go to the auxiliary AdamW (adam_lr times the same schedule factor s_t).

The same math one pair at a time, from SVDs: reference.lora_muon_step (tested against this engine).
"""
from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from tuneonce.optimizer import distributed, scaling
from tuneonce.optimizer.hparams import STATE_DTYPES, LoRAMuonHParams
from tuneonce.optimizer.aux_adam import adamw_step
from tuneonce.optimizer.param_spec import Role, infer_spec

_STATE_DTYPES = dict(zip(STATE_DTYPES, (torch.float32, torch.bfloat16), strict=True))


def _state_dtype(group: dict, p: Tensor) -> torch.dtype:
    """The configured state dtype; "float32" means full precision, so float64 parameters keep float64 state."""
    dtype = _STATE_DTYPES[group["state_dtype"]]
    return torch.promote_types(dtype, p.dtype) if dtype == torch.float32 else dtype


@dataclass
class _Pair:
    down: Tensor  # PEFT lora_A, r×n (conv: r×in×kh×kw)
    up: Tensor  # PEFT lora_B, m×r (conv: m×r×1×1)
    down_group: dict
    up_group: dict
    name: str


def _inverse_sqrt(grams: Tensor, source_dtype: torch.dtype) -> Tensor:
    """G^{-1/2} of a batch of r×r PSD Gram matrices by one batched eigh (float64), with the zero-factor guard.

    The guard: eigenvalues at or below `_rank_rtol(source_dtype)`·λ_max (all of them for a zero factor, e.g.
    PEFT's lora_B at init) count as zero, so R is the pseudo-inverse square root. That is the limit δ → 0 of
    the regularized (G + δ·I)^{-1/2}: the partner's momentum has no component along a factor's null directions
    (its gradient is the factor times something), so those directions meet δ^{-1/2} only multiplied by zero.
    In the projector form it makes P the projector on the factor's actual (possibly empty) column space: a zero
    lora_B contributes no msign(P_col·G) term, and lora_A, whose gradient is then zero, does not move.
    The cutoff sits above the rounding noise of a Gram formed in the source precision: eigenvalues below it
    are not known to any digit, and inverting them (the exact map's 1e-6 cutoff on σ does) made a rank-1
    gradient step 2000× its spectral budget in a float32 test.
    """
    lam, vecs = torch.linalg.eigh(grams.double())
    tol = lam[..., -1:].clamp_min(0) * _rank_rtol(source_dtype)
    inv = torch.where(lam > tol, lam.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), torch.zeros_like(lam))
    return (vecs * inv.unsqueeze(-2)) @ vecs.mT


def _rank_rtol(dtype: torch.dtype) -> float:
    """Relative eigenvalue cutoff of a Gram matrix formed in `dtype`: σ below 1e-3·σ_max (1e-6 in float64) is zero.

    float32 Grams carry rounding noise of ~√(length)·ε32·λ_max ≈ 1e-6..1e-5·λ_max; σ/σ_max = 1e-3 is also about
    where a 5-step Newton–Schulz iteration stops orthogonalizing, so this keeps LoRAMuon's msign on par with Muon.
    """
    return 1e-12 if dtype == torch.float64 else 1e-6


class LoRAMuon(torch.optim.Optimizer):
    """LoRA-Muon on (lora_A, lora_B) pairs; every other parameter on an auxiliary AdamW.

    Param groups follow modules/optimizer/param_spec.py: factors need role lora_a/lora_b, a `pairs` id per
    tensor, base_fan_in/base_fan_out and lora_scale (build_param_groups / peft_param_infos provide them).
    Plain parameters (no role) get their role from their shape and go to the auxiliary AdamW.

    Args:
        lr: peak LR of the pairs; the first-order change of each adapted weight has spectral norm ≤ lr
            (times √(base_fan_out/base_fan_in) with spectral_scaling), half of it from each factor.
        beta1: momentum of the factor gradients (m ← β·m + (1−β)·g; no second moments).
        weight_decay: decay of the adapted weight's LoRA delta, split between the factors (see module doc).
        spectral_scaling: scale each pair's budget by √(base_fan_out/base_fan_in).
        width_scaled_weight_decay: λ = s_t·wd/base_fan_in (independent of the peak lr) instead of lr·wd.
        rebalance_every: every N steps of a pair (0: never) rescale its factors to equal spectral norms
            (power rebalance_power): up ← c·up, down ← down/c, the momenta likewise; W and the updates
            do not change.
        state_dtype: "float32" or "bfloat16" for the momenta and the AdamW moments (compute stays fp32).
        adam_lr, adam_betas, adam_eps, adam_weight_decay: the auxiliary AdamW (adam_lr follows the schedule
            factor lr_t/lr_peak of its group).
    """

    report_nonfinite = True  # warn when a step is skipped; the training loop's guard reports instead (trainer/guard.py)

    HParams = LoRAMuonHParams  # the keywords, their defaults and bounds (hparams.py)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float | None = None,
        *,
        hparams: LoRAMuonHParams | None = None,
        **overrides: object,
    ) -> None:
        """``hparams`` (default: ``HParams()``) with any keyword of ``HParams`` overriding it."""
        if lr is not None:
            overrides["lr"] = lr
        hp = self.HParams.build(type(self).__name__, hparams, **overrides)
        if not hp.lr >= 0:
            raise ValueError(f"lr must be >= 0, got {hp.lr}")
        if not 0 <= hp.beta1 < 1:
            raise ValueError(f"beta1 must be in [0, 1), got {hp.beta1}")
        if not hp.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {hp.weight_decay}")
        if not isinstance(hp.rebalance_every, int) or hp.rebalance_every < 0:
            raise ValueError(f"rebalance_every must be an integer >= 0, got {hp.rebalance_every!r}")
        if not hp.rebalance_power > 0:
            raise ValueError(f"rebalance_power must be > 0, got {hp.rebalance_power}")
        if hp.state_dtype not in _STATE_DTYPES:
            raise ValueError(f"state_dtype must be one of {tuple(_STATE_DTYPES)}, got {hp.state_dtype!r}")
        if not hp.adam_lr >= 0:
            raise ValueError(f"adam_lr must be >= 0, got {hp.adam_lr}")
        if not (0 <= hp.adam_betas[0] < 1 and 0 <= hp.adam_betas[1] < 1):
            raise ValueError(f"adam_betas must be in [0, 1), got {hp.adam_betas}")
        if not hp.adam_eps > 0:
            raise ValueError(f"adam_eps must be > 0, got {hp.adam_eps}")
        defaults = hp.as_dict()
        self._plan: tuple[dict[tuple, list[_Pair]], list[dict]] | None = None
        self.orthogonalized_last_step = 0  # LoRA pairs this process stepped in its last step (distributed.py)
        super().__init__(params, defaults)
        self._build_plan()  # pairing errors surface at construction

    # ----------------------------------------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        if "role" not in param_group:
            # Drop-in use: split the group by the role and fans each tensor's shape implies.
            by_spec: dict = defaultdict(list)
            for p in params:
                by_spec[infer_spec(p)].append(p)
            offset = len([p for g in self.param_groups for p in g["params"]])
            for spec, tensors in by_spec.items():
                names = [f"params[{offset + i}]" for i in range(len(tensors))]
                offset += len(tensors)
                sub = {k: v for k, v in param_group.items() if k != "params"}
                self.add_param_group({**sub, **spec.as_group_keys(), "params": tensors, "names": names})
            return
        names = list(param_group.get("names") or [f"params[{i}]" for i in range(len(params))])
        pairs = list(param_group.get("pairs") or [None] * len(params))
        if len(names) != len(params) or len(pairs) != len(params):
            raise ValueError(f"param group {names[:1]}: 'names' and 'pairs' must be parallel to 'params'")
        try:
            role = Role(param_group["role"])
        except ValueError:
            raise ValueError(f"parameter {names[0]!r}: unknown role {param_group['role']!r}") from None
        for p, name in zip(params, names):
            if p.numel() == 0:
                raise ValueError(f"parameter {name!r} has zero size")
            if role.is_lora_factor and p.ndim < 2:
                raise ValueError(f"LoRA factor {name!r} must be a matrix, got shape {tuple(p.shape)}")
        param_group = {**param_group, "params": params, "names": names, "pairs": pairs, "role": role.value}
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("initial_lr", group["lr"])  # the peak lr of s_t = lr_t/lr_peak (as LR schedulers set it)
        self._plan = None

    def _build_plan(self) -> tuple[dict[tuple, list[_Pair]], list[dict]]:
        """Join each lora_a with its lora_b by pair id and bucket the pairs by (m, n, r, dtype, device)."""
        halves: dict[str, dict[str, tuple[Tensor, dict, str]]] = defaultdict(dict)
        aux_groups: list[dict] = []
        for group in self.param_groups:
            role = Role(group["role"])
            if not role.is_lora_factor:
                aux_groups.append(group)
                continue
            side = "down" if role is Role.LORA_A else "up"
            for p, name, pair in zip(group["params"], group["names"], group["pairs"]):
                if pair is None:
                    raise ValueError(f"LoRA factor {name!r} ({role.value}) has no pair id")
                if side in halves[pair]:
                    raise ValueError(f"LoRA pair {pair!r} has two {role.value} factors: {halves[pair][side][2]!r} and {name!r}")
                halves[pair][side] = (p, group, name)
        buckets: dict[tuple, list[_Pair]] = defaultdict(list)
        for pair_id, sides in halves.items():
            if len(sides) != 2:
                (side, (_, _, name)), = sides.items()
                missing = "lora_b" if side == "down" else "lora_a"
                raise ValueError(f"LoRA factor {name!r} has no {missing} partner with pair id {pair_id!r}")
            (down, down_group, down_name), (up, up_group, up_name) = sides["down"], sides["up"]
            r, n = down.shape[0], down[0].numel()
            m = up.shape[0]
            if up[0].numel() != r:
                raise ValueError(f"LoRA pair {pair_id!r}: {down_name!r} has rank {r} but {up_name!r} has shape {tuple(up.shape)}")
            for key in ("lora_scale", "base_fan_in", "base_fan_out"):
                if down_group.get(key) != up_group.get(key):
                    raise ValueError(f"LoRA pair {pair_id!r}: {key} differs between {down_name!r} and {up_name!r}")
            buckets[(m, n, r, down.dtype, up.dtype, down.device)].append(_Pair(down, up, down_group, up_group, pair_id))
        self._plan = (dict(buckets), aux_groups)
        return self._plan

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # torch casts loaded state to the parameter's dtype; keep the configured state dtype (bf16 stays bf16)
        for group in self.param_groups:
            for p in group["params"]:
                dtype = _state_dtype(group, p)
                state = self.state.get(p, {})
                for key in ("momentum", "exp_avg", "exp_avg_sq"):
                    if key in state and state[key].dtype != dtype:
                        state[key] = state[key].to(dtype)
        self._plan = None  # the param group dicts were replaced

    # ------------------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        buckets, aux_groups = self._plan or self._build_plan()
        if not self._grads_finite():
            return loss
        for group in aux_groups:
            self._aux_adam(group)
        jobs = []
        for (m, n, r, *_), pairs in buckets.items():
            active = [pair for pair in pairs if pair.down.grad is not None or pair.up.grad is not None]
            if active:
                jobs.append((active, m, n, r))
        # Under DDP each process computes its share of the pairs, then all gather (distributed.py).
        rank, world_size = distributed.world()
        split = None
        if world_size > 1:
            costs = [distributed.lora_pair_flops(m, n, r) for _, m, n, r in jobs]
            split = distributed.split_rows([len(job[0]) for job in jobs], costs, rank=rank, world_size=world_size)
        results = [self._pair_step(*job, split.rows(i) if split else slice(None)) for i, job in enumerate(jobs)]
        if split is not None:  # the new down and up stacks of a bucket share its split
            both = distributed.RowSplit(rank, world_size, tuple(s for s in split.starts for _ in range(2)))
            distributed.exchange_rows([t for down, up in results for t in (down, up)], both)
        self.orthogonalized_last_step = split.owned() if split else sum(len(job[0]) for job in jobs)
        for (pairs, m, n, r), (down, up) in zip(jobs, results):
            m_downs, m_ups = [self.state[p.down]["momentum"] for p in pairs], [self.state[p.up]["momentum"] for p in pairs]
            self._rebalance(pairs, down, up, m_downs, m_ups)
            torch._foreach_copy_([p.down.view(r, n) for p in pairs], list(down.unbind(0)))
            torch._foreach_copy_([p.up.view(m, r) for p in pairs], list(up.unbind(0)))
        return loss

    def _grads_finite(self) -> bool:
        """One pass over all gradients; on NaN/inf name the parameters and skip the whole step."""
        named = [(name, p.grad) for g in self.param_groups for p, name in zip(g["params"], g["names"]) if p.grad is not None]
        if not named:
            return True
        norms = torch._foreach_norm([grad for _, grad in named])
        if bool(torch.isfinite(torch.stack([x.float().to(norms[0].device) for x in norms])).all()):
            return True
        bad = [name for (name, _), norm in zip(named, norms) if not torch.isfinite(norm)]
        if self.report_nonfinite:
            shown = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
            warnings.warn(f"LoRAMuon: non-finite gradient in {shown}; step skipped", stacklevel=3)
        return False

    def _aux_adam(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        for p in params:
            state = self.state[p]
            if "exp_avg" not in state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, dtype=_state_dtype(group, p))
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=_state_dtype(group, p))
            state["step"] += 1
        states = [self.state[p] for p in params]
        factor = scaling.schedule_factor(group["lr"], group["initial_lr"])
        adamw_step(
            params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [s["step"] for s in states], lr=group["adam_lr"] * factor, betas=tuple(group["adam_betas"]),
            eps=group["adam_eps"], weight_decay=group["adam_weight_decay"],
        )  # fmt: skip

    def _momenta(self, pairs: list[_Pair]) -> tuple[list[Tensor], list[Tensor]]:
        """Update the factor momenta in place (foreach, per beta1) and return them (down list, up list)."""
        by_beta: dict[float, tuple[list[Tensor], list[Tensor]]] = defaultdict(lambda: ([], []))
        downs, ups = [], []
        for pair in pairs:
            for p, group, out in ((pair.down, pair.down_group, downs), (pair.up, pair.up_group, ups)):
                state = self.state[p]
                if "momentum" not in state:
                    state["momentum"] = torch.zeros_like(p, dtype=_state_dtype(group, p))
                    state["step"] = 0
                state["step"] += 1
                momentum = state["momentum"]
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                buffers, grads = by_beta[group["beta1"]]
                buffers.append(momentum)
                grads.append(grad if grad.dtype == momentum.dtype else grad.to(momentum.dtype))
                out.append(momentum)
        for beta, (buffers, grads) in by_beta.items():
            torch._foreach_lerp_(buffers, grads, 1.0 - beta)
        return downs, ups

    def _pair_scalars(self, pairs: list[_Pair], device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
        """Per-pair step coefficients and decay multipliers, as (P, 1, 1) tensors."""
        values: dict[str, list[float]] = defaultdict(list)
        for pair in pairs:
            for side, group in (("down", pair.down_group), ("up", pair.up_group)):
                lr = group["lr"]
                target = scaling.spectral_target(group["base_fan_in"], group["base_fan_out"]) if group["spectral_scaling"] else 1.0
                if group["width_scaled_weight_decay"]:
                    factor = scaling.schedule_factor(lr, group["initial_lr"])
                    q = scaling.lora_pair_decay_multiplier(group["weight_decay"], group["base_fan_in"], factor)
                else:
                    if lr * group["weight_decay"] >= 1:
                        raise ValueError(f"LoRA pair {pair.name!r}: lr*weight_decay = {lr * group['weight_decay']} must be < 1")
                    q = math.sqrt(1.0 - lr * group["weight_decay"])
                # half the budget per factor, s divided out, and the split decay's 1/q folded in
                values[f"{side}_coef"].append(-lr * target / (2.0 * group["lora_scale"] * q))
                values[f"{side}_q"].append(q)
        return {k: torch.tensor(v, dtype=dtype, device=device).view(-1, 1, 1) for k, v in values.items()}

    def _pair_step(self, pairs: list[_Pair], m: int, n: int, r: int, rows: slice = slice(None)) -> tuple[Tensor, Tensor]:
        """Update every pair's momenta; return stacks (P, r, n) and (P, m, r) of the factors in which the pairs
        `rows` (all of them unless the step is split across processes) hold their new values (before rebalancing)."""
        m_downs, m_ups = self._momenta(pairs)
        device = pairs[0].down.device
        compute = torch.promote_types(pairs[0].down.dtype, torch.float32)
        downs = torch.stack([p.down.view(r, n) for p in pairs]).to(compute)  # (P, r, n)
        ups = torch.stack([p.up.view(m, r) for p in pairs]).to(compute)  # (P, m, r)
        mine = pairs[rows]
        if not mine:
            return downs, ups  # this process has no share of this bucket
        down, up = downs[rows], ups[rows]  # views: the new values land in the stacks
        m_down = torch.stack([x.view(r, n) for x in m_downs[rows]]).to(compute)
        m_up = torch.stack([x.view(m, r) for x in m_ups[rows]]).to(compute)
        P = len(mine)

        # R_down = (down·downᵀ)^{-1/2}, R_up = (upᵀ·up)^{-1/2}: one batched eigh for both
        R = _inverse_sqrt(torch.cat([down @ down.mT, up.mT @ up]), compute)
        R_down, R_up = R[:P], R[P:]
        # msign(m_up·R_down)·R_down = m_up·K_up and R_up·msign(R_up·m_down) = K_down·m_down, all in r×r
        S = torch.cat([R_down @ (m_up.mT @ m_up).double() @ R_down, R_up @ (m_down @ m_down.mT).double() @ R_up])
        F = _inverse_sqrt(S, compute)
        K_up = (R_down @ F[:P] @ R_down).to(compute)
        K_down = (R_up @ F[P:] @ R_up).to(compute)

        c = self._pair_scalars(mine, device, compute)
        up.mul_(c["up_q"]).baddbmm_(m_up, K_up * c["up_coef"])
        down.mul_(c["down_q"]).baddbmm_(K_down * c["down_coef"], m_down)
        return downs, ups

    def _rebalance(self, pairs: list[_Pair], down: Tensor, up: Tensor, m_downs: list[Tensor], m_ups: list[Tensor]) -> None:
        """Gauge rebalancing: c = (σ_max(down)/σ_max(up))^{α/2}; up ← c·up, down ← down/c, m_up ← m_up/c, m_down ← c·m_down.

        The product and, because the update is invariant to factor rescaling, every later update are
        unchanged. Skipped for a pair with a zero factor (no finite c) or with lr = 0 (lr = 0 moves nothing).
        """
        due = [
            bool(pair.up_group["rebalance_every"]) and self.state[pair.down]["step"] % pair.up_group["rebalance_every"] == 0
            and pair.down_group["lr"] > 0 and pair.up_group["lr"] > 0
            for pair in pairs
        ]  # fmt: skip
        if not any(due):
            return
        sigma = torch.linalg.eigvalsh(torch.cat([down @ down.mT, up.mT @ up]).double())[:, -1].clamp_min(0).sqrt()
        P = len(pairs)
        powers = torch.tensor([pair.up_group["rebalance_power"] for pair in pairs], dtype=torch.float64, device=sigma.device)
        ok = torch.tensor(due, device=sigma.device) & (sigma[:P] > 0) & (sigma[P:] > 0)
        c = torch.where(ok, (sigma[:P] / sigma[P:].clamp_min(1e-300)) ** (powers / 2), torch.ones_like(sigma[:P]))
        up.mul_(c.to(up.dtype).view(-1, 1, 1))
        down.div_(c.to(down.dtype).view(-1, 1, 1))
        c_list = c.tolist()
        torch._foreach_div_(m_ups, c_list)
        torch._foreach_mul_(m_downs, c_list)
