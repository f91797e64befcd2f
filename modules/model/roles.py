"""Per-parameter roles and widths for the optimizer (fills modules/optimizer/param_spec.py's ParamInfo).

Every trainable parameter of every component gets a GroupSpec: its role (matrix, conv, LoRA factor,
vector, embedding, DoRA magnitude, OFT), fan_in / fan_out (conv: out, in·kh·kw), and for LoRA factors
the adapted layer's fans, the LoRA scale alpha/r and a pair id shared by the two factors; plus the
residual depth of its component (modules/model/depth.py).

Adapter names understood:
  PEFT      <layer>.lora_A.<adapter>.weight / lora_B / lora_magnitude_vector / lora_embedding_A|B, oft_R
  kohya     <module>.lora_down.weight / lora_up.weight (+ <module>.alpha), LyCORIS LoCon the same, dora_scale
  LyCORIS   hada_w{1,2}_{a,b} (LoHa), lokr_w{1,2}[_a|_b] (LoKr)
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from tuneonce.model.depth import ComponentDepth, DepthOverride, DepthSource, model_depths
from tuneonce.optimizer.groups import adapted_layer_fans
from tuneonce.optimizer.param_spec import GroupSpec, ParamInfo, Role

_PEFT_FACTORS = {"lora_A": Role.LORA_A, "lora_B": Role.LORA_B}
_KOHYA_FACTORS = {"lora_down": Role.LORA_A, "lora_up": Role.LORA_B}
_OFT_NAMES = ("oft_R", "oft_r", "oft_blocks", "boft_R")


def _fans(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """fan_in, fan_out of a weight laid out (out, in, *kernel): conv fan_in is in·kh·kw."""
    fan_out = shape[0]
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
    return max(fan_in, 1), max(fan_out, 1)


def _plain_spec(param: torch.Tensor, owner: nn.Module, local: str, depth: int) -> GroupSpec:
    """Role of an ordinary (non-adapter) parameter from the layer that owns it."""
    n = max(param.numel(), 1)
    if param.ndim <= 1:
        return GroupSpec(Role.VECTOR, fan_in=n, fan_out=n, depth=depth)
    if isinstance(owner, nn.Embedding):
        return GroupSpec(Role.EMBEDDING, fan_in=param.shape[0], fan_out=param.shape[1], depth=depth)
    if isinstance(owner, nn.Linear):
        return GroupSpec(Role.MATRIX, fan_in=param.shape[1], fan_out=param.shape[0], depth=depth)
    if type(owner).__name__ == "Conv1D" and local == "weight":  # transformers' (in, out) layout
        fan_in, fan_out = adapted_layer_fans(owner)
        return GroupSpec(Role.MATRIX, fan_in=fan_in, fan_out=fan_out, depth=depth)
    if isinstance(owner, nn.modules.conv._ConvNd):
        fan_in, fan_out = _fans(param.shape)
        return GroupSpec(Role.CONV, fan_in=fan_in, fan_out=fan_out, depth=depth)
    # a bare nn.Parameter: squeeze singleton axes before deciding
    squeezed = [s for s in param.shape if s != 1]
    if len(squeezed) <= 1:
        return GroupSpec(Role.VECTOR, fan_in=n, fan_out=n, depth=depth)
    if any(hint in local.lower() for hint in ("embed", "pos", "token", "register")):
        return GroupSpec(Role.EMBEDDING, fan_in=squeezed[0], fan_out=math.prod(squeezed[1:]), depth=depth)
    fan_in, fan_out = _fans(tuple(squeezed))
    return GroupSpec(Role.MATRIX if len(squeezed) == 2 else Role.CONV, fan_in=fan_in, fan_out=fan_out, depth=depth)


def _factor_spec(param: torch.Tensor, role: Role, base: tuple[int, int], scale: float, depth: int) -> GroupSpec:
    fan_in, fan_out = _fans(param.shape)
    return GroupSpec(
        role, fan_in=fan_in, fan_out=fan_out, depth=depth, base_fan_in=base[0], base_fan_out=base[1], lora_scale=scale
    )


def _alpha_scale(module: nn.Module, rank: int) -> float:
    """kohya / LyCORIS scale alpha/rank from the module's `alpha` (tensor or number); 1 when absent."""
    alpha = getattr(module, "alpha", None)
    if isinstance(alpha, torch.Tensor) and alpha.numel() == 1 and alpha.device.type != "meta":
        alpha = float(alpha)
    if isinstance(alpha, (int, float)) and alpha > 0 and rank > 0:
        return float(alpha) / rank
    scale = getattr(module, "scale", None)
    return float(scale) if isinstance(scale, (int, float)) and scale > 0 else 1.0


