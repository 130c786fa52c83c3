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


def test_the_fleet_points_baseline_is_the_exporter_before_the_bounded_workers(tmp_path: Path) -> None:
    """The 50-target point runs beside BASELINE's exporter, unpacked from git: that code, not ours."""
    from bench import fleet

    if shutil.which("git") is None:
        pytest.skip("no git")
    if subprocess.run(["git", "cat-file", "-e", fleet.BASELINE], cwd=ROOT).returncode != 0:
        pytest.skip(f"commit {fleet.BASELINE} not in this checkout's history")
    tree = fleet.baseline_tree(tmp_path)
    found = subprocess.run([sys.executable, "-c", "import exporter; print(exporter.__file__)"], cwd=tree,
                           env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60)
    assert Path(found.stdout.strip()) == tree / "exporter" / "__init__.py", found.stderr
    assert not (tree / "exporter" / "scheduler.py").exists()  # a poll thread and a probe thread per target
    assert (ROOT / "exporter" / "scheduler.py").exists()


def test_the_fleet_reports_say_not_met_where_a_budget_is_not() -> None:
    from bench.fleet import COMPARED
    from bench.report import fleet_lines, shards_lines

    def run(cpu: float) -> dict[str, float]:
        return {field: 1.0 for field in COMPARED} | {"cpu_percent_of_core": cpu}

    per = {"ours": [run(5.0), run(5.2), run(5.1)], "baseline": [run(3.0), run(3.1), run(3.2)]}
    compared = {field: {"ours": 1.0, "baseline": 1.0, "spread": 0.0, "worse_beyond_spread": False} for field in COMPARED}
    compared["cpu_percent_of_core"] = {"ours": 5.1, "baseline": 3.1, "spread": 0.2, "worse_beyond_spread": True}
    text = "\n".join(fleet_lines({"fleet": {"baseline_commit": "abc", "runs": 3, "seconds": 150.0, "per_run": per,
                                            "compared": compared}}))
    assert "- no figure worse than the baseline's beyond its spread: **not met** (exporter CPU" in text
    shards = {"total_shards": 4, "targets": 1000, "owned_by_exactly_one": 1000, "owned_by_none": 0,
              "owned_by_several": 0, "moved_to_one_more_shard": 260, "moved_to_the_new_shard_only": True,
              "shards": [{"shard": n, "targets_figure": owned, "sd_targets": owned, "threads": 10, "rss_mb": 80.0,
                          "cpu_percent_of_core": 5.0} for n, owned in enumerate((190, 270, 270, 270))]}
    lines = shards_lines({"shards": shards})
    assert any(line.startswith("- each shard owns 250 ± 50 (190-270): **not met**") for line in lines), lines
    assert any(line.startswith("- going to 5 shards moves 260 targets (26.0%)") and "**not met**" in line for line in lines)


def _probe_text(stamp: float, polls: int, interval: float = 15.0) -> str:
    return (f"# TYPE pg_advisory_lock_exporter_last_poll_timestamp_seconds gauge\n"
            f"pg_advisory_lock_exporter_last_poll_timestamp_seconds {stamp}\n"
            f"# TYPE pg_advisory_lock_exporter_poll_duration_seconds histogram\n"
            f'pg_advisory_lock_exporter_poll_duration_seconds_bucket{{le="+Inf"}} {polls}\n'
            f"pg_advisory_lock_exporter_poll_duration_seconds_count {polls}\n"
            f"pg_advisory_lock_exporter_poll_duration_seconds_sum 0.01\n"
            f"# TYPE pg_advisory_lock_exporter_poll_interval_seconds gauge\n"
            f"pg_advisory_lock_exporter_poll_interval_seconds {interval}\n")


