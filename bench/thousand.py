"""A thousand targets in one process (issue 29): 250 on each of four clusters, each target its own
dsn (they differ by application_name) naming 10 locks, each cluster holding 100 advisory locks,
polled every 15 s, on the default max_workers. Measured, in three phases so the measuring does not
load what is measured:

1. steady: the exporter's CPU share and RSS, and /metrics scraped once a second (its p95);
2. gaps: every target's /probe read round after round, the gaps between the last_poll_timestamp
   values it serves (the exporter's own clock; a pair between which a poll went unseen is left out);
3. one cluster stopped (SIGSTOP): the same over the other three clusters' targets, from the
   moment it stops: how late past due (gap minus interval) any of them was polled.

`python -m bench.thousand` runs this point alone and prints its figures.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psycopg
import yaml

from bench.measure import cpu_seconds, rss_mb, tear_down
from tests.metrics_util import parse
from tests.pgcluster import Cluster, free_port

CLUSTERS = 4
PER_CLUSTER = 250
NAMED = 10
HELD = 100
INTERVAL = "15s"
LAST_POLL = ("pg_advisory_lock_exporter_last_poll_timestamp_seconds", ())
POLLS = ("pg_advisory_lock_exporter_poll_duration_seconds_count", ())
INTERVAL_FIGURE = ("pg_advisory_lock_exporter_poll_interval_seconds", ())


def _threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("Threads:"))


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def _scrape_ms(url: str) -> float:
    request = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()
    return (time.perf_counter() - started) * 1000


class Gaps:
    """Each target's gaps between consecutive polls, as its own last_poll_timestamp says."""

    def __init__(self) -> None:
        self.last: dict[str, tuple[float, float]] = {}  # target -> (stamp, poll count)
        self.gaps: dict[str, list[float]] = {}
        self.interval: dict[str, float] = {}
        self.unseen = 0  # pairs left out: a poll ran between two readings unseen

    def read(self, base: str, name: str) -> None:
        figures = parse(_get(f"{base}/probe?target={name}").decode())
        stamp, count = figures.get(LAST_POLL), figures.get(POLLS)
        self.interval[name] = figures.get(INTERVAL_FIGURE, 0.0)
        if stamp is None or count is None:
            return
        before = self.last.get(name)
        if before is not None and stamp != before[0]:
            if count - before[1] == 1:
                self.gaps.setdefault(name, []).append(stamp - before[0])
            else:
                self.unseen += 1
        if before is None or stamp != before[0]:
            self.last[name] = (stamp, count)

    def watch(self, base: str, names: list[str], seconds: float) -> None:
        ended = time.monotonic() + seconds
        while time.monotonic() < ended:
            for name in names:
                self.read(base, name)

    def worst_gap(self) -> float:
        return max((max(g) for g in self.gaps.values() if g), default=float("nan"))

    def worst_late(self) -> float:
        """The most any target was polled past due: its gap minus its interval."""
        return max((max(g) - self.interval[name] for name, g in self.gaps.items() if g), default=float("nan"))


def measure_thousand(workdir: Path, steady_seconds: float = 90.0, gap_seconds: float = 75.0,
                     stopped_seconds: float = 75.0) -> dict[str, float]:
    clusters = [Cluster(settings={"max_connections": str(PER_CLUSTER + 50)}).start() for _ in range(CLUSTERS)]
    holders: list[psycopg.Connection] = []
    proc = None
    try:
        targets: dict[str, dict] = {}
        for c, cluster in enumerate(clusters):
            conn = psycopg.connect(cluster.dsn(), autocommit=True, application_name="thousand-holder")
            conn.execute("SELECT count(pg_advisory_lock(k)) FROM generate_series(1, %s) AS k", [HELD])
            holders.append(conn)
            for t in range(PER_CLUSTER):
                name = f"c{c}-t{t:03d}"
                first = 1 + (t * NAMED) % HELD  # each target names 10 of its cluster's 100 held keys
                targets[name] = {"dsn": cluster.dsn(application_name=name),
                                 "locks": [{"name": f"key-{k}", "key": k} for k in range(first, first + NAMED)]}
        config = workdir / "thousand.yaml"
        config.write_text(yaml.safe_dump({"poll_interval": INTERVAL, "targets": targets}))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log = open(workdir / "thousand.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "exporter", f"--config.file={config}",
                                 f"--web.listen-address={base.removeprefix('http://')}", "--log.level=warning"],
                                stdout=log, stderr=subprocess.STDOUT)
        first_metrics = _first_answer(base, started=time.monotonic())
        time.sleep(20)  # every target past its first poll
        threads_start = _threads(proc.pid)
        cpu0, started = cpu_seconds(proc.pid), time.monotonic()
        scrapes = []
        while time.monotonic() < started + steady_seconds:
            scrapes.append(_scrape_ms(f"{base}/metrics"))
            time.sleep(1)
        cpu = (cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - started) * 100
        rss = rss_mb(proc.pid)
        gaps = Gaps()
        gaps.watch(base, list(targets), gap_seconds)
        stopped = clusters[3]
        others = [name for name in targets if not name.startswith("c3-")]
        late = Gaps()
        for name in others:  # the readings before it stops: the first gap counts from the last poll before
            late.read(base, name)
        stopped.signal_all(signal.SIGSTOP)
        try:
            late.watch(base, others, stopped_seconds)
            threads_stopped = _threads(proc.pid)
        finally:
            stopped.signal_all(signal.SIGCONT)
        p95 = sorted(scrapes)[int(len(scrapes) * 0.95)]
        return {
            "targets": len(targets), "first_metrics_seconds": round(first_metrics, 1),
            "threads": threads_start, "threads_one_cluster_stopped": threads_stopped,
            "rss_mb": round(rss, 1), "cpu_percent_of_core": round(cpu, 1), "scrape_p95_ms": round(p95, 2),
            "worst_gap_seconds": round(gaps.worst_gap(), 2), "targets_gaps_seen": len(gaps.gaps),
            "worst_late_seconds_one_cluster_stopped": round(late.worst_late(), 2),
            "targets_gaps_seen_one_cluster_stopped": len(late.gaps),
        }
    finally:
        tear_down(proc, holders, clusters)


def _first_answer(base: str, started: float, timeout: float = 300.0) -> float:
    """Seconds until /metrics first answers."""
    while time.monotonic() < started + timeout:
        try:
            _get(f"{base}/metrics")
            return time.monotonic() - started
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"/metrics did not answer within {timeout:g}s")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        print(json.dumps(measure_thousand(Path(folder)), indent=1))
