"""The poller against a real server: holders, waiters, ages, databases, unnamed locks."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest

from exporter import queries
from exporter.connection import local_timeouts, result_rows
from exporter.metrics import render
from tests.conftest import OTHER_DB, hang_lookups, wait_until, waiting_pids
from tests.metrics_util import parse, series, up, value

LOCKS = [
    {"name": "leader", "key": 4242},
    {"name": "negative", "key": -4242},
    {"name": "min", "key": -(2**63)},
    {"name": "max", "key": 2**63 - 1},
    {"name": "pair", "key": [42, 7]},
    {"name": "pair-negative", "key": [-42, -7]},
    {"name": "digest", "key": {"hashtext": "hourly-digest"}},
    {"name": "export", "key": {"hashtextextended": "nightly-export"}},
]
TAKE = {
    "leader": "pg_advisory_lock(4242)",
    "negative": "pg_advisory_lock(-4242)",
    "min": "pg_advisory_lock(-9223372036854775808)",
    "max": "pg_advisory_lock(9223372036854775807)",
    "pair": "pg_advisory_lock(42, 7)",
    "pair-negative": "pg_advisory_lock(-42, -7)",
    "digest": "pg_advisory_lock(hashtext('hourly-digest'))",
    "export": "pg_advisory_lock(hashtextextended('nightly-export', 0))",
}


def lock_ids(name: str, database: str = "postgres") -> dict[str, str]:
    return {"lock": name, "database": database}


def test_every_configured_lock_has_series_while_free(make_poller) -> None:
    snap = make_poller({"locks": LOCKS}).poll_once()
    assert snap.up
    for lock in LOCKS:
        ids = lock_ids(lock["name"])
        assert value(snap, "pg_advisory_lock_holders", **ids, mode="exclusive") == 0
        assert value(snap, "pg_advisory_lock_holders", **ids, mode="shared") == 0
        assert value(snap, "pg_advisory_lock_waiters", **ids) == 0
        assert value(snap, "pg_advisory_lock_held_seconds", **ids) == 0
        assert value(snap, "pg_advisory_lock_wait_seconds", **ids) == 0
        assert value(snap, "pg_advisory_lock_acquisitions_total", **ids) == 0
    assert value(snap, "pg_advisory_lock_exporter_up") == 1


@pytest.mark.parametrize("name", list(TAKE))
def test_each_key_form_is_seen_held(make_poller, sessions, name: str) -> None:
    holder = sessions.open(application_name=f"holder-{name}")
    holder.execute(f"SELECT {TAKE[name]}")
    snap = make_poller({"locks": LOCKS}).poll_once()
    for other in TAKE:
        expected = 1 if other == name else 0
        assert value(snap, "pg_advisory_lock_holders", **lock_ids(other), mode="exclusive") == expected, other
    info = series(render(snap).decode(), "pg_advisory_lock_holder_info")
    key = holder.execute(
        "SELECT CASE objsubid WHEN 2 THEN classid::int4::text || ',' || objid::int4::text "
        "ELSE ((classid::int8 << 32) | objid::int8)::text END FROM pg_locks WHERE pid = pg_backend_pid() "
        "AND locktype = 'advisory'"
    ).fetchone()[0]
    assert info == [{
        "lock": name, "database": "postgres", "key": key, "pid": str(holder.info.backend_pid),
        "application_name": f"holder-{name}", "usename": "postgres", "client_addr": "127.0.0.1", "state": "idle",
        "source": "config", "pooler": "",
    }]


def test_shared_holders_are_counted_by_mode(make_poller, sessions) -> None:
    readers = [sessions.open(application_name=f"reader-{i}") for i in range(3)]
    for r in readers:
        r.execute("SELECT pg_advisory_lock_shared(4242)")
    snap = make_poller({"locks": LOCKS}).poll_once()
    assert value(snap, "pg_advisory_lock_holders", **lock_ids("leader"), mode="shared") == 3
    assert value(snap, "pg_advisory_lock_holders", **lock_ids("leader"), mode="exclusive") == 0
    pids = {s["pid"] for s in series(render(snap).decode(), "pg_advisory_lock_holder_info")}
    assert pids == {str(r.info.backend_pid) for r in readers}


def test_waiter_and_its_wait_age(make_poller, sessions, server) -> None:
    holder = sessions.open()
    holder.execute("SELECT pg_advisory_lock(42, 7)")
    waiter = sessions.open(application_name="waiter")
    thread = threading.Thread(target=lambda: waiter.execute("SELECT pg_advisory_lock(42, 7)"), daemon=True)
    thread.start()
    wait_until(lambda: waiter.info.backend_pid in waiting_pids(server))
    time.sleep(1.2)
    snap = make_poller({"locks": LOCKS}).poll_once()
    ids = lock_ids("pair")
    assert value(snap, "pg_advisory_lock_waiters", **ids) == 1
    assert 1.1 <= value(snap, "pg_advisory_lock_wait_seconds", **ids) < 30
    # A waiter is not a holder.
    assert value(snap, "pg_advisory_lock_holders", **ids, mode="exclusive") == 1
    holder.execute("SELECT pg_advisory_unlock(42, 7)")
    thread.join(5)
    snap = make_poller({"locks": LOCKS}).poll_once()
    assert value(snap, "pg_advisory_lock_waiters", **ids) == 0
    assert value(snap, "pg_advisory_lock_wait_seconds", **ids) == 0


def test_transaction_lock_is_seen_and_released_at_commit(make_poller, sessions) -> None:
    conn = sessions.open(autocommit=False)
    poller = make_poller({"locks": LOCKS})
    conn.execute("SELECT pg_advisory_xact_lock(4242)")
    snap = poller.poll_once()
    assert value(snap, "pg_advisory_lock_holders", **lock_ids("leader"), mode="exclusive") == 1
    info = series(render(snap).decode(), "pg_advisory_lock_holder_info")
    assert info[0]["state"] == "idle in transaction"
    conn.commit()
    snap = poller.poll_once()
    assert value(snap, "pg_advisory_lock_holders", **lock_ids("leader"), mode="exclusive") == 0
    assert value(snap, "pg_advisory_lock_held_seconds", **lock_ids("leader")) == 0


def test_hold_age_after_exporter_start_is_a_proven_lower_bound(make_poller, sessions) -> None:
    idle = sessions.open()
    idle.execute("SELECT pg_advisory_lock(4242)")
    busy = sessions.open()
    thread = threading.Thread(target=lambda: busy.execute("SELECT pg_advisory_lock(-4242), pg_sleep(3)"), daemon=True)
    thread.start()
    time.sleep(1.5)
    t0 = time.monotonic()
    snap = make_poller({"locks": LOCKS}).poll_once()
    # Idle since its lock call ended 1.5 s ago: held at least that long, never more than real.
    held_idle = value(snap, "pg_advisory_lock_held_seconds", **lock_ids("leader"))
    assert value(snap, "pg_advisory_lock_holders", **lock_ids("leader"), mode="exclusive") == 1
    assert 1.4 <= held_idle <= 1.5 + (time.monotonic() - t0) + 5  # never more than the truth (generous slack)
    # Active in the statement that may have taken the lock: nothing is proven, so 0 (and it is seen).
    assert value(snap, "pg_advisory_lock_holders", **lock_ids("negative"), mode="exclusive") == 1
    assert value(snap, "pg_advisory_lock_held_seconds", **lock_ids("negative")) < 0.2
    thread.join(5)


def test_hold_age_grows_with_the_poller_clock(make_poller, sessions) -> None:
    now = [1000.0]
    poller = make_poller({"locks": LOCKS}, clock=lambda: now[0])
    poller.poll_once()
    conn = sessions.open()
    conn.execute("SELECT pg_advisory_lock(4242), pg_sleep(0)")
    # Seen for the first time idle for ~0 s; then 65 s of the poller's clock pass.
    poller.poll_once()
    now[0] += 65.0
    snap = poller.poll_once()
    assert 65.0 <= value(snap, "pg_advisory_lock_held_seconds", **lock_ids("leader")) < 66.0


def test_acquisitions_count_new_holders_not_those_present_at_start(make_poller, sessions) -> None:
    first = sessions.open()
    first.execute("SELECT pg_advisory_lock(4242)")
    poller = make_poller({"locks": LOCKS})
    assert value(poller.poll_once(), "pg_advisory_lock_acquisitions_total", **lock_ids("leader")) == 0
    first.execute("SELECT pg_advisory_unlock(4242)")
    for i in range(3):
        conn = sessions.open()
        conn.execute("SELECT pg_advisory_lock(4242)")
        snap = poller.poll_once()
        assert value(snap, "pg_advisory_lock_acquisitions_total", **lock_ids("leader")) == i + 1
        # The same holder seen again is not a new acquisition.
        assert value(poller.poll_once(), "pg_advisory_lock_acquisitions_total", **lock_ids("leader")) == i + 1
        conn.execute("SELECT pg_advisory_unlock(4242)")


def test_locks_in_a_second_database(make_poller, sessions) -> None:
    here = sessions.open()
    here.execute("SELECT pg_advisory_lock(4242)")
    there = sessions.open(OTHER_DB)
    there.execute("SELECT pg_advisory_lock(4242), pg_advisory_lock(77), pg_advisory_lock(78)")
    locks = [{"name": "leader", "key": 4242}, {"name": "leader-other", "key": 4242, "database": OTHER_DB}]
    snap = make_poller({"locks": locks}).poll_once()
    assert value(snap, "pg_advisory_lock_holders", **lock_ids("leader"), mode="exclusive") == 1
    assert value(snap, "pg_advisory_lock_holders", **lock_ids("leader-other", OTHER_DB), mode="exclusive") == 1
    info = {(s["lock"], s["pid"]) for s in series(render(snap).decode(), "pg_advisory_lock_holder_info")}
    assert info == {("leader", str(here.info.backend_pid)), ("leader-other", str(there.info.backend_pid))}
    # 77 and 78 are named by nobody: counted per database, cluster-wide.
    assert value(snap, "pg_advisory_lock_unnamed_holders", database=OTHER_DB) == 2
    assert value(snap, "pg_advisory_lock_unnamed_holders", database="postgres") is None


def test_unnamed_holders_and_waiters(make_poller, sessions, server) -> None:
    a = sessions.open()
    a.execute("SELECT pg_advisory_lock(5), pg_advisory_lock(6, 6), pg_advisory_lock_shared(7)")
    b = sessions.open()
    thread = threading.Thread(target=lambda: b.execute("SELECT pg_advisory_lock(5)"), daemon=True)
    thread.start()
    wait_until(lambda: b.info.backend_pid in waiting_pids(server))
    snap = make_poller({"locks": LOCKS}).poll_once()
    assert value(snap, "pg_advisory_lock_unnamed_holders", database="postgres") == 3
    assert value(snap, "pg_advisory_lock_unnamed_waiters", database="postgres") == 1
    a.execute("SELECT pg_advisory_unlock_all()")
    thread.join(5)


def test_a_session_named_like_the_probe_is_counted_like_any_other(make_poller, sessions) -> None:
    # A name proves nothing (a pooled backend keeps its last borrower's): only the exporter's own
    # holds are left out, and the probe never holds anything while a poll runs (they take turns).
    named = sessions.open(application_name=queries.PROBE_APPLICATION_NAME)
    named.execute("SELECT pg_advisory_lock(4242), pg_advisory_lock(9)")
    snap = make_poller({"locks": LOCKS}).poll_once()
    assert value(snap, "pg_advisory_lock_holders", **lock_ids("leader"), mode="exclusive") == 1
    assert value(snap, "pg_advisory_lock_unnamed_holders", database="postgres") == 1


def test_string_keys_resolving_to_one_lock_are_named_in_log_and_metric(make_poller, caplog) -> None:
    # hashtext('x') widened to bigint is the bigint itself: find it on the server, then name both.
    poller = make_poller({"locks": [{"name": "probe-hash", "key": {"hashtext": "billing"}}]})
    poller.poll_once()
    import psycopg

    with psycopg.connect(poller._config.dsn) as conn:  # noqa: SLF001 - the test server's dsn
        hashed = conn.execute("SELECT hashtext('billing')::int8").fetchone()[0]
    poller = make_poller({"locks": [{"name": "by-hash", "key": {"hashtext": "billing"}}, {"name": "by-number", "key": hashed}]})
    with caplog.at_level("WARNING"):
        snap = poller.poll_once()
    message = f"locks[1].key: 'by-number' and 'by-hash' (locks[0]) name the same lock {hashed} = {hashed} in database 'postgres'"
    assert message in caplog.text
    assert value(snap, "pg_advisory_lock_key_collision", lock="by-number", database="postgres", colliding_lock="by-hash") == 1
    assert value(snap, "pg_advisory_lock_key_collision", lock="by-hash", database="postgres", colliding_lock="by-number") == 1


def test_failed_poll_reports_down_and_leaves_lock_series_out(make_poller, server) -> None:
    from tests.pgcluster import free_port

    poller = make_poller({"locks": LOCKS, "dsn": f"host=127.0.0.1 port={free_port()} user=x dbname=y"})
    snap = poller.poll_once()
    assert not snap.up
    text = render(snap).decode()
    assert up(text) == 0
    assert parse(text)[("pg_advisory_lock_exporter_poll_errors_total", ())] == 1
    assert "pg_advisory_lock_holders{" not in text and "pg_advisory_lock_unnamed" not in text
    assert "pg_advisory_lock_exporter_last_poll_timestamp_seconds" not in text


def test_poll_self_metrics(make_poller) -> None:
    poller = make_poller({"locks": LOCKS})
    before = time.time()
    for _ in range(3):
        snap = poller.poll_once()
    assert value(snap, "pg_advisory_lock_exporter_poll_duration_seconds_count") == 3
    assert 0 < value(snap, "pg_advisory_lock_exporter_poll_duration_seconds_sum") < 3
    assert value(snap, "pg_advisory_lock_exporter_poll_duration_seconds_bucket", le="+Inf") == 3
    assert before <= value(snap, "pg_advisory_lock_exporter_last_poll_timestamp_seconds") <= time.time()
    assert value(snap, "pg_advisory_lock_exporter_poll_errors_total") == 0


def test_a_database_that_does_not_exist_matches_nothing(make_poller, sessions) -> None:
    sessions.open().execute("SELECT pg_advisory_lock(4242)")
    snap = make_poller({"locks": [{"name": "ghost", "key": 4242, "database": "no_such_db"}]}).poll_once()
    assert snap.up
    assert value(snap, "pg_advisory_lock_holders", lock="ghost", database="no_such_db", mode="exclusive") == 0
    assert value(snap, "pg_advisory_lock_unnamed_holders", database="postgres") == 1


def test_a_reload_carries_hold_tracking_and_counters_over_by_name(make_poller, sessions) -> None:
    from exporter.config import parse_config

    now = [100.0]
    poller = make_poller({"locks": LOCKS}, clock=lambda: now[0])
    poller.poll_once()
    sessions.open().execute("SELECT pg_advisory_lock(4242), pg_sleep(0)")
    assert value(poller.poll_once(), "pg_advisory_lock_acquisitions_total", **lock_ids("leader")) == 1
    now[0] += 30.0
    reloaded = parse_config({"dsn": poller._config.dsn, "locks": [*LOCKS, {"name": "new", "key": 5}]}, "t")  # noqa: SLF001
    poller.reconfigure(reloaded)
    poller.apply_pending_config()  # what the poll task does between polls
    snap = poller.poll_once()  # a new connection, the same tracking
    assert value(snap, "pg_advisory_lock_acquisitions_total", **lock_ids("leader")) == 1
    assert 30.0 <= value(snap, "pg_advisory_lock_held_seconds", **lock_ids("leader")) < 31.0
    assert value(snap, "pg_advisory_lock_holders", **lock_ids("new"), mode="exclusive") == 0


def test_the_poll_statement_is_prepared_on_a_direct_connection_and_planned_when_it_is_gone(
        make_poller, sessions, caplog) -> None:
    poller = make_poller({"locks": LOCKS})
    assert poller.poll_once().up
    conn = poller._conn  # noqa: SLF001 - the poller's own session is the only one that can see its statements
    assert conn is not None
    prepared = {row[0] for row in conn.execute("SELECT name FROM pg_prepared_statements").fetchall()}
    assert prepared == {queries.POLL_STATEMENT_NAME}
    # As if a transaction-mode pooler had handed the poll to a server connection that never saw it.
    conn.execute(f"DEALLOCATE {queries.POLL_STATEMENT_NAME}")
    _falls_back_and_sees_the_holder(poller, sessions, caplog)
    assert poller.poll_once().up and poller.poll_once().stats.errors == 0


def _falls_back_and_sees_the_holder(poller, sessions, caplog) -> None:
    """A holder of leader, then a poll that falls back to the one-string transaction: it sees the
    holder, fails nothing, and says why."""
    holder = sessions.open()
    holder.execute(f"SELECT {TAKE['leader']}")
    with caplog.at_level("WARNING", logger="exporter.poller"):
        snap = poller.poll_once()
    assert snap.up and value(snap, "pg_advisory_lock_holders", **lock_ids("leader"), mode="exclusive") == 1
    assert "poll statement not found, or not the backend proven direct" in caplog.text
    assert "planned at every poll, its settings LOCAL, from now on" in caplog.text


def test_on_a_direct_connection_the_poll_is_the_bare_execute_under_the_sessions_own_bounds(
        make_poller, sessions) -> None:
    """Nobody else borrows a proven-direct backend: its settings are the session's, set once, and
    the poll is the prepared statement alone (no transaction around it to pay for)."""
    poller = make_poller({"locks": LOCKS, "poll_interval": "3s"})
    assert poller.poll_once().up and poller.poll_once().up
    conn = poller._conn  # noqa: SLF001 - only the poller's own session can read its settings
    assert conn is not None
    last = sessions.open().execute("SELECT query FROM pg_stat_activity WHERE pid = %s", [conn.info.backend_pid]).fetchone()
    assert last == (queries.DIRECT_POLL,)
    settings = conn.execute("SELECT current_setting('statement_timeout'), current_setting('lock_timeout'), "
                            "current_setting('enable_sort')").fetchone()
    assert settings == ("3s", "3s", "off")
    # The statements that explain a poll (the chain, table names) plan with the server's default:
    # the chain planned without sorting took 0.6 s instead of 2 ms.
    with local_timeouts(conn, 1.0):
        assert conn.execute("SELECT current_setting('enable_sort')").fetchone() == ("on",)
    assert conn.execute("SELECT current_setting('enable_sort')").fetchone() == ("off",)
    # A new connection is a new session: its settings are made again before its first poll.
    poller.close()
    assert poller.poll_once().up
    conn = poller._conn  # noqa: SLF001
    assert conn is not None and conn.execute("SELECT current_setting('statement_timeout'), "
                                             "current_setting('enable_sort')").fetchone() == ("3s", "off")


def test_with_auto_the_direct_sessions_bound_is_set_again_when_the_interval_crosses_a_power_of_two(
        make_poller) -> None:
    poller = make_poller({"locks": LOCKS, "poll_interval": "auto"})
    assert poller.poll_once().up
    conn = poller._conn  # noqa: SLF001
    assert conn is not None
    bound = "SELECT current_setting('statement_timeout'), current_setting('lock_timeout')"
    assert conn.execute(bound).fetchone() == ("2s", "2s")  # auto's floor
    poller._controller.interval = 5.3  # noqa: SLF001 - as if polls had become dearer
    assert poller.poll_once().up and conn.execute(bound).fetchone() == ("8s", "8s")
    # The same power of two is the same bound: nothing is sent again (what the session has stays).
    conn.execute("SET statement_timeout = '5s'")
    poller._controller.interval = 7.9  # noqa: SLF001
    assert poller.poll_once().up and conn.execute(bound).fetchone() == ("5s", "8s")


@pytest.mark.parametrize("elsewhere", ["backend_pid", "client_port", "server_port"])
def test_the_direct_settings_are_made_on_the_proven_backend_only(make_poller, sessions, caplog, elsewhere) -> None:
    """Were the connection ever handed to another backend (a pooler the proof missed), the server
    makes none of the settings and the poller falls back to the one-string transaction."""
    poller = make_poller({"locks": LOCKS, "poll_interval": "3s"})
    assert poller.poll_once().up
    conn = poller._conn  # noqa: SLF001
    assert conn is not None
    conn.execute("RESET ALL")
    poller._settings_ms = None  # noqa: SLF001 - the settings are to be made again
    poller.server = dataclasses.replace(poller.server, **{elsewhere: getattr(poller.server, elsewhere) + 1})  # as if elsewhere
    _falls_back_and_sees_the_holder(poller, sessions, caplog)
    assert conn.execute("SELECT current_setting('statement_timeout'), current_setting('enable_sort')").fetchone() == \
        ("0", "on")  # nothing was set on the session
    assert poller.poll_once().up and poller.poll_once().stats.errors == 0


def test_the_poll_tells_the_assembler_its_round_trip_as_the_slack_of_its_proofs(make_poller) -> None:
    poller = make_poller({"locks": LOCKS})
    before = poller.poll_once().stats.duration_sum
    slacks = []
    run = poller._assembler.run  # noqa: SLF001

    def recording(*args, **kwargs):
        slacks.append(kwargs["slack"])
        return run(*args, **kwargs)

    poller._assembler.run = recording  # noqa: SLF001
    snap = poller.poll_once()
    # The statement was sent after the turn was taken, and the rows read before the poll's clock
    # stopped: the slack is inside the poll's own duration, and never none.
    assert snap.up and len(slacks) == 1 and 0 < slacks[0] <= snap.stats.duration_sum - before


def test_binary_rows_of_a_direct_poll_are_the_text_rows_of_the_one_string_poll(make_poller, sessions, server) -> None:
    """The same moment read both ways, every shape a row takes: idle and idle-in-transaction
    holders, both key forms, shared, a waiter, a prepared transaction, NULLs."""
    from tests.test_prepared import end_prepared, prepare

    idle = sessions.open(application_name="idle")
    idle.execute("SELECT pg_advisory_lock(4242), pg_advisory_lock_shared(7, 1)")
    in_xact = sessions.open(autocommit=False, application_name="in-xact")
    in_xact.execute("SELECT pg_advisory_xact_lock(5150)")
    waiter = sessions.open(application_name="waiter")
    thread = threading.Thread(target=waiter.execute, args=("SELECT pg_advisory_lock(4242)",), daemon=True)
    thread.start()
    wait_until(lambda: waiter.info.backend_pid in waiting_pids(server))
    prepare(server.dsn(), "binary-text", "pg_advisory_xact_lock(6060)")
    try:
        poller = make_poller({"locks": LOCKS})
        assert poller.poll_once().up
        conn = poller._conn  # noqa: SLF001
        assert conn is not None
        with conn.cursor() as cur:
            cur.execute(queries.DIRECT_POLL, binary=True)
            binary = cur.fetchall()
            # As a role or database may set it: text float8 rounded to 15 digits, unless the poll says otherwise.
            conn.execute("SET extra_float_digits = 0")
            text = result_rows(cur.execute(queries.poll_query(poller.server.version_num, 3.0)), queries.POLL_COLUMN_NAMES)
            conn.execute("RESET extra_float_digits")
        stable = [queries.POLL_COLUMN_NAMES.index(name) for name in queries.STABLE_COLUMNS if name != "wait_seconds"]

        def comparable(rows):
            return sorted((tuple(repr(row[i]) for i in stable) for row in rows))

        assert len(binary) >= 5 and comparable(binary) == comparable(text)
        assert {type(row[queries.POLL_COLUMN_NAMES.index("keys")][0]) for row in binary} == {int}
    finally:
        end_prepared(server.dsn(), "binary-text")
        idle.execute("SELECT pg_advisory_unlock_all()")  # the waiter gets the lock, and returns
        thread.join(10)


def _hang_lookups_of(monkeypatch, hung: str) -> threading.Event:
    """socket.getaddrinfo as a resolver that never answers for the name hung: set the event to end it."""
    return hang_lookups(monkeypatch, lambda host: host == hung)


def _held_past_its_deadline(poller) -> float | None:
    """Run one poll as a worker does (scheduler.run_call): None when it returns within its
    deadline and 2 s, else the deadline."""
    from exporter.scheduler import PollTask, run_call

    budget = poller.deadline()
    worker = threading.Thread(target=run_call, args=(PollTask(poller, None),), daemon=True)
    worker.start()
    worker.join(budget + 2)
    return budget if worker.is_alive() else None


def test_a_hung_lookup_of_the_dsns_host_holds_a_poll_no_longer_than_its_deadline(monkeypatch) -> None:
    """psycopg looks the dsn's host up on the calling thread before connect_timeout applies, and
    the give-up has no socket to shut then: the lookup is made under the deadline instead."""
    from exporter.config import parse_config
    from exporter.poller import Poller, connect_poller

    release = _hang_lookups_of(monkeypatch, "hung-poll.example")
    config = parse_config({"dsn": "host=hung-poll.example port=5432 dbname=x user=x", "poll_interval": "1s",
                           "locks": []}, "t")
    published: list = []
    poller = Poller(config, connect=connect_poller, publish=published.append)
    try:
        assert _held_past_its_deadline(poller) is None
        assert not published[-1].up
        assert "hung-poll.example" in poller._last_error and "did not return within" in poller._last_error  # noqa: SLF001
    finally:
        release.set()
        poller.close()


def test_a_hung_lookup_of_a_poolers_name_holds_a_poll_no_longer_than_its_deadline(make_poller, monkeypatch) -> None:
    """At every connect the poll asks whether a configured pooler is at the dsn's address
    (poolers.pooler_fronting): a pooler's name behind a hung resolver stands for itself after the
    timeout, and the poll goes on."""
    release = _hang_lookups_of(monkeypatch, "hung-proxy.example")
    poller = make_poller({"locks": [{"name": "answer", "key": 42}], "poolers": [
        {"name": "proxy", "addresses": ["hung-proxy.example"], "pool_mode": "transaction"}]})
    try:
        assert _held_past_its_deadline(poller) is None
        assert poller.poll_once().up
    finally:
        release.set()
