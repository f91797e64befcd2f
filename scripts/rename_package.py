#!/usr/bin/env python3
"""Rename the importable package `modules` to `tuneonce` (issue #15); the folder `modules/` stays.

    python3 scripts/rename_package.py [--check]

Idempotent: re-run it on a tree that gained new `modules.` imports and it rewrites only those. It rewrites, in
.py/.toml/.md/.yaml/.yml/.cfg/.txt files, every place that names the *package*:
  - `from modules.x` / `from modules import` / `import modules.x` / `import modules` (code and prose);
  - dotted names of its subpackages and modules, `modules.trainer.cli`, in strings, docs and comments (but not
    `nn.modules.conv`, which is torch's: a dot or letter before `modules` keeps it);
  - a string that starts with `modules.` (e.g. `"modules.trainer.train"`, `startswith("modules.")`).
It leaves the folder path alone (`modules/model/depth.py`, `Path(...) / "modules"`), and the English word.
pyproject.toml gets the setuptools mapping `tuneonce` -> `modules/`, its package list regenerated from the folders
under modules/ that hold an `__init__.py`. `--check` rewrites nothing and exits 1 when something would change.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OLD, NEW = "modules", "tuneonce"
SUFFIXES = {".py", ".toml", ".md", ".yaml", ".yml", ".cfg", ".txt"}
SKIP_DIRS = {".git", ".venv", "venv", "build", "dist", "node_modules", "__pycache__", "workspace", "runs", "output"}
SKIP_FILES = {Path("scripts/rename_package.py")}  # this file names the old package on purpose


def package_names(root: Path) -> list[str]:
    """Top-level names inside the package folder: subpackages (with __init__.py) and modules."""
    folder = root / OLD
    names = {p.parent.name for p in folder.glob("*/__init__.py")}
    names |= {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
    return sorted(names)


def rules(names: list[str]) -> list[tuple[re.Pattern, str]]:
    inner = "|".join(map(re.escape, names))
    return [
        # `from modules import x`, `import modules`, `import modules as m` (not `import modules.x`: next rule)
        (re.compile(rf"\b(from|import)([ \t]+){OLD}(?=[ \t]+import\b|[ \t]+as\b|[ \t]*$|[ \t]*,)", re.M),
         rf"\1\2{NEW}"),
        # dotted package paths: `modules.trainer.cli`; not `nn.modules.conv`, `sys.modules`, `self.modules.x`
        (re.compile(rf"(?<![\w.]){OLD}\.(?=(?:{inner})\b)"), f"{NEW}."),
        # strings that start with the package's prefix: "modules." / 'modules.'
        (re.compile(rf"(?<=[\"']){OLD}\.(?=[\"'\w])"), f"{NEW}."),
    ]


def rewrite_text(text: str, names: list[str]) -> str:
    for pattern, replacement in rules(names):
        text = pattern.sub(replacement, text)
    return text


def packages_toml(root: Path, keep: list[str] = ()) -> str:
    """The [tool.setuptools] table mapping `tuneonce` onto the modules/ folder; `keep`: entries listed already."""
    folder = root / OLD
    subpackages = sorted(set(keep) | {
        ".".join((NEW, *p.parent.relative_to(folder).parts)) for p in folder.rglob("__init__.py")
        if not any(part in SKIP_DIRS for part in p.relative_to(folder).parts)
    })
    listed = "".join(f'    "{name}",\n' for name in subpackages)
    return (f'[tool.setuptools]\n# The folder is modules/, the package is {NEW} (issue #15): scripts/rename_package.py '
            f'adds the\n# packages found under modules/ to this list.\npackage-dir = {{"{NEW}" = "{OLD}"}}\n'
            f'packages = [\n{listed}]\n')


def rewrite_pyproject(text: str, root: Path) -> str:
    old_find = re.compile(rf'\[tool\.setuptools\.packages\.find\]\ninclude = \["{OLD}\*"\]\n')
    if old_find.search(text):
        return old_find.sub(lambda _: packages_toml(root), text, count=1)
    # already mapped (maybe with more entries, e.g. data packages mapped elsewhere): add new subpackages to the list
    listed = re.compile(r"(\npackages = \[\n)((?:[ \t]*\"[^\"\n]+\",\n)*)(\])")
    match = listed.search(text)
    if not match or not re.search(rf'^\s*(?:package-dir = \{{)?"?{NEW}"? = "{OLD}"', text, re.M):
        return text
    keep = re.findall(r'"([^"]+)"', match.group(2))
    body = packages_toml(root, keep).split("packages = [\n", 1)[1].rsplit("]", 1)[0]
    return text[:match.start(2)] + body + text[match.end(2):]


def candidate_files(root: Path):
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and path.suffix in SUFFIXES and rel not in SKIP_FILES \
                and not any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts):
            yield path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="rewrite nothing; exit 1 if anything would change")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this checkout)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    names = package_names(root)
    changed = []
    for path in candidate_files(root):
        text = path.read_text(encoding="utf-8")
        new = rewrite_text(text, names)
        if path.relative_to(root) == Path("pyproject.toml"):
            new = rewrite_pyproject(new, root)
        if new != text:
            changed.append(path.relative_to(root))
            if not args.check:
                path.write_text(new, encoding="utf-8")
    for rel in changed:
        print(f"{'would rewrite' if args.check else 'rewrote'} {rel}")
    print(f"{len(changed)} file(s) {'to rewrite' if args.check else 'rewritten'}", file=sys.stderr)
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    raise SystemExit(main())
