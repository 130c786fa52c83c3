"""Key families and unnamed ages against a real server: a key space named once, every lock aged."""

from __future__ import annotations

import threading

from exporter.metrics import render
from tests.conftest import wait_until, waiting_pids
from tests.metrics_util import parse, series, value

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
FAMILIES = [
    {"name": "tenants", "key": {"namespace": 42}, "max_hold": "1m"},
    {"name": "accounts", "key": {"range": [-1000, -1]}},
    {"name": "low-edge", "key": {"range": [INT64_MIN, INT64_MIN + 1]}},
    {"name": "high-edge", "key": {"range": [INT64_MAX - 1, INT64_MAX]}},
    {"name": "tenant-7", "key": [42, 7]},  # a single key inside the tenants family
]


def ids(name: str) -> dict[str, str]:
    return {"lock": name, "database": "postgres"}


def test_a_namespace_family_counts_sessions_keys_modes_and_waiters(make_poller, sessions, server) -> None:
    a = sessions.open(application_name="worker-a")
    a.execute("SELECT pg_advisory_lock(42, 1), pg_advisory_lock(42, 2), pg_advisory_lock_shared(42, 3)")
    b = sessions.open(application_name="worker-b")
    b.execute("SELECT pg_advisory_lock_shared(42, 3), pg_advisory_lock(42, -5)")
    waiter = sessions.open(application_name="worker-c")
    thread = threading.Thread(target=lambda: waiter.execute("SELECT pg_advisory_lock(42, 1)"), daemon=True)
    thread.start()
    wait_until(lambda: waiter.info.backend_pid in waiting_pids(server))
    snap = make_poller({"locks": FAMILIES}).poll_once()
    assert value(snap, "pg_advisory_lock_holders", **ids("tenants"), mode="exclusive") == 3
    assert value(snap, "pg_advisory_lock_holders", **ids("tenants"), mode="shared") == 2
    assert value(snap, "pg_advisory_lock_keys_held", **ids("tenants")) == 4
    assert value(snap, "pg_advisory_lock_waiters", **ids("tenants")) == 1
    assert value(snap, "pg_advisory_lock_wait_seconds", **ids("tenants")) >= 0
    assert value(snap, "pg_advisory_lock_max_hold_seconds", **ids("tenants")) == 60
    info = {(h["key"], h["pid"], h["application_name"]) for h in series(render(snap).decode(), "pg_advisory_lock_holder_info")
            if h["lock"] == "tenants"}
    pa, pb = str(a.info.backend_pid), str(b.info.backend_pid)
    assert info == {("42,1", pa, "worker-a"), ("42,2", pa, "worker-a"), ("42,3", pa, "worker-a"),
                    ("42,3", pb, "worker-b"), ("42,-5", pb, "worker-b")}
    assert value(snap, "pg_advisory_lock_unnamed_holders", database="postgres") is None
    # keys_held and the other family series exist for families only.
    assert value(snap, "pg_advisory_lock_keys_held", **ids("tenant-7")) is None
    assert value(snap, "pg_advisory_lock_keys_held", **ids("accounts")) == 0
    a.execute("SELECT pg_advisory_unlock_all()")
    thread.join(5)


def test_a_single_key_inside_a_family_is_reported_under_its_own_name(make_poller, sessions) -> None:
    sessions.open().execute("SELECT pg_advisory_lock(42, 7), pg_advisory_lock(42, 8)")
    snap = make_poller({"locks": FAMILIES}).poll_once()
    assert value(snap, "pg_advisory_lock_holders", **ids("tenant-7"), mode="exclusive") == 1
    assert value(snap, "pg_advisory_lock_holders", **ids("tenants"), mode="exclusive") == 1
    assert value(snap, "pg_advisory_lock_keys_held", **ids("tenants")) == 1
    keys = {h["lock"]: h["key"] for h in series(render(snap).decode(), "pg_advisory_lock_holder_info")}
    assert keys == {"tenant-7": "42,7", "tenants": "42,8"}


def test_bigint_ranges_with_negative_bounds_and_the_int64_edges(make_poller, sessions) -> None:
    inside = [-1000, -1, INT64_MIN, INT64_MIN + 1, INT64_MAX - 1, INT64_MAX]
    outside = [-1001, 0, INT64_MIN + 2, INT64_MAX - 2]
    conn = sessions.open()
    conn.execute("SELECT count(pg_advisory_lock(k)) FROM unnest(%s::int8[]) AS k", [inside + outside])
    # The int4 pair (-1, -1) has the same bits as bigint -1: it is not in a bigint range.
    conn.execute("SELECT pg_advisory_lock(-1, -1)")
    snap = make_poller({"locks": FAMILIES}).poll_once()
    assert value(snap, "pg_advisory_lock_keys_held", **ids("accounts")) == 2
    assert value(snap, "pg_advisory_lock_keys_held", **ids("low-edge")) == 2
    assert value(snap, "pg_advisory_lock_keys_held", **ids("high-edge")) == 2
    assert value(snap, "pg_advisory_lock_unnamed_holders", database="postgres") == 5
    unnamed = {h["key"] for h in series(render(snap).decode(), "pg_advisory_lock_unnamed_holder_info")}
    assert unnamed == {"-1001", "0", str(INT64_MIN + 2), str(INT64_MAX - 2), "-1,-1"}


