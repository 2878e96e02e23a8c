"""The HTTP endpoint (off by default): ``GET /metrics`` and ``GET /healthz``.

``http.listen`` (``127.0.0.1:9108``; empty: off) is served by the standard library's
ThreadingHTTPServer in a thread of its own (``http``, plus one ``http-request`` per request),
which only reads what the daemon keeps: a scrape never waits for a frame and a frame never
waits for a scrape.

- ``/metrics``: the Prometheus text format (or OpenMetrics when asked) of
  :mod:`edged.publish.metrics`, encoded by prometheus_client;
- ``/healthz``: 200 and ``{"state": "healthy", ...}`` while the daemon is healthy; 503 with
  ``reason`` otherwise: starting, stopped, or degraded with its problems (a camera down past
  its stall timeout, the pipeline stuck, the state disk full): :mod:`edged.health`, the state
  the systemd status line and the retained MQTT status carry.

Access: a bearer token read from ``http.token_file``, or basic auth (``http.username`` and
``http.password_file``), required on every path when set.  Binding an address that is not
loopback without either is a configuration error unless ``http.allow_unauthenticated``.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from edged import __version__
from edged.logs import Throttle

log = logging.getLogger("edged.http")

REQUEST_TIMEOUT_S = 10.0  # a client that sends nothing is dropped after this


@dataclass
class HttpSettings:
    listen: str = field(default="", metadata={
        "help": "host:port of the /metrics and /healthz endpoint, e.g. 127.0.0.1:9108 "
                "([::1]:9108 for IPv6); empty = off (docs/metrics.md)"})
    token_file: Optional[str] = field(default=None, metadata={
        "help": "file holding a bearer token (first line) that every request must send "
                "(Authorization: Bearer <token>)"})
    username: Optional[str] = field(default=None, metadata={
        "help": "basic auth user name (with password_file)"})
    password_file: Optional[str] = field(default=None, metadata={
        "help": "file holding the basic auth password (first line)"})
    allow_unauthenticated: bool = field(default=False, metadata={
        "help": "allow listening on an address that is not loopback without a token or a "
                "password (anyone who reaches it reads the metrics)"})

    def config_errors(self) -> List[Tuple[str, str]]:
        if not self.listen.strip():
            return []
        try:
            host, _ = parse_listen(self.listen)
        except ValueError as exc:
            return [("listen", str(exc))]
        errs = []
        if self.token_file and (self.username or self.password_file):
            errs.append(("token_file", "username/password_file are set too; use one of them"))
        if bool(self.username) != bool(self.password_file):
            errs.append(("username" if not self.username else "password_file",
                         "username and password_file go together; set both"))
        for key in ("token_file", "password_file"):
            why = _secret_error(getattr(self, key))
            if why:
                errs.append((key, why))
        if not (is_loopback(host) or self.token_file or self.username
                or self.allow_unauthenticated):
            errs.append(("listen", f"{self.listen!r} is not a loopback address: set "
                                   f"http.token_file (or http.username and http.password_file), "
                                   f"or http.allow_unauthenticated: true"))
        return errs


def parse_listen(text: str) -> Tuple[str, int]:
    """``host:port`` (``[v6]:port``; ``:port`` = every interface) as (host, port)."""
    s = text.strip()
    if s.startswith("["):
        host, _, rest = s[1:].partition("]")
        sep, port = rest[:1], rest[1:]
    else:
        host, sep, port = s.rpartition(":")
    if sep != ":" or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"expected host:port with a port in 1-65535 (127.0.0.1:9108, "
                         f"[::1]:9108), got {text!r}")
    return host or "0.0.0.0", int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def _secret_error(path: Optional[str]) -> Optional[str]:
    if not path:
        return None
    try:
        read_secret(path)
    except OSError as exc:
        return str(exc)
    return None


def read_secret(path: str) -> str:
    """The first line of ``path``, which must not be empty."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            line = f.readline().strip()
    except OSError as exc:
        raise OSError(f"cannot read {path!r}: {exc.strerror or exc}") from exc
    if not line:
        raise OSError(f"{path!r} is empty")
    return line


def _server(host: str, port: int, handler):
    """A bound ThreadingHTTPServer (http.server is imported only when the endpoint is on)."""
    from http.server import ThreadingHTTPServer

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        allow_reuse_address = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        def process_request(self, request, client_address):
            """One named thread per request (``http-request`` in ``top -H``, the journal)."""
            threading.Thread(target=self.process_request_thread,
                             args=(request, client_address), name="http-request",
                             daemon=True).start()

    return Server((host, port), handler)


