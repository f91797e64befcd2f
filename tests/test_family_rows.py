"""The family rows (tuneonce.config.families) are the one source of family facts: they import no torch, name
the same families as the config schema and the family classes, the classes carry their row's values, and the
architecture table that inspect_model reads (tuneonce.model.architectures) adapts the same layers inside the blocks
as training's default LoRA preset."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from typing import get_args

import pytest

from tuneonce.config import rules
from tuneonce.config.schema import Family
from tuneonce.model.architectures import ARCHITECTURES
from tuneonce.model.families import FAMILIES, get_family
from tuneonce.model.families.base import ROW_FIELDS
from tuneonce.config.families import FAMILY_FACTS, FamilyFacts

TINY_KIND = {"sd15": "sd15", "sd2": "sd15", "sdxl": "sdxl", "flux": "flux-dev", "chroma": "chroma", "sd3": "sd3",
             "zimage": "zimage", "qwenimage": "qwen-image"}  # fmt: skip


def test_rows_and_config_rules_import_no_torch():
    code = ("import sys, tuneonce.config.families, tuneonce.config.rules, tuneonce.config.schema; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_rows_schema_and_classes_name_the_same_families():
    assert set(FAMILY_FACTS) == set(get_args(Family)) == set(FAMILIES)
    assert set(rules.FAMILY_TEXT_ENCODERS) == set(FAMILY_FACTS)


@pytest.mark.parametrize("name", sorted(FAMILY_FACTS))
def test_family_class_carries_its_row(name):
    row, family = FAMILY_FACTS[name], get_family(name)
    assert type(family).facts is row and row.name == name
    assert set(ROW_FIELDS) <= {f.name for f in fields(FamilyFacts)}
    for field in ROW_FIELDS:
        assert getattr(family, field) == getattr(row, field), field
    # LoRA-trainable text encoders are text encoders the family loads
    assert set(row.lora_text_encoders) <= set(row.text_encoders)
    # the row's objective is the one the class trains (flow matching families subclass FlowMatchingFamily)
    from tuneonce.model.families.flow import FlowMatchingFamily

    assert isinstance(family, FlowMatchingFamily) == row.flow == (row.objective == "flow")
    assert row.objective in ("eps/v", "flow")


def test_rules_tables_are_read_from_the_rows():
    assert rules.FLOW_FAMILIES == ("flux", "chroma", "sd3", "zimage", "qwenimage")
    assert rules.SINGLE_FILE_FAMILIES == ("flux", "chroma", "sd3", "sdxl", "sd15")
    assert set(rules.LYCORIS_FAMILIES) == {"sd15", "sd2", "sdxl"}
    assert rules.FAMILY_TEXT_ENCODERS["flux"] == ("text_encoder",)


@pytest.fixture(scope="module")
def backbones():
    from tuneonce.model.tiny import build_tiny_pipeline
    from tuneonce.model.tiny_flow import build_tiny_flow_pipeline

    cache = {}

    def get(name: str):
        kind = TINY_KIND[name]
        if kind not in cache:
            pipe = build_tiny_pipeline(kind) if kind in ("sd15", "sdxl") else build_tiny_flow_pipeline(kind)
            cache[kind] = getattr(pipe, FAMILY_FACTS[name].backbone)
        return cache[kind]

    return get


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("name", sorted(FAMILY_FACTS))
def test_architecture_table_agrees_with_the_row_inside_the_blocks(name, backbones):
    """inspect_model's default LoRA (architecture table, no block restriction) and training's default preset
    (the row, restricted to the blocks) pick the same layers below the row's block prefixes."""
    from tuneonce.model.adapters import lora_target_names
    from tuneonce.model.builtin import default_lora_targets

    row, backbone = FAMILY_FACTS[name], backbones(name)
    arch = ARCHITECTURES[row.backbone_class]
    assert type(backbone).__name__ == row.backbone_class
    if row.backbone == "transformer":  # block lists of the table = the row's block prefixes
        assert {b + "." for b in arch.blocks + arch.refiners} == set(row.backbone_blocks)
    training = get_family(name).backbone_target_presets()["default"]
    by_row = set(lora_target_names(backbone, training, within=row.backbone_blocks))
    by_table = set(lora_target_names(backbone, default_lora_targets(backbone)))
    assert by_row, name
    assert by_row == {n for n in by_table if n.startswith(row.backbone_blocks)}
