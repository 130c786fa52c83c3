"""The HTTP pieces one at a time, with no socket: Accept-Encoding, basic auth, routing, headers."""

from __future__ import annotations

import ast
import base64
import logging
from pathlib import Path

import bcrypt
import pytest

from exporter.server import (
    INTERNAL_ERROR,
    App,
    Request,
    Response,
    negotiate_gzip,
    parse_accept_encoding,
)
from exporter.webconfig import AuthBusy, BasicAuth, Decision, authorize, parse_basic_auth

# -- encoding ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header, gzip",
    [
        ("", False),  # no preference stated: plain
        ("gzip", True),
        ("GZIP", True),
        ("gzip;q=0.8", True),  # the old check refused this (it saw "q=0" in "q=0.8")
        ("gzip;q=0", False),
        ("GZIP;Q=0", False),  # names and parameter names are case-insensitive
        ("gzip ; q = 0.5", True),  # whitespace around ';' and '='
        ("gzip;q=0.", False),
        ("gzip;q=0.000", False),
        ("gzip;q=0.001", True),
        ("gzip;q=1", True),
        ("gzip;q=1.", True),
        ("gzip;q=1.000", True),
        # malformed weights: not acceptable (nginx and client_golang do not gzip either)
        ("gzip;q=1.001", False),
        ("gzip;q=0.0001", False),
        ("gzip;q=2", False),
        ("gzip;q=-1", False),
        ("gzip;q=.5", False),
        ("gzip;q=abc", False),
        ("gzip;q=", False),
        ("gzip;q", False),
        ('gzip;q="0.5"', False),
        ("gzip;level=9", False),
        ("*", True),  # any coding not otherwise listed
        ("*;q=0", False),
        ("*;q=0, gzip", True),  # gzip listed: * does not speak for it
        ("gzip;q=0, *", False),
        ("*;q=0.1, identity", True),
        ("identity", False),
        ("identity;q=0, gzip", True),  # identity's weight is not our concern
        ("gzip;q=0, identity", False),
        ("deflate, br", False),
        ("x-gzip", True),
        ("X-GZIP;q=0.5", True),
        ("gzipx, notgzip", False),
        ("br;q=1.0, gzip;q=0.8, *;q=0.1", True),
        (" , gzip ,, ", True),  # empty list elements are allowed and skipped
        ("gzip;q=0, gzip", True),  # listed twice: the highest weight
    ],
)
def test_negotiate_gzip(header: str, gzip: bool) -> None:
    assert negotiate_gzip(header) is gzip


def test_parse_accept_encoding_keeps_each_coding_and_its_weight() -> None:
    assert parse_accept_encoding("GZip;Q=0.8, br, *;q=0, x-gzip;q=0.5, compress;q=9") == {
        "gzip": 0.8, "br": 1.0, "*": 0.0, "compress": 0.0}


# -- basic auth --------------------------------------------------------------------------


def basic(text: str) -> str:
    return "Basic " + base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    "header, expected",
    [
        (basic("prometheus:s3cret"), ("prometheus", "s3cret")),
        (basic("prometheus:s3:cr:et"), ("prometheus", "s3:cr:et")),  # the first ':' ends the user
        (basic("prometheus"), ("prometheus", "")),
        (basic("élan:mot de passe"), ("élan", "mot de passe")),
        ("", None),
        ("Bearer abc", None),
        ("Basic", None),
        ("Basic not base64!", None),
        ("Basic " + base64.b64encode(b"\xff\xfe:x").decode(), None),  # not UTF-8
        ("Basic ÿÿÿÿ", None),  # not ASCII (http.server decodes headers as latin-1)
    ],
)
def test_parse_basic_auth(header: str, expected: tuple[str, str] | None) -> None:
    assert parse_basic_auth(header) == expected


class Busy:
    """A BasicAuth whose bcrypt turn never comes."""

    def check(self, user: str, password: str) -> bool:
        raise AuthBusy("a password check is already running")


@pytest.fixture(scope="module")
def auth() -> BasicAuth:
    return BasicAuth({"prometheus": bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4))})


def test_authorize(auth: BasicAuth) -> None:
    assert authorize(None, "") is Decision.OK  # no users configured: everyone
    assert authorize(auth, basic("prometheus:s3cret")) is Decision.OK
    assert authorize(auth, basic("prometheus:wrong")) is Decision.UNAUTHORIZED
    assert authorize(auth, basic(":s3cret")) is Decision.UNAUTHORIZED
    assert authorize(auth, "") is Decision.UNAUTHORIZED
    assert authorize(auth, basic("prometheus:" + "p" * 73)) is Decision.UNAUTHORIZED
    assert authorize(Busy(), basic("prometheus:s3cret")) is Decision.BUSY  # type: ignore[arg-type]


# -- routing -----------------------------------------------------------------------------


