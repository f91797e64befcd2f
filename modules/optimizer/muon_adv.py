"""Muon_adv and AdaMuon_adv: Muon that knows each model's residual depth and each matrix's width.

One step, for the tensors on the orthogonalized ("Muon") path, batched per bucket of equal shape:

    g ← grad / s                    (LoRA B only: s = alpha/r is divided out, see _lora_scale_note)
    m ← β₁·m + (1−β₁)·g             (u = g + β₁·(m − g) with Nesterov, else u = m)
    O = f(u / (‖u‖_F + damping))    (orthogonalize.py; damping √(fan_in/fan_out)/L when depth_scaled_eps)
    AdaMuon: v ← β₂·v + (1−β₂)·O²;  O ← O / (√v̂ + eps)
    Δ = lr·target·O/σ_max(O)        (spectral_scaling; else lr·√max(1, fan_out/fan_in)·O)
    W ← decay·W − Δ                 (decay = 1 − s_t·wd/fan_in when width_scaled_weight_decay)

Everything else (vectors, embeddings, DoRA magnitudes, factors routed away from Muon) takes the
auxiliary AdamW (or sign-SGD for LoRA A) of aux_adam.py with its own adam_* settings.

The same math one tensor at a time, without buckets or processes: reference.py (tested against this engine for
every switch combination); the formulas and their sources: docs/optimizer_math.md §1–§5 and §7.

_lora_scale_note: the adapted weight is W₀ + s·B·A with PEFT's A initialised independently of alpha
and B = 0. Training with scale s is then equivalent to training with scale 1 on B̃ = s·B: the
gradient of B̃ is grad_B/s, the gradient of A is unchanged, and the step of B is the step of B̃
divided by s. So the update of s·B·A (and the damping's regime) does not depend on alpha.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tuneonce.optimizer import aux_adam, distributed, scaling
from tuneonce.optimizer.hparams import (
    LORA_A_OPTIMIZERS, LORA_SPECTRAL_TARGETS, STATE_DTYPES, AdaMuonHParams, MuonHParams,
)  # fmt: skip
from tuneonce.optimizer.orthogonalize import METHODS, ROUTES, choose_route, gram_factor, orthogonalize, small_gram
from tuneonce.optimizer.param_spec import Role, infer_spec

_STATE_DTYPES = dict(zip(STATE_DTYPES, (torch.float32, torch.bfloat16), strict=True))
_LORA_A_OPTIMIZERS = LORA_A_OPTIMIZERS
_LORA_TARGETS = LORA_SPECTRAL_TARGETS
# Group keys whose change requires rebuilding the bucketing plan: the hyperparameters marked so in hparams.py
# (everything but the learning rates) and the parameter spec keys of param_spec.py.
_PLAN_KEYS = AdaMuonHParams.plan_keys() + (
    "role", "fan_in", "fan_out", "base_fan_in", "base_fan_out", "lora_scale", "depth",
)  # fmt: skip


@dataclass
class _Member:
    """One parameter with everything the step needs to know about it (built once per plan)."""

    param: Tensor
    name: str
    group: int
    role: Role
    fan_in: int
    fan_out: int
    depth: int
    path: str  # "muon" | "adam" | "signsgd"
    base_fan_in: int | None = None
    base_fan_out: int | None = None
    lora_scale: float = 1.0
    pair: str | None = None

    @property
    def inv_scale(self) -> float:
        """Gradient and step multiplier: 1/s for LoRA B, else 1 (see the module docstring)."""
        return 1.0 / self.lora_scale if self.role is Role.LORA_B else 1.0


@dataclass
class _Bucket:
    """Muon-path tensors of one 2-D shape and equal batched hyperparameters, stepped in one batched call."""

    members: list[_Member]
    shape: tuple[int, int]
    group: dict  # the hyperparameters of the batched call (taken from the first member's group)
    momentum: Tensor  # (B, m, n) in the state dtype; state[p]["momentum_buffer"] are views of it
    exp_avg_sq: Tensor | None  # AdaMuon
    scratch: Tensor  # (B, m, n) float32: the orthogonalizer's input u (working memory, not state)
    out: Tensor  # (B, m, n) float32: the update on the Gram route (working memory, not state)
    damping: Tensor  # (B,) additive damping per matrix
    target: Tensor  # (B,) update size per unit lr (spectral target or Keller Jordan scale), incl. 1/s
    spectral: Tensor  # (B,) bool: scale by the exact σ_max
    adam_eps: Tensor | None = None  # (B,) AdaMuon second-moment eps
    index: dict = field(default_factory=dict)  # id(param) -> row
    pair_role: Role | None = None  # LORA_A / LORA_B: every member is that factor of a product-target pair


@dataclass
class _Work:
    """A bucket's step in flight between the two phases (see Muon_adv.step)."""

    bucket: _Bucket
    members: list[_Member]
    index: Tensor | None  # rows of the bucket that have gradients (None: all)
    u: Tensor  # orthogonalizer input (in the bucket's scratch)
    m32: Tensor  # old momentum in float32 (a view of the state when it is float32 and the bucket is full)
    route: str
    gram: Tensor | None
    norm: Tensor  # ‖u‖_F per matrix (also the finiteness check)
    update_gram: Tensor | None = None  # r×r Gram of each final update (product target, Gram route; see _orthogonalize)


