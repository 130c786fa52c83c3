"""HTTP: /metrics from the cached rendering, a landing page, health. Never touches the database.

Read it in the order a request meets it, one piece at a time: negotiate_gzip (which encoding),
webconfig.authorize (who may ask), App (the routing table: a request -> a Response, no socket in
sight, every route only picks bytes the Site already made), and _Handler (reads the request,
writes the Response, decides nothing).
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
import sys
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol

from . import __version__, landing
from .exposition import CONTENT_TYPE, Exposition
from .webconfig import BasicAuth, Decision, WebConfig, authorize

log = logging.getLogger(__name__)

HEALTH_PATHS = ("/-/healthy", "/-/ready")
TEXT = "text/plain; charset=utf-8"
JSON = "application/json"
HTML = "text/html; charset=utf-8"
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
    def elsewhere(self, name: str) -> str | None: ...
    def service_discovery(self, address: str) -> bytes: ...


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

    def elsewhere(self, name: str) -> str | None:
        return None

    def service_discovery(self, address: str) -> bytes:
        return b"[]\n"

    def landing(self, name: str | None) -> bytes | None:
        e = self._exposition
        return landing.render(e.snapshot, e.probes, e.reload, self._path) if not name else None


# -- encoding: RFC 9110 12.5.3 Accept-Encoding ------------------------------------------

# RFC 9110 12.4.2: qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] )
_QVALUE = re.compile(r"0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?")


def _weight(params: list[str]) -> float:
    """The weight of one list element from its parameters (['q=0.5'] -> 0.5); 1 without any.

    Whitespace around ';' and '=' is allowed, and 'q' in either case. Anything else -- a malformed
    q-value (q=.5, q=2, q=1.5, q=0.0001, q=abc, q=), a parameter without '=', or one other than q
    (the grammar has none) -- makes the element "not acceptable" (0). That is what nginx does
    (ngx_http_gzip_quantity answers 0 for a malformed q-value, and any other parameter makes
    ngx_http_gzip_accept_encoding decline: no gzip), and what Prometheus's client_golang does (its
    negotiation, gddo's httputil, drops an element whose parameter is not a good q: gzip is not
    chosen). Go's net/http has no server-side Accept-Encoding negotiation of its own. Plain text
    is acceptable to every client, so a doubt means plain.
    """
    weight = 1.0
    for param in params:
        name, sep, value = (part.strip() for part in param.partition("="))
        if name.lower() != "q" or not sep or not _QVALUE.fullmatch(value):
            return 0.0
        weight = float(value)
    return weight


def parse_accept_encoding(header: str) -> dict[str, float]:
    """'gzip;q=0.8, *;q=0' -> {'gzip': 0.8, '*': 0.0}: each listed coding and its weight.

    Coding names are lowercased and x-gzip is gzip (RFC 9110 8.4.1.3); a coding listed twice keeps
    its highest weight (as client_golang's negotiation does); empty list elements are skipped.
    """
    weights: dict[str, float] = {}
    for element in header.split(","):
        coding, *params = (part.strip() for part in element.split(";"))
        if not coding:
            continue
        coding = "gzip" if coding.lower() == "x-gzip" else coding.lower()
        weights[coding] = max(weights.get(coding, 0.0), _weight(params))
    return weights


def negotiate_gzip(accept_encoding: str) -> bool:
    """Whether to answer in gzip: gzip's weight, or '*''s when gzip is not listed, is above 0.

    q=0 is "not acceptable"; identity's weight does not matter (plain text is what we send
    otherwise); no header at all means plain.
    """
    weights = parse_accept_encoding(accept_encoding)
    return weights.get("gzip", weights.get("*", 0.0)) > 0


# -- what a request is, and what an answer is -----------------------------------------------


@dataclass(frozen=True)
class Request:
    """What a route reads of a request: the path, ?target= and whether the answer may be gzip."""

    path: str
    target: str = ""
    gzip: bool = False

    @classmethod
    def parse(cls, raw_path: str, accept_encoding: str = "") -> Request:
        """'/probe?target=orders' and an Accept-Encoding header -> Request('/probe', 'orders', ...)."""
        parsed = urllib.parse.urlsplit(raw_path)
        target = (urllib.parse.parse_qs(parsed.query).get("target") or [""])[0]
        return cls(parsed.path, target, negotiate_gzip(accept_encoding))


@dataclass(frozen=True)
class Response:
    """A whole answer, made before a byte is written: the handler only writes it."""

    status: int
    body: bytes
    content_type: str = TEXT
    encoding: str | None = None  # sent as Content-Encoding, with Vary: Accept-Encoding
    headers: tuple[tuple[str, str], ...] = ()

    def header_lines(self) -> list[tuple[str, str]]:
        """The headers this answer is sent with (http.server adds Server and Date)."""
        lines = [("Content-Type", self.content_type), ("Content-Length", str(len(self.body)))]
        if self.encoding:
            lines += [("Content-Encoding", self.encoding), ("Vary", "Accept-Encoding")]
        return lines + list(self.headers)


UNAUTHORIZED = Response(401, b"unauthorized\n", headers=(
    ("WWW-Authenticate", 'Basic realm="pg-advisory-lock-exporter", charset="UTF-8"'),))
TOO_MANY_REQUESTS = Response(429, b"too many requests\n", headers=(("Retry-After", "1"),))
REFUSALS = {Decision.UNAUTHORIZED: UNAUTHORIZED, Decision.BUSY: TOO_MANY_REQUESTS}
NOT_FOUND = Response(404, b"not found\n")
METHOD_NOT_ALLOWED = Response(405, b"method not allowed\n", headers=(("Allow", "GET, HEAD"),))
INTERNAL_ERROR = Response(500, b"internal server error\n")


def exposition(body: bytes, gzipped: bool) -> Response:
    """Figures the Site already rendered (gzipped or not, as asked)."""
    return Response(200, body, CONTENT_TYPE, "gzip" if gzipped else None)


# -- routing: a request -> a Response ----------------------------------------------------


class App:
    """Requests -> Responses, with no socket in sight; a route only picks bytes the Site made."""

    def __init__(self, site: Site, telemetry_path: str = "/metrics", reload: Callable[[], bool] | None = None,
                 auth: BasicAuth | None = None, advertise: str = "") -> None:
        self.site, self.telemetry_path, self.reload, self.auth = site, telemetry_path, reload, auth
        self.advertise = advertise  # the host:port /sd gives Prometheus for this exporter
        # GET and HEAD. The telemetry path last, so it wins over a fixed path of the same name.
        self.routes: dict[str, Callable[[Request], Response]] = {
            "/probe": self.probe, "/sd": self.service_discovery, "/": self.landing, "/-/healthy": self.healthy, "/-/ready": self.ready,
            telemetry_path: self.metrics,
        }

    def respond(self, method: str, raw_path: str, authorization: str = "", accept_encoding: str = "") -> Response:
        """The answer to a request. Never raises: an unexpected exception is a 500 and one log line
        (its type and message, never a header or a traceback)."""
        try:
            return self._respond(method, raw_path, authorization, accept_encoding)
        except Exception as exc:  # noqa: BLE001 - a bug costs one answer, not the connection
            log.error("http: %s %s failed: %r", method, urllib.parse.urlsplit(raw_path).path, exc)
            return INTERNAL_ERROR

    def _respond(self, method: str, raw_path: str, authorization: str, accept_encoding: str) -> Response:
        if method not in ("GET", "HEAD", "POST"):
            return METHOD_NOT_ALLOWED  # before auth, as it always was: it tells nothing
        decision = authorize(self.auth, authorization)
        if decision is not Decision.OK:
            return REFUSALS[decision]
        request = Request.parse(raw_path, accept_encoding)
        if method == "POST":
            return self.post(request)
        return self.routes.get(request.path, lambda _: NOT_FOUND)(request)

    def metrics(self, request: Request) -> Response:
        return exposition(self.site.metrics(request.gzip), request.gzip)

    def probe(self, request: Request) -> Response:
        body = self.site.probe(request.target, request.gzip)
        if body is None and (owner := self.site.elsewhere(request.target)) is not None:
            return Response(404, f"{owner}\n".encode())
        if body is None:
            known = ", ".join(self.site.names()) or "none: this exporter watches one server, at " + self.telemetry_path
            return Response(404, f"unknown target {request.target!r}; known targets: {known}\n".encode())
        return exposition(body, request.gzip)

    def service_discovery(self, request: Request) -> Response:
        """Prometheus's HTTP service discovery: this shard's targets at this exporter's address."""
        return Response(200, self.site.service_discovery(self.advertise), JSON)

    def landing(self, request: Request) -> Response:
        page = self.site.landing(request.target or None)
        if page is None:
            known = ", ".join(self.site.names())
            return Response(404, f"unknown target {request.target!r}; known targets: {known}\n".encode())
        return Response(200, page, HTML)

    def healthy(self, request: Request) -> Response:
        return Response(200, b"OK\n")

    def ready(self, request: Request) -> Response:
        return Response(200, b"OK\n") if self.site.ready() else Response(503, b"not ready\n")

    def post(self, request: Request) -> Response:
        """POST /-/reload (with --web.enable-lifecycle); POST elsewhere is 405."""
        if request.path != "/-/reload":
            return METHOD_NOT_ALLOWED
        if self.reload is None:
            return Response(403, b"lifecycle API is not enabled (--web.enable-lifecycle)\n")
        if self.reload():
            return Response(200, b"config reloaded\n")
        return Response(500, b"config refused; the previous config stays in force (see the log)\n")


