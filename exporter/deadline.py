"""Calls that may hang on a hung server: each runs on the thread that makes it, and a deadline,
watched by one thread for the whole process, breaks it off when it passes.

statement_timeout is enforced by the server, so a server that is stopped outright (SIGSTOP, a
frozen VM) never answers it, and a black-holed network never answers at all. At the deadline the
watcher runs the call's give-up (connection.break_off of its connection, which makes the call
return at once with an error): a hung server holds the thread running its call for that call's
deadline, no longer, and no thread is started per call or per server.

Name resolution (getaddrinfo) cannot be broken off: every lookup a call makes (connection.py's
lookup_addresses: a dsn's hosts at connect, a pooler console's, pooler_fronting's) runs through
resolve(), on a bounded pool of threads, and its caller stops waiting at its timeout, and never
past the deadline of the call its thread runs (lookups_within, set by scheduler.run_call). A lookup of
a name is shared by everyone asking for it while it runs, and its answer reused for
RESOLVED_SECONDS: a hung name holds one thread however many ask, and other names' lookups go on,
on the other threads, unless RESOLVERS names hang at once.
"""

from __future__ import annotations

import contextlib
import copy
import heapq
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

from .logs import LoopErrors

T = TypeVar("T")
log = logging.getLogger(__name__)

# Threads that resolve names with a deadline: one per name being looked up (a lookup of a name is
# shared), so a hung name holds one, stuck until the resolver's own timeout, and the other names
# are looked up on the others; bounded, for a resolver that hangs on every name.
RESOLVERS = 16
# How long a finished lookup's answer (addresses or error) is reused: a burst of connects and
# console reads (every target's poll at once) asks once, and a changed name is seen a moment later.
RESOLVED_SECONDS = 1.0


class StuckCall(Exception):
    """The call did not return within its deadline."""


class Watch:
    """One deadline being watched: cancel() it when the call returns in time."""

    __slots__ = ("at", "_action", "_state", "_lock")

    def __init__(self, at: float, action: Callable[[], None]) -> None:
        self.at = at
        self._action = action
        self._state = "waiting"  # then "cancelled" or "fired", once
        self._lock = threading.Lock()

    def cancel(self) -> bool:
        """Stop watching; True if the deadline had not fired (and now never will)."""
        with self._lock:
            if self._state == "waiting":
                self._state = "cancelled"
            return self._state == "cancelled"

    def fire(self) -> bool:
        with self._lock:
            if self._state != "waiting":
                return False
            self._state = "fired"
        return True

    @property
    def fired(self) -> bool:
        return self._state == "fired"

    def run(self) -> None:
        self._action()


