"""One poll's rows -> the locks' states, in proportion to what changed since the last poll.

The poll returns about one row per holding session, with its keys as an array. The assembler
names every key (matching.py), asks who holds it (holders.py), has the tracker date every hold
(tracker.py), adds the holds into figures per lock (figures.py) and builds the immutable
LockStates and UnnamedLocks of a Snapshot. It needs no server (tests hand it rows).

What it remembers from one poll to the next, each kind in one place, is written down on the
Assembler; check() verifies it, after every poll when PG_ADVISORY_LOCK_EXPORTER_CHECK_INVARIANTS=1
(the test suite sets it; production never pays for it).
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from . import queries
from .figures import EMPTY, Figures, oldest_holders
from .holders import Who, by_pid_and_key, by_pid_key_and_mode, session_id, who_holds
from .matching import KeyMatcher
from .naming import SOURCE_PRESET, ResolvedLock
from .pooled import EMPTY_VIEW, PoolerView, Release
from .keys import key_label
from .snapshot import Holder, LockState, OwnWait, UnnamedLocks, Waiter
from .tracker import HoldTracker, SessionId

CHECK_INVARIANTS_ENV = "PG_ADVISORY_LOCK_EXPORTER_CHECK_INVARIANTS"
UNNAMED = ""  # the tracker's lock id of keys nobody named: ("", database, objsubid)
ADVISORY = "advisory"  # the locktype of an advisory row of the poll; others are a session's own waits
# Waiters named per lock (the longest waits): the landing page names who waits; a pile-up of a
# thousand is a count and these few, never a thousand names.
WAITERS_NAMED = 5

# What a set of figures counts for: a lock (its index among the resolved locks), or a database
# (its keys nobody named).
Tally = int | str


def checking_invariants() -> bool:
    """Whether the owners of remembered state check it after every poll (tests only)."""
    return os.environ.get(CHECK_INVARIANTS_ENV) == "1"


class InvariantBroken(AssertionError):
    """What the assembler remembers contradicts what it was made from (a bug)."""


@dataclass(frozen=True)
class Caps:
    """How many holder_info series may be shown."""

    per_lock: int
    total: int
    unnamed_per_database: int


@dataclass(frozen=True)
class Assembled:
    """What one poll's rows became."""

    locks: tuple[LockState, ...]
    unnamed: tuple[UnnamedLocks, ...]
    holder_info_dropped: int
    seen_presets: frozenset[tuple[str, str]]
    blocked: tuple[OwnWait, ...] = ()  # the holders that wait themselves, and for what
    waiting_pids: frozenset[int] = frozenset()  # every session that waits for a lock of any type
    # When the pooler frees each stranded session lock by itself: per tally the soonest, per backend its own.
    releases: dict[Tally, Release] = field(default_factory=dict)
    backend_releases: dict[int, Release] = field(default_factory=dict)


# A poll row's columns that stay the same while nothing about the row changed (every one but
# idle_seconds: queries.STABLE_COLUMNS), as one C-level tuple.
_stable = operator.attrgetter(*queries.STABLE_COLUMNS)
_KEYS = queries.STABLE_COLUMNS.index("keys")
# What tells a session's rows apart: the grouping of the poll (database, key form, grant, mode).
_ROW_ORDER = operator.itemgetter(*(queries.STABLE_COLUMNS.index(name) for name in ("datname", "objsubid", "granted", "shared")))
StableRows = tuple[tuple[Any, ...], ...]


def same_rows(before: StableRows, now: StableRows) -> bool:
    """Whether two polls' rows of one session say the same, in whatever order the server sent the
    rows and the keys inside each row's array (it promises neither)."""
    if before == now:
        return True
    if len(before) != len(now):
        return False
    return _canonical(before) == _canonical(now)


def _canonical(rows: StableRows) -> list[tuple[tuple[Any, ...], frozenset[int]]]:
    # A session's keys are distinct within one row (one pg_locks row per key), so a set loses nothing.
    return [(row[:_KEYS] + row[_KEYS + 1:], frozenset(row[_KEYS])) for row in sorted(rows, key=_ROW_ORDER)]


