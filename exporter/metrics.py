"""Snapshot -> exposition text: families built fresh from each snapshot, rendered once."""

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
from .snapshot import MODE_EXCLUSIVE, MODE_SHARED, Snapshot

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
    yield from (holders, waiters, held, wait, acquisitions, info)

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


class _SnapshotCollector:
    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        if self._snapshot.up:
            yield from _lock_families(self._snapshot)
        yield from _exporter_families(self._snapshot)


def registry_for(snapshot: Snapshot) -> CollectorRegistry:
    """A private registry exposing one snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snapshot))  # type: ignore[arg-type]
    return registry


def render(snapshot: Snapshot) -> bytes:
    """The text exposition of one snapshot."""
    return generate_latest(registry_for(snapshot))


class Exposition:
    """The latest snapshot and its rendering, made at most once per snapshot, on first scrape."""

    def __init__(self, snapshot: Snapshot | None = None) -> None:
        self._lock = threading.Lock()
        self._snapshot = snapshot or Snapshot(up=False)
        self._body: bytes | None = None

    def publish(self, snapshot: Snapshot) -> None:
        with self._lock:
            self._snapshot, self._body = snapshot, None

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def body(self) -> bytes:
        with self._lock:
            if self._body is None:
                self._body = render(self._snapshot)
            return self._body
