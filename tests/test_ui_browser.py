"""The GUI driven in a real headless Chromium (Debian's /usr/bin/chromium through Playwright)."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import yaml

from tuneonce.config.loading import load_config
from tuneonce.ui.backend import Backend
from tuneonce.ui.runs import REPO_ROOT, RunManager
from tuneonce.ui.server import UiServer

CHROMIUM = os.environ.get("TUNEONCE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
DEMO = REPO_ROOT / "training_presets" / "demo_sdxl_lora.yaml"

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright's Python package is not installed")
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no Chromium at {CHROMIUM} (CI installs the Debian package 'chromium')", allow_module_level=True)
# Waits are for events (a state, an element, a count), never fixed sleeps; the limits are generous because the
# machine is shared: they only bound how long a failure takes to report.
WAIT_MS = 60_000
RUN_WAIT_MS = 180_000  # a run: a subprocess that imports the config package, pydantic, PIL
sync_api.expect.set_options(timeout=WAIT_MS)


@pytest.fixture(scope="module")
def presets(tmp_path_factory) -> Path:
    """The real presets plus one child preset that builds on the demo with orthogonalize B off."""
    folder = tmp_path_factory.mktemp("presets")
    for preset in (REPO_ROOT / "training_presets").glob("*.yaml"):
        shutil.copy(preset, folder / preset.name)
    (folder / "child_no_ortho_b.yaml").write_text(
        "base: demo_sdxl_lora.yaml\noptimizer:\n  lora_b_orthogonalize: false\n", encoding="utf-8"
    )
    return folder


# Stands in for `train.py --config X` where the test must not depend on the real loop's speed: it reads
# the config with the CLI's loader and writes metrics with the trainer's own MetricsLogger (so the
# JSONL format is the real one) and a sample PNG where the trainer puts them.
# It holds after step 3 until the test creates <output_dir>/go, so the page is seen mid-run however slow the
# machine is (the test waits for what the page shows, then lets it go on).
STAND_IN_TRAINER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from PIL import Image
    from tuneonce.config.loading import load_config
    from tuneonce.trainer.metrics import MetricsLogger
    cfg = load_config(sys.argv[sys.argv.index("--config") + 1])
    out = Path(cfg.saving.output_dir)
    log = MetricsLogger(cfg.logging.log_dir or out / "logs", tensorboard=False)
    for step in range(1, cfg.schedule.max_steps + 1):
        log.log(step, {"loss": 1.0 / step, "lr": cfg.optimizer.lr})
        print(f"train: step {step}/{cfg.schedule.max_steps}", flush=True)
        if step == 2:
            (out / "samples").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (32, 32), (200, 30, 160)).save(out / "samples" / "step000002_00.png")
        while step == 3 and not (out / "go").exists():
            time.sleep(0.05)
    log.close()
""")


def start_server(presets: Path, output_root: Path, runs: RunManager | None = None, **kwargs) -> UiServer:
    # Save writes into <presets>/user (the default); runs write below pytest's temporary folder
    backend = Backend(presets_dir=presets, workdir=REPO_ROOT, runs=runs, output_root=output_root)
    # as `tuneonce-ui` does; waited for here so that no test imports diffusers while it does
    backend.warm_up_in_background().join()
    srv = UiServer(("127.0.0.1", 0), backend, **kwargs)
    srv.start_in_thread()
    return srv


@pytest.fixture(scope="module")
def server(presets, tmp_path_factory):
    srv = start_server(presets, tmp_path_factory.getbasetemp())
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def stand_in_server(presets, tmp_path_factory):
    script = tmp_path_factory.mktemp("stand_in") / "stand_in_trainer.py"
    script.write_text(STAND_IN_TRAINER, encoding="utf-8")
    runs = RunManager(cwd=REPO_ROOT, command_for=lambda config: [sys.executable, str(script), "--config", str(config)])
    # this one asks for its token on every request, as on a non-local bind: the page, its script and its
    # sample images load through the ?token= URL and the cookie it sets
    srv = start_server(presets, tmp_path_factory.getbasetemp(), runs, require_token=True)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def browser_context():
    profile = tempfile.mkdtemp(prefix="tuneonce-ui-chromium-")  # a fresh profile each session
    with sync_api.sync_playwright() as pw:
        # Playwright refuses --user-data-dir among the args; a persistent context passes our fresh one.
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1500, "height": 1000},
        )
        try:
            yield context
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


