"""Reading metric values out of snapshots and scrapes in tests."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from exporter.metrics import render
from exporter.snapshot import Snapshot


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
