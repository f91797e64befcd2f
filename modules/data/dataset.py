"""Image-folder training data: scanning, bucketing, seeded augmentation, caches, batching.

The training loop uses::

    train_set, val_set = build_datasets(cfg.data, cfg.validation, seed=cfg.training.seed)
    train_set.cache_latents(vae_encode, encoder_id=..., cache_dir=...)          # optional
    train_set.cache_text_embeddings(encode_prompts, encoder_id=..., cache_dir=...)  # optional
    loader = train_set.dataloader(batch_size=cfg.training.batch_size)
    for batch in loader: ...   # see collate_batch for the keys
    checkpoint["data"] = batch["sampler_state"]   # resume: loader.batch_sampler.load_state_dict(...)

Augmentation and caching rules (kohya users' expectations):

- Random flip with cached latents: both flip states of each image are encoded and cached; the
  seeded flip of (seed, epoch, index) picks one.
- Random crop cannot be combined with cached latents (every epoch would crop differently):
  rejected with a clear error. Center crop is deterministic and cached.
- Cached text embeddings: captions of the folder are encoded once; caption dropout uses the cached
  embedding of the empty caption. Tag shuffling is rejected (each shuffle is a new text), as is
  training a text encoder (the embeddings would go stale) — turn the text cache off for either.
- Validation sets never augment: no flip, no dropout, no shuffle, center crop.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import ImageOps
from torch.utils.data import DataLoader, Dataset

from tuneonce.data.buckets import (
    CropPlan, Size, apply_crop, assign_bucket, fit_within, make_buckets, plan_crop, upscale_factor,
)  # fmt: skip
from tuneonce.data.cache import CacheStats, DiskCache, content_hash, dtype_name, settings_key
from tuneonce.data.captions import Stream, item_rng, process_caption, with_prefix
from tuneonce.data.folders import FolderSpec, ImageRecord, load_image, scan_folders, split_records, to_tensor
from tuneonce.data.masks import MaskSettings, check_mask, mask_weights
from tuneonce.data.sampler import BucketBatchSampler, SampleKey

__all__ = [
    "DataSettings",
    "FolderSpec",
    "ImageRecord",
    "TrainDataset",
    "build_dataset",
    "build_datasets",
    "collate_batch",
    "scan_folders",
    "split_records",
]

EncodeImages = Callable[[torch.Tensor], torch.Tensor]
EncodeCaptions = Callable[[list[str]], Mapping[str, torch.Tensor]]


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class DataSettings:
    """What the pipeline needs from the config's ``data:`` section (see :meth:`from_config`)."""

    folders: tuple[FolderSpec, ...]
    resolution: int = 1024
    resolutions: tuple[int, ...] = ()  # several training resolutions (every image at each); () = (resolution,)
    bucketing: bool = True
    bucket_step: int = 64
    bucket_min: int = 256
    bucket_max: int = 2048
    random_flip: float = 0.0  # probability
    random_crop: bool = False
    caption_dropout: float = 0.0
    shuffle_tags: bool = False
    keep_tokens: int = 0
    caption_extension: str = ".txt"
    cache_latents: bool = False
    cache_text_embeddings: bool = False
    num_workers: int = 0
    masked_loss: MaskSettings | None = None  # data.masked_loss when enabled (modules/data/masks.py)
    upscale: bool = False  # False: images smaller than their bucket train at their own size (bucket_no_upscale)

    @classmethod
    def from_config(cls, cfg: Any) -> DataSettings:
        """From the pydantic ``DataConfig`` (or a mapping / object with the same field names).

        ``random_flip`` may be a bool (True = 0.5) or a probability; a folder may be a path string.
        """
        if isinstance(cfg, DataSettings):
            return cfg
        get = (
            (lambda name, default: cfg.get(name, default))
            if isinstance(cfg, Mapping)
            else (lambda name, default: getattr(cfg, name, default))
        )
        folders = tuple(_folder_spec(f) for f in get("folders", ()))
        flip = get("random_flip", 0.0)
        defaults = cls(folders=folders)
        values = {name: get(name, getattr(defaults, name)) for name in cls.__dataclass_fields__ if name != "folders"}
        values["random_flip"] = 0.5 if flip is True else float(flip or 0.0)
        values["masked_loss"] = MaskSettings.from_config(values["masked_loss"])
        values["resolutions"] = tuple(int(r) for r in values["resolutions"] or ())
        return cls(folders=folders, **values)


