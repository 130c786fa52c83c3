"""The liveness probe: its own connection(s), one transaction-level try-lock per try.

A try is one transaction of pg_try_advisory_xact_lock, sent as one string: it never waits, and
even when it gets the lock the lock is gone when that transaction commits, so the exporter can
never leave a lock held. Its timeouts are LOCAL to it: nothing stays on a pooled backend. Tries
are spread over each lock's interval rather than fired all at once, and never run while the poll
of the same server runs (they share a turn), so a poll never sees the probe's own hold.

A try is trusted only on a connection proven to reach PostgreSQL itself (no configured pooler at
the dsn's address, and both ends of the TCP socket are what the server sees), and whose backend
has not changed since: anywhere else it may run on a pooled server connection that holds a
stranded session lock of the probed key, and succeed there (advisory locks are re-entrant per
backend). A quiet pool hands back that same connection at every try, so no change of backend
would ever show it, and the only other witness, pg_locks, is the poll's to read once per interval.
An untrusted try reports neither acquirable nor ok: "not known" rather than a guess.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import namedtuple_row

from . import keys, queries
from .config import EXPECT_ANY, EXPECT_FREE, EXPECT_HELD, Config, LockConfig
from .connection import break_off, connect, result_rows
from .dsn import database_name, error_line, reconnect_delay, server_name, timeout_ms
from .logs import LoopErrors
from .poolers import NOT_PROVEN_DIRECT, why_not_direct
from .snapshot import ProbeResult

log = logging.getLogger(__name__)

# A try never waits for the lock; this bounds a slow server, not a held lock.
PROBE_TIMEOUT_MAX = 2.0
PROBE_TIMEOUT_MIN = 0.25


def probe_timeout(config: Config) -> float:
    """statement_timeout and lock_timeout of the probe's connections."""
    shortest = min((lock.probe.interval for lock in config.probed), default=PROBE_TIMEOUT_MAX)  # type: ignore[union-attr]
    return max(PROBE_TIMEOUT_MIN, min(PROBE_TIMEOUT_MAX, shortest))


class ProbeUnavailable(Exception):
    """No connection to try with right now (a recent connect failed), or no turn on the server."""


def connect_probe(config: Config, database: str | None) -> psycopg.Connection:
    """A probe connection to database (None: the dsn's own)."""
    return connect(
        config.dsn, queries.PROBE_APPLICATION_NAME, probe_timeout(config), database, password_file=config.password_file
    )


def _lock_arguments(key: keys.KeySpec) -> sql.Composable:
    """pg_try_advisory_xact_lock's arguments for a key, in the form the application uses."""
    if isinstance(key, keys.BigintKey):
        return sql.SQL(queries.PROBE_LOCK_BIGINT).format(key=sql.Literal(key.value))
    if isinstance(key, keys.Int4PairKey):
        return sql.SQL(queries.PROBE_LOCK_INT4_PAIR).format(first=sql.Literal(key.first), second=sql.Literal(key.second))
    if isinstance(key, keys.HashtextKey):
        return sql.SQL(queries.PROBE_LOCK_HASHTEXT).format(text=sql.Literal(key.text))
    return sql.SQL(queries.PROBE_LOCK_HASHTEXTEXTENDED).format(text=sql.Literal(key.text))


def try_statement(key: keys.KeySpec, timeout_seconds: float) -> sql.Composed:
    """One try of a key: its transaction, as one string."""
    return sql.SQL(queries.PROBE_TRANSACTION).format(ms=sql.Literal(timeout_ms(timeout_seconds)),
                                                     lock=_lock_arguments(key))


def matches(expect: str, acquirable: bool) -> bool:
    """Whether a try that ran matches what the config expects of the lock."""
    if expect == EXPECT_HELD:
        return not acquirable
    if expect == EXPECT_FREE:
        return acquirable
    return expect == EXPECT_ANY


def first_due(start: float, locks: tuple[LockConfig, ...]) -> list[float]:
    """Spread the first tries: lock i of n starts i/n of its interval after start."""
    n = len(locks)
    return [start + lock.probe.interval * i / n for i, lock in enumerate(locks)]  # type: ignore[union-attr]