def new_page(context, srv: UiServer):
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto(srv.start_url)
    return page


@pytest.fixture
def page(browser_context, server):
    page = new_page(browser_context, server)
    yield page
    page.close()


@pytest.fixture
def stand_in_page(browser_context, stand_in_server):
    page = new_page(browser_context, stand_in_server)
    yield page
    page.close()


def field(page, key: str):
    return page.locator(f'[data-key="{key}"]')


def error_of(page, key: str):
    return page.locator(f'[data-error-for="{key}"]')


def open_preset(page, name: str) -> None:
    page.click(f'button[data-preset="{name}"]')
    page.wait_for_selector(f'[data-field="optimizer.lr"]')
    sync_api.expect(page.locator("#status-line")).not_to_have_text("checking…")


def test_edit_switches_and_save_yaml(page, presets, tmp_path):
    open_preset(page, "child_no_ortho_b.yaml")
    ortho_b = field(page, "optimizer.lora_b_orthogonalize")
    sync_api.expect(ortho_b).not_to_be_checked()  # the child preset's own value, over its base
    # The description is shown with the switch, straight from the schema.
    sync_api.expect(page.locator('[data-field="optimizer.lora_b_orthogonalize"] .desc')).to_contain_text("LoRA B")
    ortho_b.check()
    field(page, "optimizer.lora_a_optimizer").select_option("adam")
    sync_api.expect(page.locator("#status-line")).to_have_text("config valid")

    # Save writes into the user presets folder, which the panel names; the saved preset is listed at once
    sync_api.expect(page.locator("#save-dir")).to_have_text(str(presets / "user"))
    sync_api.expect(page.locator("#save-path")).to_have_value("my_child_no_ortho_b.yaml")
    out = presets / "user" / "edited.yaml"
    page.fill("#save-path", "edited.yaml")
    page.click("#save-btn")
    sync_api.expect(page.locator("#save-result")).to_contain_text("saved")
    sync_api.expect(page.locator('button[data-preset="user/edited.yaml"]')).to_have_count(1)
    page.screenshot(path=str(tmp_path / "edited.png"), full_page=True)

    saved = yaml.safe_load(out.read_text())
    assert saved["optimizer"]["lora_b_orthogonalize"] is True
    assert saved["optimizer"]["lora_a_optimizer"] == "adam"
    assert "base" not in saved  # self-contained: train.py --config runs it from anywhere
    # The CLI's own loader reads it back; apart from the two switches it is the demo preset.
    loaded = load_config(out).model_dump(mode="json")
    expected = load_config(DEMO).model_dump(mode="json")
    expected["optimizer"].update(lora_b_orthogonalize=True, lora_a_optimizer="adam")
    assert loaded == expected

    # Saving over it asks first: declined, the file stays as it was; accepted, it is replaced.
    field(page, "optimizer.lora_a_optimizer").select_option("signsgd")
    sync_api.expect(page.locator("#status-line")).to_have_text("config valid")
    before = out.read_bytes()
    questions = []

    def answer(accept: bool):
        def handle(dialog):
            questions.append(dialog.message)
            dialog.accept() if accept else dialog.dismiss()
        return handle

    page.once("dialog", answer(False))
    page.click("#save-btn")
    sync_api.expect(page.locator("#save-result")).to_have_text("not saved (the file exists)")
    assert out.read_bytes() == before and "edited.yaml already exists" in questions[0]
    page.once("dialog", answer(True))
    page.click("#save-btn")
    sync_api.expect(page.locator("#save-result")).to_contain_text("saved")
    assert len(questions) == 2 and load_config(out).optimizer.lora_a_optimizer == "signsgd"


def test_invalid_values_show_their_error_next_to_the_field(page, presets):
    open_preset(page, "demo_sdxl_lora.yaml")
    rank = field(page, "lora.rank")
    rank.fill("0")
    sync_api.expect(error_of(page, "lora.rank")).to_contain_text("greater than or equal to 1")
    sync_api.expect(page.locator('[data-field="lora.rank"]')).to_have_class("field invalid")
    field(page, "optimizer.lr").fill("fast")
    sync_api.expect(error_of(page, "optimizer.lr")).to_contain_text("valid number")
    sync_api.expect(page.locator("#run-start")).to_be_disabled()
    # YAML-edited fields report parse errors in place too
    field(page, "lora.targets").fill("[to_q, to_k")
    sync_api.expect(error_of(page, "lora.targets")).to_contain_text("not valid YAML")
    # Fixing a value clears its error
    rank.fill("4")
    sync_api.expect(error_of(page, "lora.rank")).to_be_hidden()
    # and saving an invalid config is refused with the reason
    page.fill("#save-path", "never-written.yaml")
    page.click("#save-btn")
    sync_api.expect(page.locator("#save-result")).to_contain_text("lora.targets")
    assert not (presets / "user" / "never-written.yaml").exists()


