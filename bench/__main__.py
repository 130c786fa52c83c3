"""make bench: this exporter side by side with the floor, the previous release's poll statement and
query-exporter, in one run; poll_interval auto under load; what polling can see.

Writes bench/results.md and docs/bench.png. --smoke runs a half-minute version (no query-exporter,
no pgbench, no scaling, no plot, but the previous release's statement, one auto coverage run and
one auto settle point at the small load) that the test suite runs so the benchmark cannot rot.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import psycopg

from bench.auto import exporter_stats, measure_settle
from bench.coverage import measure_coverage
from bench.fleet import baseline_tree, measure_fleet
from bench.thousand import Site as ThousandSite
from bench.thousand import measure_shards, measure_thousand
from bench.load import Load
from bench.measure import (RESET, cpu_seconds, lock_status_scan_ms, phase_timer, rss_mb, scrape, server_time,
                           statement_calls)
from bench.previous import PreviousRelease
from bench.subjects import Floor, Ours, QueryExporter, create_roles
from tests.pgcluster import Cluster

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {
    "max_connections": "400",
    "max_locks_per_transaction": "512",
    "shared_preload_libraries": "pg_stat_statements",
    "pg_stat_statements.track_planning": "on",
    "pg_stat_statements.max": "1000",
}
PGBENCH_SCRIPT = """\\set k random(100000000, 200000000)
BEGIN;
SELECT pg_advisory_xact_lock(:k);
SELECT pg_advisory_xact_lock(:k + 1);
END;
"""
# The poll's second statement (queries.CHAIN), run only in a poll where some holder waits.
CHAIN_MARKER = "%WITH RECURSIVE chain%"


@dataclass
class Point:
    """One subject at one load point."""

    subject: str
    held: int
    named: int
    db_ms_per_poll: float
    polls: int
    cpu_ms_per_poll: float | None = None
    scrape_p50_ms: float | None = None
    scrape_p95_ms: float | None = None
    rss_mb: float | None = None
    size_bytes: int | None = None
    chain_calls: int | None = None  # this exporter's second statement (CHAIN) in the window


def measure_window(admin: psycopg.Connection, subject, window: float, pid: int | None) -> tuple[float, int, float | None]:
    """Server ms per poll, polls, and process CPU ms per poll over a window with no scrapes."""
    admin.execute(RESET)
    cpu0 = cpu_seconds(pid) if pid else None
    time.sleep(window)
    total_ms, polls = server_time(admin, subject.role, subject.marker)
    cpu_ms = (cpu_seconds(pid) - cpu0) * 1000 / max(polls, 1) if pid and cpu0 is not None else None
    return total_ms / max(polls, 1), polls, cpu_ms


def measure_in_process(admin: psycopg.Connection, subject, args: argparse.Namespace) -> tuple[float, int]:
    """A subject that polls from a thread of this process (the floor, the previous release's
    statement): server ms per poll and polls; no process of its own, so no CPU, memory or scrapes."""
    subject.start()
    try:
        time.sleep(args.warmup)
        ms, polls, _ = measure_window(admin, subject, args.window, None)
    finally:
        subject.stop()
    return ms, polls


def measure_point(cluster: Cluster, admin: psycopg.Connection, held: int, named: int, args: argparse.Namespace,
                  workdir: Path, namespaces: tuple[int, ...] = (), previous: bool = False) -> list[Point]:
    """Each subject in turn at this load, the same warm-up and window for each; with previous, the
    previous release's poll statement too (right after the floor, before this exporter)."""
    keys = list(range(1, named + 1))
    points: list[Point] = []
    ms, polls = measure_in_process(admin, Floor(cluster.dsn(user=Floor.role), args.interval), args)
    points.append(Point("floor", held, named, ms, polls))
    if previous:
        ms, polls = measure_in_process(admin, PreviousRelease(cluster.dsn(user=PreviousRelease.role), args.interval), args)
        points.append(Point("previous release", held, named, ms, polls))

    subjects = [("this exporter", Ours(workdir),
                 lambda s: s.start(cluster.dsn(user=Ours.role), keys, args.interval, namespaces))]
    if not args.no_query_exporter and not namespaces:
        url = f"postgresql+psycopg://{QueryExporter.role}@127.0.0.1:{cluster.port}/postgres"
        subjects.append(("query-exporter", QueryExporter(workdir), lambda s: s.start(url, keys, args.interval)))
    for name, subject, start in subjects:
        try:
            start(subject)
            time.sleep(args.warmup)
            ms, polls, cpu = measure_window(admin, subject, args.window, subject.pid)
            chain = statement_calls(admin, subject.role, CHAIN_MARKER) if isinstance(subject, Ours) else None
            rss = rss_mb(subject.pid)
            scrapes = scrape(subject.url, args.scrapes)
            points.append(Point(name, held, named, ms, polls, cpu, scrapes.p50_ms, scrapes.p95_ms, rss, scrapes.size_bytes,
                                chain))
        finally:
            subject.stop()
    return points


