"""One poll's rows -> the locks' states: which lock each key belongs to, and the figures of each.

The poll returns about one row per holding session, with its keys as an array; this module names
every key (a configured key wins over a family, a family over unnamed), tracks every hold, and
builds the immutable LockStates and UnnamedLocks of a Snapshot. It needs no server (tests hand it
rows), and keeps only the last poll's results, to reuse what did not change.
"""

from __future__ import annotations

import heapq
import math
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from . import keys, queries
from .pooled import EMPTY_VIEW, HAZARD_MODES, PoolerView
from .naming import SOURCE_PRESET, ResolvedLock
from .snapshot import (
    BOTH_MODES, MODE_EXCLUSIVE, ONLY_EXCLUSIVE, ONLY_SHARED, Holder, LockState, UnnamedLocks,
)
from .tracker import HoldTracker, SessionId

UNNAMED = ""  # the tracker slot name of keys nobody named: ("", database, objsubid)


@dataclass(frozen=True)
class Caps:
    """How many holder_info series may be shown."""

    per_lock: int
    total: int
    unnamed_per_database: int


class KeyMatcher:
    """Which resolved lock a (database, objsubid, key) belongs to.

    Keys are (classid << 32) | objid as signed bigints, as the poll returns them.
    """

    def __init__(self, locks: Iterable[ResolvedLock]) -> None:
        # database -> objsubid -> key -> lock indices (two configured names may resolve to one lock)
        self._named: dict[str, dict[int, dict[int, tuple[int, ...]]]] = {}
        # database -> namespace (as the unsigned classid) -> family index
        self._namespaces: dict[str, dict[int, int]] = {}
        # database -> [(low, high, family index)]
        self._ranges: dict[str, list[tuple[int, int, int]]] = {}
        for lock in locks:
            family = lock.family
            if isinstance(family, keys.NamespaceFamily):
                self._namespaces.setdefault(lock.database, {})[family.namespace & 0xFFFFFFFF] = lock.index
            elif isinstance(family, keys.RangeFamily):
                self._ranges.setdefault(lock.database, []).append((family.low, family.high, lock.index))
            elif lock.tag is not None:
                key = keys.signed64(keys.tag_key64(lock.tag))
                by_key = self._named.setdefault(lock.database, {}).setdefault(lock.tag.objsubid, {})
                by_key[key] = (*by_key.get(key, ()), lock.index)

    def named(self, database: str, objsubid: int) -> dict[int, tuple[int, ...]]:
        return self._named.get(database, {}).get(objsubid, {})

    def family(self, database: str, objsubid: int, key: int) -> int | None:
        """The family a key not named on its own belongs to, if any."""
        if objsubid == keys.OBJSUBID_INT4_PAIR:
            namespaces = self._namespaces.get(database)
            return namespaces.get((key >> 32) & 0xFFFFFFFF) if namespaces else None
        for low, high, index in self._ranges.get(database, ()):
            if low <= key <= high:
                return index
        return None

    def has_families(self, database: str) -> bool:
        return database in self._namespaces or database in self._ranges

    def partition(self, database: str, objsubid: int, row_keys: Sequence[int]) -> dict[int | None, Sequence[int]]:
        """A row's keys by the lock they belong to: a configured key first, then a family; None:
        nobody named it. Set operations first, so keys nobody names cost next to nothing."""
        named = self.named(database, objsubid)
        with_families = self.has_families(database)
        hits = named.keys() & row_keys if named else ()
        if not hits and not with_families:
            return {None: row_keys}
        by_lock: dict[int | None, list[int]] = {}
        for key in hits:
            for index in named[key]:
                by_lock.setdefault(index, []).append(key)
        rest = [key for key in row_keys if key not in hits] if hits else row_keys
        if not with_families:
            if rest:
                by_lock[None] = list(rest)
            return by_lock
        family = self.family
        for key in rest:
            index = family(database, objsubid, key)
            group = by_lock.get(index)
            if group is None:
                by_lock[index] = [key]
            else:
                group.append(key)
        return by_lock


