"""Latent and text-embedding caches: keys follow content and settings, hits skip the encoder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tuneonce.data import synthetic
from tuneonce.data.dataset import DataSettings, FolderSpec, TrainDataset, scan_folders


class CountingImageEncoder:
    """A stand-in VAE: 8x average pooling of the pixels, counting the images it encodes."""

    def __init__(self) -> None:
        self.calls = 0
        self.images = 0

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.images += pixels.shape[0]
        return F.avg_pool2d(pixels, 8)


class CountingTextEncoder:
    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        self.seen += captions
        lengths = torch.tensor([float(len(c)) for c in captions])
        return {"prompt_embeds": lengths[:, None, None].expand(-1, 3, 4).clone(), "pooled": lengths[:, None] * 2}


def _dataset(folder: Path, *, seed: int = 0, **overrides) -> TrainDataset:
    settings = DataSettings(
        folders=(FolderSpec(folder),),
        **{"resolution": 32, "bucket_step": 8, "bucket_min": 16, "bucket_max": 64, **overrides},
    )
    return TrainDataset(scan_folders(settings.folders), settings, seed=seed)


@pytest.fixture
def folder(tmp_path) -> Path:
    synthetic.write_pretrain_dataset(tmp_path / "imgs", count=4, size=(48, 32), seed=0)
    return tmp_path / "imgs"


def _cache_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.safetensors"))


def test_latent_cache_hit_skips_encoder_and_matches_pixels(folder, tmp_path):
    cache_dir = tmp_path / "cache"
    encoder = CountingImageEncoder()
    dataset = _dataset(folder)
    stats = dataset.cache_latents(encoder, encoder_id="pool8", cache_dir=cache_dir, batch_size=3)
    assert (stats.hits, stats.encoded, encoder.images) == (0, 4, 4)
    files = _cache_files(cache_dir)
    assert len(files) == 4 and not list(cache_dir.rglob("*.tmp"))
    assert set(load_file(files[0])) == {"latents"}

    plain = _dataset(folder)  # uncached twin: its pixels pooled must equal the cached latents
    for i in range(len(dataset)):
        item = dataset[i]
        assert "pixel_values" not in item
        assert torch.allclose(item["latents"], F.avg_pool2d(plain[i]["pixel_values"][None], 8)[0], atol=1e-6)

    again = CountingImageEncoder()
    fresh = _dataset(folder)
    stats = fresh.cache_latents(again, encoder_id="pool8", cache_dir=cache_dir)
    assert (stats.hits, stats.encoded, again.calls) == (4, 0, 0)
    batch = next(iter(fresh.dataloader(batch_size=2)))
    assert batch["latents"].shape[0] == 2 and "pixel_values" not in batch


def test_latent_cache_key_follows_content_and_settings(folder, tmp_path):
    cache_dir = tmp_path / "cache"
    _dataset(folder).cache_latents(CountingImageEncoder(), encoder_id="pool8", cache_dir=cache_dir)

    def encoded(**kwargs) -> int:
        options = {"encoder_id": "pool8", "dtype": torch.float32, **kwargs.pop("cache", {})}
        encoder = CountingImageEncoder()
        _dataset(folder, **kwargs).cache_latents(encoder, cache_dir=cache_dir, **options)
        return encoder.images

    assert encoded() == 0
    assert encoded(cache={"encoder_id": "other-vae"}) == 4
    assert encoded(cache={"dtype": torch.bfloat16}) == 4
    assert encoded(resolution=40) == 4  # another bucket size
    assert encoded(bucketing=False) == 4  # square crop instead of the 3:2 bucket
    assert encoded(random_flip=0.5) == 4  # the flipped copies are new; the unflipped ones hit
    assert encoded(random_flip=0.5) == 0

    synthetic.write_pretrain_dataset(folder, count=1, size=(48, 32), seed=99)  # rewrite 0000.png's content
    assert encoded() == 1


def test_flip_uses_the_cached_flipped_latents(folder, tmp_path):
    dataset = _dataset(folder, random_flip=0.5)
    dataset.cache_latents(CountingImageEncoder(), encoder_id="pool8", cache_dir=tmp_path / "c")
    items = [dataset[i] for i in range(len(dataset))]
    plain = _dataset(folder)
    for i, item in enumerate(items):
        expected = F.avg_pool2d(plain[i]["pixel_values"][None], 8)[0]
        assert torch.allclose(item["latents"], expected.flip(-1) if item["flipped"] else expected, atol=1e-6)


def test_text_cache_with_dropout_uses_the_empty_caption(folder, tmp_path):
    encoder = CountingTextEncoder()
    dataset = _dataset(folder, caption_dropout=0.5)
    stats = dataset.cache_text_embeddings(encoder, encoder_id="clip", cache_dir=tmp_path / "c", batch_size=2)
    distinct = {r.caption for r in dataset.records}
    assert sorted(encoder.seen) == sorted(distinct | {""}) and stats.encoded == len(distinct) + 1
    items = [dataset[i] for i in range(len(dataset))]
    assert any(item["caption"] == "" for item in items) and any(item["caption"] for item in items)
    for item in items:
        assert torch.equal(item["text_embeddings"]["pooled"], torch.tensor([2.0 * len(item["caption"])]))
    batch = next(iter(dataset.dataloader(batch_size=2)))
    assert batch["text_embeddings"]["prompt_embeds"].shape == (2, 3, 4)

    again = CountingTextEncoder()
    assert (
        _dataset(folder, caption_dropout=0.5)
        .cache_text_embeddings(again, encoder_id="clip", cache_dir=tmp_path / "c")
        .hits
        == len(distinct) + 1
    )
    assert again.seen == []
    _dataset(folder).cache_text_embeddings(again, encoder_id="clip-v2", cache_dir=tmp_path / "c")
    assert sorted(again.seen) == sorted(distinct)


def test_cache_rules_reject_incompatible_augmentation(folder, tmp_path):
    with pytest.raises(ValueError, match="shuffle_tags"):
        _dataset(folder, shuffle_tags=True).cache_text_embeddings(
            CountingTextEncoder(), encoder_id="x", cache_dir=tmp_path
        )
    with pytest.raises(ValueError, match="training a text encoder"):
        _dataset(folder).cache_text_embeddings(
            CountingTextEncoder(), encoder_id="x", cache_dir=tmp_path, train_text_encoders=True
        )
    with pytest.raises(ValueError, match="random crop"):
        _dataset(folder, random_crop=True).cache_latents(CountingImageEncoder(), encoder_id="x", cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"encode_images must return a tensor with 4 rows, got tensor of shape \(1,"):
        _dataset(folder).cache_latents(lambda p: p[:1], encoder_id="x", cache_dir=tmp_path)


def test_damaged_cache_entry_is_named(folder, tmp_path):
    dataset = _dataset(folder)
    dataset.cache_latents(CountingImageEncoder(), encoder_id="pool8", cache_dir=tmp_path / "c")
    victim = _cache_files(tmp_path / "c")[0]
    victim.write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match=victim.name):
        for i in range(len(dataset)):
            dataset[i]
