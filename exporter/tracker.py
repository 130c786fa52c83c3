"""What only time reveals: since when each holder has held its lock, and how many took it.

pg_locks has no grant time. A holder's hold starts, at the latest, when a poll first sees it;
pg_stat_activity can prove an earlier start (an idle session took its lock no later than its
last state change), and the tracker keeps the earliest start any poll has proven.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import NamedTuple


class Sighting(NamedTuple):
    """One poll's view of one holder of one lock."""

    lock: Hashable
    pid: int
    backend_start: float | None
    proven_seconds: float  # the hold is at least this long, by pg_stat_activity


# A holder is a session (pid + backend_start, so a reused pid is a new holder) on a lock; a lock
# is whatever hashable the caller identifies it by (the poller: name and database).
_HolderKey = tuple[Hashable, int, "float | None"]


class HoldTracker:
    """Holder first-seen times and acquisition counts across polls."""

    def __init__(self) -> None:
        self._since: dict[_HolderKey, float] = {}
        self._current: dict[_HolderKey, float] = {}
        self._acquisitions: dict[Hashable, int] = {}
        self._first_poll = True
        self._now = 0.0

    def begin(self, now: float) -> None:
        """Start recording a successful poll; now is a monotonic clock reading."""
        self._now = now
        self._current = {}

    def see(self, lock: Hashable, pid: int, backend_start: float | None, proven_seconds: float) -> float:
        """One holder seen by this poll; returns how long it has held the lock (a lower bound)."""
        key = (lock, pid, backend_start)
        proven_start = self._now - max(proven_seconds, 0.0)
        earlier = self._current.get(key, self._since.get(key))
        if earlier is None:
            start = proven_start
            # Holders already there at the first poll were not seen taking the lock.
            if not self._first_poll:
                self._acquisitions[lock] = self._acquisitions.get(lock, 0) + 1
        else:
            start = min(earlier, proven_start)
        self._current[key] = start
        return max(self._now - start, 0.0)

    def end(self) -> None:
        """Finish the poll: holders not seen in it are forgotten."""
        self._since, self._current = self._current, {}
        self._first_poll = False

    def observe(self, now: float, sightings: Iterable[Sighting]) -> None:
        """Record one successful poll at once."""
        self.begin(now)
        for s in sightings:
            self.see(s.lock, s.pid, s.backend_start, s.proven_seconds)
        self.end()

    def held_seconds(self, now: float, lock: Hashable, pid: int, backend_start: float | None) -> float:
        since = self._since.get((lock, pid, backend_start))
        return 0.0 if since is None else max(now - since, 0.0)

    def acquisitions(self, lock: Hashable) -> int:
        return self._acquisitions.get(lock, 0)
