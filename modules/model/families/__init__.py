"""Model families keyed by the config's `model.family` name; the generic loop only talks to these objects.

What each family *is* (pipeline class, text encoders, LoRA targets, saving layouts) is its torch-free row in
``tuneonce.config.families``; the classes here add the torch code and read their row (``facts``).
"""
from __future__ import annotations

from tuneonce.model.families.base import ModelFamily
from tuneonce.model.families.chroma import ChromaFamily
from tuneonce.model.families.flux import FluxFamily
from tuneonce.model.families.qwenimage import QwenImageFamily
from tuneonce.model.families.sd15 import SD2Family, SD15Family
from tuneonce.model.families.sd3 import SD3Family
from tuneonce.model.families.sdxl import SDXLFamily
from tuneonce.model.families.zimage import ZImageFamily

FAMILIES: dict[str, type[ModelFamily]] = {
    cls.name: cls for cls in (SD15Family, SD2Family, SDXLFamily, FluxFamily, ChromaFamily, SD3Family, ZImageFamily, QwenImageFamily)
}


def get_family(name: str) -> ModelFamily:
    try:
        return FAMILIES[name]()
    except KeyError:
        raise ValueError(f"model.family: unknown family {name!r}; known: {', '.join(sorted(FAMILIES))}") from None


def family_of_pipeline(pipe: object) -> ModelFamily:
    """The family whose diffusers pipeline class `pipe` is (the first row listed, where two share a class)."""
    for cls in FAMILIES.values():
        if cls.pipeline_class_name == type(pipe).__name__:
            return cls()
    raise ValueError(f"no model family uses the pipeline class {type(pipe).__name__}")


__all__ = ["FAMILIES", "ModelFamily", "family_of_pipeline", "get_family"]
