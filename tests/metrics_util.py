"""Reading metric values out of snapshots and scrapes in tests."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from exporter.metrics import render, render_fleet, shard_text
from exporter.pooled import Release
from exporter.shards import Shard
from exporter.snapshot import (ConsoleStatus, Holder, KeyCollision, LockState, PollStats, ProbeResult, ReloadStatus,
                               Snapshot, UnnamedLocks)


def value(snapshot: Snapshot, name: str, **labels: str) -> float | None:
    """One sample of the snapshot's exposition, read back with prometheus_client's parser."""
    return parse(render(snapshot).decode()).get((name, tuple(sorted(labels.items()))))


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Exposition text -> {(sample name, sorted labels): value}, via prometheus_client's parser."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def series(text: str, name: str) -> list[dict[str, str]]:
    """Label sets of every sample of one name."""
    return [dict(labels) for (n, labels) in parse(text) if n == name]


def up(text: str) -> float | None:
    """pg_advisory_lock_exporter_up of a scrape (a substring test would also match its HELP line)."""
    return parse(text).get(("pg_advisory_lock_exporter_up", ()))


def full_exposition() -> str:
    """Every family the exporter writes, each with every optional part: a single server's
    exposition (a lock with a holder, a blocked holder, an expectation, a pooled release; unnamed
    locks; a key collision; a console; a probe), a fleet's /metrics and a shard's figures. The
    metrics reference and the CHANGELOG are held to it."""
    holder = Holder(7, 1.0, frozenset({"shared"}), "app", "u", "10.0.0.1", "idle", 4.0, "42,7", "pgb")
    snapshot = Snapshot(
        up=True, locks=(LockState("tenants", "app", 1, 1, 4.0, 1, 1.5, 7, 60.0, (holder,), 3, "config", "(42, *)", 2, 1,
                                  blocked_holders=1, blocked_holder_wait_seconds=2.5, expect_every=3600.0,
                                  blocked_info=(holder,)),),
        unnamed=(UnnamedLocks("app", 2, 1, 2.0, 0.25, (holder,), 30.0, 1, 1, 0.75),),
        collisions=(KeyCollision("a", "b", "app"),), consoles=(ConsoleStatus("pgb", "127.0.0.1:6432", True, 0.004),),
        releases={("tenants", "app"): Release(30.0, "server_lifetime", 7)},
        stats=PollStats(polls=1, duration_buckets=((0.01, 1),), last_success_timestamp=1.0, last_success_round_trip=0.002),
        taken_at=10.0,
    )
    probes = (ProbeResult("leader", "app", True, True, 0.01, 0, 1.0),)
    return render(snapshot, probes, ReloadStatus(True, 1.0)).decode() + \
        render_fleet({"orders": snapshot}, ReloadStatus(True, 1.0)).decode() + shard_text(Shard(1, 4), 3)