def _folder_spec(folder: Any) -> FolderSpec:
    if isinstance(folder, (str, Path)):
        return FolderSpec(Path(folder))
    get = folder.get if isinstance(folder, Mapping) else (lambda name, default: getattr(folder, name, default))
    return FolderSpec(
        Path(get("path", "")),
        int(get("repeats", 1)),
        str(get("default_caption", "") or ""),
        caption_extension=get("caption_extension", None),
        caption_prefix=str(get("caption_prefix", "") or ""),
        caption_dropout=get("caption_dropout", None),
        shuffle_tags=get("shuffle_tags", None),
        keep_tokens=get("keep_tokens", None),
        loss_weight=float(get("loss_weight", 1.0)),
        role=str(get("role", "train")),
        prior_prediction=bool(get("prior_prediction", False)),
    )


@dataclass(frozen=True)
class Concept:
    """A folder's caption settings resolved against the data section's, its loss weight and target."""

    prefix: str = ""
    caption_dropout: float = 0.0
    shuffle_tags: bool = False
    keep_tokens: int = 0
    loss_weight: float = 1.0
    prior_prediction: bool = False
    name: str = ""

    @classmethod
    def of(cls, folder: FolderSpec | None, settings: DataSettings) -> Concept:
        if folder is None:  # a validation folder: the data section's settings, plain loss
            return cls(
                caption_dropout=settings.caption_dropout,
                shuffle_tags=settings.shuffle_tags,
                keep_tokens=settings.keep_tokens,
            )

        def pick(own: Any, inherited: Any) -> Any:
            return inherited if own is None else own

        return cls(
            prefix=folder.caption_prefix,
            caption_dropout=float(pick(folder.caption_dropout, settings.caption_dropout)),
            shuffle_tags=bool(pick(folder.shuffle_tags, settings.shuffle_tags)),
            keep_tokens=int(pick(folder.keep_tokens, settings.keep_tokens)),
            loss_weight=folder.loss_weight,
            prior_prediction=folder.prior_prediction and folder.role == "regularization",
            name=folder.path.name,
        )


# --------------------------------------------------------------------------- dataset