def test_dora_with_spectral_scaling_is_greyed_out_unless_forced(page):
    open_preset(page, "demo_sdxl_lora.yaml")
    dora = field(page, "lora.dora")
    sync_api.expect(dora).to_be_disabled()  # spectral_scaling is on in the demo
    sync_api.expect(page.locator('[data-blocked-for="lora.dora"]')).to_contain_text("spectral_scaling")
    field(page, "lora.force_dora_with_spectral").check()
    sync_api.expect(dora).to_be_enabled()
    dora.check()
    # with DoRA on (forced), turning the force switch off again is what the config now rejects
    sync_api.expect(field(page, "lora.force_dora_with_spectral")).to_be_disabled()
    sync_api.expect(page.locator("#status-line")).to_have_text("config valid")


def plotted_points(page) -> int:
    return int(page.locator("#loss-plot").get_attribute("data-points") or 0)


def test_run_shows_progress_loss_plot_and_samples(stand_in_page, tmp_path):
    page = stand_in_page
    open_preset(page, "demo_sdxl_lora.yaml")
    field(page, "schedule.max_steps").fill("10")
    field(page, "saving.output_dir").fill(str(tmp_path / "out"))
    sync_api.expect(page.locator("#status-line")).to_have_text("config valid")
    page.click("#run-start")
    # the plot and the progress bar update while the run is still going (the stand-in holds at step 3)
    page.wait_for_function(
        "document.querySelector('#run-state').dataset.state === 'running'"
        " && Number(document.querySelector('#loss-plot').dataset.points) >= 2"
        " && document.querySelector('#run-progress').value >= 2",
        timeout=RUN_WAIT_MS,
    )
    (tmp_path / "out" / "go").touch()
    sync_api.expect(page.locator("#run-state")).to_have_attribute("data-state", "finished", timeout=RUN_WAIT_MS)
    page.wait_for_function("Number(document.querySelector('#loss-plot').dataset.points) === 10")
    assert page.locator("#loss-plot polyline").get_attribute("points").count(",") == 10
    assert page.eval_on_selector("#run-progress", "p => [p.value, p.max]") == [10, 10]
    sync_api.expect(page.locator("#run-numbers")).to_contain_text("step 10 / 10")
    sync_api.expect(page.locator("#run-numbers")).to_contain_text("loss 0.1000")
    image = page.locator("#samples img")
    sync_api.expect(image).to_have_count(1)
    assert page.eval_on_selector("#samples img", "img => img.complete && img.naturalWidth") == 32
    sync_api.expect(page.locator("#run-log")).to_contain_text("step 10/10", use_inner_text=False)
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(tmp_path / "run.png"), full_page=True)
    # what ran is the config the page showed, saved beside the outputs
    ran = load_config(tmp_path / "out" / "demo_sdxl_lora.ui-run.yaml")
    assert ran.schedule.max_steps == 10


def test_stop_ends_a_running_run(stand_in_page, tmp_path):
    page = stand_in_page
    open_preset(page, "demo_sdxl_lora.yaml")
    field(page, "schedule.max_steps").fill("400")
    field(page, "saving.output_dir").fill(str(tmp_path / "out"))
    sync_api.expect(page.locator("#status-line")).to_have_text("config valid")
    page.click("#run-start")
    page.wait_for_function("Number(document.querySelector('#loss-plot').dataset.points) >= 1", timeout=RUN_WAIT_MS)
    sync_api.expect(page.locator("#run-start")).to_be_disabled()
    page.click("#run-stop")
    sync_api.expect(page.locator("#run-state")).to_have_attribute("data-state", "stopped")
    sync_api.expect(page.locator("#run-start")).to_be_enabled()
    assert plotted_points(page) < 400
    # the elapsed time stopped with the run: a reloaded page (a fresh status, later) shows the same time
    elapsed = page.locator("#run-numbers").inner_text().rsplit(" · ", 1)[-1]
    assert elapsed.endswith("s")
    page.reload()
    sync_api.expect(page.locator("#run-state")).to_have_attribute("data-state", "stopped")
    sync_api.expect(page.locator("#run-numbers")).to_contain_text(f"· {elapsed}")


