"""Training data: image folders with captions, aspect buckets, seeded augmentation, caches, batching."""

from tuneonce.data.buckets import assign_bucket, make_buckets, plan_crop
from tuneonce.data.cache import CacheStats, DiskCache, content_hash
from tuneonce.data.captions import process_caption, shuffle_tags
from tuneonce.data.dataset import (
    DataSettings,
    FolderSpec,
    ImageRecord,
    TrainDataset,
    build_dataset,
    build_datasets,
    collate_batch,
    scan_folders,
    split_records,
)
from tuneonce.data.sampler import BucketBatchSampler, SampleKey

__all__ = [
    "BucketBatchSampler",
    "CacheStats",
    "DataSettings",
    "DiskCache",
    "FolderSpec",
    "ImageRecord",
    "SampleKey",
    "TrainDataset",
    "assign_bucket",
    "build_dataset",
    "build_datasets",
    "collate_batch",
    "content_hash",
    "make_buckets",
    "plan_crop",
    "process_caption",
    "scan_folders",
    "shuffle_tags",
    "split_records",
]