class _Builder:
    """Walks one component's modules and emits a ParamInfo per trainable parameter."""

    def __init__(self, component: str, model: nn.Module, depth: int) -> None:
        self.component = component
        self.modules = dict(model.named_modules())
        self.depth = depth
        self.infos: list[ParamInfo] = []
        self.seen: set[int] = set()

    def add(self, name: str, param: torch.Tensor, spec: GroupSpec, pair: str | None = None, **extra: object) -> None:
        if not param.requires_grad or id(param) in self.seen:
            return
        self.seen.add(id(param))
        self.infos.append(ParamInfo(name, param, spec, component=self.component, pair=pair, extra=dict(extra)))

    def run(self) -> list[ParamInfo]:
        for path, module in self.modules.items():
            for local, param in module.named_parameters(recurse=False):
                name = f"{path}.{local}" if path else local
                self.classify(path, module, local, name, param)
        return self.infos

    def classify(self, path: str, module: nn.Module, local: str, name: str, param: torch.Tensor) -> None:
        parts = path.split(".") if path else []
        depth = self.depth
        # PEFT: <layer>.lora_A.<adapter> is the factor Linear/Conv; <layer> holds scaling and the base layer
        if len(parts) >= 3 and parts[-2] in _PEFT_FACTORS and local == "weight":
            layer_path, adapter = ".".join(parts[:-2]), parts[-1]
            layer = self.modules[layer_path]
            lora_b = getattr(layer, "lora_B", None)
            up = lora_b[adapter] if isinstance(lora_b, nn.ModuleDict) and adapter in lora_b else None
            if getattr(up, "groups", 1) != 1:  # grouped conv LoRA: not an out x r matrix, no pair math
                self.add(name, param, _plain_spec(param, module, local, depth))
                return
            base = _base_fans(layer)
            scale = float(getattr(layer, "scaling", {}).get(adapter, 1.0))
            spec = _factor_spec(param, _PEFT_FACTORS[parts[-2]], base, scale, depth)
            self.add(name, param, spec, pair=f"{layer_path}:{adapter}", module=layer_path)
            return
        lycoris = len(parts) >= 2 and parts[-1].startswith(("hada_w", "lokr_w"))
        if lycoris and self._peft_lycoris(parts, local, name, param):
            return
        if len(parts) >= 2 and parts[-2] == "lora_magnitude_vector":
            n = max(param.numel(), 1)
            self.add(name, param, GroupSpec(Role.DORA_MAGNITUDE, fan_in=n, fan_out=n, depth=depth), module=path)
            return
        if local.startswith("lora_embedding_"):
            spec = GroupSpec(Role.EMBEDDING, fan_in=param.shape[-1], fan_out=param.shape[0], depth=depth)
            self.add(name, param, spec, module=path)
            return
        if any(part in _OFT_NAMES for part in parts) or local in _OFT_NAMES:
            fan_in, fan_out = (param.shape[-1], param.shape[-2]) if param.ndim >= 2 else (param.numel(), param.numel())
            self.add(name, param, GroupSpec(Role.OFT, fan_in=max(fan_in, 1), fan_out=max(fan_out, 1), depth=depth))
            return
        # kohya / LyCORIS LoCon: <module>.lora_down / lora_up layers, alpha on <module>
        if parts and parts[-1] in _KOHYA_FACTORS and local == "weight":
            owner_path = ".".join(parts[:-1])
            owner = self.modules[owner_path]
            down, up = getattr(owner, "lora_down", None), getattr(owner, "lora_up", None)
            if isinstance(down, nn.Module) and isinstance(up, nn.Module):
                base = (_fans(down.weight.shape)[0], up.weight.shape[0])
                spec = _factor_spec(param, _KOHYA_FACTORS[parts[-1]], base, _alpha_scale(owner, down.weight.shape[0]), depth)
                self.add(name, param, spec, pair=owner_path, module=owner_path)
                return
        if local == "dora_scale":
            n = max(param.numel(), 1)
            self.add(name, param, GroupSpec(Role.DORA_MAGNITUDE, fan_in=n, fan_out=n, depth=depth), module=path)
            return
        if local.startswith(("hada_w", "lokr_w")) and self._lycoris(path, module, local, name, param):
            return
        self.add(name, param, _plain_spec(param, module, local, depth), module=path)

    def _lycoris(self, path: str, module: nn.Module, local: str, name: str, param: torch.Tensor) -> bool:
        """LoHa hada_wK_a (out x r, like B) / hada_wK_b (r x in, like A); LoKr lokr_wK_a / _b the same."""
        if not local.endswith(("_a", "_b")):
            return False  # LoKr full Kronecker factors lokr_w1 / lokr_w2: plain matrices
        stem = local[:-2]
        a, b = getattr(module, f"{stem}_a", None), getattr(module, f"{stem}_b", None)
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.ndim != 2:
            return False
        role = Role.LORA_B if local.endswith("_a") else Role.LORA_A
        base = (_fans(b.shape)[0], a.shape[0])
        # alpha/r multiplies the whole product: counted once, on LoHa's zero-initialised branch 2 (docs/lycoris_muon.md)
        scale = _alpha_scale(module, a.shape[1]) if stem == "hada_w2" else 1.0
        spec = _factor_spec(param, role, base, scale, self.depth)
        self.add(name, param, spec, pair=f"{path}:{stem}", module=path)
        return True

    def _peft_lycoris(self, parts: list[str], adapter: str, name: str, param: torch.Tensor) -> bool:
        """PEFT LoHa / LoKr: <layer>.hada_w1_a.<adapter> is an entry of a ParameterDict on the LyCORIS layer."""
        from tuneonce.model.lycoris import LOHA_NAMES, LOKR_NAMES, factor_spec

        layer_path, stem = ".".join(parts[:-1]), parts[-1]
        layer = self.modules.get(layer_path)
        if stem not in LOHA_NAMES + LOKR_NAMES or not hasattr(layer, "get_base_layer"):
            return False
        spec, pair = factor_spec(layer, stem, adapter, self.depth)
        self.add(name, param, spec, pair=f"{layer_path}:{adapter}:{pair}" if pair else None, module=layer_path)
        return True


