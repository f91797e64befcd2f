"""Per-class architecture facts: where the residual blocks are and which layers LoRA targets by default.

An entry is keyed by the diffusers/transformers class name. Block patterns are dotted module paths of
``nn.ModuleList``s whose items are residual blocks; ``*`` stands for one path component (usually an
index), so ``down_blocks.*.resnets`` names every down block's resnet list.

Depth rule (docs/optimizer_math.md §8): every block on the main path counts once (a joint two-stream block once); lists
that each refine one stream before the main stack (``refiners``) add the length of the longest one.
"""
from __future__ import annotations

from dataclasses import dataclass

from tuneonce.model.architectures import dit, text_encoders, unet


@dataclass(frozen=True)
class Architecture:
    class_name: str
    blocks: tuple[str, ...]  # ModuleList patterns on the main path, all counted
    refiners: tuple[str, ...] = ()  # parallel pre-stack ModuleLists; the longest one adds to the depth
    lora_targets: tuple[str, ...] = ()  # module-name suffixes for a PEFT LoraConfig.target_modules
    lora_exclude: tuple[str, ...] = ()  # module-path prefixes the default LoRA must not touch (vision towers)
    is_text_encoder: bool = False


def _collect() -> dict[str, Architecture]:
    table: dict[str, Architecture] = {}
    for module in (unet, dit, text_encoders):
        for class_name, entry in module.ENTRIES.items():
            if class_name in table:
                raise RuntimeError(f"architecture {class_name} declared twice")
            table[class_name] = Architecture(
                class_name=class_name,
                blocks=tuple(entry["blocks"]),
                refiners=tuple(entry.get("refiners", ())),
                lora_targets=tuple(entry["lora_targets"]),
                lora_exclude=tuple(entry.get("lora_exclude", ())),
                is_text_encoder=module is text_encoders,
            )
    return table


ARCHITECTURES: dict[str, Architecture] = _collect()


def architecture_for(module_or_class_name: object) -> Architecture | None:
    """The registry entry for a model instance or class name, following subclasses; None when unknown."""
    if isinstance(module_or_class_name, str):
        return ARCHITECTURES.get(module_or_class_name)
    for cls in type(module_or_class_name).__mro__:
        if cls.__name__ in ARCHITECTURES:
            return ARCHITECTURES[cls.__name__]
    return None


__all__ = ["ARCHITECTURES", "Architecture", "architecture_for"]
