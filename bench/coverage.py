"""What polling can see: the share of short holds seen, and of acquisitions counted, by hold length
and poll interval, measured with real exporters against real workers.

Workers hold a key for a fixed time, release it, wait a random gap (0.5 to 1.5 times the hold) and
take a key again. Each hold length has two namespace families, so one exporter run counts every
length at once:
- "seen": every hold takes a fresh key, so each is a new holder (pid + backend_start + key) and the
  family's acquisitions_total counts exactly the holds some poll fell inside;
- "counted": a long-lived session takes the same key each time, as a worker loop does: holds seen by
  two consecutive polls look like one, so acquisitions_total can count fewer than were seen.

Each exporter connects as a role of its own, so the window's pg_stat_statements time of that role
(execution plus planning, every statement it ran) over the window's length is the share of one
server core its polling cost, beside its own figure (db_time_ratio, round trips over the last
minute) and the interval in force (sampled every second; for poll_interval auto it follows the
cost, so the share predicted for a hold is hold / the median interval in force). The run is made
at a background load (bench/load.py) of its own: auto's interval, and so what it sees, depends on
what a poll has to read.
"""

from __future__ import annotations

import random
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable

import psycopg
import yaml

from bench.auto import PREFIX
from bench.measure import Background, cpu_seconds, server_time
from bench.subjects import FLOOR_ACTIVITY, FLOOR_LOCKS, OURS_MARKER, Process, create_role
from tests.metrics_util import parse

HOLDS = (0.05, 0.2, 0.3, 1.0, 5.0)
NAMESPACE_BASE = 700
PATTERNS = {"seen": 0, "counted": 10}  # pattern -> namespace offset


def _worker(dsn: str, namespace: int, key: int, hold: float, stop: threading.Event, made: list[int],
            fresh: bool) -> None:
    rng = random.Random(namespace * 1000 + key)
    taken = key
    with psycopg.connect(dsn, autocommit=True, application_name=f"coverage-{hold}") as conn:
        while not stop.is_set():
            if fresh:
                taken += 1000
            conn.execute("SELECT pg_advisory_lock(%s::int4, %s::int4)", [namespace, taken])
            if stop.wait(hold):
                conn.execute("SELECT pg_advisory_unlock(%s::int4, %s::int4)", [namespace, taken])
                return
            conn.execute("SELECT pg_advisory_unlock(%s::int4, %s::int4)", [namespace, taken])
            made[0] += 1
            stop.wait(rng.uniform(0.5, 1.5) * hold + 0.02)


class _FloorRoundTrip(Background):
    """What the floor's two reads (bench/subjects.py) cost as one round trip, timed as the exporter
    times its own poll: sent as one string, at the auto exporter's interval in force (as cold a
    backend as its polls meet), beside it in the same run."""

    def __init__(self, dsn: str, interval: Callable[[], float]) -> None:
        super().__init__()
        self._dsn, self._interval = dsn, interval
        self.round_trips: list[float] = []

    def _loop(self) -> None:
        with psycopg.connect(self._dsn, autocommit=True, application_name="coverage-floor") as conn:
            while not self._stop.is_set():
                with conn.cursor() as cur:
                    began = time.monotonic()
                    cur.execute(f"{FLOOR_LOCKS}; {FLOOR_ACTIVITY}")  # both results in when it returns
                    self.round_trips.append(time.monotonic() - began)
                self._stop.wait(self._interval())


