"""What only time reveals: since when each hold has been held, and how many holders took a lock.

pg_locks has no grant time. A hold starts, at the latest, when a poll first sees it;
pg_stat_activity can prove an earlier start (an idle session took its lock no later than its
last state change), and the tracker keeps the earliest start any poll has proven.

A hold is one session (pid + backend_start, so a reused pid is a new session) on one key of one
lock. Holds are kept per session, then per lock, in a dict keyed by the bare key: at 50,000 held
keys a tuple per hold cost twice the memory and a third more CPU. The number of holds remembered is
bounded: beyond the bound a new hold gets the proven lower bound only, and the drop is counted.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

# (pid, backend_start, prepared transaction id): a session, or a prepared transaction (pid None);
# holds are kept per session, then per lock slot (whatever the caller identifies a lock by over
# time: the poller's name and database; for unnamed keys, "" and the database), then per key.
SessionId = tuple["int | None", "float | None", "int | None"]
_EMPTY: dict[int, float] = {}
_NO_SLOTS: dict[Hashable, dict[int, float]] = {}


class HoldTracker:
    """First-seen times of holds and acquisition counts across polls."""

    def __init__(self, max_tracked: int = 100_000) -> None:
        self.max_tracked = max_tracked
        self._since: dict[SessionId, dict[Hashable, dict[int, float]]] = {}
        self._current: dict[SessionId, dict[Hashable, dict[int, float]]] = {}
        self._acquisitions: dict[Hashable, int] = {}
        self._first_poll = True
        self._now = 0.0
        self._tracked = 0  # holds in _since
        self._room = 0  # new holds this poll may still remember
        self.dropped = 0  # holds not remembered because of max_tracked, summed over polls

    def begin(self, now: float) -> None:
        """Start recording a successful poll; now is a monotonic clock reading."""
        self._now = now
        self._current = {}
        # Every hold remembered so far stays remembered while it lasts; new ones fill the rest,
        # so a flood of new holds never makes an old hold look new.
        self._room = max(self.max_tracked - self._tracked, 0)

    def see(self, slot: Hashable, session: SessionId, keys: Sequence[int], proven_seconds: float,
            counts: bool = True) -> tuple[list[float], set[int]]:
        """Holds of one session on keys of one lock, seen by this poll: since when each has been
        held at least (a monotonic clock reading, in the order of keys), and the keys this poll had
        already seen (the same key held in the other mode). counts: a new hold is an acquisition
        (not so for a prepared transaction, which took its holds over from its session)."""
        earlier = self._since.get(session, _NO_SLOTS).get(slot, _EMPTY)
        slots = self._current.get(session)
        if slots is None:
            slots = self._current[session] = {}
        current = slots.get(slot)
        proven_start = self._now - proven_seconds if proven_seconds > 0 else self._now
        if current is None and earlier and all(map(earlier.__contains__, keys)):
            # The steady state: every key was seen before. Done at C speed (map, max, zip).
            starts = list(map(earlier.__getitem__, keys))
            if proven_start < max(starts):
                starts = [start if start < proven_start else proven_start for start in starts]
            slots[slot] = dict(zip(keys, starts))
            return starts, set()
        if current is None:
            current = slots[slot] = {}
        starts = []
        again: set[int] = set()
        new = 0
        for key in keys:
            start = current.get(key)
            if start is not None:
                again.add(key)
                starts.append(start)
                continue
            start = earlier.get(key)
            if start is None:
                start = proven_start
                new += 1
                if self._room > 0:
                    self._room -= 1
                    current[key] = start
                else:
                    self.dropped += 1
            else:
                if proven_start < start:
                    start = proven_start
                current[key] = start
            starts.append(start)
        # Holders already there at the first poll were not seen taking the lock.
        if new and counts and not self._first_poll:
            self._acquisitions[slot] = self._acquisitions.get(slot, 0) + new
        return starts, again

    def carry(self, session: SessionId) -> None:
        """Holds of a session whose rows are the same as the last poll's: remembered as they were,
        without looking at each key again (their starts, modes and counts cannot have changed)."""
        held = self._since.get(session)
        if held is not None:
            self._current[session] = held

    def end(self) -> None:
        """Finish the poll: holds not seen in it are forgotten."""
        self._since, self._current = self._current, {}
        self._tracked = sum(sum(map(len, slots.values())) for slots in self._since.values())
        self._first_poll = False

    @property
    def tracked(self) -> int:
        return self._tracked

    def acquisitions(self, slot: Hashable) -> int:
        return self._acquisitions.get(slot, 0)
