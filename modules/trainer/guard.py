"""The non-finite guard: a step whose loss, gradients or resulting weights are not finite is undone.

One policy for every optimizer. Before the optimizer step the trainable weights and the optimizer state are copied
into buffers kept for the run (one `_foreach_copy_`); after it, one fused check reads the loss, the total gradient
norm (the clipping already computes it) and the per-parameter weight norms (`torch._foreach_norm`), with a single
host sync. A bad step copies the weights and state back, is named in one warning line (step, LR, the worst
parameters) and counts towards `training.max_nonfinite_steps` consecutive bad steps, after which the run stops
(`Diverged`, exit code 3 in the CLI) and keeps its last good checkpoint.

A weight norm that overflows float32 (|w| around 1e19 and more) counts as non-finite: such weights are diverged,
and the next forward would turn the loss into inf/nan anyway. Under DDP the loss is each process's own, so only
the gradient and weight norms decide (they are the same on every process); with an fp16 grad scaler, non-finite
gradients are the scaler's business (it skips the step and lowers the scale), so only the weights decide.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch

logger = logging.getLogger("tuneonce.train")


class Diverged(RuntimeError):
    """`max_bad` consecutive steps were non-finite: the run cannot go on (the message is one line)."""

    def __init__(self, step: int, message: str) -> None:
        super().__init__(message)
        self.step = step


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[tuple[dict, str, torch.Tensor]]:
    """(state dict, key, tensor) of every tensor in the optimizer's per-parameter state."""
    return [(st, k, v) for st in optimizer.state.values() for k, v in st.items() if isinstance(v, torch.Tensor)]


