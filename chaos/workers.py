"""A worker process of the workload: SLOTS_PER_WORKER threads, each running its slot's planned
operations (chaos.workload.plan) and recording every hold and wait as the server said it.

A slot never dies of a fault: a statement that breaks ends what the session held, recorded let go
within [the last round trip that proved it held, when the server shows it no more], and the next
operation connects again. A hold is proven alive every PROOF_EVERY seconds, so that span is short.
"""

from __future__ import annotations

import faulthandler
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psycopg
from psycopg import errors

from . import truth
from .sessions import (CLOCK, CLOCK_WHO, NOW, PG_MODES, PREPARED_EXISTS, SET_TIMEOUT, SETTLE, STATEMENT_TIMEOUT, TERMINATE,
                       WHO, Conn, Gate, Owned, Recorder, Stopping, confirm_gone, still_held)
from .workload import DIE, PREPARED, SESSION, SLOTS_PER_WORKER, STRAND, XACT, Endpoint, LockKey, Op, WorkloadSpec, plan

log = logging.getLogger(__name__)

PROOF_EVERY = 0.25  # seconds between two proofs that a long hold is still held
STOP_GRACE = 15.0  # seconds a stopping slot keeps trying a server that does not answer

# The lock calls: the clock before and after in the same round trip, and who answered.
ASK = f"SELECT {NOW} AS lo, {{fn}}({{args}})::text AS got, {NOW} AS hi, {WHO}"
UNLOCK = f"SELECT {NOW} AS lo, {{fn}}({{args}}) AS ok, {NOW} AS hi"
# Whether this session holds the key now, and when that was asked.
HOLDS_IT = f"""
SELECT {NOW} AS at, EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()
                            AND classid::int8 = %s AND objid::int8 = %s AND objsubid = %s AND mode = %s AND granted) AS held
"""
# A waiter gave up: its wait began after `before` and lasted lock_timeout; these errors end it.
WAIT_ENDED = (errors.LockNotAvailable, errors.DeadlockDetected, errors.QueryCanceled)


def lock_function(level: str, mode: str, try_: bool) -> str:
    return ("pg_try_" if try_ else "pg_") + "advisory_" + ("xact_" if level == XACT else "") + "lock" + (
        "_shared" if mode == truth.SHARED else "")


def unlock_function(mode: str) -> str:
    return "pg_advisory_unlock" + ("_shared" if mode == truth.SHARED else "")


@dataclass
class Held:
    """A lock granted and not yet recorded let go."""

    uid: str
    hold: truth.Hold  # released None
    key: LockKey  # as the lock functions take it

    def owned(self) -> Owned | None:
        holder = self.hold.holder
        if holder.pid is None or holder.backend_start is None:
            return None
        return Owned(holder.pid, holder.backend_start, self.hold.key, self.hold.mode)


@dataclass(frozen=True)
class Asking:
    """A lock call in flight: if its answer is lost, it may have been granted."""

    key: LockKey
    mode: str
    level: str
    holder: truth.Holder | None  # the backend asking, if known before the answer
    before: float  # a reading of the server's clock before the call
    blocking: bool


