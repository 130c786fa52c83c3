"""Exposition: rendered once per change off the scrape path, gzip made with it, process figures
from prometheus_client's own collectors, TYPE lines as the README promises."""

from __future__ import annotations

import gzip
import random

from prometheus_client.parser import text_string_to_metric_families

from exporter.exposition import Exposition, Gzipper
from exporter.metrics import render
from exporter.snapshot import Holder, LockState, PollStats, ProbeResult, Snapshot, UnnamedLocks
from tests.metrics_util import parse

HOLDER = Holder(7, 1.0, frozenset({"exclusive", "shared"}), "app", "u", "10.0.0.1", "idle", 6.5, "42,7")
SNAPSHOT = Snapshot(
    up=True,
    locks=(LockState("tenants", "app", 1, 1, 6.5, 0, 0.0, 2, 60.0, (HOLDER,), 1, "config", "(42, *)", 1, None),),
    unnamed=(UnnamedLocks("app", 1, 0, 1.0, 0.0, (HOLDER._replace(key="5"),), 30.0),),
    stats=PollStats(polls=2, errors=1, duration_buckets=((0.005, 1), (0.01, 2)), duration_sum=0.2),
    taken_at=10.0,  # the lock held 3.5 s, the unnamed key 9 s
)


def families(text: str) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def test_a_scrape_returns_bytes_made_before_it_and_never_renders() -> None:
    exposition = Exposition()
    before = exposition.body()
    exposition.publish(SNAPSHOT)
    assert exposition.body() is before  # published, not yet rendered: the scrape does not render
    exposition.render_now()
    after = exposition.body()
    assert after is not before and exposition.body() is after  # the same bytes for every scrape
    samples = parse(after.decode())
    assert samples[("pg_advisory_lock_keys_held", (("database", "app"), ("lock", "tenants")))] == 1
    # Ages are the snapshot's time less the hold's start.
    assert samples[("pg_advisory_lock_held_seconds", (("database", "app"), ("lock", "tenants")))] == 3.5
    assert samples[("pg_advisory_lock_unnamed_held_seconds", (("database", "app"),))] == 9.0


def test_gzip_is_made_with_the_text_and_says_the_same() -> None:
    exposition = Exposition(SNAPSHOT)
    exposition.render_now()
    assert gzip.decompress(exposition.body(gzipped=True)) == exposition.body()
    assert len(exposition.body(gzipped=True)) < len(exposition.body())


def test_process_figures_come_from_prometheus_clients_collectors() -> None:
    exposition = Exposition(SNAPSHOT)
    exposition.render_now()
    kinds = families(exposition.body().decode())
    for name in ("process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds",
                 "process_start_time_seconds", "python_info", "python_gc_collections"):
        assert name in kinds, name


def test_counters_are_counters_and_the_histogram_counts_failed_polls() -> None:
    text = render(SNAPSHOT, (ProbeResult("leader", "app", True, True, 0.01, 3, 1.0),)).decode()
    kinds = families(text)
    for name in ("pg_advisory_lock_acquisitions", "pg_advisory_lock_exporter_poll_errors",
                 "pg_advisory_lock_probe_errors", "pg_advisory_lock_exporter_holder_info_dropped",
                 "pg_advisory_lock_exporter_tracked_holds_dropped"):
        assert kinds[name] == "counter", name
    assert kinds["pg_advisory_lock_exporter_poll_duration_seconds"] == "histogram"
    samples = parse(text)
    # Two polls, one of them failed: both are in the histogram.
    assert samples[("pg_advisory_lock_exporter_poll_duration_seconds_count", ())] == 2
    assert samples[("pg_advisory_lock_exporter_poll_duration_seconds_bucket", (("le", "+Inf"),))] == 2
    # A session holding a key in both modes is counted in both.
    lock = (("database", "app"), ("lock", "tenants"))
    assert samples[("pg_advisory_lock_holders", (*lock, ("mode", "exclusive")))] == 1
    assert samples[("pg_advisory_lock_holders", (*lock, ("mode", "shared")))] == 1


def test_while_polls_fail_no_lock_unnamed_or_collision_series_are_served() -> None:
    text = render(Snapshot(up=False, stats=PollStats(polls=1, errors=1))).decode()
    names = {name for name, _ in parse(text)}
    assert not any(n.startswith(("pg_advisory_lock_holders", "pg_advisory_lock_unnamed", "pg_advisory_lock_key_collision"))
                   for n in names)
    assert parse(text)[("pg_advisory_lock_exporter_up", ())] == 0


def test_every_per_lock_family_survives_a_percent_sign_and_changes_only_where_values_change() -> None:
    locks = tuple(LockState(f"{n}% done", "app", n % 2, 0, None if n % 2 == 0 else 5.0, 0, 0.0, n, None)
                  for n in range(250))
    exposition = Exposition(Snapshot(up=True, locks=locks, taken_at=10.0))
    exposition.render_now()
    first = parse(exposition.body().decode())
    assert first[("pg_advisory_lock_held_seconds", (("database", "app"), ("lock", "7% done")))] == 5.0
    assert first[("pg_advisory_lock_acquisitions_total", (("database", "app"), ("lock", "249% done")))] == 249
    # One lock changes (in the third piece of 100): the re-rendering says so, and the rest stays.
    changed = locks[:220] + (locks[220]._replace(exclusive=3),) + locks[221:]
    exposition.publish(Snapshot(up=True, locks=changed, taken_at=12.0))
    exposition.render_now()
    second = parse(exposition.body().decode())
    assert gzip.decompress(exposition.body(gzipped=True)) == exposition.body()
    assert second[("pg_advisory_lock_holders", (("database", "app"), ("lock", "220% done"), ("mode", "exclusive")))] == 3
    assert second[("pg_advisory_lock_held_seconds", (("database", "app"), ("lock", "7% done")))] == 7.0
    assert {k: v for k, v in second.items() if "holders" in k[0] and k[1][1][1] != "220% done"} == \
        {k: v for k, v in first.items() if "holders" in k[0] and k[1][1][1] != "220% done"}


def test_the_gzip_of_parts_that_change_some_at_a_time_is_always_the_text() -> None:
    # The deflates, bytes and checksums kept from the last rendering must never leak into the next:
    # parts kept (the very same strings), replaced, equal but new, added, dropped, small and big.
    rng = random.Random(7)
    gzipper = Gzipper()
    parts = [f"family_{n} " * rng.choice((3, 900)) + "\n" for n in range(8)]
    for _ in range(60):
        step = rng.randrange(5)
        if step == 0:
            parts[rng.randrange(len(parts))] = f"changed {rng.random()}\n" * rng.choice((2, 800))
        elif step == 1:
            parts = [p if rng.random() < 0.5 else "".join(list(p)) for p in parts]  # equal text, other strings
        elif step == 2:
            parts.insert(rng.randrange(len(parts) + 1), f"new {rng.random()}\n" * rng.choice((1, 700)))
        elif step == 3 and len(parts) > 1:
            parts.pop(rng.randrange(len(parts)))
        rendered = gzipper(list(parts))
        assert rendered.plain == "".join(parts).encode()
        assert gzip.decompress(rendered.gzipped) == rendered.plain  # gzip checks the CRC-32 and length
    empty = gzipper([])
    assert empty.plain == b"" and gzip.decompress(empty.gzipped) == b""
