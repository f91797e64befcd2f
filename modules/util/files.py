"""Small file helpers shared by the savers and caches."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file


class NonFiniteError(ValueError):
    """Tensors about to be written hold NaN or inf: nothing is written (the message is one line)."""


def check_finite(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], path: Path | str) -> None:
    """Raise `NonFiniteError` naming `path`, the count and the first tensors when any floating value is not finite.
    One fused reduction per tensor (no copy); the counting only runs on the bad path."""
    items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
    floats = [(k, t.detach()) for k, t in items if t.is_floating_point() and t.numel()]
    if not floats:
        return
    flags = torch.stack([torch.isfinite(t).all().to("cpu") for _, t in floats])
    if bool(flags.all()):
        return
    bad = [(k, int((~torch.isfinite(t)).sum())) for (k, t), ok in zip(floats, flags.tolist()) if not ok]
    count, total = sum(n for _, n in bad), sum(t.numel() for _, t in floats)
    shown = ", ".join(k for k, _ in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    raise NonFiniteError(
        f"refusing to write {path}: {count} of {total} values are not finite (NaN/inf) in {shown}; nothing written"
    )


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file via a temporary file in the same folder, then rename it into place, so readers
    never see a half-written file. Non-finite tensors are refused before anything is written."""
    check_finite(tensors, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp_name, metadata=metadata)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


@contextmanager
def staged_folder(folder: Path | str) -> Iterator[Path]:
    """Write a folder whole or not at all: yields a fresh empty staging folder beside `folder` (same file system);
    when the block ends normally the staging folder replaces `folder` (any old one is removed first), so a reader never
    sees it half-written; when the block raises, the staging folder is removed and `folder` is left as it was."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    try:
        yield staging
        shutil.rmtree(folder, ignore_errors=True)
        staging.replace(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