@dataclass
class _Plan:
    signature: tuple
    buckets: list[_Bucket]
    aux: list[_Member]
    members: dict[int, _Member]  # id(param) -> member
    pairs: list[tuple[_Member, _Member]]  # (A, B) pairs with both factors on the Muon path (product target)


class Muon_adv(torch.optim.Optimizer):
    """Muon with depth-scaled damping/eps, spectral update scaling and 1/width decoupled weight decay.

    Args:
        params: parameters or param groups; groups may carry the keys of modules/optimizer/param_spec.py
            (role, fan_in, fan_out, base fans, lora_scale, depth, names, pairs). Without ``role`` each
            tensor's role comes from its shape (``infer_spec``, depth 1 unless the group gives one).
        lr: Muon learning rate (peak; the schedule factor lr_t/lr_peak uses group["initial_lr"]).
        beta1: momentum coefficient (m ← β₁·m + (1−β₁)·g). nesterov: use g + β₁·(m − g).
        weight_decay: decoupled decay; with width_scaled_weight_decay it is wd/fan_in per step times
            the schedule factor (LoRA pairs: the base layer's fan_in, split between the factors),
            otherwise lr·wd per step as in torch.
        ns_steps: iterations of the polynomial orthogonalizers. ns_eps: the additive damping when
            depth_scaled_eps is off. orthogonalizer: "newton_schulz" | "polar_express" | "exact".
        ortho_route: "auto" (Gram route for low-rank matrices) | "iterative" | "gram".
        spectral_scaling: set the update's spectral norm to lr·√(fan_out/fan_in) exactly.
        lora_spectral_target: "factor" (each factor its own target) or "product" (the pair's first-order
            change s·(ΔB·A + B·ΔA) gets the base layer's target lr·√(base_fan_out/base_fan_in)).
        depth_scaled_eps: damping √(fan_in/fan_out)/L, AdaMuon eps 1/(L·√(fan_in·fan_out)), aux-Adam eps
            on matrices 1/(L·√numel) (1-D tensors keep adam_eps).
        lora_b_orthogonalize: LoRA B through Muon (else the auxiliary Adam).
        lora_a_optimizer: "muon" | "adam" | "signsgd" (signum with momentum adam_betas[0]).
        state_dtype: "float32" | "bfloat16" for the momentum (and second-moment) buffers.
        adam_lr, adam_betas, adam_eps, adam_weight_decay: the auxiliary AdamW (its lr follows the
            group's schedule factor; adam_weight_decay is torch-style lr·wd).
    """

    _adaptive = False
    HParams: type[MuonHParams] = MuonHParams  # the keywords, their defaults and bounds (hparams.py)

    report_nonfinite = True  # warn when a step is skipped; the training loop's guard reports instead (trainer/guard.py)

    def __init__(
        self, params: Iterable, lr: float | None = None, *, hparams: MuonHParams | None = None, **overrides: object
    ) -> None:
        """``hparams`` (default: ``HParams()``) with any keyword of ``HParams`` overriding it."""
        if lr is not None:
            overrides["lr"] = lr
        defaults = self.HParams.build(type(self).__name__, hparams, **overrides).as_dict()
        self._plan: _Plan | None = None
        self.orthogonalized_last_step = 0  # matrices this process orthogonalized in its last step (distributed.py)
        super().__init__(params, defaults)
        self._build_members()  # validate roles and pairs now, not at the first step

    # ----------------------------------------------------------------------------------------- setup

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _validate_group(group, len(self.param_groups) - 1)
        group.setdefault("initial_lr", group["lr"])
        self._plan = None

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._plan = None  # loaded state tensors are not views of our buckets: re-stack them

    def _signature(self) -> tuple:
        return tuple(
            (tuple(id(p) for p in g["params"]), tuple(_freeze(g.get(k)) for k in _PLAN_KEYS)) for g in self.param_groups
        )

    def _build_members(self) -> list[_Member]:
        members = []
        for gi, group in enumerate(self.param_groups):
            names = group.get("names") or [None] * len(group["params"])
            pairs = group.get("pairs") or [None] * len(group["params"])
            for i, p in enumerate(group["params"]):
                members.append(_make_member(p, names[i] or f"param {i} of group {gi}", gi, group, pairs[i]))
        _check_pairs(members)
        return members

    def _get_plan(self) -> _Plan:
        signature = self._signature()
        if self._plan is not None and self._plan.signature == signature:
            return self._plan
        members = self._build_members()
        muon = [m for m in members if m.path == "muon"]
        muon_b = {m.pair: m for m in muon if m.role is Role.LORA_B}
        pairs = []
        for a in muon:
            g = self.param_groups[a.group]
            if a.role is Role.LORA_A and g["spectral_scaling"] and g["lora_spectral_target"] == "product":
                if a.pair in muon_b:  # with B on the auxiliary Adam, A keeps its own (factor) target
                    pairs.append((a, muon_b[a.pair]))
        # Product-target factors get buckets of their own, one role each: the pair rescale then works per bucket.
        pair_role = {id(m.param): m.role for pair in pairs for m in pair}
        keyed: dict[tuple, list[_Member]] = {}
        for m in muon:
            g = self.param_groups[m.group]
            p = m.param
            key = (_matrix_shape(p), p.device, g["state_dtype"], g["orthogonalizer"], g["ns_steps"],
                   choose_route(_matrix_shape(p), g["ortho_route"]), g["beta1"], g["nesterov"], g.get("beta2"),
                   pair_role.get(id(p)))  # fmt: skip
            keyed.setdefault(key, []).append(m)
        buckets = [self._make_bucket(ms, key[-1]) for key, ms in keyed.items()]
        by_id = {id(m.param): m for m in members}
        self._plan = _Plan(signature, buckets, [m for m in members if m.path != "muon"], by_id, pairs)
        return self._plan

    def _make_bucket(self, members: list[_Member], pair_role: Role | None = None) -> _Bucket:
        group = self.param_groups[members[0].group]
        shape = _matrix_shape(members[0].param)
        device = members[0].param.device
        dtype = _STATE_DTYPES[group["state_dtype"]]
        n = len(members)

        def stacked(key: str) -> Tensor:
            buf = torch.zeros((n, *shape), dtype=dtype, device=device)
            for i, m in enumerate(members):
                old = self.state[m.param].get(key)
                if old is not None:
                    buf[i].copy_(old.reshape(shape))
                self.state[m.param][key] = buf[i].view(m.param.shape)
            return buf

        for m in members:
            self.state[m.param].setdefault("step", 0)
        damping, target, spectral, eps = [], [], [], []
        for m in members:
            g = self.param_groups[m.group]
            damping.append(scaling.ns_damping(m.fan_in, m.fan_out, m.depth) if g["depth_scaled_eps"] else g["ns_eps"])
            if g["spectral_scaling"]:
                target.append(scaling.spectral_target(m.fan_in, m.fan_out) * m.inv_scale)
            else:
                target.append(scaling.keller_jordan_scale(m.fan_in, m.fan_out) * m.inv_scale)
            spectral.append(bool(g["spectral_scaling"]))
            if self._adaptive:
                eps.append(scaling.adamuon_eps(m.fan_in, m.fan_out, m.depth) if g["depth_scaled_eps"] else g["eps"])
        f32 = dict(dtype=torch.float32, device=device)
        return _Bucket(
            members=members,
            shape=shape,
            group=group,
            momentum=stacked("momentum_buffer"),
            exp_avg_sq=stacked("exp_avg_sq") if self._adaptive else None,
            scratch=torch.empty((n, *shape), **f32),
            # Gram route: the update lands in a persistent buffer (fresh 100 MB allocations page-fault on
            # every step); the iterative route allocates its own result anyway.
            out=torch.empty((n, *shape) if choose_route(shape, group["ortho_route"]) == "gram" else (0,), **f32),
            damping=torch.tensor(damping, **f32),
            target=torch.tensor(target, **f32),
            spectral=torch.tensor(spectral, dtype=torch.bool, device=device),
            adam_eps=torch.tensor(eps, **f32) if self._adaptive else None,
            index={id(m.param): i for i, m in enumerate(members)},
            pair_role=pair_role,
        )

    # ------------------------------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plan = self._get_plan()
        # Phase 1 reads gradients and old state only, so a non-finite gradient leaves everything untouched.
        rank, world_size = distributed.world()
        works = [w for w in (self._prepare(b, defer_gram=world_size > 1) for b in plan.buckets) if w is not None]
        aux = [m for m in plan.aux if m.param.grad is not None]
        if not self._all_finite(works, aux):
            return loss
        schedule = [_schedule_factor(g) for g in self.param_groups]
        updates: dict[int, Tensor] = {}  # id(param) -> update to subtract (param-shaped view)
        # Under DDP each process orthogonalizes its share of the matrices, then all gather (distributed.py).
        split = self._split(works, rank, world_size) if world_size > 1 else None
        outs = [self._orthogonalize(w, split.rows(i) if split else slice(None)) for i, w in enumerate(works)]
        if split is not None:
            distributed.exchange_rows(outs, split)
        self.orthogonalized_last_step = split.owned() if split else sum(len(w.members) for w in works)
        for work, out in zip(works, outs):
            updates.update(self._finish(work, out))
        kappa = self._pair_scales(plan, works, outs) if plan.pairs else {}
        self._apply_muon(plan, updates, schedule, kappa)
        self._aux_step(aux, schedule)
        return loss

    def _prepare(self, bucket: _Bucket, defer_gram: bool = False) -> _Work | None:
        """Stack the gradients and form the orthogonalizer's input u, without touching the state.

        defer_gram: leave the Gram route's Gram matrices to _orthogonalize (each process forms only its share's).

        Nesterov: u = g + β·(m' − g) with m' = β·m + (1−β)·g, i.e. u = lerp(g, m, β²) from the OLD m;
        without Nesterov u = m' = lerp(g, m, β). The new momentum is then a lerp of m and u (see _finish).
        """
        rows = [i for i, m in enumerate(bucket.members) if m.param.grad is not None]
        if not rows:
            return None
        members = [bucket.members[i] for i in rows]
        full = len(rows) == len(bucket.members)
        index = None if full else torch.tensor(rows, device=bucket.scratch.device)
        u = bucket.scratch if full else bucket.scratch[: len(rows)]
        torch._foreach_copy_(list(u.unbind(0)), [m.param.grad.reshape(bucket.shape) for m in members])
        if any(m.inv_scale != 1 for m in members):
            u.mul_(torch.tensor([m.inv_scale for m in members], device=u.device)[:, None, None])
        momentum = _rows(bucket.momentum, index)
        m32 = momentum if momentum.dtype == torch.float32 else momentum.float()
        beta = bucket.group["beta1"]
        u.lerp_(m32, beta * beta if bucket.group["nesterov"] else beta)
        route = choose_route(bucket.shape, bucket.group["ortho_route"])
        gram = small_gram(u) if route == "gram" and not defer_gram else None
        if gram is not None:
            norm = gram.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(0).sqrt()
        else:
            norm = torch.linalg.vector_norm(u, dim=(-2, -1))
        return _Work(bucket, members, index, u, m32, route, gram, norm)

    def _all_finite(self, works: list[_Work], aux: list[_Member]) -> bool:
        checks = [w.norm for w in works]
        if aux:
            checks.append(torch.stack(torch._foreach_norm([m.param.grad for m in aux])))
        if not checks or bool(torch.isfinite(torch.cat([c.reshape(-1).float() for c in checks])).all()):
            return True
        bad = [m.name for w in works for m, ok in zip(w.members, torch.isfinite(w.norm).tolist()) if not ok]
        if aux:
            bad += [m.name for m, ok in zip(aux, torch.isfinite(checks[-1]).tolist()) if not ok]
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        if self.report_nonfinite:
            name = type(self).__name__
            warnings.warn(f"{name}: non-finite gradient in {shown}; step skipped, state unchanged", stacklevel=3)
        return False

    def _split(self, works: list[_Work], rank: int, world_size: int) -> distributed.RowSplit:
        costs = [
            distributed.orthogonalization_flops(w.bucket.shape, w.route, w.bucket.group["orthogonalizer"], w.bucket.group["ns_steps"])
            for w in works
        ]  # fmt: skip
        return distributed.split_rows([len(w.members) for w in works], costs, rank=rank, world_size=world_size)

    def _scales(self, work: _Work, rows: slice) -> tuple[Tensor, Tensor]:
        """(lr·target, spectral flag) of the work's rows `rows`."""
        lr = torch.tensor([self.param_groups[m.group]["lr"] for m in work.members[rows]], device=work.u.device)
        return lr * _rows(work.bucket.target, work.index)[rows], _rows(work.bucket.spectral, work.index)[rows]

    def _orthogonalize(self, work: _Work, rows: slice) -> Tensor:
        """Commit the momentum (every row), orthogonalize u's rows `rows` (all of them unless the step is split
        across processes) and return the update buffer of all the work's rows, of which `rows` are written: scaled
        to their final size, except under AdaMuon, whose second moment comes after (_finish)."""
        bucket, members, index, u = work.bucket, work.members, work.index, work.u
        g = bucket.group
        beta = g["beta1"]
        if g["nesterov"]:
            work.m32.lerp_(u, 1.0 / (1.0 + beta))  # m' = (β·m + u)/(1+β)
        else:
            work.m32.copy_(u)
        _write_back(bucket.momentum, work.m32, index)

        whole = rows == slice(None)
        mine = u[rows]
        if work.route == "gram":
            out = bucket.out if index is None else bucket.out[: len(members)]
        elif not whole:
            out = torch.empty_like(u)
        if mine.shape[0] == 0:
            return out  # this process has no share of this bucket
        damping = _rows(bucket.damping, index)[rows]
        scale, spectral = self._scales(work, rows)  # size per unit spectral norm (or per KJ-scaled O)
        method, steps = g["orthogonalizer"], g["ns_steps"]
        if work.route == "gram":
            gram = None if work.gram is None else work.gram[rows]
            factor, sigma, wide = gram_factor(mine, method=method, steps=steps, eps=damping, gram=gram)
            if not self._adaptive:
                # Fold spectral scale and lr into the small factor: one big product per matrix.
                factor = factor * _coefficient(spectral, scale, sigma)[:, None, None]
                if whole and gram is not None and _gram_is_rank_sized(bucket):
                    # The product target needs each update's r×r Gram: (F·U)(F·U)ᵀ = F·(U·Uᵀ)·F (F symmetric).
                    work.update_gram = factor @ gram @ factor
            target = out[rows]
            torch.bmm(factor, mine, out=target) if wide else torch.bmm(mine, factor, out=target)
        else:
            result, sigma = orthogonalize(mine, method=method, steps=steps, eps=damping, route="iterative",
                                          compute_sigma=not self._adaptive)  # fmt: skip
            if whole:
                out = target = result.contiguous()  # tall matrices come back as a transposed view; params need plain views
            else:
                target = out[rows]
                target.copy_(result)
            if not self._adaptive:
                target.mul_(_coefficient(spectral, scale, sigma)[:, None, None])
        return out

    def _finish(self, work: _Work, out: Tensor) -> dict[int, Tensor]:
        """AdaMuon's second moment and scaling (every row: replicated state); returns the updates (views of out)."""
        if self._adaptive:
            sigma = self._second_moment(work.bucket, out, work.members, work.index)
            scale, spectral = self._scales(work, slice(None))
            out.mul_(_coefficient(spectral, scale, sigma)[:, None, None])
        for m in work.members:
            self.state[m.param]["step"] += 1
        return {id(m.param): out[i].view(m.param.shape) for i, m in enumerate(work.members)}

    def _second_moment(self, bucket: _Bucket, out: Tensor, members: list[_Member], index: Tensor | None) -> Tensor:
        raise NotImplementedError  # Muon_adv has none (see AdaMuon_adv)

    def _pair_scales(self, plan: _Plan, works: list[_Work], outs: list[Tensor]) -> dict[int, float]:
        """lora_spectral_target='product': the multiplier κ of each pair's two updates (id(param) -> κ) that makes
        ‖s·(ΔB·A + B·ΔA)‖₂ = lr·√(base_out/base_in). _apply_muon folds κ into the parameter update.

        The first-order change is s·P·Q with P = [ΔB B], Q = [A; ΔA] (rank ≤ 2r); its σ_max comes from the
        2r×2r Grams G_Q = Q·Qᵀ and G_P = Pᵀ·P (scaling.lora_product_sigma), whose r×r blocks are formed per
        bucket, where the updates already lie stacked: the parameters are copied into the bucket's scratch
        (its u is spent by now), A·Aᵀ / Bᵀ·B and the cross terms A·ΔAᵀ / ΔBᵀ·B are one batched product each,
        and each update's own Gram comes from the Gram route's r×r data when it has them (_orthogonalize).
        Nothing of the base layer's size is formed.
        """
        chunks: dict[int, list[Tensor]] = {}  # r -> per-bucket (n, 2r, 2r) Grams, in order
        row: dict[int, tuple[int, int]] = {}  # id(param) -> (r, row in the concatenation of chunks[r])
        for work, out in zip(works, outs):
            role = work.bucket.pair_role
            if role is None:
                continue
            n = len(work.members)
            params = work.bucket.scratch[:n]
            torch._foreach_copy_(list(params.unbind(0)), [m.param.reshape(work.bucket.shape) for m in work.members])
            update_gram = work.update_gram
            if role is Role.LORA_A:  # Q = [A; ΔA]
                update_gram = out @ out.mT if update_gram is None else update_gram
                gram = scaling.sym_blocks(params @ params.mT, params @ out.mT, update_gram)
            else:  # P = [ΔB B]
                update_gram = out.mT @ out if update_gram is None else update_gram
                gram = scaling.sym_blocks(update_gram, out.mT @ params, params.mT @ params)
            r = gram.shape[-1] // 2
            first = sum(len(c) for c in chunks.setdefault(r, []))
            chunks[r].append(gram)
            row.update((id(m.param), (r, first + i)) for i, m in enumerate(work.members))
        ready: dict[int, list[tuple[_Member, _Member]]] = {}  # r -> pairs with both updates this step
        for a, b in plan.pairs:
            if id(a.param) in row and id(b.param) in row:
                ready.setdefault(row[id(a.param)][0], []).append((a, b))
        kappa: dict[int, float] = {}
        for r, pairs in ready.items():
            grams = torch.cat(chunks[r])
            device = grams.device
            q = torch.tensor([row[id(a.param)][1] for a, _ in pairs], device=device)
            p = torch.tensor([row[id(b.param)][1] for _, b in pairs], device=device)
            sigma = scaling.lora_product_sigma(grams[q], grams[p]).float()
            sigma = sigma * torch.tensor([a.lora_scale for a, _ in pairs], device=device)
            target = torch.tensor(
                [self.param_groups[a.group]["lr"] * scaling.spectral_target(a.base_fan_in, a.base_fan_out) for a, _ in pairs],
                device=device,
            )  # fmt: skip
            k = torch.where(sigma > 0, target / sigma.clamp_min(1e-30), torch.ones_like(sigma))
            for (a, b), value in zip(pairs, k.tolist()):
                kappa[id(a.param)] = kappa[id(b.param)] = value
        return kappa

    def _decay_multiplier(self, m: _Member, schedule: list[float]) -> float:
        g = self.param_groups[m.group]
        wd = g["weight_decay"]
        if wd == 0:
            return 1.0
        if not g["width_scaled_weight_decay"]:
            return 1.0 - g["lr"] * wd
        if m.role.is_lora_factor:
            return scaling.lora_pair_decay_multiplier(wd, m.base_fan_in, schedule[m.group])
        return 1.0 - scaling.width_decay(wd, m.fan_in, schedule[m.group])

    def _apply_muon(self, plan: _Plan, updates: dict[int, Tensor], schedule: list[float], kappa: dict[int, float]) -> None:
        """W ← decay·W − κ·Δ (κ: the product target's pair multiplier, else 1)."""
        if not updates:
            return
        params = [plan.members[k].param for k in updates]
        mults = [self._decay_multiplier(plan.members[k], schedule) for k in updates]
        if any(x != 1.0 for x in mults):
            torch._foreach_mul_(params, mults)
        steps = [u if u.dtype == p.dtype else u.to(p.dtype) for u, p in zip(updates.values(), params)]
        if kappa:
            # κ rides on the update pass (a 0-d one broadcasts) instead of a pass of its own over the updates.
            ones = {key: torch.ones((), dtype=key[0], device=key[1]) for key in {(p.dtype, p.device) for p in params}}
            coefficients = [-kappa.get(k, 1.0) for k in updates]
            torch._foreach_addcmul_(params, steps, [ones[(p.dtype, p.device)] for p in params], coefficients)
        else:
            torch._foreach_sub_(params, steps)

    def _aux_step(self, members: list[_Member], schedule: list[float]) -> None:
        """The auxiliary AdamW (and sign-SGD for LoRA A): one foreach call per kind and state dtype."""
        kinds: dict[tuple, list[_Member]] = {}
        for m in members:
            kinds.setdefault((m.path, self.param_groups[m.group]["state_dtype"]), []).append(m)
        for (path, state_dtype), ms in kinds.items():
            dtype = _STATE_DTYPES[state_dtype]
            params = [m.param for m in ms]
            grads = [m.param.grad if m.inv_scale == 1 else m.param.grad * m.inv_scale for m in ms]
            groups = [self.param_groups[m.group] for m in ms]
            lrs = [g["adam_lr"] * schedule[m.group] * m.inv_scale for g, m in zip(groups, ms)]
            # Decay: LoRA factors keep the pair rule of the Muon path (with the group's weight_decay) when
            # width-scaled; everything else is torch-style adam_lr·adam_weight_decay.
            mults = []
            for g, m, lr in zip(groups, ms, lrs):
                if m.role.is_lora_factor and g["width_scaled_weight_decay"]:
                    mults.append(self._decay_multiplier(m, schedule))
                else:
                    mults.append(1.0 - lr / m.inv_scale * g["adam_weight_decay"])
            if any(x != 1.0 for x in mults):
                torch._foreach_mul_(params, mults)
            for m in ms:
                st = self.state[m.param]
                st["step"] = st.get("step", 0) + 1
                if "exp_avg" not in st:
                    st["exp_avg"] = torch.zeros_like(m.param, dtype=dtype)
                    if path == "adam":
                        st["exp_avg_sq"] = torch.zeros_like(m.param, dtype=dtype)
            exp_avgs = [self.state[m.param]["exp_avg"] for m in ms]
            if path == "signsgd":
                betas = {g["adam_betas"][0] for g in groups}
                for beta in betas:
                    sel = [i for i, g in enumerate(groups) if g["adam_betas"][0] == beta]
                    aux_adam.signsgd_step([params[i] for i in sel], [grads[i] for i in sel], [exp_avgs[i] for i in sel],
                                          lr=[lrs[i] for i in sel], beta=beta)  # fmt: skip
                continue
            eps = []
            for g, m in zip(groups, ms):
                if g["depth_scaled_eps"] and m.param.ndim >= 2:
                    eps.append(scaling.aux_adam_matrix_eps(m.param.numel(), m.depth))
                else:
                    eps.append(g["adam_eps"])
            by_betas: dict[tuple, list[int]] = {}
            for i, g in enumerate(groups):
                by_betas.setdefault(tuple(g["adam_betas"]), []).append(i)
            for betas, sel in by_betas.items():
                aux_adam.adamw_step(
                    [params[i] for i in sel], [grads[i] for i in sel], [exp_avgs[i] for i in sel],
                    [self.state[ms[i].param]["exp_avg_sq"] for i in sel], [self.state[ms[i].param]["step"] for i in sel],
                    lr=[lrs[i] for i in sel], betas=betas, eps=[eps[i] for i in sel],
                )  # fmt: skip


