"""The exporter as a user runs it: a process, a port, a real server."""

from __future__ import annotations

import time

import pytest

from tests.exporter_proc import ExporterProcess
from tests.metrics_util import parse, series, up


@pytest.fixture
def exporter(tmp_path, server):
    started: list[ExporterProcess] = []

    def start(config: dict, *args: str, **kwargs) -> ExporterProcess:
        proc = ExporterProcess(tmp_path, {"dsn": server.dsn(), "poll_interval": "200ms", **config}, *args, **kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


LOCKS = [{"name": "billing-leader", "key": 4242}, {"name": "hourly-digest", "key": {"hashtext": "hourly-digest"}}]


def test_end_to_end_scrape_shows_holder_and_stops_on_sigterm(exporter, sessions, server) -> None:
    holder = sessions.open(application_name="billing-worker")
    holder.execute("SELECT pg_advisory_lock(4242)")
    # Probes on, trying every 10 ms: the exporter's own sessions take locks, and must be in no figure.
    locks = [{**LOCKS[0], "probe": {"expect": "held", "interval": "10ms"}},
             {**LOCKS[1], "probe": {"expect": "free", "interval": "10ms"}}, {"name": "spare", "key": 77, "probe": {"interval": "100ms"}}]
    proc = exporter({"dsn": server.dsn(password="hunter2"), "locks": locks})
    text = proc.metrics_when(lambda t: up(t) == 1 and ("pg_advisory_lock_probe_ok", (("database", "postgres"), ("lock", "spare"))) in parse(t))
    samples = parse(text)
    assert samples[("pg_advisory_lock_holders", (("database", "postgres"), ("lock", "billing-leader"), ("mode", "exclusive")))] == 1
    assert samples[("pg_advisory_lock_holders", (("database", "postgres"), ("lock", "hourly-digest"), ("mode", "exclusive")))] == 0
    holders = series(text, "pg_advisory_lock_holder_info")
    assert [(h["lock"], h["application_name"], h["pid"]) for h in holders] == [
        ("billing-leader", "billing-worker", str(holder.info.backend_pid))
    ]
    # The exporter's own sessions (the probe's try-locks included) are in no figure, scrape after scrape.
    for _ in range(30):
        samples = parse(proc.get()[1])
        assert ("pg_advisory_lock_unnamed_holders", (("database", "postgres"),)) not in samples
        assert samples[("pg_advisory_lock_holders", (("database", "postgres"), ("lock", "spare"), ("mode", "exclusive")))] == 0
        assert samples[("pg_advisory_lock_acquisitions_total", (("database", "postgres"), ("lock", "hourly-digest")))] == 0
        time.sleep(0.02)
    assert proc.stop() == 0
    log = proc.log()
    assert "hunter2" not in log and "hunter2" not in text
    assert "listening on 127.0.0.1:" in log and "stopped" in log


def test_starts_and_serves_up_0_while_the_server_is_unreachable(exporter) -> None:
    from tests.pgcluster import free_port

    proc = exporter({"dsn": f"host=127.0.0.1 port={free_port()} dbname=app user=exp password=hunter2", "locks": LOCKS})
    text = proc.metrics_when(lambda t: parse(t).get(("pg_advisory_lock_exporter_poll_errors_total", ())) == 2)
    assert up(text) == 0
    assert "pg_advisory_lock_holders" not in text
    log = proc.log()
    assert log.count("poll failed on 127.0.0.1:") == 1, log  # logged once, not per attempt
    assert "Traceback" not in log and "hunter2" not in log


def test_bad_listen_address_is_one_line(exporter, tmp_path) -> None:
    proc = ExporterProcess(tmp_path, {"locks": []}, "--web.listen-address=nonsense")
    assert proc.wait() == 2
    assert proc.log().strip().splitlines()[-1] == "--web.listen-address: 'nonsense' is not [host]:port"


def test_bad_log_level_names_the_flag(tmp_path) -> None:
    proc = ExporterProcess(tmp_path, {"locks": []}, "--log.level=loud")
    assert proc.wait() == 2
    assert "--log.level: 'loud' is not one of debug, info, warning, error" in proc.log()


def test_check_config_refuses_a_poll_interval_beyond_the_servers_statement_timeout(tmp_path) -> None:
    """600h passed --check-config, then every poll failed on the server (issue 27)."""
    proc = ExporterProcess(tmp_path, {"dsn": "host=db dbname=app", "poll_interval": "600h", "locks": []}, "--check-config")
    assert proc.wait() == 1
    assert proc.log().strip().splitlines() == [
        f"{proc.config_path}: poll_interval: must be at most 2147483.647s (about 24.8 days: the poll's statement_timeout, "
        "an int of milliseconds on the server)"]


def test_json_logs(exporter) -> None:
    import json

    proc = exporter({"locks": LOCKS}, "--log.format=json")
    proc.metrics_when(lambda t: up(t) == 1)
    proc.stop()
    records = [json.loads(line) for line in proc.log().splitlines()]
    assert {"ts", "level", "logger", "msg"} <= set(records[0])
    assert any(r["msg"].startswith("connected to 127.0.0.1:") for r in records)


def test_http_routes(exporter) -> None:
    import urllib.request

    proc = exporter({"locks": LOCKS}, "--web.telemetry-path=/custom")
    proc.wait_ready()
    status, body = proc.get("/custom")
    from exporter import __version__

    assert status == 200 and series(body, "pg_advisory_lock_exporter_build_info") == [{"version": __version__}]
    assert proc.get("/metrics")[0] == 404
    assert proc.get("/-/healthy") == (200, "OK\n")
    status, body = proc.get("/")
    assert status == 200 and 'href="/custom"' in body
    request = urllib.request.Request(proc.url + "/custom", method="POST", data=b"")
    try:
        urllib.request.urlopen(request, timeout=5)
        raise AssertionError("POST was accepted")
    except urllib.error.HTTPError as exc:
        assert exc.code == 405 and exc.headers["Allow"] == "GET, HEAD"


def test_probe_series_are_served(exporter, sessions) -> None:
    sessions.open().execute("SELECT pg_advisory_lock(4242)")
    locks = [
        {"name": "billing-leader", "key": 4242, "probe": {"expect": "held"}, "max_hold": "1m"},
        {"name": "hourly-digest", "key": {"hashtext": "hourly-digest"}, "probe": {"expect": "free", "interval": "100ms"}},
    ]
    proc = exporter({"locks": locks, "probe_interval": "200ms"})
    leader = (("database", "postgres"), ("lock", "billing-leader"))
    digest = (("database", "postgres"), ("lock", "hourly-digest"))
    text = proc.metrics_when(
        lambda t: parse(t).get(("pg_advisory_lock_probe_ok", leader)) == 1
        and parse(t).get(("pg_advisory_lock_probe_ok", digest)) == 1
        and parse(t).get(("pg_advisory_lock_exporter_up", ())) == 1
    )
    samples = parse(text)
    assert samples[("pg_advisory_lock_probe_acquirable", leader)] == 0
    assert samples[("pg_advisory_lock_max_hold_seconds", leader)] == 60
    # The probe's own hold of hourly-digest is never a holder.
    for _ in range(20):
        samples = parse(proc.get()[1])
        assert samples.get(("pg_advisory_lock_acquisitions_total", digest), 0) == 0
        time.sleep(0.05)


def test_json_and_watch_need_the_locks_command(tmp_path) -> None:
    proc = ExporterProcess(tmp_path, {"locks": []}, "--json")
    assert proc.wait() == 2
    assert "--json, --watch and --target go with the locks command" in proc.log()
