"""Frozen base weights stored quantized (weight-only): bfloat16, float8 e4m3, int8, NF4.

`QuantLinear` is an `nn.Linear` subclass, so PEFT's default dispatcher wraps it like any Linear (LoRA and DoRA
factors in the train dtype sit on top), the roles/depth code reads the same `in_features`/`out_features`, and the
module names (hence LoRA file keys) stay those of the float model. Its `weight` is a read-only property that
dequantizes, which is what PEFT's DoRA (`dequantize_module_weight`) and anything else reading `.weight` see.

Why our own small module rather than bitsandbytes / torchao / optimum-quanto (all three install on CPU with torch
2.13 and PEFT injects into each): each keeps its quantized state its own way (bnb's quant_state beside a packed
Params4bit, torchao's tensor subclasses, quanto's QTensor), so offloading (modules/model/offload.py swaps plain
tensors), the planner's byte counts and DoRA would need a path per library; bnb's CPU 4-bit kernel is fetched from
the Hub (`kernels`), torchao follows torch releases; here the formats are a few lines each and testable against
closed forms. The backward saves nothing for the frozen weight (a custom autograd function dequantizes again, as
bitsandbytes does), so a layer's dequantized copy never lives across the forward. The price is GPU speed against
fused kernels (not measured yet).
Formats: int8 per-output-row absmax (LLM.int8()'s vector-wise scale without the outlier split); float8 e4m3 with a
per-row scale to the format's max 448 (as in torchao's float8 weight-only); NF4 from QLoRA (Dettmers et al. 2023):
16 normal-quantile levels, absmax per block of 64 values, two codes per byte (the double quantization of the
block scales is left out: 4 bytes per 64 values, 0.5 bit per weight).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn import functional as F

QUANT_MODES = ("none", "bfloat16", "float8", "int8", "nf4")
NF4_BLOCK = 64
FLOAT8_MAX = 448.0  # largest finite float8_e4m3fn value
# The 16 NF4 levels of QLoRA (quantiles of N(0, 1) normalized to [-1, 1], exact zero included), as published.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


def _row_scale(weight: torch.Tensor, top: float) -> torch.Tensor:
    absmax = weight.abs().amax(dim=1, keepdim=True).float()
    return torch.where(absmax > 0, absmax / top, torch.ones_like(absmax))


def quantize_weight(weight: torch.Tensor, mode: str) -> dict[str, torch.Tensor]:
    """The stored tensors of one 2-D weight in `mode` (see `dequantize_weight`)."""
    w = weight.detach().float()
    if mode == "bfloat16":
        return {"data": w.to(torch.bfloat16)}
    if mode == "int8":
        scale = _row_scale(w, 127.0)
        return {"data": torch.round(w / scale).clamp_(-127, 127).to(torch.int8), "scale": scale}
    if mode == "float8":
        scale = _row_scale(w, FLOAT8_MAX)
        # stored as uint8 bytes: Module.to(dtype) casts every floating tensor (float8 included) and would undo it
        return {"data": (w / scale).to(torch.float8_e4m3fn).view(torch.uint8), "scale": scale}
    if mode == "nf4":
        flat = w.reshape(-1)
        pad = (-flat.numel()) % NF4_BLOCK
        blocks = F.pad(flat, (0, pad)).reshape(-1, NF4_BLOCK)
        absmax = blocks.abs().amax(dim=1, keepdim=True)
        absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
        # nearest level via the midpoints (a tie goes to the lower level, as an argmin of distances would), without
        # a 16x distance tensor: a 12288 x 3072 layer stays at its own size while it is quantized
        levels = torch.tensor(NF4_LEVELS)
        midpoints = (levels[1:] + levels[:-1]) / 2
        codes = torch.bucketize(blocks / absmax, midpoints, out_int32=True).to(torch.uint8).reshape(-1)
        return {"data": (codes[0::2] << 4) | codes[1::2], "scale": absmax.reshape(-1)}
    raise ValueError(f"quantization mode must be one of {', '.join(QUANT_MODES[1:])}, got {mode!r}")


def dequantize_weight(stored: dict[str, torch.Tensor], mode: str, shape: torch.Size, dtype: torch.dtype,
                      levels: torch.Tensor | None = None) -> torch.Tensor:
    """The weight back from `quantize_weight`'s tensors, in `dtype`; `levels`: the NF4 table on the data's device."""
    data = stored["data"]
    if mode == "bfloat16":
        return data.to(dtype)
    if mode == "int8":
        return (data.float() * stored["scale"]).to(dtype)
    if mode == "float8":
        return (data.view(torch.float8_e4m3fn).float() * stored["scale"]).to(dtype)
    codes = torch.stack((data >> 4, data & 15), dim=-1).reshape(-1).long()
    if levels is None or levels.device != data.device:
        levels = torch.tensor(NF4_LEVELS, device=data.device)
    values = (levels[codes].reshape(-1, NF4_BLOCK) * stored["scale"].unsqueeze(1)).reshape(-1)
    return values[: shape.numel()].reshape(shape).to(dtype)


_LEVELS: dict[torch.device, torch.Tensor] = {}


def _nf4_levels(device: torch.device) -> torch.Tensor:
    """The NF4 table on `device`, made once per device (no host-to-device copy per forward)."""
    if device not in _LEVELS:
        _LEVELS[device] = torch.tensor(NF4_LEVELS, device=device)
    return _LEVELS[device]


class _FrozenQuantMatmul(torch.autograd.Function):
    """y = x W^T for a frozen quantized W: saves no tensor, dequantizes W again in backward for dL/dx."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        return x @ layer.dequantized(x.dtype, x.device).t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad @ ctx.layer.dequantized(grad.dtype, grad.device), None


