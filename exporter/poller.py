"""One connection, one query per interval -> an immutable Snapshot."""

from __future__ import annotations

import bisect
import contextlib
import gc
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg

from . import queries
from .config import Config
from .deadline import OneAtATime, StuckCall
from .dsn import connect, error_line, reconnect_delay, server_name
from .resolve import ResolvedLock, find_collisions, resolve_on_server
from .snapshot import FOLDED_MODES, Holder, KeyCollision, LockState, PollStats, Snapshot, UnnamedLocks
from .tracker import HoldTracker

log = logging.getLogger(__name__)

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class ServerInfo:
    version_num: int
    database: str
    username: str
    is_superuser: bool
    can_read_all_stats: bool


def array_literal(values: Iterable[object]) -> str:
    """A PostgreSQL array literal of ints or strings, quoted as the array input syntax wants."""
    quoted = []
    for value in values:
        text = str(value)
        quoted.append(text if isinstance(value, int) else '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"')
    return "{" + ",".join(quoted) + "}"


@contextlib.contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """A snapshot is acyclic tuples; the cyclic collector walking it as it is built cost a
    quarter of a poll's CPU at 10,000 named locks (120 -> 89 ms). Reference counting frees it."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def connect_poller(config: Config) -> psycopg.Connection:
    """The poller's connection: statement_timeout = the poll interval."""
    return connect(config.dsn, queries.APPLICATION_NAME, config.poll_interval, password_file=config.password_file)


