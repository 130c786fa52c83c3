"""When every call to a server runs, for all targets: a heap of next-due times and a bounded set of
worker threads (max_workers), each call under its deadline (deadline.DEADLINES).

The promises, each kept here and nowhere else:
- a call runs when it is due, on the first free worker; workers are started as calls need them,
  never more than max_workers, and end when not needed for a minute;
- at most one call in flight per server (its turn: the targets of one server, their polls and
  their probes' tries, take turns, so no poll sees another's try); a call whose server's turn is
  taken waits in that server's queue and holds no worker;
- at a call's deadline its task gives up (breaks its connection off, so the call returns now, and
  publishes the failure): a hung server holds the one worker running its call, for that call's
  deadline, and delays no other server's calls while a worker is free.

Why threads and not an event loop (psycopg 3 has async connections): measured, the threads are
not what costs. At 1,000 targets polled every 15 s the calls never needed more than 5 workers at
once (10 threads in the process), and the process took 18.8% of a core, nearly all of it Python
turning rows into snapshots and text, which an event loop runs on one thread all the same
(README, Benchmark). An event loop would save those few threads at the price of every poll,
console read and try rewritten on async connections, and of a stuck call's break-off done anew;
a pool of worker threads keeps today's calls as they are.

PollTask and ProbeTask are the loops that Poller and Prober ran on threads of their own: when the
next poll or try is due (interval, overrun, backoff, the tries spread over each lock's interval).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

from .config import DEFAULT_MAX_WORKERS
from .deadline import DEADLINES, Deadlines, lookups_within
from .logs import LoopErrors
from .poller import Poller, PollTicket
from .probe import Prober, first_due
from .snapshot import Snapshot

log = logging.getLogger(__name__)

# After a task's step raised (a bug: steps turn failures into results), it is due again after this.
RETRY_SECONDS = 1.0
# The place in _queued of a task whose live entry is in _due (any other place is a turn).
_DUE = object()
# An entry of _due or _waiting: [due time, order, task]; a list, not a tuple, so that a removed or
# woken task's entry left in _due can let go of its task (None) where it lies.
_Entry = list[Any]
# A worker not called for this long ends (but the one watching the due times): the workers a burst
# or a hung server's calls needed go, and the process's threads come back to where they were.
IDLE_SECONDS = 60.0


class Task:
    """One recurring piece of work of one target, one call at a time. The scheduler calls, from one
    worker: start() (the call's deadline in seconds, or None when there is nothing to call now),
    then call() unless start said None, then next_delay(); from the deadline watcher, if the
    deadline passes before call() returns, the give-up that give_up_action() returned right after
    start (bound to that call: the watcher may run it late, once the next call has started, and it
    must not break that one off). close() once, after the task is removed and no call of it runs."""

    name = ""

    def __init__(self, turn: Hashable | None) -> None:
        self.turn = turn  # the server whose turn its calls take (None: takes none)

    def start(self) -> float | None:
        raise NotImplementedError

    def call(self) -> None:
        raise NotImplementedError

    def give_up(self) -> None:
        raise NotImplementedError

    def give_up_action(self) -> Callable[[], None]:
        """The give-up of the call start() just began (a task whose give_up reads no per-call
        state may keep this default)."""
        return self.give_up

    def next_delay(self) -> float:
        """Seconds until this task is due again (math.inf: until woken)."""
        raise NotImplementedError

    def close(self) -> None:
        """The task is removed and none of its calls runs: let its connections go."""


def run_call(task: Task, deadlines: Deadlines = DEADLINES) -> float:
    """One call of task under its deadline, on this thread (a worker's step; tests call it):
    returns when the call does (at once after its give-up breaks it off), with when it is due again."""
    deadline = task.start()
    if deadline is not None:
        watch = deadlines.watch(deadline, task.give_up_action())
        try:
            with lookups_within(deadline):  # a name lookup is the one wait its give-up cannot end
                task.call()
        finally:
            watch.cancel()
    return task.next_delay()


class _Once:
    """A call ends once: by returning or by its deadline, whichever comes first."""

    __slots__ = ("_lock", "_taken")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._taken = False

    def take(self) -> bool:
        with self._lock:
            taken, self._taken = self._taken, True
            return not taken


class Scheduler:
    """Tasks by next-due time on at most max_workers threads (see the module's docstring).

    State, under _lock: every task added and not removed is in _tasks and in exactly one of _due
    (waiting for its time, or for a worker), _waiting[turn] (due, its server's turn taken; by due
    time), _running (a call of it runs) or none (asleep until woken: math.inf). _queued says which
    entry of _due or _waiting is a task's live one: an entry it does not name (the task was removed,
    or woken and pushed anew) is skipped where it is popped, so a reload that removes or wakes a
    thousand tasks costs a dict operation each, not a scan of every queue each; such an entry left
    in _due holds no task (its task is None), so a removed target is let go at once, not when its
    entry would have been due (a probe's interval has no upper bound). _taken holds the
    turns of the calls running; a turn not taken has no call waiting for it, but while the one it
    was handed to (_hand_on: by the call that returned, or by the removal of the one it was handed
    to before) is due in _due. Of the idle workers one, the leader, waits for the next due time;
    the others wait to be called (a due time wakes one thread, not all), and end when not called for
    IDLE_SECONDS."""

    def __init__(self, max_workers: int = DEFAULT_MAX_WORKERS, clock: Callable[[], float] = time.monotonic,
                 deadlines: Deadlines = DEADLINES) -> None:
        self.max_workers = max_workers
        self._clock = clock
        self._deadlines = deadlines
        self._lock = threading.Lock()
        self._leader_cond = threading.Condition(self._lock)
        # The other idle workers, each waiting on its own condition, the latest idle last: the one
        # called next is the one idle the shortest, so a worker not needed stays idle, and ends.
        self._followers: list[threading.Condition] = []
        self._leader: int | None = None
        self._due: list[_Entry] = []
        self._waiting: dict[Hashable, list[_Entry]] = {}
        self._queued: dict[Task, tuple[_Entry, Hashable]] = {}  # task -> its live entry, _DUE or its turn
        self._tasks: set[Task] = set()
        self._running: set[Task] = set()
        self._woken: set[Task] = set()  # woken while a call of theirs ran: due as soon as it returns
        self._taken: set[Hashable] = set()
        self._order = itertools.count()
        self._workers: list[threading.Thread] = []  # running now
        self._names = itertools.count()
        self._idle = 0
        self._stopping = False
        self._unexpected = LoopErrors(log, "scheduler")

    # -- what the fleet asks ------------------------------------------------------------

    def add(self, task: Task, delay: float = 0.0) -> None:
        with self._lock:
            self._tasks.add(task)
            self._push(task, self._clock() + delay)

    def remove(self, task: Task) -> None:
        """No call of task starts from now on; closed now, or when the call of it running returns."""
        with self._lock:
            self._tasks.discard(task)
            running = task in self._running
            self._drop(task)
        if not running:
            task.close()

    def wake(self, task: Task) -> None:
        """Task is due now (a reload changed it); if a call of it runs, as soon as it returns."""
        with self._lock:
            if task not in self._tasks:
                return
            if task in self._running:
                self._woken.add(task)
                return
            if self._queued.get(task, (None, _DUE))[1] is not _DUE:
                return  # due already, waiting for its server's turn
            self._drop(task)
            self._push(task, self._clock())

    def stop(self) -> None:
        """No call starts from now on; calls running end by themselves (their deadlines stand)."""
        with self._lock:
            self._stopping = True
            self._leader_cond.notify_all()
            for follower in self._followers:
                follower.notify()

    def scheduled(self, task: Task) -> bool:
        """Whether task was added and not removed."""
        with self._lock:
            return task in self._tasks

    @property
    def workers(self) -> int:
        """Worker threads running now (never more than max_workers)."""
        return len(self._workers)

    # -- the heap (every method below runs under _lock) -----------------------------------

    def _drop(self, task: Task) -> None:
        """task's entry in _due or _waiting no longer live: left in _due without its task, skipped
        where popped; taken out of its server's queue now (a few tasks; a queue left with dead
        entries only might never be popped again)."""
        queued = self._queued.pop(task, None)
        if queued is None:
            return
        entry, place = queued
        entry[2] = None  # the heap holds nothing of a removed task, however far off its due time
        if place is not _DUE:
            queue = self._waiting[place]
            queue[:] = [other for other in queue if other is not entry]
            heapq.heapify(queue)
            if not queue:
                del self._waiting[place]
        elif task.turn is not None and task.turn not in self._taken:
            # It may be the waiter a returning call handed the turn to (_done), not yet run: the
            # next waiter gets the turn instead, or nothing of that server would run to hand it on.
            self._hand_on(task.turn)

    def _hand_on(self, turn: Hashable) -> None:
        """turn is free: the earliest call waiting for it is due (at its due time, so first)."""
        waiting = self._waiting.get(turn)
        while waiting:
            entry = heapq.heappop(waiting)
            if self._live(entry):
                self._push(entry[2], entry[0])
                break
        if waiting is not None and not waiting:
            del self._waiting[turn]

    def _live(self, entry: _Entry) -> bool:
        return entry[2] is not None and self._queued.get(entry[2], (None,))[0] is entry

    def _push(self, task: Task, due: float) -> None:
        entry = [due, next(self._order), task]  # (due, order) is unique: a task is never compared
        heapq.heappush(self._due, entry)
        self._queued[task] = (entry, _DUE)
        if self._leader is not None:
            self._leader_cond.notify()  # it waits for the earliest due time: this one may be earlier
        else:
            self._call_another()
        if not self._idle:
            self._spawn()

    def _spawn(self) -> None:
        if len(self._workers) < self.max_workers and not self._stopping:
            thread = threading.Thread(target=self._work, name=f"worker-{next(self._names)}", daemon=True)
            try:
                thread.start()  # it waits for _lock (ours): counted below before it looks
            except RuntimeError as exc:  # out of threads (pids limit, memory): the workers there are go on
                log.error("could not start a worker thread (%s): %d workers go on, another is tried when a "
                          "call is due and none is idle", exc, len(self._workers))
                if not self._workers:  # none to call what is due, nor to try again: the watcher tries
                    self._deadlines.watch(RETRY_SECONDS, self._respawn)
                return
            self._workers.append(thread)
            self._idle += 1

    def _respawn(self) -> None:
        with self._lock:
            if not self._idle:
                self._spawn()

    def _take(self, now: float) -> Task | None:
        """The earliest task due now whose turn is free, its turn taken; those due whose turn is
        taken go to wait for it."""
        while self._due and self._due[0][0] <= now:
            entry = heapq.heappop(self._due)
            task = entry[2]
            if not self._live(entry):
                continue  # removed, or pushed anew
            if task.turn is not None and task.turn in self._taken:
                heapq.heappush(self._waiting.setdefault(task.turn, []), entry)  # holds no worker
                self._queued[task] = (entry, task.turn)
                continue
            del self._queued[task]
            if task.turn is not None:
                self._taken.add(task.turn)
            self._running.add(task)
            return task
        return None

    def _next(self) -> Task | None:
        """The next task to call (waits for it), or None when stopping."""
        me = threading.get_ident()
        while not self._stopping:
            task = self._take(self._clock())
            if task is not None:
                if self._leader == me:
                    self._leader = None
                    self._call_another()  # another idle worker watches the next due time
                self._idle -= 1
                if not self._idle:
                    self._spawn()  # one worker stays idle, to watch the due times, while there is room
                return task
            if self._leader is None or self._leader == me:
                self._leader = me
                self._leader_cond.wait(self._due[0][0] - self._clock() if self._due else None)
            elif not self._follow() and self._leader is not None and self._leader != me:
                return None  # not needed for a while: this worker ends
        if self._leader == me:
            self._leader = None
        return None

    def _call_another(self) -> None:
        if self._followers:
            self._followers.pop().notify()

    def _follow(self) -> bool:
        """Wait to be called, at most IDLE_SECONDS; whether called."""
        me = threading.Condition(self._lock)
        self._followers.append(me)
        called = me.wait(IDLE_SECONDS)
        if me in self._followers:
            self._followers.remove(me)
        return called

    def _done(self, task: Task, delay: float) -> bool:
        """A call of task returned: its turn goes to the earliest call waiting for it; the task is
        due again after delay. Whether the task was removed meanwhile (to be closed)."""
        self._running.discard(task)
        woken = task in self._woken
        self._woken.discard(task)  # removed or not: a removed task must not stay here with its poller
        if task.turn is not None:
            self._taken.discard(task.turn)
            self._hand_on(task.turn)
        if task not in self._tasks:
            return True
        if woken:
            delay = 0.0
        if delay != math.inf:
            self._push(task, self._clock() + max(delay, 0.0))
        return False

    # -- a worker -----------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._lock:
                task = self._next()
                if task is None:  # stopping, or idle for IDLE_SECONDS
                    self._idle -= 1
                    self._workers.remove(threading.current_thread())
                    return
            delay = self._step(task)
            with self._lock:
                self._idle += 1
                removed = self._done(task, delay)
            if removed:
                self._close(task)

    def _step(self, task: Task) -> float:
        """One call of task under its deadline; when it is due again."""
        try:
            return run_call(task, self._deadlines)
        except Exception as exc:  # noqa: BLE001 - every loop survives: a task's bug is logged, and it goes on
            self._unexpected.report(exc)
            return RETRY_SECONDS

    def _close(self, task: Task) -> None:
        try:
            task.close()
        except Exception as exc:  # noqa: BLE001 - closing must not end a worker
            self._unexpected.report(exc)


class PollTask(Task):
    """A target's polls: the first at once, then every interval (an overrun skips the missed
    ticks), after a failure a jittered backoff; each publishes its snapshot, and one given up at
    its deadline publishes up 0 (the call's late return is then not published)."""

    def __init__(self, poller: Poller, turn: Hashable | None, name: str = "",
                 on_start: Callable[[float, float], None] | None = None) -> None:
        super().__init__(turn)
        self.name = f"poll {name}".strip()
        self._poller = poller
        # Told when each poll starts, with the poller's clock now and the bound a poll due when this
        # one was gets (due, its turn allowance, its deadline): the last poll stays fresh until then
        # (a reload may give this poll a longer deadline than the last one counted).
        self._on_start = on_start
        self._clock = poller._clock  # noqa: SLF001 - the poller's clock: its snapshots' times are readings of it
        self._unexpected = LoopErrors(log, f"{self.name} loop")
        self._failures = 0
        self._next_at: float | None = None
        self._ticket = PollTicket()
        self._deadline = 0.0
        self._once = _Once()

    def start(self) -> float:
        self._poller.apply_pending_config()
        self._deadline, self._ticket, self._once = self._poller.deadline(), PollTicket(), _Once()
        now = self._clock()
        if self._next_at is None:
            self._next_at = now
        if self._on_start is not None:
            # From when it was due, not when it started: a poll that waited for its server's turn
            # or a free worker must not stretch the last poll's bound by its wait (README, rule 5).
            due = min(now, self._next_at)
            self._on_start(now, due + self._poller.turn_allowance() + self._deadline)
        return self._deadline

    def call(self) -> None:
        snapshot = self._poller.poll_once(self._ticket)
        if self._once.take():
            self._finish(snapshot)

    def give_up_action(self) -> Callable[[], None]:
        once, ticket, deadline = self._once, self._ticket, self._deadline  # this call's, not the next's

        def give_up() -> None:
            if once.take():
                self._finish(self._poller.give_up(ticket, deadline))
        return give_up

    def _finish(self, snapshot: Snapshot) -> None:
        """Publish the poll's snapshot and set when the next is due. Nothing raises out of here:
        a publication that fails is logged, and counts as a failed poll for the schedule."""
        try:
            self._poller.publish(snapshot)
            up = snapshot.up
        except Exception as exc:  # noqa: BLE001 - publishing failed: logged, and on
            self._unexpected.report(exc)
            up = False
        now = self._clock()
        assert self._next_at is not None
        if up:
            self._failures = 0
            self._next_at += self._poller.interval
            if self._next_at <= now:  # overran: skip the missed ticks
                self._next_at = now + self._poller.interval
        else:
            self._failures += 1
            self._next_at = now + self._poller.backoff(self._failures)

    def next_delay(self) -> float:
        assert self._next_at is not None
        return self._next_at - self._clock()

    def close(self) -> None:
        self._poller.close()


class ProbeTask(Task):
    """A target's probe: each probed lock tried on its own interval, the first tries spread over it
    (probe.first_due), one try per call; all results published after every try. With no probed
    lock it sleeps until a reload wakes it."""

    def __init__(self, prober: Prober, turn: Hashable | None, name: str = "",
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(turn)
        self.name = f"probe {name}".strip()
        self._prober = prober
        self._clock = clock
        self._due: list[float] = []
        self._index: int | None = None
        self._deadline = 0.0
        self._once = _Once()

    def start(self) -> float | None:
        self._index = None
        if self._prober.apply_pending_config():
            self._due = []
            self._prober.publish()
        locks = self._prober.locks
        if not locks:
            return None
        if len(self._due) != len(locks):
            self._due = first_due(self._clock(), locks)
        index = min(range(len(self._due)), key=self._due.__getitem__)
        if self._due[index] > self._clock():
            return None  # woken before it was due
        self._index, self._deadline, self._once = index, self._prober.deadline(), _Once()
        return self._deadline

    def call(self) -> None:
        assert self._index is not None
        self._prober.try_lock(self._prober.locks[self._index])
        if self._once.take():
            self._prober.publish()

    def give_up_action(self) -> Callable[[], None]:
        assert self._index is not None
        once, lock, deadline = self._once, self._prober.locks[self._index], self._deadline  # this call's

        def give_up() -> None:
            if once.take():
                self._prober.give_up(lock, deadline)
                self._prober.publish()
        return give_up

    def next_delay(self) -> float:
        if not self._prober.locks:
            return math.inf
        if self._index is not None:
            interval = self._prober.locks[self._index].probe.interval  # type: ignore[union-attr]
            self._due[self._index] += interval
            if self._due[self._index] <= self._clock():  # overran: skip the missed tries
                self._due[self._index] = self._clock() + interval
        return min(self._due) - self._clock()

    def close(self) -> None:
        self._prober.close()
