"""Immutable results of one poll: what exposition reads, and nothing else."""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from .ages import age
from .pooled import Release

_HELD_SINCE = operator.attrgetter("held_since")
MODE_EXCLUSIVE = "exclusive"
MODE_SHARED = "shared"
BOTH_MODES = frozenset({MODE_EXCLUSIVE, MODE_SHARED})
ONLY_EXCLUSIVE = frozenset({MODE_EXCLUSIVE})
ONLY_SHARED = frozenset({MODE_SHARED})


STATE_PREPARED = "prepared"  # the state of a prepared transaction's holds


class Holder(NamedTuple):
    """A session, or a prepared transaction, holding one key of a lock. (A NamedTuple: made for
    every holder shown.) A prepared transaction has pid None, state "prepared", its gid as
    application_name and its owner as usename."""

    pid: int | None
    backend_start: float | None  # epoch seconds; None without the rights to see it
    modes: frozenset[str]
    application_name: str
    usename: str
    client_addr: str
    state: str
    # When the hold began at the latest, as docs/metrics.md's Hold age defines it (the poller's monotonic
    # clock, as Snapshot.taken_at): a start, not an age, so an unchanged holder is the same value at
    # every poll.
    held_since: float
    key: str = ""  # the decoded key: '4242', or '42,7' for an int4 pair
    pooler: str = ""  # the pooler the session came through; "" for a direct connection
    stranded: bool = False  # session-level, on a transaction-pool backend outside any transaction
    prepared_xid: int | None = None  # a prepared transaction's id

    @property
    def order(self) -> tuple[bool, int, int]:
        """Sessions by pid, then prepared transactions by transaction id: a total order without None."""
        return (self.pid is None, self.pid or 0, self.prepared_xid or 0)

    @property
    def is_prepared(self) -> bool:
        return self.pid is None


class Waiter(NamedTuple):
    """A session waiting for a key of a lock, as the poll saw it: who waits, and for how long.
    Through a pooler, the client it serves now (a waiter is inside its lock call, so inside that
    client's transaction)."""

    pid: int
    application_name: str
    usename: str
    client_addr: str
    wait_seconds: float
    key: str = ""  # the decoded key waited for: '4242', or '42,7'
    pooler: str = ""


class LockState(NamedTuple):
    """A named lock or key family as seen by one poll. (A NamedTuple: made once per lock per poll.)"""

    name: str
    database: str
    exclusive: int  # holding sessions in exclusive mode, summed over the keys of a family
    shared: int
    # When the oldest current hold began at the latest (Snapshot.taken_at's clock; None when free):
    # a start, not an age, so a lock whose holders did not change is the same value at every poll.
    held_since: float | None
    waiters: int
    wait_seconds: float
    acquisitions: int
    max_hold: float | None = None
    # The holders given a holder_info series: the longest-held first, within the configured caps.
    info_holders: tuple[Holder, ...] = ()
    holds: int = 0  # sessions x keys held, each counted once whatever its modes
    source: str = "config"  # or "preset"
    key: str = ""  # the key ('4242', '42,7') or, for a family, its key set ('(42, *)')
    keys_held: int | None = None  # families only: how many distinct keys are held now
    # Holds proven session-level (the backend is outside a transaction) on a server connection of
    # a transaction- or statement-mode pool; None when no pooler is configured.
    pooled_session_holders: int | None = None
    # Holders (sessions) of the lock that wait themselves for another lock now, of any type, and
    # the longest such wait: a migration holding its lock while it waits for a table.
    blocked_holders: int = 0
    blocked_holder_wait_seconds: float = 0.0
    # When a new holder was last seen, or the lock first watched (Snapshot.taken_at's clock), and
    # how often the config expects it taken (expect_every).
    last_acquired_at: float = 0.0
    expect_every: float | None = None
    # The blocked holders themselves (those blocked_holders counts), one per session with the key of
    # its oldest hold of the lock, by pid; the longest waits within the holder_info caps.
    blocked_info: tuple[Holder, ...] = ()
    # Who waits: the longest waits first, at most assemble.WAITERS_NAMED of the `waiters`.
    waiting: tuple[Waiter, ...] = ()

    def holders_in(self, mode: str) -> int:
        return self.exclusive if mode == MODE_EXCLUSIVE else self.shared

    @property
    def is_family(self) -> bool:
        return self.keys_held is not None


@dataclass(frozen=True)
class UnnamedLocks:
    """Advisory locks in one database whose keys no configured name, family or preset matches."""

    database: str
    holders: int  # one per session, key and mode
    waiters: int
    held_since: float | None = None  # as LockState's
    wait_seconds: float = 0.0
    info_holders: tuple[Holder, ...] = ()  # the oldest holds, within max_unnamed_holder_info
    max_hold: float | None = None
    pooled_session_holders: int | None = None  # as LockState's
    blocked_holders: int = 0  # as LockState's
    blocked_holder_wait_seconds: float = 0.0
    waiting: tuple[Waiter, ...] = ()  # as LockState's


class OwnWait(NamedTuple):
    """What a holder of an advisory lock waits for itself, as the poll saw it."""

    pid: int
    database: str  # "" for a wait that belongs to no database (a transaction id)
    locktype: str  # relation, transactionid, tuple, advisory, ...
    mode: str  # the mode asked for: AccessExclusiveLock, ShareLock...
    relation: int | None  # the table's oid, for relation, tuple and page waits
    key: int | None  # the transaction id of a transactionid wait, the key of an advisory one
    objsubid: int | None  # the form of an advisory key
    wait_seconds: float


