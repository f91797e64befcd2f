"""The import graph runs one way (issue #15): scripts/check_imports.py finds no file cycle, no folder cycle and no
upward import, and it does find them when they are there."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _checker():
    spec = importlib.util.spec_from_file_location("check_imports", ROOT / "scripts" / "check_imports.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_imports"] = module
    spec.loader.exec_module(module)
    return module


def test_tree_imports_run_one_way(capsys):
    checker = _checker()
    assert checker.main(["--quiet"]) == 0, capsys.readouterr().out
    assert ", 0 file cycles, 0 folder cycles, 0 upward imports" in capsys.readouterr().out


def test_checker_sees_function_level_cycles_and_upward_imports(tmp_path, monkeypatch):
    checker = _checker()
    src = tmp_path / "modules"
    for folder in ("model", "trainer", "config"):
        (src / folder).mkdir(parents=True)
        (src / folder / "__init__.py").write_text("")
    # model -> trainer hidden in a function: upward, and a cycle with the trainer's module-level import back
    (src / "model" / "fam.py").write_text("def f():\n    from tuneonce.trainer.obj import X\n")
    (src / "trainer" / "obj.py").write_text("from tuneonce.model import fam\nX = 1\n")
    (src / "config" / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from tuneonce.trainer.obj import X\n")
    monkeypatch.setattr(checker, "SRC", src)
    monkeypatch.setattr(checker, "LAB", tmp_path / "lab")
    edges = checker.graph()
    assert edges["tuneonce.model.fam"] == {"tuneonce.trainer.obj"}
    assert edges["tuneonce.config.a"] == set()  # type-checking imports never run
    assert checker.cycles(edges) == [["tuneonce.model.fam", "tuneonce.trainer.obj"]]
    assert checker.upward(edges) == [("tuneonce.model.fam", "tuneonce.trainer.obj")]
    assert checker.main(["--quiet"]) == 1