class Who(NamedTuple):
    """Who holds a row's locks: the session, or through a pooler the client it serves now; or a
    prepared transaction (pid None, known by its transaction id; application_name is its gid)."""

    pid: int | None
    backend_start: float | None
    application_name: str
    usename: str
    client_addr: str
    state: str
    pooler: str
    stranded: bool  # a session-level hold on a transaction-pool backend: owned by nobody
    prepared_xid: int | None = None

    @property
    def order(self) -> tuple[bool, int, int]:
        """Sessions by pid, then prepared transactions by transaction id: a total order without None."""
        return (self.pid is None, self.pid or 0, self.prepared_xid or 0)


def session_id(row: Any) -> SessionId:
    """(pid, backend_start, prepared transaction id): a reused pid is another session, and each
    prepared transaction is a holder of its own."""
    return (row.pid, row.backend_start, row.prepared_xid)


def who_holds(row: Any, view: PoolerView) -> Who:
    """The holder of a row's locks. Through a pooler: the linked client when the pool is in
    session mode or the backend is inside that client's transaction; nobody when the backend of a
    transaction or statement pool is outside any transaction (its locks are session-level, left by
    some earlier borrower: application_name is then the last borrower's and not trusted)."""
    link = view.lookup(row.pid, row.client_port, row.client_addr) \
        if view is not EMPTY_VIEW and row.pid is not None else None
    if link is not None:
        outside = bool(row.outside_transaction)
        if outside and link.pool_mode in HAZARD_MODES:
            return Who(row.pid, row.backend_start, "", row.usename or "", "", row.state or "", link.pooler, True)
        client = link.client
        if client is not None and (link.pool_mode == "session" or not outside):
            return Who(row.pid, row.backend_start, client.application_name, client.user, client.addr, row.state or "",
                       link.pooler, False)
    return Who(row.pid, row.backend_start, row.application_name or "", row.usename or "", row.client_addr or "",
               row.state or "", link.pooler if link is not None else "", False, row.prepared_xid)


@dataclass(eq=False)  # compared by identity: "the same merged figures as the last poll's"
class _Figures:
    """The held figures of one lock (or one database's unnamed keys): of one session's rows, or
    merged over every session holding it."""

    exclusive: int = 0
    shared: int = 0
    holds: int = 0
    stranded: int = 0  # holds stranded on a transaction-pool backend
    # (starts, keys, objsubid, shared, who): the holds of one session in one row, for holder_info
    groups: list[tuple[list[float], Sequence[int], int, bool, Who]] = field(default_factory=list)
    earliest: float = math.inf  # the earliest start of a hold
    keys: set[int] = field(default_factory=set)
    # (Who.order, objsubid, key) held in both modes: a bigint and an int4 pair may share a key value
    both: set[tuple[tuple[bool, int, int], int, int]] = field(default_factory=set)
    # The holder_info holders last chosen from these figures, and under which limit.
    chosen: tuple[int, tuple[Holder, ...]] | None = None

    def add(self, starts: list[float], again: set[int], keys: Sequence[int], objsubid: int, shared: bool, who: Who) -> None:
        """One session's holds of keys (all seen by the tracker, with their starts) in one mode."""
        count = len(keys)
        if shared:
            self.shared += count
        else:
            self.exclusive += count
        if again:
            # The same key in the other mode: counted in both modes, but one hold with two modes.
            order = who.order
            self.both.update((order, objsubid, key) for key in again)
            kept = [(start, key) for start, key in zip(starts, keys) if key not in again]
            starts, keys = [start for start, _ in kept], [key for _, key in kept]
            count = len(keys)
        if not count:
            return
        self.holds += count
        if who.stranded:
            self.stranded += count
        earliest = min(starts)
        if earliest < self.earliest:
            self.earliest = earliest
        self.groups.append((starts, keys, objsubid, shared, who))

    def merge(self, part: _Figures) -> None:
        """Add one session's figures of the same lock."""
        self.exclusive += part.exclusive
        self.shared += part.shared
        self.holds += part.holds
        self.stranded += part.stranded
        self.groups += part.groups
        if part.earliest < self.earliest:
            self.earliest = part.earliest
        if part.keys:
            self.keys |= part.keys
        if part.both:
            self.both |= part.both

    def oldest_holders(self, limit: int, order: Callable[[Holder], Any]) -> tuple[Holder, ...]:
        """Holders of the `limit` longest-held holds (every hold when there are no more), in order;
        the same figures under the same limit give the same tuple without choosing again."""
        if self.chosen is not None and self.chosen[0] == limit:
            return self.chosen[1]
        if limit <= 0:
            chosen: tuple[Holder, ...] = ()
        else:
            every = ((start, key, objsubid, shared, who)
                     for starts, keys, objsubid, shared, who in self.groups for start, key in zip(starts, keys))
            # The oldest first; among equally old ones the lowest pid and key, whatever the order of rows.
            holds = list(every) if self.holds <= limit else heapq.nsmallest(
                limit, every, key=lambda hold: (hold[0], hold[4].order, hold[1], hold[2]))
            chosen = tuple(sorted(map(self._holder, holds), key=order))
        self.chosen = (limit, chosen)
        return chosen

    def _holder(self, hold: tuple[float, int, int, bool, Who]) -> Holder:
        start, key, objsubid, shared, who = hold
        modes = BOTH_MODES if (who.order, objsubid, key) in self.both else ONLY_SHARED if shared else ONLY_EXCLUSIVE
        return Holder(
            who.pid, who.backend_start, modes, who.application_name, who.usename, who.client_addr, who.state,
            start, keys.key_label(objsubid, key), who.pooler, who.stranded, who.prepared_xid,
        )


