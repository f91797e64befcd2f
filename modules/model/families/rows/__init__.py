"""One row per model family: what a family *is*, as plain data that imports no torch.

Config validation (tuneonce.config.rules), LoRA/finetune saving, single-file loading, the GUI's depth panel and
the family classes (tuneonce.model.families) all read these rows instead of keeping their own tables. The rows live
in this torch-free subpackage rather than in the family class files because those import torch at module level,
and a config error must exit before torch is imported (tests/test_cli.py checks that).

Adding a family: one row file here (registered in ROWS below) and one class file in tuneonce/model/families/ that
sets ``facts = <row>`` (registered in tuneonce/model/families/__init__.py).
"""
from __future__ import annotations

from tuneonce.model.families.rows.chroma import CHROMA
from tuneonce.model.families.rows.facts import FamilyFacts
from tuneonce.model.families.rows.flux import FLUX
from tuneonce.model.families.rows.qwenimage import QWENIMAGE
from tuneonce.model.families.rows.sd3 import SD3
from tuneonce.model.families.rows.sd15 import SD2, SD15
from tuneonce.model.families.rows.sdxl import SDXL
from tuneonce.model.families.rows.zimage import ZIMAGE

# Order is the order messages list families in (e.g. "single_file ... works for flux, chroma, sd3, sdxl, sd15").
ROWS: tuple[FamilyFacts, ...] = (FLUX, CHROMA, SD3, SDXL, SD15, SD2, ZIMAGE, QWENIMAGE)
FAMILY_FACTS: dict[str, FamilyFacts] = {row.name: row for row in ROWS}


def families_where(predicate) -> tuple[str, ...]:
    """Names of the families whose row satisfies ``predicate``, in registration order."""
    return tuple(row.name for row in ROWS if predicate(row))


__all__ = ["FAMILY_FACTS", "ROWS", "FamilyFacts", "families_where"]
