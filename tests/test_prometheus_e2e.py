"""End to end: a real Prometheus scrapes a running exporter and evaluates the alert rules."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.exporter_proc import ExporterProcess
from tests.pgcluster import free_port

RULES = Path(__file__).resolve().parent.parent / "alerts" / "pg-advisory-lock-exporter.rules.yml"


def api(port: int, path: str, **params: str) -> dict:
    url = f"http://127.0.0.1:{port}/api/v1/{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())["data"]


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_series_arrive_and_the_long_held_alert_fires_then_resolves(server, sessions, tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus not found: `make test` installs Debian's prometheus package")
    locks = [{"name": "leader", "key": 4242, "max_hold": "2s"}]
    exporter = ExporterProcess(tmp_path, {"dsn": server.dsn(), "poll_interval": "500ms", "locks": locks})
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "pg-advisory-lock-exporter",
                            "static_configs": [{"targets": [f"127.0.0.1:{exporter.port}"]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = open(tmp_path / "prometheus.log", "wb")
    prometheus = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        exporter.wait_ready()
        # The series arrive.
        wait_for(lambda: api(port, "query", query='pg_advisory_lock_holders{lock="leader",mode="exclusive"}')["result"],
                 60, "the holders series")
        assert len(api(port, "rules")["groups"]) == 3
        holder = sessions.open(application_name="stuck-worker")
        holder.execute("SELECT pg_advisory_lock(4242)")

        def firing():
            alerts = api(port, "alerts")["alerts"]
            return [a for a in alerts if a["labels"]["alertname"] == "PgAdvisoryLockHeldTooLong" and a["state"] == "firing"]

        alert = wait_for(firing, 60, "PgAdvisoryLockHeldTooLong to fire")[0]
        assert alert["labels"]["lock"] == "leader" and alert["labels"]["severity"] == "warning"
        assert "stuck-worker" in alert["annotations"]["description"]  # who holds it, from holder_info
        holder.execute("SELECT pg_advisory_unlock(4242)")
        wait_for(lambda: not firing(), 60, "the alert to resolve")
    finally:
        prometheus.terminate()
        prometheus.wait(10)
        log.close()
        exporter.stop()