class NonFiniteGuard:
    """`backup` True: copy weights and optimizer state before each step and undo a bad step after it (one sync).
    False (for full finetunes, whose copy would double the memory of weights and state): a non-finite loss or
    gradient is caught before the optimizer step, which is then skipped (one sync), and non-finite weights after
    a step, which cannot be undone without the copy, stop the run at once (a second sync)."""

    def __init__(self, params: Sequence[torch.Tensor], names: Sequence[str], optimizer: torch.optim.Optimizer, *,
                 max_bad: int, backup: bool = True, use_loss: bool = True, use_grads: bool = True) -> None:  # fmt: skip
        self.params, self.names, self.optimizer = list(params), list(names), optimizer
        self.max_bad, self.backup, self.use_loss, self.use_grads = max_bad, backup, use_loss, use_grads
        self.step = 0  # the number of the step being taken (set by the loop)
        self.consecutive = 0
        self.total = 0
        self.last_step_bad = False
        self._skipped = False
        self._param_backup: list[torch.Tensor] | None = None
        self._state: list[tuple[dict, str, torch.Tensor]] = []
        self._state_backup: list[torch.Tensor] = []
        self._state_tensors: list[torch.Tensor] = []
        self._state_key: tuple[int, int, int] | None = None
        self._scalars: dict[int, dict[str, Any]] = {}
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
        if hasattr(inner, "report_nonfinite"):
            inner.report_nonfinite = False  # this guard names the step once; the optimizer's own skip stays silent

    def before_step(self) -> None:
        """Copy the trainable weights and the optimizer state (state created lazily gets its buffers once)."""
        self._skipped = False
        if not self.backup:
            return
        with torch.no_grad():
            if self._param_backup is None:
                self._param_backup = [p.detach().clone() for p in self.params]
            else:
                torch._foreach_copy_(self._param_backup, self.params)
            # The list of state tensors changes when the optimizer creates its state (first step) or loads one
            # (a new state dict): only then is it collected again and are the buffers reallocated.
            st = self.optimizer.state
            key = (id(st), len(st), sum(len(s) for s in st.values()))
            if key != self._state_key:
                self._state_key = key
                self._state = optimizer_state_tensors(self.optimizer)
                self._state_tensors = [t for _, _, t in self._state]
                self._state_backup = [t.detach().clone() for t in self._state_tensors]
            elif self._state_tensors:
                torch._foreach_copy_(self._state_backup, self._state_tensors)
            # step counters and other plain numbers: a shallow copy per parameter (cheap, few entries)
            self._scalars = {
                id(st): {k: v for k, v in st.items() if not isinstance(v, torch.Tensor)}
                for st in self.optimizer.state.values()
            }

    def _input_checks(self, loss: torch.Tensor, grad_norm: torch.Tensor | None,
                      device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor | None]:  # fmt: skip
        checks = []
        if self.use_grads and grad_norm is None:
            grads = [p.grad for p in self.params if p.grad is not None]
            grad_norm = torch.stack(torch._foreach_norm(grads)).norm() if grads else None
        if self.use_grads and grad_norm is not None:
            checks.append(grad_norm.detach().float().reshape(1).to(device))
        if self.use_loss:
            checks.append(loss.detach().float().reshape(1).to(device))
        return checks, grad_norm

    def may_step(self, loss: torch.Tensor, grad_norm: torch.Tensor | None, lr: float) -> bool:
        """Without a backup: False (the optimizer step is skipped) when the loss or the gradient is not finite."""
        if self.backup:
            return True
        with torch.no_grad():
            checks, grad_norm = self._input_checks(loss, grad_norm, self.params[0].device)
            if not checks or bool(torch.isfinite(torch.cat(checks)).all()):
                return True
        self._skipped = True
        self._bad(loss, grad_norm, None, lr, "step skipped (weights and optimizer state untouched)")
        return False

    def after_step(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | None, lr: float) -> bool:
        """Check the step just taken (one host sync); undo it when something is not finite. True when it was fine.
        `step` is the number of the step just taken (1-based); raises `Diverged` after `max_bad` bad ones in a row."""
        self.step = step
        if self._skipped:  # may_step found it bad and counted it
            return False
        with torch.no_grad():
            weight_norms = torch._foreach_norm(self.params)
            checks = [torch.stack(weight_norms).float()]
            if self.backup:
                more, grad_norm = self._input_checks(loss, grad_norm, checks[0].device)
                checks += more
            ok = bool(torch.isfinite(torch.cat(checks)).all())
        self.last_step_bad = not ok
        if ok:
            self.consecutive = 0
            return True
        if not self.backup:
            raise Diverged(step, (
                f"training diverged: the weights turned non-finite in step {step} (lr {lr:.3g}; worst: "
                f"{self._worst(weight_norms, shown=1)}) and no copy was kept to undo it (training.nonfinite_backup); "
                "lower optimizer.lr"
            ))  # fmt: skip
        worst = self._worst(weight_norms)
        what = self._what(loss, grad_norm, weight_norms)
        self._restore()
        self._bad(loss, grad_norm, what, lr, f"step undone (weights and optimizer state restored) - worst: {worst}")
        return False

    def _bad(self, loss: torch.Tensor, grad_norm: torch.Tensor | None, what: str | None, lr: float, done: str) -> None:
        """Count a bad step, name it in one warning line, stop the run after `max_bad` in a row."""
        self.last_step_bad = True
        self.consecutive += 1
        self.total += 1
        what = what or self._what(loss, grad_norm, None)
        logger.warning(
            "warning: step %d: non-finite %s at lr %.3g; %s [%d/%d in a row]",
            self.step, what, lr, done, self.consecutive, self.max_bad,
        )  # fmt: skip
        if self.consecutive >= self.max_bad:
            raise Diverged(self.step, (
                f"training diverged: {self.consecutive} non-finite steps in a row (training.max_nonfinite_steps "
                f"{self.max_bad}), last at step {self.step}, lr {lr:.3g}; lower optimizer.lr or check the data"
            ))  # fmt: skip

    def _what(self, loss: torch.Tensor, grad_norm: torch.Tensor | None, weight_norms: list[torch.Tensor] | None) -> str:
        parts = []
        if self.use_loss and not bool(torch.isfinite(loss).all()):
            parts.append(f"loss ({float(loss):g})")
        if self.use_grads and grad_norm is not None and not bool(torch.isfinite(grad_norm).all()):
            parts.append("gradient")
        if weight_norms is not None and not bool(torch.isfinite(torch.stack(weight_norms)).all()):
            parts.append("weights after the step")
        return " and ".join(parts) or "values"

    def _worst(self, weight_norms: list[torch.Tensor], shown: int = 3) -> str:
        """The parameters to blame: non-finite gradient first, then non-finite weights, then the largest weights."""
        scored = []
        for name, p, w in zip(self.names, self.params, weight_norms):
            g = p.grad
            g_norm = float(g.detach().float().norm()) if g is not None else 0.0
            w_norm = float(w)
            bad_grad, bad_weight = not math.isfinite(g_norm), not math.isfinite(w_norm)
            scored.append(((bad_grad, bad_weight, 0.0 if bad_weight else w_norm), name, g_norm, w_norm))
        scored.sort(key=lambda s: s[0], reverse=True)
        return ", ".join(f"{name} (grad norm {g:.3g}, weight norm {w:.3g})" for _, name, g, w in scored[:shown])

    def _restore(self) -> None:
        with torch.no_grad():
            if self._param_backup is not None:
                torch._foreach_copy_(self.params, self._param_backup)
            state = optimizer_state_tensors(self.optimizer)
            known = {id(t) for _, _, t in self._state}
            for (st, key, tensor), saved in zip(self._state, self._state_backup):
                tensor.copy_(saved)
            for st, key, tensor in state:
                if id(tensor) not in known:  # created by the bad step: back to a fresh (zero) state
                    tensor.zero_()
            for st in self.optimizer.state.values():
                before = self._scalars.get(id(st))
                for key, value in list(st.items()):
                    if isinstance(value, torch.Tensor):
                        continue
                    if before is not None and key in before:
                        st[key] = before[key]
                    elif isinstance(value, (int, float)) and not isinstance(value, bool):
                        st[key] = type(value)(0)  # a counter the bad step started