def _by_pid_and_key(holder: Holder) -> tuple[tuple[bool, int, int], str]:
    return holder.order, holder.key


def _by_pid_key_and_mode(holder: Holder) -> tuple[tuple[bool, int, int], str, bool]:
    return holder.order, holder.key, MODE_EXCLUSIVE in holder.modes


@dataclass(frozen=True)
class Assembled:
    """What one poll's rows became."""

    locks: tuple[LockState, ...]
    unnamed: tuple[UnnamedLocks, ...]
    holder_info_dropped: int
    seen_presets: frozenset[tuple[str, str]]


# What a session's held figures belong to: a lock's index, or a database's name for its unnamed keys.
Target = int | str
# A poll row's columns that stay the same while nothing about the row changed (every one but
# idle_seconds: queries.STABLE_COLUMNS), as one C-level tuple.
_stable = operator.attrgetter(*queries.STABLE_COLUMNS)
_KEYS = queries.STABLE_COLUMNS.index("keys")
# What tells a session's rows apart: the grouping of the poll (database, key form, grant, mode).
_ROW_ORDER = operator.itemgetter(*(queries.STABLE_COLUMNS.index(name) for name in ("datname", "objsubid", "granted", "shared")))


def _same_rows(before: tuple[tuple[Any, ...], ...], now: tuple[tuple[Any, ...], ...]) -> bool:
    """Whether two polls' rows of one session say the same, in whatever order the server sent the
    rows and the keys inside each row's array (it promises neither)."""
    if before == now:
        return True
    if len(before) != len(now):
        return False
    return _canonical(before) == _canonical(now)


def _canonical(rows: tuple[tuple[Any, ...], ...]) -> list[tuple[tuple[Any, ...], frozenset[int]]]:
    # A session's keys are distinct within one row (one pg_locks row per key), so a set loses nothing.
    return [(row[:_KEYS] + row[_KEYS + 1:], frozenset(row[_KEYS])) for row in sorted(rows, key=_ROW_ORDER)]


@dataclass
class _Session:
    """One holding session's rows of the last poll, and the figures they made."""

    rows: tuple[tuple[Any, ...], ...] | None  # the stable columns; None: never reused (a hold was not tracked)
    who: Who
    parts: dict[Target, _Figures]


