"""Exposition: rendered once per change off the scrape path, gzip made with it, process figures
from prometheus_client's own collectors, TYPE lines as the metrics reference (docs/metrics.md) promises."""

from __future__ import annotations

import gc

import gzip
import math
import random
import re
import sys
import threading
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporter import __version__
from exporter.exposition import Exposition, FleetExposition, Gzipper, Renderer
from exporter.format import bound
from exporter.format import value as format_value
from exporter.metrics import render, render_parts
from exporter.pieces import FamilyTexts
from exporter.shards import Shard
from exporter.snapshot import (
    ConsoleStatus, Holder, KeyCollision, LockState, PollStats, ProbeResult, ReloadStatus, Snapshot, UnnamedLocks,
)
from tests.conftest import wait_until
from tests.metrics_util import full_exposition, parse, series, up

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


def test_every_series_of_a_full_snapshot_names_labels_and_values() -> None:
    app = 'we"ird\\name\nx'  # every character a label value must escape (a backslash before an n too)
    holder = Holder(7, 1.0, frozenset({"exclusive"}), app, "u", "10.0.0.1", "idle", 4.0, "42,7", "pgb")
    prepared = Holder(None, None, frozenset({"shared"}), "gid-1", "owner", "", "prepared", 5.0, "42,8", prepared_xid=701)
    snapshot = Snapshot(
        up=True,
        locks=(LockState("tenants", "app", 2, 1, 4.0, 3, 1.5, 7, 60.0, (holder, prepared), 3, "config", "(42, *)", 2, 1,
                         blocked_holders=1, blocked_holder_wait_seconds=2.5, last_acquired_at=8.0, expect_every=3600.0,
                         blocked_info=(holder,)),
               LockState("plain", "app", 0, 0, None, 0, 0.0, 0, source="preset")),
        unnamed=(UnnamedLocks("app", 2, 1, 2.0, 0.25, (holder._replace(key="77", modes=frozenset({"exclusive", "shared"})),
                                                     prepared._replace(key="-78")), 30.0, 1,
                               blocked_holders=1, blocked_holder_wait_seconds=0.75),
                 UnnamedLocks("other", 0, 1, None, 0.5)),
        collisions=(KeyCollision("a", "b", "app"),),
        consoles=(ConsoleStatus("pgb", "127.0.0.1:6432", True, 0.004), ConsoleStatus("pgb", "127.0.0.1:6433", False, 1.5)),
        stats=PollStats(polls=5, errors=1, duration_buckets=((0.005, 2), (0.01, 4)), duration_sum=0.03,
                        last_success_timestamp=1700000000.5, holder_info_dropped=3, tracked_holds=12,
                        tracked_holds_dropped=2, interval=15.0, db_time_ratio=0.004),
        taken_at=10.0, wall_at=1700000010.0,
    )
    probes = (ProbeResult("leader", "app", True, True, 0.01, 3, 1700000001.0),
              ProbeResult("failing", "app", None, False, 2.0, 4, 1700000002.0),
              ProbeResult("pooled", "app", False, True, 0.02, 0, 1700000003.0, trusted=False))
    text = render(snapshot, probes, ReloadStatus(False, 1699999999.0)).decode()

    def lock(name: str, **more: str) -> tuple[tuple[str, str], ...]:
        return tuple(sorted({"lock": name, "database": "app", **more}.items()))

    def of(**labels: str) -> tuple[tuple[str, str], ...]:
        return tuple(sorted(labels.items()))

    who = {"pid": "7", "application_name": app, "usename": "u", "client_addr": "10.0.0.1", "state": "idle", "pooler": "pgb"}
    gid = {"pid": "", "application_name": "gid-1", "usename": "owner", "client_addr": "", "state": "prepared", "pooler": ""}
    p = "pg_advisory_lock_"
    assert parse(text) == {
        (p + "holders", lock("tenants", mode="exclusive")): 2, (p + "holders", lock("tenants", mode="shared")): 1,
        (p + "holders", lock("plain", mode="exclusive")): 0, (p + "holders", lock("plain", mode="shared")): 0,
        (p + "waiters", lock("tenants")): 3, (p + "waiters", lock("plain")): 0,
        (p + "held_seconds", lock("tenants")): 6.0, (p + "held_seconds", lock("plain")): 0,
        (p + "wait_seconds", lock("tenants")): 1.5, (p + "wait_seconds", lock("plain")): 0,
        (p + "acquisitions_total", lock("tenants")): 7, (p + "acquisitions_total", lock("plain")): 0,
        (p + "holder_info", lock("tenants", key="42,7", source="config", **who)): 1,
        (p + "holder_info", lock("tenants", key="42,8", source="config", **gid)): 1,
        (p + "pooled_session_holders", lock("tenants")): 1,
        (p + "keys_held", lock("tenants")): 2,
        (p + "max_hold_seconds", lock("tenants")): 60,
        (p + "blocked_holders", lock("tenants")): 1, (p + "blocked_holders", lock("plain")): 0,
        (p + "blocked_holder_wait_seconds", lock("tenants")): 2.5, (p + "blocked_holder_wait_seconds", lock("plain")): 0,
        # The blocked holder itself, labelled as holder_info is (no source: the lock's own series say it).
        (p + "blocked_holder_info", lock("tenants", key="42,7", **who)): 1,
        # The poller's clock (taken_at 10 is wall 1700000010): last taken at 8, and "plain" watched since 0.
        (p + "last_acquired_timestamp_seconds", lock("tenants")): 1700000008,
        (p + "last_acquired_timestamp_seconds", lock("plain")): 1700000000,
        (p + "expect_every_seconds", lock("tenants")): 3600,
        (p + "unnamed_holders", of(database="app")): 2, (p + "unnamed_holders", of(database="other")): 0,
        (p + "unnamed_waiters", of(database="app")): 1, (p + "unnamed_waiters", of(database="other")): 1,
        (p + "unnamed_held_seconds", of(database="app")): 8.0, (p + "unnamed_held_seconds", of(database="other")): 0,
        (p + "unnamed_wait_seconds", of(database="app")): 0.25, (p + "unnamed_wait_seconds", of(database="other")): 0.5,
        (p + "unnamed_holder_info", of(database="app", key="77", mode="exclusive", **who)): 1,
        (p + "unnamed_holder_info", of(database="app", key="-78", mode="shared", **gid)): 1,
        (p + "unnamed_pooled_session_holders", of(database="app")): 1,
        (p + "unnamed_max_hold_seconds", of(database="app")): 30,
        (p + "unnamed_blocked_holders", of(database="app")): 1, (p + "unnamed_blocked_holders", of(database="other")): 0,
        (p + "unnamed_blocked_holder_wait_seconds", of(database="app")): 0.75,
        (p + "unnamed_blocked_holder_wait_seconds", of(database="other")): 0,
        (p + "key_collision", of(lock="a", database="app", colliding_lock="b")): 1,
        (p + "pooler_up", of(pooler="pgb", address="127.0.0.1:6432")): 1,
        (p + "pooler_up", of(pooler="pgb", address="127.0.0.1:6433")): 0,
        (p + "pooler_read_duration_seconds", of(pooler="pgb", address="127.0.0.1:6432")): 0.004,
        (p + "pooler_read_duration_seconds", of(pooler="pgb", address="127.0.0.1:6433")): 1.5,
        # A failed try has no acquirable; an untrusted one neither acquirable nor ok.
        (p + "probe_acquirable", lock("leader")): 1,
        (p + "probe_ok", lock("leader")): 1, (p + "probe_ok", lock("failing")): 0,
        (p + "probe_trusted", lock("leader")): 1, (p + "probe_trusted", lock("failing")): 1,
        (p + "probe_trusted", lock("pooled")): 0,
        (p + "probe_duration_seconds", lock("leader")): 0.01, (p + "probe_duration_seconds", lock("failing")): 2,
        (p + "probe_duration_seconds", lock("pooled")): 0.02,
        (p + "probe_errors_total", lock("leader")): 3, (p + "probe_errors_total", lock("failing")): 4,
        (p + "probe_errors_total", lock("pooled")): 0,
        (p + "probe_last_run_timestamp_seconds", lock("leader")): 1700000001,
        (p + "probe_last_run_timestamp_seconds", lock("failing")): 1700000002,
        (p + "probe_last_run_timestamp_seconds", lock("pooled")): 1700000003,
        (p + "exporter_up", ()): 1,
        (p + "exporter_poll_duration_seconds_bucket", of(le="0.005")): 2,
        (p + "exporter_poll_duration_seconds_bucket", of(le="0.01")): 4,
        (p + "exporter_poll_duration_seconds_bucket", of(le="+Inf")): 5,
        (p + "exporter_poll_duration_seconds_count", ()): 5, (p + "exporter_poll_duration_seconds_sum", ()): 0.03,
        (p + "exporter_poll_errors_total", ()): 1,
        (p + "exporter_holder_info_dropped_total", ()): 3,
        (p + "exporter_tracked_holds", ()): 12, (p + "exporter_tracked_holds_dropped_total", ()): 2,
        (p + "exporter_poll_interval_seconds", ()): 15, (p + "exporter_db_time_ratio", ()): 0.004,
        (p + "exporter_last_poll_timestamp_seconds", ()): 1700000000.5,
        (p + "exporter_build_info", of(version=__version__)): 1,
        (p + "exporter_config_last_reload_successful", ()): 0,
        (p + "exporter_config_last_reload_success_timestamp_seconds", ()): 1699999999,
    }
    # Every sample under the HELP and TYPE of its own family.
    gauges = ("holders", "waiters", "held_seconds", "wait_seconds", "holder_info", "pooled_session_holders",
              "keys_held", "max_hold_seconds", "blocked_holders", "blocked_holder_wait_seconds", "blocked_holder_info",
              "last_acquired_timestamp_seconds", "expect_every_seconds", "unnamed_blocked_holders",
              "unnamed_blocked_holder_wait_seconds", "exporter_db_time_ratio", "pooled_session_release_seconds",
              "unnamed_holders", "unnamed_waiters", "unnamed_held_seconds",
              "unnamed_wait_seconds", "unnamed_holder_info", "unnamed_pooled_session_holders",
              "unnamed_max_hold_seconds", "key_collision", "pooler_up", "pooler_read_duration_seconds",
              "probe_acquirable", "probe_ok", "probe_trusted", "probe_duration_seconds",
              "probe_last_run_timestamp_seconds", "exporter_up", "exporter_tracked_holds",
              "exporter_poll_interval_seconds", "exporter_last_poll_timestamp_seconds", "exporter_build_info",
              "exporter_config_last_reload_successful", "exporter_config_last_reload_success_timestamp_seconds")
    counters = ("acquisitions", "probe_errors", "exporter_poll_errors", "exporter_holder_info_dropped",
                "exporter_tracked_holds_dropped")
    assert families(text) == {**{p + name: "gauge" for name in gauges}, **{p + name: "counter" for name in counters},
                              p + "exporter_poll_duration_seconds": "histogram"}


