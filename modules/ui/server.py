"""tuneonce's browser GUI: a small JSON API over the standard library's HTTP server, and one static page.

Why not Gradio: the page needs a dozen widgets generated from the config schema, a form-wide
validation round-trip and a live plot; Gradio would add a large dependency tree (and CDN-hosted
assets that cannot load offline) for that. The stdlib server has no dependencies, starts in
milliseconds, and the page is plain HTML/JS that a headless browser drives with stable ids.

Run: `python scripts/train_ui.py` or `tuneonce-ui` (127.0.0.1:7861 by default). Every request passes
modules/ui/security.py's checks (Host allow-list, token, same origin, JSON) before any route runs.
"""
from __future__ import annotations

import argparse
import json
import mimetypes
import signal
import socket
import sys
import threading
import traceback
import webbrowser
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from tuneonce.ui.backend import Backend, FileExists, Forbidden, UserError
from tuneonce.ui.security import (TOKEN_QUERY, WILDCARD_ADDRESSES, AccessPolicy, Refusal, check_request,
                                 is_local_address)

STATIC_DIR = Path(__file__).resolve().parent / "static"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7861
MAX_BODY = 4 * 1024 * 1024
TOKEN_PLACEHOLDER = b"__TUNEONCE_TOKEN__"  # in index.html's <meta name="tuneonce-token">
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    # no framing by other sites: a framed page is same-origin and clicks on it would act (clickjacking)
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "frame-ancestors 'none'",
    "Referrer-Policy": "same-origin",
}


