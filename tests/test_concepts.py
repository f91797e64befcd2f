"""Concepts (several data folders in one run, OneTrainer's concept list / kohya's subsets): each folder's images ×
its repeats per epoch, its own caption settings and loss weight, the old `folders: [{path, repeats}]` configs loading
unchanged, and a two-concept run (a prior-prediction regularization concept, two resolutions) stopped at a checkpoint
and resumed ending bit-identical to an uninterrupted one."""
from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tuneonce.config import TrainConfig, validate_dict
from tuneonce.data.captions import read_caption
from tuneonce.data.dataset import DataSettings, build_dataset, collate_batch
from tuneonce.data.synthetic import write_concept_dataset
from tuneonce.model.tiny import tiny_pipeline_dir
from tuneonce.trainer import checkpoint as ckpt
from tuneonce.trainer import loop
from tuneonce.trainer.concepts import concept_loss
from tuneonce.model.objective import DiffusionObjective
from tuneonce.trainer.train import train
from tests.builders import concept_data_dirs, signal_in_step, tiny_train_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """Concept a: 4 images with .txt captions; concept b: 2 other images whose captions are in .caption files."""
    root = tmp_path_factory.mktemp("concepts")
    write_concept_dataset(root / "a", count=4, size=64, seed=1)
    write_concept_dataset(root / "b", count=2, size=64, seed=5)
    for txt in (root / "b").glob("*.txt"):
        txt.rename(txt.with_suffix(".caption"))
    return root / "a", root / "b"


def data_config(a: Path, b: Path, **overrides) -> dict:
    return {
        "folders": [
            {"path": str(a), "repeats": 3, "caption_prefix": "zxq,", "loss_weight": 2.0},
            {"path": str(b), "repeats": 2, "caption_extension": ".caption", "caption_dropout": 0.0,
             "role": "regularization", "loss_weight": 0.5},
        ],
        "resolution": 64, "bucketing": False, "caption_dropout": 1.0, **overrides,
    }


def test_old_folder_entries_load_unchanged(folders):
    a, _ = folders
    cfg = TrainConfig.model_validate({"model": {"family": "sd15", "base_model": "x"}, "schedule": {"max_steps": 1},
                                      "data": {"folders": [{"path": str(a), "repeats": 2}]}})
    folder = cfg.data.folders[0]
    assert (folder.repeats, folder.caption_prefix, folder.loss_weight, folder.role) == (2, "", 1.0, "train")
    assert folder.caption_dropout is None and folder.prior_prediction is False
    dataset = build_dataset(cfg.data, seed=0)
    item = dataset[0]  # the data section's settings apply, the caption is the file's own
    assert item["caption"] == read_caption(Path(item["path"])) and item["loss_weight"] == 1.0
    assert len(dataset) == 8 and not item["prior_prediction"]


def test_an_epoch_holds_each_concepts_images_times_its_repeats(folders):
    a, b = folders
    dataset = build_dataset(data_config(a, b), seed=4)
    assert dataset.concept_items() == {0: 4 * 3, 1: 2 * 2}
    sampler = dataset.batch_sampler(3)
    for epoch in range(2):
        seen = Counter(dataset.records[dataset.item_records[i]].path for batch in sampler.epoch_batches(epoch)
                       for i in batch)
        assert seen == {**{p: 3 for p in sorted(a.glob("*.png"))}, **{p: 2 for p in sorted(b.glob("*.png"))}}
    assert "concepts: a ×12, b ×4" in dataset.summary()


def test_each_concept_keeps_its_caption_settings_and_loss_weight(folders):
    a, b = folders
    dataset = build_dataset(data_config(a, b), seed=4)
    items = [dataset[(epoch, 0, i)] for epoch in range(3) for i in range(len(dataset))]
    for item in items:
        path = Path(item["path"])
        if path.parent == a:  # data.caption_dropout 1.0 inherited: always dropped, prefix included
            assert item["caption"] == "" and item["loss_weight"] == 2.0
        else:  # its own .caption files, its own dropout 0, no prefix
            assert item["caption"] == read_caption(path, ".caption") != "" and item["loss_weight"] == 0.5
    batch = collate_batch([dataset[0], dataset[len(dataset) - 1]])
    assert batch["loss_weight"].tolist() == [2.0, 0.5] and batch["prior_prediction"].tolist() == [False, False]