def test_an_up_snapshot_with_nothing_configured_and_no_timestamps_yet() -> None:
    text = render(Snapshot(up=True)).decode()
    assert parse(text) == {
        ("pg_advisory_lock_exporter_up", ()): 1, ("pg_advisory_lock_exporter_poll_duration_seconds_bucket", (("le", "+Inf"),)): 0,
        ("pg_advisory_lock_exporter_poll_duration_seconds_count", ()): 0,
        ("pg_advisory_lock_exporter_poll_duration_seconds_sum", ()): 0,
        ("pg_advisory_lock_exporter_poll_errors_total", ()): 0, ("pg_advisory_lock_exporter_holder_info_dropped_total", ()): 0,
        ("pg_advisory_lock_exporter_tracked_holds", ()): 0, ("pg_advisory_lock_exporter_tracked_holds_dropped_total", ()): 0,
        ("pg_advisory_lock_exporter_poll_interval_seconds", ()): 0,
        ("pg_advisory_lock_exporter_db_time_ratio", ()): 0,
        ("pg_advisory_lock_exporter_build_info", (("version", __version__),)): 1,
        ("pg_advisory_lock_exporter_config_last_reload_successful", ()): 1,
    }


def test_before_the_first_poll_the_exporter_is_down_and_a_target_has_no_process_figures() -> None:
    exposition = Exposition(with_process=False)
    samples = parse(exposition.body().decode())
    assert samples[("pg_advisory_lock_exporter_up", ())] == 0
    assert not any(name.startswith(("process_", "python_")) for name, _ in samples)


