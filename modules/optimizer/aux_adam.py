"""Element-wise optimizers for what Muon must not take: a foreach AdamW step and sign-SGD (signum).

Pure functions over lists of tensors (one kernel launch per op for the whole list), used by the Muon
family for vectors, embeddings and the LoRA factors routed away from orthogonalization. Every
hyperparameter may be one value for all tensors or a list with one value per tensor.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

Scalars = float | Sequence[float]


def _per_tensor(value: Scalars, n: int, name: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * n
    values = [float(v) for v in value]
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} values for {n} tensors")
    return values


def _as_compute(tensors: list[Tensor], like: list[Tensor]) -> list[Tensor]:
    """State kept in a lower precision (bf16) is updated in the gradients' precision, then stored back."""
    if all(t.dtype == g.dtype for t, g in zip(tensors, like)):
        return tensors
    return [t.to(g.dtype) for t, g in zip(tensors, like)]


def _store(state: list[Tensor], computed: list[Tensor]) -> None:
    if computed is not state:
        torch._foreach_copy_(state, computed)


def adamw_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: int | Sequence[int],
    *,
    lr: Scalars,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: Scalars = 1e-8,
    weight_decay: Scalars = 0.0,
) -> None:
    """One AdamW step in place. ``steps``: the step number (≥ 1, after incrementing) per tensor.

    Decoupled decay as in torch.optim.AdamW: p ← p·(1 − lr·wd) − lr·m̂/(√v̂ + eps).
    """
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == n):
        raise ValueError("adamw_step: params, grads, exp_avgs and exp_avg_sqs must have the same length")
    if n == 0:
        return
    beta1, beta2 = betas
    lrs = _per_tensor(lr, n, "lr")
    epss = _per_tensor(eps, n, "eps")
    wds = _per_tensor(weight_decay, n, "weight_decay")
    step_list = [int(steps)] * n if isinstance(steps, (int, float)) else [int(s) for s in steps]
    if min(step_list) < 1:
        raise ValueError("adamw_step: step numbers start at 1")

    m = _as_compute(exp_avgs, grads)
    v = _as_compute(exp_avg_sqs, grads)
    torch._foreach_lerp_(m, grads, 1.0 - beta1)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, grads, grads, value=1.0 - beta2)
    _store(exp_avgs, m)
    _store(exp_avg_sqs, v)

    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, [math.sqrt(1.0 - beta2**t) for t in step_list])
    torch._foreach_add_(denom, epss)
    if any(lr_i * wd_i != 0 for lr_i, wd_i in zip(lrs, wds)):
        torch._foreach_mul_(params, [1.0 - lr_i * wd_i for lr_i, wd_i in zip(lrs, wds)])
    step_sizes = [-lr_i / (1.0 - beta1**t) for lr_i, t in zip(lrs, step_list)]
    torch._foreach_addcdiv_(params, _as_compute(m, params), _as_compute(denom, params), step_sizes)


def signsgd_step(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor] | None = None,
    *,
    lr: Scalars,
    beta: float = 0.0,
    weight_decay: Scalars = 0.0,
) -> None:
    """Sign-SGD (with ``momentum_buffers`` and beta > 0: signum) in place: p ← p·(1 − lr·wd) − lr·sign(m).

    Its update has RMS 1 whatever the tensor's shape (the PR #1263 author's finding for LoRA A).
    """
    n = len(params)
    if len(grads) != n or (momentum_buffers is not None and len(momentum_buffers) != n):
        raise ValueError("signsgd_step: params, grads and momentum_buffers must have the same length")
    if n == 0:
        return
    lrs = _per_tensor(lr, n, "lr")
    wds = _per_tensor(weight_decay, n, "weight_decay")
    direction = grads
    if momentum_buffers is not None:
        m = _as_compute(momentum_buffers, grads)
        torch._foreach_lerp_(m, grads, 1.0 - beta)
        _store(momentum_buffers, m)
        direction = m
    signs = torch._foreach_sign(direction)
    if any(lr_i * wd_i != 0 for lr_i, wd_i in zip(lrs, wds)):
        torch._foreach_mul_(params, [1.0 - lr_i * wd_i for lr_i, wd_i in zip(lrs, wds)])
    torch._foreach_mul_(signs, [-lr_i for lr_i in lrs])
    torch._foreach_add_(params, _as_compute(signs, params))
