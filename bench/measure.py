"""What the benchmark reads: process CPU and memory, server time per statement, scrape latency."""

from __future__ import annotations

import os
import statistics
import time
import urllib.request
from dataclasses import dataclass

import psycopg

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# Per role: the server time of every statement that role ran, and how many times its poll ran.
SERVER_TIME = """
SELECT coalesce(sum(s.total_exec_time + s.total_plan_time), 0)::float8,
       coalesce(max(s.calls) FILTER (WHERE s.query ILIKE %(marker)s), 0)::int8
FROM pg_stat_statements AS s JOIN pg_roles AS r ON r.oid = s.userid
WHERE r.rolname = %(role)s
"""
RESET = "SELECT pg_stat_statements_reset()"


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def server_time(admin: psycopg.Connection, role: str, marker: str) -> tuple[float, int]:
    """(total ms, polls) for a role since the last reset."""
    row = admin.execute(SERVER_TIME, {"role": role, "marker": marker}).fetchone()
    assert row is not None
    return float(row[0]), int(row[1])


@dataclass(frozen=True)
class Scrapes:
    p50_ms: float
    p95_ms: float
    size_bytes: int


def scrape(url: str, count: int) -> Scrapes:
    """count sequential scrapes; latency percentiles and the size of the last one."""
    latencies, size = [], 0
    for _ in range(count):
        started = time.perf_counter()
        with urllib.request.urlopen(url, timeout=30) as response:
            size = len(response.read())
        latencies.append((time.perf_counter() - started) * 1000)
    latencies.sort()
    return Scrapes(statistics.median(latencies), latencies[min(len(latencies) - 1, int(len(latencies) * 0.95))], size)
