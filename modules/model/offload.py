"""Block offloading: some of the denoiser's residual blocks keep their frozen weights in CPU ('storage') memory and
are copied to the accelerator ('compute') just ahead of use, forward and backward (as OneTrainer's and kohya's block
swapping do).

How: a forward pre-hook on every residual block. When block i starts, the offloaded block next in the current
direction (forward: i+1, ..., backward recomputation under gradient checkpointing: i-1, ...) starts copying on a side
CUDA stream while block i computes; block i waits for its own copy's event. Frozen weights never change, so evicting
a block is free: its tensors point back at their storage copy and the device copy is released (record_stream keeps
the caching allocator from reusing it before the compute stream is done). At most two offloaded blocks are on the
accelerator at once: the one computing and the one arriving.

Gradient checkpointing is required: without it autograd keeps the block's weights for the backward (nn.Linear saves
its weight), and they would be the storage copies by then. Trained parameters (LoRA factors) always stay on the
accelerator: the optimizer updates them there.
On CPU storage and compute are the same device; the copy is still made, so tests see the mechanics (data pointers
change, results are bit-identical).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def block_names(model: nn.Module, prefixes: Sequence[str] | None = None) -> list[str]:
    """Residual blocks in execution order: the items of each ModuleList named by `prefixes` (a family's
    backbone_blocks, e.g. 'transformer_blocks.'), or when none are given of a UNet's down/mid/up blocks or else of
    every top-level ModuleList; a prefix naming a single module (a UNet's 'mid_block.') is one block. (The order
    only steers prefetching: a block that was not prefetched is fetched when it starts.)"""
    names = []
    if prefixes is None and isinstance(getattr(model, "mid_block", None), nn.Module):  # a UNet: down, mid, up
        prefixes = ("down_blocks.", "mid_block.", "up_blocks.")
    elif prefixes is None:
        prefixes = [f"{n}." for n, sub in model.named_children() if isinstance(sub, nn.ModuleList)]
    for prefix in prefixes:
        path = prefix.rstrip(".")
        sub = model.get_submodule(path)
        names += [f"{path}.{i}" for i in range(len(sub))] if isinstance(sub, nn.ModuleList) else [path]
    return names


def _frozen_tensors(block: nn.Module) -> list[torch.Tensor]:
    seen, out = set(), []
    for tensor in [*(p for p in block.parameters() if not p.requires_grad), *block.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out.append(tensor)
    return out


class BlockOffloader:
    """Streams the frozen tensors of `offloaded` (names among `order`, the blocks in execution order) between
    `storage` and `compute`. Everything else of `model` is moved to `compute` by `place()`."""

    def __init__(self, model: nn.Module, offloaded: Sequence[str], *, storage: str | torch.device = "cpu",
                 compute: str | torch.device, order: Sequence[str] | None = None) -> None:
        self.model, self.storage, self.compute = model, torch.device(storage), torch.device(compute)
        self.order = list(order) if order is not None else block_names(model)
        unknown = [n for n in offloaded if n not in self.order]
        if unknown:
            raise ValueError(f"memory.offload_blocks: {unknown[0]} is not a residual block of {type(model).__name__}")
        self.offloaded = {self.order.index(n) for n in offloaded}
        pin = self.compute.type == "cuda" and self.storage.type == "cpu"
        self.tensors: dict[int, list[torch.Tensor]] = {}
        self.masters: dict[int, list[torch.Tensor]] = {}
        for i in self.offloaded:
            tensors = _frozen_tensors(model.get_submodule(self.order[i]))
            masters = [t.data.to(self.storage) for t in tensors]
            self.masters[i] = [m.pin_memory() if pin else m for m in masters]
            for t, m in zip(tensors, self.masters[i]):
                t.data = m
            self.tensors[i] = tensors
        self.stream = torch.cuda.Stream(self.compute) if self.compute.type == "cuda" else None
        self.arriving: dict[int, tuple[list[torch.Tensor], torch.cuda.Event | None]] = {}
        self.resident: set[int] = set()
        self.last: int | None = None
        self.copies = 0  # block copies made (tests, bench)
        self.peak_resident = 0  # most offloaded blocks on the compute device at once, and their bytes
        self.peak_resident_bytes = 0
        # on every module inside a block: checkpointing may recompute only a part of it (a UNet's resnets and
        # attentions are checkpointed one by one inside its down/up blocks), and that part needs the weights back
        self.handles = [
            sub.register_forward_pre_hook(self._hook(i))
            for i, name in enumerate(self.order) for sub in model.get_submodule(name).modules()
        ]  # fmt: skip

    def place(self) -> None:
        """Move all but the offloaded blocks' frozen tensors to the compute device."""
        skip = {id(t) for tensors in self.tensors.values() for t in tensors}
        for tensor in [*self.model.parameters(), *self.model.buffers()]:
            if id(tensor) not in skip and tensor.device != self.compute:
                tensor.data = tensor.data.to(self.compute)

    def _hook(self, index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            self.arrive(index)
        return hook

    def arrive(self, i: int) -> None:
        if i == self.last:  # a module inside the block in use: it is on the device already
            return
        forward = self.last is None or i > self.last or i == 0
        self.last = i
        step = 1 if forward else -1
        stop = len(self.order) if forward else -1
        ahead = next((j for j in range(i + step, stop, step) if j in self.offloaded), None)
        for j in list(self.resident):
            if j not in (i, ahead):
                self._evict(j)
        for j in [j for j in self.arriving if j not in (i, ahead)]:  # prefetched for a direction not taken
            del self.arriving[j]
        if i in self.offloaded:
            self._use(i)
        if ahead is not None and ahead not in self.resident:
            self._fetch(ahead)

    def _fetch(self, i: int) -> None:
        if i in self.arriving:
            return
        if self.stream is None:  # CPU: the copy is made at once (a real copy, so the swap is observable)
            copies = [m.to(self.compute, copy=True) for m in self.masters[i]]
            self.arriving[i] = (copies, None)
        else:
            # after the kernels queued so far (blocks before i; block i's are queued after this hook), so the copy
            # overlaps block i and never races the memory a just-evicted block still reads
            self.stream.wait_stream(torch.cuda.current_stream(self.compute))
            with torch.cuda.stream(self.stream):
                copies = [m.to(self.compute, non_blocking=True) for m in self.masters[i]]
                event = torch.cuda.Event()
                event.record(self.stream)
            self.arriving[i] = (copies, event)
        self.copies += 1

    def _use(self, i: int) -> None:
        if i in self.resident:
            return
        self._fetch(i)
        copies, event = self.arriving.pop(i)
        if event is not None:
            current = torch.cuda.current_stream(self.compute)
            current.wait_event(event)
            for copy in copies:
                copy.record_stream(current)  # allocated on the side stream, used on the compute stream
        for tensor, copy in zip(self.tensors[i], copies):
            tensor.data = copy
        self.resident.add(i)
        self.peak_resident = max(self.peak_resident, len(self.resident) + len(self.arriving))
        on_device = [*self.resident, *self.arriving]
        self.peak_resident_bytes = max(self.peak_resident_bytes, sum(self.block_bytes(j) for j in on_device))

    def block_bytes(self, i: int) -> int:
        return sum(m.numel() * m.element_size() for m in self.masters[i])

    def offloaded_bytes(self) -> int:
        return sum(self.block_bytes(i) for i in self.offloaded)

    def _evict(self, i: int) -> None:
        for tensor, master in zip(self.tensors[i], self.masters[i]):
            tensor.data = master
        self.resident.discard(i)

    def is_resident(self, name: str) -> bool:
        return self.order.index(name) in self.resident

    def remove(self) -> None:
        """Take the hooks off and leave every block on the compute device."""
        for handle in self.handles:
            handle.remove()
        for i in self.offloaded:
            for tensor in self.tensors[i]:
                tensor.data = tensor.data.to(self.compute)
        self.resident.clear()
        self.arriving.clear()


def offload_backbone(backbone: nn.Module, prefixes: Sequence[str], count: int, *, compute: str | torch.device,
                     storage: str | torch.device = "cpu") -> BlockOffloader:
    """memory.offload_blocks: the first `count` residual blocks (of the family's block lists) stream from storage."""
    order = block_names(backbone, prefixes)
    if count > len(order):
        raise ValueError(f"memory.offload_blocks: {count} is more than the {len(order)} residual blocks of "
                         f"{type(backbone).__name__}")
    return BlockOffloader(backbone, order[:count], storage=storage, compute=compute, order=order)


__all__ = ["BlockOffloader", "block_names", "offload_backbone"]
