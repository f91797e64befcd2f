"""Sweep files (sweeps/*.yaml) -> a typed SweepSpec, and its expansion into the list of runs.

A sweep varies one axis at a time around a base point (model, rank): each axis lists its values and the optimizer
variants it runs; every (optimizer, model, rank) cell is trained at every LR of that optimizer's grid (factor-2
steps around its centre) for every seed. Cells shared between axes (the base point) run once.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

AXES = ("rank", "model")  # what an axis varies: the LoRA rank, or the base model (width, depth, family)
MODEL_SOURCES = ("demo", "tiny_sdxl", "tiny_flow", "demo_flux", "demo_sd3")


class SweepError(ValueError):
    """A problem in a sweep file, reported on one line naming the file and the key."""


@dataclass(frozen=True)
class ModelSpec:
    """A base model variant. `demo`: the embedded demo's pretrained tiny SDXL base (tuneonce.demo); `tiny_sdxl`: the
    tiny SDXL pipeline with its UNet widened (`width_multiplier`) and/or deepened (`depth_multiplier`), optionally
    pretrained with the demo's recipe for `pretrain_steps` UNet steps (0 = its deterministic init); `tiny_flow`: a
    tiny flow-matching DiT pipeline of tuneonce.model.tiny_flow (`kind`, deterministic init); `demo_flux`: the Flux
    demo's architecture (tuneonce.demo.flux: the sweep's SDXL demo base's VAE and CLIP, a tiny T5 and Flux transformer)
    with its transformer pretrained on the demo's pretraining domain for `pretrain_steps` flow-matching steps at
    AdamW peak LR `pretrain_lr` (0 = tuneonce.demo.flux.FLUX_PRETRAIN_LR)."""

    name: str
    family: str
    source: str
    width_multiplier: float = 1  # an int when whole (keeps cache keys of older models); 0.5 halves a DiT's heads
    depth_multiplier: int = 1
    pretrain_steps: int = 0
    kind: str = ""
    seed: int = 0
    pretrain_lr: float = 0.0  # added later: lab.sweep.models leaves it out of the cache key at its default


@dataclass(frozen=True)
class OptimizerVariant:
    name: str
    lr_center: float
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted config keys -> values
    # The LR a user keeps everywhere: None = the best LR of the base point (tuned once); a number = never tuned
    # (Prodigy's lr 1). The report's "cost of one LR" is measured at it.
    fixed_lr: float | None = None
    # The config key the grid varies: optimizer.lr, or e.g. optimizer.prodigy_d_coef (Prodigy at lr 1 tunes d_coef).
    # Records keep the grid value under "lr".
    grid_key: str = "optimizer.lr"
    points: int = 0  # grid points of this optimizer (0: the sweep's lr_points)


@dataclass(frozen=True)
class AxisSpec:
    name: str
    varies: str  # "rank" or "model"
    values: tuple[Any, ...]
    optimizers: tuple[str, ...]
    # The value whose best LR a user keeps across this axis (None: the sweep's base point), e.g. the narrowest DiT
    # of a DiT width axis.
    reference: Any = None


@dataclass(frozen=True)
class RunPlan:
    """One training run of the sweep."""

    optimizer: str
    model: str
    rank: int
    lr: float
    seed: int
    steps: int

    @property
    def run_id(self) -> str:
        return f"{self.optimizer}|{self.model}|r{self.rank}|lr{self.lr:.6g}|s{self.seed}|n{self.steps}"

    @property
    def folder_name(self) -> str:
        return hashlib.sha1(self.run_id.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class SweepSpec:
    name: str
    base_config: Path
    overrides: dict[str, Any]
    steps: int
    seeds: tuple[int, ...]
    lr_points: int
    base_model: str
    base_rank: int
    models: dict[str, ModelSpec]
    optimizers: dict[str, OptimizerVariant]
    axes: tuple[AxisSpec, ...]
    train_images: int = 16
    val_images: int = 8

    def lr_grid(self, optimizer: str) -> list[float]:
        """`lr_points` LRs in factor-2 steps, centred on the optimizer's lr_center (one more above if even)."""
        center = self.optimizers[optimizer].lr_center
        points = self.optimizers[optimizer].points or self.lr_points
        low = -((points - 1) // 2)
        return [center * 2.0**k for k in range(low, low + points)]

    def runs(self) -> list[RunPlan]:
        """Every run of every axis, without duplicates, in axis order (the base point first)."""
        plans: dict[str, RunPlan] = {}
        for axis in self.axes:
            for value in axis.values:
                model = value if axis.varies == "model" else self.base_model
                rank = int(value) if axis.varies == "rank" else self.base_rank
                for optimizer in axis.optimizers:
                    for lr in self.lr_grid(optimizer):
                        for seed in self.seeds:
                            plan = RunPlan(optimizer, model, rank, lr, seed, self.steps)
                            plans.setdefault(plan.run_id, plan)
        return list(plans.values())


def restrict(spec: SweepSpec, *, seeds: list[int] | None = None, optimizers: list[str] | None = None,
             axes: list[str] | None = None, models: list[str] | None = None) -> SweepSpec:
    """The same sweep limited to some seeds, optimizers, axes and models (run ids are unchanged, so results are
    shared; `models` keeps the values of model axes that are listed, and rank axes only if the base model is)."""
    for name in models or ():
        if name not in spec.models:
            raise SweepError(f"--models: {name!r} is not in the sweep ({', '.join(spec.models)})")
    for name in optimizers or ():
        if name not in spec.optimizers:
            raise SweepError(f"--optimizers: {name!r} is not in the sweep ({', '.join(spec.optimizers)})")
    for name in axes or ():
        if name not in {a.name for a in spec.axes}:
            raise SweepError(f"--axes: {name!r} is not in the sweep ({', '.join(a.name for a in spec.axes)})")
    kept = []
    for axis in spec.axes:
        if axes and axis.name not in axes:
            continue
        names = tuple(o for o in axis.optimizers if not optimizers or o in optimizers)
        values = axis.values
        if models:
            values = tuple(v for v in values if v in models) if axis.varies == "model" else (
                values if spec.base_model in models else ())
        if names and values:
            kept.append(dataclasses.replace(axis, optimizers=names, values=values))
    return dataclasses.replace(spec, seeds=tuple(seeds) if seeds else spec.seeds, axes=tuple(kept))


def _require(data: dict, key: str, where: str) -> Any:
    if key not in data:
        raise SweepError(f"{where}: missing key {key!r}")
    return data[key]


def _check_keys(data: Any, allowed: set[str], where: str) -> dict:
    if not isinstance(data, dict):
        raise SweepError(f"{where}: expected a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise SweepError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")
    return data


def _model(name: str, data: Any, where: str) -> ModelSpec:
    keys = {"family", "source", "width_multiplier", "depth_multiplier", "pretrain_steps", "kind", "seed", "pretrain_lr"}
    data = _check_keys(data, keys, where)
    source = _require(data, "source", where)
    if source not in MODEL_SOURCES:
        raise SweepError(f"{where}.source: {source!r} is not one of {', '.join(MODEL_SOURCES)}")
    spec = ModelSpec(name=name, family=str(_require(data, "family", where)), source=source,
                     width_multiplier=_whole_if_possible(float(data.get("width_multiplier", 1))),
                     depth_multiplier=int(data.get("depth_multiplier", 1)),
                     pretrain_steps=int(data.get("pretrain_steps", 0)), kind=str(data.get("kind", "")),
                     seed=int(data.get("seed", 0)), pretrain_lr=float(data.get("pretrain_lr", 0.0)))  # fmt: skip
    if not spec.width_multiplier > 0 or spec.depth_multiplier < 1 or spec.pretrain_steps < 0:
        raise SweepError(f"{where}: width_multiplier must be > 0, depth_multiplier >= 1 and pretrain_steps >= 0")
    if spec.width_multiplier < 1 and source != "demo_flux":
        raise SweepError(f"{where}.width_multiplier: below 1 only for a demo_flux DiT (fewer heads), "
                         f"got {spec.width_multiplier}")
    if not (spec.pretrain_lr >= 0 and math.isfinite(spec.pretrain_lr)):
        raise SweepError(f"{where}.pretrain_lr: must be a number >= 0 (0 = the source's default), "
                         f"got {spec.pretrain_lr}")
    if source == "tiny_flow" and not spec.kind:
        raise SweepError(f"{where}.kind: a tiny_flow model needs a kind (e.g. flux-schnell)")
    wanted = {"demo_flux": "flux", "demo_sd3": "sd3"}.get(source)
    if wanted and spec.family != wanted:
        raise SweepError(f"{where}.family: a {source} model is a {wanted} pipeline; set family: {wanted}, "
                         f"not {spec.family!r}")
    return spec


def _whole_if_possible(x: float) -> float | int:
    return int(x) if x.is_integer() else x


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and check a sweep file; every problem is a one-line SweepError naming the file and key."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise SweepError(f"{path}: cannot read sweep file ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: not valid YAML ({getattr(e, 'problem', e)})") from None
    top = {"name", "base_config", "overrides", "steps", "seeds", "lr_points", "base_point", "models", "optimizers",
           "axes", "train_images", "val_images"}  # fmt: skip
    data = _check_keys(data, top, str(path))
    where = str(path)
    models = {name: _model(name, m, f"{where}: models.{name}") for name, m in _require(data, "models", where).items()}
    optimizers = {}
    for name, o in _require(data, "optimizers", where).items():
        o = _check_keys(o, {"lr_center", "overrides", "fixed_lr", "grid_key", "points"}, f"{where}: optimizers.{name}")
        center = float(_require(o, "lr_center", f"{where}: optimizers.{name}"))
        if not (center > 0 and math.isfinite(center)):
            raise SweepError(f"{where}: optimizers.{name}.lr_center: must be a positive number, got {center}")
        fixed = o.get("fixed_lr")
        optimizers[name] = OptimizerVariant(name, center, dict(o.get("overrides") or {}),
                                            None if fixed is None else float(fixed),
                                            str(o.get("grid_key", "optimizer.lr")), int(o.get("points", 0)))
    base = _check_keys(_require(data, "base_point", where), {"model", "rank"}, f"{where}: base_point")
    base_model, base_rank = str(_require(base, "model", f"{where}: base_point")), int(_require(base, "rank", f"{where}: base_point"))
    if base_model not in models:
        raise SweepError(f"{where}: base_point.model: {base_model!r} is not in models ({', '.join(models)})")
    axes = []
    for name, a in _require(data, "axes", where).items():
        aw = f"{where}: axes.{name}"
        a = _check_keys(a, {"varies", "values", "optimizers", "reference"}, aw)
        varies = _require(a, "varies", aw)
        if varies not in AXES:
            raise SweepError(f"{aw}.varies: {varies!r} is not one of {', '.join(AXES)}")
        values = tuple(_require(a, "values", aw))
        if varies == "model":
            for v in values:
                if v not in models:
                    raise SweepError(f"{aw}.values: model {v!r} is not in models ({', '.join(models)})")
        elif not all(isinstance(v, int) and v >= 1 for v in values):
            raise SweepError(f"{aw}.values: ranks must be positive integers, got {list(values)}")
        names = a.get("optimizers", "all")
        names = tuple(optimizers) if names == "all" else tuple(names)
        for n in names:
            if n not in optimizers:
                raise SweepError(f"{aw}.optimizers: {n!r} is not in optimizers ({', '.join(optimizers)})")
        reference = a.get("reference")
        if reference is not None and reference not in values:
            raise SweepError(f"{aw}.reference: {reference!r} is not one of its values {list(values)}")
        axes.append(AxisSpec(name, varies, values, names, reference))
    seeds = tuple(int(s) for s in _require(data, "seeds", where))
    steps, lr_points = int(_require(data, "steps", where)), int(data.get("lr_points", 5))
    if not seeds or steps < 1 or lr_points < 1:
        raise SweepError(f"{where}: seeds must be non-empty, steps and lr_points >= 1")
    base_config = (path.parent / str(_require(data, "base_config", where))).resolve()
    if not base_config.is_file():
        raise SweepError(f"{where}: base_config: {base_config} does not exist")
    spec = SweepSpec(
        name=str(data.get("name", path.stem)), base_config=base_config, overrides=dict(data.get("overrides") or {}),
        steps=steps, seeds=seeds, lr_points=lr_points, base_model=base_model, base_rank=base_rank, models=models,
        optimizers=optimizers, axes=tuple(axes), train_images=int(data.get("train_images", 16)),
        val_images=int(data.get("val_images", 8)),
    )  # fmt: skip
    for name, variant in optimizers.items():
        grid = spec.lr_grid(name)
        if variant.fixed_lr is not None and not any(math.isclose(variant.fixed_lr, lr, rel_tol=1e-9) for lr in grid):
            raise SweepError(f"{where}: optimizers.{name}.fixed_lr: {variant.fixed_lr} is not on its LR grid {grid}")
    return spec


def override_strings(overrides: dict[str, Any]) -> list[str]:
    """Dotted-key overrides as `--set`-style strings (values as JSON, which is YAML) for tuneonce.config."""
    return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
