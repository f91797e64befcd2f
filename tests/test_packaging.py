"""The wheel (issue #15): it installs the package `tuneonce` (never a top-level `modules`), ships the presets, example
configs and sweeps inside the package, and an installed copy finds them by name with no checkout around."""
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tuneonce import paths

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a clean copy of the tracked files (a stale build/ in the checkout could add old files)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git to list the tracked files")
    pytest.importorskip("setuptools", reason="--no-build-isolation builds with this venv's setuptools (in the lock)")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    source = tmp_path_factory.mktemp("source")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(source)], check=True, capture_output=True, timeout=300)
    (built,) = out.glob("tuneonce-*.whl")
    return built


def test_wheel_holds_tuneonce_and_the_presets_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/", 1)[0] for name in names}
    assert tops == {"tuneonce", wheel.name.split("-py")[0] + ".dist-info"}, tops  # no top-level modules/ nor lab/
    # every subpackage of the folder modules/ is in the wheel under its new name
    for init in (ROOT / "modules").rglob("__init__.py"):
        assert "tuneonce/" + init.relative_to(ROOT / "modules").as_posix() in names
    assert "tuneonce/train.py" in names  # python -m tuneonce.train
    # folders without __init__.py: only package-data patterns bring them
    for path in [p for folder in ("demo/assets", "model/configs", "ui/static")
                 for p in (ROOT / "modules" / folder).iterdir()]:
        assert "tuneonce/" + path.relative_to(ROOT / "modules").as_posix() in names
    for lab_file in ("tuneonce/sweep/__init__.py", "tuneonce/presets/sweeps/quick.yaml",
                     "tuneonce/optimizer/benchmark.py", "tuneonce/trainer/bench.py"):
        assert lab_file not in names  # the lab (lab/, sweeps/) stays out of the wheel
    shipped = [p for folder in ("training_presets", "configs/examples", "configs/fragments")
               for p in (ROOT / folder).rglob("*.yaml") if "user" not in p.relative_to(ROOT).parts]
    assert len(shipped) > 20
    for preset in shipped:
        assert "tuneonce/presets/" + preset.relative_to(ROOT).as_posix() in names
    entry_points = zipfile.ZipFile(wheel).read(wheel.name.split("-py")[0] + ".dist-info/entry_points.txt").decode()
    for script, target in (("tuneonce-train", "tuneonce.trainer.cli:main"), ("tuneonce-ui", "tuneonce.ui.server:main"),
                           ("tuneonce-inspect", "tuneonce.trainer.inspect_cli:main")):
        assert f"{script} = {target}" in entry_points
    # the trainer finds the demo's base preparers through these (it never imports the demo)
    for base in ("tiny_sdxl_base", "tiny_sdxl_base_v1", "tiny_flux_base"):
        assert f"{base} = tuneonce.demo.bases:" in entry_points


PROBE = """
import json, importlib.util
import tuneonce
from tuneonce import paths
from tuneonce.config.loading import load_config
demo = paths.resolve_config_path("demo_sdxl_lora")
example = paths.resolve_config_path("demo_lora_muon")  # configs/examples, `base: ../../training_presets/...`
print(json.dumps({
    "package": tuneonce.__file__, "demo": str(demo), "home": str(paths.home()),
    "user_presets": str(paths.user_presets_dir()), "rank": load_config(demo).lora.rank,
    "example_optimizer": load_config(example).optimizer.type,
    "modules": importlib.util.find_spec("modules") is not None,
}))
"""


def test_installed_copy_resolves_presets_through_the_package(wheel, tmp_path):
    """The wheel unpacked as site-packages, run from an unrelated folder: presets come from the package, work files
    go to $TUNEONCE_HOME, and no `modules` package exists."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PYTHONPATH": str(site), "TUNEONCE_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(found["package"]).parent == site / "tuneonce"
    assert Path(found["demo"]) == site / "tuneonce/presets/training_presets/demo_sdxl_lora.yaml"
    assert found["rank"] == 8 and found["example_optimizer"] == "lora_muon"
    assert found["home"] == str(tmp_path / "home") and found["user_presets"] == str(tmp_path / "home" / "presets")
    assert not found["modules"]


def test_preset_names_resolve_in_the_checkout(tmp_path, monkeypatch):
    assert paths.in_checkout()
    demo = ROOT / "training_presets" / "demo_sdxl_lora.yaml"
    assert paths.resolve_config_path("demo_sdxl_lora") == demo
    assert paths.resolve_config_path("demo_sdxl_lora.yaml") == demo
    loha = ROOT / "training_presets/examples/demo_sdxl_loha.yaml"
    assert paths.resolve_config_path("examples/demo_sdxl_loha") == loha
    assert paths.resolve_config_path("sdxl_lora_prodigy") == ROOT / "configs/examples/sdxl_lora_prodigy.yaml"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo_sdxl_lora").write_text("a file of that name wins")
    assert paths.resolve_config_path("demo_sdxl_lora") == Path("demo_sdxl_lora")
    assert paths.resolve_config_path("no_such_preset") == Path("no_such_preset")  # the loader reports it missing
