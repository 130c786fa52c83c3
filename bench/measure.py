"""What the benchmark reads: process CPU and memory, server time per statement, scrape latency."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Self

import psycopg

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class Background:
    """A loop on a daemon thread of its own: the subclass's _loop, which runs until _stop is set.
    Started and stopped by start() and stop(), or as a context manager."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        raise NotImplementedError

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

# Per role: the server time of every statement that role ran, and how many times its poll ran.
SERVER_TIME = """
SELECT coalesce(sum(s.total_exec_time + s.total_plan_time), 0)::float8,
       coalesce(max(s.calls) FILTER (WHERE s.query ILIKE %(marker)s), 0)::int8
FROM pg_stat_statements AS s JOIN pg_roles AS r ON r.oid = s.userid
WHERE r.rolname = %(role)s
"""
RESET = "SELECT pg_stat_statements_reset()"
# Per role: how many times the statements whose text matches ran (the poll's second statement).
STATEMENT_CALLS = """
SELECT coalesce(sum(s.calls), 0)::int8
FROM pg_stat_statements AS s JOIN pg_roles AS r ON r.oid = s.userid
WHERE r.rolname = %(role)s AND s.query ILIKE %(marker)s
"""


class Servers:
    """The servers a fleet point starts (clusters, sessions holding locks), as a context manager:
    build() starts them, and a build that fails part-way tears down what it started."""

    def __init__(self) -> None:
        self.clusters: list = []
        self.holders: list[psycopg.Connection] = []

    def build(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.build()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        for conn in self.holders:
            conn.close()
        for cluster in self.clusters:
            cluster.destroy()


def stop(proc: subprocess.Popen) -> None:
    """An exporter process stopped (SIGTERM; killed after 15 s)."""
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()


def threads(pid: int) -> int:
    """How many threads a process runs now."""
    with open(f"/proc/{pid}/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("Threads:"))


def phase_timer(phases: dict[str, float], started: float) -> Callable[[str], None]:
    """ended(phase): when it ended, in seconds since started, put in phases and printed."""

    def ended(phase: str) -> None:
        phases[phase] = round(time.monotonic() - started, 1)
        print(f"[{phases[phase]:.0f} s] {phase} done", flush=True)

    return ended


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory now (VmRSS), or its peak over the process's life so far (VmHWM)."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return 0.0


def server_time(admin: psycopg.Connection, role: str, marker: str) -> tuple[float, int]:
    """(total ms, polls) for a role since the last reset."""
    row = admin.execute(SERVER_TIME, {"role": role, "marker": marker}).fetchone()
    assert row is not None
    return float(row[0]), int(row[1])


def statement_calls(admin: psycopg.Connection, role: str, marker: str) -> int:
    """Calls of a role's statements matching marker since the last reset."""
    row = admin.execute(STATEMENT_CALLS, {"role": role, "marker": marker}).fetchone()
    assert row is not None
    return int(row[0])


@dataclass(frozen=True)
class Scrapes:
    p50_ms: float
    p95_ms: float
    size_bytes: int


def scrape(url: str, count: int) -> Scrapes:
    """count sequential scrapes asking for gzip, as Prometheus does, from a process of their own (the
    benchmark's own threads, the churning load's above all, would otherwise hold the scraper's
    interpreter and add their time to the scrape's): latency percentiles and the bytes on the
    wire of the last one."""
    out = subprocess.run([sys.executable, "-m", "bench.measure", url, str(count)], capture_output=True, text=True,
                         check=True, timeout=max(60, count * 30), cwd=Path(__file__).resolve().parent.parent).stdout
    return Scrapes(**json.loads(out))


def _scrape_here(url: str, count: int) -> Scrapes:
    latencies, size = [], 0
    request = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
    for _ in range(count):
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=30) as response:
            size = len(response.read())
        latencies.append((time.perf_counter() - started) * 1000)
    latencies.sort()
    return Scrapes(statistics.median(latencies), latencies[min(len(latencies) - 1, int(len(latencies) * 0.95))], size)


# How long one read of pg_locks holds the lock manager's partition locks: the Function Scan of
# pg_lock_status() (GetLockStatusData takes all 16 partition locks while it copies the table).
LOCK_STATUS_SCAN = "EXPLAIN (ANALYZE, FORMAT JSON) SELECT count(*) FROM pg_lock_status() AS l"


def lock_status_scan_ms(admin: psycopg.Connection, repeats: int = 5) -> float:
    """The median time of the pg_lock_status() scan, in ms."""
    times = []
    for _ in range(repeats):
        plan = admin.execute(LOCK_STATUS_SCAN).fetchone()[0][0]["Plan"]
        node = plan
        while node.get("Node Type") != "Function Scan":
            node = node["Plans"][0]
        times.append(float(node["Actual Total Time"]))
    return statistics.median(times)


# Two-sided 95% t quantiles by degrees of freedom (a confidence interval of a mean of paired runs).
_T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 12: 2.18,
        14: 2.14, 16: 2.12, 18: 2.10, 19: 2.09, 20: 2.09, 25: 2.06, 30: 2.04, 40: 2.02, 60: 2.00}


def mean_ci95(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high) of the mean's 95% confidence interval."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, mean, mean
    df = len(values) - 1
    t = _T95.get(df) or next((_T95[k] for k in sorted(_T95) if k >= df), 1.96)
    half = t * statistics.stdev(values) / len(values) ** 0.5
    return mean, mean - half, mean + half


if __name__ == "__main__":
    # python -m bench.measure URL COUNT: the scrapes of scrape(), printed as JSON.
    print(json.dumps(asdict(_scrape_here(sys.argv[1], int(sys.argv[2])))))
