"""A batch sampler that yields same-bucket batches in a seeded, resumable order.

The order of epoch ``e`` is a pure function of (seed, e): items of each bucket are permuted,
cut into batches, and the batches of all buckets are permuted together. ``state_dict()`` holds
(epoch, position) — the number of batches already handed out in that epoch — so
``load_state_dict`` makes a new sampler continue with exactly the next batch.

Each yielded index is a :class:`SampleKey` (epoch, position, index): the dataset uses the epoch
for its seeded augmentations and the collate function puts ``sampler_state`` (the state *after*
that batch) into the batch. With DataLoader workers prefetching ahead, the sampler's own
``state_dict()`` runs ahead of the training loop; checkpoint ``batch["sampler_state"]`` of the
last batch the loop consumed instead (identical when num_workers == 0).

Do not let ``accelerator.prepare`` re-shard this loader; give each process its ``rank`` and
``num_replicas`` here instead and move batches to the device yourself.

Several processes (DDP): every rank builds the same global batches of
``batch_size · num_replicas`` items and takes its own slice, so N processes see the same items
per step as one process with the global batch (incomplete global batches are dropped then).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

from torch.utils.data import Sampler

from tuneonce.data.captions import Stream, item_rng


class SampleKey(NamedTuple):
    epoch: int
    position: int  # index of the batch within the epoch
    index: int  # dataset item


class BucketBatchSampler(Sampler[list[SampleKey]]):
    def __init__(
        self,
        bucket_ids: Sequence[int],
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got {rank}")
        if len(bucket_ids) == 0:
            raise ValueError("cannot sample batches from an empty dataset")
        self.bucket_ids = list(bucket_ids)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last or num_replicas > 1
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.position = 0
        if len(self) == 0:
            raise ValueError(
                f"no complete batch: {len(self.bucket_ids)} items, global batch size {batch_size * num_replicas}, "
                "and every bucket is smaller than a batch (lower batch_size or turn off drop_last)"
            )

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The global batches of ``epoch`` (all ranks' items), in order."""
        by_bucket: dict[int, list[int]] = {}
        for index, bucket in enumerate(self.bucket_ids):
            by_bucket.setdefault(bucket, []).append(index)
        rng = item_rng(self.seed, epoch, 0, Stream.SAMPLER)
        global_size = self.batch_size * self.num_replicas
        batches: list[list[int]] = []
        for bucket in sorted(by_bucket):
            members = by_bucket[bucket]
            if self.shuffle:
                members = [members[i] for i in rng.permutation(len(members))]
            for start in range(0, len(members), global_size):
                batch = members[start : start + global_size]
                if len(batch) == global_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __len__(self) -> int:
        """Batches in one full epoch."""
        counts: dict[int, int] = {}
        for bucket in self.bucket_ids:
            counts[bucket] = counts.get(bucket, 0) + 1
        global_size = self.batch_size * self.num_replicas
        if self.drop_last:
            return sum(n // global_size for n in counts.values())
        return sum(-(-n // global_size) for n in counts.values())

    def __iter__(self) -> Iterator[list[SampleKey]]:
        """The rest of the current epoch from ``position``; afterwards the sampler moves to the next epoch."""
        epoch = self.epoch
        batches = self.epoch_batches(epoch)
        while self.position < len(batches):
            position = self.position
            batch = batches[position]
            per_rank = -(-len(batch) // self.num_replicas)
            mine = batch[self.rank * per_rank : (self.rank + 1) * per_rank]
            self.position += 1
            yield [SampleKey(epoch, position, index) for index in mine]
        self.epoch, self.position = epoch + 1, 0

    def start_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch.

        Deliberately not named ``set_epoch``: accelerate's prepared DataLoader calls
        ``batch_sampler.set_epoch(its own pass counter)`` on every ``iter()``, which would
        undo a resumed position. The sampler counts its epochs itself.
        """
        self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_items": len(self.bucket_ids)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from ``state`` (this sampler's ``state_dict()`` or a batch's ``sampler_state``)."""
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"sampler state was saved with seed {state['seed']}, this run uses seed {self.seed}")
        if state.get("num_items", len(self.bucket_ids)) != len(self.bucket_ids):
            raise ValueError(
                f"the dataset changed since the sampler state was saved ({state['num_items']} items then, "
                f"{len(self.bucket_ids)} now): the batch order would not continue"
            )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self):
            raise ValueError(f"invalid sampler state epoch={epoch} position={position} (epoch has {len(self)} batches)")
        self.epoch, self.position = epoch, position