def test_values_are_written_as_prometheus_reads_them() -> None:
    assert [format_value(v) for v in (3, 2**60, 2.0, -2.0, 0.25, 1e15, 1e-7)] == \
        ["3", "1152921504606846976", "2.0", "-2.0", "0.25", "1000000000000000.0", "1e-07"]  # Python's %s
    assert [format_value(v) for v in (math.inf, -math.inf, math.nan)] == ["+Inf", "-Inf", "NaN"]


def test_the_gzip_of_small_parts_around_a_big_one_says_the_same() -> None:
    gzipper = Gzipper()
    parts = ["# small one\n", "# two\n", "x" * 5000 + "\n", "# tail\n"]
    for _ in range(2):  # the second time from the kept deflate of the big part
        rendered = gzipper(parts)
        assert rendered.plain == "".join(parts).encode() and gzip.decompress(rendered.gzipped) == rendered.plain


def test_a_fleets_metrics_say_each_targets_health() -> None:
    fleet = FleetExposition()
    fleet.publish_target("b", Snapshot(up=False, stats=PollStats(polls=3, errors=2, duration_buckets=((0.01, 1),),
                                                                 duration_sum=5.5)))
    fleet.publish_target("a", SNAPSHOT)
    fleet.publish_target("gone", SNAPSHOT)
    fleet.forget_target("gone")
    fleet.publish_reload(ReloadStatus(False, 1699999999.0))
    fleet.publish_shard(Shard(2, 3), 2)
    fleet.render_now()
    text = fleet.body().decode()
    samples = parse(text)
    p = "pg_advisory_lock_exporter_"
    assert {k: v for k, v in samples.items() if k[0].startswith(p)} == {
        (p + "target_up", (("target", "a"),)): 1, (p + "target_up", (("target", "b"),)): 0,
        (p + "target_poll_duration_seconds_bucket", (("le", "0.005"), ("target", "a"))): 1,
        (p + "target_poll_duration_seconds_bucket", (("le", "0.01"), ("target", "a"))): 2,
        (p + "target_poll_duration_seconds_bucket", (("le", "+Inf"), ("target", "a"))): 2,
        (p + "target_poll_duration_seconds_count", (("target", "a"),)): 2,
        (p + "target_poll_duration_seconds_sum", (("target", "a"),)): 0.2,
        (p + "target_poll_duration_seconds_bucket", (("le", "0.01"), ("target", "b"))): 1,
        (p + "target_poll_duration_seconds_bucket", (("le", "+Inf"), ("target", "b"))): 3,
        (p + "target_poll_duration_seconds_count", (("target", "b"),)): 3,
        (p + "target_poll_duration_seconds_sum", (("target", "b"),)): 5.5,
        (p + "target_poll_errors_total", (("target", "a"),)): 1, (p + "target_poll_errors_total", (("target", "b"),)): 2,
        (p + "build_info", (("version", __version__),)): 1,
        (p + "config_last_reload_successful", ()): 0,
        (p + "config_last_reload_success_timestamp_seconds", ()): 1699999999,
        (p + "shard_ordinal", (("shard_ordinal", "2"),)): 1, (p + "total_shards", ()): 3, (p + "targets", ()): 2,
    }
    kinds = families(text)
    assert (kinds[p + "target_up"], kinds[p + "target_poll_duration_seconds"], kinds[p + "target_poll_errors"]) == \
        ("gauge", "histogram", "counter")
    assert "process_cpu_seconds" in kinds  # the exporter's own process figures are the fleet's /metrics


