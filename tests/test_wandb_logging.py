"""logging.wandb in offline mode: a real train() writes a W&B run (no account, no network) whose records hold the
logged losses, the run config and the sample images; without the package the error names the field and the fix."""
from __future__ import annotations

import hashlib
import json
import struct
import sys
import time
from pathlib import Path

import pytest

from tuneonce.model.tiny import tiny_pipeline_dir
from tuneonce.trainer.train import train
from tuneonce.trainer.wandb_log import WandbSink
from tests.builders import concept_data_dirs, tiny_train_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def read_wandb_records(path: Path) -> list:
    """The protobuf records of a .wandb run file: W&B's LevelDB-style log (a 7-byte ':W&B' header, 32 KiB blocks,
    each record chunk with a 7-byte header: crc32, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # block trailer padding
            pos += left
            continue
        if pos + 7 + length > len(data):  # a record still being written
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def finished_records(path: Path, timeout: float = 60.0) -> list:
    """The run's records once its `exit` record is on disk: wandb's core process writes the file and may still be
    flushing when finish() returns; waits for that event (polling the file), not for a fixed time."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def history(records) -> list[dict[str, str]]:
    return [{item.key or "/".join(item.nested_key): item.value_json for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]  # fmt: skip


def test_offline_run_logs_losses_config_and_samples(tmp_path_factory, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is an optional extra: pip install -e '.[wandb]'")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):  # any network use would fail fast
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")
    base = tiny_pipeline_dir("sd15", tmp_path_factory)
    data = concept_data_dirs(tmp_path_factory.mktemp("wandb_data"), train_count=4)
    prompt = {"prompt": "a zxq star", "seed": 1, "steps": 2, "cfg": 1.0}
    cfg = tiny_train_config(
        "sd15", base, data, tmp_path, schedule={"max_steps": 2}, validation={"every_n_steps": 2},
        sampling={"every_n_steps": 2, "prompts": [prompt]},
        logging={"wandb": {"enabled": True, "project": "tuneonce-test", "mode": "offline"}},
    )  # fmt: skip
    result = train(cfg, show_progress=False)

    (run_file,) = (tmp_path / "logs" / "wandb").glob("offline-run-*/run-*.wandb")
    records = finished_records(run_file)
    rows = history(records)
    losses = {int(r["_step"]): float(r["loss"]) for r in rows if "loss" in r}
    assert sorted(losses) == [1, 2] and losses[2] == pytest.approx(result.final_loss)
    val = {int(r["_step"]): float(r["val_loss"]) for r in rows if "val_loss" in r}
    assert val == pytest.approx(dict(result.val_losses))
    (image_row,) = [r for r in rows if "samples/00/sha256" in r]
    (sample,) = result.samples
    assert int(image_row["_step"]) == 2 and image_row["samples/00/caption"] == '"a zxq star"'
    assert image_row["samples/00/sha256"].strip('"') == hashlib.sha256(sample.read_bytes()).hexdigest()
    (config,) = [r.run.config for r in records if r.WhichOneof("record_type") == "run"]
    items = {item.key: json.loads(item.value_json) for item in config.update}
    assert items["lora"]["rank"] == 4 and items["optimizer"]["type"] == "muon_adv"
    # TensorBoard/JSONL keep working beside it
    assert (tmp_path / "logs" / "metrics.jsonl").is_file()


def test_missing_package_is_one_line_naming_the_field(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.raises(ValueError, match=r"logging\.wandb\.enabled: the wandb package is not installed .*\[wandb\]"):
        WandbSink(project="p", mode="offline", log_dir=tmp_path)


def test_example_preset_validates():
    from tuneonce.config.loading import load_config

    root = Path(__file__).resolve().parent.parent
    cfg = load_config(root / "training_presets" / "examples" / "demo_sdxl_wandb.yaml")
    assert cfg.logging.wandb.enabled and cfg.logging.wandb.mode == "offline"
