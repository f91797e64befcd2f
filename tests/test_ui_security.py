"""The GUI answers only its own page: real HTTP requests (http.client, which lets a test forge Host, Origin
and Content-Type) against a server on 127.0.0.1. Each attack from issue #14 is refused with 403/400/415
and changes nothing: no run starts or stops, no file is written or changed."""
from __future__ import annotations

import hashlib
import http.client
import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from tuneonce.config.loading import load_config
from tuneonce.ui import schema as ui_schema
from tuneonce.ui.backend import Backend
from tuneonce.ui.runs import REPO_ROOT, RunManager, RunWatch
from tuneonce.ui.server import UiServer

DEMO = "demo_sdxl_lora.yaml"
EVIL_ORIGIN = "http://evil.example"
SLEEPER = "import time; print('up', flush=True); time.sleep(120)"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Client:
    """Requests as the page sends them, unless a test overrides a header (None drops it)."""

    def __init__(self, server: UiServer) -> None:
        self.port = server.server_address[1]
        self.token = server.policy.token
        self.host = f"127.0.0.1:{self.port}"

    def request(self, method: str, path: str, body=None, **overrides) -> tuple[int, dict, http.client.HTTPResponse]:
        headers = {"Host": self.host, "X-Tuneonce-Token": self.token}
        if method == "POST":
            headers.update({"Origin": f"http://{self.host}", "Content-Type": "application/json"})
        for name, value in overrides.items():
            name = name.replace("_", "-")
            headers.pop(name, None)
            if value is not None:
                headers[name] = value
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        finally:
            conn.close()
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = {"raw": raw.decode("utf-8", errors="replace")}
        return response.status, payload, response

    def get(self, path: str, **overrides):
        return self.request("GET", path, **overrides)

    def post(self, path: str, body=None, **overrides):
        return self.request("POST", path, {} if body is None else body, **overrides)


@pytest.fixture
def folders(tmp_path) -> dict[str, Path]:
    presets = tmp_path / "presets"
    presets.mkdir()
    for preset in (REPO_ROOT / "training_presets").glob("*.yaml"):
        shutil.copy(preset, presets / preset.name)
    # the user folder where it is by default: inside the shipped presets folder
    return {"work": tmp_path / "work", "presets": presets, "user": presets / "user", "out": tmp_path / "work" / "out"}


@pytest.fixture
def make_server(folders):
    servers = []

    def make(code: str = SLEEPER, host: str = "127.0.0.1", **kwargs) -> UiServer:
        folders["work"].mkdir(exist_ok=True)
        runs = RunManager(cwd=folders["work"], command_for=lambda config: [sys.executable, "-c", code, str(config)])
        backend = Backend(presets_dir=folders["presets"], workdir=folders["work"], runs=runs,
                          user_presets_dir=folders["user"], output_root=folders["out"])
        srv = UiServer((host, 0), backend, **kwargs)
        srv.start_in_thread()
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.close()


@pytest.fixture
def server(make_server) -> UiServer:
    return make_server()


@pytest.fixture
def client(server) -> Client:
    return Client(server)


def run_request(server: UiServer, output_dir: Path) -> dict:
    demo = server.backend.open_preset(DEMO)
    return {"config": ui_schema.set_path(demo["config"], "saving.output_dir", str(output_dir)), "texts": demo["texts"]}


def save_request(server: UiServer, path: str, lr: float = 1e-4, **extra) -> dict:
    demo = server.backend.open_preset(DEMO)
    return {"config": ui_schema.set_path(demo["config"], "optimizer.lr", lr), "texts": demo["texts"], "path": path,
            **extra}


def start_sleeper(server: UiServer, client: Client) -> None:
    status, body, _ = client.post("/api/run/start", run_request(server, server.backend.output_root / "run"))
    assert status == 200, body
    assert client.get("/api/run/status")[1]["state"] == "running"


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")) if folder.exists() else []


# ---------------------------------------------------------------- the seven attacks of issue #14


@pytest.mark.parametrize("forged", [
    {"Host": "attacker.example:{port}", "Origin": EVIL_ORIGIN, "Content-Type": "text/plain", "X-Tuneonce-Token": None},
    {"Origin": EVIL_ORIGIN, "Content-Type": "text/plain", "X-Tuneonce-Token": None},  # DNS name of ours, no token
    {"Origin": EVIL_ORIGIN, "Content-Type": "text/plain"},  # even with the token: foreign Origin
    {"Content-Type": "text/plain"},  # even same-origin with the token: not JSON
], ids=["tester's-request", "no-token", "foreign-origin", "text-plain"])
def test_cross_site_text_plain_post_starts_no_run(server, client, folders, forged):
    evil_out = folders["out"] / "chosen_by_the_sender"
    headers = {k.replace("-", "_"): (v.format(port=client.port) if isinstance(v, str) else v)
               for k, v in forged.items()}
    status, body, _ = client.post("/api/run/start", run_request(server, evil_out), **headers)
    assert status == (415 if forged == {"Content-Type": "text/plain"} else 403), body
    assert set(body) == {"error"}
    assert client.get("/api/run/status")[1]["state"] == "idle"
    assert files_under(folders["out"]) == [] and files_under(folders["work"]) == []