def test_the_watchdogs_replacement_loses_to_a_poll_published_meanwhile() -> None:
    exposition = Exposition(SNAPSHOT, with_process=False)
    stuck = Snapshot(up=False)
    assert exposition.publish_instead_of(SNAPSHOT, stuck) and exposition.snapshot is stuck
    assert not exposition.publish_instead_of(SNAPSHOT, Snapshot(up=False)) and exposition.snapshot is stuck
    exposition.publish_probes((ProbeResult("leader", "app", True, True, 0.01, 0, 1.0),))
    exposition.render_now()
    samples = parse(exposition.body().decode())
    assert samples[("pg_advisory_lock_exporter_up", ())] == 0
    assert samples[("pg_advisory_lock_probe_acquirable", (("database", "app"), ("lock", "leader")))] == 1


def test_freed_memory_is_given_back_where_the_c_library_can() -> None:
    # glibc (this machine, the image): malloc_trim is found and runs; elsewhere it is a no-op.
    from exporter import memory

    assert memory._TRIM is not None
    big = [list(range(300)) for _ in range(3000)]
    del big
    memory.give_back_freed_memory()


def test_cyclic_garbage_of_the_oldest_generation_is_collected_after_a_rendering() -> None:
    # Like a failed call's error: a cycle alive through the young passes (so promoted to the
    # oldest generation), unreachable once it ends; the automatic passes may not visit it for long.
    import weakref

    from exporter import memory

    class Failure(Exception):
        pass

    def failed_call() -> Failure:
        try:
            raise Failure("connect timed out")
        except Failure as exc:
            exc.me = exc  # type: ignore[attr-defined]  # a cycle, as error -> traceback -> frame -> error
            return exc

    error = failed_call()
    gone = weakref.ref(error)
    gc.collect()  # alive: promoted to the oldest generation
    del error
    if sys.version_info < (3, 13):  # 3.13's incremental collector has other generations
        gc.collect(1)  # the young passes do not free it
        assert gone() is not None
    times = iter([100.0, 100.003, 101.0, 105.0, 105.001])
    collected: list[int] = []
    freed = memory.FreedMemory(clock=lambda: next(times), collect=lambda: collected.append(gc.collect()), trim=None)
    freed.give_back()  # at 100: the first pass
    assert gone() is None and len(collected) == 1
    freed.give_back()  # at 101: not due (every 5 s)
    assert len(collected) == 1
    freed.give_back()  # at 105: due
    assert len(collected) == 2