class Assembler:
    """A poll's rows -> the locks' states, remembering the last poll, so a poll costs in proportion
    to what changed: a session whose rows are the same as the last poll's keeps its figures and
    tracked holds (one tuple comparison), and a lock no changed session touches keeps its merged
    figures and holder_info choice. Ages are computed anew at every poll.

    At the benchmark's default point (200 sessions, 10,000 held keys, 1,000 named locks, nothing
    changing), naming, tracking and merging every key at every poll cost 24 ms of CPU; this costs
    the comparison and the ages.
    """

    def __init__(self, locks: tuple[ResolvedLock, ...], matcher: KeyMatcher, tracker: HoldTracker) -> None:
        self._locks = locks
        self._matcher = matcher
        self._tracker = tracker
        self._slots = [lock.key for lock in locks]
        self._is_family = [lock.family is not None for lock in locks]
        self._sessions: dict[SessionId, _Session] = {}
        self._holding: dict[Target, set[SessionId]] = {}  # who holds each target now
        self._merged: dict[Target, _Figures] = {}
        # Each lock's last state and what it was made from: (merged figures, acquisitions, holder_info limit, pooled).
        self._made: dict[int, tuple[tuple[_Figures | None, int, int, bool], LockState]] = {}

    def run(
        self,
        rows: Iterable[Any],
        now: float,
        caps: Caps,
        seen_presets: frozenset[tuple[str, str]] = frozenset(),
        unnamed_max_hold: float | None = None,
        view: PoolerView | None = None,
        databases: frozenset[str] = frozenset(),
    ) -> Assembled:
        """Name, track and count every hold and wait of a poll's rows.

        rows have the columns of queries.POLL, read by name, in any order. A preset lock is shown
        from the first poll that sees it held or awaited (seen_presets carries that over polls).
        With databases, rows of other databases are left out. No row is left out for whom it
        seems to be: the exporter's own connections hold no advisory lock while a poll runs, and
        a pooled backend's pid and application_name belong to whoever borrowed it.
        """
        pooled = view is not None
        view = view or EMPTY_VIEW
        waits: dict[Target, list[float]] = {}  # target -> [waiters, longest wait]
        held_rows: dict[SessionId, list[Any]] = {}
        for row in rows:
            if databases and row.datname not in databases:
                continue
            if row.granted:
                session = session_id(row)
                group = held_rows.get(session)
                if group is None:
                    held_rows[session] = [row]
                else:
                    group.append(row)
                continue
            for index, group in self._matcher.partition(row.datname, row.objsubid, row.keys).items():
                target = row.datname if index is None else index
                wait = waits.get(target)
                if wait is None:
                    wait = waits[target] = [0, 0.0]
                wait[0] += len(group)
                wait[1] = max(wait[1], row.wait_seconds or 0.0)
        changed = self._track(held_rows, view, now)
        self._merge(changed)
        return self._states(caps, waits, seen_presets, unnamed_max_hold, pooled)

    def _track(self, held_rows: dict[SessionId, list[Any]], view: PoolerView, now: float) -> set[Target]:
        """Every holding session's figures, from the last poll's where its rows are the same; the
        targets whose holders changed."""
        tracker, holding = self._tracker, self._holding
        tracker.begin(now)
        earlier, sessions = self._sessions, {}
        changed: set[Target] = set()
        for session_id, session_rows in held_rows.items():
            who = who_holds(session_rows[0], view)
            stable = tuple(map(_stable, session_rows))
            before = earlier.get(session_id)
            if before is not None and before.rows is not None and before.who == who and _same_rows(before.rows, stable):
                tracker.carry(session_id)
                before.rows = stable  # the order of this poll: the next one most likely comes in it again
                sessions[session_id] = before
                continue
            session = sessions[session_id] = self._session(session_rows, stable, who)
            if before is not None:
                self._let_go(session_id, before, changed)
            for target in session.parts:
                holding.setdefault(target, set()).add(session_id)
            changed.update(session.parts)
        for session_id in earlier.keys() - sessions.keys():
            self._let_go(session_id, earlier[session_id], changed)
        tracker.end()
        self._sessions = sessions
        return changed

    def _let_go(self, session_id: SessionId, before: _Session, changed: set[Target]) -> None:
        """A session's last-poll figures are gone (it changed or ended): the targets it held change."""
        for target in before.parts:
            self._holding[target].discard(session_id)
        changed.update(before.parts)

    def _session(self, session_rows: list[Any], stable: tuple[tuple[Any, ...], ...], who: Who) -> _Session:
        """One session's held figures, every key named and seen by the tracker."""
        tracker, slots = self._tracker, self._slots
        parts: dict[Target, _Figures] = {}
        dropped = tracker.dropped
        session = session_id(session_rows[0])
        for row in session_rows:
            database, objsubid = row.datname, row.objsubid
            for index, group in self._matcher.partition(database, objsubid, row.keys).items():
                target = database if index is None else index
                fig = parts.get(target) or parts.setdefault(target, _Figures())
                # Unnamed keys of both forms share a database: the form keeps a bigint and an int4
                # pair with the same 64 bits apart (a named lock or family has one form).
                slot = (UNNAMED, database, objsubid) if index is None else slots[index]
                # A PREPARE moves a session's holds to the prepared transaction: no new acquisition.
                starts, again = tracker.see(slot, session, group, row.idle_seconds or 0.0,
                                            counts=row.prepared_xid is None)
                fig.add(starts, again, group, objsubid, row.shared, who)
                if index is not None and self._is_family[index]:
                    fig.keys.update(group)
        # A hold the tracker had no room for gets a new start at each poll: never reuse such figures.
        return _Session(stable if tracker.dropped == dropped else None, who, parts)

    def _merge(self, changed: set[Target]) -> None:
        """Merge the figures of every session holding a changed target."""
        sessions, merged = self._sessions, self._merged
        for target in changed:
            holders = self._holding.get(target)
            if not holders:
                merged.pop(target, None)
                self._holding.pop(target, None)
                continue
            fig = merged[target] = _Figures()
            for session_id in holders:
                fig.merge(sessions[session_id].parts[target])

    def _states(
        self,
        caps: Caps,
        waits: dict[Target, list[float]],
        seen_presets: frozenset[tuple[str, str]],
        unnamed_max_hold: float | None,
        pooled: bool,
    ) -> Assembled:
        acquisitions, merged, made = self._tracker.acquisitions, self._merged, self._made
        states = []
        room = caps.total
        dropped = 0
        seen = set(seen_presets)
        for index, (lock, slot) in enumerate(zip(self._locks, self._slots, strict=True)):
            fig = merged.get(index)
            wait = waits.get(index)
            if lock.source == SOURCE_PRESET:
                if fig is None and wait is None and slot not in seen:
                    continue  # a preset lock nobody has taken: no series until someone does
                seen.add(slot)
            limit = min(caps.per_lock, room)
            made_from = (fig, acquisitions(slot), limit, pooled)
            last = made.get(index)
            if wait is None and last is not None and last[0] == made_from:
                state = last[1]  # the same holders, no waiters: the same state (ages are taken from it)
            else:
                state = self._state(lock, fig or _Figures(), wait, made_from[1], limit, pooled)
                if wait is None:
                    made[index] = (made_from, state)
                else:
                    made.pop(index, None)  # a wait's age grows: never reused
            states.append(state)
            room -= len(state.info_holders)
            dropped += state.holds - len(state.info_holders)
        unnamed_states = []
        for database in sorted({t for t in merged if isinstance(t, str)} | {t for t in waits if isinstance(t, str)}):
            fig = merged.get(database) or _Figures()
            wait = waits.get(database)
            info = fig.oldest_holders(caps.unnamed_per_database, _by_pid_key_and_mode)
            unnamed_states.append(UnnamedLocks(
                database, fig.exclusive + fig.shared, int(wait[0]) if wait else 0, _since(fig),
                round(wait[1], 3) if wait else 0.0, info, unnamed_max_hold, fig.stranded if pooled else None,
            ))
        return Assembled(tuple(states), tuple(unnamed_states), dropped, frozenset(seen))

    def _state(self, lock: ResolvedLock, fig: _Figures, wait: list[float] | None, acquisitions: int, limit: int,
               pooled: bool) -> LockState:
        info = fig.oldest_holders(limit, _by_pid_and_key)
        return LockState(
            lock.config.name, lock.database, fig.exclusive, fig.shared, _since(fig),
            int(wait[0]) if wait else 0, round(wait[1], 3) if wait else 0.0, acquisitions,
            lock.config.max_hold, info, fig.holds, lock.source, lock.display_key,
            len(fig.keys) if lock.family is not None else None, fig.stranded if pooled else None,
        )


def _since(fig: _Figures) -> float | None:
    """When the oldest hold began at the latest; None when nothing is held."""
    return fig.earliest if fig.holds else None