class Poller:
    """Polls pg_locks on its own connection and publishes a Snapshot after every attempt."""

    def __init__(
        self,
        config: Config,
        connect: Callable[[Config], psycopg.Connection],
        publish: Callable[[Snapshot], None],
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._connect = connect
        self._publish = publish
        self._clock = clock
        self._wall_clock = wall_clock
        self._conn: psycopg.Connection | None = None
        self._query = queries.POLL
        self._query_params: dict[str, Any] = {}
        self._locks: tuple[ResolvedLock, ...] = ()
        self._collisions: tuple[KeyCollision, ...] = ()
        self._tracker = HoldTracker()
        self._polls = 0
        self._errors = 0
        self._bucket_counts = [0] * len(DURATION_BUCKETS)
        self._duration_sum = 0.0
        self._last_success: float | None = None
        self._holder_info_dropped = 0
        self._last_error: str | None = None
        self._stats_lock = threading.Lock()
        self._pending_config: Config | None = None
        self._worker = OneAtATime("poll")
        self.server: ServerInfo | None = None

    # -- connection ---------------------------------------------------------------------

    def _open(self) -> psycopg.Connection:
        conn = self._connect(self._config)
        try:
            conn.execute(queries.POLLER_PLANNER_SETUP)
            row = conn.execute(queries.SERVER_INFO).fetchone()
            assert row is not None
            info = ServerInfo(int(row[0]), row[1], row[2], bool(row[3]), bool(row[4]))
            locks = resolve_on_server(conn, self._config, info.database)
        except BaseException:
            conn.close()
            raise
        self.server = info
        self._query = queries.poll_query(info.version_num)
        self._locks = locks
        messages, self._collisions = find_collisions(self._locks)
        for message in messages:
            log.warning("key collision: %s", message)
        if info.is_superuser:
            log.warning("connected as superuser %s: the exporter needs only pg_monitor (or pg_read_all_stats)", info.username)
        elif not info.can_read_all_stats:
            log.warning(
                "role %s lacks pg_read_all_stats (GRANT pg_monitor TO %s): other roles' sessions show no state, "
                "client address or backend start, so their holders get no idle hold-age bound and no client/state labels",
                info.username, info.username,
            )
        log.info(
            "connected to %s (PostgreSQL %s, database %s, user %s)",
            server_name(self._config.dsn), info.version_num, info.database, info.username,
        )
        return conn

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    # -- one poll -----------------------------------------------------------------------

    def _params(self) -> dict[str, Any]:
        # Array literals made once per connect: dumping 4 x 1,000 elements every poll cost
        # more client CPU than anything else in a poll but reading the rows.
        return {
            "probe_app": queries.PROBE_APPLICATION_NAME,
            "datnames": array_literal(lock.database for lock in self._locks),
            "classids": array_literal(lock.tag.classid for lock in self._locks),
            "objids": array_literal(lock.tag.objid for lock in self._locks),
            "objsubids": array_literal(lock.tag.objsubid for lock in self._locks),
        }

    def _read(self) -> list[tuple[Any, ...]]:
        if self._conn is None:
            self._conn = self._open()
            self._query_params = self._params()
        with self._conn.cursor() as cur:
            cur.execute(self._query, self._query_params)
            return cur.fetchall()

    def _build(self, rows: list[tuple[Any, ...]], now: float) -> tuple[tuple[LockState, ...], tuple[UnnamedLocks, ...]]:
        holding: dict[int, list[Holder]] = {}
        waiters: dict[int, tuple[int, float]] = {}
        unnamed: list[UnnamedLocks] = []
        locks = self._locks
        tracker = self._tracker
        tracker.begin(now)
        for row in rows:
            kind = row[0]
            if kind == "holder":
                index, pid, bstart = row[1] - 1, row[3], row[5]
                held = tracker.see(locks[index].key, pid, bstart, row[10] or 0.0)
                holding.setdefault(index, []).append(Holder(
                    pid, bstart, FOLDED_MODES[row[4]], row[6] or "", row[7] or "", row[8] or "", row[9] or "",
                    round(held, 3),
                ))
            elif kind == "waiters":
                waiters[row[1] - 1] = (int(row[12]), round(float(row[10] or 0.0), 3))
            else:
                unnamed.append(UnnamedLocks(str(row[2]), int(row[11]), int(row[12])))
        tracker.end()

        states = []
        room = self._config.max_holder_info
        per_lock = self._config.max_holder_info_per_lock
        dropped = 0
        for lock in self._locks:
            name = lock.config.name
            holders: tuple[Holder, ...] = ()
            shown: tuple[Holder, ...] = ()
            if lock.index in holding:
                holders = tuple(sorted(holding[lock.index]))
                # holder_info series go to the longest-held holders, within the caps.
                limit = min(per_lock, room)
                shown = holders if len(holders) <= limit else tuple(
                    sorted(sorted(holders, key=lambda h: -h.held_seconds)[:limit], key=lambda h: h.pid)
                )
                room -= len(shown)
                dropped += len(holders) - len(shown)
            count, longest = waiters.get(lock.index, (0, 0.0))
            states.append(LockState(name, lock.database, holders, count, longest, self._tracker.acquisitions(lock.key),
                                    lock.config.max_hold, shown, lock.source))
        if dropped:
            with self._stats_lock:
                self._holder_info_dropped += dropped
        return tuple(states), tuple(sorted(unnamed, key=lambda u: u.database))

    def _stats(self) -> PollStats:
        cumulative, total = [], 0
        for bound, count in zip(DURATION_BUCKETS, self._bucket_counts, strict=True):
            total += count
            cumulative.append((bound, total))
        return PollStats(
            self._polls, self._errors, tuple(cumulative), self._duration_sum, self._last_success, self._holder_info_dropped
        )

    def _record(self, seconds: float, failed: bool) -> PollStats:
        """Count one poll and return the totals, as one step: a stuck poll may return late."""
        with self._stats_lock:
            self._polls += 1
            self._errors += failed
            self._duration_sum += seconds
            slot = bisect.bisect_left(DURATION_BUCKETS, seconds)
            if slot < len(DURATION_BUCKETS):
                self._bucket_counts[slot] += 1
            if not failed:
                self._last_success = self._wall_clock()
            return self._stats()

    def poll_once(self) -> Snapshot:
        """Poll once; a failure becomes up=0 in the snapshot, never an exception."""
        started = self._clock()
        try:
            rows = self._read()
            now = self._clock()
            with _no_cyclic_gc():
                locks, unnamed = self._build(rows, now)
        except psycopg.Error as exc:
            stats = self._record(self._clock() - started, failed=True)
            self._fail(error_line(exc, self._config.dsn))
            if self._conn is not None and (self._conn.closed or isinstance(exc, psycopg.OperationalError)):
                self.close()
            return Snapshot(up=False, stats=stats)
        stats = self._record(now - started, failed=False)
        if self._last_error is not None:
            log.info("polls succeed again on %s", server_name(self._config.dsn))
            self._last_error = None
        return Snapshot(up=True, locks=locks, unnamed=unnamed, collisions=self._collisions, stats=stats)

    def _fail(self, message: str) -> None:
        # One warning per distinct failure, not one per interval.
        if message != self._last_error:
            log.warning("poll failed on %s: %s", server_name(self._config.dsn), message)
        else:
            log.debug("poll failed again: %s", message)
        self._last_error = message

    # -- the loop -----------------------------------------------------------------------

    def backoff(self, failures: int) -> float:
        """Jittered exponential delay after the n-th consecutive failure, capped at the interval."""
        return reconnect_delay(failures, cap=self._config.poll_interval)

    def reconfigure(self, config: Config) -> None:
        """Use a new config from the next poll on (reconnecting, so keys are resolved anew)."""
        self._pending_config = config

    def _apply_pending_config(self) -> None:
        config, self._pending_config = self._pending_config, None
        if config is not None:
            self.close()
            self._config = config

    def _poll_with_deadline(self) -> Snapshot:
        """poll_once, or up=0 if it does not return within an interval (a hung server)."""
        interval = self._config.poll_interval
        try:
            return self._worker.call(self.poll_once, timeout=interval)
        except StuckCall as exc:
            self._fail(f"{exc}: is the server hung? No new connection until it returns")
            return Snapshot(up=False, stats=self._record(interval, failed=True))

    def run(self, stop: threading.Event) -> None:
        """Poll every interval until stop is set; publishes after every attempt."""
        failures = 0
        next_at = self._clock()
        try:
            while not stop.is_set():
                if not self._worker.busy:
                    self._apply_pending_config()
                snapshot = self._poll_with_deadline()
                self._publish(snapshot)
                now = self._clock()
                if snapshot.up:
                    failures = 0
                    next_at += self._config.poll_interval
                    if next_at <= now:  # overran: skip the missed ticks
                        next_at = now + self._config.poll_interval
                    delay = next_at - now
                else:
                    failures += 1
                    delay = self.backoff(failures)
                    next_at = now + delay
                stop.wait(delay)
        finally:
            if not self._worker.busy:
                self.close()
