"""One poll's rows -> the locks' states: which lock each key belongs to, and the figures of each.

The poll returns about one row per holding session, with its keys as an array; this module names
every key (a configured key wins over a family, a family over unnamed), tracks every hold, and
builds the immutable LockStates and UnnamedLocks of a Snapshot. Pure but for the tracker it is
handed, so it can be tested without a server.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from . import keys, queries
from .poolers import EMPTY_VIEW, HAZARD_MODES, PoolerView
from .resolve import SOURCE_PRESET, ResolvedLock
from .snapshot import (
    BOTH_MODES, MODE_EXCLUSIVE, ONLY_EXCLUSIVE, ONLY_SHARED, Holder, LockState, UnnamedLocks,
)
from .tracker import HoldTracker

UNNAMED = ""  # the lock slot name of keys nobody named: ("", database)


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
    """Who holds a row's locks: the session, or through a pooler the client it serves now."""

    pid: int
    backend_start: float | None
    application_name: str
    usename: str
    client_addr: str
    state: str
    pooler: str
    stranded: bool  # a session-level hold on a transaction-pool backend: owned by nobody


def who_holds(row: Any, view: PoolerView) -> Who:
    """The holder of a row's locks. Through a pooler: the linked client when the pool is in
    session mode or the backend is inside that client's transaction; nobody when the backend of a
    transaction or statement pool is outside any transaction (its locks are session-level, left by
    some earlier borrower: application_name is then the last borrower's and not trusted)."""
    link = view.lookup(row.pid, row.client_port, row.client_addr) if view is not EMPTY_VIEW else None
    if link is not None:
        outside = bool(row.outside_transaction)
        if outside and link.pool_mode in HAZARD_MODES:
            return Who(row.pid, row.backend_start, "", row.usename or "", "", row.state or "", link.pooler, True)
        client = link.client
        if client is not None and (link.pool_mode == "session" or not outside):
            return Who(row.pid, row.backend_start, client.application_name, client.user, client.addr, row.state or "",
                       link.pooler, False)
    return Who(row.pid, row.backend_start, row.application_name or "", row.usename or "", row.client_addr or "",
               row.state or "", link.pooler if link is not None else "", False)


@dataclass
class _Figures:
    """One lock's (or one database's unnamed keys') figures, gathered over the rows of a poll."""

    exclusive: int = 0
    shared: int = 0
    holds: int = 0
    stranded: int = 0  # holds stranded on a transaction-pool backend
    waiters: int = 0
    longest_wait: float = 0.0
    # (starts, keys, objsubid, shared, who): the holds of one session in one row, for holder_info
    groups: list[tuple[list[float], Sequence[int], int, bool, Who]] = field(default_factory=list)
    earliest: float = math.inf  # the earliest start of a hold
    keys: set[int] = field(default_factory=set)
    both: set[tuple[int, int]] = field(default_factory=set)  # (pid, key) held in both modes

    def add(self, starts: list[float], again: set[int], keys: Sequence[int], objsubid: int, shared: bool, who: Who) -> None:
        """One session's holds of keys (all seen by the tracker, with their starts) in one mode."""
        count = len(keys)
        if shared:
            self.shared += count
        else:
            self.exclusive += count
        if again:
            # The same key in the other mode: counted in both modes, but one hold with two modes.
            self.both.update((who.pid, key) for key in again)
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

    def oldest_holders(self, limit: int, now: float) -> list[Holder]:
        """Holders of the `limit` longest-held holds (every hold when there are no more)."""
        if limit <= 0:
            return []
        every = ((start, key, objsubid, shared, who)
                 for starts, keys, objsubid, shared, who in self.groups for start, key in zip(starts, keys))
        holds = list(every) if self.holds <= limit else heapq.nsmallest(limit, every, key=lambda hold: hold[0])
        return [self._holder(hold, now) for hold in holds]

    def _holder(self, hold: tuple[float, int, int, bool, Who], now: float) -> Holder:
        start, key, objsubid, shared, who = hold
        modes = BOTH_MODES if (who.pid, key) in self.both else ONLY_SHARED if shared else ONLY_EXCLUSIVE
        return Holder(
            who.pid, who.backend_start, modes, who.application_name, who.usename, who.client_addr, who.state,
            round(max(now - start, 0.0), 3), keys.key_label(objsubid, key), who.pooler, who.stranded,
        )


@dataclass(frozen=True)
class Assembled:
    """What one poll's rows became."""

    locks: tuple[LockState, ...]
    unnamed: tuple[UnnamedLocks, ...]
    holder_info_dropped: int
    seen_presets: frozenset[tuple[str, str]]


