"""The keeper: a process of the workload that watches the session locks left stranded on a
transaction pool's server connections, ends some of those backends after a while, and records
each lock's release when its backend is seen without it.

A stranded lock ends only with its backend (or an unlock nobody sends). Every WATCH_EVERY seconds
the keeper reads pg_locks directly (sessions.HELD_BY): a lock it saw at a reading's start was
held then; one it does not see at the next reading was let go before that reading's end. So each
release is recorded within [last seen, first not seen]. At stop it ends every stranded backend.
"""

from __future__ import annotations

import faulthandler
import logging
import queue
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psycopg

from . import truth
from .sessions import TERMINATE, Conn, Gate, Owned, Recorder, gone_for_sure, still_held
from .workload import WorkloadSpec

log = logging.getLogger(__name__)

WATCH_EVERY = 0.1  # seconds between two readings of pg_locks
STOP_GRACE = 20.0  # seconds the keeper tries, at stop, to see every stranded backend gone


@dataclass
class Stranded:
    uid: str
    hold: truth.Hold
    owned: Owned
    last_seen: float  # the server's clock at the start of the last reading that showed it
    end_at: float | None  # monotonic time to terminate its backend (None: at stop)


def run_keeper(spec: WorkloadSpec, path: Path, gate: Gate, participant: int, strands: Any) -> None:
    logging.basicConfig(level=logging.WARNING, format="chaos-keeper %(levelname)s %(message)s")
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # where it is stuck: kill -USR1
    Keeper(spec, Recorder(path), gate, participant, strands).run()


class Keeper:
    def __init__(self, spec: WorkloadSpec, recorder: Recorder, gate: Gate, participant: int, strands: Any) -> None:
        self.spec, self.recorder, self.gate, self.participant, self.strands = spec, recorder, gate, participant, strands
        self.watched: list[Stranded] = []
        self.conns: dict[str, Conn] = {}  # by direct dsn
        self.closing_since: float | None = None
        self.count = 0

    def run(self) -> None:
        while True:
            self.receive()
            for dsn in sorted({self.dsn(s) for s in self.watched}):
                self.watch(dsn)
            if self.closing_since is not None:
                if not self.watched:
                    break
                if time.monotonic() - self.closing_since > STOP_GRACE:
                    for item in self.watched:
                        log.warning("stranded lock %s on backend %s not seen ended at stop", item.hold.key, item.owned.pid)
                        self.recorder.write(item.hold, item.uid)  # still held when the record ends
                    break
            self.gate.sleep(self.participant, WATCH_EVERY)
        for conn in self.conns.values():
            conn.close()
        self.recorder.close()

    def dsn(self, item: Stranded) -> str:
        return next(e.direct_dsn for e in self.spec.endpoints if (e.target, e.database) == (item.hold.target, item.hold.database))

    def receive(self) -> None:
        while True:
            try:
                message = self.strands.get_nowait()
            except queue.Empty:
                return
            if message is None:  # every worker is done: end every stranded backend
                self.closing_since = time.monotonic()
                continue
            text, later, _endpoint = message
            hold = truth.parse(text)
            assert isinstance(hold, truth.Hold) and hold.holder.pid is not None and hold.holder.backend_start is not None
            self.count += 1
            uid = f"keeper{self.count}"
            self.recorder.opened(uid, hold)
            owned = Owned(hold.holder.pid, hold.holder.backend_start, hold.key, hold.mode)
            end_at = None if later is None else time.monotonic() + later
            self.watched.append(Stranded(uid, hold, owned, hold.granted.hi, end_at))

    def conn(self, dsn: str) -> Conn:
        if dsn not in self.conns:
            target = next(e.target for e in self.spec.endpoints if e.direct_dsn == dsn)
            self.conns[dsn] = Conn(dsn, "chaos-keeper", self.gate, self.participant, self.gate.index(target), stateless=True)
        return self.conns[dsn]

    def watch(self, dsn: str) -> None:
        items = [s for s in self.watched if self.dsn(s) == dsn]
        conn = self.conn(dsn)
        if self.gate.requested(conn.target):
            return  # not a statement to a target being dropped; its releases are seen after
        try:
            if conn.pg is None:
                conn.connect(once=True)
            self.observe(conn, items)
            now = time.monotonic()
            due = {(s.owned.pid, s.owned.backend_start) for s in items
                   if self.closing_since is not None or (s.end_at is not None and s.end_at <= now)}
            if due:
                for pid, start in sorted(due):
                    conn.q(TERMINATE, [pid, start])  # it waits until the backend is gone
                self.observe(conn, [s for s in self.watched if self.dsn(s) == dsn])
        except psycopg.Error as exc:
            conn.close()
            if gone_for_sure(exc):  # no old backend of that server (or database) is left
                for item in items:
                    self.released(item, time.time())

    def observe(self, conn: Conn, items: list[Stranded]) -> None:
        lo, hi, left = still_held(conn, [s.owned for s in items])
        for item in items:
            if item.owned in left:
                item.last_seen = lo
            else:
                self.released(item, hi)

    def released(self, item: Stranded, when: float) -> None:
        if item in self.watched:
            self.watched.remove(item)
            self.recorder.write(replace(item.hold, released=truth.Span(item.last_seen, max(item.last_seen, when))), item.uid)