def test_a_familys_age_is_its_oldest_hold_and_drops_when_that_one_ends(make_poller, sessions) -> None:
    now = [1000.0]
    poller = make_poller({"locks": FAMILIES}, clock=lambda: now[0])
    poller.poll_once()
    first = sessions.open()
    first.execute("SELECT pg_advisory_lock(42, 1), pg_sleep(0)")  # active at the call: nothing proven earlier
    poller.poll_once()
    now[0] += 100.0
    second = sessions.open()
    second.execute("SELECT pg_advisory_lock(42, 2)")
    poller.poll_once()
    now[0] += 10.0
    snap = poller.poll_once()
    assert 110.0 <= value(snap, "pg_advisory_lock_held_seconds", **ids("tenants")) < 111.0
    assert value(snap, "pg_advisory_lock_acquisitions_total", **ids("tenants")) == 2
    first.execute("SELECT pg_advisory_unlock(42, 1)")
    snap = poller.poll_once()
    assert 10.0 <= value(snap, "pg_advisory_lock_held_seconds", **ids("tenants")) < 11.0
    # A worker moving to another tenant is a new acquisition: holder = session + key.
    second.execute("SELECT pg_advisory_unlock(42, 2), pg_advisory_lock(42, 3)")
    assert value(poller.poll_once(), "pg_advisory_lock_acquisitions_total", **ids("tenants")) == 3


def test_unnamed_locks_have_ages_and_the_oldest_get_holder_info(make_poller, sessions, server) -> None:
    now = [5000.0]
    poller = make_poller({"max_unnamed_holder_info": 2, "unnamed_max_hold": "30s", "locks": []}, clock=lambda: now[0])
    old = sessions.open(application_name="legacy-old")
    old.execute("SELECT pg_advisory_lock(900001), pg_sleep(0)")
    poller.poll_once()
    now[0] += 60.0
    young = sessions.open(application_name="legacy-young")
    young.execute("SELECT pg_advisory_lock(900002), pg_advisory_lock_shared(7, 7), pg_sleep(0)")
    waiter = sessions.open(application_name="legacy-waiter")
    thread = threading.Thread(target=lambda: waiter.execute("SELECT pg_advisory_lock(900001)"), daemon=True)
    thread.start()
    wait_until(lambda: waiter.info.backend_pid in waiting_pids(server))
    snap = poller.poll_once()
    text = render(snap).decode()
    samples = parse(text)
    db = (("database", "postgres"),)
    assert samples[("pg_advisory_lock_unnamed_holders", db)] == 3
    assert samples[("pg_advisory_lock_unnamed_waiters", db)] == 1
    assert 60.0 <= samples[("pg_advisory_lock_unnamed_held_seconds", db)] < 61.0
    assert samples[("pg_advisory_lock_unnamed_wait_seconds", db)] >= 0
    assert samples[("pg_advisory_lock_unnamed_max_hold_seconds", db)] == 30
    info = series(text, "pg_advisory_lock_unnamed_holder_info")
    assert len(info) == 2  # the cap: the two oldest of three holds
    oldest = next(i for i in info if i["application_name"] == "legacy-old")
    assert oldest == {"database": "postgres", "key": "900001", "mode": "exclusive", "pid": str(old.info.backend_pid),
                      "application_name": "legacy-old", "usename": "postgres", "client_addr": "127.0.0.1",
                      "state": "idle", "pooler": ""}
    old.execute("SELECT pg_advisory_unlock_all()")
    thread.join(5)


def test_tracking_is_bounded_and_the_drops_are_counted(make_poller, sessions) -> None:
    poller = make_poller({"max_tracked_holds": 3, "locks": FAMILIES})
    poller.poll_once()
    sessions.open().execute("SELECT count(pg_advisory_lock(42, k)) FROM generate_series(1, 5) AS k")
    snap = poller.poll_once()
    samples = parse(render(snap).decode())
    assert samples[("pg_advisory_lock_exporter_tracked_holds", ())] == 3
    assert samples[("pg_advisory_lock_exporter_tracked_holds_dropped_total", ())] == 2
    assert value(snap, "pg_advisory_lock_keys_held", **ids("tenants")) == 5  # counted all the same
    snap = poller.poll_once()
    assert parse(render(snap).decode())[("pg_advisory_lock_exporter_tracked_holds_dropped_total", ())] == 4


def test_a_family_holds_many_keys_and_the_exposition_does_not_grow_with_them(make_poller, sessions) -> None:
    config = {"max_holder_info_per_lock": 5, "locks": FAMILIES}
    sessions.open().execute("SELECT count(pg_advisory_lock(42, k)) FROM generate_series(1, 5) AS k")
    few = render(make_poller(config).poll_once()).decode()
    sessions.open().execute("SELECT count(pg_advisory_lock(42, k)) FROM generate_series(100, 2099) AS k")
    many_snap = make_poller(config).poll_once()
    many = render(many_snap).decode()
    assert value(many_snap, "pg_advisory_lock_keys_held", **ids("tenants")) == 2005
    assert len(parse(many)) == len(parse(few))
