"""Training on several processes: the optimizer's split matrix work and the DDP loop, against one process.

The multi-process tests start two real processes on a gloo process group (CPU): one for the optimizers alone
(tests/distributed_worker.py), one for a short LoRA run of a tiny SDXL pipeline through scripts/train.py.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tuneonce.config import TrainConfig
from tuneonce.config.loading import save_config
from tuneonce.model.tiny import tiny_pipeline_dir
from tuneonce.optimizer.distributed import exchange_rows, orthogonalization_flops, split_rows, world
from tuneonce.trainer.train import train
from tests.builders import concept_data_dirs, tiny_train_config

ROOT = Path(__file__).resolve().parent.parent
WORLD = 2


# ------------------------------------------------------------------------------------------ the split, one process


def _loads(split, costs):
    return [sum(split.count(b, r) * c for b, c in enumerate(costs)) for r in range(split.world_size)]


def test_split_covers_every_row_once_in_contiguous_rank_order():
    sizes, costs = [5, 1, 3, 0, 7], [10.0, 50.0, 1.0, 4.0, 2.0]
    splits = [split_rows(sizes, costs, rank=r, world_size=3) for r in range(3)]
    assert all(s.starts == splits[0].starts for s in splits)  # every rank computes the same split
    for b, n in enumerate(sizes):
        rows = [splits[0].rows(b, r) for r in range(3)]
        assert rows[0].start == 0 and rows[-1].stop == n
        assert all(rows[r].stop == rows[r + 1].start for r in range(2))
    assert sum(s.owned() for s in splits) == sum(sizes)
    assert [s.owned() for s in splits] == [splits[0].owned(r) for r in range(3)]


def test_split_balances_flops_within_one_row():
    sizes, costs = [6, 2, 9, 1], [8.0, 30.0, 3.0, 17.0]
    for world_size in (2, 3, 4):
        loads = _loads(split_rows(sizes, costs, rank=0, world_size=world_size), costs)
        assert max(loads) - min(loads) <= max(costs), (world_size, loads)


def test_bucket_smaller_than_world_gives_some_ranks_nothing():
    split = split_rows([1, 2], [5.0, 1.0], rank=0, world_size=4)
    assert [split.count(0, r) for r in range(4)] == [1, 0, 0, 0]
    assert sorted(split.count(1, r) for r in range(4)) == [0, 0, 1, 1]
    assert split.owned(0) == 1  # the expensive row alone outweighs the two cheap ones


def test_split_errors_name_the_problem():
    with pytest.raises(ValueError, match="rank must be in"):
        split_rows([1], [1.0], rank=2, world_size=2)
    with pytest.raises(ValueError, match="2 batch sizes but 1 costs"):
        split_rows([1, 2], [1.0], rank=0, world_size=2)
    with pytest.raises(ValueError, match="batch 0 has 3 rows, the split expects 2"):
        exchange_rows([torch.zeros(3, 2)], split_rows([2], [1.0], rank=0, world_size=2))


def test_gram_route_costs_less_than_newton_schulz_on_a_thin_matrix():
    assert orthogonalization_flops((8, 512), "gram", "newton_schulz", 5) < orthogonalization_flops((8, 512), "iterative", "newton_schulz", 5)
    assert orthogonalization_flops((64, 64), "iterative", "newton_schulz", 5) > orthogonalization_flops((16, 16), "iterative", "newton_schulz", 5)


def test_not_distributed_is_one_process():
    assert world() == (0, 1)


# --------------------------------------------------------------------------------------------- two processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], *, extra_env: dict[str, str] | None = None, timeout: float = 240) -> None:
    """Run `python args...` as WORLD processes of one gloo group (the variables torchrun/accelerate launch set)."""
    port = str(_free_port())
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_WORLD_SIZE": str(WORLD),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1", **(extra_env or {})}  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for rank, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} exited with {proc.returncode}:\n{out[-3000:]}"


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    data = concept_data_dirs(tmp_path_factory.mktemp("data"), train_count=4)
    return tiny_pipeline_dir("sdxl", tmp_path_factory), data


def _loop_config(base, data, out, batch_size):
    return tiny_train_config(
        "sdxl", base, data, out,
        training={"batch_size": batch_size, "noise_offset": 0.05},
        lora={"rank": 4, "train_text_encoders": {"text_encoder": True}},  # text encoders run outside DDP: averaged by hand
        data={"cache_text_embeddings": False},
        validation={"every_n_steps": 0}, schedule={"max_steps": 3},
        saving={"format": "diffusers"},
    )  # fmt: skip


@pytest.fixture(scope="module")
def two_processes(tiny_sdxl, tmp_path_factory) -> Path:
    """One launch of two processes: the optimizer cases, then 3 steps of scripts/train.py at batch 1 per process."""
    base, data = tiny_sdxl
    out = tmp_path_factory.mktemp("two_processes")
    save_config(_loop_config(base, data, out / "run", batch_size=1), out / "run.yaml")
    _launch(["tests/distributed_worker.py", str(out), str(out / "run.yaml")], extra_env={"ACCELERATE_USE_CPU": "true"})
    return out


def test_optimizers_split_the_work_and_match_one_process(two_processes, one_torch_thread):
    from tests.distributed_worker import step_all

    ranks = [torch.load(two_processes / f"rank{r}.pt") for r in range(WORLD)]
    reference = step_all()  # the same steps in this process, without a process group
    for case, ref in reference.items():
        for name, expected in ref["params"].items():
            got = [rank[case]["params"][name] for rank in ranks]
            assert torch.equal(got[0], got[1]), f"{case}: {name} differs between the ranks"
            torch.testing.assert_close(got[0], expected, rtol=0, atol=1e-6, msg=lambda m: f"{case} {name}: {m}")
        # Each rank orthogonalized a real share, and the shares add up to the single process's work.
        counts = [rank[case]["counts"] for rank in ranks]
        for step, total in enumerate(ref["counts"]):
            assert counts[0][step] + counts[1][step] == total and 0 < counts[0][step] < total, (case, counts, total)


def test_two_processes_train_like_one_with_the_same_global_batch(two_processes, tiny_sdxl, tmp_path):
    """2 processes × batch 1 (DDP) vs 1 process × batch 2: the same LoRA after 3 steps, within 1e-6 absolute on
    weights of size ~0.2 (DDP sums the two samples' gradients in another order than one batched backward: float32
    rounding; measured 2.5e-8)."""
    base, data = tiny_sdxl
    one = train(_loop_config(base, data, tmp_path / "one", batch_size=2), show_progress=False)
    single, double = load_file(one.saved[-1]), load_file(two_processes / "run" / "run.safetensors")
    assert single.keys() == double.keys() and any(k.startswith("text_encoder.") for k in single)
    for key in single:
        torch.testing.assert_close(double[key], single[key], rtol=0, atol=1e-6, msg=lambda m: f"{key}: {m}")
    for component in ("unet.", "text_encoder."):  # (SDXL reads the penultimate text layer: the last one stays 0)
        assert any(single[k].abs().max() > 0 for k in single if k.startswith(component) and "lora_B" in k), component


def test_prior_prediction_under_ddp_matches_one_process(tiny_sdxl, tmp_path):
    """A regularization concept with the prior prediction (a second, adapter-off forward of the DDP-wrapped UNet and
    of the trained text encoder) trains on 2 processes × batch 1 as on 1 process × batch 2."""
    base, data = tiny_sdxl
    folders = [{"path": str(data[0])},
               {"path": str(data[0]), "caption_extension": ".class", "default_caption": "a star",
                "role": "regularization", "prior_prediction": True, "loss_weight": 0.5}]

    def config(out: Path, batch_size: int) -> TrainConfig:  # 3 steps × 2 of 4 + 4 items: at least 2 prior rows
        cfg = _loop_config(base, data, out, batch_size).model_dump()
        cfg["data"]["folders"] = folders
        return TrainConfig.model_validate(cfg)

    save_config(config(tmp_path / "two", 1), tmp_path / "two.yaml")
    _launch(["scripts/train.py", "--config", str(tmp_path / "two.yaml")], extra_env={"ACCELERATE_USE_CPU": "true"})
    one = train(config(tmp_path / "one", 2), show_progress=False)
    single, double = load_file(one.saved[-1]), load_file(tmp_path / "two" / "run.safetensors")
    assert single.keys() == double.keys()
    for key in single:
        torch.testing.assert_close(double[key], single[key], rtol=0, atol=1e-6, msg=lambda m: f"{key}: {m}")