def _base_fans(layer: nn.Module) -> tuple[int, int]:
    """fan_in, fan_out of the layer a PEFT adapter wraps (conv: in·kh·kw, out)."""
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else getattr(layer, "base_layer", layer)
    return adapted_layer_fans(base)


def param_infos(
    components: Mapping[str, nn.Module],
    *,
    depth_source: DepthSource = "model",
    depth_override: DepthOverride = None,
    pipeline: str | None = None,
    depths: Mapping[str, ComponentDepth] | None = None,
) -> list[ParamInfo]:
    """A ParamInfo for every trainable parameter of every component (pipeline component name -> module).

    depth_source: "model" (default: the whole component's depth) or "trained" (blocks holding
    trainable parameters). depth_override: the config's ``depth:`` (int for the backbone, or a mapping
    component -> int). pipeline: the diffusers pipeline class, for text-encoder readouts. depths:
    precomputed ``model_depths`` (then depth_override and pipeline are not used).
    """
    if depth_source not in ("model", "trained"):
        raise ValueError(f"depth_source: expected 'model' or 'trained', got {depth_source!r}")
    if depths is None:
        depths = model_depths(components, pipeline=pipeline, depth_override=depth_override)
    infos: list[ParamInfo] = []
    for name, module in components.items():
        depth = depths[name].for_optimizer(depth_source)
        infos.extend(_Builder(name, module, depth).run())
    return infos


__all__ = ["param_infos"]
