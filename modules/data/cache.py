"""On-disk caches of latents and text embeddings (safetensors), keyed by content and settings.

A key is the SHA-256 of every input that changes the cached tensor: the image file's content
hash (not its path or mtime), the bucket size, resize and crop, the flip state, the encoder
identity string the caller passes (e.g. VAE path + dtype + revision) and the stored dtype; for
text, the exact caption string instead of the image. Change any of them and the key changes,
so a stale entry is never read. Files are written to a temporary name and renamed, so a crash
never leaves a half-written entry under a real key.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from tuneonce.util.files import atomic_save

CACHE_FORMAT_VERSION = 1  # bump when the way images are resized/cropped/encoded changes
_content_hashes: dict[tuple[str, int, int], str] = {}


def content_hash(path: Path) -> str:
    """SHA-256 of the file's bytes (memoized per path, size and mtime within the process)."""
    stat = path.stat()
    memo_key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo_key not in _content_hashes:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        _content_hashes[memo_key] = digest.hexdigest()
    return _content_hashes[memo_key]


def settings_key(**parts: object) -> str:
    """SHA-256 of the parts as canonical JSON (sorted keys), plus the cache format version."""
    payload = json.dumps({"version": CACHE_FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class CacheStats:
    """How a cache fill went: entries found on disk, and entries computed by the encoder."""

    hits: int = 0
    encoded: int = 0


class DiskCache:
    """A folder of ``<key>.safetensors`` files, fanned out by the key's first two hex digits."""

    def __init__(self, root: str | Path, kind: str, *, in_memory: bool = False) -> None:
        self.folder = Path(root) / kind
        self.in_memory = in_memory
        self._memory: dict[str, dict[str, torch.Tensor]] = {}

    def path_for(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return key in self._memory or self.path_for(key).is_file()

    def put(self, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        atomic_save(tensors, self.path_for(key), metadata)
        if self.in_memory:
            self._memory[key] = {k: v.detach().cpu() for k, v in tensors.items()}

    def get(self, key: str) -> dict[str, torch.Tensor]:
        if key in self._memory:
            return self._memory[key]
        path = self.path_for(key)
        try:
            tensors = load_file(path)
        except Exception as err:  # a missing or damaged entry: say which file
            raise RuntimeError(f"cannot read cache file {path}: {err} (delete it to re-encode)") from err
        if self.in_memory:
            self._memory[key] = tensors
        return tensors
