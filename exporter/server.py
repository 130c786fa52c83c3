"""HTTP: /metrics from the cached rendering, a landing page, health. Never touches the database."""

from __future__ import annotations

import base64
import logging
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import urllib.parse
from typing import Callable, Protocol

from . import __version__, landing
from .metrics import CONTENT_TYPE, Exposition
from .webconfig import AuthBusy, WebConfig

log = logging.getLogger(__name__)

HEALTH_PATHS = ("/-/healthy", "/-/ready")
TEXT = "text/plain; charset=utf-8"
# A client that sends nothing for this long is dropped, so it holds only its own thread.
CLIENT_TIMEOUT_SECONDS = 10.0


class ListenAddressError(Exception):
    """--web.listen-address is not host:port, or the port cannot be bound."""


def parse_listen_address(address: str) -> tuple[str, int]:
    """':10105' -> ('', 10105); '127.0.0.1:10105'; '[::1]:10105'."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ListenAddressError(f"--web.listen-address: {address!r} is not [host]:port")
    return host.strip("[]"), int(port)


class Site(Protocol):
    """What the server serves: byte strings made before any request (fleet.Runtime)."""

    def ready(self) -> bool: ...
    def metrics(self, gzipped: bool) -> bytes: ...
    def probe(self, name: str, gzipped: bool) -> bytes | None: ...
    def names(self) -> list[str]: ...
    def landing(self, name: str | None) -> bytes | None: ...


class ExpositionSite:
    """One exposition as a site (tests, and anything that serves a single snapshot)."""

    def __init__(self, exposition: Exposition, is_ready: Callable[[], bool], telemetry_path: str = "/metrics") -> None:
        self._exposition, self._is_ready, self._path = exposition, is_ready, telemetry_path

    def ready(self) -> bool:
        return self._is_ready()

    def metrics(self, gzipped: bool) -> bytes:
        return self._exposition.body(gzipped)

    def probe(self, name: str, gzipped: bool) -> bytes | None:
        return None

    def names(self) -> list[str]:
        return []

    def landing(self, name: str | None) -> bytes | None:
        e = self._exposition
        return landing.render(e.snapshot, e.probes, e.reload, self._path) if not name else None


def make_handler(
    site: Site,
    telemetry_path: str,
    reload: Callable[[], bool] | None,
    web: WebConfig,
) -> type[BaseHTTPRequestHandler]:

    class Handler(BaseHTTPRequestHandler):
        server_version = f"pg-advisory-lock-exporter/{__version__}"
        timeout = CLIENT_TIMEOUT_SECONDS
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            if web.tls is not None:
                # The TLS handshake runs here, on this connection's thread, so a slow or silent
                # client never holds up the accept loop and other scrapes.
                self.request.settimeout(CLIENT_TIMEOUT_SECONDS)
                self.request = web.tls.wrap_socket(self.request, server_side=True)
            super().setup()

        def _authorized(self) -> bool:
            if web.auth is None:
                return True
            header = self.headers.get("Authorization", "")
            if header.startswith("Basic "):
                try:
                    user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
                except (ValueError, UnicodeDecodeError):
                    user, password = "", ""
                try:
                    if user and web.auth.check(user, password):
                        return True
                except AuthBusy:
                    self._send(429, b"too many requests\n", TEXT, headers={"Retry-After": "1"})
                    return False
            self._send(401, b"unauthorized\n", TEXT,
                       headers={"WWW-Authenticate": 'Basic realm="pg-advisory-lock-exporter", charset="UTF-8"'})
            return False

        def _wants_gzip(self) -> bool:
            accepted = self.headers.get("Accept-Encoding", "")
            return any(part.split(";")[0].strip().lower() == "gzip" and "q=0" not in part.replace(" ", "")
                       for part in accepted.split(","))

        def _send(self, status: int, body: bytes, content_type: str, head: bool = False, encoding: str | None = None,
                  headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            if encoding:
                self.send_header("Content-Encoding", encoding)
                self.send_header("Vary", "Accept-Encoding")
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _route(self, head: bool) -> None:
            if not self._authorized():
                return
            parsed = urllib.parse.urlsplit(self.path)
            path, query = parsed.path, urllib.parse.parse_qs(parsed.query)
            target = (query.get("target") or [""])[0]
            if path == telemetry_path:
                gzipped = self._wants_gzip()
                self._send(200, site.metrics(gzipped), CONTENT_TYPE, head, "gzip" if gzipped else None)
            elif path == "/probe":
                gzipped = self._wants_gzip()
                body = site.probe(target, gzipped)
                if body is None:
                    known = ", ".join(site.names()) or "none: this exporter watches one server, at " + telemetry_path
                    self._send(404, f"unknown target {target!r}; known targets: {known}\n".encode(),
                               TEXT, head)
                else:
                    self._send(200, body, CONTENT_TYPE, head, "gzip" if gzipped else None)
            elif path == "/":
                page = site.landing(target or None)
                if page is None:
                    self._send(404, f"unknown target {target!r}; known targets: {', '.join(site.names())}\n".encode(),
                               TEXT, head)
                else:
                    self._send(200, page, "text/html; charset=utf-8", head)
            elif path == "/-/healthy":
                self._send(200, b"OK\n", TEXT, head)
            elif path == "/-/ready":
                ready = site.ready()
                self._send(200 if ready else 503, b"OK\n" if ready else b"not ready\n", TEXT, head)
            else:
                self._send(404, b"not found\n", TEXT, head)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._route(head=False)

        def do_HEAD(self) -> None:  # noqa: N802
            self._route(head=True)

        def _not_allowed(self) -> None:
            self._send(405, b"method not allowed\n", TEXT, headers={"Allow": "GET, HEAD"})

        def do_POST(self) -> None:  # noqa: N802
            if not self._authorized():
                return
            if self.path.split("?", 1)[0] != "/-/reload":
                self._not_allowed()
            elif reload is None:
                self._send(403, b"lifecycle API is not enabled (--web.enable-lifecycle)\n", TEXT)
            elif reload():
                self._send(200, b"config reloaded\n", TEXT)
            else:
                self._send(500, b"config refused; the previous config stays in force (see the log)\n", TEXT)

        do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed  # noqa: N815

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            log.debug("http: " + format, *args)

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that drops, times out or fails the TLS handshake is the client's problem:
        # one debug line, not a traceback on stderr.
        log.debug("http: connection from %s failed: %s", client_address, sys.exc_info()[1])


class _IPv6Server(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """A threaded HTTP server on its own thread."""

    def __init__(
        self,
        address: str,
        site: Site,
        telemetry_path: str = "/metrics",
        reload: Callable[[], bool] | None = None,
        web: WebConfig = WebConfig(),
    ) -> None:
        host, port = parse_listen_address(address)
        handler = make_handler(site, telemetry_path, reload, web)
        server_class = _IPv6Server if ":" in host else _Server
        try:
            self._httpd = server_class((host, port), handler)
        except OSError as exc:
            raise ListenAddressError(f"--web.listen-address: cannot listen on {address}: {exc.strerror or exc}") from None
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
