"""Model families keyed by the config's `model.family` name; the generic loop only talks to these objects.

What each family *is* (pipeline class, text encoders, LoRA targets, saving layouts) is its torch-free row in
``tuneonce.model.families.rows``; the classes here add the torch code and read their row (``facts``). This package
imports the classes lazily, so importing the rows (as config validation does) does not import torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tuneonce.model.families.base import ModelFamily


def _classes() -> dict[str, type[ModelFamily]]:
    from tuneonce.model.families.chroma import ChromaFamily
    from tuneonce.model.families.flux import FluxFamily
    from tuneonce.model.families.qwenimage import QwenImageFamily
    from tuneonce.model.families.sd3 import SD3Family
    from tuneonce.model.families.sd15 import SD2Family, SD15Family
    from tuneonce.model.families.sdxl import SDXLFamily
    from tuneonce.model.families.zimage import ZImageFamily

    classes = (SD15Family, SD2Family, SDXLFamily, FluxFamily, ChromaFamily, SD3Family, ZImageFamily, QwenImageFamily)
    return {cls.name: cls for cls in classes}


def __getattr__(name: str) -> Any:
    if name == "FAMILIES":
        families = _classes()
        globals()["FAMILIES"] = families
        return families
    if name == "ModelFamily":
        from tuneonce.model.families.base import ModelFamily

        return ModelFamily
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_family(name: str) -> ModelFamily:
    families = __getattr__("FAMILIES") if "FAMILIES" not in globals() else globals()["FAMILIES"]
    try:
        return families[name]()
    except KeyError:
        raise ValueError(f"model.family: unknown family {name!r}; known: {', '.join(sorted(families))}") from None


__all__ = ["FAMILIES", "ModelFamily", "get_family"]
