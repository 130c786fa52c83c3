"""What polling can see: the share of short holds seen, and of acquisitions counted, by hold length
and poll interval, measured with real exporters against real workers.

Workers hold a key for a fixed time, release it, wait a random gap (0.5 to 1.5 times the hold) and
take a key again. Each hold length has two namespace families, so one exporter run counts every
length at once:
- "seen": every hold takes a fresh key, so each is a new holder (pid + backend_start + key) and the
  family's acquisitions_total counts exactly the holds some poll fell inside;
- "counted": a long-lived session takes the same key each time, as a worker loop does: holds seen by
  two consecutive polls look like one, so acquisitions_total can count fewer than were seen.
"""

from __future__ import annotations

import random
import threading
import time
import urllib.request
from pathlib import Path

import psycopg
import yaml

from bench.subjects import Process
from tests.metrics_util import parse

HOLDS = (0.05, 0.2, 1.0, 5.0)
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


class _Exporter(Process):
    role = "postgres"

    def start(self, dsn: str, interval: float) -> "_Exporter":
        locks = [{"name": f"{pattern}-{hold}", "key": {"namespace": NAMESPACE_BASE + offset + i}}
                 for pattern, offset in PATTERNS.items() for i, hold in enumerate(HOLDS)]
        path = self.workdir / f"coverage-{interval}.yaml"
        path.write_text(yaml.safe_dump({"dsn": dsn, "poll_interval": f"{int(interval * 1000)}ms", "locks": locks}))
        self._spawn([__import__("sys").executable, "-m", "exporter", f"--config.file={path}",
                     f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warning"])
        return self

    def acquisitions(self) -> dict[tuple[str, float], float]:
        with urllib.request.urlopen(self.url, timeout=10) as response:
            samples = parse(response.read().decode())
        return {(pattern, hold): samples[("pg_advisory_lock_acquisitions_total",
                                          (("database", "postgres"), ("lock", f"{pattern}-{hold}")))]
                for pattern in PATTERNS for hold in HOLDS}


def measure_coverage(dsn: str, workdir: Path, seconds: float = 60.0, workers: int = 10) -> list[dict[str, float]]:
    """Per (poll interval, hold length): holds made, and the share the exporter counted."""
    exporters = {interval: _Exporter(workdir).start(dsn, interval) for interval in (1.0, 5.0)}
    try:
        time.sleep(6)  # both exporters past their first poll (holders there then are not counted)
        before = {interval: e.acquisitions() for interval, e in exporters.items()}
        stop = threading.Event()
        made = {(pattern, hold): [0] for pattern in PATTERNS for hold in HOLDS}
        threads = [
            threading.Thread(target=_worker, daemon=True, args=(
                dsn, NAMESPACE_BASE + offset + i, k, hold, stop, made[(pattern, hold)], pattern == "seen"))
            for pattern, offset in PATTERNS.items() for i, hold in enumerate(HOLDS) for k in range(workers)
        ]
        for thread in threads:
            thread.start()
        time.sleep(seconds)
        stop.set()
        for thread in threads:
            thread.join(15)
        time.sleep(6)  # the last holds' polls are in
        after = {interval: e.acquisitions() for interval, e in exporters.items()}
    finally:
        for exporter in exporters.values():
            exporter.stop()
    rows = []
    for interval in exporters:
        for hold in HOLDS:
            row: dict[str, float] = {"interval": interval, "hold": hold, "expected_seen": min(1.0, hold / interval)}
            for pattern in PATTERNS:
                holds = made[(pattern, hold)][0]
                counted = after[interval][(pattern, hold)] - before[interval][(pattern, hold)]
                row[f"{pattern}_holds"] = holds
                row[f"{pattern}_share"] = min(counted / holds, 1.0) if holds else 0.0
            rows.append(row)
    return rows
