"""Stand-ins for the truth test's workload and oracle, so the runner's own parts (faults, proxy,
schedule, scraping, report) are tested without them: the same interface as chaos/workload.py
(Endpoint, WorkloadSpec, Workload) and chaos/oracle.judge, doing far less.

The stand-in workload: one thread per direct endpoint of a dsn's database, taking the first
named key for a second, releasing it, again, and recording each hold with the server's clock."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import psycopg

from chaos import truth
from chaos.oracle import Scrape, TargetSetup, Verdict
from tests.metrics_util import parse

TAKE = ("SELECT extract(epoch FROM clock_timestamp())::float8 AS lo, pg_advisory_lock(%(k)s), "
        "extract(epoch FROM clock_timestamp())::float8 AS hi, pg_backend_pid() AS pid, "
        "extract(epoch FROM (SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()))::float8 AS start")
RELEASE = ("SELECT extract(epoch FROM clock_timestamp())::float8 AS lo, pg_advisory_unlock(%(k)s), "
           "extract(epoch FROM clock_timestamp())::float8 AS hi")
PING = "SELECT extract(epoch FROM clock_timestamp())::float8 AS at"


@dataclass(frozen=True)
class Endpoint:
    target: str
    database: str
    dsn: str
    via: str
    direct_dsn: str


@dataclass(frozen=True)
class WorkloadSpec:
    endpoints: tuple[Endpoint, ...]
    named_keys: tuple[int, ...]
    family_classid: int
    unnamed_keys: tuple[int, ...]
    workers: int = 6
    seed: int = 1
    hold_seconds: tuple[float, float] = (0.05, 20.0)
    prepared: bool = True


class Workload:
    def __init__(self, spec: WorkloadSpec, out_dir: Path) -> None:
        self.spec = spec
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "standin.jsonl"
        self.path.write_text("")
        self._stop = threading.Event()
        self._paused: set[str] = set()
        self._lock = threading.Lock()
        first = {}
        for endpoint in spec.endpoints:
            if endpoint.via == truth.DIRECT:
                first.setdefault(endpoint.target, endpoint)
        self._threads = [threading.Thread(target=self._work, args=(e,), daemon=True) for e in first.values()]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)

    def files(self) -> list[Path]:
        return [self.path]

    @contextlib.contextmanager
    def paused(self, target: str) -> Iterator[None]:
        self._paused.add(target)
        try:
            yield
        finally:
            self._paused.discard(target)

    def _record(self, hold: truth.Hold) -> None:
        with self._lock, open(self.path, "a") as handle:
            handle.write(hold.to_json() + "\n")

    def _work(self, endpoint: Endpoint) -> None:
        key = self.spec.named_keys[0]
        triple = (0, key, 1)
        while not self._stop.is_set():
            if endpoint.target in self._paused:
                time.sleep(0.1)
                continue
            try:
                self._hold_once(endpoint, key, triple)
            except psycopg.Error:
                time.sleep(0.3)

    def _hold_once(self, endpoint: Endpoint, key: int, triple: tuple[int, int, int]) -> None:
        with psycopg.connect(endpoint.dsn, autocommit=True, connect_timeout=2) as conn:
            got = conn.execute(TAKE, {"k": key}).fetchone()
            assert got is not None
            holder = truth.Holder(got[3], got[4])
            granted, proven = truth.Span(got[0], got[2]), got[2]
            try:
                until = time.monotonic() + 1.0
                while time.monotonic() < until and endpoint.target not in self._paused:
                    time.sleep(0.2)
                    proven = conn.execute(PING).fetchone()[0]  # type: ignore[index]
                done = conn.execute(RELEASE, {"k": key}).fetchone()
                assert done is not None
                released = truth.Span(done[0], done[2])
            except psycopg.Error:
                released = truth.Span(proven, time.time())
                self._record(truth.Hold(endpoint.target, endpoint.database, triple, truth.EXCLUSIVE, holder,
                                        granted, released))
                raise
            self._record(truth.Hold(endpoint.target, endpoint.database, triple, truth.EXCLUSIVE, holder, granted, released))


def module() -> SimpleNamespace:
    return SimpleNamespace(Endpoint=Endpoint, WorkloadSpec=WorkloadSpec, Workload=Workload)


def judge(record: truth.Truth, scrapes: list[Scrape], setups: dict[str, TargetSetup]) -> Verdict:
    """Counts, per target, the scrapes that said up 1: a check of every rule each, and no lie."""
    up = sum(1 for s in scrapes if s.text and parse(s.text).get(("pg_advisory_lock_exporter_up", ())) == 1)
    return Verdict(checks={rule: up for rule in range(1, 9)})
