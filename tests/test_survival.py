"""No loop of the exporter ends on an unexpected exception: each becomes a failure people can see
(a failed poll, a failed try, a refused reload, the last rendering kept), logged once, and the
loop goes on. A poller that is stuck or gone anyway is caught by the watchdog."""

from __future__ import annotations

import logging
import math
import socket
import threading
import time

import pytest

from exporter import connection
from exporter.assemble import Assembler
from exporter.cli import Reloader
from exporter.config import parse_config, parse_fleet
from exporter.fleet import Runtime
from exporter.exposition import Exposition
from exporter.metrics import render
from exporter.poller import Poller
from exporter.poolers import PoolerReader
from exporter.probe import Prober
from exporter.scheduler import PollTask, ProbeTask, Scheduler, Task
from exporter.snapshot import PollStats, Snapshot
from tests.conftest import wait_until
from tests.scheduling_util import poll_under_deadline
from tests.metrics_util import parse, up, value

LOCKS = [{"name": "leader", "key": 4242, "probe": {"expect": "any", "interval": "50ms"}}]
THE_BUG = "'<' not supported between instances of 'int' and 'NoneType'"


def fail_once(monkeypatch, cls: type, name: str, error: Exception) -> list[int]:
    """cls.name raises error at its first call, then works: how many calls failed."""
    original, failed = getattr(cls, name), []

    def broken(self, *args, **kwargs):
        if not failed:
            failed.append(1)
            raise error
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, broken)
    return failed


def test_an_unexpected_error_in_a_poll_is_a_failed_poll_and_the_next_poll_works(
        make_poller, sessions, monkeypatch, caplog) -> None:
    sessions.open().execute("SELECT pg_advisory_lock(4242)")
    poller = make_poller({"locks": LOCKS})
    assert poller.poll_once().up
    fail_once(monkeypatch, Assembler, "run", TypeError(THE_BUG))
    with caplog.at_level(logging.DEBUG, logger="exporter.poller"):
        failed = poller.poll_once()
    assert not failed.up and failed.stats.errors == 1
    text = render(failed).decode()
    assert up(text) == 0 and parse(text)[("pg_advisory_lock_exporter_poll_errors_total", ())] == 1
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "TypeError" in errors[0].getMessage() and "poller.py" in errors[0].getMessage()  # what, and where
    assert any(r.levelno == logging.DEBUG and r.exc_info for r in caplog.records)  # the traceback, at debug
    again = poller.poll_once()
    assert again.up and value(again, "pg_advisory_lock_holders", lock="leader", database="postgres", mode="exclusive") == 1


def test_the_same_unexpected_error_is_logged_once_a_minute(make_poller, monkeypatch, caplog) -> None:
    poller = make_poller({"locks": LOCKS})
    monkeypatch.setattr(Assembler, "run", lambda *a, **k: (_ for _ in ()).throw(ValueError("bad row")))
    with caplog.at_level(logging.ERROR, logger="exporter.poller"):
        for _ in range(5):
            assert not poller.poll_once().up
    assert len([r for r in caplog.records if "ValueError: bad row" in r.getMessage()]) == 1


def test_the_poll_loop_survives_whatever_its_iteration_raises(server, monkeypatch) -> None:
    published: list[Snapshot] = []
    calls = []

    def publish(snapshot: Snapshot) -> None:
        calls.append(snapshot)
        if len(calls) == 1:
            raise RuntimeError("a publish that breaks")
        published.append(snapshot)

    config = parse_config({"dsn": server.dsn(), "poll_interval": "100ms", "locks": LOCKS}, "t")
    from exporter.poller import connect_poller

    poller = Poller(config, connect=connect_poller, publish=publish)
    scheduler = Scheduler(2)
    task = PollTask(poller, None)
    scheduler.add(task)
    try:
        wait_until(lambda: len(published) >= 3, timeout=20)
    finally:
        scheduler.remove(task)
        scheduler.stop()
    assert any(s.up for s in published)


