"""The truth test's workload tells the truth: what it recorded, held against what the server itself
showed (pg_locks, pg_prepared_xacts) at moments of a real run, directly and through a real
PgBouncer in transaction mode; and its operations are the seed's."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest

from chaos import truth
from chaos.sessions import Recorder, salvage
from chaos.workload import FAMILY_SIZE, PREPARED, STRAND, Endpoint, LockKey, Workload, WorkloadSpec, plan
from tests.conftest import needs_own_clusters
from tests.pgbouncer import PgBouncer, PgBouncerError
from tests.pgcluster import Cluster

NAMED = (7_700_001, 7_700_002, 7_700_003)
FAMILY = 7701
UNNAMED = (7_700_101, -7_700_102)
OURS = {LockKey((k,)).triple for k in NAMED + UNNAMED} | {LockKey((FAMILY, n)).triple for n in range(1, FAMILY_SIZE + 1)}
PG_MODE = {"ExclusiveLock": truth.EXCLUSIVE, "ShareLock": truth.SHARED}
RUN_SECONDS = 12

NOW = "extract(epoch FROM clock_timestamp())::float8"
# The server's own view, between two readings of its clock: every advisory row of this database,
# with its backend's start, or for a prepared transaction its gid.
VIEW = f"""
SELECT {NOW} AS lo,
       (SELECT coalesce(json_agg(json_build_array(l.pid, extract(epoch FROM a.backend_start)::float8, l.classid::int8,
                                                  l.objid::int8, l.objsubid::int4, l.mode, l.granted, p.gid,
                                                  a.application_name, a.state, left(a.query, 80))), '[]'::json)
        FROM pg_locks AS l
        LEFT JOIN pg_stat_activity AS a ON a.pid = l.pid
        LEFT JOIN pg_locks AS x ON l.pid IS NULL AND x.pid IS NULL AND x.locktype = 'transactionid'
                               AND x.virtualtransaction = l.virtualtransaction
        LEFT JOIN pg_prepared_xacts AS p ON p.transaction = x.transactionid
        WHERE l.locktype = 'advisory'
          AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())) AS rows,
       {NOW} AS hi
