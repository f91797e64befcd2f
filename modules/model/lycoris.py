"""LyCORIS LoHa and LoKr adapters through PEFT (LoHaConfig / LoKrConfig), and their optimizer roles.

Why PEFT and not the `lycoris-lora` package: PEFT's LoHa/LoKr layers keep the LyCORIS tensor layout for Linear and
(without ``use_effective_conv2d``) Conv2d layers - hada_w{1,2}_{a,b} as (out, r) / (r, in·kh·kw) matrices,
lokr_w1 (a, c), lokr_w2 (b, d[, kh, kw]) or lokr_w2_a (b, r) / lokr_w2_b (r, d·kh·kw) - so a file is the same tensors
renamed, and injection goes through the same ``inject_adapter_in_model`` as LoRA (no second adapter system, no new
dependency). Two differences from LyCORIS are handled here and in lycoris_files.py:

- PEFT's LoHa zero-inits hada_w2_b (r, in); LyCORIS zero-inits hada_w2_a (out, r). We use LyCORIS's choice: then the
  zero factor is the (out, r) one, as LoRA's B, and the optimizer's alpha/r handling of B applies
  (docs/lycoris_muon.md).
- PEFT's LoKr multiplies by alpha/r even when neither factor is decomposed; LyCORIS and its loaders (ComfyUI, kohya
  family, diffusers' LoKr converter) apply no scale then, so the writer folds alpha/r into lokr_w1 for those layers.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from tuneonce.optimizer.param_spec import GroupSpec, Role

LYCORIS_TYPES = ("loha", "lokr")
LOHA_NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def peft_config(kind: str, *, rank: int, alpha: float, target_modules: str | list[str], lokr_factor: int = -1,
                lokr_decompose_both: bool = False):
    """PEFT's LoHaConfig / LoKrConfig for `kind`, on `target_modules` (a full-match regex or PEFT's suffix list)."""
    from peft import LoHaConfig, LoKrConfig

    if kind == "loha":
        return LoHaConfig(r=rank, alpha=alpha, target_modules=target_modules, use_effective_conv2d=False)
    if kind == "lokr":
        if lokr_factor == 0 or lokr_factor < -1:
            raise ValueError(f"lora.lokr_factor: must be -1 or a positive factor, got {lokr_factor}")
        return LoKrConfig(
            r=rank, alpha=alpha, target_modules=target_modules, use_effective_conv2d=False,
            decompose_factor=lokr_factor, decompose_both=lokr_decompose_both,
        )  # fmt: skip
    raise ValueError(f"lora.type: expected one of lora, {', '.join(LYCORIS_TYPES)}, got {kind!r}")


def lycoris_layers(model: nn.Module, adapter_name: str = "default") -> dict[str, nn.Module]:
    """PEFT LoHa / LoKr layers of `model` carrying `adapter_name`, by module path (PeftModel prefix stripped)."""
    from peft.tuners.loha.layer import LoHaLayer
    from peft.tuners.lokr.layer import LoKrLayer

    found = {}
    for name, module in model.named_modules():
        if isinstance(module, (LoHaLayer, LoKrLayer)) and adapter_name in module._available_adapters:
            found[name.removeprefix("base_model.model.")] = module
    return found


def lycoris_kind(layer: nn.Module) -> str:
    from peft.tuners.loha.layer import LoHaLayer

    return "loha" if isinstance(layer, LoHaLayer) else "lokr"


def init_like_lycoris(model: nn.Module, adapter_name: str = "default", *, lokr_factor: int = -1,
                      decompose_both: bool = False) -> None:
    """LoHa: zero hada_w2_a (out, r) and draw hada_w2_b (r, in) as PEFT draws the others; ΔW stays 0 at init.
    LoKr layers remember their factor options for the file's ss_network_args."""
    for layer in lycoris_layers(model, adapter_name).values():
        if lycoris_kind(layer) == "lokr":
            layer.tuneonce_lokr_factor, layer.tuneonce_decompose_both = lokr_factor, decompose_both
        elif adapter_name in layer.hada_w2_a:
            with torch.no_grad():
                layer.hada_w2_a[adapter_name].zero_()
                nn.init.kaiming_uniform_(layer.hada_w2_b[adapter_name], a=math.sqrt(5))


def base_fans(layer: nn.Module) -> tuple[int, int]:
    """fan_in (conv: in·kh·kw), fan_out of the layer an adapter wraps."""
    weight = layer.get_base_layer().weight
    return max(math.prod(weight.shape[1:]), 1), weight.shape[0]


def _fans(shape: torch.Size) -> tuple[int, int]:
    return max(math.prod(shape[1:]), 1), shape[0]


def factor_spec(layer: nn.Module, stem: str, adapter: str, depth: int) -> tuple[GroupSpec, str | None]:
    """Role, fans and LoRA scale of one LoHa / LoKr tensor (`stem` e.g. hada_w1_a), and its pair id (or None).

    LoHa ΔW = s·(w1_a w1_b) ⊙ (w2_a w2_b): each branch is a LoRA pair (w_a: out x r as B, w_b: r x in as A) with the
    layer's fans; s = alpha/r is counted once, on branch 2 (the zero-initialised one), branch 1 gets scale 1.
    LoKr ΔW = s·kron(w1, w2): a full factor is a matrix (conv: (b, d, kh, kw) a conv) with its own fans, since
    ‖kron(w1, w2)‖₂ = ‖w1‖₂·‖w2‖₂; a decomposed factor w_a w_b is a pair whose base fans are that factor's, scale 1
    (s multiplies the zero-initialised w1 and is not divided out; keep alpha = rank with spectral optimizers).
    """
    param = getattr(layer, stem)[adapter]
    if stem.startswith("hada_w"):
        branch = stem[:len("hada_w1")]
        role = Role.LORA_B if stem.endswith("_a") else Role.LORA_A
        fan_in, fan_out = _fans(param.shape)
        base_in, base_out = base_fans(layer)
        scale = float(layer.scaling[adapter]) if branch == "hada_w2" else 1.0
        spec = GroupSpec(role, fan_in=fan_in, fan_out=fan_out, depth=depth, base_fan_in=base_in,
                         base_fan_out=base_out, lora_scale=scale)  # fmt: skip
        return spec, branch
    if stem in ("lokr_w1", "lokr_w2"):
        fan_in, fan_out = _fans(param.shape)
        role = Role.CONV if param.ndim > 2 else Role.MATRIX
        return GroupSpec(role, fan_in=fan_in, fan_out=fan_out, depth=depth), None
    factor = stem[:len("lokr_w1")]
    a, b = getattr(layer, f"{factor}_a")[adapter], getattr(layer, f"{factor}_b")[adapter]
    role = Role.LORA_B if stem.endswith("_a") else Role.LORA_A
    fan_in, fan_out = _fans(param.shape)
    spec = GroupSpec(role, fan_in=fan_in, fan_out=fan_out, depth=depth, base_fan_in=b.shape[1],
                     base_fan_out=a.shape[0], lora_scale=1.0)  # fmt: skip
    return spec, factor
