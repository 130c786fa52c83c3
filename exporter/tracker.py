"""What only time reveals: since when each hold has been held, and how many holders took a lock.

pg_locks has no grant time. A hold starts, at the latest, when a poll first sees it;
pg_stat_activity can prove an earlier start (an idle session took its lock no later than its
last state change), and the tracker keeps the earliest start any poll has proven.

A hold is one session (pid + backend_start, so a reused pid is a new session) on one key of one
lock. The number of holds remembered is bounded: beyond the bound a hold gets the proven lower
bound only, and the drop is counted.
"""

from __future__ import annotations

from collections.abc import Hashable

# (lock slot, pid, backend_start, key): a lock slot is whatever the caller identifies a lock by
# over time (the poller: name and database; for unnamed keys, "" and the database).
HoldKey = tuple[Hashable, int, "float | None", int]


class HoldTracker:
    """First-seen times of holds and acquisition counts across polls."""

    def __init__(self, max_tracked: int = 100_000) -> None:
        self.max_tracked = max_tracked
        self._since: dict[HoldKey, float] = {}
        self._current: dict[HoldKey, float] = {}
        self._acquisitions: dict[Hashable, int] = {}
        self._first_poll = True
        self._now = 0.0
        self._admitted = 0  # new holds remembered by this poll
        self.dropped = 0  # holds not remembered because of max_tracked, summed over polls

    def begin(self, now: float) -> None:
        """Start recording a successful poll; now is a monotonic clock reading."""
        self._now = now
        self._current = {}
        self._admitted = 0

    def see(self, hold: HoldKey, proven_seconds: float) -> tuple[float, bool]:
        """One hold seen by this poll: (how long it has been held at least, whether this poll had
        already seen it: the same session holding the same key in the other mode)."""
        now = self._now
        current = self._current
        start = current.get(hold)
        if start is not None:
            return now - start, True
        proven_start = now - proven_seconds if proven_seconds > 0 else now
        earlier = self._since.get(hold)
        if earlier is None:
            start = proven_start
            # Holders already there at the first poll were not seen taking the lock.
            if not self._first_poll:
                slot = hold[0]
                self._acquisitions[slot] = self._acquisitions.get(slot, 0) + 1
            # A new hold is remembered while there is room; one already remembered always is,
            # so a flood of new holds never makes an old hold look new.
            if len(self._since) + self._admitted < self.max_tracked:
                current[hold] = start
                self._admitted += 1
            else:
                self.dropped += 1
        else:
            start = earlier if earlier < proven_start else proven_start
            current[hold] = start
        return now - start, False

    def end(self) -> None:
        """Finish the poll: holds not seen in it are forgotten."""
        self._since, self._current = self._current, {}
        self._first_poll = False

    @property
    def tracked(self) -> int:
        return len(self._since)

    def acquisitions(self, slot: Hashable) -> int:
        return self._acquisitions.get(slot, 0)
