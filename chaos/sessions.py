"""What the workload's processes share: the pause gate, the truth file each writes, the SQL whose
answers are the truth, and a connection that survives faults.

Every time recorded is the server's clock_timestamp() read in the same round trip as the lock
call, or (only where no server answers: a connection refused) this machine's wall clock, the
same clock the server reads.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

from . import truth

log = logging.getLogger(__name__)

NOW = "extract(epoch FROM clock_timestamp())::float8"
# Who answered, in the same statement: the backend, since when it runs, its application_name.
WHO = ("pg_backend_pid() AS pid, extract(epoch FROM (SELECT a.backend_start FROM pg_stat_activity AS a "
       "WHERE a.pid = pg_backend_pid()))::float8 AS backend_start, current_setting('application_name') AS app")
CLOCK = f"SELECT {NOW} AS at"
IDENTITY = f"SELECT {WHO}"
# The clock, and which backend read it (through a transaction pool, whichever the pool handed it).
CLOCK_WHO = f"SELECT {WHO}, {NOW} AS at"
SET_TIMEOUT = "SELECT set_config(%s, %s, %s)"
# A setting, and who the session is (a transaction's, through a transaction pool), since when.
SETTLE = f"SELECT set_config(%s, %s, %s), {WHO}, {NOW} AS at"
# Which advisory locks these backends hold (or wait for) now, between two readings of the clock: a
# lock seen is held at some instant >= lo; a lock not seen was let go before hi.
HELD_BY = f"""
SELECT {NOW} AS lo,
       (SELECT coalesce(json_agg(json_build_array(l.pid, extract(epoch FROM a.backend_start)::float8,
                                                  l.classid::int8, l.objid::int8, l.objsubid::int4, l.mode, l.granted)), '[]'::json)
        FROM pg_locks AS l JOIN pg_stat_activity AS a ON a.pid = l.pid
        WHERE l.locktype = 'advisory' AND l.pid = ANY(%s::int4[])) AS held,
       {NOW} AS hi
"""
TERMINATE = f"""
SELECT {NOW} AS lo, pg_terminate_backend(a.pid, 5000) AS done, {NOW} AS hi
FROM pg_stat_activity AS a WHERE a.pid = %s AND abs(extract(epoch FROM a.backend_start)::float8 - %s) < 1e-5
"""
PREPARED_EXISTS = f"SELECT {NOW} AS at, EXISTS (SELECT 1 FROM pg_prepared_xacts WHERE gid = %s) AS exists"
PG_MODES = {truth.EXCLUSIVE: "ExclusiveLock", truth.SHARED: "ShareLock"}
STATEMENT_TIMEOUT = "15s"  # no statement of a worker runs for ever on a live server
CONNECT_TIMEOUT = 3
# Connection errors after which the old backends are certainly gone: no postmaster listens, or a
# new one is starting (the old one waited for its backends), or the database is no more.
_GONE_SIGNS = ("refused", "starting up", "not yet accepting", "does not exist", "in recovery mode")


def via_sets_session(via: str) -> bool:
    return via != truth.TX_POOL


class Stopping(Exception):
    """The workload is stopping and the server did not answer within the stop's grace."""


@dataclass(frozen=True)
class Gate:
    """Pause requests and their acknowledgements, shared by every process.

    For each target: `req` counts the pause requests, `active` is 1 while one is in force. A
    participant acknowledges request n of target t by writing n into its `ack` cell, and does so
    only between two statements: every statement passes `enter`, which blocks while the target is
    paused. So once every participant has acknowledged the current request, none has a statement
    of that target in flight or can start one until the pause ends."""

    targets: tuple[str, ...]
    req: Any  # multiprocessing Array of int, one per target
    active: Any
    ack: Any  # participants x targets
    stop: Any  # multiprocessing Event: the workload is stopping

    @classmethod
    def make(cls, ctx: Any, targets: list[str], participants: int) -> "Gate":
        n = len(targets)
        return cls(tuple(targets), ctx.Array("i", n), ctx.Array("i", n), ctx.Array("i", n * participants), ctx.Event())

    def index(self, target: str) -> int:
        return self.targets.index(target)

    def request(self, t: int) -> None:
        self.req[t] += 1
        self.active[t] = 1

    def release(self, t: int) -> None:
        self.active[t] = 0

    def clear_all(self) -> None:
        for t in range(len(self.targets)):
            self.active[t] = 0

    def requested(self, t: int) -> bool:
        return bool(self.active[t])

    def parked(self, t: int, participants: list[int]) -> list[int]:
        n = len(self.targets)
        return [p for p in participants if self.ack[p * n + t] == self.req[t]]

    def all_parked(self, t: int, participants: list[int]) -> bool:
        return len(self.parked(t, participants)) == len(participants)

    def between(self, participant: int, busy: frozenset[int] = frozenset()) -> None:
        """Acknowledge every pause in force, except of targets this participant must finish
        something on first (a prepared transaction)."""
        n = len(self.targets)
        for t in range(n):
            if self.active[t] and t not in busy:
                self.ack[participant * n + t] = self.req[t]

    def enter(self, participant: int, t: int) -> None:
        """Return when a statement to target t may be sent."""
        while self.active[t]:
            self.between(participant)
            time.sleep(0.01)

    def sleep(self, participant: int, seconds: float, busy: frozenset[int] = frozenset()) -> bool:
        """Sleep, acknowledging pauses; False at once when the workload stops."""
        end = time.monotonic() + seconds
        while True:
            self.between(participant, busy)
            left = end - time.monotonic()
            if self.stop.is_set():
                return False
            if left <= 0:
                return True
            time.sleep(min(left, 0.05))