def test_the_thousand_points_lateness_is_past_due_not_past_the_poll_before(monkeypatch) -> None:
    # Polls due every 15 s on a grid (each due an interval after the last was due): each one 0.6 s
    # later than the one before is 1.8 s late by the third, though no gap exceeds 15.6 s.
    from bench import thousand

    readings = iter([_probe_text(1000.0 + 15.6 * n, 1 + n) for n in range(4)])
    monkeypatch.setattr(thousand, "_get", lambda url: next(readings).encode())
    late = thousand.Gaps()
    for _ in range(4):
        late.read("http://exporter", "c0-t000")
    assert late.worst_gap() == pytest.approx(15.6)
    assert late.worst_late() == pytest.approx(1.8)


def test_the_thousand_points_target_polled_no_more_counts() -> None:
    # A target polled once before the watch and never again has no gap between two polls: the
    # watch's end counts the time to its last reading as its gap and its lateness, so it is not left out.
    from bench import thousand

    late = thousand.Gaps()
    late.see("starved", thousand.parse(_probe_text(1000.0, 1)), asked=1001.0)
    late.see("starved", thousand.parse(_probe_text(1000.0, 1)), asked=1050.0)
    late.see("other", thousand.parse(_probe_text(1000.0, 1)), asked=1001.0)
    late.see("other", thousand.parse(_probe_text(1010.0, 8)), asked=1011.0)
    late.see("other", thousand.parse(_probe_text(1010.0, 8)), asked=1024.0)
    late.end()
    assert late.seen == 2 and late.unseen == 1  # "other": seven polls between two readings, six failed or unseen
    assert late.worst_gap() == pytest.approx(50.0)
    assert late.worst_late() == pytest.approx(35.0)  # due at 1015, still not polled when asked at 1050
    # "other", due at 1025 (its grid starts anew at 1010), was not late when last asked at 1024.
    assert max(late.late["other"]) == pytest.approx(-1.0)


def test_the_thousand_points_verdicts_count_every_target() -> None:
    from bench.report import thousand_lines

    point = {"targets": 1000, "first_metrics_seconds": 3.0, "threads": 70, "threads_one_cluster_stopped": 40,
             "rss_mb": 200.0, "cpu_percent_of_core": 20.0, "scrape_p95_ms": 5.0, "scrape_max_ms": 9.0,
             "full_gc_passes": 2, "full_gc_pass_max_ms": 30.0, "full_gc_share_percent": 0.05,
             "worst_gap_seconds": 15.2, "targets_gaps_seen": 1000,
             "worst_late_seconds_one_cluster_stopped": 0.3, "targets_gaps_seen_one_cluster_stopped": 10}
    lines = thousand_lines({"thousand": point})
    threads, gap, late = lines[2], lines[-2], lines[-1]
    assert threads.endswith("at most 64 besides HTTP: **not met** |"), threads  # 70 at the start
    assert lines[3].endswith("at most 300 MB: **met** |"), lines[3]
    assert thousand_lines({"thousand": point | {"rss_peak_mb": 320.0}})[3].endswith("**not met** |")  # its peak counts
    assert gap.endswith("**met** |"), gap
    assert "10 of 750 targets seen polled" in late and late.endswith("**not met** |"), late
    point |= {"threads": 40, "targets_gaps_seen_one_cluster_stopped": 750, "targets_one_cluster_stopped": 750}
    lines = thousand_lines({"thousand": point})
    assert lines[2].endswith("**met** |") and lines[-1].endswith("**met** |"), lines


def test_the_shards_verdict_asks_each_shards_figure_to_agree_with_its_sd() -> None:
    from bench.report import shards_lines

    def point(figure: int) -> dict:
        return {"total_shards": 4, "targets": 1000, "owned_by_exactly_one": 1000, "owned_by_none": 0,
                "owned_by_several": 0, "moved_to_one_more_shard": 200, "moved_to_the_new_shard_only": True,
                "shards": [{"shard": n, "targets_figure": figure if n == 0 else 250, "sd_targets": 250, "threads": 10,
                            "rss_mb": 80.0, "cpu_percent_of_core": 5.0} for n in range(4)]}

    (runs,) = [line for line in shards_lines({"shards": point(250)}) if line.startswith("- each shard runs")]
    assert runs.endswith("**met**"), runs
    (runs,) = [line for line in shards_lines({"shards": point(0)}) if line.startswith("- each shard runs")]
    assert runs.endswith("**not met**"), runs  # shard 0 lists 250 on /sd and runs none