class AdaMuon_adv(Muon_adv):
    """Muon_adv plus an element-wise second moment of the orthogonalized update (AdaMuon).

    v ← β₂·v + (1−β₂)·O², O ← O/(√v̂ + eps) with bias correction v̂ = v/(1−β₂ᵗ), then the same spectral
    scaling as Muon_adv (σ_max measured exactly on the preconditioned O). Without spectral scaling the
    preconditioned O is rescaled to the Frobenius norm of the orthogonalized one, then Keller Jordan's scale.
    eps is depth-scaled (1/(L·√(fan_in·fan_out))) when depth_scaled_eps, else used as given.
    """

    _adaptive = True
    HParams = AdaMuonHParams

    def _second_moment(self, bucket: _Bucket, out: Tensor, members: list[_Member], index: Tensor | None) -> Tensor:
        """Precondition ``out`` in place; returns its σ_max per matrix.

        With c = √(1−β₂ᵗ): O/(√v/c + eps) = c·O/(√v + c·eps); the factor c cancels in the spectral (and the
        Frobenius) rescaling that follows, so only the eps term keeps it.
        """
        beta2 = bucket.group["beta2"]
        spectral = _rows(bucket.spectral, index)
        frob = None if bool(spectral.all()) else torch.linalg.vector_norm(out, dim=(-2, -1))
        v = _rows(bucket.exp_avg_sq, index)
        v32 = v if v.dtype == torch.float32 else v.float()
        v32.mul_(beta2).addcmul_(out, out, value=1.0 - beta2)
        _write_back(bucket.exp_avg_sq, v32, index)
        steps = torch.tensor([self.state[m.param]["step"] + 1 for m in members], dtype=torch.float32, device=out.device)
        correction = (1.0 - beta2**steps).sqrt()
        denom = bucket.scratch[: len(members)]  # u is no longer needed: reuse its memory
        torch.sqrt(v32, out=denom)
        denom.add_((correction * _rows(bucket.adam_eps, index))[:, None, None])
        out.div_(denom)
        gram = small_gram(out)
        sigma = torch.linalg.eigvalsh(gram)[..., -1].clamp_min(0).sqrt()
        if frob is not None:
            # Without spectral scaling: restore the orthogonalized Frobenius norm (then the Keller Jordan scale).
            new_frob = gram.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(0).sqrt()
            restore = torch.where(spectral | (new_frob == 0), 1.0, frob / new_frob.clamp_min(1e-30))
            out.mul_(restore[:, None, None])
        return sigma