def test_an_unexpected_error_in_a_try_is_a_failed_try_and_the_probe_goes_on(server, monkeypatch) -> None:
    from exporter import probe as probe_module
    from exporter.probe import connect_probe

    original = probe_module.try_statement
    calls = []

    def broken(key, timeout):
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("no such form")
        return original(key, timeout)

    monkeypatch.setattr(probe_module, "try_statement", broken)
    results = []
    config = parse_config({"dsn": server.dsn(), "locks": LOCKS}, "t")
    prober = Prober(config, connect=connect_probe, publish=results.append)
    scheduler = Scheduler(2)
    task = ProbeTask(prober, None)
    scheduler.add(task)
    try:
        wait_until(lambda: results and results[-1] and results[-1][0].acquirable is True, timeout=20)
    finally:
        scheduler.remove(task)
        scheduler.stop()
    assert results[-1][0].errors == 1  # the broken try, counted in probe_errors_total


def test_a_rendering_that_fails_keeps_the_last_one_and_the_renderer_goes_on(monkeypatch) -> None:
    exposition = Exposition(with_process=False)
    exposition.start()
    try:
        fail_once(monkeypatch, Exposition, "_parts", RuntimeError("a family that cannot be written"))
        exposition.publish(Snapshot(up=True, stats=PollStats(polls=1)))
        exposition.publish(Snapshot(up=True, stats=PollStats(polls=2)))
        wait_until(lambda: parse(exposition.body().decode()).get(
            ("pg_advisory_lock_exporter_poll_duration_seconds_count", ())) == 2, timeout=10)
    finally:
        exposition.stop()


class _BrokenRuntime:
    """A runtime whose apply breaks half-way."""

    def __init__(self) -> None:
        self.results: list[bool] = []

    def apply(self, fleet) -> None:
        raise AttributeError("'NoneType' object has no attribute 'dsn'")

    def reload_result(self, ok: bool) -> None:
        self.results.append(ok)


def test_a_reload_that_breaks_is_a_refused_reload(tmp_path, caplog) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("dsn: 'host=x'\nlocks: []\n")
    runtime = _BrokenRuntime()
    with caplog.at_level(logging.ERROR):
        assert Reloader(str(path), runtime)() is False  # type: ignore[arg-type]
    assert runtime.results == [False]
    assert "AttributeError" in caplog.text


def test_the_watchdog_serves_up_0_when_the_poller_is_stuck(server, monkeypatch) -> None:
    # The poll task publishes once, then never starts a poll again: no exception, no failed poll, just silence.
    hang = threading.Event()
    original = PollTask.start

    def once_then_silence(self):
        if hang.is_set():
            time.sleep(0.05)
            return None  # nothing to call
        hang.set()
        return original(self)

    monkeypatch.setattr(PollTask, "start", once_then_silence)
    fleet = parse_fleet({"dsn": server.dsn(), "poll_interval": "200ms", "locks": LOCKS}, "t")
    runtime = Runtime(fleet, "/metrics")
    runtime.start()
    try:
        wait_until(lambda: up(runtime.metrics(False).decode()) == 1, timeout=20)
        target = runtime.targets[""]
        good = target.exposition.snapshot
        wait_until(lambda: not target.exposition.snapshot.up, timeout=20)  # the watchdog's replacement
        # Published once the good poll's bound had passed: 0.2 s to the next poll, and its deadline,
        # 0.2 s for the turn and 0.2 s of statement (exact: the fake-clock tests pin the formula).
        assert good.fresh_until - good.taken_at >= 0.6
        text = runtime.metrics(False).decode()
        assert parse(text)[("pg_advisory_lock_exporter_poll_interval_seconds", ())] == 0.2
        assert ("pg_advisory_lock_exporter_last_poll_timestamp_seconds", ()) in parse(text)
    finally:
        hang.clear()
        runtime.stop()


