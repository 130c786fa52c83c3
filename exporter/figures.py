"""The held figures of one lock, or of one database's keys nobody named: counts by mode, the holds
with their starts, the earliest start, the keys of a family. One session's figures of a lock are
made by add(); a lock's total by merge() of its sessions' figures. Pure data: who remembers which
figures from one poll to the next is the assembler's business (assemble.py)."""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import keys
from .holders import Who
from .snapshot import BOTH_MODES, ONLY_EXCLUSIVE, ONLY_SHARED, Holder

# One session's holds in one poll row: (their starts, their keys, objsubid, shared, who).
HoldGroup = tuple[list[float], Sequence[int], int, bool, Who]


@dataclass(eq=False)  # two figures are the same only if they are the same object (assemble.py reuses them)
class Figures:
    """Held figures: exclusive and shared count every (holder, key, mode); holds counts every
    (holder, key) once whatever its modes; groups keep each hold's start for holder_info."""

    exclusive: int = 0
    shared: int = 0
    holds: int = 0
    stranded: int = 0  # holds stranded on a transaction-pool backend
    groups: list[HoldGroup] = field(default_factory=list)
    earliest: float = math.inf  # the earliest start of a hold
    # A family's distinct keys held: filled in a lock's total only (a session's part of a family
    # says family=True, and its keys are those of its groups: 50,000 keys are not kept twice).
    keys: set[int] = field(default_factory=set)
    family: bool = False
    # (Who.order, objsubid, key) held in both modes: a bigint and an int4 pair may share a key value
    both: set[tuple[tuple[bool, int, int], int, int]] = field(default_factory=set)

    def add(self, starts: list[float], in_both_modes: set[int], keys: Sequence[int], objsubid: int, shared: bool,
            who: Who) -> None:
        """One session's holds of keys in one mode (their starts from the tracker); in_both_modes:
        the keys this session was already seen holding in the other mode (counted in both modes,
        but one hold with two modes)."""
        count = len(keys)
        if shared:
            self.shared += count
        else:
            self.exclusive += count
        if in_both_modes:
            order = who.order
            self.both.update((order, objsubid, key) for key in in_both_modes)
            kept = [(start, key) for start, key in zip(starts, keys) if key not in in_both_modes]
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

    def merge(self, part: Figures) -> None:
        """Add one session's figures of the same lock."""
        self.exclusive += part.exclusive
        self.shared += part.shared
        self.holds += part.holds
        self.stranded += part.stranded
        self.groups += part.groups
        if part.earliest < self.earliest:
            self.earliest = part.earliest
        if part.family:
            for _, keys_of_group, *_ in part.groups:
                self.keys.update(keys_of_group)
        if part.both:
            self.both |= part.both

    @property
    def since(self) -> float | None:
        """When the oldest hold began at the latest; None when nothing is held."""
        return self.earliest if self.holds else None

    def summary(self) -> tuple[Any, ...]:
        """Everything the figures say, in one comparable value (the invariant checks compare a
        lock's remembered total with a merge made anew)."""
        holds = sorted((start, who.order, key, objsubid, shared)
                       for starts, keys, objsubid, shared, who in self.groups for start, key in zip(starts, keys))
        return (self.exclusive, self.shared, self.holds, self.stranded, self.since, frozenset(self.keys),
                frozenset(self.both), tuple(holds))


EMPTY = Figures()  # nothing held; never added to


def oldest_holders(figures: Figures, limit: int, order: Callable[[Holder], Any]) -> tuple[Holder, ...]:
    """The holders of the `limit` longest-held holds (every hold when there are no more), sorted
    by order. Among equally old holds the lowest holder and key win, whatever the order of rows."""
    if limit <= 0:
        return ()
    every = ((start, key, objsubid, shared, who)
             for starts, keys, objsubid, shared, who in figures.groups for start, key in zip(starts, keys))
    holds = list(every) if figures.holds <= limit else heapq.nsmallest(
        limit, every, key=lambda hold: (hold[0], hold[4].order, hold[1], hold[2]))
    return tuple(sorted((_holder(figures, hold) for hold in holds), key=order))


def _holder(figures: Figures, hold: tuple[float, int, int, bool, Who]) -> Holder:
    start, key, objsubid, shared, who = hold
    modes = BOTH_MODES if (who.order, objsubid, key) in figures.both else ONLY_SHARED if shared else ONLY_EXCLUSIVE
    return Holder(
        who.pid, who.backend_start, modes, who.application_name, who.usename, who.client_addr, who.state,
        start, keys.key_label(objsubid, key), who.pooler, who.stranded, who.prepared_xid,
    )
