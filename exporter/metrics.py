"""Snapshot + ProbeResults -> exposition text: families built fresh, rendered once per change."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from . import __version__
from .snapshot import MODE_EXCLUSIVE, MODE_SHARED, ProbeResult, Snapshot

PREFIX = "pg_advisory_lock"
LOCK_LABELS = ["lock", "database"]
HOLDER_LABELS = ["lock", "database", "pid", "application_name", "usename", "client_addr", "state"]


def _lock_families(snapshot: Snapshot) -> Iterator[Metric]:
    holders = GaugeMetricFamily(f"{PREFIX}_holders", "Sessions holding the lock now, by mode.", labels=[*LOCK_LABELS, "mode"])
    waiters = GaugeMetricFamily(f"{PREFIX}_waiters", "Sessions waiting for the lock now.", labels=LOCK_LABELS)
    held = GaugeMetricFamily(
        f"{PREFIX}_held_seconds",
        "How long the longest current holder has held the lock (a proven lower bound); 0 when free.",
        labels=LOCK_LABELS,
    )
    wait = GaugeMetricFamily(f"{PREFIX}_wait_seconds", "The longest current wait for the lock; 0 when none.", labels=LOCK_LABELS)
    acquisitions = CounterMetricFamily(
        f"{PREFIX}_acquisitions", "New holders observed since the exporter started.", labels=LOCK_LABELS
    )
    info = GaugeMetricFamily(f"{PREFIX}_holder_info", "One series per current holder of the lock.", labels=HOLDER_LABELS)
    max_hold = GaugeMetricFamily(
        f"{PREFIX}_max_hold_seconds", "max_hold from the config: the longest a holder should hold the lock.", labels=LOCK_LABELS
    )
    for lock in snapshot.locks:
        ids = [lock.name, lock.database]
        holders.add_metric([*ids, MODE_EXCLUSIVE], lock.holders_in(MODE_EXCLUSIVE))
        holders.add_metric([*ids, MODE_SHARED], lock.holders_in(MODE_SHARED))
        waiters.add_metric(ids, lock.waiters)
        held.add_metric(ids, lock.held_seconds)
        wait.add_metric(ids, lock.wait_seconds)
        acquisitions.add_metric(ids, lock.acquisitions)
        for h in lock.holders:
            info.add_metric([*ids, str(h.pid), h.application_name, h.usename, h.client_addr, h.state], 1)
        if lock.max_hold is not None:
            max_hold.add_metric(ids, lock.max_hold)
    yield from (holders, waiters, held, wait, acquisitions, info, max_hold)

    unnamed_holders = GaugeMetricFamily(
        f"{PREFIX}_unnamed_holders", "Advisory locks held on keys no configured name matches.", labels=["database"]
    )
    unnamed_waiters = GaugeMetricFamily(
        f"{PREFIX}_unnamed_waiters", "Waits for advisory locks on keys no configured name matches.", labels=["database"]
    )
    for u in snapshot.unnamed:
        unnamed_holders.add_metric([u.database], u.holders)
        unnamed_waiters.add_metric([u.database], u.waiters)
    yield from (unnamed_holders, unnamed_waiters)

    collision = GaugeMetricFamily(
        f"{PREFIX}_key_collision",
        "1 for each pair of configured names that resolve to the same lock.",
        labels=["lock", "database", "colliding_lock"],
    )
    for c in snapshot.collisions:
        collision.add_metric([c.lock, c.database, c.other], 1)
    yield collision


def _exporter_families(snapshot: Snapshot) -> Iterator[Metric]:
    stats = snapshot.stats
    yield GaugeMetricFamily(f"{PREFIX}_exporter_up", "1 if the last poll succeeded.", value=int(snapshot.up))
    yield HistogramMetricFamily(
        f"{PREFIX}_exporter_poll_duration_seconds",
        "Time of each poll.",
        buckets=[(repr(bound), count) for bound, count in stats.duration_buckets] + [("+Inf", stats.polls)],
        sum_value=stats.duration_sum,
    )
    yield CounterMetricFamily(f"{PREFIX}_exporter_poll_errors", "Failed polls.", value=stats.errors)
    if stats.last_success_timestamp is not None:
        yield GaugeMetricFamily(
            f"{PREFIX}_exporter_last_poll_timestamp_seconds",
            "End of the last successful poll, in seconds since the epoch.",
            value=stats.last_success_timestamp,
        )
    build = GaugeMetricFamily(f"{PREFIX}_exporter_build_info", "The exporter's version.", labels=["version"])
    build.add_metric([__version__], 1)
    yield build


def _probe_families(probes: tuple[ProbeResult, ...]) -> Iterator[Metric]:
    acquirable = GaugeMetricFamily(f"{PREFIX}_probe_acquirable", "1 if the last try got the lock.", labels=LOCK_LABELS)
    ok = GaugeMetricFamily(
        f"{PREFIX}_probe_ok", "1 if the last try matched the configured expectation (any: the try ran).", labels=LOCK_LABELS
    )
    duration = GaugeMetricFamily(f"{PREFIX}_probe_duration_seconds", "Duration of the last try.", labels=LOCK_LABELS)
    errors = CounterMetricFamily(f"{PREFIX}_probe_errors", "Tries that failed (timeout, connection).", labels=LOCK_LABELS)
    last_run = GaugeMetricFamily(
        f"{PREFIX}_probe_last_run_timestamp_seconds", "When the lock was last tried, in seconds since the epoch.", labels=LOCK_LABELS
    )
    for p in probes:
        ids = [p.lock, p.database]
        if p.acquirable is not None:
            acquirable.add_metric(ids, int(p.acquirable))
        ok.add_metric(ids, int(p.ok))
        duration.add_metric(ids, p.duration)
        errors.add_metric(ids, p.errors)
        last_run.add_metric(ids, p.last_run)
    yield from (acquirable, ok, duration, errors, last_run)


class _SnapshotCollector:
    def __init__(self, snapshot: Snapshot, probes: tuple[ProbeResult, ...]) -> None:
        self._snapshot = snapshot
        self._probes = probes

    def collect(self) -> Iterator[Metric]:
        if self._snapshot.up:
            yield from _lock_families(self._snapshot)
        if self._probes:
            yield from _probe_families(self._probes)
        yield from _exporter_families(self._snapshot)


def registry_for(snapshot: Snapshot, probes: tuple[ProbeResult, ...] = ()) -> CollectorRegistry:
    """A private registry exposing one snapshot and the latest probe results."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snapshot, probes))  # type: ignore[arg-type]
    return registry


def render(snapshot: Snapshot, probes: tuple[ProbeResult, ...] = ()) -> bytes:
    """The text exposition of one snapshot and the latest probe results."""
    return generate_latest(registry_for(snapshot, probes))


class Exposition:
    """The latest snapshot and its rendering, made at most once per snapshot, on first scrape."""

    def __init__(self, snapshot: Snapshot | None = None) -> None:
        self._lock = threading.Lock()
        self._snapshot = snapshot or Snapshot(up=False)
        self._probes: tuple[ProbeResult, ...] = ()
        self._body: bytes | None = None

    def publish(self, snapshot: Snapshot) -> None:
        with self._lock:
            self._snapshot, self._body = snapshot, None

    def publish_probes(self, probes: tuple[ProbeResult, ...]) -> None:
        with self._lock:
            self._probes, self._body = probes, None

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def body(self) -> bytes:
        with self._lock:
            if self._body is None:
                self._body = render(self._snapshot, self._probes)
            return self._body