def test_foreign_host_gets_no_status(server, client):
    start_sleeper(server, client)
    status, body, _ = client.get("/api/run/status", Host=f"attacker.example:{client.port}")
    assert status == 403 and set(body) == {"error"}  # nothing about the run leaks
    # nor any other page of the GUI, the token-bearing index.html above all
    status, body, _ = client.get("/", Host=f"attacker.example:{client.port}", X_Tuneonce_Token=None)
    assert status == 403 and client.token not in json.dumps(body)
    assert client.get("/api/run/status")[1]["state"] == "running"


def test_foreign_host_cannot_stop_a_run(server, client):
    start_sleeper(server, client)
    status, body, _ = client.post("/api/run/stop", Host=f"attacker.example:{client.port}",
                                  Origin=f"http://attacker.example:{client.port}")
    assert status == 403, body
    assert client.get("/api/run/status")[1]["state"] == "running"


@pytest.mark.parametrize("with_token", [False, True])
def test_foreign_origin_cannot_stop_a_run(server, client, with_token):
    start_sleeper(server, client)
    overrides = {} if with_token else {"X_Tuneonce_Token": None}
    status, body, _ = client.post("/api/run/stop", Origin=EVIL_ORIGIN, **overrides)
    assert status == 403, body
    # a same-origin Referer does not make up for a foreign Origin, and no Origin needs a same-origin Referer
    assert client.post("/api/run/stop", Origin=None, Referer=f"{EVIL_ORIGIN}/page")[0] == 403
    assert client.post("/api/run/stop", Origin=None)[0] == 403
    assert client.get("/api/run/status")[1]["state"] == "running"


def test_save_refuses_an_absolute_path(server, client, folders, tmp_path):
    target = tmp_path / "absolute.yaml"
    status, body, _ = client.post("/api/save", save_request(server, str(target), overwrite=True))
    assert status == 400 and "plain file name" in body["error"]
    assert not target.exists() and files_under(folders["user"]) == []


@pytest.mark.parametrize("name", ["../escape.yaml", "sub/../../escape.yaml", "..\\escape.yaml"])
def test_save_refuses_dot_dot(server, client, folders, tmp_path, name):
    status, body, _ = client.post("/api/save", save_request(server, name, overwrite=True))
    assert status == 400 and "plain file name" in body["error"], body
    assert not (tmp_path / "escape.yaml").exists() and files_under(folders["user"]) == []


def test_save_never_overwrites_a_shipped_preset(server, client, folders):
    shipped = folders["presets"] / DEMO
    repo_demo = REPO_ROOT / "training_presets" / DEMO
    before = digest(shipped), digest(repo_demo)
    # the tester's request, as the working folder would have resolved it
    status, body, _ = client.post("/api/save", save_request(server, f"training_presets/{DEMO}", overwrite=True))
    assert status == 400, body
    # a symlink in the user folder that points at a shipped preset is not followed
    folders["user"].mkdir()
    (folders["user"] / "link.yaml").symlink_to(shipped)
    status, body, _ = client.post("/api/save", save_request(server, "link.yaml", overwrite=True))
    assert status == 403 and "outside the user presets folder" in body["error"], body
    assert (digest(shipped), digest(repo_demo)) == before
    assert [p.name for p in files_under(folders["user"])] == ["link.yaml"]
    # and the user folder cannot be the shipped one
    with pytest.raises(ValueError, match="must not hold the shipped presets"):
        Backend(presets_dir=folders["presets"], user_presets_dir=folders["presets"])


# ---------------------------------------------------------------- what the page may do


def test_save_overwrites_only_with_the_flag(server, client, folders):
    status, body, _ = client.post("/api/save", save_request(server, "mine.yaml", lr=2e-4))
    assert status == 200, body
    saved = folders["user"] / "mine.yaml"
    assert Path(body["path"]) == saved and body["name"] == "user/mine.yaml"
    assert load_config(saved).optimizer.lr == 2e-4
    status, body, _ = client.post("/api/save", save_request(server, "mine.yaml", lr=3e-4))
    assert status == 409 and body["exists"] is True
    assert load_config(saved).optimizer.lr == 2e-4  # unchanged
    assert client.post("/api/save", save_request(server, "mine.yaml", lr=3e-4, overwrite="yes"))[0] == 400
    status, body, _ = client.post("/api/save", save_request(server, "mine.yaml", lr=3e-4, overwrite=True))
    assert status == 200, body
    assert load_config(saved).optimizer.lr == 3e-4
    assert [p.name for p in files_under(folders["user"])] == ["mine.yaml"]  # no temp files left behind
    # the saved preset is listed and opens, and Save offers its own name back
    assert "user/mine.yaml" in client.get("/api/presets")[1]["presets"]
    opened = client.get("/api/preset?name=user/mine.yaml")[1]
    assert opened["save_path"] == "mine.yaml" and opened["config"]["optimizer"]["lr"] == 3e-4