def test_the_watchdog_leaves_a_fresh_poll_alone() -> None:
    fleet = parse_fleet({"dsn": "host=127.0.0.1 port=1", "poll_interval": "1s", "locks": []}, "t")
    runtime = Runtime(fleet, "/metrics")
    target = runtime.targets[""]
    fresh = Snapshot(up=True, stats=PollStats(interval=1.0), taken_at=100.0, fresh_until=107.0)
    target.exposition.publish(fresh)
    assert not target.check_stale(107.0)  # the bound itself is still fresh
    assert target.exposition.snapshot is fresh
    assert target.check_stale(107.01)
    assert not target.exposition.snapshot.up


def test_console_name_resolution_runs_under_the_read_deadline(monkeypatch, caplog) -> None:
    real = socket.getaddrinfo

    def slow(host, *args, **kwargs):
        if host == "slow-dns.example":
            time.sleep(10)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(connection.socket, "getaddrinfo", slow)
    config = parse_config({"dsn": "host=127.0.0.1", "locks": [], "poolers": [
        {"name": "pgb", "type": "pgbouncer", "dsn": "host=slow-dns.example port=6432 dbname=pgbouncer"}]}, "t")
    reader = PoolerReader(config)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        view = reader.read()
    assert time.monotonic() - started < 5  # the console deadline (2 s), not the resolver's 10 s
    assert [(c.pooler, c.up) for c in view.consoles] == [("pgb", False)]
    assert "cannot be read" in caplog.text
    reader.close()


@pytest.mark.parametrize("console_dsn", ["host=127.0.0.1 port=6432,6432 dbname=pgbouncer",
                                         "host=a.invalid,b.invalid port=1,2,3 dbname=pgbouncer"])
def test_a_console_dsn_of_several_hosts_never_fails_a_poll(make_poller, console_dsn) -> None:
    poller = make_poller({"locks": [], "poolers": [{"name": "pgb", "type": "pgbouncer", "dsn": console_dsn}]})
    for _ in range(2):
        snap = poller.poll_once()
        assert snap.up and snap.consoles and not any(c.up for c in snap.consoles)



def _serverless_poller(monkeypatch, slow: dict) -> Poller:
    """A poller whose reads return no rows at once, and whose poll sleeps where slow says."""
    poller = Poller(parse_config({"dsn": "host=127.0.0.1 port=1", "poll_interval": "1s", "locks": []}, "t"),
                    connect=lambda c: None, publish=lambda s: None)
    monkeypatch.setattr(poller, "_read", lambda: [])
    monkeypatch.setattr(poller, "_explain", lambda result: ({}, ()))
    monkeypatch.setattr(poller, "deadline", lambda: 0.3)
    build, count = poller._build, poller._count

    def slow_build(rows, now):
        time.sleep(slow.pop("build", 0))
        return build(rows, now)

    def slow_count(ticket, seconds, failed, read=None):
        stats = count(ticket, seconds, failed, read)
        time.sleep(slow.pop("after_count", 0))  # counted, not yet returned: the deadline passes now
        return stats

    monkeypatch.setattr(poller, "_build", slow_build)
    monkeypatch.setattr(poller, "_count", slow_count)
    return poller


@pytest.mark.parametrize("where", ["build", "after_count"])
def test_a_poll_given_up_at_its_deadline_counts_once_and_the_next_poll_is_up(monkeypatch, where) -> None:
    # Given up before it counted itself (build) or just after (after_count): either way one poll,
    # counted once, and nothing of it leaks into the next poll.
    slow = {where: 1.0}
    poller = _serverless_poller(monkeypatch, slow)
    [first] = poll_under_deadline(poller)  # returns once the given-up call has returned
    assert not first.up
    stats = poller._stats_now()
    assert (stats.polls, stats.errors) == ((1, 1) if where == "build" else (1, 0))
    [second] = poll_under_deadline(poller)
    assert second.up and (second.stats.polls, second.stats.errors) == (2, stats.errors)