def assemble(
    rows: Iterable[Any],
    locks: tuple[ResolvedLock, ...],
    matcher: KeyMatcher,
    tracker: HoldTracker,
    now: float,
    caps: Caps,
    seen_presets: frozenset[tuple[str, str]] = frozenset(),
    exclude_pids: frozenset[int] = frozenset(),
    unnamed_max_hold: float | None = None,
    view: PoolerView | None = None,
    databases: frozenset[str] = frozenset(),
) -> Assembled:
    """Name, track and count every hold and wait of a poll's rows.

    rows have the columns of queries.POLL, read by name. A preset lock is shown from the first
    poll that sees it held or awaited (seen_presets carries that over polls). With databases,
    rows of other databases are left out.
    """
    figures: list[_Figures | None] = [None] * len(locks)
    unnamed: dict[str, _Figures] = {}
    slots = [lock.key for lock in locks]
    families = [lock.family is not None for lock in locks]
    pooled = view is not None
    view = view or EMPTY_VIEW
    tracker.begin(now)
    for row in rows:
        pid = row.pid
        # The exporter's own sessions (by pid), and other exporters' probes (by name), are in no figure.
        if pid in exclude_pids or row.application_name == queries.PROBE_APPLICATION_NAME:
            continue
        database, objsubid = row.datname, row.objsubid
        if databases and database not in databases:
            continue
        by_lock = matcher.partition(database, objsubid, row.keys)
        who = who_holds(row, view) if row.granted else None
        for index, group in by_lock.items():
            if index is None:
                fig = unnamed.get(database) or unnamed.setdefault(database, _Figures())
            else:
                fig = figures[index] or _new(figures, index)
            if not row.granted:
                fig.waiters += len(group)
                wait = row.wait_seconds or 0.0
                if wait > fig.longest_wait:
                    fig.longest_wait = wait
                continue
            slot = (UNNAMED, database) if index is None else slots[index]
            starts, again = tracker.see(slot, pid, row.backend_start, group, row.idle_seconds or 0.0)
            fig.add(starts, again, group, objsubid, row.shared, who)  # type: ignore[arg-type]
            if index is not None and families[index]:
                fig.keys.update(group)
    tracker.end()
    return _states(locks, figures, unnamed, tracker, now, caps, seen_presets, unnamed_max_hold, pooled)


def _free_state(lock: ResolvedLock, tracker: HoldTracker, pooled: bool) -> LockState:
    family = lock.family
    return LockState(
        lock.config.name, lock.database, 0, 0, 0.0, 0, 0.0, tracker.acquisitions(lock.key), lock.config.max_hold, (), 0,
        lock.source, lock.display_key, 0 if family is not None else None, 0 if pooled else None,
    )


def _age(fig: _Figures, now: float) -> float:
    """The oldest hold's age; 0 when nothing is held."""
    return round(max(now - fig.earliest, 0.0), 3) if fig.holds else 0.0


def _new(figures: list[_Figures | None], index: int) -> _Figures:
    fig = figures[index] = _Figures()
    return fig


def _states(
    locks: tuple[ResolvedLock, ...],
    figures: list[_Figures | None],
    unnamed: dict[str, _Figures],
    tracker: HoldTracker,
    now: float,
    caps: Caps,
    seen_presets: frozenset[tuple[str, str]],
    unnamed_max_hold: float | None,
    pooled: bool,
) -> Assembled:
    states = []
    room = caps.total
    dropped = 0
    seen = set(seen_presets)
    for lock, fig in zip(locks, figures, strict=True):
        if lock.source == SOURCE_PRESET:
            if fig is None and lock.key not in seen:
                continue  # a preset lock nobody has taken: no series until someone does
            seen.add(lock.key)
        if fig is None:
            # Free: its series are all zero (a lock's state with nothing held or awaited).
            states.append(_free_state(lock, tracker, pooled))
            continue
        info = tuple(sorted(fig.oldest_holders(min(caps.per_lock, room), now), key=lambda h: (h.pid, h.key)))
        room -= len(info)
        dropped += fig.holds - len(info)
        stranded = fig.stranded if pooled else None
        family = lock.family
        states.append(LockState(
            lock.config.name, lock.database, fig.exclusive, fig.shared, _age(fig, now), fig.waiters,
            round(fig.longest_wait, 3), tracker.acquisitions(lock.key), lock.config.max_hold, info, fig.holds,
            lock.source,
            lock.display_key,
            len(fig.keys) if family is not None else None, stranded,
        ))
    unnamed_states = []
    for database in sorted(unnamed):
        fig = unnamed[database]
        info = tuple(sorted(fig.oldest_holders(caps.unnamed_per_database, now),
                            key=lambda h: (h.pid, h.key, MODE_EXCLUSIVE in h.modes)))
        unnamed_states.append(UnnamedLocks(
            database, fig.exclusive + fig.shared, fig.waiters, _age(fig, now), round(fig.longest_wait, 3), info, unnamed_max_hold,
            fig.stranded if pooled else None,
        ))
    return Assembled(tuple(states), tuple(unnamed_states), dropped, frozenset(seen))
