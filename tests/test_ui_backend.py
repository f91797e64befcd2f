"""The GUI's server side without a browser: schema, validation, grey-outs, saving, runs, HTTP guards."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import typing
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from pydantic import Field

from tuneonce.config.loading import load_config, validate_dict
from tuneonce.config.schema import OptimizerConfig, TrainConfig
from tuneonce.ui import schema as ui_schema
from tuneonce.ui.backend import Backend, UserError, run_paths
from tuneonce.ui.runs import REPO_ROOT, RunManager, RunWatch
from tuneonce.ui.server import UiServer, bind_warning

DEMO = "demo_sdxl_lora.yaml"


@pytest.fixture(scope="module")
def backend() -> Backend:
    return Backend(workdir=REPO_ROOT)


@pytest.fixture(scope="module")
def demo(backend) -> dict:
    return backend.open_preset(DEMO)


def fields_by_key(schema: dict) -> dict[str, dict]:
    return {f["key"]: f for f in ui_schema.iter_fields(schema)}


# ---------------------------------------------------------------- schema


def test_every_config_field_is_on_the_page_with_its_kind(backend):
    fields = fields_by_key(backend.schema())
    assert "optimizer.lora_b_orthogonalize" in fields and fields["optimizer.lora_b_orthogonalize"]["kind"] == "bool"
    a_opt = fields["optimizer.lora_a_optimizer"]
    annotation = OptimizerConfig.model_fields["lora_a_optimizer"].annotation
    assert a_opt["kind"] == "enum" and a_opt["choices"] == list(typing.get_args(annotation))
    assert a_opt["description"] == OptimizerConfig.model_fields["lora_a_optimizer"].description
    rank = fields["lora.rank"]
    assert (rank["kind"], rank["min"], rank["max"]) == ("int", 1, 4096)
    assert fields["lora.alpha"]["nullable"] and not fields["lora.rank"]["nullable"]
    assert fields["sampling.prompts"]["kind"] == "yaml" and fields["sampling.prompts"]["multiline"]
    # every leaf of a full config dump is a field of the page (nothing hidden, nothing invented)
    dumped = load_config(REPO_ROOT / "training_presets" / DEMO).model_dump(mode="json")
    leaves = set()

    def walk(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict) and f"{prefix}{key}" not in fields:
                walk(value, f"{prefix}{key}.")
            else:
                leaves.add(f"{prefix}{key}")

    walk(dumped)
    assert leaves == set(fields)


def test_a_new_config_field_appears_without_ui_code():
    class NewOptimizer(OptimizerConfig):
        cautious: bool = Field(default=False, description="Mask update components that disagree with the gradient.")

    class NewConfig(TrainConfig):
        optimizer: NewOptimizer = Field(default_factory=NewOptimizer)

    field = fields_by_key(ui_schema.describe_config(NewConfig))["optimizer.cautious"]
    assert field["kind"] == "bool" and field["default"] is False
    assert field["description"].startswith("Mask update components")


# ---------------------------------------------------------------- validation and grey-outs


def test_check_reports_errors_by_field_through_the_config_validation(backend, demo):
    config = ui_schema.set_path(demo["config"], "lora.rank", 0)
    result = backend.check(config, {"lora.targets": "[to_q, to_k"})
    by_key = {e["key"]: e["message"] for e in result["errors"]}
    assert by_key["lora.rank"] == dict(validate_dict(config))["lora.rank"]
    assert by_key["lora.targets"].startswith("not valid YAML")


def test_blocked_choices_are_exactly_what_validation_rejects(backend, demo):
    config = demo["config"]
    blocked = backend.check(config)["blocked"]
    assert "spectral_scaling" in blocked["lora.dora"]["true"]
    for key, values in blocked.items():
        field = fields_by_key(backend.schema())[key]
        for value_text in values:
            value = {"true": True, "false": False}.get(value_text, value_text) if field["kind"] == "bool" else next(
                c for c in field["choices"] if str(c) == value_text)
            assert validate_dict(ui_schema.set_path(config, key, value)), (key, value)
    forced = ui_schema.set_path(config, "lora.force_dora_with_spectral", True)
    assert "lora.dora" not in backend.check(forced)["blocked"]
    no_spectral = ui_schema.set_path(config, "optimizer.spectral_scaling", False)
    assert "lora.dora" not in backend.check(no_spectral)["blocked"]
    # and from DoRA on (forced), spectral scaling stays allowed but the force switch is what is rejected
    dora = ui_schema.set_path(forced, "lora.dora", True)
    assert backend.check(dora)["blocked"]["lora.force_dora_with_spectral"].keys() == {"false"}


# ---------------------------------------------------------------- saving


def test_saved_yaml_runs_unchanged_with_the_cli(demo, tmp_path):
    backend = Backend(workdir=REPO_ROOT, user_presets_dir=tmp_path)
    config = ui_schema.set_path(demo["config"], "optimizer.lora_a_optimizer", "adam")
    out = backend.save(config, "run.yaml", demo["texts"])
    saved = Path(out["path"])
    assert saved == tmp_path / "run.yaml"
    assert yaml.safe_load(saved.read_text())["optimizer"]["lora_a_optimizer"] == "adam"
    dry = subprocess.run([sys.executable, "scripts/train.py", "--config", str(saved), "--dry-run"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert load_config(saved).optimizer.lora_a_optimizer == "adam"


def test_save_refuses_bad_paths_and_invalid_configs(demo, tmp_path):
    backend = Backend(workdir=REPO_ROOT, user_presets_dir=tmp_path)
    with pytest.raises(UserError, match=r"\.yaml or \.yml"):
        backend.save(demo["config"], "run.txt")
    with pytest.raises(UserError, match="plain file name"):
        backend.save(demo["config"], str(tmp_path / "run.yaml"))
    bad = ui_schema.set_path(demo["config"], "optimizer.lr", -1)
    with pytest.raises(UserError, match=r"^optimizer\.lr: "):
        backend.save(bad, "bad.yaml")
    assert list(tmp_path.iterdir()) == []


def test_run_paths_follow_the_config_and_the_ui_loads_no_torch(tmp_path):
    for log_dir in (None, "elsewhere/logs"):
        raw = load_config(REPO_ROOT / "training_presets" / DEMO, [f"logging.log_dir={log_dir or ''}"])
        out = Path(raw.saving.output_dir)
        assert run_paths(raw) == (out, Path(log_dir) if log_dir else out / "logs", out / "samples")
    # the backend and the run layout it uses are torch-free (the first Start would take seconds otherwise)
    code = ("import sys; import tuneonce.ui.backend, tuneonce.trainer.layout; "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


# ---------------------------------------------------------------- runs


def python_command(code: str):
    return lambda config_path: [sys.executable, "-c", code, str(config_path)]


def wait_for(predicate, timeout: float = 20.0):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def test_run_reads_only_its_own_complete_metric_lines(tmp_path):
    metrics = tmp_path / "logs" / "metrics.jsonl"
    metrics.parent.mkdir()
    metrics.write_text(json.dumps({"step": 99, "loss": 9.0}) + "\n")  # an earlier run in the same folder
    go = tmp_path / "go"  # the half-written line stays half-written until the test has looked at it
    code = (
        "import json, os, sys, time\n"
        f"f = open({str(metrics)!r}, 'a')\n"
        "f.write(json.dumps({'step': 1, 'loss': 0.5, 'lr': 1e-3}) + '\\n'); f.flush()\n"
        "f.write('{\"step\": 2, \"lo'); f.flush()\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.02)\n"
        "f.write('ss\": 0.25}\\n'); f.flush()\n"
    )
    manager = RunManager(cwd=tmp_path, command_for=python_command(code))
    config = tmp_path / "c.yaml"
    config.write_text("{}")
    manager.start(config, RunWatch(metrics, tmp_path / "samples"), max_steps=2)
    wait_for(lambda: metrics.read_bytes().endswith(b'"lo'))
    first = manager.status()
    assert first["record_count"] == 1 and first["records"][0]["step"] == 1  # not the old run's 99, nor half a line
    go.touch()
    done = wait_for(lambda: (s := manager.status()) and s["state"] == "finished" and s)
    assert [r["step"] for r in done["records"]] == [1, 2] and done["loss"] == 0.25
    assert manager.status(since=1)["records"] == [{"step": 2, "loss": 0.25}]


def test_stop_ends_the_process_group_and_failures_are_reported(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("{}")
    watch = RunWatch(tmp_path / "m.jsonl", tmp_path / "s")
    sleeper = RunManager(cwd=tmp_path, command_for=python_command("import time; print('up', flush=True); time.sleep(60)"))
    run = sleeper.start(config, watch)
    wait_for(lambda: "up" in sleeper.status()["log"])
    with pytest.raises(RuntimeError, match="already running"):
        sleeper.start(config, watch)
    assert sleeper.stop()
    assert run.process.poll() is not None and sleeper.status()["state"] == "stopped"
    failing = RunManager(cwd=tmp_path, command_for=python_command("raise SystemExit('config error: bad')"))
    failing.start(config, watch)
    status = wait_for(lambda: (s := failing.status()) and s["state"] != "running" and s)
    assert status["state"] == "failed" and status["returncode"] == 1 and "config error: bad" in status["log"]


# ---------------------------------------------------------------- HTTP


def test_http_guards_and_host_warning(tmp_path):
    server = UiServer(("127.0.0.1", 0), Backend(workdir=REPO_ROOT))
    server.start_in_thread()
    try:
        def status_of(path: str, body: dict | None = None) -> int:
            data = None if body is None else json.dumps(body).encode()
            headers = {} if body is None else {  # as the page sends them (tests/test_ui_security.py: the refusals)
                "Origin": server.url.rstrip("/"), "Content-Type": "application/json",
                "X-Tuneonce-Token": server.policy.token}
            try:
                with urllib.request.urlopen(urllib.request.Request(server.url + path, data=data, headers=headers)) as r:
                    return r.status
            except urllib.error.HTTPError as e:
                return e.code

        assert status_of("") == 200 and status_of("static/app.js") == 200
        assert status_of("static/../server.py") == 404
        assert status_of("api/preset?name=../pyproject.toml") == 400
        assert status_of("api/run/sample?name=../../etc/passwd") == 404
        assert status_of("api/save", {"config": [], "path": "x.yaml"}) == 400
    finally:
        server.close()
    assert bind_warning("127.0.0.1") is None and bind_warning("localhost") is None
    assert "0.0.0.0" in bind_warning("0.0.0.0") and "token" in bind_warning("192.168.1.5")


# ---------------------------------------------------------------- memory plan


def test_memory_panel_shows_the_planners_prediction_and_budget_pick(backend, demo):
    """The published SDXL architecture (no local folder) at 1024 px: the rows are the planner's own numbers, the
    encoders leave the total when cached (and count only while caching / sampling), a budget shows its pick."""
    from tuneonce.model.builtin import build_meta_components
    from tuneonce.trainer.memory_plan import plan_memory, settings_from_config

    config = ui_schema.set_path(demo["config"], "model.base_model", "no/such/folder")
    config = ui_schema.set_path(config, "data.resolution", 1024)
    report = backend.memory(config, demo["texts"])
    rows = dict(report["rows"])
    components = {k: v for k, v in build_meta_components("sdxl").items() if k.startswith(("unet", "text_encoder"))}
    settings, _ = settings_from_config(load_config_dict(config, demo["texts"], backend), backbone="unet")
    plan = plan_memory(components, settings)
    assert rows["total (predicted peak)"] == f"{plan.peak / 2**30:.2f} GiB" == report["peak"]
    assert rows["weights"] == f"{plan.weight_bytes / 2**30:.2f} GiB" and "parked after caching (CPU)" in rows
    assert "peak while sampling" in rows  # the demo samples: the encoders are borrowed back for it
    uncached = ui_schema.set_path(config, "data.cache_text_embeddings", False)
    resident = dict(backend.memory(uncached, demo["texts"])["rows"])
    assert "parked after caching (CPU)" not in resident
    assert float(resident["weights"].split()[0]) > float(rows["weights"].split()[0]) + 1  # SDXL's encoders: ~1.6 GiB
    assert "budget" not in report
    picked = backend.memory(ui_schema.set_path(config, "memory.budget_gb", 8), demo["texts"])["budget"]
    assert picked["fits"] and "training.gradient_checkpointing: true" in picked["changes"]
    assert float(picked["peak"].split()[0]) <= 8 * 0.9
    hopeless = backend.memory(ui_schema.set_path(config, "memory.budget_gb", 0.01), demo["texts"])["budget"]
    assert not hopeless["fits"] and "memory.quantize.denoiser: nf4" in hopeless["changes"]
    assert backend.memory(ui_schema.set_path(config, "data.resolution", -3), demo["texts"]) == {
        "error": "the memory plan needs a valid config"}
    finetune = ui_schema.set_path(config, "method", "finetune")
    assert "LoRA runs" in backend.memory(finetune, demo["texts"])["error"]


def load_config_dict(config: dict, texts: dict, backend: Backend) -> TrainConfig:
    merged, errors = backend.merge_texts(config, texts)
    assert not errors
    return TrainConfig.model_validate(merged)
