"""Data pipeline: scanning, buckets and crops, seeded augmentation, sampler resume, validation split."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tuneonce.data import synthetic
from tuneonce.data.buckets import assign_bucket, make_buckets, plan_crop
from tuneonce.data.captions import process_caption, shuffle_tags
from tuneonce.data.dataset import DataSettings, FolderSpec, TrainDataset, build_datasets, scan_folders
from tuneonce.data.sampler import BucketBatchSampler


def _settings(*folders: Path, **overrides) -> DataSettings:
    base = dict(resolution=32, bucketing=True, bucket_step=8, bucket_min=16, bucket_max=64)
    base.update(overrides)
    return DataSettings(folders=tuple(FolderSpec(f) if isinstance(f, Path) else f for f in folders), **base)


def _dataset(folder: Path, *, seed: int = 0, **overrides) -> TrainDataset:
    settings = _settings(folder, **overrides)
    return TrainDataset(scan_folders(settings.folders, settings.caption_extension), settings, seed=seed)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Nine square and three wide synthetic images with captions."""
    folder = tmp_path_factory.mktemp("images")
    synthetic.write_pretrain_dataset(folder, count=9, size=32, seed=0)
    wide = synthetic.write_concept_dataset(folder / "wide_src", count=3, size=(64, 32), seed=1)
    for i, path in enumerate(wide):  # move next to the square ones under new names
        path.rename(folder / f"wide{i}.png")
        path.with_suffix(".txt").rename(folder / f"wide{i}.txt")
    return folder


# --------------------------------------------------------------------------- scanning


