"""One exporter, many servers: 50 targets (50 databases over four clusters; 50 throwaway clusters
are too many for this machine), each naming 20 locks with 100 advisory locks held, polled every
5 s. Measured: the exporter's CPU and memory, the scrape latency of one target while another
target's server is stopped (SIGSTOP), and its threads and connections over the whole run; this
code's runs beside the baseline's (BASELINE: before the bounded workers), three of each, so each
figure is a median with its run-to-run spread.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psycopg
import yaml

from bench.measure import Servers, cpu_seconds, rss_mb, stop, threads
from tests.pgcluster import Cluster, free_port

ROOT = Path(__file__).resolve().parent.parent
# The code the 50-target point is held beside: main before the scheduler (issue 29), when
# every target ran a poll thread and a probe thread of its own.
BASELINE = "baf0ffe"
CLUSTERS = 4
TARGETS = 50
NAMED = 20
HELD = 100
SESSIONS_PER_DB = 4


def _connections(clusters: list[Cluster]) -> int:
    total = 0
    for cluster in clusters:
        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            total += conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE "
                                  "'pg-advisory-lock-exporter%'").fetchone()[0]
    return total


def _scrape_ms(url: str, count: int) -> list[float]:
    latencies = []
    request = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
    for _ in range(count):
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()
        latencies.append((time.perf_counter() - started) * 1000)
        time.sleep(0.01)
    return latencies


class Site(Servers):
    """The 50 targets' servers: four clusters, 50 databases, four sessions per database holding its
    100 locks, and the config; shared by every run of the point (this code's and the baseline's)."""

    def __init__(self, workdir: Path) -> None:
        super().__init__()
        self.workdir = workdir
        self.config = workdir / "fleet.yaml"

    def build(self) -> None:
        for _ in range(CLUSTERS):
            self.clusters.append(Cluster(settings={"max_connections": "300", "max_locks_per_transaction": "256"}).start())
        targets = {}
        for t in range(TARGETS):
            cluster = self.clusters[t % CLUSTERS]
            db = f"fleet_{t:02d}"
            with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
                admin.execute(f"CREATE DATABASE {db}")
            for s in range(SESSIONS_PER_DB):
                conn = psycopg.connect(cluster.dsn(db), autocommit=True, application_name=f"fleet-holder-{s}")
                conn.execute("SELECT count(pg_advisory_lock(k)) FROM generate_series(%s::int8, %s::int8, %s::int8) AS k",
                             [1 + s, HELD, SESSIONS_PER_DB])
                self.holders.append(conn)
            targets[f"t{t:02d}"] = {"dsn": cluster.dsn(db),
                                    "locks": [{"name": f"key-{k}", "key": k} for k in range(1, NAMED + 1)]}
        self.config.write_text(yaml.safe_dump({"poll_interval": "5s", "targets": targets}))


def baseline_tree(workdir: Path, commit: str = BASELINE) -> Path:
    """The exporter as it was at commit, unpacked from git (the checkout's history) into workdir
    once (a full run unpacks it at its start, to fail early; the fleet point finds it there)."""
    tree = workdir / f"baseline-{commit}"
    if (tree / "exporter").is_dir():
        return tree
    tree.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "exporter"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def run_fleet(site: Site, seconds: float, code: Path | None = None) -> dict[str, float]:
    """One run of the exporter over the site: this checkout's code, or the exporter package found
    under code (first on the path, before the installed one)."""
    port = free_port()
    log = open(site.workdir / f"fleet-{'baseline' if code else 'ours'}.log", "ab")  # noqa: SIM115
    env = {**os.environ, "PYTHONPATH": str(code)} if code is not None else None
    proc = subprocess.Popen([sys.executable, "-m", "exporter", f"--config.file={site.config}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warning"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=code or ROOT)
    try:
        time.sleep(15)  # every target past its first polls
        threads_start, conns_start = threads(proc.pid), _connections(site.clusters)
        cpu0, started = cpu_seconds(proc.pid), time.monotonic()
        healthy = f"http://127.0.0.1:{port}/probe?target=t00"
        steady = []
        stop_at = started + max(seconds - 40, 10)
        while time.monotonic() < stop_at:
            steady += _scrape_ms(healthy, 1)
            time.sleep(1)
        # One other target's server stops answering (t03 and the others on the fourth cluster).
        stopped = site.clusters[3]
        stopped.signal_all(signal.SIGSTOP)
        try:
            time.sleep(6)  # past the hung polls' deadlines
            hung = _scrape_ms(healthy, 300)
        finally:
            stopped.signal_all(signal.SIGCONT)
        time.sleep(max(0.0, started + seconds - time.monotonic()))
        elapsed = time.monotonic() - started
        cpu = (cpu_seconds(proc.pid) - cpu0) / elapsed * 100
        time.sleep(10)  # the stopped server's targets reconnect
        threads_end, conns_end = threads(proc.pid), _connections(site.clusters)
        rss = rss_mb(proc.pid)
        p95 = lambda values: sorted(values)[int(len(values) * 0.95)]  # noqa: E731
        return {
            "targets": TARGETS, "seconds": round(elapsed), "cpu_percent_of_core": cpu, "rss_mb": rss,
            "scrape_p95_ms": p95(steady), "scrape_p95_ms_other_server_stopped": p95(hung),
            "scrape_median_ms_other_server_stopped": statistics.median(hung),
            "threads_start": threads_start, "threads_end": threads_end,
            "connections_start": conns_start, "connections_end": conns_end,
        }
    finally:
        stop(proc)


# Lower is better for every one of them.
COMPARED = ("cpu_percent_of_core", "rss_mb", "scrape_p95_ms", "scrape_p95_ms_other_server_stopped",
            "threads_start", "threads_end", "connections_start", "connections_end")


def measure_fleet(workdir: Path, seconds: float = 150.0, runs: int = 3) -> dict[str, object]:
    """This code and the baseline's, runs of each over the same site, in the order ABBA... (a drift
    of the machine weighs on both alike): every run's figures, each figure's median and spread
    (max - min over the runs) for both, and whether this code's median is worse than the
    baseline's by more than the larger of the two spreads."""
    baseline = baseline_tree(workdir)
    per: dict[str, list[dict[str, float]]] = {"ours": [], "baseline": []}
    with Site(workdir) as site:
        for r in range(runs):
            for subject in (("ours", "baseline") if r % 2 == 0 else ("baseline", "ours")):
                figures = run_fleet(site, seconds, baseline if subject == "baseline" else None)
                per[subject].append(figures)
                print(f"fleet run {r + 1}, {subject}: {figures}", flush=True)
    return {"baseline_commit": BASELINE, "runs": runs, "seconds": seconds, "per_run": per, "compared": compare(per),
            "median": {field: statistics.median(run[field] for run in per["ours"]) for field in per["ours"][0]}}


def compare(per: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, object]]:
    """Each figure of COMPARED: both medians, the spread (the larger of the two ranges over the
    runs), and whether this code's median is worse (higher) than the baseline's beyond it."""
    compared: dict[str, dict[str, object]] = {}
    for field in COMPARED:
        ours, base = ([run[field] for run in per[s]] for s in ("ours", "baseline"))
        spread = max(max(ours) - min(ours), max(base) - min(base))
        compared[field] = {"ours": statistics.median(ours), "baseline": statistics.median(base), "spread": spread,
                           "worse_beyond_spread": statistics.median(ours) > statistics.median(base) + spread}
    return compared