class Prober:
    """Tries one probed lock at a time, when the scheduler says (scheduler.ProbeTask); keeps every
    lock's last result."""

    def __init__(
        self,
        config: Config,
        connect: Callable[[Config, str | None], psycopg.Connection],
        publish: Callable[[tuple[ProbeResult, ...]], None],
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        turn: threading.Lock | None = None,
    ) -> None:
        self._config = config
        self._locks = config.probed
        # A try never runs while a poll reads pg_locks: in the exporter the scheduler's turn of the
        # server sees to it; a prober and poller driven without the scheduler share this lock.
        self._turn = turn or threading.Lock()
        self._unexpected = LoopErrors(log, "probe")
        self._connect = connect
        self._publish = publish
        self._clock = clock
        self._wall_clock = wall_clock
        # One connection per database with probed locks (None: the dsn's own database).
        self._conns: dict[str | None, psycopg.Connection] = {}
        self._pids: dict[str | None, int] = {}
        self._pooled: set[str | None] = set()  # connections seen moving between backends
        # Why the last connection to each database was not proven to reach PostgreSQL itself (None:
        # proven, or not yet known), kept over a reconnect until the next proof; logged on change.
        self._unproven_why: dict[str | None, str | None] = {}
        self._databases: dict[str | None, str] = {}
        self._retry_at: dict[str | None, float] = {}
        self._failures: dict[str | None, int] = {}
        self._errors: dict[str, int] = {}
        self._last_error: dict[str, str] = {}
        self._results: dict[str, ProbeResult] = {}
        self._results_lock = threading.Lock()
        self._pending_config: Config | None = None
        self._pending_lock = threading.Lock()
        # The connection the try in progress uses, or is opening: the one its deadline breaks off.
        self._in_use: psycopg.Connection | None = None
        self._opening: psycopg.Connection | None = None

    def _database_label(self, lock: LockConfig) -> str:
        if lock.database:
            return lock.database
        return self._databases.get(None) or database_name(self._config.dsn)

    def _connection(self, database: str | None) -> psycopg.Connection:
        conn = self._conns.get(database)
        if conn is not None and not conn.closed:
            return conn
        if self._clock() < self._retry_at.get(database, 0.0):
            raise ProbeUnavailable("not connected (waiting to reconnect after a failed connect)")
        conn = None
        try:
            conn = self._opening = self._connect(self._config, database)
            with conn.cursor(row_factory=namedtuple_row) as cur:
                row = cur.execute(queries.SERVER_INFO).fetchone()
        except psycopg.Error:
            self._opening = None
            if conn is not None:
                conn.close()
            failures = self._failures.get(database, 0) + 1
            self._failures[database] = failures
            cap = min(lock.probe.interval for lock in self._locks)  # type: ignore[union-attr]
            self._retry_at[database] = self._clock() + reconnect_delay(failures, cap)
            raise
        self._failures[database] = 0
        self._databases[database] = row.database if row else (database or "")
        self._pids[database] = row.backend_pid if row else 0
        self._pooled.discard(database)
        self._conns[database] = conn
        self._opening = None
        self._prove(conn, row, database)
        return conn

    def _prove(self, conn: psycopg.Connection, row: Any, database: str | None) -> None:
        """Prove a new connection reaches PostgreSQL itself, or say why not: no configured pooler is
        at the dsn's address, and both ends of our TCP socket are what the server sees. A session
        pool is not trusted either: its server connection may carry a session lock of a previous
        client where the pooler's reset query does not release advisory locks."""
        why = NOT_PROVEN_DIRECT if row is None else why_not_direct(
            self._config.poolers, self._config.dsn, conn, row.server_addr, row.server_port, row.client_addr,
            row.client_port, probe_timeout(self._config))
        if why != self._unproven_why.get(database):
            if why is not None:
                log.warning(
                    "the probe's connection to %s: %s; a try there may run on a pooled server connection that holds "
                    "a stranded session lock of the key, and succeed, so its results are marked untrusted "
                    "(pg_advisory_lock_probe_trusted 0, no probe_acquirable or probe_ok). Point the dsn at "
                    "PostgreSQL itself over TCP to probe", server_name(self._config.dsn), why)
            else:
                log.info("the probe's connection to %s is proven to reach PostgreSQL itself: its results are trusted "
                         "again", server_name(self._config.dsn))
        self._unproven_why[database] = why

    def _trusted(self, database: str | None) -> bool:
        """Whether a try on this database's connection is trusted: proven at its connect (or, not
        connected, at the last connect: not yet known counts as trusted, a failed try reports
        nothing to trust), and the same backend since."""
        return self._unproven_why.get(database) is None and database not in self._pooled

    def _drop(self, database: str | None) -> None:
        conn = self._conns.pop(database, None)
        self._pids.pop(database, None)
        if conn is not None:
            conn.close()

    def try_lock(self, lock: LockConfig) -> ProbeResult:
        """One try of one lock; a failure, whatever it is, is counted and reported, never raised."""
        timeout = probe_timeout(self._config)
        started = self._clock()
        self._in_use = None
        try:
            statement = try_statement(lock.key, timeout)
            conn = self._in_use = self._connection(lock.database)
            if not self._turn.acquire(timeout=timeout):
                raise ProbeUnavailable("the poll of this server has not finished: no turn to try")
            try:
                started = self._clock()
                with conn.cursor(row_factory=namedtuple_row) as cur:
                    cur.execute(statement)
                    rows = result_rows(cur, queries.PROBE_RESULT_COLUMNS)
            finally:
                self._turn.release()
            row = rows[0] if rows else None
        except (psycopg.Error, ProbeUnavailable) as exc:
            self._recover(lock.database, exc)
            return self._record(lock, None, self._clock() - started, error_line(exc, self._config.dsn),
                                trusted=self._trusted(lock.database))
        except Exception as exc:  # noqa: BLE001 - a bug must not end the probe: a failed try, seen
            self._drop(lock.database)
            return self._record(lock, None, self._clock() - started, self._unexpected.report(exc),
                                trusted=self._trusted(lock.database))
        duration = self._clock() - started
        self._check_backend(lock.database, row.backend_pid if row else 0)
        return self._record(lock, bool(row and row.got), duration, None, trusted=self._trusted(lock.database))

    def _recover(self, database: str | None, exc: BaseException) -> None:
        """After a failed try: a broken connection is dropped; one left inside the try's aborted
        transaction (the one string stops at the error) is rolled back, or dropped if it cannot be."""
        conn = self._conns.get(database)
        if conn is None:
            return
        if conn.closed or isinstance(exc, psycopg.OperationalError):
            self._drop(database)
        elif conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            try:
                conn.execute("ROLLBACK")
            except psycopg.Error:
                self._drop(database)

    def _check_backend(self, database: str | None, backend_pid: int) -> None:
        """A connection whose backend changed between tries goes through a transaction pooler: the
        second guard, for a proof that was wrong (a transparent proxy that keeps both addresses)."""
        if database in self._pooled or backend_pid == self._pids.get(database, backend_pid):
            return
        self._pooled.add(database)
        log.warning(
            "the probe's connection to %s goes through a transaction-mode pooler (its backend changed from pid %s "
            "to %s between tries): a try on a backend that holds a stranded session lock succeeds, so its results "
            "are marked untrusted (pg_advisory_lock_probe_trusted 0). Point the dsn at PostgreSQL itself over TCP",
            server_name(self._config.dsn), self._pids.get(database), backend_pid,
        )

    def _record(self, lock: LockConfig, acquirable: bool | None, duration: float, error: str | None,
                *, trusted: bool) -> ProbeResult:
        assert lock.probe is not None
        with self._results_lock:
            if error is not None:
                self._errors[lock.name] = self._errors.get(lock.name, 0) + 1
                if self._last_error.get(lock.name) != error:
                    log.warning("probe of %r failed: %s", lock.name, error)
                self._last_error[lock.name] = error
            elif self._last_error.pop(lock.name, None) is not None:
                log.info("probe of %r succeeds again", lock.name)
            result = ProbeResult(
                lock=lock.name,
                database=self._database_label(lock),
                acquirable=acquirable,
                ok=acquirable is not None and matches(lock.probe.expect, acquirable),
                duration=duration,
                errors=self._errors.get(lock.name, 0),
                last_run=self._wall_clock(),
                trusted=trusted,
            )
            self._results[lock.name] = result
            return result

    def results(self) -> tuple[ProbeResult, ...]:
        with self._results_lock:
            return tuple(self._results[lock.name] for lock in self._locks if lock.name in self._results)

    def reconfigure(self, config: Config) -> None:
        """Use a new config from the next try on; error counts of kept locks carry over."""
        with self._pending_lock:
            self._pending_config = config

    def apply_pending_config(self) -> bool:
        """A reload's config, between two tries (never while one runs); whether there was one."""
        with self._pending_lock:  # read and cleared at once: a reload in between is not lost
            config, self._pending_config = self._pending_config, None
        if config is None:
            return False
        self.close()
        with self._results_lock:
            self._config, self._locks = config, config.probed
            kept = {lock.name for lock in self._locks}
            self._results = {name: r for name, r in self._results.items() if name in kept}
        self._retry_at.clear()
        self._failures.clear()
        self._unproven_why.clear()  # another dsn or poolers: proven again at the next connect
        return True

    def publish(self) -> None:
        """Hand every lock's last result to whoever serves them."""
        self._publish(self.results())

    @property
    def locks(self) -> tuple[LockConfig, ...]:
        """The probed locks, in the config's order."""
        return self._locks

    def deadline(self) -> float:
        """How long a try may take before it counts as stuck: its connect or its turn, then its statement."""
        return 2 * probe_timeout(self._config) + 1.0

    def give_up(self, lock: LockConfig, deadline: float) -> None:
        """The try of lock has not returned within its deadline (a hung server): counted as failed,
        and its connection (or the one it was opening) broken off, so the stuck try returns now."""
        self._record(lock, None, deadline, f"the try did not return within {deadline:g}s: is the server hung?",
                     trusted=self._trusted(lock.database))
        break_off(self._opening or self._in_use)

    def close(self) -> None:
        for database in list(self._conns):
            self._drop(database)