def test_a_checkout_without_the_baseline_fails_before_measuring(tmp_path: Path, monkeypatch) -> None:
    # The fleet points, last in a full run, need the baseline's code from git: a checkout without
    # that commit (a shallow clone) must fail at the start, not after the hour before them.
    import bench.__main__ as bench_main
    from bench import fleet

    if shutil.which("git") is None:
        pytest.skip("no git")
    subprocess.run(["git", "init", "-q", str(tmp_path / "shallow")], check=True)
    monkeypatch.setattr(fleet, "ROOT", tmp_path / "shallow")

    class Started(Exception):
        pass

    def no_cluster(*_: object, **__: object) -> None:
        raise Started("a cluster was started before the baseline was found missing")

    monkeypatch.setattr(bench_main, "Cluster", no_cluster)
    monkeypatch.setattr(bench_main.signal, "signal", lambda *_: None)  # main's SIGTERM handler: not this process's
    monkeypatch.setattr(sys, "argv", ["bench", "--out", str(tmp_path / "out")])
    with pytest.raises(subprocess.CalledProcessError):
        bench_main.main()


def test_the_fleet_points_comparison_is_worse_only_beyond_the_larger_spread() -> None:
    from bench.fleet import COMPARED, compare

    def runs(*cpu: float) -> list[dict[str, float]]:
        return [{field: 1.0 for field in COMPARED} | {"cpu_percent_of_core": c} for c in cpu]

    worse = compare({"ours": runs(5.0, 5.2, 5.1), "baseline": runs(3.0, 3.1, 3.2)})["cpu_percent_of_core"]
    assert worse == {"ours": 5.1, "baseline": 3.1, "spread": pytest.approx(0.2), "worse_beyond_spread": True}
    # Within the baseline's range of 1.0 (ours' is 0.2): not worse beyond the spread.
    within = compare({"ours": runs(3.9, 4.0, 4.1), "baseline": runs(2.5, 3.5, 3.1)})["cpu_percent_of_core"]
    assert within["spread"] == pytest.approx(1.0) and within["worse_beyond_spread"] is False
    better = compare({"ours": runs(1.0, 1.1, 1.2), "baseline": runs(3.0, 3.1, 3.2)})["cpu_percent_of_core"]
    assert better["worse_beyond_spread"] is False
    assert all(c["worse_beyond_spread"] is False for f, c in compare({"ours": runs(1, 1, 1), "baseline": runs(1, 1, 1)}).items())


def test_a_fleet_point_that_fails_keeps_the_ones_before_it(tmp_path: Path, monkeypatch) -> None:
    import argparse
    import contextlib

    import bench.__main__ as bench_main

    monkeypatch.setattr(bench_main, "measure_fleet", lambda workdir, seconds: {"compared": {}})
    monkeypatch.setattr(bench_main, "ThousandSite", lambda workdir: contextlib.nullcontext())

    def broken(site: object) -> dict:
        raise RuntimeError("/metrics did not answer within 300s")

    monkeypatch.setattr(bench_main, "measure_thousand", broken)
    saved = {"args": {}, "fleet": {"targets": 50}}
    (tmp_path / "results.json").write_text(json.dumps(saved))
    args = argparse.Namespace(out=tmp_path, fleet_seconds=150.0)
    with pytest.raises(RuntimeError):
        bench_main.fleet_only(args, tmp_path / "work")
    assert json.loads((tmp_path / "results-fleet-partial.json").read_text()) == {"fleet": {"compared": {}}}
    assert json.loads((tmp_path / "results.json").read_text()) == saved  # the saved run as it was