def pgbench_tps(cluster: Cluster, workdir: Path, seconds: int) -> float:
    script = workdir / "advisory.sql"
    script.write_text(PGBENCH_SCRIPT)
    cmd = [f"{cluster.bindir}/pgbench", "-n", "-f", str(script), "-c", "8", "-j", "2", "-T", str(seconds),
           "-M", "prepared", "-h", "127.0.0.1", "-p", str(cluster.port), "-U", "postgres", "postgres"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if line.startswith("tps ="):
            return float(line.split()[2])
    raise RuntimeError(f"pgbench printed no tps: {out}")


PGBENCH_LABELS = {"none": None, "5s": 5.0, "1s": 1.0, "auto": None}  # label -> poll interval (auto: None)


def measure_pgbench(cluster: Cluster, args: argparse.Namespace, workdir: Path) -> tuple[dict[str, list[float]], list[float]]:
    """TPS with no exporter, with the exporter polling every 5 s, every 1 s and on auto: short runs
    in rounds, each round one run of each in a rotating order, so drift hits all four alike and
    each round gives a paired difference. Also the interval auto was in force at the end of each of
    its runs."""
    keys = list(range(1, args.named + 1))
    labels = tuple(PGBENCH_LABELS)
    tps: dict[str, list[float]] = {label: [] for label in labels}
    auto_intervals: list[float] = []
    for round_ in range(args.pgbench_rounds):
        shift = round_ % len(labels)
        for label in labels[shift:] + labels[:shift]:
            exporter = None
            if label != "none":
                exporter = Ours(workdir).start(cluster.dsn(user=Ours.role), keys, PGBENCH_LABELS[label])
                time.sleep(1)
            try:
                tps[label].append(pgbench_tps(cluster, workdir, args.pgbench_seconds))
                if label == "auto":
                    auto_intervals.append(exporter_stats(exporter.url).interval)
            finally:
                if exporter:
                    exporter.stop()
    return tps, auto_intervals


def measure_databases(cluster: Cluster, admin: psycopg.Connection, args: argparse.Namespace,
                      workdir: Path) -> list[dict[str, object]]:
    """A cluster with many databases, presets: all, nothing held: database time against the floor,
    and how many series the exposition has."""
    for n in range(args.databases - 1):
        admin.execute(f"CREATE DATABASE bench_db_{n}")
    try:
        floor = Floor(cluster.dsn(user=Floor.role), args.interval).start()
        time.sleep(args.warmup)
        floor_ms, floor_polls, _ = measure_window(admin, floor, max(5.0, args.window / 2), None)
        floor.stop()
        ours = Ours(workdir).start(cluster.dsn(user=Ours.role), [], args.interval, presets="all")
        try:
            time.sleep(args.warmup)
            ms, polls, cpu = measure_window(admin, ours, max(5.0, args.window / 2), ours.pid)
            with urllib.request.urlopen(ours.url, timeout=30) as response:
                text = response.read().decode()
            series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
            lock_series = sum(1 for line in text.splitlines() if line.startswith("pg_advisory_lock_")
                              and not line.startswith("pg_advisory_lock_exporter_"))
        finally:
            ours.stop()
    finally:
        for n in range(args.databases - 1):
            admin.execute(f"DROP DATABASE IF EXISTS bench_db_{n}")
    return [{"subject": "floor", "databases": args.databases, "db_ms_per_poll": floor_ms, "polls": floor_polls},
            {"subject": "this exporter", "databases": args.databases, "db_ms_per_poll": ms, "polls": polls,
             "cpu_ms_per_poll": cpu, "series": series, "lock_series": lock_series}]


def measure_auth_timing(tries: int = 15) -> dict[str, float]:
    """A refused login's time for a known user and for an unknown one (bcrypt cost 10, the cost our
    docs give): equal, so a scan of names cannot find the real ones."""
    import bcrypt

    from exporter.webconfig import BasicAuth

    auth = BasicAuth({"prometheus": bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=10))})
    times: dict[str, list[float]] = {"known_ms": [], "unknown_ms": []}
    for _ in range(tries):  # alternated, so a busy moment of the machine weighs on both alike
        for label, user in (("known_ms", "prometheus"), ("unknown_ms", "nobody")):
            started = time.perf_counter()
            auth.check(user, "wrong")
            times[label].append((time.perf_counter() - started) * 1000)
    return {label: statistics.median(each) for label, each in times.items()}