def test_the_renderers_call_collects_the_oldest_generations_cycles() -> None:
    # What the renderer calls (give_back_freed_memory, one instance for every renderer thread),
    # not a FreedMemory made here: a pass it never ran would leave the cycle.
    import weakref

    from exporter import memory

    class Node:
        pass

    node = Node()
    node.me = node  # type: ignore[attr-defined]
    gone = weakref.ref(node)
    gc.collect()  # alive: the oldest generation
    del node
    memory._FREED._due = -math.inf  # due now, whatever an earlier rendering in this process did
    memory.give_back_freed_memory()
    assert gone() is None


def test_a_renderer_that_never_catches_up_still_gives_memory_back(monkeypatch) -> None:
    """The full passes come only after renderings now (the interpreter's are taken over): a renderer
    with always more to render (thousands of targets on a starved CPU) still gives back, at least
    every GIVE_BACK_SECONDS, not only once it is idle."""
    from exporter import exposition as exposition_module

    given: list[int] = []
    monkeypatch.setattr(exposition_module, "give_back_freed_memory", lambda: given.append(1))
    monkeypatch.setattr(Renderer, "GIVE_BACK_SECONDS", 0.0)
    renderer = Renderer()
    renderings = threading.Semaphore(0)

    class Busy:
        """Changed again by every rendering of it: the renderer is never idle."""

        def render_now(self) -> None:
            renderer.changed(self)
            renderings.release()

    renderer.changed(Busy())
    try:
        for _ in range(20):
            assert renderings.acquire(timeout=10)
    finally:
        renderer.stop()
    assert len(given) >= 10