def test_shuffled_tags_keep_the_concepts_prefix_and_leading_tags_first(folders, tmp_path):
    a, b = folders
    tags = tmp_path / "tags"
    write_concept_dataset(tags, count=2, size=64, seed=1)
    for txt in tags.glob("*.txt"):
        txt.write_text("zxq star, red, striped, large, centered")
    config = data_config(tags, b, caption_dropout=0.0)
    config["folders"][0].update(shuffle_tags=True, keep_tokens=2)  # shuffle here only
    dataset = build_dataset(config, seed=4)
    captions = [dataset[(e, 0, i)]["caption"] for e in range(6) for i in range(6)]  # concept tags' items
    for caption in captions:
        assert caption.startswith("zxq, zxq star, red, ")
        assert sorted(caption.split(", ")[3:]) == ["centered", "large", "striped"]
    assert len(set(captions)) > 1  # the other tags were shuffled
    assert all(dataset[(0, 0, i)]["caption"] == read_caption(Path(dataset[i]["path"]), ".caption")
               for i in range(6, len(dataset)))  # concept b: not shuffled, no prefix


def test_a_cached_caption_includes_its_concepts_prefix(folders, tmp_path):
    a, b = folders
    dataset = build_dataset(data_config(a, b, caption_dropout=0.0), seed=4)
    encoded: list[str] = []

    def encode(captions):
        encoded.extend(captions)
        return {"embeds": torch.zeros(len(captions), 2)}

    dataset.cache_text_embeddings(encode, encoder_id="x", cache_dir=tmp_path)
    expected = {f"zxq, {read_caption(p)}" for p in a.glob("*.png")}
    expected |= {read_caption(p, ".caption") for p in b.glob("*.png")}
    assert set(encoded) == expected
    assert all(dataset[i]["text_embeddings"] is not None for i in range(len(dataset)))


def test_concept_loss_weights_each_sample():
    objective = DiffusionObjective(alphas_cumprod=torch.linspace(0.99, 0.01, 10), prediction_type="epsilon",
                                   min_snr_gamma=1.0)
    latents, noise = torch.zeros(2, 1, 2, 2), torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    prediction = noise + torch.tensor([1.0, 3.0]).reshape(2, 1, 1, 1)  # squared errors 1 and 9
    t = torch.tensor([2, 7])
    snr = objective.snr(t)
    min_snr = snr.clamp(max=1.0) / snr
    batch = {"loss_weight": torch.tensor([2.0, 0.5]), "prior_prediction": torch.tensor([False, False])}
    loss = concept_loss(objective, batch, prediction, latents, noise, t, None, lambda: pytest.fail("no prior row"))
    expected = (2.0 * 1 * min_snr[0] + 0.5 * 9 * min_snr[1]) / 2
    assert float(loss) == pytest.approx(float(expected))


def test_prior_prediction_needs_a_regularization_folder_and_an_adapter(folders):
    a, b = folders

    def problems(method: str, role: str, other_role: str = "train") -> list[str]:  # as the CLI and the GUI see them
        return [key for key, _ in validate_dict({
            "model": {"family": "sd15", "base_model": "x"}, "method": method, "schedule": {"max_steps": 1},
            "data": {"folders": [{"path": str(a), "role": other_role},
                                 {"path": str(b), "role": role, "prior_prediction": True}]},
        })]

    assert problems("lora", "regularization") == []
    assert problems("lora", "train") == ["data.folders.1.prior_prediction"]
    assert problems("finetune", "regularization") == ["data.folders.1.prior_prediction"]
    assert problems("lora", "regularization", "regularization") == ["data.folders"]


