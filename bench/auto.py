"""poll_interval auto under load: what an auto exporter reports of itself, what its polls cost the
server by pg_stat_statements, and whether two of its polls ever ran at once.

The settle point: an exporter on auto (the default budget, max_db_time_share 0.5% of a core,
100 ms..30 s) against a heavy load, long enough to settle; then a window that starts just after
one poll ends and stops just after a later one ends, so it holds whole intervals: its polls' server
time over its length is the share of a core the interval in force costs, not a count cut at its
edges. Two polls at once need two backends (one backend runs one statement at a time), and a poll
is abandoned only past its deadline, which counts a poll error: so throughout the window a watcher
reads pg_stat_activity every 50 ms for the backends of the exporter's role (two active in one
sample, or more than one backend seen, would be an overlap or a reconnect), and the window's poll
errors are counted; the polls' summed duration against the window's length is reported beside.
"""

from __future__ import annotations

import statistics
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psycopg

from bench.measure import Background, server_time
from bench.subjects import AUTO_ROLE, Ours
from exporter.config import DEFAULT_MAX_DB_TIME_SHARE, DEFAULT_MAX_POLL_INTERVAL
from tests.metrics_util import parse

PREFIX = "pg_advisory_lock_exporter"
WATCH_EVERY = 0.05
ROLE_BACKENDS = "SELECT pid, state FROM pg_stat_activity WHERE usename = %s"


@dataclass(frozen=True)
class ExporterStats:
    """What an exporter says of its own polls, from one scrape."""

    interval: float  # poll_interval_seconds: the interval in force
    db_time_ratio: float  # its polls' round trips over the last minute, a fraction of it
    polls: int  # poll_duration_seconds_count
    duration_sum: float  # poll_duration_seconds_sum
    errors: int  # poll_errors_total: a poll past its deadline is one


def exporter_stats(url: str) -> ExporterStats:
    with urllib.request.urlopen(url, timeout=10) as response:
        samples = parse(response.read().decode())
    return ExporterStats(samples[(f"{PREFIX}_poll_interval_seconds", ())], samples[(f"{PREFIX}_db_time_ratio", ())],
                         int(samples[(f"{PREFIX}_poll_duration_seconds_count", ())]),
                         samples[(f"{PREFIX}_poll_duration_seconds_sum", ())],
                         int(samples[(f"{PREFIX}_poll_errors_total", ())]))


def after_next_poll(url: str, polls: int, timeout: float) -> tuple[float, ExporterStats]:
    """(when, stats) as soon as the exporter has published a poll after its first `polls`."""
    deadline = time.monotonic() + timeout
    while True:
        stats = exporter_stats(url)
        if stats.polls > polls or time.monotonic() > deadline:
            return time.monotonic(), stats
        time.sleep(0.02)


class OverlapWatch(Background):
    """Samples one role's backends in pg_stat_activity on a connection of its own."""

    def __init__(self, dsn: str, role: str) -> None:
        super().__init__()
        self._dsn, self._role = dsn, role
        self.samples = 0
        self.max_active = 0  # the most backends of the role active in one sample
        self.active_samples = 0  # samples with a poll running
        self.backends: set[int] = set()

    def _loop(self) -> None:
        with psycopg.connect(self._dsn, autocommit=True, application_name="bench-overlap-watch") as conn:
            while not self._stop.is_set():
                rows = conn.execute(ROLE_BACKENDS, [self._role]).fetchall()
                active = sum(1 for _, state in rows if state == "active")
                self.samples += 1
                self.max_active = max(self.max_active, active)
                self.active_samples += active > 0
                self.backends.update(pid for pid, _ in rows)
                self._stop.wait(WATCH_EVERY)


def measure_settle(dsn_for: Callable[[str], str], admin: psycopg.Connection, workdir: Path, held: int, named: int,
                   settle: float, window: float) -> dict[str, object]:
    """An auto exporter at this load: the interval it settles at, its share of a core by
    pg_stat_statements over whole intervals and by its own db_time_ratio, and its overlap check."""
    ours = Ours(workdir)
    ours.role = AUTO_ROLE
    ours.start(dsn_for(AUTO_ROLE), list(range(1, named + 1)), None)
    try:
        started, path = time.monotonic(), []
        while time.monotonic() < started + settle:
            path.append(exporter_stats(ours.url).interval)
            time.sleep(1.0)
        first = exporter_stats(ours.url)
        t0, s0 = after_next_poll(ours.url, first.polls, DEFAULT_MAX_POLL_INTERVAL + 5)
        ms0, calls0 = server_time(admin, AUTO_ROLE, Ours.marker)
        intervals = [s0.interval]
        with OverlapWatch(dsn_for("postgres"), AUTO_ROLE) as watch:
            now, last = t0, s0
            while now < t0 + window:
                time.sleep(1.0)
                now, last = time.monotonic(), exporter_stats(ours.url)
                intervals.append(last.interval)
            t1, s1 = after_next_poll(ours.url, last.polls, DEFAULT_MAX_POLL_INTERVAL + 5)
            ms1, calls1 = server_time(admin, AUTO_ROLE, Ours.marker)
    finally:
        ours.stop()
    seconds, polls = t1 - t0, s1.polls - s0.polls
    mean_poll = (s1.duration_sum - s0.duration_sum) / max(polls, 1)
    return {
        "held": held, "named": named, "settle_seconds": settle, "window_seconds": seconds,
        "share_budget": DEFAULT_MAX_DB_TIME_SHARE, "max_poll_interval": DEFAULT_MAX_POLL_INTERVAL,
        "interval_path": path, "interval": s1.interval, "interval_min": min(intervals), "interval_max": max(intervals),
        "interval_median": statistics.median(intervals), "at_max": s1.interval >= DEFAULT_MAX_POLL_INTERVAL - 1e-6,
        "polls": polls, "poll_errors": s1.errors - s0.errors, "statement_calls": calls1 - calls0, "db_ms": ms1 - ms0,
        "db_ms_per_poll": (ms1 - ms0) / max(polls, 1), "db_share": (ms1 - ms0) / 1000 / seconds,
        "own_ratio": s1.db_time_ratio, "mean_poll_seconds": mean_poll, "busy_seconds": polls * mean_poll,
        "watch_samples": watch.samples, "watch_active_samples": watch.active_samples,
        "max_active_backends": watch.max_active, "backends_seen": len(watch.backends),
    }
