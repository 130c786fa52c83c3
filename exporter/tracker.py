"""What only time reveals: since when each hold has been held, and how many holders took a lock.

A hold's start is the start of the earliest hold of that session and key from which every poll saw
it held (docs/metrics.md: Hold age): a hold is remembered while every poll sees it and forgotten by the first
that does not (end()), so a release and re-take between two polls keep the start, and one a poll saw
free (released, or waited for: the assembler hands the tracker granted rows only) starts anew.

pg_locks has no grant time. A hold starts, at the latest, when a poll first sees it;
pg_stat_activity can prove an earlier start (an idle session took its lock no later than its
last state change), and the tracker keeps the earliest start any poll has proven, to within the
proving poll's own uncertainty (its slack: the server's clock read falls somewhere inside the
poll's round trip, so a proof that differs by less proves nothing new).

A hold is one session (pid + backend_start, so a reused pid is a new session) on one key of one
lock. Holds are kept per session, then per lock, in a dict keyed by the bare key: at 50,000 held
keys a tuple per hold cost twice the memory and a third more CPU. The number of holds remembered is
bounded: beyond the bound a new hold gets the proven lower bound only, and the drop is counted.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

# (pid, backend_start, prepared transaction id): a session, or a prepared transaction (pid None);
# holds are kept per session, then per lock id (whatever the caller identifies a lock by over
# time: the assembler's name and database; for unnamed keys, "", the database and the key form),
# then per key.
SessionId = tuple["int | None", "float | None", "int | None"]
_EMPTY: dict[int, float] = {}
_NO_LOCKS: dict[Hashable, dict[int, float]] = {}


class HoldTracker:
    """First-seen times of holds and acquisition counts across polls.

    Between two polls (after end()): _remembered holds exactly the holds of the last successful
    poll that had room (session -> lock id -> key -> start), tracked is how many, and _this_poll
    is empty; a start never moves later. check() verifies it (tests).
    """

    def __init__(self, max_tracked: int = 100_000) -> None:
        self.max_tracked = max_tracked
        self._remembered: dict[SessionId, dict[Hashable, dict[int, float]]] = {}
        self._this_poll: dict[SessionId, dict[Hashable, dict[int, float]]] = {}
        self._acquisitions: dict[Hashable, int] = {}
        # When each lock was last seen taken by a new holder, or first watched (monotonic).
        self._last_acquired: dict[Hashable, float] = {}
        self._first_poll = True
        self._now = 0.0
        self._slack = 0.0
        self._tracked = 0  # holds in _remembered
        self._room_for_new = 0  # new holds this poll may still remember
        self.dropped = 0  # holds not remembered because of max_tracked, summed over polls

    def begin(self, now: float, slack: float = 0.0) -> None:
        """Start recording a successful poll; now is a monotonic clock reading, slack how far its
        proofs may be off (seconds): one earlier than a start by no more moves nothing."""
        self._now = now
        self._slack = slack
        self._this_poll = {}
        # Every hold remembered so far stays remembered while it lasts; new ones fill the rest,
        # so a flood of new holds never makes an old hold look new.
        self._room_for_new = max(self.max_tracked - self._tracked, 0)

    def see(self, lock_id: Hashable, session: SessionId, keys: Sequence[int], proven_seconds: float,
            counts: bool = True) -> tuple[list[float], set[int]]:
        """Holds of one session on keys of one lock, seen by this poll: since when each has been
        held at least (a monotonic clock reading, in the order of keys), and the keys this poll had
        already seen (the same key held in the other mode). counts: a new hold is an acquisition
        (not so for a prepared transaction, which took its holds over from its session)."""
        earlier = self._remembered.get(session, _NO_LOCKS).get(lock_id, _EMPTY)
        by_lock = self._this_poll.get(session)
        if by_lock is None:
            by_lock = self._this_poll[session] = {}
        current = by_lock.get(lock_id)
        proven_start = self._now - proven_seconds if proven_seconds > 0 else self._now
        # A start moves earlier only for a proof earlier than it by more than the slack.
        moved_below = proven_start + self._slack
        if current is None and earlier and all(map(earlier.__contains__, keys)):
            # The steady state: every key was seen before. Done at C speed (map, max, zip).
            starts = list(map(earlier.__getitem__, keys))
            if moved_below < max(starts):
                starts = [start if start <= moved_below else proven_start for start in starts]
            by_lock[lock_id] = dict(zip(keys, starts))
            return starts, set()
        if current is None:
            current = by_lock[lock_id] = {}
        starts = []
        in_both_modes: set[int] = set()
        new = 0
        for key in keys:
            start = current.get(key)
            if start is not None:
                in_both_modes.add(key)
                starts.append(start)
                continue
            start = earlier.get(key)
            if start is None:
                start = proven_start
                if self._room_for_new > 0:
                    self._room_for_new -= 1
                    current[key] = start
                    new += 1
                else:
                    # Not remembered, so new again at the next poll: never counted as an acquisition
                    # (it would be counted at every poll, and move last_acquired with it).
                    self.dropped += 1
            else:
                if moved_below < start:
                    start = proven_start
                current[key] = start
            starts.append(start)
        # Holders already there at the first poll were not seen taking the lock.
        if new and counts and not self._first_poll:
            self._acquisitions[lock_id] = self._acquisitions.get(lock_id, 0) + new
            self._last_acquired[lock_id] = self._now
        return starts, in_both_modes

    def keep_unchanged(self, session: SessionId) -> None:
        """Holds of a session whose rows are the same as the last poll's: remembered as they were,
        without looking at each key again (their starts, modes and counts cannot have changed)."""
        held = self._remembered.get(session)
        if held is not None:
            self._this_poll[session] = held

    def end(self) -> None:
        """Finish the poll: holds not seen in it are forgotten."""
        self._remembered, self._this_poll = self._this_poll, {}
        self._tracked = sum(sum(map(len, by_lock.values())) for by_lock in self._remembered.values())
        self._first_poll = False

    @property
    def tracked(self) -> int:
        return self._tracked

    def sessions(self) -> set[SessionId]:
        """The sessions whose holds are remembered."""
        return set(self._remembered)

    def check(self) -> None:
        """Verify what the class docstring says is true between two polls (tests)."""
        if self._this_poll or self._tracked != sum(sum(map(len, ids.values())) for ids in self._remembered.values()):
            raise AssertionError("the tracker's count of remembered holds is wrong, or a poll did not end")

    def acquisitions(self, lock_id: Hashable) -> int:
        return self._acquisitions.get(lock_id, 0)

    def last_acquired(self, lock_id: Hashable) -> float:
        """When a new holder of the lock was last seen; until one is, when the lock was first
        watched (this poll, if it is the first to ask): an exporter that just started has not
        "failed to see" anything."""
        return self._last_acquired.setdefault(lock_id, self._now)