# ------------------------------------------------------------------------------------------------ resume


STEPS = 9  # 10 items at 2 resolutions, batch 3: 7 batches an epoch, so the run crosses into epoch 1


@pytest.fixture(scope="module")
def two_concept_run(tmp_path_factory, folders):
    base = tiny_pipeline_dir("sd15", tmp_path_factory)
    val = concept_data_dirs(tmp_path_factory.mktemp("val"), train_count=1)[1]
    cache = tmp_path_factory.mktemp("cache")
    a, b = folders

    def config(out: Path, **sections) -> TrainConfig:
        folders_cfg = [
            {"path": str(a), "repeats": 2, "caption_prefix": "zxq,", "loss_weight": 1.5},
            {"path": str(b), "repeats": 1, "caption_extension": ".caption", "role": "regularization",
             "loss_weight": 0.5, "prior_prediction": True},
        ]
        defaults = {
            "data": {"folders": folders_cfg, "cache_dir": str(cache), "random_flip": 0.5, "resolutions": [32, 64]},
            "schedule": {"max_steps": STEPS, "scheduler": "cosine", "warmup_steps": 2},
            "training": {"batch_size": 3, "seed": 3},
            "validation": {"every_n_steps": 3, "folder": str(val), "num_timesteps": 2},
            "saving": {"output_dir": str(out), "name": "run", "checkpoint_every_n_steps": 2},
        }
        return tiny_train_config("sd15", base, (a, val), out, defaults=defaults, **sections)

    return config


def test_two_concepts_stopped_and_resumed_match_an_uninterrupted_run(two_concept_run, tmp_path, monkeypatch):
    config = two_concept_run
    seen: list[tuple[list[str], list[bool]]] = []
    sizes: set[tuple[int, int]] = set()
    real = loop.compute_loss

    def recording(parts, batch):
        seen.append(([Path(p).parent.name for p in batch["path"]], batch["prior_prediction"].tolist()))
        sizes.update(tuple(s) for s in batch["target_size"].tolist())
        return real(parts, batch)

    monkeypatch.setattr(loop, "compute_loss", recording)
    reference = train(config(tmp_path / "reference"), show_progress=False)
    # (4 images × 2 + 2 × 1) × 2 sizes = 20 items; both concepts and the prior rows were trained
    assert len(seen) == STEPS and {name for names, _ in seen for name in names} == {"a", "b"}
    assert all(prior == [name == "b" for name in names] for names, prior in seen)
    assert sizes == {(32, 32), (64, 64)}

    monkeypatch.setattr(loop, "compute_loss", real)
    signal_in_step(monkeypatch, 3, signal.SIGINT)  # mid-epoch, one step after the step-2 checkpoint
    out = tmp_path / "run"
    stopped = train(config(out), show_progress=False)
    monkeypatch.setattr(loop, "compute_loss", real)
    assert stopped.interrupted and stopped.checkpoint == out / "checkpoints" / "step000003"
    result = train(config(out, resume="latest"), show_progress=False)
    assert result.resumed_from == out / "checkpoints" / "step000003" and result.steps == STEPS

    def weights(run):
        return {k: p.detach() for k, p in ckpt.trained_parameters({"unet": run.components["unet"]}).items()}

    ours, theirs = weights(result), weights(reference)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    saved, expected = load_file(out / "run.safetensors"), load_file(tmp_path / "reference" / "run.safetensors")
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)
    assert result.val_losses[-1] == reference.val_losses[-1]


def test_example_preset_validates():
    from tuneonce.config.loading import load_config

    root = Path(__file__).resolve().parent.parent
    cfg = load_config(root / "training_presets" / "examples" / "demo_sdxl_concepts.yaml")
    first, second = cfg.data.folders
    assert first.path == second.path and (first.repeats, second.loss_weight) == (2, 0.5)
    assert second.caption_extension == ".short" and second.default_caption == "zxq star"