class Recorder:
    """One process's truth file (records appended as JSON lines, flushed each) and its journal:
    each hold granted and not yet recorded, so a killed process's holds are not lost (`salvage`)."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._file = open(path, "a")
        self._journal = open(journal_path(path), "a")

    def opened(self, uid: str, hold: truth.Hold) -> None:
        with self._lock:
            self._journal.write(json.dumps({"open": uid, "hold": hold.to_json()}) + "\n")
            self._journal.flush()

    def write(self, record: truth.Hold | truth.Wait | truth.Busy, uid: str | None = None) -> None:
        with self._lock:
            self._file.write(record.to_json() + "\n")
            self._file.flush()
            if uid is not None:
                self._journal.write(json.dumps({"close": uid}) + "\n")
                self._journal.flush()

    def close(self) -> None:
        self._file.close()
        self._journal.close()


def journal_path(path: Path) -> Path:
    return path.with_suffix(".journal")


def salvage(path: Path) -> int:
    """Append the holds a killed process had journaled and not recorded, released unknown
    (None: still held when the record ends, as far as anyone can say). Returns how many."""
    opened: dict[str, str] = {}
    try:
        with open(journal_path(path)) as handle:
            for line in handle:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a line cut by the kill
                if "open" in entry:
                    opened[entry["open"]] = entry["hold"]
                else:
                    opened.pop(entry["close"], None)
    except OSError:
        return 0
    with open(path, "a") as handle:
        for hold in opened.values():
            handle.write(hold + "\n")
    return len(opened)


def gone_for_sure(exc: BaseException) -> bool:
    """The connection error proves every backend of the old server (or database) ended."""
    text = str(exc).lower()
    return any(sign in text for sign in _GONE_SIGNS)


class Conn:
    """One connection of a participant to one endpoint: connects when first used (with a small
    jittered back-off, through faults), every statement through the pause gate."""

    def __init__(self, dsn: str, app: str, gate: Gate, participant: int, target: int, via: str = truth.DIRECT,
                 stateless: bool = False) -> None:
        self.dsn, self.app, self.gate, self.participant, self.target = dsn, app, gate, participant, target
        self.via = via  # through a transaction pool: no session settings
        self.stateless = stateless  # holds nothing between statements: may be made anew after a fault
        self.pg: psycopg.Connection[dict[str, Any]] | None = None
        self.identity: truth.Holder | None = None  # the backend, when it is the session's own (not pooled per transaction)
        self.connected_at = 0.0  # the server's clock when connected
        self._jitter = random.Random()  # timing only: never the plan's generator

    def connect(self, bypass: bool = False, grace: float = 10.0, once: bool = False) -> psycopg.Connection[dict[str, Any]]:
        """Connect if not connected: until it works (once: one try, its error raised); while
        stopping, for at most `grace` seconds (then Stopping)."""
        delay, since_stop = 0.05, None
        while self.pg is None:
            if not bypass:
                self.gate.enter(self.participant, self.target)
            try:
                self.pg = self._open()
            except psycopg.Error as exc:
                if once:
                    raise
                if self.gate.stop.is_set():
                    since_stop = since_stop or time.monotonic()
                    if time.monotonic() - since_stop > grace:
                        raise Stopping(str(exc)) from exc
                log.debug("%s: cannot connect (%s); again in %.2fs", self.app, exc, delay)
                time.sleep(delay * (0.5 + self._jitter.random()))
                delay = min(delay * 2, 1.0)
        return self.pg

    def _open(self) -> psycopg.Connection[dict[str, Any]]:
        pg = psycopg.connect(self.dsn, autocommit=True, application_name=self.app, row_factory=dict_row,
                             connect_timeout=CONNECT_TIMEOUT, prepare_threshold=None)
        try:
            if via_sets_session(self.via):  # a session of its own: who it is, once
                row = pg.execute(SETTLE, ["statement_timeout", STATEMENT_TIMEOUT, False]).fetchone()
                assert row is not None
                self.identity = truth.Holder(row["pid"], row["backend_start"], None, row["app"])
                self.connected_at = float(row["at"])
            else:
                self.identity, self.connected_at = None, 0.0
        except BaseException:
            pg.close()  # a session pool's client left open would keep its server from the others
            raise
        return pg

    def q(self, sql: str, params: Any = None, bypass: bool = False) -> dict[str, Any]:
        """One statement; its first row (empty for none). Errors are the caller's to judge, except
        that a stateless session (a helper) found broken by an earlier fault is made anew once."""
        fresh = self.pg is None
        pg = self.connect(bypass)
        if not bypass and self.via != truth.SESSION_POOL:  # a session pool's client holds a server: it goes on to give it back
            self.gate.enter(self.participant, self.target)
        try:
            cur = pg.execute(sql, params)
        except psycopg.OperationalError:
            if fresh or not self.stateless:
                raise
            self.close()
            pg = self.connect(bypass)
            cur = pg.execute(sql, params)
        row = cur.fetchone() if cur.description else None
        return row or {}

    def broken(self) -> bool:
        return self.pg is None or self.pg.closed or self.pg.broken

    def close(self) -> None:
        if self.pg is not None:
            try:
                self.pg.close()
            except Exception:  # closing a broken connection: nothing left to learn
                pass
            self.pg = None
        # Its backend is gone with it: never a guess for the next session's calls.
        self.identity, self.connected_at = None, 0.0

    def clock(self, bypass: bool = False) -> float:
        return float(self.q(CLOCK, bypass=bypass)["at"])


@dataclass(frozen=True)
class Owned:
    """A lock a backend holds (or waits for), as pg_locks would show it (for HELD_BY)."""

    pid: int
    backend_start: float
    key: tuple[int, int, int]
    mode: str
    granted: bool = True

    def seen_in(self, held: list[list[Any]]) -> bool:
        pg_mode = PG_MODES[self.mode]
        return any(row[0] == self.pid and abs(float(row[1]) - self.backend_start) < 1e-5
                   and tuple(row[2:5]) == self.key and row[5] == pg_mode and row[6] == self.granted for row in held)


def still_held(conn: Conn, owned: list[Owned], bypass: bool = False) -> tuple[float, float, list[Owned]]:
    """(lo, hi, those still held) from one reading of pg_locks."""
    row = conn.q(HELD_BY, [sorted({o.pid for o in owned})], bypass=bypass)
    held = row["held"] if isinstance(row["held"], list) else json.loads(row["held"])
    return float(row["lo"]), float(row["hi"]), [o for o in owned if o.seen_in(held)]


def confirm_gone(conn: Conn, owned: list[Owned], grace: float = 20.0) -> float:
    """When these locks are certainly let go (their session broke): the server's clock at the first
    reading that no longer shows them, or this machine's when the server proves every old backend
    ended (refused, restarting, database gone). Bounded: after `grace` seconds a lock a backend of
    ours still shows (another of our sessions on a pooled backend took the same key) counts as
    let go now."""
    deadline = time.monotonic() + grace
    delay = 0.05
    while True:
        try:
            if conn.pg is None:
                conn.connect(once=True)
            lo, hi, left = still_held(conn, owned)
            if not left or time.monotonic() > deadline:
                if left:
                    log.warning("%s: %d locks still shown %ss after their session broke", conn.app, len(left), grace)
                return hi
        except psycopg.Error as exc:
            conn.close()
            if gone_for_sure(exc):
                return time.time()
            if time.monotonic() > deadline:
                log.warning("%s: cannot confirm locks gone (%s)", conn.app, exc)
                return time.time()
        time.sleep(delay)
        delay = min(delay * 2, 0.5)