def test_a_poll_waits_for_its_servers_turn_outside_its_deadline(make_poller) -> None:
    # A probe's try (or another target's poll) on the same server holds the turn for longer than
    # the poll's whole deadline: the scheduler has the poll wait for the turn before its call, so
    # the poll runs after the try, and its deadline counts from its own start: not given up.
    events: list[str] = []
    published: list[Snapshot] = []
    poller = make_poller({"locks": [{"name": "a", "key": 1}]})
    assert poller.poll_once().up  # connected: its deadline is the statement bound, 1 s
    poller._publish = published.append
    holding, release = threading.Event(), threading.Event()

    class Try(Task):
        def start(self) -> float:
            return 30.0

        def call(self) -> None:
            events.append("try began")
            holding.set()
            release.wait(10)
            events.append("try ended")

        def give_up(self) -> None:
            release.set()

        def next_delay(self) -> float:
            return math.inf

    class Poll(PollTask):
        def call(self) -> None:
            events.append("poll began")
            super().call()

    scheduler = Scheduler(max_workers=4)
    try:
        scheduler.add(Try("server"))
        assert holding.wait(5)
        scheduler.add(Poll(poller, "server"))
        assert wait_until(lambda: scheduler._waiting.get("server"), timeout=5)  # waits for the turn, no worker
        release.wait(poller.deadline() + 1.0)  # the turn held past the poll's whole deadline
        release.set()
        assert wait_until(lambda: published, timeout=10)
    finally:
        scheduler.stop()
        wait_until(lambda: scheduler.workers == 0, timeout=10)  # no call of the poller's runs at its close
    assert events[:3] == ["try began", "try ended", "poll began"]  # one call per server, in turn
    assert [s.up for s in published[:1]] == [True]  # not given up: the wait was not in its deadline


def test_a_reload_that_breaks_midway_serves_and_stops_exactly_what_runs(server, monkeypatch) -> None:
    # Target "a" is removed, "b" added, then making "c" fails: the runtime serves what runs (b),
    # not a (stopped) nor c (never made), and stops b at exit.
    def fleet(*names: str):
        return parse_fleet({"poll_interval": "1s", "targets": {
            name: {"dsn": server.dsn(), "locks": [{"name": "x", "key": 1}]} for name in names}}, "t")

    runtime = Runtime(fleet("a"), "/metrics")
    runtime.start()
    try:
        make = runtime._make

        def make_or_break(config):
            if config.name == "c":
                raise RuntimeError("no room for c")
            return make(config)

        monkeypatch.setattr(runtime, "_make", make_or_break)
        with pytest.raises(RuntimeError):
            runtime.apply(fleet("b", "c"))
        assert sorted(runtime.targets) == ["b"]
        b = runtime.targets["b"]
        wait_until(lambda: b.first_poll.is_set())
    finally:
        runtime.stop()
    assert not any(runtime.scheduler.scheduled(task) for task in b.tasks)  # stopped at exit


def test_a_poll_that_starts_after_its_bound_never_revives_the_last_poll() -> None:
    # The next poll waited for its server's turn (behind a call on a hung server) past the last good
    # poll's bound: scrapes said "don't know" already, and its start must not make them say up 1 again.
    fleet = parse_fleet({"dsn": "host=127.0.0.1 port=1", "poll_interval": "1s", "locks": []}, "t")
    target = Runtime(fleet, "/metrics").targets[""]
    good = Snapshot(up=True, stats=PollStats(interval=1.0), taken_at=100.0, fresh_until=107.0)
    target.exposition.publish(good)
    target._poll_started(108.0, 112.0)  # noqa: SLF001 - the poll task's word: started at 108, deadline 112
    assert target.exposition.snapshot is good
    target._poll_started(106.0, 110.0)  # noqa: SLF001 - in time: served until the new deadline at least
    assert target.exposition.snapshot.fresh_until == 110.0
