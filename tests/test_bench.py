"""The benchmark's smoke mode: a few seconds, small load, so `make bench` cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import needs_own_clusters


@pytest.mark.slow
def test_bench_smoke(tmp_path: Path) -> None:
    needs_own_clusters()
    result = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads((tmp_path / "results-smoke.json").read_text())
    (run,) = results["default"]
    by_subject = {p["subject"]: p for p in run}
    assert set(by_subject) == {"floor", "this exporter"}
    ours = by_subject["this exporter"]
    assert ours["polls"] >= 1 and ours["db_ms_per_poll"] > 0 and ours["size_bytes"] > 1000
    assert by_subject["floor"]["db_ms_per_poll"] > 0
    assert 0 < ours["rss_mb"] < 500