class Blocker(NamedTuple):
    """A session that blocks a waiting holder, or blocks its blocker, to the root of the chain."""

    pid: int  # 0: a prepared transaction (pg_blocking_pids says so; prepared names them)
    depth: int  # 1: blocks the holder; 2: blocks a blocker of depth 1; ...
    blocks: int  # the pid it blocks
    application_name: str
    usename: str
    client_addr: str
    state: str
    state_seconds: float | None  # for how long it has been in that state
    waiting: bool  # waits itself for a lock: not the root
    query: str = ""  # its query, cut to 200 characters, only with show_queries
    prepared: str = ""  # for pid 0: the gids of the prepared transactions

    def describe(self) -> str:
        """'pid 9 (report-runner, app@10.0.0.7, active 2h03m)', or a prepared transaction's gids."""
        if self.pid == 0:
            return f"a prepared transaction ({self.prepared or 'gid unknown'}: COMMIT or ROLLBACK PREPARED ends it)"
        who = self.usename + (f"@{self.client_addr}" if self.client_addr else "")
        since = f" {age(self.state_seconds)}" if self.state_seconds is not None else ""
        query = f', running "{self.query}"' if self.query else ""
        return f"pid {self.pid} ({self.application_name or '-'}, {who or '?'}, {self.state or 'state hidden'}{since}{query})"


class Chain(NamedTuple):
    """A holder of an advisory lock that waits for another lock: for what, and who blocks it, down
    to the root blocker (who waits for nothing)."""

    wait: OwnWait
    waits_for: str  # 'relation public.users', 'transaction 1234', 'advisory lock 42,7 in app'
    blockers: tuple[Blocker, ...]

    @property
    def roots(self) -> tuple[Blocker, ...]:
        return tuple(b for b in self.blockers if not b.waiting)

    def describe(self) -> str:
        """'waits for relation public.users (AccessExclusiveLock) for 38m02s, blocked by pid 9
        (report-runner, app@10.0.0.7, active 2h03m)', each level of blockers after the last."""
        text = f"waits for {self.waits_for} ({self.wait.mode}) for {age(self.wait.wait_seconds)}"
        depth = 0
        for blocker in self.blockers:
            joiner = ", blocked by " if blocker.depth != depth else " and "
            if blocker.depth != depth and depth:
                joiner = ", which is blocked by "
            depth = blocker.depth
            text += joiner + blocker.describe()
        return text if self.blockers else text + ", blocked by nobody the server names (it may have just ended)"


@dataclass(frozen=True)
class ConsoleStatus:
    """The last read of one pooler console address."""

    pooler: str
    address: str
    up: bool
    seconds: float


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
    # False when the probe's connection is not proven to reach PostgreSQL itself, or its backend
    # changed: a try may land on a pooled backend holding the lock itself, and succeed.
    trusted: bool = True


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
    # When the last successful poll's rows arrived (seconds since the epoch), and that poll's round
    # trip: the server read pg_locks somewhere inside [timestamp - round trip, timestamp].
    last_success_timestamp: float | None = None
    last_success_round_trip: float | None = None
    holder_info_dropped: int = 0
    tracked_holds: int = 0
    tracked_holds_dropped: int = 0
    interval: float = 0.0  # the poll interval in force
    db_time_ratio: float = 0.0  # the polls' time on the server over the last minute, a fraction of that time


@dataclass(frozen=True)
class Snapshot:
    """Everything /metrics shows, from one poll. locks is empty while polls fail."""

    up: bool
    locks: tuple[LockState, ...] = ()
    unnamed: tuple[UnnamedLocks, ...] = ()
    collisions: tuple[KeyCollision, ...] = ()
    stats: PollStats = field(default_factory=PollStats)
    consoles: tuple[ConsoleStatus, ...] = ()  # the pooler consoles read with this poll
    taken_at: float = 0.0  # the poller's monotonic clock when the rows were read
    wall_at: float = 0.0  # the same moment in seconds since the epoch
    # What a held key stands for, where the exporter knows: (database, key label) -> 'table public.orders'.
    key_notes: dict[tuple[str, str], str] = field(default_factory=dict)
    chains: tuple[Chain, ...] = ()  # the holders that wait themselves, and who blocks them
    # When a pooler frees a stranded session lock by itself, as its console said at this poll:
    # per (lock, database) the soonest, and per server connection (its backend pid) its own.
    releases: dict[tuple[str, str], Release] = field(default_factory=dict)
    backend_releases: dict[int, Release] = field(default_factory=dict)
    # The poller's clock past which this poll must not be served as up (the next poll is due one
    # interval after this one was published and has its deadline to publish): the watchdog and
    # every scrape compare the clock with it (README: What the exporter promises, staleness).
    fresh_until: float = math.inf

    def chain_of(self, pid: int | None) -> Chain | None:
        """The chain of a holder that waits, if it does."""
        return next((chain for chain in self.chains if chain.wait.pid == pid), None) if self.chains else None

    def wall_time(self, at: float) -> float:
        """A reading of the poller's clock as seconds since the epoch."""
        return round(self.wall_at - (self.taken_at - at), 3)

    def held_seconds(self, held: Holder | LockState | UnnamedLocks) -> float:
        """The age of a hold, or of a lock's oldest hold, as of this poll (docs/metrics.md, Hold age: since the
        earliest hold of that session and key every poll since saw held); 0 when nothing is held."""
        return self.ages((held,))[0]

    def ages(self, held: Iterable[Holder | LockState | UnnamedLocks]) -> tuple[float, ...]:
        """held_seconds of each, in one comprehension: the exposition asks for every lock's at every
        poll, and a call per lock cost more than the ages themselves at 10,000 named locks."""
        taken_at = self.taken_at
        return tuple([0 if since is None else round(age, 3) if (age := taken_at - since) > 0 else 0
                      for since in map(_HELD_SINCE, held)])