class TrainDataset(Dataset):
    """Items of the image records, each image ``repeats`` times, fitted into aspect buckets.

    Index with a :class:`SampleKey` (what :class:`BucketBatchSampler` yields, carrying the epoch
    for the seeded augmentations) or with a plain int (epoch 0). An item is a dict:
    ``pixel_values`` (C,H,W) in [-1,1] — or ``latents`` once latents are cached —, ``caption``,
    ``text_embeddings`` (dict, once cached), ``original_size`` (h, w), ``crop_top_left``
    (top, left), ``target_size`` (h, w), ``flipped``, ``path``, ``index``, ``epoch``, ``position``.
    """

    def __init__(
        self, records: Sequence[ImageRecord], settings: DataSettings, *, seed: int, augment: bool = True
    ) -> None:
        if not records:
            raise ValueError("a dataset needs at least one image")
        self.settings = settings
        self.seed = seed
        self.augment = augment
        self.images = len({r.path for r in records})
        # Every image at every resolution (data.resolutions), each with that resolution's own buckets: records are
        # (image, resolution) pairs. Buckets of equal size are shared, so a batch never mixes sizes.
        self.records: list[ImageRecord] = []
        self.record_buckets: list[int] = []
        self.record_resolutions: list[int] = []
        self.buckets: list[Size] = []
        self.shrunk: list[int] = []  # records whose bucket was shrunk to their size
        placed: set[tuple[int, Size]] = set()
        for resolution in settings.resolutions or (settings.resolution,):
            own = self._resolution_buckets(resolution)
            self.buckets.extend(b for b in own if b not in self.buckets)
            for number, record in enumerate(records):
                bucket = own[assign_bucket(*record.size, own)]
                fitted = bucket if settings.upscale else fit_within(bucket, record.size)
                if (number, fitted) in placed:  # too small for this resolution too: once at its own size
                    continue
                placed.add((number, fitted))
                if fitted != bucket:  # a smaller image gets a bucket of its own size instead of being enlarged
                    self.shrunk.append(len(self.records))
                    if fitted not in self.buckets:
                        self.buckets.append(fitted)
                self.records.append(record)
                self.record_buckets.append(self.buckets.index(fitted))
                self.record_resolutions.append(resolution)
        self.item_records = [i for i, r in enumerate(self.records) for _ in range(r.repeats)]
        self.concepts = {c: Concept.of(settings.folders[c] if 0 <= c < len(settings.folders) else None, settings)
                         for c in {r.concept for r in self.records}}  # fmt: skip
        self.bucket_ids = [self.record_buckets[i] for i in self.item_records]
        self.flip_probability = settings.random_flip if augment else 0.0
        self.random_crop = settings.random_crop and augment
        self.masks = settings.masked_loss if augment else None  # validation loss stays unmasked
        self._latent_cache: DiskCache | None = None
        self._latent_keys: dict[tuple[int, bool], str] = {}
        self._text_cache: DiskCache | None = None
        self._text_keys: dict[str, str] = {}

    def _resolution_buckets(self, resolution: int) -> list[Size]:
        settings = self.settings
        if not settings.bucketing:
            return [(resolution, resolution)]
        return make_buckets(
            resolution, step=settings.bucket_step, min_side=settings.bucket_min, max_side=settings.bucket_max
        )

    def __len__(self) -> int:
        return len(self.item_records)

    def summary(self) -> str:
        """One line for the log, e.g. ``24 items from 12 images in 2 buckets: 64x64 ×20, 80x48 ×4``."""
        counts: dict[int, int] = {}
        for bucket in self.bucket_ids:
            counts[bucket] = counts.get(bucket, 0) + 1
        buckets = ", ".join(f"{self.buckets[b][0]}x{self.buckets[b][1]} ×{n}" for b, n in sorted(counts.items()))
        line = f"{len(self)} items from {self.images} images in {len(counts)} buckets: {buckets}"
        if len(self.concepts) > 1:
            parts = (f"{self.concepts[c].name} ×{n}" for c, n in self.concept_items().items())
            line += "; concepts: " + ", ".join(parts)
        return line

    def concept_items(self) -> dict[int, int]:
        """Items per epoch of each concept (folder index): its images × its repeats."""
        counts: dict[int, int] = {}
        for record_index in self.item_records:
            concept = self.records[record_index].concept
            counts[concept] = counts.get(concept, 0) + 1
        return dict(sorted(counts.items()))

    def concept_of(self, record: ImageRecord) -> Concept:
        return self.concepts[record.concept]

    def largest_size(self) -> Size:
        """The largest (by area) image size this dataset trains at."""
        return max((self.buckets[b] for b in set(self.record_buckets)), key=lambda s: s[0] * s[1])

    def upscaled(self) -> list[tuple[ImageRecord, Size, float]]:
        """(record, bucket, factor) of every image enlarged to fill its bucket (only with upscale: true)."""
        out = [(r, self.bucket_size(i), upscale_factor(r.size, self.bucket_size(i)))
               for i, r in enumerate(self.records)]  # fmt: skip
        return [item for item in out if item[2] > 1.0]

    def below_resolution(self) -> list[ImageRecord]:
        """Images smaller than their bucket, trained at their own size (upscale: false)."""
        return [self.records[i] for i in self.shrunk]

    def bucket_size(self, record_index: int) -> Size:
        return self.buckets[self.record_buckets[record_index]]

    def __getitem__(self, key: SampleKey | int) -> dict[str, Any]:
        epoch, position, index = key if isinstance(key, tuple) else (0, -1, int(key))
        record_index = self.item_records[index]
        record = self.records[record_index]
        target = self.bucket_size(record_index)
        if self.random_crop:
            plan = plan_crop(record.size, target, random_crop=True, rng=item_rng(self.seed, epoch, index, Stream.CROP))
        else:
            plan = plan_crop(record.size, target)
        flipped = (
            self.flip_probability > 0
            and item_rng(self.seed, epoch, index, Stream.FLIP).random() < self.flip_probability
        )
        concept = self.concept_of(record)
        if self.augment:
            caption = process_caption(
                record.caption,
                item_rng(self.seed, epoch, index, Stream.CAPTION),
                dropout=concept.caption_dropout,
                shuffle=concept.shuffle_tags,
                keep_tokens=concept.keep_tokens,
                prefix=concept.prefix,
            )
        else:
            caption = with_prefix(concept.prefix, record.caption)
        item: dict[str, Any] = {
            "caption": caption,
            "original_size": (record.size[1], record.size[0]),
            "crop_top_left": plan.crop_top_left,
            "target_size": (target[1], target[0]),
            "flipped": flipped,
            "path": str(record.path),
            "index": index,
            "epoch": epoch,
            "position": position,
            # validation measures the plain loss: no concept weight, no prior target
            "loss_weight": concept.loss_weight if self.augment else 1.0,
            "prior_prediction": concept.prior_prediction and self.augment,
        }
        if position >= 0:  # came from the sampler: its state after this batch, for checkpoints
            item["sampler_state"] = {
                "epoch": epoch,
                "position": position + 1,
                "seed": self.seed,
                "num_items": len(self),
            }
        if self._latent_cache is not None:
            item["latents"] = self._latent_cache.get(self._latent_keys[(record_index, flipped)])["latents"]
        else:
            item["pixel_values"] = self._pixels(record, plan, flipped)
        if self._text_cache is not None:
            item["text_embeddings"] = self._text_cache.get(self._text_keys[caption])
        if self.masks is not None:  # same crop plan and flip as the pixels / cached latents
            item["mask_weights"] = mask_weights(record.path, plan, flipped, self.masks)
        return item

    def _pixels(self, record: ImageRecord, plan: CropPlan, flipped: bool) -> torch.Tensor:
        image = apply_crop(load_image(record.path), plan)
        if flipped:
            image = ImageOps.mirror(image)
        return to_tensor(image)

    # ----------------------------------------------------------------------- caches

    def cache_latents(
        self,
        encode_images: EncodeImages,
        *,
        encoder_id: str,
        cache_dir: str | Path,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 8,
        in_memory: bool = False,
    ) -> CacheStats:
        """Encode every image (both flip states when flipping) once, reusing entries already on disk.

        ``encode_images`` gets (B, C, H, W) float32 pixels in [-1, 1] of one bucket and returns
        (B, c, h, w) latents (already scaled as the loop wants them). From now on items carry
        ``latents`` instead of ``pixel_values``. A fully cached dataset never calls the encoder.
        """
        if self.random_crop:
            raise ValueError("data.cache_latents cannot be combined with random crop (every epoch crops differently)")
        cache = DiskCache(cache_dir, "latents", in_memory=in_memory)
        flips = (False, True) if self.flip_probability > 0 else (False,)
        stats = CacheStats()
        missing: dict[int, list[tuple[int, bool, str]]] = {}
        for record_index, record in enumerate(self.records):
            plan = plan_crop(record.size, self.bucket_size(record_index))
            for flip in flips:
                key = settings_key(
                    kind="latents",
                    content=content_hash(record.path),
                    resized=plan.resized,
                    target=plan.target,
                    crop_top_left=plan.crop_top_left,
                    flip=flip,
                    encoder=encoder_id,
                    dtype=dtype_name(dtype),
                )
                self._latent_keys[(record_index, flip)] = key
                if cache.has(key):
                    stats.hits += 1
                    if in_memory:
                        cache.get(key)
                else:
                    missing.setdefault(self.record_buckets[record_index], []).append((record_index, flip, key))
        for jobs in missing.values():
            for start in range(0, len(jobs), batch_size):
                chunk = jobs[start : start + batch_size]
                pixels = torch.stack(
                    [
                        self._pixels(self.records[r], plan_crop(self.records[r].size, self.bucket_size(r)), flip)
                        for r, flip, _ in chunk
                    ]
                )
                with torch.no_grad():
                    latents = encode_images(pixels)
                if not isinstance(latents, torch.Tensor) or latents.shape[0] != len(chunk):
                    raise ValueError(
                        f"encode_images must return a tensor with {len(chunk)} rows, got {_describe(latents)}"
                    )
                for row, (r, flip, key) in enumerate(chunk):
                    cache.put(
                        key, {"latents": latents[row].to(dtype)}, {"path": str(self.records[r].path), "flip": str(flip)}
                    )
                stats.encoded += len(chunk)
        self._latent_cache = cache
        return stats

    def cache_text_embeddings(
        self,
        encode_captions: EncodeCaptions,
        *,
        encoder_id: str,
        cache_dir: str | Path,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
        in_memory: bool = False,
        train_text_encoders: bool = False,
    ) -> CacheStats:
        """Encode every distinct caption (and the empty one when caption dropout is on) once.

        ``encode_captions`` gets a list of captions and returns a dict of tensors whose first
        dimension is the number of captions (e.g. SDXL's ``prompt_embeds`` and ``pooled``). From
        now on items carry ``text_embeddings``: that dict for their (possibly dropped) caption.
        """
        if train_text_encoders:
            raise ValueError(
                "data.cache_text_embeddings cannot be used while training a text encoder (they would go stale)"
            )
        concepts = self.concepts.values()
        if self.augment and any(c.shuffle_tags for c in concepts):
            raise ValueError(
                "data.cache_text_embeddings cannot follow data.shuffle_tags "
                "(each shuffle is a new caption): turn one off"
            )
        cache = DiskCache(cache_dir, "text", in_memory=in_memory)
        captions = {with_prefix(self.concept_of(r).prefix, r.caption) for r in self.records}
        if self.augment and any(c.caption_dropout > 0 for c in concepts):
            captions.add("")
        stats = CacheStats()
        missing: list[tuple[str, str]] = []
        for caption in sorted(captions):
            key = settings_key(kind="text", caption=caption, encoder=encoder_id, dtype=dtype_name(dtype))
            self._text_keys[caption] = key
            if cache.has(key):
                stats.hits += 1
                if in_memory:
                    cache.get(key)
            else:
                missing.append((caption, key))
        for start in range(0, len(missing), batch_size):
            chunk = missing[start : start + batch_size]
            with torch.no_grad():
                outputs = encode_captions([caption for caption, _ in chunk])
            if not isinstance(outputs, Mapping) or not all(
                isinstance(v, torch.Tensor) and v.shape[0] == len(chunk) for v in outputs.values()
            ):
                raise ValueError(
                    f"encode_captions must return a dict of tensors with {len(chunk)} rows, got {_describe(outputs)}"
                )
            for row, (caption, key) in enumerate(chunk):
                cache.put(key, {name: value[row].to(dtype) for name, value in outputs.items()}, {"caption": caption})
            stats.encoded += len(chunk)
        self._text_cache = cache
        return stats

    # ----------------------------------------------------------------------- loading

    def batch_sampler(
        self, batch_size: int, *, shuffle: bool = True, drop_last: bool = False, num_replicas: int = 1, rank: int = 0
    ) -> BucketBatchSampler:
        return BucketBatchSampler(
            self.bucket_ids,
            batch_size,
            seed=self.seed,
            shuffle=shuffle,
            drop_last=drop_last,
            num_replicas=num_replicas,
            rank=rank,
        )

    def dataloader(
        self,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        num_workers: int | None = None,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> DataLoader:
        """A DataLoader of same-bucket batches; its ``batch_sampler`` has state_dict()/load_state_dict()."""
        workers = self.settings.num_workers if num_workers is None else num_workers
        sampler = self.batch_sampler(
            batch_size, shuffle=shuffle, drop_last=drop_last, num_replicas=num_replicas, rank=rank
        )
        return DataLoader(
            self, batch_sampler=sampler, collate_fn=collate_batch, num_workers=workers, persistent_workers=False
        )


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in value.items()) + "}"
    return type(value).__name__


