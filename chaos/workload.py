"""The truth test's workload: worker processes that take and release advisory locks the way real
users do, and write down what the server said about each (chaos/truth.py records).

The runner hands a WorkloadSpec (where to connect, which keys) to `Workload`, calls start(), breaks
things, and stop()s it; `files()` are the truth. What each worker does is planned by `plan`, a
seeded generator per worker and slot (the same seed gives the same operations, modulo timing);
how an operation runs and is recorded is chaos/workers.py; stranded session locks left on a
transaction pool's server connections are watched by chaos/stranded.py's keeper process.

Workers are spawned processes (never forked): they inherit no lock or connection of the caller.
So the program that starts a Workload must import without side effects (`if __name__ ==
"__main__":`), as multiprocessing's spawn requires.

For whoever runs it:
- connections: each slot keeps one session per endpoint it used and one direct helper per server
  and database; the keeper one per server and database (workers x SLOTS_PER_WORKER x (endpoints +
  1) + 1 at most), and a transaction pool's server connections on top;
- max_prepared_transactions at least workers x SLOTS_PER_WORKER, or some PREPAREs fail (recorded
  as the rollback they become);
- a PgBouncer in front should have a small server_login_retry: after a server restart it tries
  the server again only then (15 s by default), its clients queued meanwhile;
- paused(target): slots first finish what holds a pooled server connection (a transaction through
  a transaction pool, a session pool's client) and the prepared transactions of that target, then
  stop issuing statements to it; locks of direct sessions stay, so the drop ends them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import random
import secrets
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from exporter.keys import bigint_tag, int4_pair_tag

from . import truth

log = logging.getLogger(__name__)

SLOTS_PER_WORKER = 2  # concurrent activities per worker process (threads, each its own sessions)
FAMILY_SIZE = 50  # the family's keys: (family_classid, n), n in 1..FAMILY_SIZE
STOP_BOUND = 40.0  # seconds stop() waits for the workers before it kills a straggler
PAUSE_BOUND = 30.0  # seconds paused() waits for every worker to stop issuing statements


@dataclass(frozen=True)
class Endpoint:
    target: str  # the exporter's target name ("" in single-server mode)
    database: str
    dsn: str  # where the workers connect (a server directly, or a PgBouncer pool)
    via: str  # truth.DIRECT, truth.TX_POOL or truth.SESSION_POOL
    direct_dsn: str  # the same server and database, directly (to terminate backends, read pg_stat_activity)


@dataclass(frozen=True)
class WorkloadSpec:
    endpoints: tuple[Endpoint, ...]
    named_keys: tuple[int, ...]  # bigint keys the exporter's config names, one lock each
    family_classid: int  # a family: every (family_classid, n) int4-pair key, n in 1..50
    unnamed_keys: tuple[int, ...]  # bigint keys nobody names
    workers: int = 6  # processes
    seed: int = 1
    hold_seconds: tuple[float, float] = (0.05, 20.0)  # shortest and longest hold
    prepared: bool = True  # PREPARE TRANSACTION holds (needs max_prepared_transactions)


@dataclass(frozen=True)
class LockKey:
    """One advisory key as the SQL functions take it: one bigint, or two int4."""

    args: tuple[int, ...]

    @property
    def triple(self) -> tuple[int, int, int]:
        tag = bigint_tag(self.args[0]) if len(self.args) == 1 else int4_pair_tag(*self.args)
        return (tag.classid, tag.objid, tag.objsubid)

    @property
    def placeholders(self) -> str:
        return "%s::int8" if len(self.args) == 1 else "%s::int4, %s::int4"


# What an operation does. Which kinds an endpoint allows depends on how it is reached.
SESSION = "session"  # pg_advisory_lock / pg_try_advisory_lock, held, then unlocked
XACT = "xact"  # pg_advisory_xact_lock inside BEGIN .. COMMIT (or ROLLBACK)
PREPARED = "prepared"  # xact locks, PREPARE TRANSACTION, then COMMIT/ROLLBACK PREPARED from another session
DIE = "die"  # session locks held until another connection terminates the backend
STRAND = "strand"  # through a transaction pool: a session lock taken, the client gone without unlocking

KINDS: dict[str, tuple[tuple[str, float], ...]] = {
    truth.DIRECT: ((SESSION, 0.35), (XACT, 0.25), (PREPARED, 0.2), (DIE, 0.2)),
    truth.TX_POOL: ((XACT, 0.7), (STRAND, 0.3)),
    truth.SESSION_POOL: ((SESSION, 0.7), (XACT, 0.3)),
}


@dataclass(frozen=True)
class Op:
    """One planned operation of one worker slot."""

    kind: str
    endpoint: int  # index into WorkloadSpec.endpoints
    keys: tuple[tuple[LockKey, str], ...]  # (key, truth.EXCLUSIVE or truth.SHARED), taken in order
    wait: bool  # the first key is asked for blocking (a waiter if someone holds it); the rest are tried
    lock_timeout: float  # seconds a blocking ask may wait
    hold: float  # seconds held (for PREPARED: by the session before PREPARE)
    later: float  # PREPARED: seconds the prepared transaction holds; STRAND: seconds until the workload ends the backend
    commit: bool  # XACT and PREPARED: COMMIT (else ROLLBACK)
    gap: float  # seconds idle before the operation


def _log_uniform(rng: random.Random, low: float, high: float) -> float:
    """Most draws short, some long: uniform in log(seconds)."""
    return math.exp(rng.uniform(math.log(low), math.log(max(high, low))))


def _key(rng: random.Random, spec: WorkloadSpec) -> LockKey:
    pick = rng.random()
    if spec.named_keys and (pick < 0.5 or not spec.unnamed_keys):
        return LockKey((rng.choice(spec.named_keys),))
    if pick < 0.75 or not spec.unnamed_keys:
        return LockKey((spec.family_classid, rng.randint(1, FAMILY_SIZE)))
    return LockKey((rng.choice(spec.unnamed_keys),))


def _kind(rng: random.Random, spec: WorkloadSpec, via: str) -> str:
    kinds = [(k, w) for k, w in KINDS[via] if spec.prepared or k != PREPARED]
    return rng.choices([k for k, _ in kinds], weights=[w for _, w in kinds])[0]


def plan(spec: WorkloadSpec, worker: int, slot: int) -> Iterator[Op]:
    """The endless sequence of operations of one slot of one worker: a function of the seed only."""
    rng = random.Random(f"chaos-workload:{spec.seed}:{worker}:{slot}")
    low, high = spec.hold_seconds
    while True:
        endpoint = rng.randrange(len(spec.endpoints))
        kind = _kind(rng, spec, spec.endpoints[endpoint].via)
        count = 1 if rng.random() < 0.7 else rng.randint(2, 3)
        keys: list[tuple[LockKey, str]] = []
        while len(keys) < count:
            key = _key(rng, spec)
            mode = truth.SHARED if rng.random() < 0.25 else truth.EXCLUSIVE
            if all(k != key for k, _ in keys):
                keys.append((key, mode))
        yield Op(
            kind=kind,
            endpoint=endpoint,
            keys=tuple(keys),
            wait=kind != STRAND and rng.random() < 0.6,
            lock_timeout=round(rng.uniform(0.2, 1.5), 3),
            hold=_log_uniform(rng, low, high),
            later=_log_uniform(rng, low, high) if kind != STRAND or rng.random() < 0.7 else math.inf,
            commit=rng.random() < 0.7,
            gap=_log_uniform(rng, 0.01, 0.5),
        )


class Workload:
    """The worker processes (spec.workers, each SLOTS_PER_WORKER slots) and the stranded locks'
    keeper; every record goes to a JSON-lines file of its process in out_dir."""

    def __init__(self, spec: WorkloadSpec, out_dir: Path) -> None:
        from .sessions import Gate

        self.spec = spec
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._ctx = multiprocessing.get_context("spawn")
        self._targets = sorted({e.target for e in spec.endpoints})
        # Participants of a pause: every slot, and the keeper (the last).
        self._participants = spec.workers * SLOTS_PER_WORKER + 1
        self.gate = Gate.make(self._ctx, self._targets, self._participants)
        self._token = secrets.token_hex(3)  # prepared transactions' gids are this run's own
        self._workers: list[multiprocessing.process.BaseProcess] = []
        self._keeper: multiprocessing.process.BaseProcess | None = None
        self._strand_queue = self._ctx.Queue()
        self.killed: list[str] = []  # stragglers stop() had to kill (also logged)
        self._stopped = False

    def _worker_file(self, worker: int) -> Path:
        return self.out_dir / f"workload-w{worker}.jsonl"

    def _keeper_file(self) -> Path:
        return self.out_dir / "workload-keeper.jsonl"

    def start(self) -> None:
        from .stranded import run_keeper
        from .workers import run_worker

        self._keeper = self._ctx.Process(
            target=run_keeper, name="chaos-keeper",
            args=(self.spec, self._keeper_file(), self.gate, self._participants - 1, self._strand_queue), daemon=True)
        self._keeper.start()
        for worker in range(self.spec.workers):
            proc = self._ctx.Process(
                target=run_worker, name=f"chaos-w{worker}",
                args=(self.spec, worker, self._worker_file(worker), self.gate, self._strand_queue, self._token), daemon=True)
            proc.start()
            self._workers.append(proc)

    def stop(self) -> None:
        """Every slot lets go of what it holds (prepared transactions finished), records it and
        exits; then the keeper ends the stranded backends. Bounded: a straggler is killed, its
        unfinished holds salvaged from its journal (released unknown), and named in `killed`."""
        from .sessions import salvage

        if self._stopped:
            return
        self._stopped = True
        self.gate.clear_all()  # a stop inside paused() must not wait for ever
        self.gate.stop.set()
        deadline = time.monotonic() + STOP_BOUND
        for worker, proc in enumerate(self._workers):
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.warning("workload: worker %s did not stop within %ss: killed", proc.name, STOP_BOUND)
                proc.kill()
                proc.join(5)
                self.killed.append(proc.name)
                salvage(self._worker_file(worker))
        self._strand_queue.put(None)  # no more stranded locks: end the rest
        if self._keeper is not None:
            self._keeper.join(STOP_BOUND)
            if self._keeper.is_alive():
                log.warning("workload: the stranded locks' keeper did not stop within %ss: killed", STOP_BOUND)
                self._keeper.kill()
                self._keeper.join(5)
                self.killed.append(self._keeper.name)
                salvage(self._keeper_file())
        self._strand_queue.close()

    def files(self) -> list[Path]:
        paths = [self._worker_file(w) for w in range(self.spec.workers)] + [self._keeper_file()]
        return [p for p in paths if p.exists()]

    @contextlib.contextmanager
    def paused(self, target: str) -> Iterator[None]:
        """No statement to `target`'s endpoints while inside (its prepared transactions finished
        first, since DROP DATABASE refuses a database that has some)."""
        index = self._targets.index(target)
        self.gate.request(index)
        try:
            deadline = time.monotonic() + PAUSE_BOUND
            alive = self._alive_participants()
            while not self.gate.all_parked(index, alive):
                if time.monotonic() > deadline:
                    late = sorted(set(alive) - set(self.gate.parked(index, alive)))
                    self._show_stacks(late)
                    raise TimeoutError(f"workload: participants {late} still use target {target!r} after {PAUSE_BOUND}s"
                                       " (their processes' stacks are on stderr)")
                time.sleep(0.01)
                alive = self._alive_participants()
            yield
        finally:
            self.gate.release(index)

    def _show_stacks(self, participants: list[int]) -> None:
        """Every thread's stack of these participants' processes, on their stderr (faulthandler)."""
        procs = {self._keeper if p == self._participants - 1 else self._workers[p // SLOTS_PER_WORKER] for p in participants}
        for proc in procs:
            if proc is not None and proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGUSR1)
                time.sleep(0.3)  # one process's stacks at a time

    def _alive_participants(self) -> list[int]:
        alive = [w * SLOTS_PER_WORKER + s for w, p in enumerate(self._workers) if p.is_alive() for s in range(SLOTS_PER_WORKER)]
        if self._keeper is not None and self._keeper.is_alive():
            alive.append(self._participants - 1)
        return alive