def test_run_output_dir_must_lie_below_the_output_root(server, client, folders, tmp_path):
    for key, value in (("saving.output_dir", tmp_path / "elsewhere"), ("saving.output_dir", "out/../../escape"),
                       ("logging.log_dir", tmp_path / "logs"), ("data.cache_dir", "/tmp")):
        request = run_request(server, folders["out"] / "ok")
        request["config"] = ui_schema.set_path(request["config"], key, str(value))
        status, body, _ = client.post("/api/run/start", request)
        assert status == 400 and body["error"].startswith(f"{key}: ") and "--output-root" in body["error"]
    assert client.get("/api/run/status")[1]["state"] == "idle"
    assert files_under(folders["work"]) == [] and not (tmp_path / "elsewhere").exists()


def test_the_page_flow_works_same_origin(make_server, folders):
    server = make_server(code="print('trained', flush=True)")
    client = Client(server)
    status, body, response = client.get("/", X_Tuneonce_Token=None)  # local bind: pages load without the token
    assert status == 200 and f'content="{client.token}"' in body["raw"]
    assert response.getheader("X-Frame-Options") == "DENY" and response.getheader("Set-Cookie") is None
    assert client.get("/api/presets", X_Tuneonce_Token=None)[0] == 200
    # a POST without an Origin passes on a same-origin Referer; JSON with a charset is JSON
    status, body, _ = client.post("/api/check", run_request(server, folders["out"] / "r"), Origin=None,
                                  Referer=f"http://{client.host}/?preset=x",
                                  Content_Type="application/json; charset=utf-8")
    assert status == 200 and body["errors"] == [], body
    # localhost is this server too
    assert client.get("/api/run/status", Host=f"localhost:{client.port}")[0] == 200
    status, body, _ = client.post("/api/run/start", run_request(server, "out/run"))  # relative to the working folder
    assert status == 200, body
    assert Path(body["config_path"]).parent == folders["out"] / "run"
    assert client.post("/api/run/stop")[0] == 200


def test_a_non_local_bind_asks_for_the_token_on_every_request(make_server):
    server = make_server(host="0.0.0.0")  # reached here through 127.0.0.1, one of its names
    client = Client(server)
    assert server.policy.token_everywhere and server.start_url.endswith(f"?token={client.token}")
    for path in ("/", "/static/app.js", "/api/presets", "/api/run/status"):
        assert client.get(path, X_Tuneonce_Token=None)[0] == 403, path
        assert client.get(path, X_Tuneonce_Token="wrong")[0] == 403, path
    status, body, response = client.get(f"/?token={client.token}", X_Tuneonce_Token=None)
    assert status == 200 and f'content="{client.token}"' in body["raw"]
    cookie = response.getheader("Set-Cookie")
    assert cookie.startswith(f"tuneonce_token_{client.port}={client.token};") and "HttpOnly" in cookie
    name_value = cookie.split(";")[0]
    # the page's script and images carry the cookie, its fetches the header
    assert client.get("/static/app.js", X_Tuneonce_Token=None, Cookie=name_value)[0] == 200
    assert client.get("/static/app.js", X_Tuneonce_Token=None, Cookie=f"tuneonce_token_{client.port}=x")[0] == 403
    assert client.get("/api/presets")[0] == 200
    # a cookie alone never carries a POST: that needs the header
    assert client.post("/api/run/stop", X_Tuneonce_Token=None, Cookie=name_value)[0] == 403
    assert client.post("/api/run/stop")[1] == {"stopped": False}


def test_elapsed_time_stops_with_the_run(tmp_path):
    now = [1000.0]
    manager = RunManager(cwd=tmp_path, clock=lambda: now[0],
                         command_for=lambda config: [sys.executable, "-c", SLEEPER, str(config)])
    config = tmp_path / "c.yaml"
    config.write_text("{}")
    manager.start(config, RunWatch(tmp_path / "m.jsonl", tmp_path / "s"))
    now[0] += 5.0
    assert manager.status()["elapsed_s"] == 5.0
    assert manager.stop()
    now[0] += 100.0  # the page keeps polling, or is reloaded, long after Stop
    status = manager.status()
    assert status["state"] == "stopped" and status["elapsed_s"] == 5.0


def test_saved_names_are_yaml(server, client, folders):
    for name in ("run.txt", ".hidden.yaml", "~/x.yaml", ""):
        status, body, _ = client.post("/api/save", save_request(server, name))
        assert status == 400, (name, body)
    assert files_under(folders["user"]) == []
    assert yaml.safe_load((folders["presets"] / DEMO).read_text())  # still the shipped preset