class Slot:
    """One thread of a worker: its sessions (one per endpoint, kept between operations but a session
    pool's), a direct helper per server and database (to terminate, confirm, finish prepared
    transactions), and what it holds."""

    def __init__(self, spec: WorkloadSpec, worker: int, slot: int, recorder: Recorder, gate: Gate,
                 strands: Any, token: str) -> None:
        self.spec, self.worker, self.slot = spec, worker, slot
        self.recorder, self.gate, self.strands, self.token = recorder, gate, strands, token
        self.participant = worker * SLOTS_PER_WORKER + slot
        self.app = f"chaos-w{worker}"
        self.conns: dict[int, Conn] = {}
        self.helpers: dict[str, Conn] = {}
        self.holding: list[Held] = []  # granted on the current session, not yet let go
        self.asking: Asking | None = None  # a lock call in flight
        self.xact_identity: truth.Holder | None = None  # the backend of the transaction through a pool
        self.busy: truth.Busy | None = None  # that transaction on its server connection, while it runs
        self.in_xact = False
        self.last_proof = 0.0  # the server's clock when every lock in `holding` was last seen held
        self.seq = 0
        self.current = 0  # the endpoint of the operation under way

    # -- plumbing

    def conn(self, index: int) -> Conn:
        if index not in self.conns:
            ep = self.spec.endpoints[index]
            self.conns[index] = Conn(ep.dsn, self.app, self.gate, self.participant, self.gate.index(ep.target),
                                     via=ep.via)
        return self.conns[index]

    def helper(self, index: int) -> Conn:
        """The direct session beside an endpoint's (one per server and database, made when needed)."""
        ep = self.spec.endpoints[index]
        if ep.direct_dsn not in self.helpers:
            self.helpers[ep.direct_dsn] = Conn(ep.direct_dsn, self.app + "-helper", self.gate, self.participant,
                                               self.gate.index(ep.target), stateless=True)
        return self.helpers[ep.direct_dsn]

    def uid(self) -> str:
        self.seq += 1
        return f"w{self.worker}s{self.slot}n{self.seq}"

    def pool_busy(self, conn: Conn) -> bool:
        """This session holds a pooled server connection others may be queued for: a transaction
        through a transaction pool, any client of a session pool."""
        return (conn.via == truth.TX_POOL and self.in_xact) or (conn.via == truth.SESSION_POOL and conn.pg is not None)

    def q(self, conn: Conn, sql: str, params: Any = None) -> dict[str, Any]:
        """A statement on the session; a clock it read proves what the session holds. While it
        holds a pooled server, a pause does not stop it: it is finishing, to give the server back
        (a pause that waited for it while another client waited in the pooler's queue for that
        server would wait for ever)."""
        row = conn.q(sql, params, bypass=self.pool_busy(conn))
        for name in ("hi", "at"):
            if row.get(name) is not None:
                self.last_proof = float(row[name])
        return row

    def record(self, held: Held, released: truth.Span | None) -> None:
        self.recorder.write(replace(held.hold, released=released), held.uid)

    # -- the loop

    def run(self) -> None:
        for op in plan(self.spec, self.worker, self.slot):
            if not self.gate.sleep(self.participant, op.gap):
                break
            try:
                self.perform(op)
            except Stopping:
                break
            except Exception:  # a slot never dies: a bug is logged, its sessions dropped
                log.exception("%s slot %d: operation %s failed", self.app, self.slot, op.kind)
                self.lost(op.endpoint)
        if self.holding or self.asking:  # stopped while a server did not answer
            self.lost(self.current)
        for conn in [*self.conns.values(), *self.helpers.values()]:
            conn.close()

    def perform(self, op: Op) -> None:
        self.current = op.endpoint
        ep = self.spec.endpoints[op.endpoint]
        conn = self.conn(op.endpoint)
        try:
            {SESSION: self.session_op, XACT: self.xact_op, PREPARED: self.prepared_op,
             DIE: self.die_op, STRAND: self.strand_op}[op.kind](op, ep, conn)
        except psycopg.Error as exc:
            if conn.broken() or isinstance(exc, psycopg.OperationalError):
                log.info("%s slot %d: %s broke (%s)", self.app, self.slot, ep.via, str(exc).strip().splitlines()[0])
                self.lost(op.endpoint)
            else:
                self.abandon(op.endpoint, exc)
        finally:
            if ep.via == truth.SESSION_POOL:
                conn.close()  # a session pool's client goes away after each operation, its locks let go first

    def lost(self, index: int) -> None:
        """The session broke: what it held is let go somewhere between the last proof and when the
        server shows it no more. Never a precise time nobody knows."""
        conn = self.conn(index)
        conn.close()
        self.in_xact = False
        self.xact_over()
        ask, self.asking = self.asking, None
        if not self.holding and ask is None:
            return
        owned = [o for o in (h.owned() for h in self.holding) if o is not None]
        if ask is not None and ask.holder is not None:
            owned += [Owned(ask.holder.pid, ask.holder.backend_start, ask.key.triple, ask.mode, granted)
                      for granted in (False, True)]
        grace = 5.0 if self.gate.stop.is_set() else 20.0
        gone = confirm_gone(self.helper(index), owned, grace) if owned else time.time()
        for held in self.holding:
            self.record(held, truth.Span(self.last_proof, max(gone, self.last_proof)))
        self.holding = []
        if ask is not None and ask.holder is not None:
            # The call's answer was lost: it may have been granted, for a moment nobody can place
            # better than from before the call to when the server showed it no more.
            ep = self.spec.endpoints[index]
            span = truth.Span(ask.before, max(gone, ask.before))
            if ask.blocking:
                self.recorder.write(truth.Wait(ep.target, ep.database, ask.key.triple, ask.mode, ask.holder, span, span))
            self.recorder.write(truth.Hold(ep.target, ep.database, ask.key.triple, ask.mode, ask.holder, span, span,
                                           span if ask.blocking else None, ask.level, ep.via))
        elif ask is not None:
            # Through a transaction pool outside a transaction: the call most likely waited in the
            # pooler's queue for a server the fault took; if it ran, its backend went with the fault.
            log.info("%s: a lock call's answer was lost before its backend was known (%s)", self.app, ask.key.triple)

    def abandon(self, index: int, exc: psycopg.Error) -> None:
        """A statement failed on a live session (a timeout, a limit): its transaction rolled back,
        its session locks unlocked."""
        log.info("%s slot %d: statement failed (%s)", self.app, self.slot, str(exc).strip().splitlines()[0])
        conn = self.conn(index)
        try:
            if self.in_xact:
                self.end_xact(conn, commit=False, before=self.last_proof)
            self.in_xact = False
            self.xact_over()
            self.unlock_all(conn)
        except psycopg.Error:
            self.lost(index)

    # -- asking for locks

    def ask(self, op: Op, ep: Endpoint, conn: Conn, key: LockKey, mode: str, level: str, blocking: bool) -> Held | None:
        """Try the key; if taken and `blocking`, wait for it up to the op's lock_timeout: a Hold
        (with `waited`), or a Wait that ended when the timeout did."""
        # Connected first (through the gate, as every statement): the guess is this session's
        # backend, never the one before a fault, should the answer be lost.
        conn.connect(bypass=self.pool_busy(conn))
        guess = self.xact_identity if conn.via == truth.TX_POOL else conn.identity
        self.asking = Asking(key, mode, level, guess, max(self.last_proof, conn.connected_at), False)
        row = self.q(conn, ASK.format(fn=lock_function(level, mode, True), args=key.placeholders), key.args)
        self.asking = None
        holder = truth.Holder(row["pid"], row["backend_start"], None, row["app"])
        if row["got"] == "true":
            return self.granted(ep, key, mode, level, holder, truth.Span(row["lo"], row["hi"]), None)
        if not blocking:
            return None
        before, timeout = float(row["hi"]), op.lock_timeout
        self.q(conn, SET_TIMEOUT, ["lock_timeout", f"{round(timeout * 1000)}ms", level == XACT])
        self.asking = Asking(key, mode, level, holder, before, True)
        try:
            row = self.q(conn, ASK.format(fn=lock_function(level, mode, False), args=key.placeholders), key.args)
            self.asking = None
        except WAIT_ENDED as exc:
            self.asking = None
            return self.wait_ended(op, ep, conn, Owned(holder.pid, holder.backend_start, key.triple, mode), key, level,
                                   holder, before, exc)
        # Granted after a wait that began within this round trip (or at once, if the holder let
        # go between the try and the ask: the wait, if any, is inside the same span).
        span = truth.Span(row["lo"], row["hi"])
        return self.granted(ep, key, mode, level, holder, span, span)

    def wait_ended(self, op: Op, ep: Endpoint, conn: Conn, own: Owned, key: LockKey, level: str,
                   holder: truth.Holder, before: float, exc: psycopg.Error) -> Held | None:
        """A wait ended in an error (lock timeout, deadlock, statement timeout), before `now` (the
        error is in; this machine's clock is the server's). The server may have granted the lock
        at that very moment and then keeps it (LockErrorCleanup), so ask it: a session lock is a
        hold from then on; a transaction's is held until the ROLLBACK."""
        now = time.time()
        self.asking = Asking(key, own.mode, level, holder, before, True)  # until the server says
        if level == XACT:
            try:  # an aborted transaction keeps its locks until ROLLBACK: another session looks
                lo, hi, left = still_held(self.helper(op.endpoint), [own], bypass=self.pool_busy(conn))
                maybe = (lo, hi) if left else None
            except psycopg.Error:
                maybe = (before, now)  # cannot tell: a hold that may have been, until the ROLLBACK
            self.asking = None
            held = None
            if maybe is not None:  # seen held at an instant within `maybe`: granted before it
                span = truth.Span(before, max(before, maybe[1]))
                held = self.granted(ep, key, own.mode, level, holder, span, span)
            else:
                self.wait_record(op, ep, own, holder, before, now, exc)
            self.q(conn, "ROLLBACK")
            self.in_xact = False
            self.xact_over()
            if held is not None:
                after = self.clock_after(conn)
                self.record(held, truth.Span(maybe[0], max(maybe[0], after)))
                self.holding.remove(held)
            return None
        row = self.q(conn, HOLDS_IT, list(key.triple) + [PG_MODES[own.mode]])
        self.asking = None
        if row["held"]:
            span = truth.Span(before, max(before, float(row["at"])))
            return self.granted(ep, key, own.mode, level, holder, span, span)
        self.wait_record(op, ep, own, holder, before, now, exc)
        return None

    def wait_record(self, op: Op, ep: Endpoint, own: Owned, holder: truth.Holder, before: float, now: float,
                    exc: psycopg.Error) -> None:
        if isinstance(exc, errors.LockNotAvailable):  # it waited lock_timeout at least
            began = truth.Span(before, max(before, now - op.lock_timeout))
            ended = truth.Span(min(now, before + op.lock_timeout), now)
        else:
            began = ended = truth.Span(before, max(before, now))
        self.recorder.write(truth.Wait(ep.target, ep.database, own.key, own.mode, holder, began, ended))

    def granted(self, ep: Endpoint, key: LockKey, mode: str, level: str, holder: truth.Holder,
                span: truth.Span, waited: truth.Span | None) -> Held:
        held = Held(self.uid(), truth.Hold(ep.target, ep.database, key.triple, mode, holder, span, None, waited,
                                           level, ep.via), key)
        self.recorder.opened(held.uid, held.hold)
        self.holding.append(held)
        return held

    def acquire(self, op: Op, ep: Endpoint, conn: Conn, level: str) -> bool:
        """Every key of the op in turn (the first perhaps waited for, the rest tried). False when
        nothing was granted."""
        for i, (key, mode) in enumerate(op.keys):
            got = self.ask(op, ep, conn, key, mode, level, blocking=op.wait and i == 0)
            if got is None and i == 0 and op.wait:
                break  # the waiter gave up (its transaction, if any, is over)
        return bool(self.holding)

    def hold(self, conn: Conn, seconds: float) -> None:
        """Hold on, proving the session still holds every PROOF_EVERY seconds (cut short by stop,
        and by a pause of the target while it holds a pooled server)."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            busy = frozenset({conn.target}) if self.pool_busy(conn) else frozenset()
            if busy and self.gate.requested(conn.target):
                return
            if not self.gate.sleep(self.participant, min(PROOF_EVERY, left), busy):
                return
            self.q(conn, CLOCK)

    # -- letting go

    def unlock_all(self, conn: Conn) -> None:
        for held in reversed(list(self.holding)):
            hold = held.hold
            row = self.q(conn, UNLOCK.format(fn=unlock_function(hold.mode), args=held.key.placeholders), held.key.args)
            if row["ok"]:
                self.record(held, truth.Span(row["lo"], row["hi"]))
            else:  # not held any more: let go after the proof before this one, before this call
                log.warning("%s: unlock of %s found it not held", self.app, hold.key)
                self.record(held, truth.Span(min(self.last_proof, row["lo"]), row["lo"]))
            self.holding.remove(held)

    def end_xact(self, conn: Conn, commit: bool, before: float | None = None) -> None:
        """COMMIT or ROLLBACK: the transaction's locks let go between the clock read just before
        (in the transaction) and the one just after."""
        if before is None:
            before = float(self.q(conn, CLOCK)["at"])
        self.q(conn, "COMMIT" if commit else "ROLLBACK")
        self.in_xact = False
        self.xact_over()
        after = self.clock_after(conn)
        for held in self.holding:
            self.record(held, truth.Span(before, max(before, after)))
        self.holding = []

    def clock_after(self, conn: Conn) -> float:
        """The clock read after a transaction ended. Through a transaction pool that statement is
        outside any transaction, on whichever server connection the pool hands it, which may hold
        another client's stranded lock: that backend's busy time from before it is sent to its
        answer, as a strand's statement (or any backend of the pool's, if it failed)."""
        if conn.via != truth.TX_POOL:
            return float(self.q(conn, CLOCK)["at"])
        target = self.spec.endpoints[self.current].target
        return float(self.pooled_statement(target, lambda: self.q(conn, CLOCK_WHO))["at"])

    def pooled_statement(self, target: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """run(), one statement outside any transaction through a transaction pool (its row says
        WHO answered), recorded as the busy time of the server connection that answered, from
        before it is sent to its answer; of any backend of the pool (ANY_BACKEND) if it failed."""
        sent = time.time()  # this machine's clock is the server's (loopback)
        try:
            row = run()
        except BaseException:
            self.recorder.write(truth.Busy(target, truth.ANY_BACKEND, truth.Span(sent, sent),
                                           truth.Span(sent, max(sent, time.time()))))
            raise
        answered = time.time()
        self.recorder.write(truth.Busy(target, truth.Holder(row["pid"], row["backend_start"], None, row["app"]),
                                       truth.Span(sent, sent), truth.Span(sent, max(sent, answered))))
        return row

    def begin(self, ep: Endpoint, conn: Conn) -> None:
        before = time.time()  # this machine's clock is the server's (loopback)
        self.q(conn, "BEGIN")
        self.in_xact = True
        if ep.via == truth.TX_POOL:  # no session settings through a transaction pool; its backend for now
            row = self.q(conn, SETTLE, ["statement_timeout", STATEMENT_TIMEOUT, True])
            self.xact_identity = truth.Holder(row["pid"], row["backend_start"], None, row["app"])
            self.busy = truth.Busy(ep.target, self.xact_identity, truth.Span(before, max(before, float(row["at"]))))

    def xact_over(self) -> None:
        """The transaction through a pool ended (COMMIT, ROLLBACK, or its session broke): its
        server connection is another client's from now on."""
        busy, self.busy = self.busy, None
        if busy is not None:
            now = time.time()
            self.recorder.write(replace(busy, ended=truth.Span(busy.began.hi, max(busy.began.hi, now))))

    # -- the operations

    def session_op(self, op: Op, ep: Endpoint, conn: Conn) -> None:
        if self.acquire(op, ep, conn, "session"):
            self.hold(conn, op.hold)
            self.unlock_all(conn)

    def xact_op(self, op: Op, ep: Endpoint, conn: Conn) -> None:
        self.begin(ep, conn)
        if self.acquire(op, ep, conn, XACT):
            self.hold(conn, op.hold)
            self.end_xact(conn, op.commit)
        elif self.in_xact:
            self.q(conn, "ROLLBACK")
            self.in_xact = False
            self.xact_over()

    def die_op(self, op: Op, ep: Endpoint, conn: Conn) -> None:
        """Session locks held until another connection terminates the backend: let go between
        the last proof and the terminate's return (it waits until the backend is gone)."""
        if not self.acquire(op, ep, conn, "session"):
            return
        self.hold(conn, op.hold)
        proof = float(self.q(conn, CLOCK)["at"])
        holder = self.holding[0].hold.holder
        row = self.helper(op.endpoint).q(TERMINATE, [holder.pid, holder.backend_start])
        if row.get("done"):
            gone = float(row["hi"])
        else:
            owned = [o for o in (h.owned() for h in self.holding) if o is not None]
            gone = confirm_gone(self.helper(op.endpoint), owned)
        for held in self.holding:
            self.record(held, truth.Span(proof, max(proof, gone)))
        self.holding = []
        conn.close()

    def prepared_op(self, op: Op, ep: Endpoint, conn: Conn) -> None:
        self.begin(ep, conn)
        if not self.acquire(op, ep, conn, XACT):
            if self.in_xact:
                self.q(conn, "ROLLBACK")
                self.in_xact = False
                self.xact_over()
            return
        self.hold(conn, op.hold)
        gid = f"chaos-{self.token}-{self.uid()}"
        before = float(self.q(conn, CLOCK)["at"])
        try:
            conn.q(f"PREPARE TRANSACTION '{gid}'")
        except psycopg.OperationalError:
            if not self.prepared_anyway(op.endpoint, gid):
                raise  # never prepared: the session's locks went with it
            after = time.time()
        else:
            try:
                after = conn.clock(bypass=True)  # no pause acknowledged with a prepared transaction out
            except psycopg.OperationalError:
                # Prepared, then the session broke before its clock was read (a restart at that
                # instant): the prepared transaction outlives it, so it is recorded and finished.
                after = time.time()
        self.in_xact = False
        self.xact_over()
        # The session's holds end at the PREPARE; the prepared transaction's begin there.
        span = truth.Span(before, max(before, after))
        prepared = []
        for held in self.holding:
            self.record(held, span)
            hold = replace(held.hold, holder=truth.Holder(None, None, gid, ""), granted=span, waited=None)
            prepared.append(Held(self.uid(), hold, held.key))
            self.recorder.opened(prepared[-1].uid, hold)
        self.holding = []
        t = self.gate.index(ep.target)
        end = time.monotonic() + op.later
        while time.monotonic() < end and not self.gate.requested(t):
            if not self.gate.sleep(self.participant, min(0.05, end - time.monotonic()), busy=frozenset({t})):
                break
        # A pause of this target (a database to drop) waits for this: DROP refuses prepared ones.
        self.finish_prepared(op.endpoint, gid, prepared, op.commit)

    def prepared_anyway(self, index: int, gid: str) -> bool:
        """Whether a PREPARE whose answer was lost took effect."""
        helper = self.helper(index)
        deadline = time.monotonic() + STOP_GRACE
        while True:
            try:
                return bool(helper.q(PREPARED_EXISTS, [gid], bypass=True)["exists"])
            except psycopg.Error:
                helper.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def finish_prepared(self, index: int, gid: str, prepared: list[Held], commit: bool) -> None:
        """COMMIT/ROLLBACK PREPARED from another session, again and again through faults (the
        prepared transaction outlives a restart) until the server answers. Past the pause gate:
        this slot has not acknowledged a pause of the target since before the PREPARE (a database
        with a prepared transaction cannot be dropped), so no pause is in force for it yet."""
        helper = self.helper(index)
        sent_after: float | None = None  # the clock before the first try that may have finished it
        delay, deadline = 0.05, None
        while True:
            try:
                before = helper.clock(bypass=True)
                sent_after = before if sent_after is None else sent_after
                try:
                    helper.q(f"{'COMMIT' if commit else 'ROLLBACK'} PREPARED '{gid}'", bypass=True)
                except errors.UndefinedObject:
                    pass  # an earlier try whose answer was lost finished it
                after = helper.clock(bypass=True)
                break
            except (psycopg.Error, Stopping) as exc:
                helper.close()
                if self.gate.stop.is_set():
                    deadline = deadline or time.monotonic() + STOP_GRACE
                    if time.monotonic() > deadline:
                        log.warning("%s: prepared transaction %s not finished at stop (%s)", self.app, gid, exc)
                        for held in prepared:
                            self.record(held, None)  # still held when the record ends
                        return
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
        for held in prepared:
            self.record(held, truth.Span(sent_after, max(sent_after, after)))

    def strand_op(self, op: Op, ep: Endpoint, conn: Conn) -> None:
        """Through a transaction pool: a session lock taken and the client gone without unlocking.
        The lock stays on the server connection until that backend ends (the keeper watches it)."""
        key, mode = op.keys[0]
        self.asking = Asking(key, mode, "session", None, 0.0, False)  # lost: which backend, nobody knows
        # The statement is a transaction on some server connection of the pool, which may hold
        # another client's stranded lock: that backend is not idle from before it is sent until its
        # answer (the grant's clocks are inside the statement, not its edges: found by the 30-minute
        # run, an active backend taken for an idle one). Which backend, only its answer says.
        # Connected first: the connect's retries (a pooler down) ran on no server connection, and a
        # statement that fails makes every backend of the pool busy for all of its span.
        conn.connect()
        row = self.pooled_statement(ep.target, lambda: conn.q(ASK.format(fn=lock_function("session", mode, True),
                                                                          args=key.placeholders), key.args))
        self.asking = None
        conn.close()
        if row["got"] != "true":
            return
        try:
            after = self.helper(op.endpoint).clock()
        except psycopg.Error:  # the lock is stranded all the same: the keeper must know of it
            after = time.time()
        holder = truth.Holder(row["pid"], row["backend_start"], None, row["app"])
        hold = truth.Hold(ep.target, ep.database, key.triple, mode, holder, truth.Span(row["lo"], row["hi"]),
                          level="session", via=ep.via, stranded=truth.Span(row["hi"], max(row["hi"], after)))
        self.strands.put((hold.to_json(), None if math.isinf(op.later) else op.later, op.endpoint))


def run_worker(spec: WorkloadSpec, worker: int, path: Path, gate: Gate, strands: Any, token: str) -> None:
    """A worker process: its slots, each on a thread, until the workload stops."""
    logging.basicConfig(level=logging.WARNING, format=f"chaos-w{worker} %(levelname)s %(message)s")
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # where a straggler is stuck: kill -USR1
    recorder = Recorder(path)
    threads = [threading.Thread(target=Slot(spec, worker, s, recorder, gate, strands, token).run, name=f"slot{s}")
               for s in range(SLOTS_PER_WORKER)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    recorder.close()
    strands.close()
    strands.join_thread()
