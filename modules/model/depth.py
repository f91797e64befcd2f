"""Residual depth L of each model component (docs/optimizer_math.md §3.1 and §8).

Depth = the number of residual blocks a token passes through from input to output: every block on the
main path once (a joint two-stream block once), plus the longest chain of pre-stack refiners; UNet skip
connections concatenate, so every resnet and transformer block of down, mid and up counts. A text
encoder read out at an intermediate layer counts only the layers up to it.

The trained depth counts only blocks that hold trainable parameters. Both are always reported; the
optimizer uses the model depth unless ``depth_source="trained"``.

Classes missing from the registry (modules/model/architectures) get a structural guess with a
:class:`DepthGuessWarning` naming the lists it counted; a ``depth:`` config value overrides either.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from torch import nn

from tuneonce.model.architectures import Architecture, architecture_for
from tuneonce.model.architectures.pipelines import BACKBONE_COMPONENTS, TEXT_READOUT, layers_used

# names a diffusers pipeline gives its trainable components (a mapping may name one that is not loaded)
COMPONENT_PREFIXES = ("unet", "transformer", "text_encoder", "prior", "decoder")

DepthSource = Literal["model", "trained"]
DepthOverride = int | Mapping[str, int] | None


class DepthGuessWarning(UserWarning):
    """The depth of a component came from a structural guess, not from the architecture registry."""


@dataclass(frozen=True)
class BlockList:
    path: str  # dotted module path of the ModuleList
    blocks: tuple[nn.Module, ...]  # the blocks that count (a text encoder's readout may cut the list)

    def trained_count(self) -> int:
        return sum(1 for block in self.blocks if any(p.requires_grad for p in block.parameters()))

    def describe(self) -> str:
        return f"{self.path}({len(self.blocks)})"


@dataclass(frozen=True)
class ComponentDepth:
    component: str
    class_name: str
    depth: int  # residual depth of the whole component (>= 1)
    trained_depth: int  # blocks holding trainable parameters (0 when none does)
    source: Literal["registry", "guess", "override"]
    counted: tuple[str, ...]  # the block lists counted, e.g. ("transformer_blocks(19)", ...)

    def for_optimizer(self, depth_source: DepthSource) -> int:
        """The L the optimizer uses: model depth, or the trained depth (at least 1)."""
        if depth_source == "model":
            return self.depth
        if depth_source == "trained":
            return max(self.trained_depth, 1)
        raise ValueError(f"depth_source: expected 'model' or 'trained', got {depth_source!r}")


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    return re.compile("^" + r"\.".join("[^.]+" if part == "*" else re.escape(part) for part in pattern.split(".")) + "$")


def find_block_lists(module: nn.Module, patterns: tuple[str, ...]) -> list[BlockList]:
    """The ModuleLists of `module` whose dotted path matches one of `patterns` (``*`` = one path part)."""
    regexes = [_pattern_regex(p) for p in patterns]
    return [
        BlockList(name, tuple(child))
        for name, child in module.named_modules()
        if isinstance(child, nn.ModuleList) and any(r.match(name) for r in regexes)
    ]


def guess_block_lists(module: nn.Module) -> list[BlockList]:
    """Outermost ModuleLists whose items are blocks of one class that hold parameters and sub-layers."""
    found: list[BlockList] = []
    for name, child in module.named_modules():
        if not isinstance(child, nn.ModuleList) or len(child) == 0:
            continue
        if any(name.startswith(f.path + ".") for f in found):
            continue  # inside a block already counted
        first = child[0]
        if len({type(c) for c in child}) != 1 or next(first.children(), None) is None:
            continue  # mixed lists (to_out = [Linear, Dropout]) and lists of bare layers are not blocks
        if next(first.parameters(), None) is None:
            continue
        found.append(BlockList(name, tuple(child)))
    return found


def _truncate(lists: list[BlockList], used: int) -> list[BlockList]:
    """Keep the first `used` blocks (a text encoder read out at an intermediate layer)."""
    out, left = [], used
    for block_list in lists:
        out.append(BlockList(block_list.path, block_list.blocks[:left]))
        left = max(left - len(block_list.blocks), 0)
    return out


def _count(main: list[BlockList], refiners: list[BlockList]) -> tuple[int, int]:
    depth = sum(len(b.blocks) for b in main) + max((len(b.blocks) for b in refiners), default=0)
    trained = sum(b.trained_count() for b in main) + max((b.trained_count() for b in refiners), default=0)
    return depth, trained


def component_depth(
    module: nn.Module,
    *,
    component: str = "model",
    readout: int | None = None,
    override: int | None = None,
) -> ComponentDepth:
    """Depth and trained depth of one component.

    readout: the ``hidden_states`` index a pipeline reads from a text encoder (None = all layers).
    override: a user-given depth (``depth:`` in the config); it replaces the counted depth.
    """
    module = unwrap(module)
    class_name = type(module).__name__
    if override is not None:
        override = _check_depth_value(override, f"depth.{component}")
    arch: Architecture | None = architecture_for(module)
    main: list[BlockList] = []
    refiners: list[BlockList] = []
    source: Literal["registry", "guess", "override"] = "registry"
    if arch is not None:
        main = find_block_lists(module, arch.blocks)
        refiners = find_block_lists(module, arch.refiners)
    if not main:
        source = "guess"
        main, refiners = guess_block_lists(module), []
    if readout is not None and main:
        main = _truncate(main, layers_used(readout, sum(len(b.blocks) for b in main)))
    depth, trained = _count(main, refiners)
    counted = tuple(b.describe() for b in main) + tuple(f"max-refiner:{b.describe()}" for b in refiners)

    if override is not None:
        return ComponentDepth(component, class_name, override, min(trained, override), "override", counted)
    if depth < 1:
        raise ValueError(
            f"cannot find the residual blocks of {class_name} (component {component!r}); "
            f"set depth: {{{component}: N}} in the model config"
        )
    if source == "guess":
        why = "its registry block lists matched nothing" if arch is not None else "it is not in the architecture registry"
        warnings.warn(
            f"depth of {class_name} (component {component!r}) is a structural guess because {why}: "
            f"L = {depth} from {' + '.join(counted)}; set depth: {{{component}: N}} in the model config to override",
            DepthGuessWarning,
            stacklevel=2,
        )
    return ComponentDepth(component, class_name, depth, trained, source, counted)


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside a PEFT PeftModel or a torch.compile wrapper (their class says nothing of the blocks)."""
    while True:
        if hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
            module = module._orig_mod
        elif type(module).__name__.startswith("Peft") and hasattr(module, "get_base_model"):
            module = module.get_base_model()
        else:
            return module


