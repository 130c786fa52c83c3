"""One connection, one poll -> an immutable Snapshot. When polls run, and under which deadline,
is the scheduler's (scheduler.PollTask)."""

from __future__ import annotations

import bisect
import contextlib
import gc
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import class_row, namedtuple_row

from . import queries
from .config import AUTO_TIMEOUT_FLOOR, Config
from .connection import break_off, connect, local_timeouts, result_rows
from .dsn import error_line, reconnect_delay, server_name, timeout_ms
from .logs import LoopErrors
from .assemble import Assembled, Assembler, Caps
from .chains import read_chains, waits_for
from .matching import KeyMatcher
from .naming import ResolvedLock, find_collisions
from .resolve import resolve_on_server
from .poolers import PoolerReader, why_not_direct
from .interval import IntervalController
from .relations import RelationNames
from .snapshot import Chain, ConsoleStatus, KeyCollision, PollStats, Snapshot
from .tracker import HoldTracker

log = logging.getLogger(__name__)


class PollTurnTaken(Exception):
    """The probe's try on the same server has not finished within a poll interval."""

BACKOFF_FLOOR = 5.0  # with poll_interval auto, a server that is down is retried no faster than this
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class ServerInfo:
    """Who and what the poller is connected to (queries.SERVER_INFO, by column name)."""

    version_num: int
    backend_pid: int
    server_port: int | None  # inet_server_port(): None over a Unix socket
    server_addr: str | None
    client_port: int | None  # inet_client_port(): the port the server sees our end at (None over a Unix socket)
    client_addr: str | None
    port_setting: int  # the server's own port setting, whatever the connection came through
    database: str
    username: str
    is_superuser: bool
    can_read_all_stats: bool


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
    """The poller's connection: every transaction on it sets its own timeouts, but for the poll on
    a connection proven direct, whose bound is the session's (Poller._execute_poll)."""
    return connect(config.dsn, queries.APPLICATION_NAME, config.timeout_seconds, password_file=config.password_file)


class NotTheProvenBackend(Exception):
    """The direct session's settings found another backend than the one proven at connect: a
    pooler in between after all. Nothing was set; the poll falls back to the one-string transaction."""


class PollTicket:
    """One poll attempt, counted once: by the poll when it ends, or by its deadline if it is given
    up first (whichever comes first, under the poller's stats lock)."""

    __slots__ = ("counted",)

    def __init__(self) -> None:
        self.counted = False