def test_depth_panel_follows_the_model_and_the_switches(page):
    open_preset(page, "demo_sdxl_lora.yaml")
    # no local folder: the published SDXL architecture, whose UNet has 87 residual blocks (docs/optimizer_math.md §8)
    field(page, "model.base_model").fill("no/such/folder")
    unet = page.locator('#depth-body tr[data-component="unet"] td')
    sync_api.expect(page.locator("#depth-body")).to_contain_text("published sdxl architecture")
    sync_api.expect(unet.nth(1)).to_have_text("87")
    sync_api.expect(unet.nth(2)).to_have_text("1280")  # SDXL's most common linear width
    # a depth override moves the eps: ns_eps of a square matrix = sqrt(d/d)/L = 1/40
    field(page, "model.depth").fill("{unet: 40}")
    sync_api.expect(unet.nth(1)).to_have_text("40")
    sync_api.expect(unet.nth(3)).to_have_text("0.025")
    # without depth-scaled eps the configured ns_eps is used as is
    field(page, "optimizer.depth_scaled_eps").uncheck()
    sync_api.expect(unet.nth(3)).to_have_text("1e-07")
    field(page, "model.depth").fill("{vae: 3}")
    sync_api.expect(page.locator("#depth-body")).to_contain_text("unknown component 'vae'")
    # the memory plan beside it: the planner's rows, then what a budget picks (SDXL at 1024 px, batch 4: 8 GiB
    # needs checkpointing; 0.01 GiB cannot fit)
    memory = page.locator("#memory-body")
    field(page, "data.resolution").fill("1024")
    sync_api.expect(memory.locator('tr[data-row="total (predicted peak)"]')).to_be_visible()
    sync_api.expect(memory.locator('tr[data-row="parked after caching (CPU)"]')).to_be_visible()
    field(page, "memory.budget_gb").fill("8")
    sync_api.expect(page.locator("#memory-budget")).to_contain_text(
        "budget 8 GiB: picks training.gradient_checkpointing: true")
    field(page, "memory.budget_gb").fill("0.01")
    sync_api.expect(page.locator("#memory-budget")).to_contain_text("does not fit even with")


def test_real_training_run_from_the_page(page, tmp_path, tmp_path_factory):
    """The demo preset through the real CLI (`train.py --config`) on a tiny SDXL folder, for three steps."""
    tiny = pytest.importorskip("tuneonce.model.tiny")
    synthetic = pytest.importorskip("tuneonce.data.synthetic")
    base = tiny.tiny_pipeline_dir("sdxl", tmp_path_factory)  # shared with other tests of the session
    synthetic.write_concept_dataset(tmp_path / "data", count=4)
    open_preset(page, "demo_sdxl_lora.yaml")
    edits = {
        "model.base_model": str(base), "data.folders": f"- path: {tmp_path / 'data'}",
        "schedule.max_steps": "3", "training.batch_size": "2", "sampling.every_n_steps": "0",
        "sampling.prompts": "[]", "validation.every_n_steps": "0", "validation.folder": "",
        "saving.output_dir": str(tmp_path / "out"),
    }  # fmt: skip
    for key, value in edits.items():
        field(page, key).fill(value)
    field(page, "logging.tensorboard").uncheck()
    sync_api.expect(page.locator("#status-line")).to_have_text("config valid")
    page.click("#run-start")
    sync_api.expect(page.locator("#run-state")).to_have_attribute("data-state", "running")
    sync_api.expect(page.locator("#run-state")).to_have_attribute("data-state", "finished", timeout=300_000)
    page.wait_for_function("Number(document.querySelector('#loss-plot').dataset.points) === 3")
    assert page.eval_on_selector("#run-progress", "p => [p.value, p.max]") == [3, 3]
    sync_api.expect(page.locator("#run-numbers")).to_contain_text("step 3 / 3")
    sync_api.expect(page.locator("#run-log")).to_contain_text("trained 3 steps", use_inner_text=False)
    page.evaluate("window.scrollTo(0, 0)")  # the side panels follow the scroll position
    page.screenshot(path=str(tmp_path / "real_run.png"), full_page=True)
    assert (tmp_path / "out" / "demo_sdxl_lora.safetensors").is_file()
