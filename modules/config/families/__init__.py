"""One row per model family: what a family *is*, as plain data that imports no torch.

Config validation (rules.py), LoRA/finetune saving, single-file loading, the architecture table inspect_model
reads, the GUI's depth panel and the family classes (tuneonce.model.families) all read these rows instead of keeping
their own tables. The rows sit on the config floor, not in the family class files: those import torch at module
level, a config error must exit before torch is imported (tests/test_cli.py), and config/ may not import model/
(imports point down, ARCHITECTURE.md).

Adding a family touches: a row file here (registered in ROWS below), a class file in tuneonce/model/families/ that
sets ``facts = <row>`` (registered in tuneonce/model/families/__init__.py), the name in config/schema.py's Family
literal (tests/test_family_rows.py checks they agree), and, when its denoiser is a new class, an entry in
tuneonce/model/architectures/dit.py whose lora_targets read the row.
"""
from __future__ import annotations

from tuneonce.config.families.chroma import CHROMA
from tuneonce.config.families.facts import FamilyFacts
from tuneonce.config.families.flux import FLUX
from tuneonce.config.families.qwenimage import QWENIMAGE
from tuneonce.config.families.sd3 import SD3
from tuneonce.config.families.sd15 import SD2, SD15
from tuneonce.config.families.sdxl import SDXL
from tuneonce.config.families.zimage import ZIMAGE

# Order is the order messages list families in (e.g. "single_file ... works for flux, chroma, sd3, sdxl, sd15").
ROWS: tuple[FamilyFacts, ...] = (FLUX, CHROMA, SD3, SDXL, SD15, SD2, ZIMAGE, QWENIMAGE)
FAMILY_FACTS: dict[str, FamilyFacts] = {row.name: row for row in ROWS}


def families_where(predicate) -> tuple[str, ...]:
    """Names of the families whose row satisfies ``predicate``, in registration order."""
    return tuple(row.name for row in ROWS if predicate(row))


__all__ = ["FAMILY_FACTS", "ROWS", "FamilyFacts", "families_where"]