"""
# What every backend of the workload last did.
ACTIVITY = "SELECT pid, state_change FROM pg_stat_activity WHERE application_name LIKE 'chaos-%' ORDER BY pid"


@dataclass(frozen=True)
class Row:
    pid: int | None
    backend_start: float | None
    key: tuple[int, int, int]
    mode: str
    granted: bool
    gid: str | None
    session: tuple[str, str, str] | None = None  # application_name, state, query: to tell who, on failure


@dataclass
class View:
    lo: float
    hi: float
    rows: list[Row]


def spec(endpoints: tuple[Endpoint, ...] = (), seed: int = 11, workers: int = 4) -> WorkloadSpec:
    return WorkloadSpec(endpoints, NAMED, FAMILY, UNNAMED, workers=workers, seed=seed, hold_seconds=(0.05, 3.0))


def read_view(conn: psycopg.Connection) -> View:
    lo, rows, hi = conn.execute(VIEW).fetchone()
    ours = [Row(r[0], r[1], (r[2], r[3], r[4]), PG_MODE[r[5]], r[6], r[7], (r[8], r[9], r[10])) for r in rows
            if (r[2], r[3], r[4]) in OURS]
    return View(lo, hi, ours)


def same_holder(row: Row, holder: truth.Holder) -> bool:
    if holder.gid is not None:
        return row.gid == holder.gid
    if row.pid != holder.pid:
        return False
    # a backend that just ended is in pg_locks a moment longer than in pg_stat_activity
    return row.backend_start is None or abs(row.backend_start - (holder.backend_start or 0)) < 1e-5


def matches(row: Row, target: Any) -> bool:
    return row.key == tuple(target.key) and row.mode == target.mode and same_holder(row, target.holder)


def certainly_held(hold: truth.Hold, view: View) -> bool:
    return hold.granted.hi < view.lo and (hold.released is None or hold.released.lo > view.hi)


def maybe_held(hold: truth.Hold, view: View) -> bool:
    return hold.granted.lo <= view.hi and (hold.released is None or hold.released.hi >= view.lo)


def maybe_waiting(record: truth.Hold | truth.Wait, view: View) -> bool:
    if isinstance(record, truth.Hold):
        return record.waited is not None and record.waited.lo <= view.hi and record.granted.hi >= view.lo
    return record.began.lo <= view.hi and (record.ended is None or record.ended.hi >= view.lo)


def judge(facts: truth.Truth, views: list[View], database: str = "postgres") -> dict[str, int]:
    """Every hold the truth says was certainly held at a view is in it; every row of a view is a
    hold (or wait) the truth says may have been. Returns how many checks of each kind were made."""
    made = {"held": 0, "prepared": 0, "stranded": 0, "xact": 0, "rows": 0, "waiting": 0}
    holds = [h for h in facts.holds if h.database == database]
    for view in views:
        for hold in holds:
            if certainly_held(hold, view):
                assert any(r.granted and matches(r, hold) for r in view.rows), f"held, not in pg_locks: {hold} at {view.lo}"
                made["held"] += 1
                made["prepared"] += hold.holder.gid is not None
                made["stranded"] += hold.stranded is not None
                made["xact"] += hold.level == "xact"
        for row in view.rows:
            if row.granted:
                assert any(maybe_held(h, view) and matches(row, h) for h in holds), f"in pg_locks, not in the truth: {row} at [{view.lo}, {view.hi}]"
            else:
                assert any(maybe_waiting(w, view) and matches(row, w) for w in [*facts.waits, *holds]), f"waits, not in the truth: {row} at [{view.lo}, {view.hi}]"
                made["waiting"] += 1
            made["rows"] += 1
    return made


@pytest.fixture
def bouncer(server):
    cluster = server.require_cluster()
    try:
        started = PgBouncer(cluster.port, pool_mode="transaction", pool_size=3).start()
    except PgBouncerError as exc:
        pytest.fail(str(exc))
    yield started
    started.stop()


def run_and_watch(workload: Workload, conn: psycopg.Connection) -> tuple[list[View], list[Any], list[Any], int]:
    """Views of pg_locks every half second while the workload runs, and inside a pause of its only
    target: what its backends had last done at the pause's start and end, and its prepared
    transactions left then."""
    views: list[View] = []
    workload.start()
    try:
        end = time.monotonic() + RUN_SECONDS
        while time.monotonic() < end:
            time.sleep(0.5)
            views.append(read_view(conn))
            if len(views) == RUN_SECONDS:  # half way
                with workload.paused(""):
                    before = conn.execute(ACTIVITY).fetchall()
                    time.sleep(1.0)
                    after = conn.execute(ACTIVITY).fetchall()
                    prepared = conn.execute("SELECT count(*) FROM pg_prepared_xacts WHERE gid LIKE 'chaos-%'").fetchone()[0]
    finally:
        workload.stop()
    return views, before, after, prepared


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_recorded_truth_is_what_the_server_showed(server, bouncer, tmp_path: Path) -> None:
    endpoints = (
        Endpoint("", "postgres", server.dsn(), truth.DIRECT, server.dsn()),
        Endpoint("", "postgres", bouncer.dsn(), truth.TX_POOL, server.dsn()),
    )
    workload = Workload(spec(endpoints), tmp_path)
    with psycopg.connect(server.dsn(), autocommit=True, application_name="test-view") as conn:
        views, before, after, prepared = run_and_watch(workload, conn)
        assert workload.killed == []
        facts = truth.Truth.of(truth.load(workload.files()))
        made = judge(facts, views)
        # After stop: nothing of the workload is held or prepared any more, and the truth says so.
        assert read_view(conn).rows == []
        assert conn.execute("SELECT count(*) FROM pg_prepared_xacts WHERE gid LIKE 'chaos-%'").fetchone()[0] == 0
    assert all(h.released is not None for h in facts.holds)
    # While paused, no backend of the workload ran a statement, and no prepared transaction was left.
    assert before == after and prepared == 0
    # The checks were real: every kind of hold was certainly held at some view, and some waited.
    assert made["held"] >= 20 and made["prepared"] and made["stranded"] and made["xact"], made
    assert facts.waits and any(h.waited for h in facts.holds), (len(facts.waits), made)
    assert {h.via for h in facts.holds} == {truth.DIRECT, truth.TX_POOL}
    # A strand's statement is recorded as its server connection's busy time, around its grant:
    # that backend was active then, whatever it held already (rule 3.pooled's certainty).
    for hold in (h for h in facts.holds if h.stranded is not None):
        assert any((b.holder.pid, b.holder.backend_start) == (hold.holder.pid, hold.holder.backend_start)
                   and b.began.lo <= hold.granted.lo and b.ended is not None and b.ended.hi >= hold.granted.hi
                   for b in facts.busy), hold
    assert {h.holder.application_name for h in facts.holds if h.holder.gid is None} <= {f"chaos-w{w}" for w in range(4)}


@pytest.fixture
def own_cluster():
    needs_own_clusters()
    made = Cluster(settings={"max_prepared_transactions": "20"}).start()
    yield made
    made.destroy()


def views_for(cluster: Cluster, seconds: float, views: list[View]) -> None:
    """Views of pg_locks for a while, each on a connection of its own (the server restarts)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.4)
        with psycopg.connect(cluster.dsn(DROPPED), autocommit=True, connect_timeout=5) as conn:
            views.append(read_view(conn))