@dataclass
class _Session:
    """One holding session as the last poll saw it: its rows (the stable columns), who it is, and
    its figures for each tally it holds."""

    rows: StableRows | None  # None: never reused (a hold of it was not tracked: its start is new at each poll)
    who: Who
    parts: dict[Tally, Figures]
    latest_start: float  # the latest start among its holds: a proof earlier than this by more than a poll's slack moves some start
    backend: tuple[Any, Any, Any]  # (pid, client_port, client_addr): how a pooler's console knows it


def _proven_start(row: Any, now: float) -> float:
    """The start a row proves for its session's holds (as HoldTracker.see takes it): its idle time back."""
    return now - row.idle_seconds if row.idle_seconds else now


@dataclass(frozen=True)
class _Shown:
    """The holder_info holders chosen from a tally's figures under a limit."""

    figures: Figures
    limit: int
    holders: tuple[Holder, ...]


@dataclass(frozen=True)
class _Made:
    """A lock's state and what it was made from: reused while no changed session, wait or blocked
    holder touches the lock and the limit and pooling are the same (Assembler._states)."""

    figures: Figures | None
    limit: int
    pooled: bool
    state: LockState


class Assembler:
    """A poll's rows -> the locks' states, remembering the last poll, so a poll costs in proportion
    to what changed: a session whose rows are the same as the last poll's keeps its figures and
    tracked holds (one tuple comparison), and a lock no changed session touches keeps its total,
    its holder_info choice and its state. Ages are taken from the states' starts at render.

    What it remembers, and what is true of it between two polls (check() verifies it):
    - _sessions: every session holding something at the last poll, with its rows and its figures
      per tally. A session whose rows and identity are the same at the next poll is kept as it is.
    - _holding: tally -> the sessions holding it; exactly the sessions whose parts name the tally,
      never an empty set.
    - _totals: tally -> the merge of its holders' parts (the same tallies as _holding). A change of
      a session (new, changed or gone) invalidates the totals of every tally it held or holds.
    - _shown: tally -> the holder_info choice made from its current total, under a limit.
    - _made: lock index -> its last state and what it was made from; its figures are the lock's
      current total (or None: free). A lock with waiters is never remembered (a wait's age grows).
    The tracker (tracker.py) keeps the holds' first sightings; it remembers no session the
    assembler does not.

    At the benchmark's default point (200 sessions, 10,000 held keys, 1,000 named locks, nothing
    changing), naming, tracking and merging every key at every poll cost 24 ms of CPU; this costs
    the comparison and the ages.
    """

    def __init__(self, locks: tuple[ResolvedLock, ...], matcher: KeyMatcher, tracker: HoldTracker) -> None:
        self._locks = locks
        self._matcher = matcher
        self._tracker = tracker
        self._lock_ids = [lock.key for lock in locks]  # (name, database): a lock over time, for the tracker
        self._is_family = [lock.family is not None for lock in locks]
        self._sessions: dict[SessionId, _Session] = {}
        self._holding: dict[Tally, set[SessionId]] = {}
        self._totals: dict[Tally, Figures] = {}
        self._shown: dict[Tally, _Shown] = {}
        self._made: dict[int, _Made] = {}
        self._check = checking_invariants()

    def run(
        self,
        rows: Iterable[Any],
        now: float,
        caps: Caps,
        seen_presets: frozenset[tuple[str, str]] = frozenset(),
        unnamed_max_hold: float | None = None,
        view: PoolerView | None = None,
        databases: frozenset[str] = frozenset(),
        slack: float = 0.0,
    ) -> Assembled:
        """Name, track and count every hold and wait of a poll's rows.

        rows have the columns of queries.POLL, read by name, in any order. A preset lock is shown
        from the first poll that sees it held or awaited (seen_presets carries that over polls).
        With databases, rows of other databases are left out. No row is left out for whom it
        seems to be: the exporter's own connections hold no advisory lock while a poll runs, and
        a pooled backend's pid and application_name belong to whoever borrowed it. slack: how far
        this poll's idle times may be off as proofs of a start (its round trip; HoldTracker.begin).
        """
        pooled = view is not None
        waits: dict[Tally, list[float]] = {}  # tally -> [waiters, longest wait]
        waiting: dict[Tally, list[Waiter]] = {}  # tally -> who waits (every waiter; few: a poll's waits)
        held_rows: dict[SessionId, list[Any]] = {}
        own_waits: dict[SessionId, Any] = {}  # a session's wait, for a lock of any type
        for row in rows:
            if not row.granted:
                own_waits[session_id(row)] = row
            if row.locktype != ADVISORY or databases and row.datname not in databases:
                continue
            if row.granted:  # a waiter holds nothing: a wait a poll sees never starts or carries a hold
                held_rows.setdefault(session_id(row), []).append(row)
            else:
                self._count_wait(row, waits, waiting, view or EMPTY_VIEW)
        changed = self._track(held_rows, view or EMPTY_VIEW, now, slack)
        self._merge(changed)
        blocked, blocked_waits, blocked_holders = self._blocked(own_waits)
        named = {tally: _longest(found) for tally, found in waiting.items()}
        assembled = self._states(caps, waits, named, blocked, blocked_holders, changed, seen_presets, unnamed_max_hold,
                                 pooled)
        assembled = replace(assembled, blocked=blocked_waits,
                            waiting_pids=frozenset(row.pid for row in own_waits.values() if row.pid is not None),
                            **(self._releases(view) if view is not None else {}))
        if self._check:
            self.check()
        return assembled

    def _blocked(self, own_waits: dict[SessionId, Any]) \
            -> tuple[dict[Tally, list[float]], tuple[OwnWait, ...], dict[int, list[tuple[float, Holder]]]]:
        """Per tally, its holders that wait themselves [how many, the longest wait]; those waits; and
        per named lock, each such holder (its oldest hold of the lock) with its wait. In proportion
        to the waiting sessions, which are few."""
        blocked: dict[Tally, list[float]] = {}
        holders: dict[int, list[tuple[float, Holder]]] = {}
        found = []
        for sid, row in own_waits.items():
            session = self._sessions.get(sid)
            if session is None:
                continue  # waits, holds nothing: a waiter, counted as one
            wait = row.wait_seconds or 0.0
            for tally, part in session.parts.items():
                figure = blocked.setdefault(tally, [0, 0.0])
                figure[0] += 1
                figure[1] = max(figure[1], wait)
                if isinstance(tally, int):
                    # One series per blocked session, whatever it holds of a family: the key of its oldest hold.
                    holders.setdefault(tally, []).extend((wait, h) for h in oldest_holders(part, 1, by_pid_and_key))
            advisory = row.locktype == ADVISORY
            found.append(OwnWait(row.pid, row.datname or "", row.locktype or "", row.wait_mode or "", row.wait_relation,
                                 row.keys[0] if row.keys else None, row.objsubid if advisory else None,
                                 round(row.wait_seconds or 0.0, 3)))
        return blocked, tuple(sorted(found)), holders

    def _releases(self, view: PoolerView) -> dict[str, Any]:
        """When the pooler frees each stranded session lock by itself: the stranded sessions' server
        connections, as its console read them in this poll (few; never remembered)."""
        by_tally: dict[Tally, Release] = {}
        by_backend: dict[int, Release] = {}
        for tally, total in self._totals.items():
            if not total.stranded:
                continue
            for sid in self._holding[tally]:
                session = self._sessions[sid]
                link = view.lookup(*session.backend) if session.who.stranded else None
                if link is None or link.release is None:
                    continue
                by_backend[link.release.backend] = link.release
                if tally not in by_tally or link.release.seconds < by_tally[tally].seconds:
                    by_tally[tally] = link.release
        return {"releases": by_tally, "backend_releases": by_backend}

    def _count_wait(self, row: Any, waits: dict[Tally, list[float]], waiting: dict[Tally, list[Waiter]],
                    view: PoolerView) -> None:
        who = who_holds(row, view)
        seconds = round(row.wait_seconds or 0.0, 3)
        for index, group in self._matcher.partition(row.datname, row.objsubid, row.keys).items():
            tally = row.datname if index is None else index
            wait = waits.setdefault(tally, [0, 0.0])
            wait[0] += len(group)
            wait[1] = max(wait[1], row.wait_seconds or 0.0)
            waiting.setdefault(tally, []).extend(
                Waiter(row.pid, who.application_name, who.usename, who.client_addr, seconds,
                       key_label(row.objsubid, key), who.pooler) for key in group)

    # -- sessions ---------------------------------------------------------------------------

    def _track(self, held_rows: dict[SessionId, list[Any]], view: PoolerView, now: float, slack: float) -> set[Tally]:
        """Every holding session's figures, from the last poll's where its rows and identity are
        the same; the tallies whose holders changed."""
        tracker, holding = self._tracker, self._holding
        tracker.begin(now, slack)
        earlier, sessions = self._sessions, {}
        changed: set[Tally] = set()
        for sid, session_rows in held_rows.items():
            who = who_holds(session_rows[0], view)
            stable = tuple(map(_stable, session_rows))
            before = earlier.get(sid)
            # Unchanged: the same rows, the same holder, and no proof of an earlier start for a hold
            # beyond the slack (the idle time back from now moves by each poll's latency, inside
            # its round trip; a backend that ran this exporter's own poll last proves nothing, then
            # a real idle time at the next poll). At 10,000 held locks, without the slack one idle
            # session in ten was assembled again at each poll of the first minute, for a few ms.
            if before is not None and before.rows is not None and before.who == who and same_rows(before.rows, stable) \
                    and min(_proven_start(row, now) for row in session_rows) + slack >= before.latest_start:
                tracker.keep_unchanged(sid)
                before.rows = stable  # the order of this poll: the next one most likely comes in it again
                sessions[sid] = before
                continue
            session = sessions[sid] = self._session(sid, session_rows, stable, who)
            if before is not None:
                self._forget_holdings(sid, before, changed)
            for tally in session.parts:
                holding.setdefault(tally, set()).add(sid)
            changed.update(session.parts)
        for sid in earlier.keys() - sessions.keys():
            self._forget_holdings(sid, earlier[sid], changed)
        tracker.end()
        self._sessions = sessions
        return changed

    def _forget_holdings(self, sid: SessionId, before: _Session, changed: set[Tally]) -> None:
        """A session's last-poll figures are gone (it changed or ended): the tallies it held change."""
        for tally in before.parts:
            self._holding[tally].discard(sid)
        changed.update(before.parts)

    def _session(self, sid: SessionId, session_rows: list[Any], stable: StableRows, who: Who) -> _Session:
        """One session's figures per tally, every key named and seen by the tracker."""
        tracker, lock_ids = self._tracker, self._lock_ids
        parts: dict[Tally, Figures] = {}
        dropped = tracker.dropped
        latest = -math.inf
        for row in session_rows:
            database, objsubid = row.datname, row.objsubid
            for index, group in self._matcher.partition(database, objsubid, row.keys).items():
                tally = database if index is None else index
                figures = parts.get(tally) or parts.setdefault(tally, Figures())
                # Unnamed keys of both forms share a database: the form keeps a bigint and an int4
                # pair with the same 64 bits apart (a named lock or family has one form).
                lock_id = (UNNAMED, database, objsubid) if index is None else lock_ids[index]
                # A PREPARE moves a session's holds to the prepared transaction (pid NULL): no new acquisition.
                starts, in_both_modes = tracker.see(lock_id, sid, group, row.idle_seconds or 0.0,
                                                    counts=row.pid is not None)
                figures.add(starts, in_both_modes, group, objsubid, row.shared, who)
                latest = max(latest, *starts)
                if index is not None and self._is_family[index]:
                    figures.family = True
        # A hold the tracker had no room for gets a new start at each poll: never reuse such figures.
        first = session_rows[0]
        return _Session(stable if tracker.dropped == dropped else None, who, parts, latest,
                        (first.pid, first.client_port, first.client_addr))

    def _merge(self, changed: set[Tally]) -> None:
        """A new total for every tally whose holders changed (and no total for one held by nobody)."""
        sessions, totals = self._sessions, self._totals
        for tally in changed:
            holders = self._holding.get(tally)
            if not holders:
                totals.pop(tally, None)
                self._holding.pop(tally, None)
                self._shown.pop(tally, None)
                continue
            total = totals[tally] = Figures()
            for sid in holders:
                total.merge(sessions[sid].parts[tally])

    # -- states -----------------------------------------------------------------------------

    def _oldest(self, tally: Tally, figures: Figures | None, limit: int, order: Callable[[Holder], Any]) -> tuple[Holder, ...]:
        """holder_info's holders of a tally: chosen again only when its total or the limit changed."""
        if figures is None:
            return ()
        shown = self._shown.get(tally)
        if shown is None or shown.figures is not figures or shown.limit != limit:
            shown = self._shown[tally] = _Shown(figures, limit, oldest_holders(figures, limit, order))
        return shown.holders

    def _states(self, caps: Caps, waits: dict[Tally, list[float]], waiting: dict[Tally, tuple[Waiter, ...]],
                blocked: dict[Tally, list[float]], blocked_holders: dict[int, list[tuple[float, Holder]]],
                changed: set[Tally],
                seen_presets: frozenset[tuple[str, str]], unnamed_max_hold: float | None, pooled: bool) -> Assembled:
        states = []
        info_budget = caps.total  # holder_info series the remaining locks may still have
        blocked_budget = caps.total  # and blocked_holder_info series, under the same caps
        dropped = 0
        seen = set(seen_presets)
        # A lock no changed session holds, nobody waits for or in, under the same limit, is its last
        # state (its total, and so its acquisitions, are the same): one set lookup, not a rebuild.
        touched = changed | waits.keys() | blocked.keys()
        made_get, per_lock = self._made.get, caps.per_lock
        for index, (lock, lock_id) in enumerate(zip(self._locks, self._lock_ids, strict=True)):
            made = made_get(index)
            limit = per_lock if per_lock <= info_budget else info_budget
            if made is not None and index not in touched and made.limit == limit and made.pooled is pooled:
                state = made.state
                if lock.source == SOURCE_PRESET:
                    seen.add(lock_id)
            else:
                total, wait = self._totals.get(index), waits.get(index)
                if lock.source == SOURCE_PRESET:
                    if total is None and wait is None and lock_id not in seen:
                        continue  # a preset lock nobody has taken: no series until someone does
                    seen.add(lock_id)
                state = self._lock_state(index, lock, total, wait, blocked.get(index), limit, pooled)
                if wait is not None:  # never remembered (_lock_state): the waiters are this poll's
                    state = state._replace(waiting=waiting.get(index, ()))
            if index in blocked_holders:  # never a remembered state: a lock with a blocked holder is not kept
                shown = _longest_waits(blocked_holders[index], min(per_lock, blocked_budget))
                blocked_budget -= len(shown)
                state = state._replace(blocked_info=shown)
            states.append(state)
            info_budget -= len(state.info_holders)
            dropped += state.holds - len(state.info_holders)
        unnamed = [replace(self._unnamed_state(database, caps, waits.get(database), blocked.get(database), unnamed_max_hold,
                                               pooled), waiting=waiting.get(database, ()))
                   for database in sorted({t for t in (*self._totals, *waits) if isinstance(t, str)})]
        return Assembled(tuple(states), tuple(unnamed), dropped, frozenset(seen))

    def _lock_state(self, index: int, lock: ResolvedLock, total: Figures | None, wait: list[float] | None,
                    blocked: list[float] | None, limit: int, pooled: bool) -> LockState:
        """A new state of a lock (its last one is reused by _states while nothing touched it),
        remembered while nobody waits for it or in it (a wait's age grows; holders' ages are taken
        from the state at render)."""
        lock_id = self._lock_ids[index]
        acquisitions = self._tracker.acquisitions(lock_id)
        last_acquired = self._tracker.last_acquired(lock_id)
        still = wait is None and blocked is None
        figures = total or EMPTY
        state = LockState(
            lock.config.name, lock.database, figures.exclusive, figures.shared, figures.since,
            int(wait[0]) if wait else 0, round(wait[1], 3) if wait else 0.0, acquisitions,
            lock.config.max_hold, self._oldest(index, total, limit, by_pid_and_key), figures.holds, lock.source,
            lock.display_key, len(figures.keys) if lock.family is not None else None,
            figures.stranded if pooled else None, int(blocked[0]) if blocked else 0, round(blocked[1], 3) if blocked else 0.0,
            last_acquired, lock.config.expect_every,
        )
        if still:
            self._made[index] = _Made(total, limit, pooled, state)
        else:
            self._made.pop(index, None)
        return state

    def _unnamed_state(self, database: str, caps: Caps, wait: list[float] | None, blocked: list[float] | None,
                       unnamed_max_hold: float | None, pooled: bool) -> UnnamedLocks:
        total = self._totals.get(database)
        figures = total or EMPTY
        return UnnamedLocks(
            database, figures.exclusive + figures.shared, int(wait[0]) if wait else 0, figures.since,
            round(wait[1], 3) if wait else 0.0, self._oldest(database, total, caps.unnamed_per_database, by_pid_key_and_mode),
            unnamed_max_hold, figures.stranded if pooled else None,
            int(blocked[0]) if blocked else 0, round(blocked[1], 3) if blocked else 0.0,
        )

    # -- invariants -------------------------------------------------------------------------

    def check(self) -> None:
        """Verify what the class docstring says is true between two polls; InvariantBroken if not."""
        expected: dict[Tally, set[SessionId]] = {}
        for sid, session in self._sessions.items():
            for tally in session.parts:
                expected.setdefault(tally, set()).add(sid)
        _require(self._holding == expected, "_holding is not who the sessions' parts say holds each tally")
        _require(self._totals.keys() == self._holding.keys(), "a total without holders, or holders without a total")
        for tally, total in self._totals.items():
            fresh = Figures()
            for sid in self._holding[tally]:
                fresh.merge(self._sessions[sid].parts[tally])
            _require(total.summary() == fresh.summary(), f"the total of {tally!r} is not the merge of its holders' parts")
        for tally, shown in self._shown.items():
            _require(self._totals.get(tally) is shown.figures, f"holder_info of {tally!r} chosen from an old total")
        for index, made in self._made.items():
            _require(made.figures is self._totals.get(index), f"the state of lock {index} was made from an old total")
        _require(self._tracker.sessions() <= self._sessions.keys(), "the tracker remembers a session the assembler does not")
        self._tracker.check()


def _longest_waits(blocked: list[tuple[float, Holder]], limit: int) -> tuple[Holder, ...]:
    """blocked_holder_info's holders of a lock: the `limit` longest waits (among equal waits the
    lowest pid), shown by pid."""
    chosen = sorted(blocked, key=lambda pair: (-pair[0], pair[1].order))[:max(limit, 0)]
    return tuple(sorted((holder for _, holder in chosen), key=by_pid_and_key))


def _longest(waiters: list[Waiter]) -> tuple[Waiter, ...]:
    """The WAITERS_NAMED longest waits, longest first (then by pid: the same order at every poll)."""
    return tuple(sorted(waiters, key=lambda w: (-w.wait_seconds, w.pid, w.key))[:WAITERS_NAMED])


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise InvariantBroken(message)
