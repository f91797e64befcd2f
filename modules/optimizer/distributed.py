"""Splitting the optimizer's matrix work across processes (DDP): each rank orthogonalizes its share, then all gather.

Under DDP every rank holds the same parameters, the same (averaged) gradients and the same optimizer state, so
every rank could compute the whole step. The element-wise parts (momentum, Adam moments, weight decay) are cheap and
stay replicated. The per-matrix parts (Newton–Schulz iterations, Gram eigendecompositions, LoRA-Muon's r×r roots)
are where the time goes, and they are independent per matrix: the optimizers batch them per shape ("rows" of a
stacked (B, m, n) batch), and this module

1. splits the rows of every batch between the ranks, in contiguous slices (each rank keeps one batched call per
   shape), balanced by estimated FLOPs over all batches (`split_rows`), and
2. after each rank has written its slices, sends every slice to every other rank (`exchange_rows`: one padded
   all_gather per dtype for the whole step), so each rank ends with the complete, bit-identical result.

The split is a pure function of the batch sizes, the per-row costs and the world size, so every rank computes the
same split without talking to the others. Without torch.distributed (or with one process) nothing here runs and the
optimizers take their ordinary single-process path.
"""
from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.distributed as dist
from torch import Tensor


def world(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """(rank, world_size) of the default (or given) process group; (0, 1) when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


@dataclass(frozen=True)
class RowSplit:
    """Which rows of each batch each rank computes: rank r owns rows ``starts[b][r]:starts[b][r + 1]`` of batch b."""

    rank: int
    world_size: int
    starts: tuple[tuple[int, ...], ...]  # per batch: world_size + 1 boundaries, starts[b][0] = 0, [-1] = batch size

    def rows(self, batch: int, rank: int | None = None) -> slice:
        """The contiguous rows of `batch` that `rank` (default: this rank) computes."""
        r = self.rank if rank is None else rank
        return slice(self.starts[batch][r], self.starts[batch][r + 1])

    def count(self, batch: int, rank: int | None = None) -> int:
        s = self.rows(batch, rank)
        return s.stop - s.start

    def owned(self, rank: int | None = None) -> int:
        """Rows (matrices, or LoRA pairs) this rank computes over all batches."""
        return sum(self.count(b, rank) for b in range(len(self.starts)))


def split_rows(sizes: Sequence[int], costs: Sequence[float], *, rank: int, world_size: int) -> RowSplit:
    """Balance rows of `len(sizes)` batches (batch b: `sizes[b]` rows costing `costs[b]` each) over the ranks.

    Greedy longest-processing-time: batches in order of decreasing per-row cost, each row to the least loaded rank
    (ties: the lower rank), then each batch's rows are laid out as contiguous slices in rank order. A batch with
    fewer rows than ranks leaves some ranks without a slice of it. Deterministic, so every rank gets the same answer.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    if len(sizes) != len(costs):
        raise ValueError(f"split_rows: {len(sizes)} batch sizes but {len(costs)} costs")
    if any(n < 0 for n in sizes) or any(not c >= 0 for c in costs):
        raise ValueError(f"split_rows: sizes and costs must be >= 0, got sizes={list(sizes)}, costs={list(costs)}")
    counts = _balanced_counts(tuple(int(n) for n in sizes), tuple(float(c) for c in costs), world_size)
    starts = []
    for per_rank in counts:
        bounds = [0]
        for c in per_rank:
            bounds.append(bounds[-1] + c)
        starts.append(tuple(bounds))
    return RowSplit(rank, world_size, tuple(starts))


@lru_cache(maxsize=64)
def _balanced_counts(sizes: tuple[int, ...], costs: tuple[float, ...], world_size: int) -> tuple[tuple[int, ...], ...]:
    counts = [[0] * world_size for _ in sizes]
    loads = [(0.0, r) for r in range(world_size)]  # a heap of (load, rank): the lower rank wins ties
    for b in sorted(range(len(sizes)), key=lambda b: (-costs[b], b)):
        for _ in range(sizes[b]):
            load, r = heapq.heappop(loads)
            counts[b][r] += 1
            heapq.heappush(loads, (load + costs[b], r))
    return tuple(tuple(c) for c in counts)


def exchange_rows(batches: Sequence[Tensor], split: RowSplit, group: dist.ProcessGroup | None = None) -> None:
    """Complete every batch in place: each rank has written rows ``split.rows(b)`` of ``batches[b]`` (shape
    (rows, ...)); afterwards every rank holds every rank's rows, bit for bit.

    One all_gather per dtype: each rank packs its slices into one flat buffer, padded to the largest rank's size
    (gloo's all_gather wants equal sizes), and unpacks the others' buffers by the same split.
    """
    if len(batches) != len(split.starts):
        raise ValueError(f"exchange_rows: {len(batches)} batches but the split covers {len(split.starts)}")
    for b, t in enumerate(batches):
        if t.shape[0] != split.starts[b][-1]:
            raise ValueError(f"exchange_rows: batch {b} has {t.shape[0]} rows, the split expects {split.starts[b][-1]}")
    by_dtype: dict[torch.dtype, list[int]] = {}
    for b, t in enumerate(batches):
        if t.numel():
            by_dtype.setdefault(t.dtype, []).append(b)
    for indices in by_dtype.values():
        _exchange_same_dtype([batches[b] for b in indices], [split.starts[b] for b in indices], split, group)


def _exchange_same_dtype(batches: list[Tensor], starts: list[tuple[int, ...]], split: RowSplit, group) -> None:
    row_numel = [t[0].numel() if t.shape[0] else 0 for t in batches]
    sizes = [sum((s[r + 1] - s[r]) * k for s, k in zip(starts, row_numel)) for r in range(split.world_size)]
    width = max(sizes)
    if width == 0:
        return
    first = batches[0]
    send = torch.empty(width, dtype=first.dtype, device=first.device)
    offset = 0
    me = split.rank
    for t, s in zip(batches, starts):
        rows = t[s[me] : s[me + 1]]
        send[offset : offset + rows.numel()].view(rows.shape).copy_(rows)
        offset += rows.numel()
    received = [torch.empty_like(send) for _ in range(split.world_size)]
    dist.all_gather(received, send, group=group)
    for r, buffer in enumerate(received):
        if r == me:
            continue
        offset = 0
        for t, s in zip(batches, starts):
            rows = t[s[r] : s[r + 1]]
            rows.copy_(buffer[offset : offset + rows.numel()].view(rows.shape))
            offset += rows.numel()


def orthogonalization_flops(shape: tuple[int, int], route: str, method: str, steps: int) -> float:
    """Rough FLOPs of orthogonalizing one (m, n) matrix (s = short side, l = long side), for balancing only.

    Gram route: Gram matrix 2·s²·l, eigh ~10·s³, the final product 2·s²·l. Iterative polynomial route: per step
    X·Xᵀ, A·A and B·X (4·s²·l + 2·s³), plus the σ_max Gram. Exact (SVD): ~4·s²·l + 8·s³.
    """
    s, l = sorted(shape)
    if route == "gram":
        return 4.0 * s * s * l + 10.0 * s**3
    if method == "exact":
        return 4.0 * s * s * l + 8.0 * s**3
    return steps * (4.0 * s * s * l + 2.0 * s**3) + 2.0 * s * s * l + 10.0 * s**3


def lora_pair_flops(m: int, n: int, r: int) -> float:
    """Rough FLOPs of one LoRA-Muon pair step: four Gram products and two final products (6·r²·(m + n)), plus four
    r×r eigendecompositions and their products (~40·r³)."""
    return 6.0 * r * r * (m + n) + 40.0 * r**3
