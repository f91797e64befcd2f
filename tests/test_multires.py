"""Multi-resolution training (data.resolutions): every image at each resolution in that resolution's buckets, batches
of one size only, latents cached per size (two sizes of one image never confused) and reused by a second run."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tuneonce.config import validate_dict
from tuneonce.data.dataset import build_dataset
from tuneonce.data.synthetic import write_concept_dataset
from tuneonce.model.tiny import tiny_pipeline_dir
from tuneonce.trainer import loop
from tuneonce.trainer.train import train
from tests.builders import concept_data_dirs, tiny_train_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Three square 64 px images and two landscape 96x64 ones."""
    root = tmp_path_factory.mktemp("multires")
    write_concept_dataset(root, count=3, size=64, seed=1)
    wide = write_concept_dataset(root / "wide", count=2, size=(96, 64), seed=2)
    for path in wide:
        path.rename(root / f"w{path.name}")
        path.with_suffix(".txt").rename(root / f"w{path.stem}.txt")
    return root


def data_config(folder: Path, **overrides) -> dict:
    return {"folders": [{"path": str(folder), "repeats": 2}], "resolutions": [32, 64], "bucketing": True,
            "bucket_step": 16, "bucket_min": 16, "bucket_max": 128, **overrides}


def test_every_image_at_every_resolution_and_batches_of_one_size(images):
    dataset = build_dataset(data_config(images), seed=0)
    assert len(dataset) == 5 * 2 * 2  # images × repeats × resolutions
    seen: Counter = Counter()
    sizes = set()
    for epoch in range(2):
        for batch in dataset.dataloader(batch_size=3):  # collating stacks the pixels: one size per batch
            assert len({tuple(s) for s in batch["target_size"].tolist()}) == 1
            sizes.add(tuple(batch["pixel_values"].shape[-2:]))
            seen.update((Path(p).name, tuple(batch["pixel_values"].shape[-2:])) for p in batch["path"])
    # squares at 32x32 and 64x64, landscapes in each resolution's wide bucket; each twice (repeats) per epoch
    for name, count in seen.items():
        assert count == 2 * 2, name
    sizes_per_image = Counter(name for name, _ in seen)  # seen's keys: (image, size)
    assert len(sizes_per_image) == 5 and set(sizes_per_image.values()) == {2}  # two sizes each
    # (h, w): the wide images take 80x48 at 64 and the square 32x32 bucket at 32 (no 16 px-high bucket is closer)
    assert sizes == {(32, 32), (64, 64), (48, 80)}


def test_a_small_image_trains_once_at_its_own_size(images, tmp_path):
    write_concept_dataset(tmp_path, count=1, size=24, seed=3)
    dataset = build_dataset(data_config(tmp_path, resolutions=[32, 64, 96], bucketing=False), seed=0)
    # at 32, 64 and 96 it would be enlarged: with upscale false it trains at 24x24, once
    assert [dataset.bucket_size(i) for i in range(len(dataset.records))] == [(24, 24)]
    up = build_dataset(data_config(tmp_path, resolutions=[32, 64], bucketing=False, upscale=True), seed=0)
    assert [up.bucket_size(i) for i in range(len(up.records))] == [(32, 32), (64, 64)]


def encoder(calls: list[int]):
    def encode(pixels: torch.Tensor) -> torch.Tensor:  # a stand-in VAE: 8x downsampling, 4 channels
        calls.append(pixels.shape[0])
        return F.avg_pool2d(pixels, 8).repeat(1, 2, 1, 1)[:, :4]

    return encode


def test_latents_are_cached_per_size_and_reused(images, tmp_path):
    calls: list[int] = []
    first = build_dataset(data_config(images), seed=0)
    stats = first.cache_latents(encoder(calls), encoder_id="stand-in", cache_dir=tmp_path)
    assert stats.encoded == len(first.records) == 10 and stats.hits == 0
    by_image: dict[str, list[torch.Tensor]] = {}
    for i in range(len(first)):
        item = first[i]
        latents = item["latents"]
        assert latents.shape[-2:] == (item["target_size"][0] // 8, item["target_size"][1] // 8)
        by_image.setdefault(item["path"], []).append(latents)
    for path, latents in by_image.items():
        shapes = {tuple(x.shape) for x in latents}
        assert len(shapes) == 2, path  # both sizes of one image, each its own entry
    calls.clear()
    second = build_dataset(data_config(images), seed=0)
    stats = second.cache_latents(encoder(calls), encoder_id="stand-in", cache_dir=tmp_path)
    assert (stats.encoded, stats.hits, calls) == (0, 10, [])
    assert all(torch.equal(first[i]["latents"], second[i]["latents"]) for i in range(len(first)))
    single = build_dataset(data_config(images, resolutions=[64]), seed=0)  # the 64 px entries are shared
    stats = single.cache_latents(encoder(calls), encoder_id="stand-in", cache_dir=tmp_path)
    assert (stats.encoded, stats.hits) == (0, 5)


def test_resolutions_are_checked():
    base = {"model": {"family": "sd15", "base_model": "x"}, "schedule": {"max_steps": 1}}
    assert validate_dict({**base, "data": {"folders": [{"path": "d"}], "resolutions": [512, 768]}}) == []
    problems = validate_dict({**base, "data": {"folders": [{"path": "d"}], "resolutions": [512, 700, 512]}})
    assert [key for key, _ in problems] == ["data.resolutions", "data.resolutions"]
    assert "700" in problems[0][1]
    assert [k for k, _ in validate_dict({**base, "data": {"folders": [{"path": "d"}], "resolutions": []}})] == [
        "data.resolutions"
    ]


def test_a_run_trains_at_both_resolutions(tmp_path_factory):
    base = tiny_pipeline_dir("sd15", tmp_path_factory)
    data = concept_data_dirs(tmp_path_factory.mktemp("data"), train_count=2)
    out = tmp_path_factory.mktemp("out")
    shapes: list[tuple[int, ...]] = []
    real = loop.batch_latents

    def recording(parts, batch):
        latents = real(parts, batch)
        shapes.append(tuple(latents.shape))
        return latents

    loop.batch_latents = recording
    try:
        config = tiny_train_config("sd15", base, data, out, data={"resolutions": [32, 64]},
                                   schedule={"max_steps": 4}, training={"batch_size": 2, "seed": 3})
        result = train(config, show_progress=False)
    finally:
        loop.batch_latents = real
    assert result.steps == 4
    small, large = sorted({s[-2:] for s in shapes})  # latents of 32 and 64 px (one size per batch)
    assert large == (2 * small[0], 2 * small[1])


def test_example_preset_validates():
    from tuneonce.config.loading import load_config

    root = Path(__file__).resolve().parent.parent
    cfg = load_config(root / "training_presets" / "examples" / "demo_sdxl_multires.yaml")
    assert cfg.data.resolutions == [32, 64] and cfg.data.resolution == 64


def test_the_small_image_warning_names_the_resolutions(tmp_path, caplog):
    import logging

    from tuneonce.config import TrainConfig
    from tuneonce.trainer.train import check_images

    write_concept_dataset(tmp_path, count=1, size=24, seed=3)
    config = TrainConfig.model_validate({
        "model": {"family": "sd15", "base_model": "x"}, "schedule": {"max_steps": 1},
        "data": data_config(tmp_path, resolutions=[32, 64], bucketing=False),
    })
    dataset = build_dataset(config.data, seed=0)
    with caplog.at_level(logging.WARNING):
        check_images(config, [dataset], torch.device("cpu"))
    assert any("data.resolutions [32, 64]: 1 images are smaller" in r.getMessage() for r in caplog.records)
