"""Check that tuneonce's imports run one way (issue #15).

Walks modules/**/*.py and lab/**/*.py with the stdlib ``ast`` module and collects every ``tuneonce.*`` import, at module level and
inside functions alike (a function-level import is still a dependency; hiding it there only delays the cycle).
Imports under ``if TYPE_CHECKING:`` do not count: they never run.
Reports two things:

* cycles between files (strongly connected components of the file graph with more than one file);
* cycles between folders (tuneonce.model <-> tuneonce.trainer, say);
* upward imports between folders: a file on a lower floor importing a higher one. The floors, bottom to top:
  util, paths, config, optimizer < model, data < trainer < ui, demo < lab (the sweep and the benchmarks: the
  repository's lab/ folder, not in the wheel; nothing in tuneonce may import it).

A folder may import its own floor's other folders only where listed in SAME_FLOOR_OK (model may use data's helpers,
not the reverse), so two folders on one floor cannot import each other.

Exit status 0 when clean, 1 otherwise; ``--quiet`` prints the counts only.
Usage: python scripts/check_imports.py [--quiet]
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "modules"
PACKAGE = "tuneonce"
LAB = ROOT / "lab"  # the lab package (not in the wheel): on top of everything, imported by nothing in tuneonce

FLOORS = {
    "util": 0, "paths": 0, "config": 0, "optimizer": 0,
    "model": 1, "data": 1,
    "trainer": 2,
    "ui": 3, "demo": 3, "train": 3, "__init__": 3,
    "lab": 4,
}
# same-floor imports allowed, one direction only: (importer folder, imported folder)
SAME_FLOOR_OK = {("config", "util"), ("config", "paths"), ("optimizer", "util"), ("optimizer", "config"),
                 ("optimizer", "paths"), ("util", "paths"), ("config", "optimizer"),
                 ("model", "data"), ("demo", "ui"),
                 ("train", "trainer")}
# (importer file, imported module) pairs let through on purpose, each with its reason. Keep it empty unless an
# optional heavy dependency forces it.
ALLOWED: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    if path.is_relative_to(LAB):
        parts = ["lab", *path.relative_to(LAB).with_suffix("").parts]
    else:
        parts = [PACKAGE, *path.relative_to(SRC).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def folder_of(module: str) -> str:
    if module.split(".")[0] == "lab":
        return "lab"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def walk_runtime(tree: ast.AST):
    """ast.walk without `if TYPE_CHECKING:` bodies: those imports exist for the type checker, never at run time."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if _type_checking(node):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def imports_of(path: Path, modname: str, known: set[str]) -> set[str]:
    """The tuneonce modules *path* imports, resolved to known module names (``from a import b`` counts a.b when it
    is a module, else a)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in walk_runtime(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = modname.split(".")
                if not is_pkg:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target)
    out = set()
    for name in found:
        if name.split(".")[0] not in (PACKAGE, "lab"):
            continue
        while name and name not in known:  # `import tuneonce.a.b.attr` → the nearest module
            name = name.rpartition(".")[0]
        if name and name != modname:
            out.add(name)
    return out


def graph() -> dict[str, set[str]]:
    files = sorted(SRC.rglob("*.py")) + sorted(LAB.rglob("*.py"))
    known = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, module_name(p), known) for p in files}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, it = work[-1]
            for nxt in it:
                if nxt not in edges:
                    continue
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(edges[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        comp.append(top)
                        if top == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def upward(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    bad = []
    for src, targets in edges.items():
        a = folder_of(src)
        for dst in sorted(targets):
            b = folder_of(dst)
            if a == b or (src, dst) in ALLOWED:
                continue
            fa, fb = FLOORS.get(a, 3), FLOORS.get(b, 3)
            if fb > fa or (fb == fa and (a, b) not in SAME_FLOOR_OK):
                bad.append((src, dst))
    return bad


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    edges = graph()
    cyc = cycles(edges)
    up = upward(edges)
    folders: dict[str, set[str]] = {}
    for src, targets in edges.items():
        here = folder_of(src)
        folders.setdefault(here, set()).update(folder_of(t) for t in targets if folder_of(t) != here)
    fcyc = cycles(folders)
    if "--quiet" not in argv:
        for comp in cyc:
            print("cycle: " + " <-> ".join(comp))
        for comp in fcyc:
            print("folder cycle: " + " <-> ".join(comp))
        for src, dst in up:
            print(f"upward: {src} -> {dst}")
    print(f"{len(edges)} modules, {len(cyc)} file cycles, {len(fcyc)} folder cycles, {len(up)} upward imports")
    return 1 if cyc or fcyc or up else 0


if __name__ == "__main__":
    sys.exit(main())
