"""The benchmark's smoke mode: a half-minute version, small load, so `make bench` cannot rot."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import needs_own_clusters

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_smoke(tmp_path: Path) -> None:
    needs_own_clusters()
    result = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads((tmp_path / "results-smoke.json").read_text())
    (run,) = results["default"]
    by_subject = {p["subject"]: p for p in run}
    assert set(by_subject) == {"floor", "previous release", "this exporter"}
    ours = by_subject["this exporter"]
    assert ours["polls"] >= 1 and ours["db_ms_per_poll"] > 0 and ours["size_bytes"] > 1000
    assert ours["chain_calls"] == 0  # the load's waiters hold nothing: no holder waits, no second statement
    assert by_subject["floor"]["db_ms_per_poll"] > 0
    assert by_subject["previous release"]["polls"] >= 1 and by_subject["previous release"]["db_ms_per_poll"] > 0
    assert results["previous_release"]["ratios"][0] > 0
    assert 0 < ours["rss_mb"] < 500
    # poll_interval auto in coverage: one row per hold length, its interval and cost read.
    auto = [r for r in results["coverage"] if r["exporter"] == "auto"]
    assert [r["hold"] for r in auto] == [0.05, 0.2, 0.3, 1.0, 5.0]
    assert all(0.1 - 1e-9 <= r["interval_in_force"] <= 30 and r["polls"] >= 1 and r["db_share"] > 0
               and r["own_ratio"] > 0 for r in auto)
    assert sum(r["seen_holds"] for r in auto) > 0
    settle = results["auto_settle"]
    assert settle["polls"] >= 1 and settle["db_share"] > 0 and settle["poll_errors"] == 0
    assert settle["max_active_backends"] <= 1 and settle["backends_seen"] == 1 and settle["watch_samples"] > 0


def test_previous_release_statement_is_verbatim() -> None:
    """bench/previous.py's statement and transaction are 57bb5b5's exporter/queries.py, to the byte."""
    from bench import previous

    if shutil.which("git") is None:
        pytest.skip("no git")
    shown = subprocess.run(["git", "show", f"{previous.COMMIT}:exporter/queries.py"], cwd=ROOT,
                           capture_output=True, text=True)
    if shown.returncode != 0:
        pytest.skip(f"commit {previous.COMMIT} not in this checkout's history")
    released: dict[str, object] = {}
    exec(compile(shown.stdout, "queries@" + previous.COMMIT, "exec"), released)  # constants and pure functions only
    assert previous.POLL == released["POLL"]
    assert previous._POLL_TRANSACTION == released["_POLL_TRANSACTION"]
    assert previous.POLL_STATEMENT_NAME == released["POLL_STATEMENT_NAME"]
    assert previous.POLL_RESULT_INDEX == released["POLL_RESULT_INDEX"]
    assert previous.PREPARE_POLL == released["prepare_poll"](170000)
    assert previous.poll_transaction(1.0) == released["poll_query"](170000, 1.0, True)
    assert previous.LOCAL_TIMEOUTS == released["LOCAL_TIMEOUTS"]