def measure_interference(cluster: Cluster, probes: int) -> float:
    """Worker tries lost to the probe per 1,000 probes, with both as fast as they go."""
    from exporter.config import parse_config
    from exporter.probe import Prober, connect_probe

    config = parse_config({"dsn": cluster.dsn(), "locks": [{"name": "k", "key": 900000000777, "probe": {"expect": "free"}}]}, "bench")
    prober = Prober(config, connect_probe, lambda r: None)
    stop = threading.Event()
    lost = [0]

    def work() -> None:
        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            while not stop.is_set():
                if conn.execute("SELECT pg_try_advisory_lock(900000000777)").fetchone()[0]:
                    conn.execute("SELECT pg_advisory_unlock(900000000777)")
                else:
                    lost[0] += 1

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    time.sleep(0.2)
    for _ in range(probes):
        prober.try_lock(config.locks[0])
    stop.set()
    thread.join(10)
    prober.close()
    return lost[0] * 1000 / probes


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    return f"{med:.2f} ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else f"{med:.2f}"


def fleet_points(args: argparse.Namespace, workdir: Path, ended: Callable[[str], None],
                 results: dict[str, object]) -> None:
    """The points of issue 29, each on servers of its own: 50 targets beside the baseline (three
    runs of each), 1,000 targets in one process, the same over four shards; each put in results
    as it ends, so a point that fails keeps the ones before it."""
    results["fleet"] = measure_fleet(workdir, args.fleet_seconds)
    print(f"fleet: {results['fleet']['compared']}", flush=True)
    ended("fleet")
    with ThousandSite(workdir) as site:
        results["thousand"] = measure_thousand(site)
        print(f"thousand: {results['thousand']}", flush=True)
        ended("thousand")
        results["shards"] = measure_shards(site)
        print(f"shards: {results['shards']}", flush=True)
        ended("shards")


