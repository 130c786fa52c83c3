"""Calls that may hang: a deadline watched by one thread gives them up, and the caller's own
thread is the one that waits (no thread per call); name resolutions on a bounded pool, one
lookup of a name shared by everyone asking for it."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from exporter import deadline
from exporter.deadline import Deadlines, StuckCall, resolve
from exporter.dsn import BACKOFF_FIRST, reconnect_delay
from tests.conftest import hang_lookups


def test_a_deadline_fires_once_unless_cancelled_first() -> None:
    watcher = Deadlines()
    fired: list[str] = []
    late = watcher.watch(0.05, lambda: fired.append("late"))
    early = watcher.watch(5, lambda: fired.append("never"))
    assert early.cancel() and early.cancel()  # cancelled before its time: never fires
    for _ in range(200):
        if late.fired:
            break
        time.sleep(0.01)
    assert fired == ["late"] and late.fired
    assert not late.cancel()  # fired already: the call's give-up has run


def test_deadlines_fire_in_order_on_one_thread() -> None:
    watcher = Deadlines()
    seen: list[tuple[str, str]] = []
    done = threading.Event()
    watcher.watch(0.2, lambda: (seen.append(("b", threading.current_thread().name)), done.set()))
    watcher.watch(0.1, lambda: seen.append(("a", threading.current_thread().name)))
    assert done.wait(5)
    assert seen == [("a", "deadlines"), ("b", "deadlines")]


def test_an_action_that_raises_leaves_the_watcher_running() -> None:
    watcher = Deadlines()
    done = threading.Event()
    watcher.watch(0.01, lambda: 1 / 0)
    watcher.watch(0.05, done.set)
    assert done.wait(5)


def test_a_resolution_is_waited_for_at_most_its_deadline_and_the_pool_stays_bounded() -> None:
    release = threading.Event()
    for _ in range(deadline.RESOLVERS + 2):
        with pytest.raises(StuckCall, match="slow.example did not return within"):
            resolve(release.wait, 0.05, "slow.example")
    assert sum(t.name == "resolve" for t in threading.enumerate()) <= deadline.RESOLVERS
    release.set()
    assert resolve(lambda: 42, 5, "x") == 42
    with pytest.raises(ZeroDivisionError):
        resolve(lambda: 1 / 0, 5, "x")


def test_a_hung_name_holds_one_resolver_thread_however_many_ask_and_other_names_are_still_looked_up(
        monkeypatch) -> None:
    """Two names behind a hung resolver, each asked more times than there are resolver threads (every
    target's poll asks for its pooler's name): each holds one thread, and another name is looked up."""
    from exporter.connection import lookup_addresses

    asked: list[str] = []
    release = hang_lookups(monkeypatch, lambda host: host.startswith("hung-"), alias={"healthy.example": "127.0.0.1"},
                           asked=asked)
    # Names of this run only: an answer of a run before (its hung lookups released, so failed) is
    # reused for RESOLVED_SECONDS, and would answer at once (pytest-repeat found it).
    hung = [f"hung-{which}-{uuid.uuid4().hex[:8]}.example" for which in "ab"]
    try:
        for _ in range(deadline.RESOLVERS + 1):
            answers = lookup_addresses(hung, 0.05)
            assert all(isinstance(found, StuckCall) for found in answers.values()), answers
        assert lookup_addresses(["healthy.example"], 5) == {"healthy.example": ("127.0.0.1",)}
        assert sorted(asked) == hung  # one lookup each, shared
    finally:
        release.set()


def test_a_finished_lookup_is_reused_for_a_moment_and_an_abandoned_one_never_runs() -> None:
    calls: list[str] = []
    run = uuid.uuid4().hex  # keys of this run only: a run before's answers are reused for a moment too
    assert resolve(lambda: calls.append("a") or 1, 5, "a", key=("reused", run)) == 1
    assert resolve(lambda: calls.append("b") or 2, 5, "b", key=("reused", run)) == 1  # within RESOLVED_SECONDS
    assert calls == ["a"]
    # Every resolver thread stuck: a lookup nobody waits for any more is dropped, never run.
    release = threading.Event()
    try:
        for index in range(deadline.RESOLVERS):
            deadline.lookup(("stuck", index, run), release.wait)
        with pytest.raises(StuckCall, match="queued did not return within"):
            resolve(lambda: calls.append("queued"), 0.05, "queued", key=("queued", run))
    finally:
        release.set()
    assert resolve(lambda: 3, 5, "after", key=("after", run)) == 3
    assert "queued" not in calls


def test_a_lookup_waits_no_longer_than_the_deadline_of_the_call_its_thread_runs() -> None:
    """A call's give-up cannot break a lookup off: the lookup itself stops waiting at the call's
    deadline (scheduler.run_call), whatever the lookup's own timeout."""
    from exporter.scheduler import Task, run_call

    release = threading.Event()
    failures: list[BaseException] = []
    run = uuid.uuid4().hex  # a key of this run only: a run before's answer is reused for a moment

    class Looking(Task):
        def start(self) -> float:
            return 0.1

        def call(self) -> None:
            try:
                resolve(release.wait, 30, "hung-call.example", key=("hung-call.example", run))
            except StuckCall as exc:
                failures.append(exc)

        def give_up(self) -> None:
            pass  # nothing to break off: the lookup holds no socket

        def next_delay(self) -> float:
            return 1.0

    worker = threading.Thread(target=run_call, args=(Looking(None),), daemon=True)
    try:
        worker.start()
        worker.join(5)
        assert not worker.is_alive() and len(failures) == 1, failures
    finally:
        release.set()