def _check_depth_value(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: expected a positive integer residual depth, got {value!r}")
    return value


def backbone_components(components: Mapping[str, nn.Module]) -> list[str]:
    """The denoiser components (unet / transformer / ...), or the only component when there is one."""
    named = [name for name in components if name in BACKBONE_COMPONENTS]
    if named:
        return named
    not_text = [name for name, m in components.items() if not getattr(architecture_for(m), "is_text_encoder", False)]
    if len(not_text) == 1:
        return not_text
    if len(components) == 1:
        return list(components)
    return []


def resolve_depth_override(value: DepthOverride, components: Mapping[str, nn.Module]) -> dict[str, int]:
    """Turn a config ``depth:`` value into {component: depth}; a bad value is a one-line ValueError.

    An int applies to the backbone (unet / transformer); a mapping names components explicitly (a
    pipeline component that is not among `components`, e.g. a text encoder not being trained, is skipped).
    """
    if value is None:
        return {}
    if isinstance(value, Mapping):
        out: dict[str, int] = {}
        for key, depth in value.items():
            checked = _check_depth_value(depth, f"depth.{key}")
            if key in components:
                out[key] = checked
            elif not str(key).startswith(COMPONENT_PREFIXES):  # a typo, not a component left untrained
                raise ValueError(f"depth.{key}: unknown component {key!r}; components: {', '.join(components)}")
        return out
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f"depth: expected a positive integer or a mapping component -> positive integer, got {value!r}"
        )
    depth = _check_depth_value(value, "depth")
    targets = backbone_components(components)
    if not targets:
        raise ValueError(
            f"depth: a single number needs one backbone component, but these are ambiguous: "
            f"{', '.join(components)}; use a mapping such as {{name: {depth}}}"
        )
    return {name: depth for name in targets}


def model_depths(
    components: Mapping[str, nn.Module],
    *,
    pipeline: str | None = None,
    depth_override: DepthOverride = None,
) -> dict[str, ComponentDepth]:
    """ComponentDepth for every component; `pipeline` (a diffusers pipeline class) sets text readouts."""
    overrides = resolve_depth_override(depth_override, components)
    readouts = TEXT_READOUT.get(pipeline or "", {})
    return {
        name: component_depth(module, component=name, readout=readouts.get(name), override=overrides.get(name))
        for name, module in components.items()
    }


__all__ = [
    "BlockList",
    "ComponentDepth",
    "DepthGuessWarning",
    "DepthOverride",
    "DepthSource",
    "backbone_components",
    "component_depth",
    "find_block_lists",
    "guess_block_lists",
    "model_depths",
    "resolve_depth_override",
    "unwrap",
]
