"""One exporter, many servers: 50 targets (50 databases over four clusters; 50 throwaway clusters
are too many for this machine), each naming 20 locks with 100 advisory locks held, polled every
5 s. Measured: the exporter's CPU and memory, the scrape latency of one target while another
target's server is stopped (SIGSTOP), and its threads and connections over the whole run.
"""

from __future__ import annotations

import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psycopg
import yaml

from bench.measure import cpu_seconds, rss_mb, tear_down
from tests.pgcluster import Cluster, free_port

CLUSTERS = 4
TARGETS = 50
NAMED = 20
HELD = 100
SESSIONS_PER_DB = 4


def _threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("Threads:"))


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


def measure_fleet(workdir: Path, seconds: float = 600.0) -> dict[str, float]:
    clusters = [Cluster(settings={"max_connections": "300", "max_locks_per_transaction": "256"}).start()
                for _ in range(CLUSTERS)]
    holders: list[psycopg.Connection] = []
    proc = None
    try:
        targets = {}
        for t in range(TARGETS):
            cluster = clusters[t % CLUSTERS]
            db = f"fleet_{t:02d}"
            with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
                admin.execute(f"CREATE DATABASE {db}")
            for s in range(SESSIONS_PER_DB):
                conn = psycopg.connect(cluster.dsn(db), autocommit=True, application_name=f"fleet-holder-{s}")
                conn.execute("SELECT count(pg_advisory_lock(k)) FROM generate_series(%s::int8, %s::int8, %s::int8) AS k",
                             [1 + s, HELD, SESSIONS_PER_DB])
                holders.append(conn)
            targets[f"t{t:02d}"] = {"dsn": cluster.dsn(db),
                                    "locks": [{"name": f"key-{k}", "key": k} for k in range(1, NAMED + 1)]}
        config = workdir / "fleet.yaml"
        config.write_text(yaml.safe_dump({"poll_interval": "5s", "targets": targets}))
        port = free_port()
        log = open(workdir / "fleet.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "exporter", f"--config.file={config}",
                                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warning"],
                                stdout=log, stderr=subprocess.STDOUT)
        time.sleep(15)  # every target past its first polls
        threads_start, conns_start = _threads(proc.pid), _connections(clusters)
        cpu0, started = cpu_seconds(proc.pid), time.monotonic()
        healthy = f"http://127.0.0.1:{port}/probe?target=t00"
        steady = []
        stop_at = started + max(seconds - 40, 10)
        while time.monotonic() < stop_at:
            steady += _scrape_ms(healthy, 1)
            time.sleep(1)
        # One other target's server stops answering (t03 and the others on the fourth cluster).
        stopped = clusters[3]
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
        threads_end, conns_end = _threads(proc.pid), _connections(clusters)
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
        tear_down(proc, holders, clusters)