def test_two_renderers_at_once_make_one_pass() -> None:
    import threading

    from exporter import memory

    inside, release = threading.Event(), threading.Event()
    passes: list[int] = []

    def slow_pass() -> None:
        passes.append(1)
        inside.set()
        release.wait(5)

    freed = memory.FreedMemory(collect=slow_pass, trim=None)
    first = threading.Thread(target=freed.give_back)
    first.start()
    assert inside.wait(5)
    freed.give_back()  # the other renderer: a pass is running, it does not wait for it nor run one
    release.set()
    first.join(5)
    freed.give_back()  # not due again yet
    assert passes == [1]


def test_a_slow_full_pass_is_run_more_rarely() -> None:
    from exporter import memory

    times = iter([0.0, 0.1, 50.0, 100.0, 100.1])  # a pass of 100 ms: the next one 100 s later (0.1%)
    passes: list[float] = []
    freed = memory.FreedMemory(clock=lambda: next(times), collect=lambda: passes.append(1), trim=None)
    freed.give_back()
    freed.give_back()  # at 50: not due
    freed.give_back()  # at 100: due
    assert len(passes) == 2


def test_garbage_piling_up_between_full_passes_brings_the_next_one_forward() -> None:
    """Paced by the share alone, a pass's length sets the wait before the next, and the garbage of
    that wait lengthens the next pass: every target failing (a failed connect's cyclic garbage)
    grew the heap for as long as the last pass x 1,000. Simulated: a heap of 2,000,000 blocks, a
    pass costing 0.2 µs a block (0.4 s: the thousand-target point's), garbage arriving at 6,000
    blocks a second (100 targets refused every second), a rendering every second for two hours."""
    from exporter import memory

    alive, garbage, now = 2_000_000, [0], [0.0]

    def collect() -> None:
        now[0] += 2e-7 * (alive + garbage[0])
        garbage[0] = 0

    freed = memory.FreedMemory(clock=lambda: now[0], collect=collect, trim=None, blocks=lambda: alive + garbage[0])
    most = 0
    for second in range(7200):
        now[0] = float(second)
        garbage[0] += 6_000
        freed.give_back()
        most = max(most, garbage[0])
    # At most a quarter of the heap's blocks piles up (and what one more second brings).
    assert most <= alive * memory.FULL_PASS_GROWTH + 6_000, most


# Objects kept alive through many young collections: the interpreter's rule starts a full pass of
# its own once a quarter as many again reach the oldest generation. Prints how many full passes ran.
_CHURN = """
import gc, sys
from exporter import memory
if sys.argv[1] == "taken-over":
    memory.take_over_full_passes()
full = []
gc.callbacks.append(lambda phase, info: full.append(1) if phase == "stop" and info["generation"] == 2 else None)
kept = [[i] for i in range(300_000)]
print(len(full))
"""


@pytest.mark.parametrize("mode", ["taken-over", "the interpreter's"])
def test_full_passes_taken_over_come_only_from_freed_memory(mode: str) -> None:
    """At 1,000 targets the interpreter's own full passes took 467 ms each, every 18 s (bench): once
    taken over (at start, cli.serve), it starts none; FreedMemory's paced ones are the only ones."""
    import subprocess

    if mode != "taken-over" and sys.version_info >= (3, 14):
        pytest.skip("3.14's incremental collector starts no generation-2 pass of its own to take over")
    out = subprocess.run([sys.executable, "-c", _CHURN, mode], capture_output=True, text=True, timeout=60, check=True)
    passes = int(out.stdout)
    assert passes == 0 if mode == "taken-over" else passes >= 1, (mode, passes)