class Deadlines:
    """Deadlines of calls in progress, watched by one daemon thread (started at the first watch):
    at each deadline that is not cancelled, its action runs on that thread. An action must be
    quick (break a connection off, publish a failure): it holds up the deadlines after it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._heap: list[tuple[float, int, Watch]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._unexpected = LoopErrors(log, "deadline watcher")

    def watch(self, seconds: float, action: Callable[[], None]) -> Watch:
        """Run action in seconds unless the returned Watch is cancelled first."""
        watch = Watch(self._clock() + seconds, action)
        with self._cond:
            heapq.heappush(self._heap, (watch.at, next(self._order), watch))
            if self._thread is None:
                thread = threading.Thread(target=self._loop, name="deadlines", daemon=True)
                try:
                    thread.start()
                    self._thread = thread
                except RuntimeError as exc:  # out of threads: the next watch tries again, and fires this one then
                    log.error("could not start the deadline watcher (%s): tried again at the next deadline set", exc)
            self._cond.notify()
        return watch

    def _due(self) -> Watch:
        """The next watch whose deadline has passed (waits for it)."""
        with self._cond:
            while True:
                while self._heap and self._heap[0][2]._state == "cancelled":  # noqa: SLF001 - ours
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                wait = self._heap[0][0] - self._clock()
                if wait <= 0:
                    return heapq.heappop(self._heap)[2]
                self._cond.wait(wait)

    def _loop(self) -> None:
        while True:
            watch = self._due()
            if not watch.fire():
                continue
            try:
                watch.run()
            except Exception as exc:  # noqa: BLE001 - the watcher survives the actions it runs
                self._unexpected.report(exc)


# The process's one watcher: every call under a deadline (polls, tries, console reads) uses it.
DEADLINES = Deadlines()

class _Resolvers:
    """At most RESOLVERS daemon threads taking calls from one queue: one more is started only when
    none is idle (the others stuck on a hung resolver), and each ends after IDLE_SECONDS without a
    call, so the threads a hung resolver needed go again. Daemons: a resolution stuck at exit must
    not keep the process alive (concurrent.futures' threads would)."""

    IDLE_SECONDS = 60.0

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0

    def submit(self, fn: Callable[[], T]) -> tuple[threading.Event, dict[str, object], list[bool]]:
        done, box, cancelled = threading.Event(), {}, [False]

        def job() -> None:
            if cancelled[0]:
                return
            try:
                box["value"] = fn()
            except BaseException as exc:  # handed to the caller
                box["error"] = exc
            finally:
                done.set()

        with self._lock:
            self._jobs.put(job)
            if not self._idle and self._threads < RESOLVERS:
                try:  # started first, counted on success: a failed start leaves no phantom idle thread
                    threading.Thread(target=self._work, name="resolve", daemon=True).start()
                    self._threads += 1
                    self._idle += 1
                except RuntimeError as exc:  # out of threads: this lookup waits its deadline; the next tries again
                    log.error("could not start a resolver thread (%s)", exc)
        return done, box, cancelled

    def _work(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=self.IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    if self._jobs.empty():
                        self._threads -= 1
                        self._idle -= 1
                        return
                continue
            with self._lock:
                self._idle -= 1
            job()
            del job  # a failed call's error holds its frames
            with self._lock:
                self._idle += 1


_resolvers = _Resolvers()


class _Lookup:
    """One run of a lookup, shared by the callers of its key: given up (never run) when every one
    of them stopped waiting before a thread took it."""

    __slots__ = ("done", "box", "waiters", "started", "abandoned", "finished_at")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.box: dict[str, object] = {}
        self.waiters = 0
        self.started = self.abandoned = False
        self.finished_at = math.inf


_calls = threading.local()


@contextlib.contextmanager
def lookups_within(seconds: float) -> Iterator[None]:
    """Every lookup waited for on this thread inside it waits no later than seconds from now: the
    deadline of the call the thread runs (scheduler.run_call), which the call's give-up cannot
    enforce on a lookup (nothing breaks one off)."""
    previous = getattr(_calls, "ends", math.inf)
    _calls.ends = min(previous, time.monotonic() + seconds)
    try:
        yield
    finally:
        _calls.ends = previous


class Pending(Generic[T]):
    """A lookup started by lookup(): wait() for it, once."""

    def __init__(self, key: Hashable, run: _Lookup) -> None:
        self._key, self._run = key, run

    def wait(self, timeout: float, what: str) -> T:
        """Its answer (or its error, raised), waited for at most timeout, and never past the deadline
        of the call this thread runs (lookups_within); StuckCall past either."""
        run = self._run
        timeout = max(0.0, min(timeout, getattr(_calls, "ends", math.inf) - time.monotonic()))
        if not run.done.wait(timeout):
            with _lookups_lock:
                run.waiters -= 1
                if not run.waiters and not run.started:  # nobody waits for it: never run
                    run.abandoned = True
                    if _lookups.get(self._key) is run:
                        del _lookups[self._key]
            raise StuckCall(f"{what} did not return within {timeout:g}s")
        with _lookups_lock:
            run.waiters -= 1
        if "error" in run.box:
            # A copy for each caller: one error raised on several threads would share a traceback.
            raise copy.copy(run.box["error"]).with_traceback(None)  # type: ignore[union-attr]
        return run.box["value"]  # type: ignore[return-value]


# Lookups running, or finished less than RESOLVED_SECONDS ago, by key.
_lookups: dict[Hashable, _Lookup] = {}
_lookups_lock = threading.Lock()
_swept = [0.0]


def lookup(key: Hashable, fn: Callable[[], T], clock: Callable[[], float] = time.monotonic) -> Pending[T]:
    """Start fn, the lookup of key (a host name), on the resolver threads; or join the lookup of
    key already running, or finished less than RESOLVED_SECONDS ago (its answer, again)."""
    now = clock()
    with _lookups_lock:
        if now - _swept[0] >= RESOLVED_SECONDS:  # forget old answers, at most once a period
            _swept[0] = now
            for old in [k for k, run in _lookups.items() if now - run.finished_at >= RESOLVED_SECONDS]:
                del _lookups[old]
        run = _lookups.get(key)
        fresh = run is not None and now - run.finished_at < RESOLVED_SECONDS
        if run is not None and (fresh or not run.done.is_set()):
            run.waiters += 1
            return Pending(key, run)
        run = _lookups[key] = _Lookup()
        run.waiters = 1

    def job() -> None:
        with _lookups_lock:
            if run.abandoned:
                return
            run.started = True
        try:
            run.box["value"] = fn()
        except Exception as exc:  # noqa: BLE001 - handed to the callers
            run.box["error"] = exc
        finally:
            run.finished_at = clock()
            run.done.set()

    _resolvers.submit(job)
    return Pending(key, run)


def resolve(fn: Callable[[], T], timeout: float, what: str, key: Hashable | None = None) -> T:
    """fn (a name resolution) on the resolver threads, waited for at most timeout: shared with
    everyone asking for the same key (see lookup); None, a lookup of its own."""
    return lookup(object() if key is None else key, fn).wait(timeout, what)