# --------------------------------------------------------------------------------------------- helpers


def _freeze(value):
    if isinstance(value, list):
        return tuple(value)
    return value


def _matrix_shape(p: Tensor) -> tuple[int, int]:
    return (p.shape[0], p[0].numel()) if p.ndim >= 2 else (1, p.numel())


def _coefficient(spectral: Tensor, scale: Tensor, sigma: Tensor) -> Tensor:
    """Update multiplier of the orthogonalized O: scale/σ_max (spectral) or scale; 0 for an all-zero O."""
    return torch.where(spectral, scale / sigma.clamp_min(1e-30), scale) * (sigma > 0)


def _rows(t: Tensor, index: Tensor | None) -> Tensor:
    return t if index is None else t[index]


def _write_back(buffer: Tensor, computed: Tensor, index: Tensor | None) -> None:
    if index is None:
        if computed is not buffer:
            buffer.copy_(computed)
    else:
        buffer[index] = computed.to(buffer.dtype)


def _gram_is_rank_sized(bucket: _Bucket) -> bool:
    """Whether the bucket's small Gram (orthogonalize.small_gram) is the r×r one the product target needs."""
    rows, cols = bucket.shape
    return (bucket.pair_role is Role.LORA_A and rows <= cols) or (bucket.pair_role is Role.LORA_B and rows > cols)