def break_it(cluster: Cluster, workload: Workload, fault: str) -> None:
    if fault == "freeze":
        cluster.signal_all(signal.SIGSTOP)
        time.sleep(1.5)
        cluster.signal_all(signal.SIGCONT)
    elif fault == "drop":
        with workload.paused(""), psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {DROPPED} WITH (FORCE)")
            conn.execute(f"CREATE DATABASE {DROPPED}")
    else:
        cluster.restart(fault)


DROPPED = "chaos_dropped"


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_no_worker_dies_of_faults_and_the_truth_holds_across_them(own_cluster: Cluster, tmp_path: Path) -> None:
    """Restarted (fast and immediate), frozen, and its database dropped and created again (inside
    paused()) under the workload, direct and through both pool modes: no worker dies, every hold a
    restart ended is recorded let go in a span around it (never at a time nobody knew), and the
    truth still agrees with the server before and after."""
    with psycopg.connect(own_cluster.dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {DROPPED}")
    # PgBouncer tries a server it could not reach again only after server_login_retry (15 s by
    # default), its clients queued meanwhile: a second here, so the run goes on after a restart.
    pools = [PgBouncer(own_cluster.port, pool_mode=mode, pool_size=3, extra={"server_login_retry": "1"}).start()
             for mode in ("transaction", "session")]
    direct = own_cluster.dsn(DROPPED)
    endpoints = (
        Endpoint("", DROPPED, direct, truth.DIRECT, direct),
        Endpoint("", DROPPED, pools[0].dsn(DROPPED), truth.TX_POOL, direct),
        Endpoint("", DROPPED, pools[1].dsn(DROPPED), truth.SESSION_POOL, direct),
    )
    workload = Workload(spec(endpoints, seed=23, workers=4), tmp_path)
    views: list[View] = []
    faults: list[tuple[str, float, float]] = []  # this machine's clock (the server's) around each
    try:
        workload.start()
        for fault in ("fast", "freeze", "drop", "immediate"):
            views_for(own_cluster, 3, views)
            began = time.time()
            break_it(own_cluster, workload, fault)
            faults.append((fault, began, time.time()))
        views_for(own_cluster, 3, views)
    finally:
        workload.stop()
        for pool in pools:
            pool.stop()
    assert workload.killed == []
    facts = truth.Truth.of(truth.load(workload.files()))
    made = judge(facts, views, DROPPED)
    with psycopg.connect(own_cluster.dsn(DROPPED), autocommit=True) as conn:
        assert read_view(conn).rows == []
        assert conn.execute("SELECT count(*) FROM pg_prepared_xacts").fetchone()[0] == 0
    assert made["held"] > 0 and all(h.released is not None for h in facts.holds)
    assert {h.via for h in facts.holds} == {truth.DIRECT, truth.TX_POOL, truth.SESSION_POOL}
    for fault, began, ended in faults:
        by_backend = [h for h in facts.holds if h.holder.pid is not None and h.granted.hi < began]
        if fault in ("fast", "immediate"):
            # Holds the restart ended: let go within a span that reaches into the restart.
            assert [h for h in by_backend if h.released.lo < ended and h.released.hi > began], fault
        if fault != "freeze":  # a frozen server's sessions live on
            # Nothing a backend held before is recorded let go after the fault's end, as if it lasted.
            assert not [h for h in by_backend if h.released.lo > ended], fault
        # And the workload went on.
        assert [h for h in facts.holds if h.granted.lo > ended], fault


class _PooledSession:
    """A client of a transaction pool, as chaos.sessions.Conn: every statement answered by the
    server connection the pool hands it, pid 7 (the transaction's was another)."""

    via = truth.TX_POOL

    def __init__(self) -> None:
        self.sent: list[tuple[str, float]] = []

    def q(self, sql: str, params: Any = None, bypass: bool = False) -> dict[str, Any]:
        self.sent.append((sql, time.time()))
        return {"at": time.time(), "pid": 7, "backend_start": 1.0, "app": ""}


def test_the_clock_read_after_a_pooled_transaction_is_its_server_connection_s_busy_time() -> None:
    """After COMMIT, the clock that bounds the release is one statement outside any transaction,
    on whichever server connection the pool hands it, which may hold another client's stranded
    lock: that backend was active then, as under a strand's statement (rule 3.pooled's certainty;
    unrecorded, an active backend would be taken for an idle one)."""
    from chaos.workers import Slot

    written: list[Any] = []
    slot = Slot.__new__(Slot)  # what end_xact reads of a slot, nothing that connects
    slot.spec = SimpleNamespace(endpoints=(Endpoint("orders", "app", "postgresql://pool", truth.TX_POOL, "postgresql://db"),))
    slot.recorder = type("R", (), {"write": lambda self, item, uid=None: written.append(item)})()
    slot.current, slot.in_xact, slot.holding, slot.last_proof = 0, True, [], 0.0
    slot.busy = truth.Busy("orders", truth.Holder(5, 1.0, None, ""), truth.Span(0.0, 0.0))
    conn = _PooledSession()
    slot.end_xact(conn, commit=True)  # type: ignore[arg-type]
    after_commit = conn.sent[-1][1]
    assert any(b.holder.pid == 7 and b.began.lo <= after_commit and b.ended is not None and b.ended.hi >= after_commit
               for b in written if isinstance(b, truth.Busy)), written

def test_a_failed_strand_is_busy_on_any_backend_from_when_it_was_sent_not_from_its_connect() -> None:
    """A strand whose statement fails makes every stranded lock of its target uncertain for its
    span (ANY_BACKEND): the span is the statement's, not the retries of a connect through a pooler
    that was down (no server connection ran anything then)."""
    from chaos.workers import Slot

    class Failing(_PooledSession):
        connected = 0.0

        def connect(self, bypass: bool = False) -> None:
            time.sleep(0.2)  # the retries until the pooler answers
            self.connected = time.time()

        def q(self, sql: str, params: Any = None, bypass: bool = False) -> dict[str, Any]:
            if not self.connected:
                self.connect()
            raise psycopg.OperationalError("server closed the connection unexpectedly")

    written: list[Any] = []
    slot = Slot.__new__(Slot)
    slot.recorder = type("R", (), {"write": lambda self, item, uid=None: written.append(item)})()
    key = LockKey((42,))
    op = SimpleNamespace(keys=[(key, "exclusive")], endpoint=0)
    ep = Endpoint("orders", "app", "postgresql://pool", truth.TX_POOL, "postgresql://db")
    conn = Failing()
    with pytest.raises(psycopg.OperationalError):
        slot.strand_op(op, ep, conn)  # type: ignore[arg-type]
    [busy] = [b for b in written if isinstance(b, truth.Busy)]
    assert busy.holder == truth.ANY_BACKEND and busy.began.lo >= conn.connected, (busy, conn.connected)

def test_the_seed_decides_the_operations() -> None:
    endpoints = tuple(Endpoint("", "postgres", "host=x", via, "host=x") for via in (truth.DIRECT, truth.TX_POOL))

    def first(seed: int) -> list[Any]:
        return [list(islice(plan(spec(endpoints, seed=seed), w, s), 60)) for w in range(2) for s in range(2)]

    assert first(3) == first(3)
    assert first(3) != first(4)
    ops = [op for slot in first(3) for op in slot]
    assert {op.kind for op in ops} >= {PREPARED, STRAND}
    assert all(endpoints[op.endpoint].via == truth.TX_POOL for op in ops if op.kind == STRAND)
    assert all(endpoints[op.endpoint].via == truth.DIRECT for op in ops if op.kind == PREPARED)
    assert all(k.triple in OURS for op in ops for k, _ in op.keys)
    assert not any(op.kind == PREPARED for slot in
                   [list(islice(plan(WorkloadSpec(endpoints, NAMED, FAMILY, UNNAMED, prepared=False), 0, 0), 60))] for op in slot)


def test_lock_keys_are_the_triples_pg_locks_shows() -> None:
    assert LockKey((7,)).triple == (0, 7, 1)
    assert LockKey((-1,)).triple == (2**32 - 1, 2**32 - 1, 1)
    assert LockKey((7701, -3)).triple == (7701, 2**32 - 3, 2)



def test_a_killed_process_s_open_holds_are_salvaged_from_its_journal(tmp_path: Path) -> None:
    path = tmp_path / "w0.jsonl"
    recorder = Recorder(path)
    holder = truth.Holder(101, 1.0, None, "chaos-w0")
    first = truth.Hold("", "postgres", (0, 1, 1), truth.EXCLUSIVE, holder, truth.Span(2.0, 2.1))
    second = truth.Hold("", "postgres", (0, 2, 1), truth.SHARED, holder, truth.Span(3.0, 3.1))
    recorder.opened("a", first)
    recorder.opened("b", second)
    recorder.write(replace(first, released=truth.Span(4.0, 4.1)), "a")
    recorder.close()
    assert salvage(path) == 1
    assert list(truth.load([path])) == [
        truth.Hold("", "postgres", (0, 1, 1), truth.EXCLUSIVE, holder, truth.Span(2.0, 2.1), truth.Span(4.0, 4.1)),
        second,
    ]