class HttpEndpoint:
    """The listener and its thread; :meth:`start` binds (OSError when it cannot)."""

    def __init__(self, settings: HttpSettings, daemon):
        self.settings = settings
        self.daemon = daemon
        self.host, self.port = parse_listen(settings.listen)
        self.expect = self._expected_authorization(settings)
        self.registry = None
        self.server = None  # the ThreadingHTTPServer once started
        self._thread: Optional[threading.Thread] = None
        self._errors = Throttle(log)
        self.requests = 0

    @staticmethod
    def _expected_authorization(s: HttpSettings) -> Optional[str]:
        if s.token_file:
            return "Bearer " + read_secret(s.token_file)
        if s.username:
            pair = f"{s.username}:{read_secret(s.password_file)}".encode("utf-8")
            return "Basic " + base64.b64encode(pair).decode("ascii")
        return None

    def start(self) -> "HttpEndpoint":
        from edged.publish.metrics import registry

        self.registry = registry(self.daemon)
        self.server = _server(self.host, self.port, _handler(self))
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={
            "poll_interval": 0.5}, name="http", daemon=True)
        self._thread.start()
        log.info("http: /metrics and /healthz on %s:%d%s", self.host, self.port,
                 "" if self.expect else " (no authentication)")
        return self

    def stop(self) -> None:
        if self.server is None:
            return
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)
        self.server = None

    # -- answers

    def authorized(self, header: Optional[str]) -> bool:
        if self.expect is None:
            return True
        got = (header or "").strip()
        if got.lower().startswith("basic "):  # the base64 may be padded differently
            try:
                got = "Basic " + base64.b64encode(base64.b64decode(got[6:].strip(),
                                                                   validate=True)).decode()
            except (binascii.Error, ValueError):
                return False
        return hmac.compare_digest(got.encode("utf-8", "replace"), self.expect.encode("utf-8"))

    def metrics(self, accept: Optional[str]) -> Tuple[int, str, bytes]:
        from prometheus_client.exposition import choose_encoder

        encoder, ctype = choose_encoder(accept or "")
        return 200, ctype, encoder(self.registry)

    def healthz(self) -> Tuple[int, str, bytes]:
        doc = health_document(self.daemon)
        return (200 if doc["state"] == "healthy" else 503), "application/json", \
            (json.dumps(doc, default=str) + "\n").encode()

    def failed(self, path: str, exc: Exception) -> None:
        self._errors.problem(logging.ERROR, "http: GET %s failed: %s: %s", path,
                             type(exc).__name__, exc)


def health_document(daemon) -> dict:
    """What ``/healthz`` answers: the health (:mod:`edged.health`), with ``reason`` when it is
    not healthy, and each camera's connection."""
    health = daemon.health
    doc = dict(health.document(), device=daemon.device, edged_version=__version__,
               pid=os.getpid())
    if doc["state"] != "healthy":
        doc["reason"] = health.describe()
    now = time.monotonic()
    doc["cameras"] = {
        name: {"connected": bool(cam.connected), "finished": bool(cam.finished),
               "last_frame_age_s": (None if cam.last_frame_monotonic is None
                                    else round(now - cam.last_frame_monotonic, 3)),
               "last_error": cam.last_error}
        for name, cam in dict(daemon.cameras).items()}
    return doc


def _handler(endpoint: HttpEndpoint):
    from http.server import BaseHTTPRequestHandler

    routes = {"/metrics": lambda h: endpoint.metrics(h.headers.get("Accept")),
              "/healthz": lambda h: endpoint.healthz()}

    class Handler(BaseHTTPRequestHandler):
        server_version = f"edged/{__version__}"
        timeout = REQUEST_TIMEOUT_S
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # noqa: N802 (http.server's name)
            endpoint.requests += 1
            path = self.path.split("?", 1)[0]
            if not endpoint.authorized(self.headers.get("Authorization")):
                scheme = endpoint.expect.split(" ", 1)[0]
                return self._send(401, "text/plain; charset=utf-8", b"unauthorized\n",
                                  {"WWW-Authenticate": f'{scheme} realm="edged"'})
            route = routes.get(path)
            if route is None:
                return self._send(404, "text/plain; charset=utf-8",
                                  b"not found: GET /metrics or /healthz\n")
            try:
                code, ctype, body = route(self)
            except Exception as exc:  # a scrape never takes the daemon down
                endpoint.failed(path, exc)
                code, ctype, body = 500, "text/plain; charset=utf-8", f"{exc}\n".encode()
            self._send(code, ctype, body)

        def _send(self, code: int, ctype: str, body: bytes, headers=None):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt, *args):  # not to stderr: the journal at debug level
            log.debug("http: %s %s", self.address_string(), fmt % args)

    return Handler