class QuantLinear(nn.Linear):
    """A frozen Linear whose weight is stored quantized (buffers `qdata`, `qscale`); bias stays a frozen tensor."""

    def __init__(self, linear: nn.Linear, mode: str) -> None:
        nn.Module.__init__(self)  # nn.Linear.__init__ would allocate a float weight
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.mode, self.compute_dtype = mode, linear.weight.dtype
        self.weight_shape = linear.weight.shape
        stored = quantize_weight(linear.weight, mode)
        self.register_buffer("qdata", stored["data"])
        self.register_buffer("qscale", stored.get("scale"))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def dequantized(self, dtype: torch.dtype | None = None, device: torch.device | None = None) -> torch.Tensor:
        stored = {"data": self.qdata, "scale": self.qscale}
        if device is not None and self.qdata.device != device:  # offloaded: the hooks normally moved it already
            stored = {k: v.to(device, non_blocking=True) for k, v in stored.items() if v is not None}
        levels = _nf4_levels(stored["data"].device) if self.mode == "nf4" else None
        return dequantize_weight(stored, self.mode, self.weight_shape, dtype or self.compute_dtype, levels)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        """The dequantized weight in the compute dtype (a fresh tensor: read-only in effect)."""
        return self.dequantized()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):  # compute in the autocast dtype like F.linear would
            x = x.to(torch.get_autocast_dtype(x.device.type))
        elif x.dtype != self.compute_dtype and x.dtype.is_floating_point:
            x = x.to(self.compute_dtype)
        y = _FrozenQuantMatmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qdata, self.qscale) if t is not None)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"


def quantize_linears(module: nn.Module, mode: str, *, skip: Iterable[str] = ()) -> list[str]:
    """Replace every nn.Linear below `module` (names not starting with one of `skip`) by a QuantLinear in `mode`,
    in place; returns the replaced names. 'none' changes nothing."""
    if mode == "none":
        return []
    if mode not in QUANT_MODES:
        raise ValueError(f"quantization mode must be one of {', '.join(QUANT_MODES)}, got {mode!r}")
    skip = tuple(skip)
    targets = [
        (name, sub) for name, sub in module.named_modules()
        if type(sub) is nn.Linear and not (skip and name.startswith(skip)) and sub.weight.device.type != "meta"
    ]  # fmt: skip
    for name, sub in targets:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, QuantLinear(sub, mode))
    return [name for name, _ in targets]


def quantize_components(components: dict, modes: dict[str, str]) -> dict[str, int]:
    """Quantize each named pipeline component's Linear layers in place (memory.quantize); returns layers per
    component. A component the pipeline lacks is an error naming the config field."""
    done = {}
    for name, mode in modes.items():
        module = components.get(name)
        if not isinstance(module, nn.Module):
            field = "denoiser" if name in ("unet", "transformer") else name
            raise ValueError(f"memory.quantize.{field}: this model has no component {name} to quantize")
        done[name] = len(quantize_linears(module, mode))
    return done


def weight_bytes_by_dtype(module: nn.Module) -> dict[str, int]:
    """Bytes of a module's parameters and buffers by storage kind ('nf4', 'int8', 'float32', ...); quantized
    layers count their stored data and scales under their mode."""
    out: dict[str, int] = {}
    quant_tensors: set[int] = set()
    for sub in module.modules():
        if isinstance(sub, QuantLinear):
            out[sub.mode] = out.get(sub.mode, 0) + sub.stored_bytes()
            quant_tensors.update(id(t) for t in (sub.qdata, sub.qscale) if t is not None)
    seen: set[int] = set()
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) in quant_tensors or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        key = str(tensor.dtype).removeprefix("torch.")
        out[key] = out.get(key, 0) + tensor.numel() * tensor.element_size()
    return out


__all__ = ["QUANT_MODES", "QuantLinear", "dequantize_weight", "quantize_components", "quantize_linears",
           "quantize_weight", "weight_bytes_by_dtype"]
