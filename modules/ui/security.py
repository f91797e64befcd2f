"""Who may talk to the GUI: the checks every request passes before the server acts on it.

The GUI starts processes and writes files, so it must answer only its own page:

- Host allow-list. A web page can point its own domain at 127.0.0.1 (DNS rebinding) and then read and
  drive the GUI as "same origin"; the browser still sends the attacker's name in `Host`, so only the
  names of this server (its bind address, localhost, 127.0.0.1, [::1], `--allow-host` names) are answered.
- A per-server token (as Jupyter does), embedded in the page the server sends. Every state-changing
  request carries it in the `X-Tuneonce-Token` header; a foreign page cannot read it (same-origin
  policy), so it cannot forge the header. When the GUI listens on a non-local address, every request
  (GETs too) needs it: the page is opened once as `/?token=...`, which also sets a cookie for the
  requests the page cannot add a header to (its script, style sheet and sample images).
- State-changing requests (POST) need a same-origin `Origin` (or, without one, a same-origin `Referer`)
  and `Content-Type: application/json`. The JSON type is what makes a cross-site request need a CORS
  preflight, which this server never grants; `text/plain` form posts are "simple" and skip it.

A refusal is decided before the body is parsed or any route runs, so a refused request changes nothing.
"""
from __future__ import annotations

import hmac
import ipaddress
import secrets
import socket
from dataclasses import dataclass, field
from http import HTTPStatus
from http.cookies import SimpleCookie
from urllib.parse import urlsplit

TOKEN_HEADER = "X-Tuneonce-Token"
TOKEN_QUERY = "token"
LOCAL_NAMES = ("localhost", "127.0.0.1", "[::1]")
WILDCARD_ADDRESSES = ("0.0.0.0", "::", "")


def is_local_address(host: str) -> bool:
    """True for loopback binds (127.0.0.0/8, ::1, localhost): only this machine can connect."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(address: str) -> str:
    """An address as it appears in a Host header: IPv6 literals in brackets, names lower-case."""
    address = address.strip().lower()
    return f"[{address.strip('[]')}]" if ":" in address else address


def machine_names() -> set[str]:
    """This machine's host names and the addresses they resolve to (for a bind to 0.0.0.0 or ::)."""
    names = set()
    for name in (socket.gethostname(), socket.getfqdn()):
        if not name:
            continue
        names.add(host_name(name))
        try:
            names.update(host_name(info[4][0]) for info in socket.getaddrinfo(name, None))
        except OSError:  # a host name that does not resolve: the name alone is still allowed
            pass
    return names


@dataclass
class AccessPolicy:
    """The allowed `host:port` values, the server's token and whether every request needs it."""

    port: int
    names: set[str]
    token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    token_everywhere: bool = False

    @classmethod
    def for_bind(cls, bind_host: str, port: int, extra_hosts: tuple[str, ...] = (),
                 token: str | None = None, require_token: bool | None = None) -> "AccessPolicy":
        names = {host_name(n) for n in (*LOCAL_NAMES, *extra_hosts)}
        if bind_host in WILDCARD_ADDRESSES:
            names |= machine_names()
        else:
            names.add(host_name(bind_host))
        if require_token is None:
            require_token = not is_local_address(bind_host)
        return cls(port=port, names=names, token=token or secrets.token_urlsafe(32), token_everywhere=require_token)

    @property
    def cookie_name(self) -> str:
        # browsers share cookies between the ports of one host: the port keeps two GUIs apart
        return f"tuneonce_token_{self.port}"

    def host_allowed(self, host_header: str | None) -> bool:
        if not host_header:
            return False
        host = host_header.strip().lower()
        if host.endswith(f":{self.port}"):
            return host[: -len(f":{self.port}")] in self.names
        return self.port == 80 and host in self.names  # the default port is left out of Host

    def token_ok(self, candidate: str | None) -> bool:
        return bool(candidate) and hmac.compare_digest(candidate.encode(), self.token.encode())

    def cookie_token(self, cookie_header: str | None) -> str | None:
        if not cookie_header:
            return None
        try:
            morsel = SimpleCookie(cookie_header).get(self.cookie_name)
        except Exception:  # a malformed Cookie header is no token
            return None
        return morsel.value if morsel else None

    def set_cookie_header(self) -> str:
        return f"{self.cookie_name}={self.token}; Path=/; HttpOnly; SameSite=Strict"


class Refusal(Exception):
    """A request the server does not act on: HTTP status and a short reason."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def same_origin(value: str, host_header: str) -> bool:
    """True when an Origin or Referer names this very server (scheme http/https, same host:port)."""
    parts = urlsplit(value.strip())
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host_header.strip().lower()


def check_request(policy: AccessPolicy, method: str, headers, query: dict) -> bool:
    """Raise Refusal unless the request may proceed; True when it was let in by the `?token=` query
    (the server then sets the token cookie, so the page's own sub-requests need no query)."""
    host = headers.get("Host")
    if not policy.host_allowed(host):
        raise Refusal(HTTPStatus.FORBIDDEN, f"host {host!r} is not allowed (start the GUI with --allow-host to add it)")
    header_token = headers.get(TOKEN_HEADER)
    via_query = False
    if method == "POST":
        if not policy.token_ok(header_token):
            raise Refusal(HTTPStatus.FORBIDDEN, f"missing or wrong {TOKEN_HEADER} header (reload the page)")
        origin = headers.get("Origin")
        if origin is not None:
            if not same_origin(origin, host):
                raise Refusal(HTTPStatus.FORBIDDEN, f"cross-origin request from {origin!r} refused")
        else:
            referer = headers.get("Referer")
            if not referer or not same_origin(referer, host):
                raise Refusal(HTTPStatus.FORBIDDEN, "request without a same-origin Origin or Referer refused")
        content_type = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise Refusal(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                          f"Content-Type must be application/json, got {content_type or 'none'!r}")
    elif policy.token_everywhere:
        query_token = query.get(TOKEN_QUERY)
        if policy.token_ok(query_token):
            via_query = True
        elif not (policy.token_ok(header_token) or policy.token_ok(policy.cookie_token(headers.get("Cookie")))):
            raise Refusal(HTTPStatus.FORBIDDEN, "this GUI needs its token: open the URL with ?token= that it printed")
    return via_query