METRICS_PAGE = Path(__file__).parent.parent / "docs" / "metrics.md"


def _readme_metrics() -> dict[str, tuple[str, frozenset[str], str]]:
    """The metrics table the README links to, docs/metrics.md: family name -> (type, label names,
    meaning with its `code` marks dropped)."""
    table = {}
    for line in METRICS_PAGE.read_text().splitlines():
        cells = re.fullmatch(r"\| `(pg_advisory_lock_\w+)` \|(.*?)\|(.*?)\|(.*)\|", line)
        if cells:
            name, kind, names, meaning = (cell.strip() for cell in cells.groups())
            table[name] = (kind.removesuffix(" = 1"), frozenset(names.replace(",", " ").split()), meaning.replace("`", ""))
    return table


def test_every_family_is_what_the_metrics_reference_says_it_is_and_its_help_says_so_first() -> None:
    """A reader of the HELP line in Prometheus and a reader of the metrics reference learn the same:
    every family written (a single server's with every optional part, and a fleet's) is in the table
    with its type and labels, and the table's meaning begins with the HELP sentence (which may say
    less, never something else)."""
    text = full_exposition()
    readme = _readme_metrics()
    written = set()
    for family in text_string_to_metric_families(text):
        name = family.name + ("_total" if family.type == "counter" else "")
        written.add(name)
        assert name in readme, f"{name} is not in the table of docs/metrics.md"
        kind, names, meaning = readme[name]
        assert family.type == kind, name
        assert {label for sample in family.samples for label in sample.labels} - {"le"} == names, name
        help_text = family.documentation
        # A sentence: a capital, a number or the setting it is about first; a full stop last.
        assert help_text[0].isupper() or help_text[0].isdigit() or "_" in help_text.split()[0], help_text
        assert help_text.endswith("."), help_text
        assert meaning.startswith(help_text[0].lower() + help_text[1:-1]), f"{name}: HELP {help_text!r}, docs/metrics.md {meaning!r}"
    assert written == set(readme), "docs/metrics.md documents families the exporter never writes"


def test_an_unchanged_family_is_the_very_same_text_and_another_set_of_locks_is_written_anew() -> None:
    """FamilyTexts' contract: a per-lock family whose values did not change is the very same
    string (the gzip step then keeps its deflate); another set of locks is never written with the
    last set's text, even where every value is the same."""
    locks = tuple(LockState(f"l{n}", "app", n % 2, 0, None, 0, 0.0, n, expect_every=60.0) for n in range(150))
    texts = FamilyTexts()
    first = render_parts(Snapshot(up=True, locks=locks), texts=texts)
    again = render_parts(Snapshot(up=True, locks=locks), texts=texts)
    per_lock = [part for part in first if part.startswith("# HELP") and 'lock="l0"' in part]
    assert len(per_lock) == 9 and all(any(part is kept for kept in again) for part in per_lock)
    renamed = tuple(lock._replace(name=f"m{n}") for n, lock in enumerate(locks))
    text = "".join(render_parts(Snapshot(up=True, locks=renamed), texts=texts))
    assert {labels["lock"] for labels in series(text, "pg_advisory_lock_expect_every_seconds")} == \
        {f"m{n}" for n in range(150)}
    assert parse(text)[("pg_advisory_lock_acquisitions_total", (("database", "app"), ("lock", "m149")))] == 149


