"""make demo keeps working: run it briefly, as a newcomer would, and read what it prints."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.pgcluster import free_port


@pytest.mark.slow
def test_demo_shows_the_sample_workload_and_cleans_up() -> None:
    before = subprocess.run(["pgrep", "-c", "-x", "postgres"], capture_output=True, text=True).stdout.strip()
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
    # The transaction-pool hazard, flagged (make test installs pgbouncer, so the demo has one).
    assert 'pg_advisory_lock_pooled_session_holders{lock="schema-migration",database="app"} 1' in out
    assert "demo stopped and cleaned up" in out
    after = subprocess.run(["pgrep", "-c", "-x", "postgres"], capture_output=True, text=True).stdout.strip()
    assert after == before