class Poller:
    """Polls pg_locks on its own connection and publishes a Snapshot after every attempt."""

    def __init__(
        self,
        config: Config,
        connect: Callable[[Config], psycopg.Connection],
        publish: Callable[[Snapshot], None],
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        turn: threading.Lock | None = None,
    ) -> None:
        self._config = config
        self._connect = connect
        self._publish = publish
        self._clock = clock
        self._wall_clock = wall_clock
        # No try runs while the poll reads pg_locks, so the poll never sees the probe's own hold (and
        # needs to leave out no backend for it). In the exporter the scheduler's turn of the server
        # sees to it (a call starts only in its server's turn), so this lock is the poller's own; a
        # poller and prober driven without the scheduler share one.
        self._turn = turn or threading.Lock()
        self._unexpected = LoopErrors(log, f"poller of {server_name(config.dsn)}")
        self._conn: psycopg.Connection | None = None
        # A connection being opened (its first statements run before it becomes _conn): the one a
        # stuck poll's deadline breaks off then.
        self._opening: psycopg.Connection | None = None
        # The connection is proven ours alone and the poll statement is prepared on it: the poll is
        # the bare EXECUTE under session settings (queries.DIRECT_POLL), which _settings_ms says.
        self._direct = False
        self._settings_ms: int | None = None
        self._locks: tuple[ResolvedLock, ...] = ()
        self._tracker = HoldTracker(config.max_tracked_holds)
        self._controller = IntervalController(config.interval_budget)
        self._server_seconds = 0.0  # this poll's time in statements on the server: its cost
        self._sent_at = 0.0  # when the poll statement was sent: the server read its clock after
        self._explaining = False  # the last poll ran statements after the poll (chain, table names)
        self._assembler = Assembler((), KeyMatcher(()), self._tracker)
        self._seen_presets: frozenset[tuple[str, str]] = frozenset()
        self._collisions: tuple[KeyCollision, ...] = ()
        self._poolers = PoolerReader(config, clock)
        self._relations = RelationNames()
        self._polls = 0
        self._errors = 0
        self._bucket_counts = [0] * len(DURATION_BUCKETS)
        self._duration_sum = 0.0
        self._last_success: tuple[float, float] | None = None  # (wall clock when its rows arrived, round trip)
        # When the last good poll's rows arrived (the poller's clock), and the time since the one
        # before: a hold first seen now began at most that long ago, whatever the schedule said.
        self._read_at: float | None = None
        self._read_gap = 0.0
        self._holder_info_dropped = 0
        self._last_error: str | None = None
        self._stats_lock = threading.Lock()
        self._pending_config: Config | None = None
        self._pending_lock = threading.Lock()
        self.server: ServerInfo | None = None

    # -- connection ---------------------------------------------------------------------

    def _open(self) -> psycopg.Connection:
        conn = self._opening = self._connect(self._config)
        try:
            with local_timeouts(conn, self._config.timeout_seconds), conn.cursor(row_factory=class_row(ServerInfo)) as cur:
                info = cur.execute(queries.SERVER_INFO).fetchone()
                assert info is not None
                locks = resolve_on_server(conn, self._config, info.database)
        except BaseException:
            conn.close()
            raise
        self.server = info
        self._direct, self._settings_ms = self._prepare(conn, info), None
        self._locks = locks
        self._assembler = Assembler(locks, KeyMatcher(locks), self._tracker)
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

    def _prepare(self, conn: psycopg.Connection, info: ServerInfo) -> bool:
        """Prepare the poll statement on this connection, if it is proven to reach PostgreSQL
        itself: a statement prepared through a pooler would stay on a server connection the
        application borrows next. False otherwise, or if the server refuses: the poll is then
        planned at every poll."""
        why = why_not_direct(self._config.poolers, self._config.dsn, conn, info.server_addr, info.server_port,
                             info.client_addr, info.client_port, self._config.timeout_seconds)
        if why is not None:
            log.info("the poll's connection to %s: %s, so the poll statement is not prepared (it is planned at every "
                     "poll)", server_name(self._config.dsn), why)
            return False
        try:
            with local_timeouts(conn, self._config.timeout_seconds):
                conn.execute(queries.prepare_poll(info.version_num))
        except psycopg.Error as exc:
            log.info("poll statement not prepared (%s): it is planned at every poll", error_line(exc, self._config.dsn))
            return False
        return True

    def _unprepare(self) -> None:
        """The prepared poll statement is not there, or the backend is not the one the connection
        was proven to reach (a transaction-mode pooler handed the poll to another server
        connection): the one-string transaction, planned at every poll, from now on."""
        assert self.server is not None
        log.warning("poll statement not found, or not the backend proven direct (a transaction-mode pooler in between?): "
                    "the poll is planned at every poll, its settings LOCAL, from now on")
        self._direct, self._settings_ms = False, None

    def close(self) -> None:
        self._poolers.close()
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    # -- one poll -----------------------------------------------------------------------

    def _read(self) -> list[Any]:
        if self._conn is None:
            try:
                self._conn = self._open()
            finally:
                self._opening = None
        return self._run_poll(self._conn)

    def _timeout(self) -> float:
        """statement_timeout of the poll and the hung-poll deadline: the interval in force, and with
        auto at least AUTO_TIMEOUT_FLOOR (a 100 ms interval must not cut a 200 ms poll short)."""
        if self._config.poll_auto:
            return max(self._controller.interval, AUTO_TIMEOUT_FLOOR)
        return self._config.poll_interval

    def _run_poll(self, conn: psycopg.Connection) -> list[Any]:
        if not self._turn.acquire(timeout=self._timeout()):
            raise PollTurnTaken("the probe's try on this server has not finished: no turn to poll")
        started = self._clock()
        try:
            with conn.cursor(row_factory=namedtuple_row) as cur:
                try:
                    try:
                        self._execute_poll(conn, cur)
                    except (psycopg.errors.InvalidSqlStatementName, NotTheProvenBackend):
                        self._unprepare()  # and, in the same turn, the one-string transaction
                        self._execute_poll(conn, cur)
                finally:
                    # The poll's cost: its round trip, which bounds the server's time from above (the
                    # rows are in; turning them into Python objects below is the exporter's time).
                    self._server_seconds += self._clock() - started
                return result_rows(cur, queries.POLL_COLUMN_NAMES)
        except psycopg.Error:
            # A statement that failed inside the transaction left it open (aborted): end it, so
            # the next poll starts clean on the same connection.
            if not conn.closed and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                try:
                    conn.execute("ROLLBACK")
                except psycopg.Error:
                    conn.close()
            raise
        finally:
            self._turn.release()

    def _execute_poll(self, conn: psycopg.Connection, cur: psycopg.Cursor[Any]) -> None:
        assert self.server is not None
        if not self._direct:
            self._sent_at = self._clock()
            cur.execute(queries.poll_query(self.server.version_num, self._timeout()))
            return
        bound = self._session_bound()
        if bound != self._settings_ms:
            server = self.server
            assert server.client_port is not None and server.server_port is not None  # proven: TCP at both ends
            made = conn.execute(queries.direct_settings(bound, server.backend_pid, server.client_port, server.server_port))
            if made.fetchone() is None:
                raise NotTheProvenBackend(f"backend {server.backend_pid} is not the one this connection reaches")
            self._settings_ms = bound
        self._sent_at = self._clock()
        cur.execute(queries.DIRECT_POLL, binary=True)

    def _session_bound(self) -> int:
        """statement_timeout and lock_timeout of a direct session, in ms: the poll's bound; with
        auto above AUTO_TIMEOUT_FLOOR rounded up to a power of two seconds (less than twice the
        interval; the deadline counts it), so they are set again when the interval crosses one,
        not at every poll as the interval moves."""
        seconds = self._timeout()
        if self._config.poll_auto and seconds > AUTO_TIMEOUT_FLOOR:
            seconds = 2.0 ** math.ceil(math.log2(seconds))
        return timeout_ms(seconds)

    def _build(self, rows: list[Any], now: float) -> tuple[Assembled, tuple[ConsoleStatus, ...]]:
        config = self._config
        # The consoles right after pg_locks, so both describe the same moment as nearly as can be.
        view = self._poolers.read(self.server.port_setting if self.server else None) \
            if self._poolers.configured else None
        # With every console down and no pooler known by address nothing is known of the poolers:
        # the pooled figures are then left out, not reported as 0.
        known = view if view is not None and (view.by_address or any(c.up for c in view.consoles)) else None
        result = self._assembler.run(
            rows, now, Caps(config.max_holder_info_per_lock, config.max_holder_info, config.max_unnamed_holder_info),
            self._seen_presets, config.unnamed_max_hold, known, frozenset(config.databases),
            slack=max(now - self._sent_at, 0.0),  # the server's clock was read between the two
        )
        self._seen_presets = result.seen_presets
        if result.holder_info_dropped:
            with self._stats_lock:
                self._holder_info_dropped += result.holder_info_dropped
        return result, view.consoles if view is not None else ()

    def _explain(self, result: Assembled) -> tuple[dict[tuple[str, str], str], tuple[Chain, ...]]:
        """What the figures alone do not say: the tables pg_repack keys stand for, and for each
        holder that waits itself, for what and who blocks it (a second statement, only then)."""
        conn, server = self._conn, self.server
        if conn is None or server is None:
            return {}, ()
        started = self._clock()
        try:
            notes, chains = self._explained(conn, server, result)
        finally:
            self._server_seconds += self._clock() - started
        # The next poll's deadline makes room for these statements when this poll had cause to run them.
        self._explaining = bool(result.blocked or notes)
        return notes, chains

    def _explained(self, conn: psycopg.Connection, server: ServerInfo,
                   result: Assembled) -> tuple[dict[tuple[str, str], str], tuple[Chain, ...]]:
        tables = {w.relation for w in result.blocked if w.relation is not None and w.database == server.database}
        notes, names = self._relations.notes(conn, server.database, self._config.timeout_seconds, result.locks, tables)
        if not result.blocked:
            return notes, ()
        try:
            return notes, read_chains(conn, self._config.timeout_seconds, result.blocked, result.waiting_pids,
                                      self._config.show_queries, server.database, names)
        except psycopg.Error as exc:  # the blocked figures stand without who blocks them
            log.debug("who blocks the waiting holders not read: %s", error_line(exc, self._config.dsn))
            return notes, tuple(Chain(wait, waits_for(wait, server.database, names), ()) for wait in result.blocked)

    def _stats(self) -> PollStats:
        cumulative, total = [], 0
        for bound, count in zip(DURATION_BUCKETS, self._bucket_counts, strict=True):
            total += count
            cumulative.append((bound, total))
        return PollStats(
            self._polls, self._errors, tuple(cumulative), self._duration_sum,
            self._last_success[0] if self._last_success else None, self._last_success[1] if self._last_success else None,
            self._holder_info_dropped,
            # How often pg_locks is read: the interval in force, or the time between the last two
            # good reads when longer (a poll that overran on a slow console, polls that failed).
            self._tracker.tracked, self._tracker.dropped, max(self._controller.interval, self._read_gap),
            round(self._controller.ratio(self._clock()), 6),
        )

    def _count(self, ticket: PollTicket, seconds: float, failed: bool,
               read: tuple[float, float, float] | None = None) -> PollStats | None:
        """Count the poll of this ticket, once, and return the totals; None if it was counted
        already (given up as stuck: a stuck poll may return late, or never). One critical section,
        so the poll and its deadline cannot both count it. read: a good poll's (wall clock when its
        rows arrived, its round trip, the poller's clock then)."""
        with self._stats_lock:
            if ticket.counted:
                return None
            ticket.counted = True
            if not failed:
                self._controller.record(self._server_seconds, self._clock())  # the next interval, from its cost
            self._polls += 1
            self._errors += failed
            self._duration_sum += seconds
            slot = bisect.bisect_left(DURATION_BUCKETS, seconds)
            if slot < len(DURATION_BUCKETS):
                self._bucket_counts[slot] += 1
            if not failed:
                wall_at, round_trip, at = read or (self._wall_clock(), 0.0, self._clock())
                self._last_success = (wall_at, round_trip)
                self._read_gap = 0.0 if self._read_at is None else at - self._read_at
                self._read_at = at
            return self._stats()

    def poll_once(self, ticket: PollTicket | None = None) -> Snapshot:
        """Poll once; a failure, whatever it is, becomes up=0 in the snapshot, never an exception.
        ticket: the poll's own, shared with the deadline that may give it up."""
        ticket = ticket or PollTicket()
        started = self._clock()
        ends_by = started + self.deadline()  # this poll's deadline, as the scheduler gives it
        self._server_seconds = 0.0
        try:
            rows = self._read()
            now, wall_at = self._clock(), self._wall_clock()
            with _no_cyclic_gc():
                result, consoles = self._build(rows, now)
            notes, chains = self._explain(result)
        except (psycopg.Error, PollTurnTaken) as exc:
            stats = self._count(ticket, self._clock() - started, failed=True) or self._stats_now()
            self._fail(error_line(exc, self._config.dsn))
            if self._conn is not None and (self._conn.closed or isinstance(exc, psycopg.OperationalError)):
                self.close()
            return Snapshot(up=False, stats=stats)
        except Exception as exc:  # noqa: BLE001 - a bug, or rows no one foresaw: a failed poll, seen
            stats = self._count(ticket, self._clock() - started, failed=True) or self._stats_now()
            self._last_error = self._unexpected.report(exc)
            self._restart()
            return Snapshot(up=False, stats=stats)
        # The server read pg_locks inside [sent, now]: the figures describe that window.
        stats = self._count(ticket, now - started, failed=False, read=(wall_at, max(now - self._sent_at, 0.0), now))
        if stats is None:
            return Snapshot(up=False, stats=self._stats_now())  # already counted, as failed, when it was given up
        if self._last_error is not None:
            log.info("polls succeed again on %s", server_name(self._config.dsn))
            self._last_error = None
        releases = {self._locks[tally].key: release for tally, release in result.releases.items() if isinstance(tally, int)}
        return Snapshot(up=True, locks=result.locks, unnamed=result.unnamed, collisions=self._collisions, stats=stats,
                        consoles=consoles, taken_at=now, wall_at=wall_at, key_notes=notes, chains=chains, releases=releases,
                        backend_releases=result.backend_releases,
                        fresh_until=self._fresh_until(min(self._clock(), ends_by)))

    def _fresh_until(self, ended: float) -> float:
        """The staleness bound of a poll that ended then: the next poll is due within one interval
        of it (the loop's schedule: run), may wait its turn_allowance for its server's turn, and has
        its deadline to publish, so past that this poll is
        not the latest a working poller would serve; the watchdog and every scrape then serve up 0.
        Computed after the poll, so the deadline counts what it made the next one need (room for
        the explaining statements, each console address resolved). A poll that ended past its own
        deadline (the process stopped, SIGSTOP, between its read and its end: the 30-minute truth
        run served a read 16 s old with up 1 against a 6 s bound) counts from that deadline."""
        return ended + self._controller.interval + self.turn_allowance() + self.deadline()

    def _stats_now(self) -> PollStats:
        with self._stats_lock:
            return self._stats()

    def _restart(self) -> None:
        """After an unexpected error: a new connection and assembler (its memory of the last poll
        may be half updated); the tracker's first sightings are kept."""
        try:
            self.close()
        except Exception as exc:  # noqa: BLE001 - closing must not fail the recovery
            self._unexpected.report(exc)
            self._conn = None
        self._assembler = Assembler((), KeyMatcher(()), self._tracker)

    def _fail(self, message: str) -> None:
        # One warning per distinct failure, not one per interval.
        if message != self._last_error:
            log.warning("poll failed on %s: %s", server_name(self._config.dsn), message)
        else:
            log.debug("poll failed again: %s", message)
        self._last_error = message

    # -- what the scheduler asks --------------------------------------------------------

    def publish(self, snapshot: Snapshot) -> None:
        """Hand a poll's snapshot to whoever serves it."""
        self._publish(snapshot)

    @property
    def interval(self) -> float:
        """The interval in force (poll_interval, or auto's latest)."""
        return self._controller.interval

    def backoff(self, failures: int) -> float:
        """Jittered exponential delay after the n-th consecutive failure, capped at the interval."""
        cap = max(self._controller.interval, BACKOFF_FLOOR) if self._config.poll_auto else self._config.poll_interval
        return reconnect_delay(failures, cap=cap)

    def reconfigure(self, config: Config) -> None:
        """Use a new config from the next poll on (reconnecting, so keys are resolved anew)."""
        with self._pending_lock:
            self._pending_config = config

    def apply_pending_config(self) -> None:
        """A reload's config, between two polls (never while one runs)."""
        with self._pending_lock:  # read and cleared at once: a reload in between is not lost
            config, self._pending_config = self._pending_config, None
        if config is not None:
            self.close()
            if config.interval_budget != self._config.interval_budget:
                self._controller = IntervalController(config.interval_budget)
            self._config = config
            self._tracker.max_tracked = config.max_tracked_holds
            self._poolers.reconfigure(config)

    def deadline(self) -> float:
        """How long a poll's call may take before it counts as stuck (the scheduler gives it up
        then): the poll statement's own bound, and room for what a poll may do after it (each pooler
        console's read, the chain and table names): a slow console or a slow pg_blocking_pids must
        not fail the poll they serve. The wait for the server's turn is not in it: the scheduler has
        the poll wait for its turn before the call starts (turn_allowance)."""
        explain = 2 * self._config.timeout_seconds if self._explaining else 0.0
        # Connecting again (connect, server facts, key names, PREPARE), each bounded by the timeout.
        connect = 2 * self._config.timeout_seconds if self._conn is None else 0.0
        # The statement's bound (a direct session's, rounded up under auto: _session_bound).
        statement = self._session_bound() / 1000 if self._direct else self._timeout()
        return statement + connect + self._poolers.read_budget() + explain

    def turn_allowance(self) -> float:
        """How long the staleness bound lets the next poll wait for its server's turn, behind a
        probe's try or another target's poll of the same server (the scheduler runs one call per
        server; the wait comes before the poll's call and its deadline): one interval, the
        statement bound. A poll that waits longer (behind a call on a hung server, until that
        call's deadline) serves up 0 meanwhile: its last poll is too old to be served."""
        return self._timeout()

    def give_up(self, ticket: PollTicket, deadline: float) -> Snapshot:
        """The poll of this ticket has not returned within its deadline (a hung server): break its
        connection off, so the stuck call returns now (a black-holed network never answers), and
        count it once, as failed (if it returned just now, it counted itself)."""
        self._fail(f"poll did not return within {deadline:g}s: is the server hung? Its connection is broken off "
                   "and made anew")
        break_off(self._conn or self._opening)
        return Snapshot(up=False, stats=self._count(ticket, deadline, failed=True) or self._stats_now())