class Handler(BaseHTTPRequestHandler):
    server: "UiServer"
    server_version = "tuneonce-ui"
    _set_token_cookie = False  # per request: it came in with a valid ?token=, so the answer sets the cookie

    # -- plumbing -------------------------------------------------------------------------------
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        if self.server.verbose:
            super().log_message(format, *args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        if self._set_token_cookie:
            self.send_header("Set-Cookie", self.server.policy.set_cookie_header())
        self.end_headers()
        self.wfile.write(body)

    def _json(self, payload, status: int = HTTPStatus.OK) -> None:
        self._send(status, json.dumps(payload).encode("utf-8"), "application/json")

    def _body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise UserError(f"request body too large ({length} bytes)")
        raw = self.rfile.read(length) if length else b"{}"
        try:
            data = json.loads(raw or b"{}")
        except json.JSONDecodeError as exc:
            raise UserError(f"request body is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise UserError("request body must be a JSON object")
        return data

    def _file(self, path: Path) -> None:
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        body = path.read_bytes()
        if path == STATIC_DIR / "index.html":  # the page carries this server's token for its requests
            body = body.replace(TOKEN_PLACEHOLDER, self.server.policy.token.encode())
        self._send(HTTPStatus.OK, body, content_type)

    def _refuse(self, refusal: Refusal) -> None:
        """Answer a refused request without acting on it; its body is read and dropped so that closing
        the connection does not reset it before the client has read the answer."""
        length = self.headers.get("Content-Length") or "0"
        if length.isdigit() and 0 < int(length) <= MAX_BODY:
            self.rfile.read(int(length))
        self.close_connection = True
        self._json({"error": str(refusal)}, refusal.status)

    def _dispatch(self, routes: dict) -> None:
        url = urlparse(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            self._set_token_cookie = check_request(self.server.policy, self.command, self.headers, query)
        except Refusal as refusal:
            self._refuse(refusal)
            return
        query.pop(TOKEN_QUERY, None)
        route = routes.get(url.path)
        try:
            if route is not None:
                route(self, query)
            elif self.command == "GET":
                self._static(url.path)
            else:
                self._json({"error": f"no such endpoint: {url.path}"}, HTTPStatus.NOT_FOUND)
        except FileExists as exc:
            self._json({"error": str(exc), "exists": True}, HTTPStatus.CONFLICT)
        except Forbidden as exc:
            self._json({"error": str(exc)}, HTTPStatus.FORBIDDEN)
        except UserError as exc:
            self._json({"error": str(exc)}, HTTPStatus.BAD_REQUEST)
        except Exception as exc:  # the page shows it; the server keeps serving
            if self.server.verbose:
                traceback.print_exc()
            self._json({"error": f"{type(exc).__name__}: {exc}"}, HTTPStatus.INTERNAL_SERVER_ERROR)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self._dispatch(GET_ROUTES)

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        self._dispatch(POST_ROUTES)

    def _static(self, path: str) -> None:
        name = "index.html" if path in ("", "/") else path.lstrip("/").removeprefix("static/")
        target = (STATIC_DIR / name).resolve()
        if STATIC_DIR not in target.parents or not target.is_file():
            self._json({"error": f"not found: {path}"}, HTTPStatus.NOT_FOUND)
            return
        self._file(target)

    # -- API ------------------------------------------------------------------------------------
    def get_schema(self, query: dict) -> None:
        self._json(self.server.backend.schema())

    def get_presets(self, query: dict) -> None:
        backend = self.server.backend
        self._json({"presets": backend.list_presets(), "save_dir": str(backend.user_presets_dir)})

    def get_preset(self, query: dict) -> None:
        self._json(self.server.backend.open_preset(query.get("name", "")))

    def _config_and_texts(self) -> tuple[dict, dict, dict]:
        body = self._body()
        config, texts = body.get("config") or {}, body.get("texts") or {}
        if not isinstance(config, dict) or not isinstance(texts, dict):
            raise UserError("config and texts must be JSON objects")
        return config, texts, body

    def post_check(self, query: dict) -> None:
        config, texts, _ = self._config_and_texts()
        self._json(self.server.backend.check(config, texts))

    def post_depth(self, query: dict) -> None:
        config, texts, _ = self._config_and_texts()
        self._json(self.server.backend.depth(config, texts))

    def post_memory(self, query: dict) -> None:
        config, texts, _ = self._config_and_texts()
        self._json(self.server.backend.memory(config, texts))

    def post_save(self, query: dict) -> None:
        config, texts, body = self._config_and_texts()
        overwrite = body.get("overwrite", False)
        if not isinstance(overwrite, bool):
            raise UserError("overwrite must be true or false")
        self._json(self.server.backend.save(config, str(body.get("path") or ""), texts, overwrite=overwrite))

    def post_run_start(self, query: dict) -> None:
        config, texts, _ = self._config_and_texts()
        self._json(self.server.backend.start_run(config, texts))

    def post_run_stop(self, query: dict) -> None:
        self._json({"stopped": self.server.backend.runs.stop()})

    def get_run_status(self, query: dict) -> None:
        since = int(query.get("since") or 0)
        self._json(self.server.backend.runs.status(since=since))

    def get_run_sample(self, query: dict) -> None:
        path = self.server.backend.runs.sample_file(query.get("name", ""))
        if path is None:
            self._json({"error": "no such sample image"}, HTTPStatus.NOT_FOUND)
        else:
            self._file(path)


GET_ROUTES = {
    "/api/schema": Handler.get_schema,
    "/api/presets": Handler.get_presets,
    "/api/preset": Handler.get_preset,
    "/api/run/status": Handler.get_run_status,
    "/api/run/sample": Handler.get_run_sample,
}
POST_ROUTES = {
    "/api/check": Handler.post_check,
    "/api/depth": Handler.post_depth,
    "/api/memory": Handler.post_memory,
    "/api/save": Handler.post_save,
    "/api/run/start": Handler.post_run_start,
    "/api/run/stop": Handler.post_run_stop,
}


class UiServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], backend: Backend, verbose: bool = False,
                 allow_hosts: tuple[str, ...] = (), require_token: bool | None = None) -> None:
        super().__init__(address, Handler)
        self.backend = backend
        self.verbose = verbose
        # built after binding: with port 0 the port is known only now
        self.policy = AccessPolicy.for_bind(address[0], self.server_address[1], tuple(allow_hosts),
                                            require_token=require_token)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        if self.server_address[0] in WILDCARD_ADDRESSES:
            host = socket.gethostname()  # 0.0.0.0 is no address to browse to
        return f"http://{host}:{port}/"

    @property
    def start_url(self) -> str:
        """The URL to open: with `?token=` where every request needs the token (the page then keeps it)."""
        return f"{self.url}?{TOKEN_QUERY}={self.policy.token}" if self.policy.token_everywhere else self.url

    def start_in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="tuneonce-ui", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        """Stop serving and stop a training run this server started."""
        self.shutdown()
        self.server_close()
        self.backend.runs.shutdown()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneonce-ui", description="Browser GUI for tuneonce training.")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to bind (default {DEFAULT_HOST}; anything else exposes the GUI, which can "
                             "start processes and write files, to your network, and then asks for its token on "
                             "every request)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 = any free)")
    parser.add_argument("--presets", type=Path, default=None,
                        help="shipped preset folder, opened read-only (default: the package's training_presets/)")
    parser.add_argument("--user-presets", type=Path, default=None,
                        help="the only folder Save writes to, listed as user/... (default: training_presets/user/ in a "
                             "checkout, $TUNEONCE_HOME/presets when installed; <presets>/user/ with --presets)")
    parser.add_argument("--output-root", type=Path, default=None,
                        help="runs started from the page write (output_dir, log_dir, cache_dir) only below this "
                             "folder (default: the working folder)")
    parser.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="also answer requests for this host name (e.g. behind a reverse proxy); repeatable")
    parser.add_argument("--require-token", action="store_true",
                        help="ask for the token on every request on 127.0.0.1 too (a machine shared with others)")
    parser.add_argument("--open", action="store_true", help="open the page in the default browser")
    parser.add_argument("--verbose", action="store_true", help="log every request and print server tracebacks")
    return parser


def bind_warning(host: str) -> str | None:
    """The warning printed when the GUI is reachable from other machines."""
    if is_local_address(host):
        return None
    return (f"warning: binding to {host}: anyone who can reach this port and has the token URL can write files and "
            "start training runs on this machine; the token travels unencrypted (plain HTTP). Prefer 127.0.0.1 "
            "and an SSH tunnel (ssh -L).")


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warning = bind_warning(args.host)
    if warning:
        print(warning, file=sys.stderr)
    try:
        backend = Backend(presets_dir=args.presets, user_presets_dir=args.user_presets, output_root=args.output_root)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        server = UiServer((args.host, args.port), backend, verbose=args.verbose, allow_hosts=tuple(args.allow_host),
                          require_token=True if args.require_token else None)
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    print(f"tuneonce GUI on {server.start_url}  (Ctrl+C to stop)", flush=True)
    print(f"saves presets into {backend.user_presets_dir}; runs write below {backend.output_root}", flush=True)
    backend.warm_up_in_background()
    if args.open:
        webbrowser.open(server.start_url)
    # SIGTERM (e.g. from a service manager) ends like Ctrl+C: the training run this GUI started is stopped too.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("\nstopping", file=sys.stderr)
    finally:
        server.server_close()
        backend.runs.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
