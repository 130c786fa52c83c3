"""GET /: the landing page, rendered by a real browser (headless Chromium) over a real workload."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import stuck_with_waiter
from tests.exporter_proc import ExporterProcess
from tests.metrics_util import parse

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium(url: str, tmp_path: Path, *args: str) -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail("chromium not found: `make tools` unpacks Debian's chromium into the project's cache (tools/fetch.py)")
    # Its profile, crash reports and caches in the test's folder, not in the home directory.
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    result = subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args, url],
                            capture_output=True, text=True, timeout=120, env=env)
    return result.stdout


@pytest.mark.slow
def test_landing_page_shows_names_and_holders_in_a_browser(tmp_path, server, sessions) -> None:
    leader = sessions.open(application_name="billing-leader-7")
    leader.execute("SELECT pg_advisory_lock(4242), pg_advisory_lock(99), pg_advisory_lock(77, 1), pg_advisory_lock(77, 2)")
    stuck = stuck_with_waiter(sessions, server, "shard <worker> & co", "shard-worker-b")
    config = {"dsn": server.dsn(), "poll_interval": "200ms", "locks": [
        {"name": "billing-leader", "key": 4242, "probe": {"expect": "held", "interval": "200ms"}},
        {"name": "shard-7", "key": [42, 7], "max_hold": "1s"},
        {"name": "nightly-export", "key": {"hashtext": "nightly-export"}},
        {"name": "tenants", "key": {"namespace": 77}},
    ]}
    proc = ExporterProcess(tmp_path, config)
    try:
        proc.metrics_when(lambda t: parse(t).get(("pg_advisory_lock_exporter_up", ())) == 1)
        dom = chromium(proc.url + "/", tmp_path, "--dump-dom")
        chromium(proc.url + "/", tmp_path, f"--screenshot={tmp_path / 'landing.png'}", "--window-size=1200,800")
    finally:
        proc.stop()
        stuck.release()
    assert '<table id="locks">' in dom
    assert "<td>billing-leader</td>" in dom and "<td>shard-7</td>" in dom
    assert f"pid {leader.info.backend_pid} billing-leader-7" in dom
    assert "shard &lt;worker&gt; &amp; co" in dom  # escaped, not markup
    assert "1 (longest" in dom  # shard-7's waiter
    assert "Named locks free (1)" in dom and "nightly-export" in dom
    assert '<table id="unnamed">' in dom  # key 99
    assert "key 99, exclusive: pid" in dom  # who holds the oldest key nobody named
    assert "<td>tenants</td><td>(77, *)</td>" in dom and "2 keys held" in dom  # a family, with its keys
    assert f"key 77,1, exclusive: pid {leader.info.backend_pid}" in dom
    assert 'href="/metrics"' in dom and 'http-equiv="refresh"' in dom
    assert (tmp_path / "landing.png").stat().st_size > 10_000