def _schedule_factor(group: dict) -> float:
    return scaling.schedule_factor(group["lr"], group.get("initial_lr", group["lr"]))


def _validate_group(group: dict, index: int) -> None:
    where = f"param group {index}"
    if group["lr"] < 0:
        raise ValueError(f"{where}: lr must be >= 0, got {group['lr']}")
    if not 0 <= group["beta1"] < 1:
        raise ValueError(f"{where}: beta1 must be in [0, 1), got {group['beta1']}")
    if "beta2" in group and not 0 <= group["beta2"] < 1:
        raise ValueError(f"{where}: beta2 must be in [0, 1), got {group['beta2']}")
    if group["weight_decay"] < 0 or group["adam_weight_decay"] < 0:
        raise ValueError(f"{where}: weight_decay and adam_weight_decay must be >= 0")
    if group["orthogonalizer"] not in METHODS:
        raise ValueError(f"{where}: orthogonalizer must be one of {METHODS}, got {group['orthogonalizer']!r}")
    if group["ortho_route"] not in ROUTES:
        raise ValueError(f"{where}: ortho_route must be one of {ROUTES}, got {group['ortho_route']!r}")
    if not isinstance(group["ns_steps"], int) or group["ns_steps"] < 1:
        raise ValueError(f"{where}: ns_steps must be an integer >= 1, got {group['ns_steps']!r}")
    if group["lora_a_optimizer"] not in _LORA_A_OPTIMIZERS:
        raise ValueError(f"{where}: lora_a_optimizer must be one of {_LORA_A_OPTIMIZERS}, got {group['lora_a_optimizer']!r}")
    if group["lora_spectral_target"] not in _LORA_TARGETS:
        raise ValueError(f"{where}: lora_spectral_target must be one of {_LORA_TARGETS}, got {group['lora_spectral_target']!r}")
    if group["state_dtype"] not in _STATE_DTYPES:
        raise ValueError(f"{where}: state_dtype must be one of {tuple(_STATE_DTYPES)}, got {group['state_dtype']!r}")
    if len(group["adam_betas"]) != 2 or not all(0 <= b < 1 for b in group["adam_betas"]):
        raise ValueError(f"{where}: adam_betas must be two numbers in [0, 1), got {group['adam_betas']!r}")


