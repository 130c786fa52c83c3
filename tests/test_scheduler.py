"""The scheduler: every target's calls on a bounded set of workers, each when due and under its
deadline, one call per server at a time, and a hung server delays no other server's targets."""

from __future__ import annotations

import gc
import math
import signal
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest

from exporter.config import ConfigError, parse_config, parse_fleet
from exporter.scheduler import PollTask, ProbeTask, Scheduler, Task, run_call
from exporter.snapshot import PollStats, Snapshot
from tests.conftest import needs_own_clusters, wait_until
from tests.metrics_util import parse
from tests.pgcluster import Cluster


class FakeTask(Task):
    """A call that records when it ran, and hangs while its server is hung (until given up)."""

    def __init__(self, name: str, turn: str | None, every: float, log: list[tuple[str, str, float, float]],
                 hung: threading.Event | None = None, deadline: float = 0.3) -> None:
        super().__init__(turn)
        self.name, self._every, self._log, self._hung, self._deadline = name, every, log, hung, deadline
        self._release = threading.Event()
        self.given_up = 0
        self.closed = False

    def start(self) -> float:
        self._release.clear()
        return self._deadline

    def call(self) -> None:
        began = time.monotonic()
        if self._hung is not None and self._hung.is_set():
            self._release.wait(30)  # a stopped server: only the give-up's break-off ends the call
        else:
            time.sleep(0.01)
        self._log.append((self.name, str(self.turn), began, time.monotonic()))

    def give_up(self) -> None:
        self.given_up += 1
        self._release.set()  # what break_off does to a stuck connection

    def next_delay(self) -> float:
        return self._every

    def close(self) -> None:
        self.closed = True


def overlaps(log: list[tuple[str, str, float, float]], turn: str) -> bool:
    calls = sorted((began, ended) for _, t, began, ended in log if t == turn)
    return any(later[0] < earlier[1] for earlier, later in zip(calls, calls[1:]))


def test_a_hung_server_holds_one_worker_and_delays_no_other_servers_calls() -> None:
    log: list[tuple[str, str, float, float]] = []
    hung = threading.Event()
    hung.set()
    scheduler = Scheduler(max_workers=3)
    stuck = [FakeTask(f"stuck-{i}", "hung", 0.1, log, hung) for i in range(10)]
    healthy = [FakeTask(f"ok-{i}", f"server-{i % 2}", 0.2, log) for i in range(6)]
    for task in stuck + healthy:
        scheduler.add(task)
    try:
        time.sleep(3)
    finally:
        scheduler.stop()
    assert scheduler.workers <= 3
    # The hung server's calls ran one at a time, each given up at its deadline (0.3 s): ten calls
    # waited their turn in its queue, holding no worker, so the other servers' calls ran on time.
    assert not overlaps(log, "hung") and sum(task.given_up for task in stuck) >= 5
    for task in healthy:
        # 3 s at 0.2 s: 15 calls on time; 10 at least, so a second late in all at most.
        assert sum(name == task.name for name, *_ in log) >= 10, task.name
    assert not overlaps(log, "server-0") and not overlaps(log, "server-1")


def _worker_threads(before: set[threading.Thread]) -> int:
    """Worker threads alive now but those in before (other tests' schedulers' workers, still ending)."""
    return sum(t.name.startswith("worker-") and t not in before for t in threading.enumerate())


