"""The README's quick start, run as written: its `config.yaml` and `prometheus.yml` (the fenced blocks
after a `<!-- quickstart: NAME -->` line) with a real exporter on a real PostgreSQL and a real
Prometheus loading the repository's alert rules. Changed, and only these: the dsn (the test's
server), the scrape target (the exporter's port) and the intervals (1 s, so the test takes seconds).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import needs_own_clusters, wait_until
from tests.exporter_proc import ExporterProcess
from tests.pgcluster import free_port

ROOT = Path(__file__).parent.parent
QUICKSTART = re.compile(r"^<!-- quickstart: (\S+) -->\n```\w*\n(.*?)^```", re.M | re.S)


def quickstart_files() -> dict[str, str]:
    """Each file the README's quick start shows, by name."""
    return dict(QUICKSTART.findall((ROOT / "README.md").read_text()))


def api(port: int, path: str, **params: str) -> Any:
    url = f"http://127.0.0.1:{port}/api/v1/{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())["data"]


def settles(predicate: Any, timeout: float) -> bool:
    """Whether predicate() holds within timeout (wait_until's own failure would hide the reason)."""
    try:
        wait_until(predicate, timeout=timeout)
    except AssertionError:
        return False
    return True


def _safe(call: Any) -> Any:
    try:
        return call()
    except OSError:
        return None


def test_the_readme_shows_both_quickstart_files() -> None:
    files = quickstart_files()
    assert set(files) == {"config.yaml", "prometheus.yml"}, sorted(files)
    prometheus = yaml.safe_load(files["prometheus.yml"])
    assert prometheus["rule_files"] and prometheus["scrape_configs"]
    assert yaml.safe_load(files["config.yaml"])["locks"]


@pytest.mark.timeout(180)
def test_the_quickstart_loads_its_alert_rules_and_scrapes_the_exporter(server, sessions, tmp_path) -> None:
    needs_own_clusters()
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus not found: `make tools` unpacks Debian's prometheus into the project's cache (tools/fetch.py)")
    files = quickstart_files()
    config = yaml.safe_load(files["config.yaml"])
    config["dsn"] = server.dsn()
    holder = sessions.open(application_name="quickstart-leader")
    holder.execute("SELECT pg_advisory_lock(4242)")  # billing-leader's key in the quick start
    exporter = ExporterProcess(tmp_path, config)
    prometheus = None
    try:
        exporter.wait_ready()
        promdir = tmp_path / "prometheus"
        promdir.mkdir()
        shutil.copytree(ROOT / "alerts", promdir / "alerts")  # "the repository's alerts/ folder next to it"
        scrape = yaml.safe_load(files["prometheus.yml"])
        scrape["global"] = {**scrape.get("global", {}), "scrape_interval": "1s", "evaluation_interval": "1s"}
        (job,) = scrape["scrape_configs"]
        job["static_configs"] = [{"targets": [f"127.0.0.1:{exporter.port}"]}]
        (promdir / "prometheus.yml").write_text(yaml.safe_dump(scrape))
        port = free_port()
        log = open(tmp_path / "prometheus.log", "wb")
        prometheus = subprocess.Popen(
            [binary, f"--config.file={promdir / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )

        shipped = {rule["alert"] for group in yaml.safe_load((ROOT / "alerts" / "pg-advisory-lock-exporter.rules.yml").read_text())["groups"]
                   for rule in group["rules"]}

        def loaded() -> set[str]:
            groups = (_safe(lambda: api(port, "rules")) or {}).get("groups", [])
            return {rule["name"] for group in groups for rule in group["rules"] if rule["type"] == "alerting"}

        assert settles(lambda: loaded() == shipped, timeout=30), \
            f"rules loaded {sorted(loaded())}, shipped {sorted(shipped)}; log:\n{(tmp_path / 'prometheus.log').read_text()}"

        def target_health() -> str:
            targets = (_safe(lambda: api(port, "targets")) or {}).get("activeTargets", [])
            return ",".join(f"{t['labels']['job']}={t['health']}" for t in targets)

        assert settles(lambda: target_health() == f"{job['job_name']}=up", timeout=30), target_health()

        def leader_holders() -> list[dict]:
            query = 'pg_advisory_lock_holders{lock="billing-leader",mode="exclusive"}'
            return (_safe(lambda: api(port, "query", query=query)) or {}).get("result", [])

        (series,) = wait_until(leader_holders, timeout=30)
        assert series["metric"]["job"] == job["job_name"]
        assert float(series["value"][1]) == 1
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(10)
        exporter.stop()
