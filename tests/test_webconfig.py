"""Basic auth: a refusal takes as long for an unknown user as for a known one, the remembered pair
skips bcrypt, and a flood of bad logins is bounded to one bcrypt check at a time."""

from __future__ import annotations

import base64
import threading
import urllib.error
import urllib.request

import bcrypt
import pytest
import yaml

from exporter.webconfig import BasicAuth, bcrypt_cost
from tests.exporter_proc import ExporterProcess
from tests.metrics_util import parse


def hashed(password: bytes, cost: int) -> bytes:
    return bcrypt.hashpw(password, bcrypt.gensalt(rounds=cost))


def test_the_dummy_hash_costs_what_the_dearest_configured_hash_costs() -> None:
    auth = BasicAuth({"cheap": hashed(b"a", 4), "dear": hashed(b"b", 6)})
    assert bcrypt_cost(auth.dummy_hash) == 6
    assert auth.check("nobody", "a") is False and auth.bcrypt_checks == 1  # an unknown user still costs a check


def test_a_remembered_pair_needs_no_bcrypt_check() -> None:
    auth = BasicAuth({"prometheus": hashed(b"s3cret", 4)})
    assert auth.check("prometheus", "s3cret") is True
    assert auth.check("prometheus", "s3cret") is True
    assert auth.bcrypt_checks == 1
    assert auth.check("prometheus", "wrong") is False
    assert auth.bcrypt_checks == 2  # a wrong password is never remembered


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def status_of(url: str, headers: dict[str, str]) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.slow
def test_a_flood_of_bad_logins_is_refused_with_429_and_the_exporter_keeps_its_pace(tmp_path, server) -> None:
    web = tmp_path / "web.yaml"
    web.write_text(yaml.safe_dump({"basic_auth_users": {"prometheus": hashed(b"s3cret", 12).decode()}}))
    proc = ExporterProcess(tmp_path, {"dsn": server.dsn(), "poll_interval": "200ms", "locks": []},
                           f"--web.config.file={web}")
    try:
        good = basic("prometheus", "s3cret")
        from tests.conftest import wait_until

        wait_until(lambda: _answers(proc.url), timeout=30)
        assert status_of(proc.url + "/metrics", good) == 200  # now remembered: no more bcrypt for it
        stop = threading.Event()
        codes: list[int] = []

        def flood(user: str) -> None:
            while not stop.is_set():
                codes.append(status_of(proc.url + "/metrics", basic(user, "guess")))

        flooders = [threading.Thread(target=flood, args=(f"user-{i % 2}",), daemon=True) for i in range(6)]
        for thread in flooders:
            thread.start()
        try:
            polls = []
            for _ in range(10):  # authorised scrapes during the flood: answered, and polls go on
                request = urllib.request.Request(proc.url + "/metrics", headers=good)
                with urllib.request.urlopen(request, timeout=30) as response:
                    polls.append(parse(response.read().decode())[("pg_advisory_lock_exporter_poll_duration_seconds_count", ())])
                stop.wait(0.2)
        finally:
            stop.set()
            for thread in flooders:
                thread.join(30)
        assert polls[-1] > polls[0]
        assert 429 in codes and 401 in codes and set(codes) <= {401, 429}
    finally:
        proc.stop()


def _answers(url: str) -> bool:
    try:
        return status_of(url + "/-/healthy", {}) in (200, 401)
    except OSError:
        return False


def test_a_password_over_72_bytes_is_wrong_without_a_bcrypt_check() -> None:
    """bcrypt 5 raises on it, older bcrypts matched its first 72 bytes: neither may happen."""
    auth = BasicAuth({"prometheus": hashed(b"p" * 72, 4)})
    assert auth.check("prometheus", "p" * 72 + "x") is False
    assert auth.check("prometheus", "é" * 37) is False  # 74 bytes, 37 characters
    assert auth.bcrypt_checks == 0
    assert auth.check("prometheus", "p" * 72) is True
    assert auth.check("prometheus", "p" * 72 + "x") is False
