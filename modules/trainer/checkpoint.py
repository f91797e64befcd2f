"""Resumable checkpoints: what a run needs to continue bit-identically after a crash, `kill -9` or Ctrl-C.

Layout, one folder per checkpoint under ``<saving.output_dir>/checkpoints/``::

    step000040/
      weights.safetensors     trained parameters "<component>.<name>" (LoRA adapters, or the whole backbone)
      optimizer.safetensors   tensors of the optimizer and LR-scheduler states (momenta, moments)
      ema.safetensors         EMA shadow weights (training.ema.enabled)
      rng_rank0.json          RNG states of process 0: torch (CPU, CUDA), numpy, python, the loop's noise generator
      state.json              written last: step, epoch, data-sampler position, the structure of the optimizer and
                              scheduler states, the model identity, the config and its hash, every file's size

A checkpoint is written into ``.tmp-step000040/`` and renamed into place once complete (files fsynced first), so a
folder named ``stepNNNNNN`` is whole; a save killed half-way leaves a temp folder that the next save removes.
Loading reads and checks every file before anything is applied. ``resume: latest`` takes the newest checkpoint that
loads, reporting each one that does not by name; a checkpoint of another model or adapter shape is an error.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tuneonce.trainer.loop import StopTraining, TrainState
from tuneonce.util.files import NonFiniteError, check_finite

logger = logging.getLogger("tuneonce.checkpoint")

CHECKPOINTS_DIR = "checkpoints"
MANIFEST = "state.json"
FORMAT_VERSION = 1
WEIGHTS, OPTIMIZER, EMA_FILE = "weights.safetensors", "optimizer.safetensors", "ema.safetensors"
_NAME = re.compile(r"^step(\d{6,})$")
# Config fields that may change between the saved run and the resumed one without a word.
_QUIET_KEYS = ("resume",)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or no checkpoint could be loaded (the message is one line)."""


class CorruptCheckpoint(CheckpointError):
    """This checkpoint's files are missing, truncated or unreadable (an older one may still load)."""


class ResumeMismatch(ValueError):
    """The checkpoint was trained on another model, method or adapter shape than this run's."""


def checkpoint_name(step: int) -> str:
    return f"step{step:06d}"


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIR


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under `root`, oldest step first (temp folders of unfinished saves excluded)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