def test_the_reconnect_backoff_doubles_with_jitter_and_is_capped() -> None:
    for failures in range(1, 40):
        delay = reconnect_delay(failures, cap=1.0)
        expected = min(1.0, BACKOFF_FIRST * 2 ** (failures - 1))
        assert expected * 0.5 <= delay <= expected


def test_resolver_threads_a_hung_resolver_needed_end_when_idle() -> None:
    pool = deadline._Resolvers()  # noqa: SLF001 - one of its own, with a short idle time
    pool.IDLE_SECONDS = 0.2
    release = threading.Event()
    stuck = pool.submit(release.wait)[0]
    for _ in range(100):  # taken by the first thread (a caller waits for it before its next call)
        if pool._idle == 0:  # noqa: SLF001
            break
        time.sleep(0.05)
    quick = pool.submit(lambda: 1)[0]  # the first is stuck: a second thread takes it
    assert quick.wait(5) and pool._threads == 2  # noqa: SLF001
    release.set()
    assert stuck.wait(5)
    for _ in range(100):
        if pool._threads == 0:  # noqa: SLF001
            break
        time.sleep(0.05)
    assert pool._threads == 0  # noqa: SLF001 - both ended, idle


def _no_thread_named(name: str, monkeypatch) -> list[str]:
    """threading.Thread.start fails once for the first thread called name (out of threads)."""
    original = threading.Thread.start
    failed: list[str] = []

    def start(self: threading.Thread) -> None:
        if self.name == name and not failed:
            failed.append(name)
            raise RuntimeError("can't start new thread")
        original(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    return failed


def test_a_watcher_that_could_not_start_is_started_by_the_next_deadline_and_fires_both(monkeypatch) -> None:
    failed = _no_thread_named("deadlines", monkeypatch)
    watcher = Deadlines()
    first, second = threading.Event(), threading.Event()
    watcher.watch(0.01, first.set)  # does not raise: the call it watches goes on
    assert failed
    watcher.watch(0.01, second.set)
    assert first.wait(5) and second.wait(5)


def test_a_resolver_that_could_not_start_leaves_no_phantom_idle_thread(monkeypatch, caplog) -> None:
    failed = _no_thread_named("resolve", monkeypatch)
    resolvers = deadline._Resolvers()  # noqa: SLF001 - a pool of its own, none idle yet
    monkeypatch.setattr(deadline, "_resolvers", resolvers)
    with pytest.raises(StuckCall):
        resolve(lambda: 1, 0.05, "x")  # no thread to run it: waited for its deadline only
    assert failed and "could not start a resolver thread" in caplog.text
    assert resolve(lambda: 42, 5, "x") == 42  # the next one starts a thread
