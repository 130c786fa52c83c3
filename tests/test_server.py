"""The HTTP side: gzip when asked, HEAD, 405, readiness, all from bytes made before the scrape."""

from __future__ import annotations

import gzip
import http.client
import threading

import pytest

from exporter.metrics import Exposition
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
