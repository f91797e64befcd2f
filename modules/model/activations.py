"""Measure the activation memory a training forward keeps for backward, exactly and on any device.

`SavedActivations` sums the bytes of every tensor autograd saves (torch.autograd.graph.saved_tensors_hooks), once per
storage, leaving out parameters and buffers (they are counted as weights). Between the forward and the backward that
sum is what the activations occupy; it is deterministic, so the planner can be calibrated against it on CPU.
Per-block figures come from forward hooks on the residual blocks (the bytes saved while each block ran).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def _storage_key(t: torch.Tensor) -> tuple:
    storage = t.untyped_storage()
    return (t.device.type, storage.data_ptr()) if t.device.type != "meta" else ("meta", id(t))


def _flat(values: list) -> list[torch.Tensor]:
    out = []
    for value in values:
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif isinstance(value, (tuple, list)):
            out.extend(_flat(list(value)))
    return out


class SavedActivations:
    """Context manager: `.total` bytes saved for backward (each storage once), `.per_block` by block name."""

    def __init__(self, model: nn.Module | None = None, blocks: Iterable[str] = ()) -> None:
        self.total = 0
        self.per_block: dict[str, int] = {}
        self.block_inputs: dict[str, int] = {}
        self._seen: set[tuple] = set()
        self._inputs_seen: set[tuple] = set()
        self._keep: list[torch.Tensor] = []  # keeps storages alive so a freed pointer is never reused and missed
        self._weights: set[tuple] = set()
        self._current: str | None = None
        self._handles: list = []
        if model is not None:
            tensors = [*model.parameters(), *model.buffers()]
            self._weights = {_storage_key(t) for t in tensors if t.device.type != "meta"}
            for name in blocks:
                block = model.get_submodule(name)
                self._handles.append(block.register_forward_pre_hook(self._enter(name), with_kwargs=True))
                self._handles.append(block.register_forward_hook(self._leave))

    def _enter(self, name: str):
        def hook(module, args, kwargs):
            self._current = name
            # each storage once over all blocks: tensors every block gets (rotary tables, conditioning) count once
            tensors = [a for a in _flat(list(args) + list(kwargs.values())) if a.is_floating_point()]
            new = {_storage_key(t): t for t in tensors if _storage_key(t) not in self._inputs_seen}
            self._inputs_seen.update(new)
            self._keep.extend(new.values())
            size = sum(t.numel() * t.element_size() for t in new.values())
            self.block_inputs[name] = self.block_inputs.get(name, 0) + size
        return hook

    def _leave(self, module, args, output):
        self._current = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in self._seen and key not in self._weights:
            self._seen.add(key)
            self._keep.append(t)
            size = t.untyped_storage().nbytes() if t.device.type != "meta" else t.numel() * t.element_size()
            self.total += size
            if self._current is not None:
                self.per_block[self._current] = self.per_block.get(self._current, 0) + size
        return t

    def __enter__(self) -> SavedActivations:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._keep.clear()


__all__ = ["SavedActivations"]
