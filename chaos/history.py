"""The truth indexed for the oracle's questions: who held or awaited what around a poll's moment,
and where each hold's age may start (README: What the exporter promises).

An event of the truth is a Span (it happened somewhere inside [lo, hi]); a poll read pg_locks
somewhere inside its Window [timestamp - duration, timestamp]. A hold is certain at a poll when it
was surely granted before the window and surely not released before the window's end, absent
when it surely began after or ended before, and ambiguous otherwise: the oracle excuses either
answer for it.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from exporter.keys import key_label

from .truth import DIRECT, EXCLUSIVE, Busy, Hold, Holder, Span, Truth

ABSENT, AMBIGUOUS, CERTAIN = 0, 1, 2
# Width of the time buckets the holds are filed under (seconds): a question looks at the buckets
# its window covers instead of every hold of the run.
BUCKET = 1.0

T = TypeVar("T")


@dataclass(frozen=True)
class Window:
    """When something was read: somewhere inside [lo, hi] (epoch seconds)."""

    lo: float
    hi: float


@dataclass(frozen=True)
class Poll:
    """A poll the oracle knows of: published by an up-1 scrape of its target."""

    timestamp: float  # last_poll_timestamp_seconds
    duration: float  # last_poll_duration_seconds: pg_locks was read inside [timestamp - duration, timestamp]
    interval: float  # poll_interval_seconds in force

    @property
    def window(self) -> Window:
        return Window(self.timestamp - self.duration, self.timestamp)


@dataclass(frozen=True)
class Spell:
    """One wait: from its beginning to its end (a grant, a cancel, the session's end)."""

    target: str
    database: str
    key: tuple[int, int, int]
    holder: Holder
    begins: Span
    ends: Span | None


def presence(begins: Span, ends: Span | None, window: Window) -> int:
    """Whether something that began within `begins` and ended within `ends` (None: never) was there
    when a read somewhere inside `window` happened: CERTAIN, ABSENT or AMBIGUOUS."""
    if begins.lo > window.hi or (ends is not None and ends.hi < window.lo):
        return ABSENT
    if begins.hi < window.lo and (ends is None or ends.lo > window.hi):
        return CERTAIN
    return AMBIGUOUS


def holder_id(holder: Holder) -> tuple[object, ...]:
    """Who a holder is to the exporter: a session is pid + backend_start, a prepared transaction its gid."""
    return ("gid", holder.gid) if holder.gid is not None else ("session", holder.pid, holder.backend_start)


def info_identity(hold: Hold) -> tuple[str, str, str | None]:
    """A holder_info series' (key, pid, application_name) for a hold; application_name None where
    only the pid can be compared (a pooled server connection serves whichever client it lends to)."""
    key = key_label(hold.key[2], (hold.key[0] << 32) | hold.key[1])
    if hold.holder.gid is not None:
        return key, "", hold.holder.gid
    return key, str(hold.holder.pid), hold.holder.application_name if hold.via == DIRECT else None


class _Buckets(Generic[T]):
    """Items filed under every BUCKET-wide slice of time their [start, end] touches."""

    def __init__(self) -> None:
        self._slots: dict[int, list[T]] = defaultdict(list)

    def add(self, item: T, start: float, end: float) -> None:
        for slot in range(math.floor(start / BUCKET), math.floor(end / BUCKET) + 1):
            self._slots[slot].append(item)

    def near(self, lo: float, hi: float) -> Iterator[T]:
        seen: set[int] = set()
        for slot in range(math.floor(lo / BUCKET), math.floor(hi / BUCKET) + 1):
            for item in self._slots.get(slot, ()):
                if id(item) not in seen:
                    seen.add(id(item))
                    yield item


class History:
    """The truth of one run, asked at poll windows. `polls` are the polls the oracle knows of per
    target (sorted by timestamp): a gap between two holds of one holder and key that holds none of
    them counts as bridged, since no known poll saw the key free there. `horizon`: a time after
    every scrape, where holds never released are filed up to."""

    def __init__(self, truth: Truth, polls: dict[str, list[Poll]], horizon: float) -> None:
        truth = Truth(holds=narrow_waited(truth.holds), waits=truth.waits, faults=truth.faults, busy=truth.busy)
        self._busy: dict[str, _Buckets[Busy]] = defaultdict(_Buckets)
        for busy in truth.busy:
            self._busy[busy.target].add(busy, busy.began.lo, horizon if busy.ended is None else busy.ended.hi)
        self._holds: dict[str, _Buckets[Hold]] = defaultdict(_Buckets)
        self._waits: dict[str, _Buckets[Spell]] = defaultdict(_Buckets)
        self._grants: dict[str, _Buckets[Hold]] = defaultdict(_Buckets)
        self._polls = polls
        self._poll_times = {target: [p.timestamp for p in ps] for target, ps in polls.items()}
        for hold in truth.holds:
            end = horizon if hold.released is None else hold.released.hi
            self._holds[hold.target].add(hold, hold.granted.lo, max(end, hold.granted.hi))
            self._grants[hold.target].add(hold, hold.granted.lo, hold.granted.hi)
        for spell in _spells(truth):
            end = horizon if spell.ends is None else spell.ends.hi
            self._waits[spell.target].add(spell, spell.begins.lo, max(end, spell.begins.hi))
        self.oldest_start: dict[int, float] = {}
        self.youngest_start: dict[int, float] = {}
        self._chain(truth.holds)

    def holds(self, target: str, window: Window) -> Iterator[tuple[Hold, int]]:
        """Every hold of the target present or ambiguous at the window, with its presence."""
        for hold in self._holds[target].near(window.lo, window.hi):
            seen = presence(hold.granted, hold.released, window)
            if seen != ABSENT:
                yield hold, seen

    def waits(self, target: str, window: Window) -> Iterator[tuple[Spell, int]]:
        for spell in self._waits[target].near(window.lo, window.hi):
            seen = presence(spell.begins, spell.ends, window)
            if seen != ABSENT:
                yield spell, seen

    def busy(self, target: str, window: Window) -> Iterator[Busy]:
        """Transactions through a pool that may have run on their server connection at the window."""
        for busy in self._busy[target].near(window.lo, window.hi):
            if busy.began.lo <= window.hi and (busy.ended is None or busy.ended.hi >= window.lo):
                yield busy

    def granted_between(self, target: str, lo: float, hi: float) -> Iterator[Hold]:
        """Holds of the target whose grant could lie inside [lo, hi]."""
        for hold in self._grants[target].near(lo, hi):
            if hold.granted.hi >= lo and hold.granted.lo <= hi:
                yield hold

    def polls_between(self, target: str, lo: float, hi: float) -> list[Poll]:
        times = self._poll_times.get(target, [])
        return self._polls.get(target, [])[bisect.bisect_left(times, lo):bisect.bisect_right(times, hi)]

    def _seen_free(self, target: str, after: float, before: float) -> bool:
        """Whether a known poll read pg_locks surely inside (after, before)."""
        return any(p.timestamp - p.duration > after for p in self.polls_between(target, after, before)
                   if p.timestamp < before)

    def _chain(self, holds: Iterable[Hold]) -> None:
        """For each hold, where its age may start at the earliest (the first hold of its chain of
        that holder and key, bridging every gap no known poll saw: oldest_start, a grant's lo) and
        at the latest (only holds that surely overlapped it: youngest_start, a grant's hi)."""
        chains: dict[tuple[object, ...], list[Hold]] = defaultdict(list)
        for hold in holds:
            chains[(hold.target, hold.database, hold.key, holder_id(hold.holder))].append(hold)
        for chain in chains.values():
            chain.sort(key=lambda h: h.granted.lo)
            oldest = youngest = chain[0].granted.lo
            youngest = chain[0].granted.hi
            ends_hi = ends_lo = -math.inf
            for hold in chain:
                if ends_hi != -math.inf and hold.granted.lo > ends_hi and self._seen_free(
                        hold.target, ends_hi, hold.granted.lo):
                    oldest = hold.granted.lo
                if not hold.granted.hi < ends_lo:
                    youngest = hold.granted.hi
                self.oldest_start[id(hold)] = oldest
                self.youngest_start[id(hold)] = youngest
                ends_hi = max(ends_hi, math.inf if hold.released is None else hold.released.hi)
                ends_lo = max(ends_lo, math.inf if hold.released is None else hold.released.lo)


def _conflict(a: str, b: str) -> bool:
    return EXCLUSIVE in (a, b)


def narrow_waited(holds: list[Hold]) -> list[Hold]:
    """A hold granted after a wait is recorded with the blocking call's round trip as its grant
    (the worker cannot read the clock while it waits): its grant began there at the earliest. But
    no grant comes before the release of a conflicting hold another holder surely had when the
    wait began: the grant is narrowed to begin no earlier than the latest such release, so that
    time spent waiting can be told from time held (rule 2), and a wait from a hold (rule 1)."""
    by_key: dict[tuple[object, ...], list[Hold]] = defaultdict(list)
    for hold in holds:
        by_key[(hold.target, hold.database, hold.key)].append(hold)
    narrowed = []
    for hold in holds:
        if hold.waited is None:
            narrowed.append(hold)
            continue
        began = hold.waited.lo
        earliest = hold.granted.lo
        for other in by_key[(hold.target, hold.database, hold.key)]:
            if (other is hold or holder_id(other.holder) == holder_id(hold.holder) or other.released is None
                    or not _conflict(hold.mode, other.mode)):
                continue
            if other.granted.hi < began < other.released.lo:  # surely held when the wait began
                earliest = max(earliest, other.released.lo)
        earliest = min(earliest, hold.granted.hi)
        narrowed.append(hold if earliest == hold.granted.lo else
                        dataclasses.replace(hold, granted=Span(earliest, hold.granted.hi)))
    return narrowed


def _spells(truth: Truth) -> Iterator[Spell]:
    for hold in truth.holds:
        if hold.waited is not None:
            yield Spell(hold.target, hold.database, hold.key, hold.holder, hold.waited, hold.granted)
    for wait in truth.waits:
        yield Spell(wait.target, wait.database, wait.key, wait.holder, wait.began, wait.ended)