class _Exporter(Process):
    """One exporter naming every (pattern, hold) family; interval None: poll_interval auto."""

    def __init__(self, workdir: Path, interval: float | None) -> None:
        super().__init__(workdir)
        self.interval = interval
        self.label = "auto" if interval is None else f"{interval:g} s"
        self.role = "bench_cov_" + ("auto" if interval is None else f"{int(interval * 1000)}ms")

    def start(self, dsn: str) -> "_Exporter":
        locks = [{"name": f"{pattern}-{hold}", "key": {"namespace": NAMESPACE_BASE + offset + i}}
                 for pattern, offset in PATTERNS.items() for i, hold in enumerate(HOLDS)]
        config = {"dsn": dsn, "locks": locks}
        if self.interval is not None:
            config["poll_interval"] = f"{int(self.interval * 1000)}ms"
        path = self.workdir / f"{self.role}.yaml"
        path.write_text(yaml.safe_dump(config))
        self._spawn([sys.executable, "-m", "exporter", f"--config.file={path}",
                     f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warning"])
        return self

    def samples(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with urllib.request.urlopen(self.url, timeout=10) as response:
            return parse(response.read().decode())

    def acquisitions(self) -> dict[tuple[str, float], float]:
        samples = self.samples()
        return {(pattern, hold): samples[("pg_advisory_lock_acquisitions_total",
                                          (("database", "postgres"), ("lock", f"{pattern}-{hold}")))]
                for pattern in PATTERNS for hold in HOLDS}

    def interval_and_ratio(self) -> tuple[float, float]:
        samples = self.samples()
        return samples[(f"{PREFIX}_poll_interval_seconds", ())], samples[(f"{PREFIX}_db_time_ratio", ())]


def measure_coverage(dsn_for: Callable[[str], str], admin: psycopg.Connection, workdir: Path, held: int,
                     intervals: tuple[float | None, ...] = (1.0, 5.0, None), seconds: float = 60.0,
                     workers: int = 10, settle: float = 6.0) -> list[dict[str, object]]:
    """Per exporter (poll interval, None for auto) and hold length: holds made, the share the
    exporter counted, the interval in force and the share of a core its polls cost, with `held`
    locks held in the background (the caller's Load)."""
    exporters = [_Exporter(workdir, interval) for interval in intervals]
    for exporter in exporters:
        create_role(admin, exporter.role)
    try:
        for exporter in exporters:
            exporter.start(dsn_for(exporter.role))
        time.sleep(settle)  # every exporter past its first poll (holders there then are not counted)
        before = {e.label: e.acquisitions() for e in exporters}
        stop = threading.Event()
        made = {(pattern, hold): [0] for pattern in PATTERNS for hold in HOLDS}
        threads = [
            threading.Thread(target=_worker, daemon=True, args=(
                dsn_for("postgres"), NAMESPACE_BASE + offset + i, k, hold, stop, made[(pattern, hold)], pattern == "seen"))
            for pattern, offset in PATTERNS.items() for i, hold in enumerate(HOLDS) for k in range(workers)
        ]
        cost0 = {e.label: server_time(admin, e.role, OURS_MARKER) for e in exporters}
        cpu0 = {e.label: cpu_seconds(e.pid) for e in exporters}
        started = time.monotonic()
        for thread in threads:
            thread.start()
        in_force: dict[str, list[float]] = {e.label: [] for e in exporters}
        floor = _FloorRoundTrip(dsn_for("postgres"), lambda: (in_force.get("auto") or [0.5])[-1])
        with floor:
            while time.monotonic() < started + seconds:
                time.sleep(1.0)
                for e in exporters:
                    in_force[e.label].append(e.interval_and_ratio()[0])
        cost1 = {e.label: server_time(admin, e.role, OURS_MARKER) for e in exporters}
        cpu1 = {e.label: cpu_seconds(e.pid) for e in exporters}
        window = time.monotonic() - started
        own = {e.label: e.interval_and_ratio()[1] for e in exporters}
        stop.set()
        for thread in threads:
            thread.join(15)
        time.sleep(max(settle, max(max(v) for v in in_force.values()) + 1))  # the last holds' polls are in
        after = {e.label: e.acquisitions() for e in exporters}
    finally:
        for exporter in exporters:
            exporter.stop()
    rows: list[dict[str, object]] = []
    for e in exporters:
        interval = statistics.median(in_force[e.label])
        (ms0, polls0), (ms1, polls1) = cost0[e.label], cost1[e.label]
        for hold in HOLDS:
            row: dict[str, object] = {
                "exporter": e.label, "interval": e.interval, "held": held, "hold": hold,
                "interval_in_force": interval, "interval_min": min(in_force[e.label]),
                "interval_max": max(in_force[e.label]), "expected_seen": min(1.0, hold / interval),
                "workers": workers, "window_seconds": window, "polls": polls1 - polls0, "db_ms": ms1 - ms0,
                "db_share": (ms1 - ms0) / 1000 / window, "own_ratio": own[e.label],
                "cpu_share": (cpu1[e.label] - cpu0[e.label]) / window,  # the exporter's own CPU, of one core
                # The exporter's own mean round trip (its db_time_ratio times its interval), and the
                # floor's, timed alike in the same window.
                "own_round_trip_ms": own[e.label] * interval * 1000,
                "floor_round_trip_ms": statistics.mean(floor.round_trips) * 1000 if floor.round_trips else None,
            }
            for pattern in PATTERNS:
                holds = made[(pattern, hold)][0]
                counted = after[e.label][(pattern, hold)] - before[e.label][(pattern, hold)]
                row[f"{pattern}_holds"] = holds
                row[f"{pattern}_share"] = min(counted / holds, 1.0) if holds else 0.0
            rows.append(row)
    return rows