# ---- nested state <-> JSON + a flat tensor dict ---------------------------------------------------------------------
def flatten_tensors(tree: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """`tree` as JSON-able data: each tensor moves into `tensors` under its path and leaves a reference behind;
    tuples, non-string dict keys and numpy arrays are tagged so `unflatten_tensors` gives back the same types."""
    if isinstance(tree, torch.Tensor):
        tensors[path] = tree
        return {"__tensor__": path}
    if isinstance(tree, tuple):
        return {"__tuple__": [flatten_tensors(v, tensors, f"{path}/{i}") for i, v in enumerate(tree)]}
    if isinstance(tree, list):
        return [flatten_tensors(v, tensors, f"{path}/{i}") for i, v in enumerate(tree)]
    if isinstance(tree, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in tree):
            return {k: flatten_tensors(v, tensors, f"{path}/{k}") for k, v in tree.items()}
        return {"__items__": [[flatten_tensors(k, tensors, f"{path}/key{i}"), flatten_tensors(v, tensors, f"{path}/{k}")]
                              for i, (k, v) in enumerate(tree.items())]}  # fmt: skip
    if isinstance(tree, np.ndarray):
        return {"__ndarray__": tree.tolist(), "dtype": str(tree.dtype)}
    if isinstance(tree, np.generic):
        return tree.item()
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    raise TypeError(f"checkpoint: cannot store a {type(tree).__name__} (at {path or '/'})")


def unflatten_tensors(data: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(data, list):
        return [unflatten_tensors(v, tensors) for v in data]
    if not isinstance(data, dict):
        return data
    if "__tensor__" in data:
        return tensors[data["__tensor__"]]
    if "__tuple__" in data:
        return tuple(unflatten_tensors(v, tensors) for v in data["__tuple__"])
    if "__items__" in data:
        return {unflatten_tensors(k, tensors): unflatten_tensors(v, tensors) for k, v in data["__items__"]}
    if "__ndarray__" in data:
        return np.asarray(data["__ndarray__"], dtype=data["dtype"])
    return {k: unflatten_tensors(v, tensors) for k, v in data.items()}


# ---- files ----------------------------------------------------------------------------------------------------------
def storable(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that own their memory (optimizer state may be views of one stacked bucket, which
    safetensors refuses); tensors already in that shape are not copied."""
    owners: dict[int, int] = {}
    for t in tensors.values():
        if t.device.type == "cpu" and t.numel():
            owners[t.untyped_storage().data_ptr()] = owners.get(t.untyped_storage().data_ptr(), 0) + 1
    out = {}
    for key, t in tensors.items():
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        elif not t.is_contiguous() or (t.numel() and owners[t.untyped_storage().data_ptr()] > 1):
            t = t.clone(memory_format=torch.contiguous_format)
        out[key] = t
    return out


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """The one writer of tensor files (tests replace it to simulate a full disk); non-finite tensors are refused."""
    check_finite(tensors, path)
    save_file(storable(tensors), str(path))
    _fsync(path)


def write_json(data: Any, path: Path) -> None:
    text = json.dumps(data)  # one write: json.dump to a file writes every token separately
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- what a checkpoint holds ----------------------------------------------------------------------------------------
@dataclass
class Snapshot:
    """The contents of one checkpoint, in memory (CPU tensors)."""

    step: int
    epoch: int
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    lr_scheduler: dict[str, Any]
    sampler: dict[str, int]
    ema: dict[str, Any] | None
    rng: dict[str, Any] | None  # this process's RNG states (None: the checkpoint has none for this rank)
    config: dict[str, Any]  # config.model_dump(mode="json") of the run that wrote it
    path: Path | None = None  # where it was read from


def config_hash(config: Mapping[str, Any]) -> str:
    kept = {k: v for k, v in config.items() if k not in _QUIET_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def _dotted(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _dotted(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any], prefixes: tuple[str, ...] = ("",)) -> list[str]:
    """``key: old -> new`` for every (dotted) config field under `prefixes` that differs."""
    before, after = _dotted(dict(old)), _dotted(dict(new))
    keys = sorted(k for k in before.keys() | after.keys() if k.startswith(prefixes) and k.split(".")[0] not in _QUIET_KEYS)
    return [f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in keys if before.get(k) != after.get(k)]


def capture_rng(generator: torch.Generator) -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generator": generator.get_state(),
    }


def restore_rng(state: Mapping[str, Any], generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["generator"])


def save_checkpoint(
    root: Path,
    snapshot: Snapshot,
    *,
    rank: int = 0,
    num_ranks: int = 1,
    barrier: Callable[[], None] = lambda: None,
    keep_last: int = 2,
) -> Path:
    """Write `snapshot` as ``root/stepNNNNNN`` (every process writes its RNG file, the main process the rest),
    atomically; keep the newest `keep_last` (0 = all). On failure the temp folder is removed, earlier checkpoints
    are untouched and `CheckpointError` says what happened."""
    name = checkpoint_name(snapshot.step)
    final, tmp = root / name, root / f".tmp-{name}"
    main = rank == 0
    try:
        if main:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".tmp-step*"):  # a save that was killed half-way
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        barrier()
        rng_tensors: dict[str, torch.Tensor] = {}
        rng = flatten_tensors(snapshot.rng, rng_tensors)
        write_json({"rng": rng, "tensors": {k: t.tolist() for k, t in rng_tensors.items()}}, tmp / f"rng_rank{rank}.json")
        barrier()
        if main:
            write_safetensors(snapshot.weights, tmp / WEIGHTS)
            state_tensors: dict[str, torch.Tensor] = {}
            trees = flatten_tensors({"optimizer": snapshot.optimizer, "lr_scheduler": snapshot.lr_scheduler}, state_tensors)
            write_safetensors(state_tensors, tmp / OPTIMIZER)
            ema_tree = None
            if snapshot.ema is not None:
                ema_tensors: dict[str, torch.Tensor] = {}
                ema_tree = flatten_tensors(snapshot.ema, ema_tensors)
                write_safetensors(ema_tensors, tmp / EMA_FILE)
            manifest = {
                "format": FORMAT_VERSION, "step": snapshot.step, "epoch": snapshot.epoch, "sampler": snapshot.sampler,
                "state": trees, "ema": ema_tree, "ranks": num_ranks, "config_hash": config_hash(snapshot.config),
                "config": snapshot.config, "files": {p.name: p.stat().st_size for p in sorted(tmp.iterdir())},
            }  # fmt: skip
            write_json(manifest, tmp / MANIFEST)
            _fsync(tmp)
            _move_into_place(tmp, final)
    except NonFiniteError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"checkpoint {name} not written: {e}") from e
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        earlier = [p.name for p in list_checkpoints(root) if p.name != name]
        kept = f"the previous checkpoint {earlier[-1]} is intact" if earlier else "no earlier checkpoint exists"
        raise CheckpointError(
            f"checkpoint {name} not written to {root}: {e.strerror or e} ({kept})"
        ) from e
    barrier()
    if main:
        prune_checkpoints(root, newest=snapshot.step, keep_last=keep_last)
    return final


def _move_into_place(tmp: Path, final: Path) -> None:
    old = final.with_name(f".old-{final.name}")
    if final.exists():  # the same step saved again (a run resumed from an older checkpoint)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def prune_checkpoints(root: Path, *, newest: int, keep_last: int) -> None:
    """Remove checkpoints past step `newest` (left by a run that was resumed from an older one, they are not this
    run's history: `resume: latest` must not pick them) and all but the newest `keep_last` (0 keeps all)."""
    found = list_checkpoints(root)
    for path in found:
        if int(_NAME.match(path.name).group(1)) > newest:
            logger.warning("removing checkpoint %s: it is ahead of the resumed run (step %d)", path.name, newest)
            shutil.rmtree(path, ignore_errors=True)
    found = [p for p in found if int(_NAME.match(p.name).group(1)) <= newest]
    for path in found[:-keep_last] if keep_last else []:
        shutil.rmtree(path, ignore_errors=True)


def read_checkpoint(path: Path, *, rank: int = 0) -> Snapshot:
    """Read and check every file of one checkpoint; `CorruptCheckpoint` (naming it and the reason) if any fails."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT_VERSION:
            raise CorruptCheckpoint(f"checkpoint {path.name}: format {manifest.get('format')!r}, expected {FORMAT_VERSION}")
        for file, size in manifest["files"].items():
            actual = (path / file).stat().st_size if (path / file).is_file() else None
            if actual != size:
                found = "missing" if actual is None else f"{actual} bytes"
                raise CorruptCheckpoint(f"checkpoint {path.name}: {file} is {found}, {size} bytes expected")
        trees = unflatten_tensors(manifest["state"], load_file(str(path / OPTIMIZER)))
        ema = None
        if manifest["ema"] is not None:
            ema = unflatten_tensors(manifest["ema"], load_file(str(path / EMA_FILE)))
        rng = None
        rng_file = path / f"rng_rank{rank}.json"
        if rng_file.is_file():
            saved = json.loads(rng_file.read_text(encoding="utf-8"))
            rng_tensors = {k: torch.tensor(v, dtype=torch.uint8) for k, v in saved["tensors"].items()}
            rng = unflatten_tensors(saved["rng"], rng_tensors)
        return Snapshot(
            step=int(manifest["step"]), epoch=int(manifest["epoch"]), weights=load_file(str(path / WEIGHTS)),
            optimizer=trees["optimizer"], lr_scheduler=trees["lr_scheduler"], sampler=manifest["sampler"], ema=ema,
            rng=rng, config=manifest["config"], path=path,
        )  # fmt: skip
    except CorruptCheckpoint:
        raise
    except Exception as e:  # any unreadable part makes the checkpoint unusable; say which and why, in one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CorruptCheckpoint(f"checkpoint {path.name} cannot be loaded: {type(e).__name__}: {reason}") from e


def find_checkpoint(resume: str, output_dir: str | Path, *, rank: int = 0) -> Snapshot | None:
    """`resume: latest`: the newest loadable checkpoint under the run's checkpoints folder (each one that fails to
    load is reported and the previous one tried; None when there is none yet). A path: that checkpoint folder (or
    the newest loadable one of a checkpoints folder)."""
    if resume == "latest":
        root = checkpoints_root(output_dir)
    else:
        root = Path(resume)
        if not root.is_dir():
            raise FileNotFoundError(f"resume: {root} does not exist (a checkpoint folder, a folder of them, or 'latest')")
        if (root / MANIFEST).is_file() or _NAME.match(root.name):
            return read_checkpoint(root, rank=rank)  # the one asked for: no silent fallback
    candidates = list_checkpoints(root)
    if not candidates:
        if resume != "latest":
            raise FileNotFoundError(f"resume: no checkpoint (stepNNNNNN folder) in {root}")
        logger.info("resume: latest: no checkpoint in %s yet, starting from step 0", root)
        return None
    for path in reversed(candidates):
        try:
            return read_checkpoint(path, rank=rank)
        except CorruptCheckpoint as e:
            logger.warning("%s; trying the previous checkpoint", e)
    raise CheckpointError(f"resume: none of the {len(candidates)} checkpoints in {root} can be loaded")


# ---- a run <-> a snapshot -------------------------------------------------------------------------------------------
def trained_parameters(trained: Mapping[str, torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    """Every trained parameter of the run, named ``<component>.<parameter name>``."""
    return {
        f"{component}.{name}": p
        for component, module in trained.items()
        for name, p in module.named_parameters()
        if p.requires_grad
    }


def check_fits(snapshot: Snapshot, config: Any, params: Mapping[str, torch.Tensor]) -> None:
    """`ResumeMismatch` (one line naming the difference) unless the checkpoint was made by this model and this
    adapter shape."""
    name, saved, now = snapshot.path.name if snapshot.path else "?", snapshot.config, config.model_dump(mode="json")
    for key in ("family", "base_model"):
        old, new = saved["model"][key], now["model"][key]
        if key == "base_model":
            old, new = str(Path(old).resolve()), str(Path(new).resolve())
        if old != new:
            raise ResumeMismatch(f"resume: checkpoint {name} was trained with model.{key}={old}, this run has {new}")
    if saved["method"] != now["method"]:
        raise ResumeMismatch(f"resume: checkpoint {name} is a {saved['method']} run, this run is {now['method']} (method)")
    hint = "; ".join(config_changes(saved, now, prefixes=("lora.",)))
    hint = f" ({hint})" if hint else ""
    missing, unexpected = sorted(params.keys() - snapshot.weights.keys()), sorted(snapshot.weights.keys() - params.keys())
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise ResumeMismatch(
            f"resume: checkpoint {name} trains other layers than this run{hint}: {len(missing)} of this run's "
            f"parameters missing, {len(unexpected)} extra (e.g. {example})"
        )
    for key, p in params.items():
        if snapshot.weights[key].shape != p.shape:
            raise ResumeMismatch(
                f"resume: checkpoint {name} does not fit this run{hint}: {key} is "
                f"{tuple(snapshot.weights[key].shape)} there, {tuple(p.shape)} here"
            )


class DataPosition:
    """The data sampler's position after the last batch the loop consumed (loader workers may run ahead of it)."""

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler
        self.state: dict[str, int] | None = None

    def track(self, batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for batch in batches:
            self.state = batch.get("sampler_state", self.state)
            yield batch

    def state_dict(self) -> dict[str, int]:
        return dict(self.state) if self.state is not None else self.sampler.state_dict()


def capture_run(run: Any, state: TrainState, position: DataPosition, ema: Any | None) -> Snapshot:
    return Snapshot(
        step=state.step, epoch=state.epoch, weights=dict(trained_parameters(run.trained)),
        optimizer=run.parts.optimizer.state_dict(), lr_scheduler=run.parts.lr_scheduler.state_dict(),
        sampler=position.state_dict(), ema=ema.state_dict() if ema is not None else None,
        rng=capture_rng(run.parts.generator), config=run.config.model_dump(mode="json"),
    )  # fmt: skip


def restore_run(snapshot: Snapshot, run: Any, state: TrainState, ema: Any | None) -> None:
    """Put the checkpoint into the freshly built run: weights, optimizer, scheduler, EMA, data position, RNGs, step."""
    params = trained_parameters(run.trained)
    check_fits(snapshot, run.config, params)
    changes = config_changes(snapshot.config, run.config.model_dump(mode="json"))
    if changes:
        logger.warning("resume: config changed since the checkpoint (the new values apply): %s", "; ".join(changes))
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(snapshot.weights[key])
    run.parts.optimizer.load_state_dict(snapshot.optimizer)
    run.parts.lr_scheduler.load_state_dict(snapshot.lr_scheduler)
    if ema is not None:
        if snapshot.ema is not None:
            ema.load_state_dict(snapshot.ema)
        else:  # EMA switched on for the rest of the run: it starts from the resumed weights
            ema.load_state_dict({"shadow": {k: p.detach() for k, p in params.items()}, "num_updates": 0})
    sampler = run.loader.batch_sampler
    sampler.load_state_dict(snapshot.sampler)
    state.load_state_dict({"step": snapshot.step, "epoch": snapshot.epoch})
    if sampler.position >= len(sampler):  # saved right after an epoch's last batch: the next epoch starts
        sampler.start_epoch(sampler.epoch + 1)
        state.epoch += 1
    if snapshot.rng is not None:
        restore_rng(snapshot.rng, run.parts.generator)
    else:
        logger.warning("resume: checkpoint %s has no RNG state for this process; noise continues from the seed", snapshot.path)


def drop_metrics_after(path: Path, step: int) -> None:
    """Remove metrics.jsonl records past `step` (logged by the run that died after its last checkpoint; the
    resumed run logs those steps again), so every step appears once."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if not line.strip() or json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)


# ---- when to write one ----------------------------------------------------------------------------------------------
class StopSignal:
    """SIGINT/SIGTERM ask the run to stop after the current step and write a checkpoint; a second signal aborts at
    once. Handlers are installed only in the main thread (a GUI's worker thread keeps the defaults)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("%s: stopping after this step and writing a checkpoint (again to abort)", signal.Signals(signum).name)


class Checkpointer:
    """Step hook: a checkpoint every `every` steps (None: never) and when a stop was requested (then StopTraining)."""

    def __init__(self, run: Any, position: DataPosition, ema: Any | None, *, every: int | None, keep_last: int,
                 stop: StopSignal | None = None) -> None:  # fmt: skip
        self.run, self.position, self.ema = run, position, ema
        self.every, self.keep_last, self.stop = every, keep_last, stop
        self.root = checkpoints_root(run.paths.output_dir)
        self.last: Path | None = None

    def stop_requested(self) -> bool:
        requested = self.stop is not None and self.stop.requested
        accelerator = self.run.parts.accelerator
        if accelerator.num_processes > 1:  # every process stops at the same step, whichever got the signal
            flag = torch.tensor([float(requested)], device=accelerator.device)
            requested = bool(accelerator.reduce(flag, "sum").item() > 0)
        return requested

    def save(self, state: TrainState) -> Path:
        accelerator = self.run.parts.accelerator
        snapshot = capture_run(self.run, state, self.position, self.ema)
        self.last = save_checkpoint(
            self.root, snapshot, rank=accelerator.process_index, num_ranks=accelerator.num_processes,
            barrier=accelerator.wait_for_everyone, keep_last=self.keep_last,
        )  # fmt: skip
        return self.last

    def on_step(self, state: TrainState, loss: torch.Tensor) -> None:
        last = state.step >= self.run.total_steps  # the run ends and saves its final files anyway
        due = bool(self.every) and state.step % self.every == 0 and not last
        stopping = self.stop_requested() and not last
        if due or stopping:
            self.save(state)
        if stopping:
            raise StopTraining(state.step, self.last)
