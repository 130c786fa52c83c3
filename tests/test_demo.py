"""make demo keeps working: run it briefly, as a newcomer would, and read what it prints."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import needs_own_clusters

from tests.pgcluster import free_port


def demo_clusters() -> set[str]:
    """Data folders of running demo clusters (their folders are pgale-*; the demo prints its own)."""
    out = subprocess.run(["pgrep", "-a", "-x", "postgres"], capture_output=True, text=True).stdout
    return {part for line in out.splitlines() for part in line.split() if "/pgale-" in part and part.endswith("/data")}


@pytest.mark.slow
def test_demo_shows_the_sample_workload_and_cleans_up() -> None:
    needs_own_clusters()
    result = subprocess.run(
        [sys.executable, "-m", "demo", "--seconds", "1", "--port", str(free_port())],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert 'pg_advisory_lock_holders{lock="billing-leader",database="app",mode="exclusive"} 1' in out
    assert 'pg_advisory_lock_waiters{lock="shard-7",database="app"} 1' in out
    assert 'state="idle in transaction"' in out and 'application_name="shard-7-worker-a"' in out
    assert 'pg_advisory_lock_unnamed_holders{database="app"} 2' in out
    # The transaction-pool hazard, flagged (make tools unpacks pgbouncer, so the demo has one).
    assert 'pg_advisory_lock_pooled_session_holders{lock="schema-migration",database="app"} 1' in out
    # Why is it stuck: the migration holds its lock and waits for a table; the chain names the report.
    assert 'pg_advisory_lock_blocked_holders{lock="deploy-migrations",database="app"} 1' in out
    words = " ".join(out.split())  # the locks command wraps the chain at 80 columns
    assert "which waits for relation public.demo_users (AccessExclusiveLock)" in words
    assert "(report-runner, postgres@127.0.0.1, idle in transaction" in words
    assert "demo stopped and cleaned up" in out
    # The demo's own cluster (the data folder it printed) is stopped and gone; other clusters are not its business.
    data_dir = next(line.split("data dir ", 1)[1].strip() for line in out.splitlines() if "data dir " in line)
    assert data_dir not in demo_clusters()
    assert not os.path.exists(data_dir)