def fleet_only(args: argparse.Namespace, workdir: Path) -> int:
    """The fleet points alone, their figures put in place of the saved run's (and the time they took)."""
    saved = args.out / "results.json"
    results = json.loads(saved.read_text())
    phases: dict[str, float] = {}
    ended = phase_timer(phases, time.monotonic())
    points: dict[str, object] = {}
    try:
        fleet_points(args, workdir, ended, points)
    except BaseException:
        # Half an hour of points: those that ended are kept beside the saved run, not lost.
        (args.out / "results-fleet-partial.json").write_text(json.dumps(points, indent=1))
        print(f"wrote {args.out / 'results-fleet-partial.json'}: the points that ended ({', '.join(points) or 'none'})")
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results.update(points)
    results["fleet_phase_seconds"] = phases
    results["args"]["fleet_seconds"] = str(args.fleet_seconds)
    saved.write_text(json.dumps(results, indent=1))
    from bench.report import write_report

    write_report(results, args.out / "results.md", ROOT / "docs" / "bench.png")
    print(f"wrote {args.out / 'results.md'} and docs/bench.png (the fleet points of this run, the others as saved)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few seconds, small load, no query-exporter/pgbench/plot")
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--held", type=int, default=10_000)
    parser.add_argument("--named", type=int, default=1_000)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--window", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--scrapes", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pgbench-seconds", type=int, default=10)
    parser.add_argument("--pgbench-rounds", type=int, default=20)
    parser.add_argument("--coverage-seconds", type=float, default=90.0, help="the coverage run at 100 held (1 s, 5 s, auto)")
    parser.add_argument("--coverage-auto-seconds", type=float, default=60.0, help="the auto coverage runs at 1,000 and 10,000 held")
    parser.add_argument("--settle-seconds", type=float, default=30.0, help="auto at 50,000 held: before its window")
    parser.add_argument("--settle-window", type=float, default=90.0, help="auto at 50,000 held: its window (whole intervals)")
    parser.add_argument("--databases", type=int, default=200)
    parser.add_argument("--fleet-seconds", type=float, default=150.0, help="each of the 50-target point's six runs")
    parser.add_argument("--fleet-only", action="store_true",
                        help="only the fleet points (50 targets beside the baseline, 1,000 in one process, over four "
                             "shards), merged into the saved results.json and its report")
    parser.add_argument("--no-query-exporter", action="store_true")
    parser.add_argument("--no-scaling", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench")
    args = parser.parse_args()
    if args.smoke:
        args.sessions, args.held, args.named, args.window, args.warmup = 5, 50, 10, 2.0, 0.5
        args.scrapes, args.repeats, args.no_query_exporter, args.no_scaling = 10, 1, True, True
        args.coverage_seconds, args.settle_seconds, args.settle_window = 2.5, 1.0, 2.5

    # Stopped from outside, still clean up the cluster and the subjects (finally blocks).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    workdir = Path(tempfile.mkdtemp(prefix="pgale-bench-"))
    if args.fleet_only:
        return fleet_only(args, workdir)
    if not args.smoke and not args.no_scaling:
        # The fleet points come last, after most of an hour: the code they are held beside must be
        # at hand now (a shallow clone lacks it), not found missing then with every figure lost.
        try:
            baseline_tree(workdir)
        except subprocess.CalledProcessError:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
    cluster = Cluster(settings=SETTINGS).start()
    results: dict[str, object] = {"args": {k: str(v) for k, v in vars(args).items()}}
    dsn_for = lambda user: cluster.dsn(user=user)  # noqa: E731
    started = time.monotonic()
    phases: dict[str, float] = {}
    results["phase_seconds"] = phases  # when each phase ended, seconds from the start
    ended = phase_timer(phases, started)

    try:
        admin = psycopg.connect(cluster.dsn(), autocommit=True)
        admin.execute("CREATE EXTENSION pg_stat_statements")
        create_roles(admin)

        load = Load(cluster.dsn(), sessions=args.sessions, locks=args.held).start()
        print(f"load: {args.sessions} sessions, {args.held} held locks; {args.named} named keys", flush=True)
        runs = []
        for r in range(args.repeats):
            points = measure_point(cluster, admin, args.held, args.named, args, workdir, previous=True)
            runs.append([asdict(p) for p in points])
            for p in points:
                print(f"run {r + 1}: {p}", flush=True)
        results["default"] = runs
        ended("default point")
        if not args.smoke:
            results["lock_status_scan_ms"] = lock_status_scan_ms(admin)
            print(f"pg_lock_status() scan: {results['lock_status_scan_ms']:.2f} ms", flush=True)
            results["pgbench"], results["pgbench_auto_interval"] = measure_pgbench(cluster, args, workdir)
            print(f"pgbench: {results['pgbench']}; auto's interval {results['pgbench_auto_interval']}", flush=True)
            ended("pgbench")
            results["auth"] = measure_auth_timing()
            print(f"auth: {results['auth']}", flush=True)
            results["interference"] = [measure_interference(cluster, 1000) for _ in range(args.repeats)]
            print(f"interference: {results['interference']}", flush=True)
            ended("auth and interference")
        else:
            # The pieces of #22 at the small load, so they cannot rot: one auto coverage run, one settle.
            results["coverage"] = measure_coverage(dsn_for, admin, workdir, args.held, (None,), args.coverage_seconds,
                                                   workers=2, settle=2.0)
            print(f"coverage: {results['coverage']}", flush=True)
            results["auto_settle"] = measure_settle(dsn_for, admin, workdir, args.held, args.named,
                                                    args.settle_seconds, args.settle_window)
            print(f"auto settle: {results['auto_settle']}", flush=True)
            ended("smoke coverage and settle")
        load.stop()

        if not args.no_scaling:
            scaling, coverage = [], []
            short = argparse.Namespace(**{**vars(args), "window": max(5.0, args.window / 2), "scrapes": 30})
            for held in (100, 1_000, 10_000, 50_000):
                load = Load(cluster.dsn(), sessions=args.sessions, locks=held).start()
                scaling += [asdict(p) for p in measure_point(cluster, admin, held, args.named, short, workdir)]
                if held == 10_000:
                    for named in (10, 100, 10_000):
                        scaling += [asdict(p) for p in measure_point(cluster, admin, held, named, short, workdir)]
                # What polling can see at this load: the fixed intervals (which see the same
                # whatever is held) at 100 held only, auto at 100, 1,000 and 10,000.
                if held == 100:
                    coverage += measure_coverage(dsn_for, admin, workdir, held, (1.0, 5.0, None), args.coverage_seconds)
                elif held < 50_000:
                    coverage += measure_coverage(dsn_for, admin, workdir, held, (None,), args.coverage_auto_seconds)
                else:
                    results["auto_settle"] = measure_settle(dsn_for, admin, workdir, held, args.named,
                                                            args.settle_seconds, args.settle_window)
                    print(f"auto settle: {results['auto_settle']}", flush=True)
                load.stop()
                ended(f"scaling and coverage at {held} held")
            results["scaling"], results["coverage"] = scaling, coverage
            # The churn point: the default load, with most sessions changing at every poll.
            load = Load(cluster.dsn(), sessions=args.sessions, locks=args.held, churn=True).start()
            results["churn"] = [asdict(p) for p in measure_point(cluster, admin, args.held, args.named, short, workdir)]
            load.stop()
            print(f"churn: {results['churn']}", flush=True)
            ended("churn")
            # The key-family point: 50,000 held keys in one namespace, named by one family entry.
            load = Load(cluster.dsn(), sessions=args.sessions, locks=50_000, namespace=42).start()
            results["family"] = [asdict(p) for p in measure_point(cluster, admin, 50_000, 0, short, workdir, (42,))]
            load.stop()
            print(f"family: {results['family']}", flush=True)
            ended("family")
            results["databases"] = measure_databases(cluster, admin, args, workdir)
            print(f"databases: {results['databases']}", flush=True)
            ended("databases")
        admin.close()
        cluster.destroy()  # the fleet point starts four clusters of its own
        if not args.smoke and not args.no_scaling:
            try:
                fleet_points(args, workdir, ended, results)
            except Exception as exc:  # noqa: BLE001 - the hour of figures before them is saved all the same
                results["fleet_error"] = f"{type(exc).__name__}: {exc}"
                print(f"the fleet points failed ({results['fleet_error']}); the figures measured are saved", flush=True)
    finally:
        cluster.destroy()
        shutil.rmtree(workdir, ignore_errors=True)  # the subjects' configs and logs

    from bench.report import previous_summary

    results["previous_release"] = previous_summary(results)
    results["run_seconds"] = round(time.monotonic() - started)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / ("results-smoke.json" if args.smoke else "results.json")).write_text(json.dumps(results, indent=1))
    if not args.smoke:
        from bench.report import write_report

        write_report(results, args.out / "results.md", ROOT / "docs" / "bench.png")
        print(f"wrote {args.out / 'results.md'} and docs/bench.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
