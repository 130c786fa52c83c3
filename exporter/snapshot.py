"""Immutable results of one poll: what exposition reads, and nothing else."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

MODE_EXCLUSIVE = "exclusive"
MODE_SHARED = "shared"
# The poll's folded modes (1 exclusive, 2 shared, 3 both) -> the modes a holder holds.
FOLDED_MODES = {
    "1": frozenset({MODE_EXCLUSIVE}),
    "2": frozenset({MODE_SHARED}),
    "3": frozenset({MODE_EXCLUSIVE, MODE_SHARED}),
}


class Holder(NamedTuple):
    """A session holding a configured lock. (A NamedTuple: made ~1,000 times a poll.)"""

    pid: int
    backend_start: float | None  # epoch seconds; None without the rights to see it
    modes: frozenset[str]
    application_name: str
    usename: str
    client_addr: str
    state: str
    held_seconds: float


class LockState(NamedTuple):
    """A configured lock as seen by one poll. (A NamedTuple: made once per lock per poll.)"""

    name: str
    database: str
    holders: tuple[Holder, ...]
    waiters: int
    wait_seconds: float
    acquisitions: int
    max_hold: float | None = None
    # The holders given a holder_info series: the longest-held first, within the configured caps.
    info_holders: tuple[Holder, ...] = ()
    source: str = "config"  # or "preset"

    def holders_in(self, mode: str) -> int:
        return sum(1 for h in self.holders if mode in h.modes)

    @property
    def held_seconds(self) -> float:
        return max((h.held_seconds for h in self.holders), default=0.0)


@dataclass(frozen=True)
class UnnamedLocks:
    """Advisory locks in one database whose keys no configured name matches."""

    database: str
    holders: int
    waiters: int


@dataclass(frozen=True)
class KeyCollision:
    """Two configured names that the server resolved to the same lock."""

    lock: str
    other: str
    database: str


@dataclass(frozen=True)
class ProbeResult:
    """The last try of one probed lock."""

    lock: str
    database: str
    acquirable: bool | None  # None: the try failed
    ok: bool
    duration: float
    errors: int
    last_run: float  # epoch seconds


@dataclass(frozen=True)
class ReloadStatus:
    """The outcome of the last config load (start-up counts as one)."""

    successful: bool = True
    last_success_timestamp: float | None = None


@dataclass(frozen=True)
class PollStats:
    """The poller's running totals, copied into every snapshot."""

    polls: int = 0
    errors: int = 0
    duration_buckets: tuple[tuple[float, int], ...] = ()  # (upper bound, cumulative count)
    duration_sum: float = 0.0
    last_success_timestamp: float | None = None
    holder_info_dropped: int = 0


@dataclass(frozen=True)
class Snapshot:
    """Everything /metrics shows, from one poll. locks is empty while polls fail."""

    up: bool
    locks: tuple[LockState, ...] = ()
    unnamed: tuple[UnnamedLocks, ...] = ()
    collisions: tuple[KeyCollision, ...] = ()
    stats: PollStats = field(default_factory=PollStats)