def test_bad_files_are_skipped_with_one_warning_each(tmp_path, caplog):
    synthetic.write_pretrain_dataset(tmp_path, count=2, size=16)
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    good = (tmp_path / "0000.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    Image.new("RGB", (16, 16)).save(tmp_path / "anim.gif")
    (tmp_path / "notes.md").write_text("hello")
    (tmp_path / ".hidden.png").write_bytes(b"junk")  # hidden files are ignored silently
    (tmp_path / "sub").mkdir()
    with caplog.at_level(logging.WARNING, logger="tuneonce.data"):
        records = scan_folders([FolderSpec(tmp_path)])
    assert [r.path.name for r in records] == ["0000.png", "0001.png"]
    messages = [r.getMessage() for r in caplog.records]
    for name in ("broken.png", "truncated.png", "anim.gif", "notes.md"):
        assert sum(name in m for m in messages) == 1, (name, messages)
    assert len(messages) == 4


def test_missing_caption_uses_folder_default_and_jpg_with_exif_rotation(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90°: the stored 40x20 displays as 20x40
    image.save(tmp_path / "photo.jpg", exif=exif)
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    (tmp_path / "clear.txt").write_text("  a\nclear   image \n")
    records = scan_folders([FolderSpec(tmp_path, default_caption="a default")])
    by_name = {r.path.name: r for r in records}
    assert by_name["photo.jpg"].caption == "a default"
    assert by_name["photo.jpg"].size == (20, 40)
    assert by_name["clear.png"].caption == "a clear image"
    item = TrainDataset(records, _settings(tmp_path, bucketing=False, resolution=16), seed=0)[0]
    assert item["path"].endswith("clear.png")
    assert torch.allclose(item["pixel_values"], torch.ones(3, 16, 16))  # transparent → white


def test_empty_dataset_names_the_folders(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "only.txt").write_text("caption without image")
    with pytest.raises(ValueError, match=r"no usable images.*[/\\]a, .*[/\\]b"):
        scan_folders([FolderSpec(tmp_path / "a"), FolderSpec(tmp_path / "b")])
    with pytest.raises(FileNotFoundError, match="missing"):
        scan_folders([FolderSpec(tmp_path / "missing")])


# --------------------------------------------------------------------------- buckets and crops


def test_buckets_follow_area_step_and_side_limits():
    buckets = make_buckets(1024, step=64, min_side=512, max_side=2048)
    assert (1024, 1024) in buckets
    for width, height in buckets:
        assert width % 64 == 0 and height % 64 == 0
        assert 512 <= width <= 2048 and 512 <= height <= 2048
        assert width * height <= 1024 * 1024
        assert (height, width) in buckets
    # the widest grid height for width 1216 is 832 (1216·832 ≤ 1024² < 1216·896), SDXL's usual bucket
    assert (1216, 832) in buckets and (1216, 896) not in buckets
    with pytest.raises(ValueError, match="multiple of 8"):
        make_buckets(1024, step=60)


def test_bucket_assignment_and_center_crop_by_hand():
    buckets = [(16, 64), (32, 32), (48, 16), (64, 16)]
    assert assign_bucket(200, 100, buckets) == 2  # 2:1 is closer to 3:1 than to 1:1 or 4:1 in log scale
    assert assign_bucket(30, 31, buckets) == 1
    assert assign_bucket(10, 45, buckets) == 0
    plan = plan_crop((100, 40), (64, 64))  # scale 1.6 → 160x64, centered → left 48
    assert plan.resized == (160, 64) and plan.crop_top_left == (0, 48)
    rng = np.random.default_rng(0)
    tops_lefts = {plan_crop((100, 40), (64, 64), random_crop=True, rng=rng).crop_top_left for _ in range(50)}
    assert all(top == 0 and 0 <= left <= 96 for top, left in tops_lefts) and len(tops_lefts) > 5


def test_items_fit_their_bucket_and_record_sdxl_conditioning(images):
    dataset = _dataset(images)
    wide = [i for i, r in enumerate(dataset.records) if r.path.name.startswith("wide")]
    square = [i for i, r in enumerate(dataset.records) if not r.path.name.startswith("wide")]
    assert {dataset.bucket_size(i) for i in square} == {(32, 32)}
    assert {dataset.bucket_size(i) for i in wide} == {(40, 24)}  # 2:1 → closest bucket with area ≤ 32²
    item = dataset[wide[0]]
    assert item["pixel_values"].shape == (3, 24, 40)
    assert item["original_size"] == (32, 64) and item["target_size"] == (24, 40)
    assert item["crop_top_left"] == (0, 4)  # 64x32 scaled to 48x24, 8 spare columns centered
    assert -1.0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1.0
    assert dataset.summary() == "12 items from 12 images in 2 buckets: 32x32 ×9, 40x24 ×3"
    off = _dataset(images, bucketing=False)
    assert {off.bucket_size(i) for i in range(len(off.records))} == {(32, 32)}
    assert off[wide[0]]["crop_top_left"] == (0, 16)


# --------------------------------------------------------------------------- sampler


def _epoch(sampler: BucketBatchSampler) -> list[list[int]]:
    return [[key.index for key in batch] for batch in sampler]


def test_sampler_batches_share_a_bucket_and_cover_each_item_once():
    bucket_ids = [0, 1, 0, 2, 1, 0, 0, 2, 1, 0]
    sampler = BucketBatchSampler(bucket_ids, 2, seed=5)
    batches = _epoch(sampler)
    assert len(batches) == len(sampler) == 6
    assert sorted(i for b in batches for i in b) == list(range(10))
    assert all(len({bucket_ids[i] for i in b}) == 1 for b in batches)
    again = BucketBatchSampler(bucket_ids, 2, seed=5)
    assert _epoch(again) == batches
    second = _epoch(again)
    assert second == _epoch(sampler) and second != batches  # both now in epoch 1, reshuffled
    assert _epoch(BucketBatchSampler(bucket_ids, 2, seed=6)) != batches
    assert len(_epoch(BucketBatchSampler(bucket_ids, 2, drop_last=True))) == 4


def test_sampler_resumes_with_exactly_the_next_batch():
    bucket_ids = [i % 3 for i in range(23)]
    reference = BucketBatchSampler(bucket_ids, 3, seed=1)
    full = _epoch(reference) + _epoch(reference) + _epoch(reference)
    for stop in (0, 4, 9, 11):  # 9 batches per epoch: 9 stops exactly at an epoch boundary
        run = BucketBatchSampler(bucket_ids, 3, seed=1)
        seen, it = [], iter(run)
        while len(seen) < stop:
            try:
                seen.append([k.index for k in next(it)])
            except StopIteration:
                it = iter(run)
        resumed = BucketBatchSampler(bucket_ids, 3, seed=1)
        resumed.load_state_dict(run.state_dict())
        rest = _epoch(resumed)
        while len(seen) + len(rest) < len(full):
            rest += _epoch(resumed)
        assert seen + rest == full, stop
    with pytest.raises(ValueError, match="seed 1"):
        BucketBatchSampler(bucket_ids, 3, seed=2).load_state_dict(reference.state_dict())
    with pytest.raises(ValueError, match="23 items then, 24 now"):
        BucketBatchSampler([*bucket_ids, 0], 3, seed=1).load_state_dict(reference.state_dict())


def test_two_ranks_see_the_global_batch_of_one_process():
    bucket_ids = [i % 2 for i in range(20)]
    single = _epoch(BucketBatchSampler(bucket_ids, 4, seed=3, drop_last=True))
    ranks = [_epoch(BucketBatchSampler(bucket_ids, 2, seed=3, num_replicas=2, rank=r)) for r in range(2)]
    assert [a + b for a, b in zip(*ranks, strict=True)] == single


def test_dataloader_resume_from_batch_state(images):
    dataset = _dataset(images, random_flip=True, caption_dropout=0.3)
    loader = dataset.dataloader(batch_size=2)
    reference = [b for _ in range(2) for b in loader]
    resumed_loader = _dataset(images, random_flip=True, caption_dropout=0.3).dataloader(batch_size=2)
    resumed_loader.batch_sampler.load_state_dict(reference[7]["sampler_state"])
    resumed = [b for _ in range(2) for b in resumed_loader][: len(reference) - 8]
    # a worker process draws the same augmentations: they depend on (seed, epoch, index) only
    with_worker = list(_dataset(images, random_flip=True, caption_dropout=0.3).dataloader(batch_size=2, num_workers=1))
    for expected, got in [*zip(reference[8:], resumed, strict=True), *zip(reference, with_worker, strict=False)]:
        assert got["path"] == expected["path"] and got["caption"] == expected["caption"]
        assert torch.equal(got["pixel_values"], expected["pixel_values"])
        assert torch.equal(got["crop_top_left"], expected["crop_top_left"])


# --------------------------------------------------------------------------- augmentation


def test_caption_dropout_and_shuffle_are_seeded_and_keep_tokens():
    caption = "zxq, star, magenta, stripes, white background, centered"
    draws = [
        process_caption(caption, np.random.default_rng([7, i]), dropout=0.3, shuffle=True, keep_tokens=2)
        for i in range(400)
    ]
    again = [
        process_caption(caption, np.random.default_rng([7, i]), dropout=0.3, shuffle=True, keep_tokens=2)
        for i in range(400)
    ]
    assert draws == again
    assert 0.22 < draws.count("") / len(draws) < 0.38
    kept = [d for d in draws if d]
    assert all(d.startswith("zxq, star, ") for d in kept)
    assert all(sorted(d.split(", ")) == sorted(caption.split(", ")) for d in kept)
    assert len(set(kept)) > 10  # the four movable tags really move
    assert shuffle_tags("a, b", np.random.default_rng(0), keep_tokens=5) == "a, b"


def test_dataset_augmentation_reproducible_per_seed_and_epoch(tmp_path):
    (tmp_path / "img.png").write_bytes(b"")  # replaced below
    Image.fromarray(np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)).save(tmp_path / "img.png")
    (tmp_path / "img.txt").write_text("one, two, three, four, five")
    folder = FolderSpec(tmp_path, repeats=40)
    kwargs = dict(
        resolution=16, bucketing=False, random_flip=0.5, caption_dropout=0.2, shuffle_tags=True, keep_tokens=1
    )

    def items(seed: int, epoch: int) -> list[tuple[str, bool]]:
        dataset = TrainDataset(scan_folders([folder]), _settings(folder, **kwargs), seed=seed)
        sampler = dataset.batch_sampler(1, shuffle=False)
        sampler.start_epoch(epoch)
        return [(dataset[b[0]]["caption"], dataset[b[0]]["flipped"]) for b in sampler]

    first = items(0, 0)
    assert items(0, 0) == first
    assert items(0, 1) != first and items(1, 0) != first
    flips = [f for _, f in first]
    assert 5 < sum(flips) < 35
    assert all(c == "" or c.startswith("one, ") for c, _ in first)
    dataset = TrainDataset(scan_folders([folder]), _settings(folder, **kwargs), seed=0)
    flipped = next(i for i, (_, f) in enumerate(first) if f)
    plain = next(i for i, (_, f) in enumerate(first) if not f)
    assert torch.equal(dataset[flipped]["pixel_values"], dataset[plain]["pixel_values"].flip(-1))


# --------------------------------------------------------------------------- validation and config


def test_validation_split_is_deterministic_disjoint_and_unaugmented(images):
    data = {
        "folders": [{"path": str(images), "repeats": 2}],
        "resolution": 32,
        "bucket_step": 8,
        "bucket_min": 16,
        "bucket_max": 64,
        "random_flip": True,
        "caption_dropout": 1.0,
    }
    train, val = build_datasets(data, {"split_fraction": 0.25, "seed": 4}, seed=0)
    train2, val2 = build_datasets(data, {"split_fraction": 0.25, "seed": 4}, seed=0)
    assert val is not None and val2 is not None
    held = {r.path for r in val.records}
    assert held == {r.path for r in val2.records} and len(held) == 3
    assert not held & {r.path for r in train.records} and len(train) == 2 * 9
    assert all(val[i]["caption"] and not val[i]["flipped"] for i in range(len(val)))
    assert all(train[i]["caption"] == "" for i in range(len(train)))  # dropout 1.0 applies to training only
    _, other = build_datasets(data, {"split_fraction": 0.25, "seed": 5}, seed=0)
    assert {r.path for r in other.records} != held
    _, folder_val = build_datasets(data, {"folder": str(images)}, seed=0)
    assert len(folder_val) == 12


def test_settings_from_pydantic_config(images):
    schema = pytest.importorskip("tuneonce.config.schema")
    cfg = schema.DataConfig(
        folders=[{"path": str(images), "repeats": 3, "default_caption": "shape"}],
        resolution=32,
        random_flip=True,
        random_crop=True,
        bucket_step=8,
        bucket_min=16,
        bucket_max=64,
        keep_tokens=2,
    )
    settings = DataSettings.from_config(cfg)
    assert settings.folders == (FolderSpec(images, 3, "shape"),)
    assert settings.random_flip == 0.5 and settings.random_crop and settings.keep_tokens == 2
    assert settings.bucket_step == 8 and settings.resolution == 32
    train, val = build_datasets(cfg, schema.ValidationConfig(), seed=0)
    assert val is None and len(train) == 36


# --------------------------------------------------------------------------- synthetic


def test_synthetic_datasets_are_deterministic(tmp_path):
    first = synthetic.write_concept_dataset(tmp_path / "a", count=3, size=24, seed=2)
    second = synthetic.write_concept_dataset(tmp_path / "b", count=3, size=24, seed=2)
    third = synthetic.write_concept_dataset(tmp_path / "c", count=3, size=24, seed=3)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    assert [p.read_bytes() for p in first] != [p.read_bytes() for p in third]
    captions = [p.with_suffix(".txt").read_text().strip() for p in first]
    assert all(c.startswith(f"a {synthetic.TRIGGER_WORD} star") for c in captions)
    vocabulary = set(synthetic.caption_vocabulary())
    pretrain = synthetic.write_pretrain_dataset(tmp_path / "p", count=6, size=24)
    for path in pretrain + first:
        assert set(path.with_suffix(".txt").read_text().split()) <= vocabulary
    magenta = np.array(synthetic.COLORS["magenta"])
    pixels = np.asarray(Image.open(first[0])).reshape(-1, 3)
    assert (np.abs(pixels - magenta).sum(1) < 30).any()  # the concept colour is really drawn
    with pytest.raises(ValueError, match="shapes"):
        synthetic.Concept("bad", shapes=("hexagon",), colors=("red",), backgrounds=("white",))


def test_small_images_train_at_their_own_size_unless_upscale(tmp_path):
    """kohya's bucket_no_upscale: an image smaller than its bucket gets a bucket of its own size (same aspect, sides
    on the grid of 8); data.upscale: true enlarges it as before."""
    from tuneonce.data.buckets import fit_within

    assert fit_within((1024, 1024), (64, 64)) == (64, 64)
    assert fit_within((1152, 896), (300, 200)) == (256, 200)  # scale min(300/1152, 200/896), floored to 8
    assert fit_within((512, 512), (800, 600)) == (512, 512)  # already covered: unchanged
    Image.new("RGB", (64, 64), (255, 0, 0)).save(tmp_path / "small.png")
    Image.new("RGB", (1200, 1200), (0, 255, 0)).save(tmp_path / "large.png")
    records = scan_folders([FolderSpec(tmp_path)])
    kept = TrainDataset(records, DataSettings(folders=(FolderSpec(tmp_path),), resolution=512, bucketing=False), seed=0)
    sizes = {r.path.name: kept.bucket_size(i) for i, r in enumerate(kept.records)}
    assert sizes == {"small.png": (64, 64), "large.png": (512, 512)}
    assert [r.path.name for r in kept.below_resolution()] == ["small.png"] and kept.upscaled() == []
    assert kept[0]["pixel_values"].shape[-2:] == (512, 512) and kept[1]["pixel_values"].shape[-2:] == (64, 64)
    settings = DataSettings(folders=(FolderSpec(tmp_path),), resolution=512, bucketing=False, upscale=True)
    enlarged = TrainDataset(records, settings, seed=0)
    assert {enlarged.bucket_size(i) for i in range(2)} == {(512, 512)} and enlarged.below_resolution() == []
    [(record, bucket, factor)] = enlarged.upscaled()
    assert record.path.name == "small.png" and bucket == (512, 512) and factor == 8.0