def test_a_poll_duration_buckets_le_label_is_the_one_always_written() -> None:
    # A bucket's series is its le label: 1 and 10, not 1.0 and 10.0 (the poller's bounds).
    buckets = tuple((upper, n) for n, upper in enumerate((0.005, 0.01, 0.025, 0.1, 0.25, 1.0, 2.5, 10.0)))
    text = render(Snapshot(up=True, stats=PollStats(polls=9, duration_buckets=buckets))).decode()
    assert [labels["le"] for labels in series(text, "pg_advisory_lock_exporter_poll_duration_seconds_bucket")] == \
        ["0.005", "0.01", "0.025", "0.1", "0.25", "1", "2.5", "10", "+Inf"]
    assert [bound(upper) for upper in (5, math.inf)] == ["5", "+Inf"]


def test_a_fleets_metrics_render_at_most_a_share_of_the_time_but_health_at_once() -> None:
    import time

    from exporter.exposition import Renderer
    from tests.conftest import wait_until

    now, cpu = [100.0], [0.0]
    fleet = FleetExposition(clock=lambda: now[0], cpu_clock=lambda: cpu[0])
    renders: list[float] = []
    original = fleet._render  # noqa: SLF001

    def timed():
        renders.append(now[0])
        now[0] += 0.03  # a rendering of 1,000 targets' figures: 30 ms
        cpu[0] += 0.03
        return original()

    fleet._render = timed  # type: ignore[method-assign]  # noqa: SLF001
    renderer = Renderer()
    fleet.start(renderer)
    try:
        wait_until(lambda: len(renders) == 1)
        up = Snapshot(up=True, stats=PollStats(polls=1))
        fleet.publish_target("a", up)  # a new target: at once
        wait_until(lambda: len(renders) == 2)
        fleet.publish_target("a", Snapshot(up=True, stats=PollStats(polls=2)))  # its counts: after the share
        time.sleep(0.1)
        assert len(renders) == 2 and fleet._deferred  # noqa: SLF001 - waits until 1.5 s after the last began
        fleet.publish_target("a", Snapshot(up=False, stats=PollStats(polls=3)))  # its health: at once
        wait_until(lambda: len(renders) == 3)
        assert parse(fleet.body().decode())[("pg_advisory_lock_exporter_target_up", (("target", "a"),))] == 0
    finally:
        fleet.stop()
        renderer.stop()


def test_a_renderer_that_could_not_start_its_thread_starts_it_at_the_next_change(monkeypatch) -> None:
    original = threading.Thread.start
    failed: list[str] = []

    def start(self: threading.Thread) -> None:
        if self.name == "render" and not failed:
            failed.append(self.name)
            raise RuntimeError("can't start new thread")  # out of threads
        original(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    renderer = Renderer()
    exposition = Exposition()
    try:
        exposition.start(renderer)
        assert failed
        exposition.publish(SNAPSHOT)
        wait_until(lambda: up(exposition.body().decode()) == 1, timeout=5)
    finally:
        renderer.stop()


@pytest.mark.parametrize(("wall", "cpu", "gap"), [
    (60.0, 0.01, 0.5),  # SIGSTOPped for a minute in the middle of a rendering of 10 ms of CPU
    (60.0, 30.0, 5.0),  # starved: never more than the cap (MAX_GAP_SECONDS)
])
def test_a_stalled_rendering_does_not_freeze_the_fleets_counts(wall, cpu, gap) -> None:
    """The next rendering waits for the last one's CPU time / RENDER_SHARE, at most MAX_GAP_SECONDS:
    a stop or CPU starvation during a rendering must not put the counts off fifty times as long
    (found by review: a 60 s SIGSTOP deferred them 2,940 s)."""
    now, used = [100.0], [0.0]
    fleet = FleetExposition(clock=lambda: now[0], cpu_clock=lambda: used[0])
    original = fleet._render  # noqa: SLF001

    def stalled():
        now[0] += wall
        used[0] += cpu
        return original()

    fleet._render = stalled  # type: ignore[method-assign]  # noqa: SLF001
    fleet.render_now()
    assert fleet._next_render == 100.0 + gap  # noqa: SLF001 - counted from when it began
