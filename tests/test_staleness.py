"""A poll is served as up only until its staleness bound (README: What the exporter promises):
the next poll due one interval after it was published, plus its turn and its deadline. Past it, a
scrape serves up 0 by itself, so neither a hung pooler console (a slow but healthy poll) nor an
exporter that was stopped and continued can make the exposition lie."""

from __future__ import annotations

import gzip
import os
import signal
import socket
import time
from collections.abc import Iterator

import psycopg
import pytest

from exporter import queries
from exporter.config import parse_fleet
from exporter.exposition import Exposition
from exporter.fleet import Runtime
from exporter.poller import connect_poller
from exporter.snapshot import LockState, PollStats, Snapshot
from tests.scheduling_util import poll_under_deadline
from tests.conftest import wait_until
from tests.exporter_proc import ExporterProcess
from tests.metrics_util import parse, up

LOCKS = [{"name": "nightly", "key": 4242}]
HOLDERS = ("pg_advisory_lock_holders", (("database", "postgres"), ("lock", "nightly"), ("mode", "exclusive")))


@pytest.fixture
def hung_console() -> Iterator[int]:
    """A TCP listener that accepts connections (the kernel's backlog) and never answers: a hung
    PgBouncer, or an address a network policy black-holes."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


def _refused_port() -> int:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


@pytest.mark.parametrize(("poolers", "deadline"), [
    # The call's deadline on its connection: 2 s of statement (the turn is not in it: waited before).
    ([], 2.0),
    # and 4 s for one console: 2 s to resolve its name, 2 s to read its one address.
    ([{"name": "pgb", "type": "pgbouncer"}], 6.0),
])
def test_the_bound_is_the_next_poll_due_plus_its_turn_and_its_deadline(make_poller, poolers, deadline) -> None:
    for pooler in poolers:
        pooler["dsn"] = f"host=127.0.0.1 port={_refused_port()} dbname=pgbouncer connect_timeout=1"
    poller = make_poller({"poll_interval": "2s", "locks": LOCKS, "poolers": poolers}, clock=lambda: 100.0)
    snapshot = poller.poll_once()
    assert snapshot.up
    assert poller.deadline() == deadline  # what the scheduler gives the next call before giving it up
    # 2 s to the next poll, 2 s for its turn (a probe's try), then its deadline.
    assert snapshot.fresh_until == 100.0 + 2.0 + 2.0 + deadline


def test_a_poll_that_started_late_never_stretches_the_last_poll_past_rule_5(monkeypatch) -> None:
    """README rule 5: a poll is served at most the interval, the turn and twice the deadline after
    its read. A poll due at 10 that waited for its server's turn (behind a hung call) or a worker
    until 45 extends the last poll's bound from when it was due, not from its late start (found by
    review: start + deadline served the last poll past the bound by its wait)."""
    fleet = parse_fleet({"dsn": "host=127.0.0.1 port=1", "poll_interval": "10s", "locks": []}, "t")
    target = Runtime(fleet, "/metrics").targets[""]
    task, now = target.tasks[0], [0.0]
    task._clock = lambda: now[0]  # noqa: SLF001 - the poll task's clock, the poller's
    monkeypatch.setattr(target.poller, "deadline", lambda: 20.0)
    interval, turn, deadline = 10.0, 10.0, 20.0
    rule_5 = interval + turn + 2 * deadline
    # Read pg_locks at 0, ended at 5 (console reads): bound 5 + 10 to the next + 10 turn + 20.
    good = Snapshot(up=True, stats=PollStats(interval=interval), taken_at=0.0, fresh_until=45.0)
    target.exposition.publish(good)
    task._next_at = 10.0  # noqa: SLF001 - the next poll is due at 10
    now[0] = 44.0  # it got its turn at 44, just inside the last poll's bound
    assert task.start() == deadline
    served_until = target.exposition.snapshot.fresh_until
    assert served_until - good.taken_at <= rule_5, served_until
    # A reload lengthened the deadline (consoles added): a poll that starts in time still gets it.
    monkeypatch.setattr(target.poller, "deadline", lambda: 30.0)
    task._next_at, now[0] = 10.0, 12.0  # noqa: SLF001
    task.start()
    assert target.exposition.snapshot.fresh_until == 10.0 + turn + 30.0


def test_the_bound_counts_from_when_the_poll_ended(make_poller, monkeypatch) -> None:
    """Issue 27, 1: a poll's time was taken before its console reads, so a poll that spent long on
    a console was stale when published. The bound starts when the poll ends."""
    now = [100.0]
    console = {"name": "pgb", "type": "pgbouncer",
               "dsn": f"host=127.0.0.1 port={_refused_port()} dbname=pgbouncer connect_timeout=1"}
    poller = make_poller({"poll_interval": "2s", "locks": LOCKS, "poolers": [console]}, clock=lambda: now[0])
    read = poller._poolers.read

    def slow_read(*args, **kwargs):
        now[0] += 3.0  # the consoles took 3 s after pg_locks was read
        return read(*args, **kwargs)

    monkeypatch.setattr(poller._poolers, "read", slow_read)
    snapshot = poller.poll_once()
    assert snapshot.up and snapshot.taken_at == 100.0
    assert snapshot.fresh_until == 103.0 + 2.0 + 2.0 + 6.0  # ended at 103; 2 s to the next, 2 s its turn; its deadline 6 s


def test_a_poll_that_ended_past_its_deadline_counts_from_the_deadline(make_poller, monkeypatch) -> None:
    """The 30-minute truth run: the exporter stopped (SIGSTOP) for 16 s between a poll's read and its
    end; the poll then published a bound counted from its end, and three scrapes got a 16 s old read
    with up 1 (rule 5's bound: 6 s). A poll's end counts no later than its own deadline."""
    now = [100.0]
    poller = make_poller({"poll_interval": "2s", "locks": LOCKS}, clock=lambda: now[0])
    deadline = poller.deadline()
    build = poller._build

    def stopped(*args, **kwargs):
        now[0] += 16.0  # frozen after pg_locks was read
        return build(*args, **kwargs)

    monkeypatch.setattr(poller, "_build", stopped)
    snapshot = poller.poll_once()
    assert snapshot.up and snapshot.taken_at == 100.0
    assert snapshot.fresh_until == 100.0 + deadline + 2.0 + poller.turn_allowance() + poller.deadline()
    assert snapshot.fresh_until < 116.0  # stale when published: served as up 0


def test_the_figures_say_when_pg_locks_was_read(make_poller, sessions) -> None:
    holder = sessions.open()
    before = holder.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()[0]
    snapshot = make_poller({"locks": LOCKS}).poll_once()
    after = holder.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()[0]
    stats = snapshot.stats
    assert stats.last_success_timestamp is not None and stats.last_success_round_trip is not None
    # The read happened inside [timestamp - round trip, timestamp], itself between the two readings.
    assert before <= stats.last_success_timestamp - stats.last_success_round_trip <= stats.last_success_timestamp <= after
    text = Exposition(snapshot, with_process=False, clock=lambda: snapshot.taken_at)
    text.render_now()
    figures = parse(text.body().decode())
    assert figures[("pg_advisory_lock_exporter_last_poll_timestamp_seconds", ())] == stats.last_success_timestamp
    assert figures[("pg_advisory_lock_exporter_last_poll_duration_seconds", ())] == round(stats.last_success_round_trip, 6)


def _good(fresh_until: float) -> Snapshot:
    return Snapshot(up=True, locks=(LockState("nightly", "postgres", 1, 0, 5.0, 0, 0.0, 1, None),),
                    stats=PollStats(polls=1, last_success_timestamp=1_700_000_000.0, last_success_round_trip=0.002),
                    taken_at=10.0, wall_at=1_700_000_000.0, fresh_until=fresh_until)


def test_a_scrape_past_the_bound_serves_up_0_without_rendering() -> None:
    now = [19.0]
    exposition = Exposition(_good(20.0), with_process=False, clock=lambda: now[0])
    exposition.render_now()
    for clock, expected_up in ((19.0, 1), (20.0, 1), (20.001, 0), (5000.0, 0)):
        now[0] = clock
        for body in (exposition.body().decode(), gzip.decompress(exposition.body(gzipped=True)).decode()):
            figures = parse(body)
            assert up(body) == expected_up, clock
            assert (HOLDERS in figures) == bool(expected_up), clock  # no lock series served stale
            # What a failed poll serves: when the last good poll was, still said.
            assert figures[("pg_advisory_lock_exporter_last_poll_timestamp_seconds", ())] == 1_700_000_000.0


@pytest.mark.slow
def test_a_hung_pooler_console_keeps_a_healthy_exporter_up(server, sessions, hung_console) -> None:
    """Issue 27, 1: each poll spends 2 s on the console, twice the interval; every poll succeeds,
    so every scrape says up 1 and carries the lock series."""
    holder = sessions.open()
    holder.execute("SELECT pg_advisory_lock(4242)")
    fleet = parse_fleet({"dsn": server.dsn(), "poll_interval": "1s", "locks": LOCKS, "poolers": [
        {"name": "pgb", "type": "pgbouncer", "dsn": f"host=127.0.0.1 port={hung_console} dbname=pgbouncer"}]}, "t")
    runtime = Runtime(fleet, "/metrics")
    runtime.start()
    try:
        wait_until(lambda: up(runtime.metrics(False).decode()) == 1, timeout=20)
        seen = []
        for _ in range(32):  # 8 s: three polls at least, each 2 s on the console
            figures = parse(runtime.metrics(False).decode())
            seen.append((figures[("pg_advisory_lock_exporter_up", ())], figures.get(HOLDERS)))
            time.sleep(0.25)
        assert set(seen) == {(1.0, 1.0)}
        assert runtime.targets[""].exposition.snapshot.stats.errors == 0
    finally:
        runtime.stop()


def _signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_an_exporter_stopped_and_continued_never_serves_its_old_poll(server, tmp_path) -> None:
    """Issue 27, 5: its backends frozen (no new poll can succeed) and the process stopped for
    longer than the bound; the first scrape after SIGCONT says up 0, not the poll from before."""
    server.require_cluster()
    exporter = ExporterProcess(tmp_path, {"dsn": server.dsn(), "poll_interval": "500ms", "locks": LOCKS})
    frozen: list[int] = []
    try:
        exporter.metrics_when(lambda text: up(text) == 1)
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            frozen = [row[0] for row in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name LIKE %s", [queries.APPLICATION_NAME + "%"])]
        assert frozen
        _signal_all(frozen, signal.SIGSTOP)
        exporter.proc.send_signal(signal.SIGSTOP)
        time.sleep(4)  # the bound: 0.5 s to the next poll, 0.5 s its turn, 0.5 s of deadline
        exporter.proc.send_signal(signal.SIGCONT)
        status, text = exporter.get(timeout=10)
        assert status == 200
        assert up(text) == 0
        assert HOLDERS[0] not in {name for name, _ in parse(text)}
        _signal_all(frozen, signal.SIGCONT)
        frozen = []
        exporter.metrics_when(lambda text: up(text) == 1, timeout=30)  # and it recovers
    finally:
        _signal_all(frozen, signal.SIGCONT)
        exporter.stop()


def test_the_interval_figure_is_the_time_between_reads_when_longer(make_poller) -> None:
    """A hold first seen by a poll began at most one interval ago only if the poll before read
    pg_locks one interval earlier: after a poll that overran (a slow console) or polls that
    failed, the figure says how long it really was."""
    now = [100.0]
    poller = make_poller({"poll_interval": "1s", "locks": LOCKS}, clock=lambda: now[0])
    interval = ("pg_advisory_lock_exporter_poll_interval_seconds", ())
    figures = []
    for at in (100.0, 103.5, 104.5):
        now[0] = at
        snapshot = poller.poll_once()
        exposition = Exposition(snapshot, with_process=False, clock=lambda: at)
        exposition.render_now()
        figures.append(parse(exposition.body().decode())[interval])
    assert figures == [1.0, 3.5, 1.0]


def _hung_listener() -> socket.socket:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    return listener


@pytest.mark.slow
def test_a_reload_that_adds_hung_consoles_keeps_a_healthy_exporter_up(server) -> None:
    """The bound a poll gets counts the next poll's deadline as it was; a reload that adds a
    console of two hung addresses lengthens it (4 s more to read them): the last poll stays fresh
    until the next one's own deadline (found by review: 19 scrapes of 120 said up 0)."""
    first, second = _hung_listener(), _hung_listener()
    raw = {"dsn": server.dsn(), "poll_interval": "1s", "locks": LOCKS}
    runtime = Runtime(parse_fleet(raw, "t"), "/metrics")
    runtime.start()
    try:
        wait_until(lambda: up(runtime.metrics(False).decode()) == 1, timeout=20)
        dsn = (f"host=127.0.0.1,127.0.0.1 port={first.getsockname()[1]},{second.getsockname()[1]} "
               "dbname=pgbouncer")
        runtime.apply(parse_fleet({**raw, "poolers": [{"name": "pgb", "type": "pgbouncer", "dsn": dsn}]}, "t"))
        seen = []
        for _ in range(48):  # 12 s: two polls at least, each 6 s on the consoles
            seen.append(up(runtime.metrics(False).decode()))
            time.sleep(0.25)
        assert set(seen) == {1.0}
        assert runtime.targets[""].exposition.snapshot.stats.errors == 0
    finally:
        runtime.stop()
        first.close()
        second.close()


def test_a_poll_stuck_on_a_connection_being_opened_is_broken_off(make_poller) -> None:
    """The network goes silent right after the handshake (its backend stopped): the poll's first
    statements never return. The deadline breaks that connection off too, so the next poll
    connects anew and succeeds (found by review: the worker stayed busy for good)."""
    frozen: list[int] = []

    def connect(config):
        conn = connect_poller(config)
        if not frozen:
            frozen.append(conn.info.backend_pid)
            os.kill(conn.info.backend_pid, signal.SIGSTOP)
        return conn

    poller = make_poller({"poll_interval": "500ms", "locks": LOCKS})
    poller._connect = connect
    try:
        assert [s.up for s in poll_under_deadline(poller)] == [False]  # given up; the call returned, broken off
        assert wait_until(lambda: poll_under_deadline(poller)[-1].up, timeout=10)
    finally:
        _signal_all(frozen, signal.SIGCONT)