# -- the socket side ---------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    """Reads a request and writes App's Response; decides nothing. make_handler sets app and tls."""

    server_version = f"pg-advisory-lock-exporter/{__version__}"
    timeout = CLIENT_TIMEOUT_SECONDS
    protocol_version = "HTTP/1.1"
    app: App
    tls: ssl.SSLContext | None = None

    def setup(self) -> None:
        if self.tls is not None:
            # The TLS handshake runs here, on this connection's thread, so a slow or silent
            # client never holds up the accept loop and other scrapes.
            self.request.settimeout(CLIENT_TIMEOUT_SECONDS)
            self.request = self.tls.wrap_socket(self.request, server_side=True)
        super().setup()

    def _serve(self) -> None:
        response = self.app.respond(self.command, self.path, self.headers.get("Authorization", ""),
                                    self.headers.get("Accept-Encoding", ""))
        self.send_response(response.status)
        for name, value in response.header_lines():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _serve  # noqa: N815

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        log.debug("http: " + format, *args)


def make_handler(
    site: Site,
    telemetry_path: str,
    reload: Callable[[], bool] | None,
    web: WebConfig,
    advertise: str = "",
) -> type[BaseHTTPRequestHandler]:
    """The handler class for one server: _Handler bound to its App and TLS context."""
    app = App(site, telemetry_path, reload, web.auth, advertise)
    return type("Handler", (_Handler,), {"app": app, "tls": web.tls})


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
        advertise: str = "",
    ) -> None:
        host, port = parse_listen_address(address)
        handler = make_handler(site, telemetry_path, reload, web, advertise or address)
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