class FakeSite:
    """Bytes made before any request, and a record of what the routes asked for."""

    def __init__(self) -> None:
        self.is_ready = False
        self.asked: list[tuple[str, object]] = []

    def ready(self) -> bool:
        return self.is_ready

    def metrics(self, gzipped: bool) -> bytes:
        self.asked.append(("metrics", gzipped))
        return b"gz-metrics" if gzipped else b"metrics"

    def probe(self, name: str, gzipped: bool) -> bytes | None:
        self.asked.append(("probe", name))
        return (b"gz-" if gzipped else b"") + name.encode() if name == "orders" else None

    def names(self) -> list[str]:
        return ["orders"]

    def landing(self, name: str | None) -> bytes | None:
        return b"<html>" if name in (None, "orders") else None

    def elsewhere(self, name: str) -> str | None:
        return "target payments belongs to shard 1 of 2" if name == "payments" else None

    def service_discovery(self, address: str) -> bytes:
        return b"[]"


def test_request_parse() -> None:
    assert Request.parse("/probe?target=orders&x=1", "gzip") == Request("/probe", "orders", True)
    assert Request.parse("/metrics") == Request("/metrics", "", False)


def test_routes_pick_the_sites_bytes() -> None:
    site = FakeSite()
    app = App(site, "/metrics")
    response = app.respond("GET", "/metrics", accept_encoding="gzip")
    assert (response.status, response.body, response.encoding) == (200, b"gz-metrics", "gzip")
    assert response.content_type.startswith("text/plain; version=")
    assert app.respond("HEAD", "/metrics").body == b"metrics"  # the handler writes no body for HEAD
    assert app.respond("GET", "/probe?target=orders") == Response(200, b"orders", response.content_type)
    missing = app.respond("GET", "/probe?target=billing")
    assert missing.status == 404 and missing.body == b"unknown target 'billing'; known targets: orders\n"
    assert app.respond("GET", "/probe?target=payments") == Response(404, b"target payments belongs to shard 1 of 2\n")
    assert app.respond("GET", "/?target=orders").body == b"<html>"
    assert app.respond("GET", "/?target=billing").status == 404
    assert app.respond("GET", "/-/healthy").status == 200
    assert app.respond("GET", "/-/ready").status == 503
    site.is_ready = True
    assert app.respond("GET", "/-/ready") == Response(200, b"OK\n")
    assert app.respond("GET", "/nope").status == 404
    assert site.asked == [("metrics", True), ("metrics", False), ("probe", "orders"), ("probe", "billing"),
                          ("probe", "payments")]


def test_the_telemetry_path_wins_over_a_fixed_path() -> None:
    assert App(FakeSite(), "/").respond("GET", "/").body == b"metrics"


def test_methods_and_reload() -> None:
    calls: list[str] = []
    results = iter([True, False])

    def reload() -> bool:
        calls.append("reload")
        return next(results)

    app = App(FakeSite(), "/metrics", reload)
    assert app.respond("POST", "/-/reload").status == 200
    assert app.respond("POST", "/-/reload?x").status == 500  # refused: the previous config stays
    assert app.respond("POST", "/metrics").status == 405
    assert App(FakeSite()).respond("POST", "/-/reload").status == 403
    for method in ("PUT", "DELETE", "PATCH", "OPTIONS"):
        response = app.respond(method, "/metrics")
        assert response.status == 405 and ("Allow", "GET, HEAD") in response.headers
    assert calls == ["reload", "reload"]


def test_auth_comes_before_every_route(auth: BasicAuth) -> None:
    app = App(FakeSite(), "/metrics", lambda: True, auth)
    for method, path in (("GET", "/metrics"), ("GET", "/-/healthy"), ("POST", "/-/reload")):
        refused = app.respond(method, path, basic("prometheus:wrong"))
        assert refused.status == 401 and refused.headers[0][0] == "WWW-Authenticate"
    assert app.respond("GET", "/metrics", basic("prometheus:s3cret")).status == 200
    assert App(FakeSite(), auth=Busy()).respond(  # type: ignore[arg-type]
        "GET", "/metrics", basic("prometheus:s3cret")).headers == (("Retry-After", "1"),)


def test_an_exception_is_a_500_and_one_line_without_the_credentials(caplog) -> None:
    class Broken(FakeSite):
        def metrics(self, gzipped: bool) -> bytes:
            raise ValueError("no bytes\ntoday")

    with caplog.at_level(logging.DEBUG, logger="exporter"):
        response = App(Broken()).respond("GET", "/metrics?secret=1", basic("prometheus:s3cret"))
    assert response is INTERNAL_ERROR
    assert [r.getMessage() for r in caplog.records] == ["http: GET /metrics failed: ValueError('no bytes\\ntoday')"]


# -- what is written ---------------------------------------------------------------------


def test_header_lines() -> None:
    assert Response(200, b"abc").header_lines() == [
        ("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", "3")]
    assert Response(200, b"z", "x/y", "gzip", (("Retry-After", "1"),)).header_lines() == [
        ("Content-Type", "x/y"), ("Content-Length", "1"), ("Content-Encoding", "gzip"),
        ("Vary", "Accept-Encoding"), ("Retry-After", "1")]


# -- the shape ---------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["exporter/server.py", "exporter/webconfig.py"])
def test_no_function_is_over_60_lines(module: str) -> None:
    path = Path(__file__).resolve().parent.parent / module
    tree = ast.parse(path.read_text())
    lengths = {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(tree)
               if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert {name: n for name, n in lengths.items() if n > 60} == {}
