"""Checks that turn bad input into one line (CLI exit code 2) before a run spends time on it.

- Output folders (`saving.output_dir`, `logging.log_dir`, `data.cache_dir`): not a file, writable, and with free
  space for what the run will write. Before any model loads the estimate is what can be known from the config and
  the base model's files (a finetune writes about its backbone's size; a LoRA run needs `MIN_FREE_BYTES`); once the
  trained parameters exist, `check_free_space` repeats it with their count.
- Image memory: the largest training image must be encodable by the VAE in the memory there is
  (`vae_encode_bytes`).

Nothing here imports torch, so the CLI can run the output checks before the heavy imports.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

MIN_FREE_BYTES = 64 * 2**20  # logs, caches and a LoRA file of a small run
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class InputError(ValueError):
    """Bad input found while setting up a run (one line naming the field, file or value); the CLI exits 2."""


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def existing_ancestor(path: Path) -> Path:
    """`path` itself or the nearest ancestor that exists (what a mkdir -p would start from)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_dir(field: str, path: Path) -> Path:
    """One line naming `field` and `path` unless `path` is (or can be made) a writable folder; changes nothing.
    Returns the existing folder the check ended at."""
    base = existing_ancestor(path)
    if not base.is_dir():
        where = "is a file" if base == path.absolute() else f"is inside {base}, which is a file"
        raise InputError(f"{field}: {path} {where}, not a folder; choose another {field}")
    if not os.access(base, os.W_OK | os.X_OK):
        raise InputError(f"{field}: {path} is not writable (no write permission on {base})")
    try:  # a read-only or full file system passes os.access; a real file creation does not
        fd, probe = tempfile.mkstemp(prefix=".tuneonce-probe-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(f"{field}: {path} is not writable (cannot create a file in {base}: {e.strerror or e})") from e
    return base


def backbone_weight_bytes(base_model: str) -> int:
    """Size of the base model's denoiser weights on disk (what a finetune saves), 0 when unknown."""
    base = Path(base_model)
    if base.is_file():
        return base.stat().st_size
    sizes = [sum(p.stat().st_size for p in (base / sub).glob("*.safetensors")) for sub in ("unet", "transformer")]
    return max(sizes, default=0)


def output_estimate(config: Any) -> tuple[int, str]:
    """(bytes, how) the run will write at least, from the config and the base model's files alone."""
    if config.method == "finetune":
        weights = backbone_weight_bytes(config.model.base_model)
        if weights:
            # the saved model plus one checkpoint (weights and two moments: Adam-like state) written on a stop
            return 4 * weights, f"4 x the base model's {human(weights)} denoiser: final file + one checkpoint"
    return MIN_FREE_BYTES, "minimum for logs, caches and a LoRA file"


def output_fields(config: Any) -> Iterable[tuple[str, Path]]:
    yield "saving.output_dir", Path(config.saving.output_dir)
    if config.logging.log_dir:
        yield "logging.log_dir", Path(config.logging.log_dir)
    if config.data.cache_dir:
        yield "data.cache_dir", Path(config.data.cache_dir)


def check_outputs(config: Any) -> None:
    """Every output folder of the run is a writable folder with room for the run's files (`InputError` if not)."""
    for field, path in output_fields(config):
        base = check_writable_dir(field, path)
        if field == "saving.output_dir":
            need, how = output_estimate(config)
            check_free_space(field, path, base, need, how)


def check_free_space(field: str, path: Path, base: Path | None, need: int, how: str) -> None:
    base = base or existing_ancestor(path)
    free = shutil.disk_usage(base).free
    if free < need:
        raise InputError(f"{field}: {path} has {human(free)} free, the run needs about {human(need)} ({how})")


def trained_output_bytes(config: Any, n_trained: int) -> tuple[int, str]:
    """Bytes of the final file plus one checkpoint (float32 weights and two optimizer moments) for `n_trained`
    trained values."""
    final = n_trained * DTYPE_BYTES[config.saving.dtype]
    checkpoint = n_trained * 4 * 3
    how = f"{n_trained:,} trained values: final file {human(final)} + checkpoint {human(checkpoint)}"
    return final + checkpoint, how


# ---- image memory ---------------------------------------------------------------------------------------------------
def vae_config(config: Any) -> dict[str, Any]:
    """The base model's VAE config.json (or components_from's); {} when there is none to read."""
    for root in (config.model.base_model, config.model.components_from):
        if root and (Path(root) / "vae" / "config.json").is_file():
            return json.loads((Path(root) / "vae" / "config.json").read_text(encoding="utf-8"))
    return {}


def vae_encode_bytes(width: int, height: int, vae: dict[str, Any], dtype: str, *, attention_scores: bool) -> int:
    """Rough peak memory of encoding one `width` x `height` image with an AutoencoderKL:

    - the first stage holds about 4 maps of C0 x H x W values (input, norm, activation, convolution output;
      C0 = block_out_channels[0], 128 for SD/SDXL/Flux VAEs);
    - the mid-block self-attention (when the VAE has one) over tokens = H*W / f^2 (f = 2^(stages-1), the VAE's
      downsampling) materializes tokens^2 scores where attention is not fused (`attention_scores`: on CPU).
    """
    size = DTYPE_BYTES[dtype]
    channels = list(vae.get("block_out_channels", (128, 256, 512, 512)))
    stage = 4 * channels[0] * width * height * size
    scores = 0
    if attention_scores and vae.get("mid_block_add_attention", True):
        f = 2 ** (len(channels) - 1)
        tokens = (width // f) * (height // f)
        scores = tokens * tokens * size
    return stage + scores


def available_memory_bytes() -> int | None:
    """MemAvailable of this machine (Linux), None when unknown."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_image_memory(config: Any, largest: tuple[int, int], available: int | None, *, on_cpu: bool) -> None:
    """`InputError` naming data.resolution when encoding the largest training image would not fit `available`."""
    if available is None:
        return
    width, height = largest
    need = vae_encode_bytes(width, height, vae_config(config), config.model.vae_dtype, attention_scores=on_cpu)
    if need > available:
        where = "RAM" if on_cpu else "accelerator memory"
        resolutions = getattr(config.data, "resolutions", None)
        key, value = ("data.resolutions", resolutions) if resolutions else ("data.resolution", config.data.resolution)
        raise InputError(
            f"{key}: {value} trains images up to {width}x{height}, whose VAE encode needs "
            f"about {human(need)} (modules/trainer/preflight.py: vae_encode_bytes), more than the {human(available)} "
            f"of free {where}; lower {key}" + (" or set data.upscale: false" if config.data.upscale else "")
        )
