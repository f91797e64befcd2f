"""One training run at a time, in a subprocess running the same CLI as `train.py --config`.

The GUI never trains in its own process: a crash or a stop must not take the server down, and
what the page starts is exactly what a user would start from a shell. Progress comes from the
files the run writes (the trainer's `metrics.jsonl` and its sample PNGs), plus the tail of the
subprocess's console output.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout's root when running from one (tests use it)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
LOG_TAIL_CHARS = 6000
STOP_GRACE_S = 5.0


def train_command(config_path: Path) -> list[str]:
    """The command a user would type (`tuneonce-train --config X.yaml`), with this interpreter and its installed
    package: no path of the checkout is assumed, so an installed wheel runs the same way."""
    return [sys.executable, "-m", "tuneonce.train", "--config", str(config_path)]


@dataclass
class RunWatch:
    """Where a run writes: metrics file (read from a byte offset, since the trainer appends) and sample folder."""

    metrics_path: Path
    samples_dir: Path
    metrics_offset: int = 0  # bytes of metrics_path that belong to earlier runs
    samples_since: float = 0.0  # sample files older than this (mtime) belong to earlier runs


@dataclass
class Run:
    config_path: Path
    watch: RunWatch
    command: list[str]
    process: subprocess.Popen
    log_path: Path
    started_at: float
    ended_at: float | None = None  # when the process was seen to end: the elapsed time stops there
    stopped_by_user: bool = False
    max_steps: int | None = None
    _records: list[dict] = field(default_factory=list)
    _read_pos: int = 0
    _partial: bytes = b""


class RunManager:
    """Starts, stops and reports on the single training subprocess the GUI owns."""

    def __init__(self, cwd: Path | None = None, command_for=train_command, clock=time.time) -> None:
        self._cwd = cwd or Path.cwd()  # relative paths in the config resolve against it, as in a shell
        self._command_for = command_for
        self._clock = clock  # the run's elapsed time; tests pass a fake one
        self._lock = threading.Lock()
        self._run: Run | None = None

    # -- control ---------------------------------------------------------------------------
    def start(self, config_path: Path, watch: RunWatch, max_steps: int | None = None) -> Run:
        with self._lock:
            if self._run is not None and self._run.process.poll() is None:
                raise RuntimeError("a training run is already running; stop it first")
            watch.metrics_offset = watch.metrics_path.stat().st_size if watch.metrics_path.exists() else 0
            watch.samples_since = time.time() - 1.0
            log_path = config_path.with_suffix(".log")
            command = self._command_for(config_path)
            log_file = open(log_path, "w", encoding="utf-8")
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            process = subprocess.Popen(
                command,
                cwd=str(self._cwd),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # its own process group, so stop() reaches dataloader workers too
            )
            log_file.close()  # the child holds its own handle
            self._run = Run(config_path, watch, command, process, log_path, started_at=self._clock(),
                            max_steps=max_steps)
            threading.Thread(target=self._note_end, args=(self._run,), name="tuneonce-run-wait", daemon=True).start()
            return self._run

    def _note_end(self, run: Run) -> None:
        run.process.wait()
        self._mark_ended(run)

    def _mark_ended(self, run: Run) -> None:
        """Record the end time once (by whoever sees the exit first: the waiter thread, stop or status)."""
        with self._lock:
            if run.ended_at is None:
                run.ended_at = self._clock()

    def stop(self, grace_s: float = STOP_GRACE_S) -> bool:
        """SIGTERM the run's process group, SIGKILL after `grace_s`; False when nothing was running."""
        with self._lock:
            run = self._run
            if run is None or run.process.poll() is not None:
                return False
            run.stopped_by_user = True
            _signal_group(run.process, signal.SIGTERM)
        try:
            run.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(run.process, signal.SIGKILL)
            run.process.wait(timeout=grace_s)
        self._mark_ended(run)
        return True

    # -- report ----------------------------------------------------------------------------
    def status(self, since: int = 0) -> dict:
        """State, step, metrics records from index `since` on, latest samples and the console tail."""
        run = self._run
        if run is None:
            return {"state": "idle", "records": [], "record_count": 0, "samples": [], "log": ""}
        _read_new_records(run)
        code = run.process.poll()
        if code is not None:
            self._mark_ended(run)
        if code is None:
            state = "running"
        elif run.stopped_by_user:
            state = "stopped"
        else:
            state = "finished" if code == 0 else "failed"
        loss_records = [r for r in run._records if "loss" in r]
        last = loss_records[-1] if loss_records else {}
        return {
            "state": state,
            "returncode": code,
            "command": run.command,
            "config_path": str(run.config_path),
            "metrics_path": str(run.watch.metrics_path),
            "step": last.get("step", 0),
            "max_steps": run.max_steps,
            "loss": last.get("loss"),
            "lr": last.get("lr"),
            "elapsed_s": round((run.ended_at if run.ended_at is not None else self._clock()) - run.started_at, 1),
            "records": run._records[since:],
            "record_count": len(run._records),
            "samples": latest_samples(run.watch),
            "log": _tail(run.log_path),
        }

    def sample_file(self, name: str) -> Path | None:
        """A sample image of the current run by its path relative to the samples folder (nothing outside it)."""
        run = self._run
        if run is None:
            return None
        root = run.watch.samples_dir.resolve()
        path = (root / name).resolve()
        if root not in path.parents or path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            return None
        return path

    def shutdown(self) -> None:
        self.stop(grace_s=2.0)


def latest_samples(watch: RunWatch, limit: int = 8) -> list[dict]:
    """Newest sample images written by this run, newest first, as paths relative to the samples folder."""
    root = watch.samples_dir
    if not root.is_dir():
        return []
    found = []
    for path in root.rglob("*"):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            mtime = path.stat().st_mtime
            if mtime >= watch.samples_since:
                found.append((mtime, path))
    found.sort(key=lambda item: (item[0], str(item[1])), reverse=True)
    return [{"name": p.relative_to(root).as_posix(), "mtime": m} for m, p in found[:limit]]


def _read_new_records(run: Run) -> None:
    """Append the complete JSONL lines written since the last read (a half-written last line waits)."""
    path = run.watch.metrics_path
    if not path.exists():
        return
    with open(path, "rb") as f:
        f.seek(max(run.watch.metrics_offset, run._read_pos))
        chunk = f.read()
        run._read_pos = f.tell()
    lines = (run._partial + chunk).split(b"\n")
    run._partial = lines.pop()  # b"" when the chunk ended on a newline
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            run._records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a foreign line in the file: skip it rather than stop reporting


def _tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - chars))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    # tqdm redraws with carriage returns: keep only the last state of each line
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass
