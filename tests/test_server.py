"""The HTTP side: gzip when asked, HEAD, 405, readiness, all from bytes made before the scrape."""

from __future__ import annotations

import gzip
import http.client
import threading

import pytest

from exporter.exposition import Exposition
from exporter.server import ExpositionSite, MetricsServer
from tests.test_metrics import SNAPSHOT


@pytest.fixture
def served():
    exposition = Exposition(SNAPSHOT)
    exposition.render_now()
    ready = threading.Event()
    server = MetricsServer("127.0.0.1:0", ExpositionSite(exposition, ready.is_set), "/metrics")
    server.start()
    yield server, exposition, ready
    server.stop()


def request(port: int, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def test_gzip_only_when_the_scraper_asks(served) -> None:
    server, exposition, _ = served
    status, headers, body = request(server.port, "GET", "/metrics", {"Accept-Encoding": "gzip"})
    assert status == 200 and headers["content-encoding"] == "gzip" and headers["vary"] == "Accept-Encoding"
    assert gzip.decompress(body) == exposition.body()
    status, headers, body = request(server.port, "GET", "/metrics", {"Accept-Encoding": "identity"})
    assert "content-encoding" not in headers and body == exposition.body()
    status, headers, body = request(server.port, "GET", "/metrics", {"Accept-Encoding": "gzip;q=0, identity"})
    assert "content-encoding" not in headers


def test_head_answers_headers_only(served) -> None:
    server, exposition, _ = served
    status, headers, body = request(server.port, "HEAD", "/metrics")
    assert status == 200 and body == b"" and int(headers["content-length"]) == len(exposition.body())


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS"])
def test_other_methods_are_405(served, method) -> None:
    server, _, _ = served
    status, headers, _ = request(server.port, method, "/metrics")
    assert status == 405 and headers["allow"] == "GET, HEAD"


def test_ready_is_503_until_the_first_poll_is_published(served) -> None:
    server, _, ready = served
    assert request(server.port, "GET", "/-/ready")[0] == 503
    assert request(server.port, "GET", "/-/healthy")[0] == 200
    ready.set()
    assert request(server.port, "GET", "/-/ready")[0] == 200
    assert request(server.port, "GET", "/nope")[0] == 404


def test_probe_names_the_known_targets_when_asked_for_another(served) -> None:
    server, _, _ = served
    status, _, body = request(server.port, "GET", "/probe?target=orders")
    assert status == 404 and b"unknown target 'orders'" in body


def test_a_weighted_gzip_is_gzip_and_a_refusal_in_capitals_is_a_refusal(served) -> None:
    """RFC 9110 12.5.3: a q-value is a number (0.8 accepts) and names are case-insensitive (Q=0 refuses)."""
    server, exposition, _ = served
    status, headers, body = request(server.port, "GET", "/metrics", {"Accept-Encoding": "gzip;q=0.8"})
    assert status == 200 and headers.get("content-encoding") == "gzip"
    assert gzip.decompress(body) == exposition.body()
    status, headers, body = request(server.port, "GET", "/metrics", {"Accept-Encoding": "GZIP;Q=0"})
    assert status == 200 and "content-encoding" not in headers and body == exposition.body()


class BrokenSite(ExpositionSite):
    """A site whose /metrics fails: stands for any bug on the request path."""

    def metrics(self, gzipped: bool) -> bytes:
        raise RuntimeError("the site broke")


def test_an_unexpected_error_is_a_500_with_one_log_line_not_a_dropped_connection(caplog, capfd) -> None:
    exposition = Exposition(SNAPSHOT)
    exposition.render_now()
    server = MetricsServer("127.0.0.1:0", BrokenSite(exposition, lambda: True), "/metrics")
    server.start()
    try:
        with caplog.at_level("DEBUG", logger="exporter"):
            status, _, body = request(server.port, "GET", "/metrics")
            assert status == 500 and body == b"internal server error\n"
            assert request(server.port, "GET", "/-/healthy")[0] == 200  # and the server goes on
    finally:
        server.stop()
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "the site broke" in errors[0].getMessage() and errors[0].exc_info is None
    assert "Traceback" not in capfd.readouterr().err