class Counted(FakeTask):
    """A FakeTask that counts, at each call, the worker threads of the scheduler under test."""

    def __init__(self, *args, seen: list[int], before: set[threading.Thread], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._seen, self._before = seen, before

    def call(self) -> None:
        self._seen.append(_worker_threads(self._before))
        super().call()


def test_workers_are_started_as_calls_need_them_and_never_more_than_max_workers() -> None:
    # 40 servers' calls of 10 ms every 50 ms need 8 workers at once: 4 are started, never more.
    log: list[tuple[str, str, float, float]] = []
    seen: list[int] = []
    before = set(threading.enumerate())
    scheduler = Scheduler(max_workers=4)
    tasks = [Counted(f"t{i}", f"s{i}", 0.05, log, seen=seen, before=before) for i in range(40)]
    for task in tasks:
        scheduler.add(task)
    try:
        wait_until(lambda: all(any(name == t.name for name, *_ in log) for t in tasks), timeout=20)
    finally:
        scheduler.stop()
    assert max(seen) == 4, sorted(set(seen))
    assert scheduler.workers <= 4


def test_one_servers_calls_take_turns_and_hold_no_worker_while_waiting() -> None:
    # Single-server mode: a poll and a probe of one server. The poll hangs until its deadline; the
    # probe, due meanwhile, waits for the turn without a worker, so another task (a turn of its own)
    # keeps running on the second of two workers, and no third is started.
    log: list[tuple[str, str, float, float]] = []
    seen: list[int] = []
    before = set(threading.enumerate())
    hung = threading.Event()
    hung.set()
    scheduler = Scheduler(max_workers=2)
    poll = Counted("poll", "s", 0.05, log, hung, deadline=1.0, seen=seen, before=before)
    probe = Counted("probe", "s", 0.03, log, seen=seen, before=before)
    other = Counted("other", "elsewhere", 0.05, log, seen=seen, before=before)
    scheduler.add(poll)
    try:
        wait_until(lambda: poll in scheduler._running, timeout=5)  # the poll's call hangs
        scheduler.add(probe)
        scheduler.add(other)
        wait_until(lambda: poll.given_up, timeout=10)
        hung.clear()
        wait_until(lambda: sum(name == "probe" for name, *_ in log) >= 5, timeout=10)
    finally:
        scheduler.stop()
    assert not overlaps(log, "s")
    calls = [name for name, *_ in log]
    # The probe ran only after the hung poll returned; "other" ran meanwhile, on the free worker.
    assert calls.index("probe") > calls.index("poll") > calls.index("other")
    assert calls[:calls.index("poll")].count("other") >= 5, calls
    assert max(seen) <= 2, sorted(set(seen))


def test_a_removed_task_is_closed_once_its_call_returns_and_a_sleeping_task_wakes() -> None:
    log: list[tuple[str, str, float, float]] = []
    hung = threading.Event()
    scheduler = Scheduler(max_workers=2)
    task = FakeTask("t", "s", 0.05, log, hung, deadline=1.0)
    hung.set()
    scheduler.add(task)
    try:
        wait_until(lambda: task._release is not None and not task._release.is_set() and scheduler._running, timeout=5)
        scheduler.remove(task)
        assert not task.closed  # its call runs: closed when it returns
        wait_until(lambda: task.closed, timeout=5)  # given up at its deadline, returned, closed
        assert not scheduler.scheduled(task)

        class Sleeper(FakeTask):
            def next_delay(self) -> float:
                return math.inf

        sleeper = Sleeper("sleeper", None, 0, log)
        scheduler.add(sleeper)
        wait_until(lambda: sum(name == "sleeper" for name, *_ in log) == 1, timeout=5)
        time.sleep(0.3)
        assert sum(name == "sleeper" for name, *_ in log) == 1  # asleep until woken
        scheduler.wake(sleeper)
        wait_until(lambda: sum(name == "sleeper" for name, *_ in log) == 2, timeout=5)
    finally:
        scheduler.stop()


def test_max_workers_is_a_top_level_count() -> None:
    assert parse_fleet({"dsn": "host=x", "locks": []}, "t").max_workers == 32
    assert parse_fleet({"dsn": "host=x", "max_workers": 4, "locks": []}, "t").max_workers == 4
    assert parse_fleet({"max_workers": 64, "targets": {"a": {"dsn": "host=a"}}}, "t").max_workers == 64
    for bad, message in ((0, "max_workers: 0 is outside a count of threads (1 .. 1024)"),
                         ("many", "max_workers: expected an integer (a count of threads), got a string ('many')")):
        with pytest.raises(ConfigError) as info:
            parse_fleet({"max_workers": bad, "targets": {"a": {"dsn": "host=a"}}}, "t")
        assert info.value.details == [message]
    with pytest.raises(ConfigError) as info:
        parse_fleet({"max_workers": 4, "targets": {"a": {"dsn": "host=a", "max_workers": 2}}}, "t")
    assert info.value.details[0].startswith("targets.a.max_workers: unknown field")


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


# Threads besides the workers: main (waits for signals), the HTTP server's listener and one per
# request being served, the watchdog, the renderer, the deadline watcher, and two resolver threads
# (one per host name being looked up: none here, the dsns give addresses).
OTHER_THREADS = 8


@pytest.mark.slow
def test_a_stopped_server_delays_no_other_servers_targets_and_threads_stay_bounded(exporters, server) -> None:
    """40 targets, 20 on a server stopped with SIGSTOP and 20 on a healthy one, 4 workers: every
    healthy target keeps being polled on time (the gaps between its own last_poll_timestamp_seconds
    at most its poll_interval_seconds and one second), and the process runs at most 4 + 8 threads."""
    needs_own_clusters()
    hung = Cluster().start()
    try:
        lock = [{"name": "leader", "key": 4242}]
        healthy = [f"ok{i}" for i in range(20)]
        targets = {name: {"dsn": server.dsn(application_name=name), "locks": lock} for name in healthy}
        targets.update({f"frozen{i}": {"dsn": hung.dsn(application_name=f"frozen{i}"), "locks": lock} for i in range(20)})
        proc = exporters({"poll_interval": "2s", "max_workers": 4, "targets": targets})
        target_up = "pg_advisory_lock_exporter_target_up"
        wait_until(lambda: all(v == 1 for (n, _), v in parse(_get(proc, "/metrics")).items() if n == target_up)
                   and sum(n == target_up for n, _ in parse(_get(proc, "/metrics"))) == 40, timeout=60)
        hung.signal_all(signal.SIGSTOP)
        try:
            seen = _watch_polls(proc, healthy, seconds=10)
            threads = _threads(proc.proc.pid)
            figures = parse(_get(proc, "/metrics"))
        finally:
            hung.signal_all(signal.SIGCONT)
        assert figures[(target_up, (("target", "frozen0"),))] == 0  # the stopped server's are "don't know"
        print(f"threads: {threads}; the healthy targets' worst gap: {max(max(b - a for a, b in zip(s, s[1:])) for _, s in seen.values()):.2f}s")
        assert threads <= 4 + OTHER_THREADS, threads
        for name in healthy:
            interval, stamps = seen[name]
            gaps = [b - a for a, b in zip(stamps, stamps[1:])]
            assert len(gaps) >= 4, (name, stamps)  # 10 s at 2 s polls
            assert max(gaps) <= 2.0 + 1, (name, interval, gaps)  # the configured interval, a second late at most
    finally:
        hung.destroy()


def _get(proc, path: str) -> str:
    try:
        return proc.get(path, timeout=10)[1]
    except OSError:
        return ""


def _watch_polls(proc, names: list[str], seconds: float) -> dict[str, tuple[float, list[float]]]:
    """Each target's poll interval and the distinct last_poll_timestamp_seconds it served, read
    from /probe round after round for a while; a pair of readings between which more than one poll
    ran (its poll count moved by more) is left out: the poll between them was not seen."""
    stamps: dict[str, list[float]] = {name: [] for name in names}
    counts: dict[str, float] = {}
    interval: dict[str, float] = {}
    ended = time.monotonic() + seconds
    while time.monotonic() < ended:
        for name in names:
            figures = parse(_get(proc, f"/probe?target={name}"))
            stamp = figures.get(("pg_advisory_lock_exporter_last_poll_timestamp_seconds", ()))
            count = figures.get(("pg_advisory_lock_exporter_poll_duration_seconds_count", ()))
            interval[name] = figures.get(("pg_advisory_lock_exporter_poll_interval_seconds", ()), math.nan)
            if stamp is None or count is None or (stamps[name] and stamp == stamps[name][-1]):
                continue
            if name in counts and count - counts[name] > 1:
                stamps[name] = []  # a poll went unseen: start the run of readings anew
            stamps[name].append(stamp)
            counts[name] = count
        time.sleep(0.1)
    return {name: (interval[name], stamps[name]) for name in names}


def test_workers_a_burst_needed_end_when_idle(monkeypatch) -> None:
    # The chaos run's budget: threads come back to where they were after the faults.
    from exporter import scheduler as module

    monkeypatch.setattr(module, "IDLE_SECONDS", 0.3)
    log: list[tuple[str, str, float, float]] = []
    hung = threading.Event()
    hung.set()
    scheduler = Scheduler(max_workers=6)
    stuck = [FakeTask(f"s{i}", f"hung-{i}", 0.05, log, hung, deadline=0.5) for i in range(4)]
    quiet = FakeTask("quiet", "ok", 0.05, log)
    for task in [*stuck, quiet]:
        scheduler.add(task)
    try:
        wait_until(lambda: scheduler.workers >= 5, timeout=5)  # four hung servers' calls, and more
        for task in stuck:
            scheduler.remove(task)
        wait_until(lambda: scheduler.workers <= 2, timeout=10)  # the quiet one's, and the one watching
        count = len(log)
        wait_until(lambda: len(log) > count + 5, timeout=5)  # and the calls go on
    finally:
        scheduler.stop()


def test_a_failed_thread_start_leaves_the_scheduler_calling_on_the_workers_there_are(monkeypatch) -> None:
    # Out of threads (a pids limit, memory): the worker that could not start another goes on with its
    # call, its server's turn is given back, and no phantom idle worker stops the next from starting.
    original = threading.Thread.start
    failed: list[str] = []

    def start(self: threading.Thread) -> None:
        if self.name.startswith("worker-") and self.name != "worker-0" and not failed:
            failed.append(self.name)
            raise RuntimeError("can't start new thread")
        original(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    log: list[tuple[str, str, float, float]] = []
    scheduler = Scheduler(max_workers=4)
    try:
        scheduler.add(FakeTask("a", "s1", 0.05, log))
        wait_until(lambda: failed, timeout=5)
        monkeypatch.setattr(threading.Thread, "start", original)
        scheduler.add(FakeTask("b", "s2", 0.05, log))
        wait_until(lambda: sum(name == "a" for name, *_ in log) >= 3 and sum(name == "b" for name, *_ in log) >= 3,
                   timeout=10)
    finally:
        scheduler.stop()


def test_a_first_worker_that_cannot_start_is_tried_again(monkeypatch) -> None:
    original = threading.Thread.start
    failed: list[str] = []

    def start(self: threading.Thread) -> None:
        if self.name.startswith("worker-") and not failed:
            failed.append(self.name)
            raise RuntimeError("can't start new thread")
        original(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    log: list[tuple[str, str, float, float]] = []
    scheduler = Scheduler(max_workers=2)
    try:
        scheduler.add(FakeTask("a", "s1", 0.05, log))  # no worker at all: nothing else would call it
        wait_until(lambda: len(log) >= 3, timeout=10)
    finally:
        scheduler.stop()


class HeldDeadlines:
    """A deadline watcher held up: the actions set are run when the test says."""

    def __init__(self) -> None:
        self.actions: list[Callable[[], None]] = []

    def watch(self, seconds: float, action: Callable[[], None]) -> "HeldDeadlines":
        self.actions.append(action)
        return self

    def cancel(self) -> bool:
        return False  # fired already, as far as the call knows: the watcher is about to run it


class FakePoller:
    interval = 1.0

    def __init__(self) -> None:
        self.given_up: list[object] = []
        self.published: list[Snapshot] = []

    def _clock(self) -> float:
        return time.monotonic()

    def apply_pending_config(self) -> None:
        pass

    def deadline(self) -> float:
        return 5.0

    def poll_once(self, ticket: object) -> Snapshot:
        return Snapshot(up=True, stats=PollStats())

    def give_up(self, ticket: object, deadline: float) -> Snapshot:
        self.given_up.append(ticket)
        return Snapshot(up=False, stats=PollStats())

    def publish(self, snapshot: Snapshot) -> None:
        self.published.append(snapshot)

    def backoff(self, failures: int) -> float:
        return 1.0

    def close(self) -> None:
        pass


def test_a_give_up_run_late_is_its_own_calls_and_never_breaks_off_the_next() -> None:
    # The watcher fired at the first call's deadline, and was held up before running its give-up
    # while that call returned and the next started: the give-up is the first call's (over: nothing
    # to do), not the second's (which it would break off, and count as failed).
    poller = FakePoller()
    task = PollTask(poller, None)  # type: ignore[arg-type]
    watcher = HeldDeadlines()
    run_call(task, watcher)  # type: ignore[arg-type]
    assert task.start() is not None  # the next call starts ...
    watcher.actions[0]()  # ... and the first call's give-up runs now
    assert poller.given_up == [] and [s.up for s in poller.published] == [True]


def test_a_probes_give_up_run_late_is_its_own_tries() -> None:
    prober = FakeProber()
    task = ProbeTask(prober, None, clock=lambda: 1000.0)  # type: ignore[arg-type]
    watcher = HeldDeadlines()
    run_call(task, watcher)  # type: ignore[arg-type]
    task.start()  # the next try starts (no lock due: it starts nothing) ...
    watcher.actions[0]()  # ... and the first try's give-up runs now
    assert prober.given_up == []


class FakeProber:
    def __init__(self) -> None:
        self.locks = parse_config({"dsn": "host=h", "locks": [{"name": "a", "key": 1, "probe": {"interval": "5s"}},
                                                              {"name": "b", "key": 2, "probe": {"interval": "5s"}}]},
                                  "t").probed
        self.given_up: list[str] = []

    def apply_pending_config(self) -> bool:
        return False

    def deadline(self) -> float:
        return 5.0

    def try_lock(self, lock: object) -> None:
        pass

    def give_up(self, lock: object, deadline: float) -> None:
        self.given_up.append(str(lock))

    def publish(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_a_task_removed_while_woken_is_not_kept_with_its_poller() -> None:
    # Woken (a reload) while its call ran, then removed (another reload) before the call returned:
    # the scheduler lets go of it, and of everything it holds, once that call returns.
    entered, release = threading.Event(), threading.Event()

    class Held(Task):
        def start(self) -> None:
            entered.set()
            release.wait(10)
            return None

        def next_delay(self) -> float:
            return 0.05

    scheduler = Scheduler(max_workers=1)
    task = Held("s")
    gone = weakref.ref(task)
    scheduler.add(task)
    try:
        assert entered.wait(5)
        scheduler.wake(task)
        scheduler.remove(task)
        del task
        release.set()
    finally:
        scheduler.stop()
    wait_until(lambda: scheduler.workers == 0, timeout=5)
    gc.collect()
    assert gone() is None


class Sleeper(FakeTask):
    """Called when due, then asleep until woken."""

    def next_delay(self) -> float:
        return math.inf


def test_an_entry_a_wake_or_a_removal_left_behind_is_never_called() -> None:
    # A wake or a removal leaves the task's old entry in the heap (it is skipped where popped, so a
    # reload of a thousand targets costs no scan of every queue): that entry, once due, calls nothing.
    log: list[tuple[str, str, float, float]] = []
    scheduler = Scheduler(max_workers=2)
    woken = Sleeper("woken", "a", 0, log)
    removed = Sleeper("removed", "b", 0, log)
    scheduler.add(woken, delay=1.0)
    scheduler.add(removed, delay=1.0)
    old_due = time.monotonic() + 1.0  # at or after both old entries' due time
    try:
        for _ in range(50):
            scheduler.wake(woken)  # due now, fifty times over: called, once more if woken while called
        scheduler.remove(removed)
        wait_until(lambda: any(name == "woken" for name, *_ in log), timeout=5)
        # Every old entry popped (a call it made would be running, or logged, by then).
        wait_until(lambda: not scheduler._running and all(entry[0] > old_due for entry in scheduler._due), timeout=10)
    finally:
        scheduler.stop()
    assert [name for name, *_ in log] in (["woken"], ["woken", "woken"])
    assert removed.closed and not scheduler.scheduled(removed)


def test_a_task_removed_while_waiting_for_its_servers_turn_is_let_go_at_once() -> None:
    log: list[tuple[str, str, float, float]] = []
    hung = threading.Event()
    hung.set()
    scheduler = Scheduler(max_workers=2)
    holder = FakeTask("holder", "s", 0.05, log, hung, deadline=2.0)  # holds the server's turn 2 s
    waiter = FakeTask("waiter", "s", 0.05, log)
    gone = weakref.ref(waiter)
    scheduler.add(holder)
    try:
        wait_until(lambda: holder in scheduler._running, timeout=5)
        scheduler.add(waiter)
        wait_until(lambda: "s" in scheduler._waiting, timeout=5)  # due, waiting for the turn
        scheduler.remove(waiter)
        assert waiter.closed and "s" not in scheduler._waiting
        del waiter
        gc.collect()
        assert gone() is None  # let go now, not when the holder's call returns
        assert not holder.given_up
        scheduler.wake(holder)  # a wake of a running task: due again as soon as its call returns
        wait_until(lambda: holder.given_up, timeout=5)
        hung.clear()
        wait_until(lambda: sum(name == "holder" for name, *_ in log) >= 3, timeout=5)
    finally:
        scheduler.stop()
    assert all(name == "holder" for name, *_ in log)


def test_a_removed_task_due_later_is_let_go_at_once() -> None:
    # Removed (a reload) while it waits for its next due time, a minute away: the scheduler holds
    # nothing of it from then on (a Target's poller and exposition hang off its tasks), not until
    # its entry would have been due (a probe's interval has no upper bound).
    scheduler = Scheduler(max_workers=1)
    task = FakeTask("later", "s", 0.05, [])
    gone = weakref.ref(task)
    scheduler.add(task, delay=60.0)
    try:
        scheduler.remove(task)
        assert task.closed
        del task
        gc.collect()
        assert gone() is None
    finally:
        scheduler.stop()


def test_a_turn_handed_to_a_task_removed_before_it_ran_goes_on_to_the_next_waiter() -> None:
    # Server s: X's call runs, Y and Z wait for the turn. X returns and hands the turn to Y (due
    # again, with no worker free: the freed one takes F, due earlier). A reload then removes X and
    # Y, keeping Z: Z, due since, must still be called (nothing else of server s will run to hand
    # it the turn).
    log: list[tuple[str, str, float, float]] = []
    hung = threading.Event()
    hung.set()
    scheduler = Scheduler(max_workers=3)
    x = FakeTask("X", "s", 60.0, log, hung, deadline=1.0)
    y, z = (FakeTask(name, "s", 60.0, log) for name in ("Y", "Z"))
    h, e, f = (FakeTask(name, name, 60.0, log, hung, deadline=3.0) for name in ("H", "E", "F"))
    try:
        scheduler.add(x)
        scheduler.add(h)
        wait_until(lambda: {x, h} <= scheduler._running, timeout=5)
        scheduler.add(y)
        scheduler.add(z)
        wait_until(lambda: len(scheduler._waiting.get("s", ())) == 2, timeout=5)  # popped by the third worker
        scheduler.add(e)
        wait_until(lambda: e in scheduler._running, timeout=5)  # every worker busy now
        scheduler.add(f, delay=-100.0)  # due before Y: the worker X frees takes it
        wait_until(lambda: f in scheduler._running, timeout=5)  # X returned, handed the turn to Y
        assert y not in scheduler._running and [entry[2] for entry in scheduler._waiting["s"]] == [z]  # Y due, not run
        scheduler.remove(x)
        scheduler.remove(y)
        hung.clear()
        wait_until(lambda: any(name == "Z" for name, *_ in log), timeout=10)
    finally:
        scheduler.stop()
    assert not any(name == "Y" for name, *_ in log)