def _make_member(p: Tensor, name: str, gi: int, group: dict, pair: str | None) -> _Member:
    depth = int(group.get("depth", 1))
    if "role" in group:
        try:
            role = Role(group["role"])
        except ValueError:
            raise ValueError(f"parameter {name!r}: unknown role {group['role']!r}; known: {[r.value for r in Role]}") from None
        spec = None
    else:
        spec = infer_spec(p, depth) if p.numel() > 0 else None
        role = spec.role if spec is not None else Role.MATRIX
    if p.numel() == 0:
        raise ValueError(f"parameter {name!r}: zero-size tensor of shape {tuple(p.shape)} cannot be optimized")
    rows, cols = _matrix_shape(p)
    if spec is not None:
        fan_in, fan_out = spec.fan_in, spec.fan_out
    else:
        fan_in, fan_out = int(group.get("fan_in", cols)), int(group.get("fan_out", rows))
    if depth < 1:
        raise ValueError(f"parameter {name!r}: depth must be >= 1, got {depth}")
    path = _route(role, p, group, name)
    if path == "muon" and (fan_out, fan_in) != _matrix_shape(p):
        raise ValueError(
            f"parameter {name!r}: group says fan_out x fan_in = {fan_out} x {fan_in} but the tensor's matrix view is "
            f"{_matrix_shape(p)[0]} x {_matrix_shape(p)[1]}"
        )
    member = _Member(p, name, gi, role, fan_in, fan_out, depth, path)
    if role.is_lora_factor:
        if group.get("base_fan_in") is None or group.get("base_fan_out") is None:
            raise ValueError(f"LoRA factor {name!r}: its group needs base_fan_in and base_fan_out")
        if pair is None:
            raise ValueError(f"LoRA factor {name!r} has no pair id (group key 'pairs')")
        member.base_fan_in, member.base_fan_out = int(group["base_fan_in"]), int(group["base_fan_out"])
        member.lora_scale = float(group.get("lora_scale", 1.0))
        if not member.lora_scale > 0:
            raise ValueError(f"LoRA factor {name!r}: lora_scale must be > 0, got {member.lora_scale}")
        member.pair = pair
    return member