def collate_batch(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack items of one bucket: tensors batched, sizes as (B, 2) int64, captions/paths as lists.

    ``sampler_state`` (when the items came from a BucketBatchSampler) is the sampler state right
    after this batch: store it with a checkpoint to resume with the next batch.
    """
    if not items:
        raise ValueError("cannot collate an empty batch")
    first = items[0]
    batch: dict[str, Any] = {
        "caption": [item["caption"] for item in items],
        "path": [item["path"] for item in items],
        "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
        "flipped": torch.tensor([item["flipped"] for item in items], dtype=torch.bool),
        "loss_weight": torch.tensor([item.get("loss_weight", 1.0) for item in items], dtype=torch.float32),
        "prior_prediction": torch.tensor([item.get("prior_prediction", False) for item in items], dtype=torch.bool),
    }
    for name in ("original_size", "crop_top_left", "target_size"):
        batch[name] = torch.tensor([item[name] for item in items], dtype=torch.long)
    for name in ("pixel_values", "latents", "mask_weights"):
        if name in first:
            batch[name] = torch.stack([item[name] for item in items])
    if "text_embeddings" in first:
        batch["text_embeddings"] = {
            k: torch.stack([item["text_embeddings"][k] for item in items]) for k in first["text_embeddings"]
        }
    if "sampler_state" in first:
        batch["sampler_state"] = first["sampler_state"]
    return batch


# --------------------------------------------------------------------------- building from config


def build_dataset(data_cfg: Any, *, seed: int, exclude: Collection[Path] = ()) -> TrainDataset:
    """The training dataset of the config's ``data:`` section (images in ``exclude`` left out)."""
    settings = DataSettings.from_config(data_cfg)
    records = scan_folders(settings.folders, settings.caption_extension)
    if exclude:
        excluded = {Path(p).resolve() for p in exclude}
        records = [r for r in records if r.path.resolve() not in excluded]
    return TrainDataset(_masked(records, settings), settings, seed=seed)


def build_datasets(data_cfg: Any, validation_cfg: Any = None, *, seed: int) -> tuple[TrainDataset, TrainDataset | None]:
    """(train, validation) datasets; validation from ``validation.folder``, ``validation.split_fraction`` or none.

    A split holds out a deterministic fraction of the training folders' images (chosen by
    ``validation.seed``) and removes them from training. Validation items are never augmented.
    """
    settings = DataSettings.from_config(data_cfg)
    folder = _get(validation_cfg, "folder")
    fraction = _get(validation_cfg, "split_fraction")
    if folder is not None and fraction is not None:
        raise ValueError("validation: set only one of folder and split_fraction")
    records = scan_folders(settings.folders, settings.caption_extension)
    val_records: list[ImageRecord] | None = None
    if folder is not None:
        val_records = [  # a concept of its own: the data section's captions, plain loss
            replace(r, concept=-1) for r in scan_folders([FolderSpec(Path(folder))], settings.caption_extension)
        ]
    elif fraction is not None:  # held out from the trained concepts only (never regularization images)
        trained = {i for i, f in enumerate(settings.folders) if f.role != "regularization"}
        unique = list({r.path: r for r in records if r.concept in trained}.values())
        _, val_records = split_records(unique, float(fraction), int(_get(validation_cfg, "seed") or 0))
        held = {r.path for r in val_records}
        records = [r for r in records if r.path not in held]
        val_records = [ImageRecord(r.path, r.size, r.caption, 1, r.concept) for r in val_records]
    train = TrainDataset(_masked(records, settings), settings, seed=seed)
    val = TrainDataset(val_records, settings, seed=seed, augment=False) if val_records else None
    return train, val


def _masked(records: list[ImageRecord], settings: DataSettings) -> list[ImageRecord]:
    """With masked loss: the records that have a mask (the others skipped with a warning each)."""
    if settings.masked_loss is None:
        return records
    kept = [r for r in records if check_mask(r.path, settings.masked_loss)]
    if not kept:
        raise ValueError(f"data.masked_loss: none of the {len(records)} training images has a mask")
    return kept


def _get(cfg: Any, name: str) -> Any:
    if cfg is None:
        return None
    return cfg.get(name) if isinstance(cfg, Mapping) else getattr(cfg, name, None)
