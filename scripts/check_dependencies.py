"""The dependency lock and the drift check.

``--write-lock`` resolves ``pyproject.toml`` (all extras) with pip's own resolver (``pip install --dry-run --report``)
in a throw-away venv and writes ``requirements/lock.txt``: every direct and transitive dependency at one exact version.
Every install path installs through it (``pip install -c requirements/lock.txt -e .``). ``--uploaded-prior-to DATE``
resolves as the registry stood on that day.

Without ``--write-lock`` it is the drift check: a throw-away venv gets the newest versions the ranges in
``pyproject.toml`` allow (torch stays at the lock's version unless ``--float-torch``: a new torch is a multi-GB
download), then it prints which packages moved from the lock, runs the test suite in that venv and lists the tests
that broke. It needs the registry, so it is a development tool, not part of CI. Exit 0: nothing broke; 1: tests broke;
2: the venv could not be made.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "lock.txt"
EXTRAS = "test,bench,sweep,wandb"
PROJECT = "tuneonce"
# The torch release the suite runs on: its CPU build lies on this project's machines; PyPI's build of the same
# release (CUDA on Linux) satisfies the same pin on a GPU box.
TORCH = "2.13.0"


def canonical(name: str) -> str:
    """PEP 503 normalized name (so `PyYAML` and `pyyaml` compare equal)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def public_version(version: str) -> str:
    """'2.13.0+cpu' -> '2.13.0': a pin without the local label matches every build of that release (CPU or CUDA)."""
    return version.split("+", 1)[0]


def make_venv(where: Path) -> Path:
    """A fresh venv with a current pip (``--uploaded-prior-to`` and ``--report`` need one); returns its python."""
    venv.EnvBuilder(with_pip=True, clear=True).create(where)
    python = where / "bin" / "python"
    run([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"])
    return python


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(command), file=sys.stderr, flush=True)
    return subprocess.run(command, check=True, **kwargs)


def read_lock(path: Path = LOCK) -> dict[str, str]:
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonical(name)] = version
    return pins


def resolve(python: Path, prior_to: str | None, torch: str) -> dict[str, tuple[str, str]]:
    """{canonical name: (name, version)} of everything `pip install torch==TORCH -e .[all extras]` would install."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        command = [str(python), "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed", "--report", str(report)]
        if prior_to:
            command += ["--uploaded-prior-to", prior_to]
        run(command + [f"torch=={torch}", "-e", f"{ROOT}[{EXTRAS}]"])
        items = json.loads(report.read_text())["install"]
    found = {}
    for item in items:
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        if canonical(name) != PROJECT:
            found[canonical(name)] = (name, public_version(version))
    return found


def write_lock(prior_to: str | None, torch: str) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        python = make_venv(Path(tmp) / "venv")
        found = resolve(python, prior_to, torch)
        pip_version = subprocess.run([str(python), "-m", "pip", "--version"], capture_output=True, text=True).stdout.split()[1]
    when = (f" --uploaded-prior-to {prior_to}" if prior_to else "") + (f" --torch {torch}" if torch != TORCH else "")
    lines = [
        f"# Regenerate: python scripts/check_dependencies.py --write-lock{when}  (pip {pip_version}'s resolver, "
        f"CPython {sys.version_info.major}.{sys.version_info.minor} on Linux x86_64; extras {EXTRAS})",
        *(f"{name}=={version}" for _, (name, version) in sorted(found.items())),
    ]
    LOCK.parent.mkdir(exist_ok=True)
    tmp_path = LOCK.with_suffix(".tmp")
    tmp_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp_path.replace(LOCK)
    print(f"wrote {LOCK} ({len(found)} packages)")
    return 0


def moved_packages(locked: dict[str, str], installed: dict[str, str]) -> list[dict[str, str | None]]:
    """Packages whose version differs from the lock, or that are new or gone."""
    moves = []
    for name in sorted(set(locked) | set(installed)):
        before, after = locked.get(name), installed.get(name)
        if before != after:
            moves.append({"package": name, "lock": before, "newest": after})
    return moves


def failed_tests(pytest_output: str) -> list[str]:
    """Test ids pytest's short summary names as FAILED or ERROR."""
    return sorted({m.group(2) for m in re.finditer(r"^(FAILED|ERROR) (\S+)", pytest_output, re.MULTILINE)})


def installed_versions(python: Path) -> dict[str, str]:
    out = subprocess.run([str(python), "-m", "pip", "list", "--format", "json"], capture_output=True, text=True, check=True)
    skip = {PROJECT, "pip"}
    return {canonical(p["name"]): public_version(p["version"]) for p in json.loads(out.stdout) if canonical(p["name"]) not in skip}


def drift_check(float_torch: bool, pytest_args: list[str], as_json: bool) -> int:
    locked = read_lock()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            python = make_venv(Path(tmp) / "venv")
            pins = [] if float_torch else [f"torch=={locked['torch']}"]
            run([str(python), "-m", "pip", "install", "-q", "--upgrade", *pins, "-e", f"{ROOT}[{EXTRAS}]"])
        except subprocess.CalledProcessError as error:
            print(f"check_dependencies: could not build the newest environment: {error}", file=sys.stderr)
            return 2
        installed = installed_versions(python)
        # pip itself and setuptools come with the venv, not from the ranges; compare what the project pulls in
        moves = [m for m in moved_packages(locked, installed) if m["package"] not in ("setuptools", "wheel")]
        tests = subprocess.run(
            [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", *pytest_args],
            cwd=ROOT, capture_output=True, text=True,
        )
    output = tests.stdout + tests.stderr
    broken = failed_tests(output)
    summary = output.strip().splitlines()[-1] if output.strip() else ""
    if as_json:
        print(json.dumps({"moved": moves, "broken_tests": broken, "pytest_summary": summary, "pytest_exit": tests.returncode}, indent=2))
    else:
        print(f"{len(moves)} package(s) moved from {LOCK.relative_to(ROOT)}:")
        for m in moves:
            print(f"  {m['package']}: {m['lock'] or '(not in lock)'} -> {m['newest'] or '(gone)'}")
        print(f"tests on the newest versions: {summary}")
        for test in broken:
            print(f"  broke: {test}")
    return 1 if tests.returncode not in (0, 5) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-lock", action="store_true", help="regenerate requirements/lock.txt instead")
    parser.add_argument("--uploaded-prior-to", metavar="DATE", help="with --write-lock: resolve as of this ISO date")
    parser.add_argument("--torch", default=TORCH, help=f"with --write-lock: the torch release to lock (default {TORCH})")
    parser.add_argument("--float-torch", action="store_true", help="let torch move too (downloads a new torch build)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (default: the whole suite)")
    args = parser.parse_args(argv)
    if args.write_lock:
        return write_lock(args.uploaded_prior_to, args.torch)
    return drift_check(args.float_torch, args.pytest_args, args.json)


if __name__ == "__main__":
    sys.exit(main())