def _route(role: Role, p: Tensor, group: dict, name: str) -> str:
    """Which update a tensor takes: "muon", "adam" or "signsgd" (docs/optimizer_math.md §4.3, §7)."""
    if role in (Role.VECTOR, Role.EMBEDDING, Role.DORA_MAGNITUDE):
        return "adam"
    if role is Role.OFT:
        return "muon" if p.ndim == 2 else "adam"
    if role is Role.LORA_B and not group["lora_b_orthogonalize"]:
        return "adam"
    if role is Role.LORA_A and group["lora_a_optimizer"] != "muon":
        return group["lora_a_optimizer"]
    if p.ndim < 2:
        raise ValueError(f"parameter {name!r}: role {role.value} asks Muon for a {p.ndim}-D tensor of shape {tuple(p.shape)}")
    return "muon"


def _check_pairs(members: list[_Member]) -> None:
    """Every LoRA factor needs its partner in the same optimizer (the pair rules act on both)."""
    factors: dict[str, dict[Role, _Member]] = {}
    for m in members:
        if m.role.is_lora_factor:
            slot = factors.setdefault(m.pair, {})
            if m.role in slot:
                raise ValueError(f"LoRA pair {m.pair!r} has two {m.role.value} factors: {slot[m.role].name!r} and {m.name!r}")
            slot[m.role] = m
    for pair, slot in factors.items():
        if len(slot) == 1:
            (m,) = slot.values()
            raise ValueError(f"LoRA factor {m.name!r} (pair {pair!r}): its partner is not in this optimizer")
