"""The assembler remembers the last poll: what did not change is not recomputed, and what it
returns is what assembling each poll from scratch returns."""

from __future__ import annotations

import random
from collections import namedtuple

from exporter import keys, queries
from exporter.assemble import WAITERS_NAMED, Assembler, Caps
from exporter.config import LockConfig, parse_config
from exporter.holders import Who, who_holds
from exporter.matching import KeyMatcher
from exporter.naming import SOURCE_CONFIG, SOURCE_PRESET, ResolvedLock, resolve_locks
from exporter.pooled import Client, PoolerView, Release, ServerLink
from exporter.snapshot import Holder, LockState, OwnWait, UnnamedLocks, Waiter
from exporter.tracker import HoldTracker
from tests.metrics_util import value

CAPS = Caps(per_lock=3, total=40, unnamed_per_database=4)
Row = namedtuple("Row", queries.POLL_COLUMN_NAMES)  # the poll's columns, by the names queries.py declares


def row(**columns) -> Row:
    """A poll row, its columns by name (an advisory one unless locktype says otherwise)."""
    return Row(**{**dict.fromkeys(queries.POLL_COLUMN_NAMES), "locktype": "advisory", **columns})


def ids(name: str) -> dict[str, str]:
    return {"lock": name, "database": "postgres"}


def test_an_unchanged_lock_is_the_same_state_and_a_changed_one_is_new(make_poller, sessions) -> None:
    now = [1000.0]
    poller = make_poller({"locks": [{"name": "steady", "key": 11}, {"name": "moving", "key": 12},
                                    {"name": "tenants", "key": {"namespace": 42}}]}, clock=lambda: now[0])
    steady, moving = sessions.open(), sessions.open()
    steady.execute("SELECT pg_advisory_lock(11), pg_advisory_lock(42, 1)")
    poller.poll_once()
    now[0] += 5.0
    first = poller.poll_once()
    moving.execute("SELECT pg_advisory_lock(12), pg_advisory_lock(42, 2)")
    now[0] += 5.0
    second = poller.poll_once()
    by_name = {lock.name: lock for lock in first.locks}
    again = {lock.name: lock for lock in second.locks}
    # No session holding "steady" changed: the very same state, its age taken from the snapshot's time.
    assert again["steady"] is by_name["steady"]
    # Its age is taken at each snapshot's time from the same start: 5 s of the poller's clock more.
    # (Not "10 s since the first poll": the idle lower bound proves an earlier start, by however
    # long the machine took between taking the lock and the first poll.)
    steady_age = value(second, "pg_advisory_lock_held_seconds", **ids("steady"))
    assert steady_age >= 10.0
    assert abs(steady_age - value(first, "pg_advisory_lock_held_seconds", **ids("steady")) - 5.0) < 0.002
    # A changed session's locks are assembled anew, the unchanged session's holds keep their start.
    assert again["tenants"] is not by_name["tenants"] and again["tenants"].holds == 2
    assert value(second, "pg_advisory_lock_held_seconds", **ids("tenants")) == steady_age
    assert value(second, "pg_advisory_lock_acquisitions_total", **ids("tenants")) == 1
    assert value(second, "pg_advisory_lock_holders", **ids("moving"), mode="exclusive") == 1
    # A session that ends takes its holds with it.
    moving.execute("SELECT pg_advisory_unlock_all()")
    now[0] += 1.0
    third = poller.poll_once()
    assert value(third, "pg_advisory_lock_holders", **ids("moving"), mode="exclusive") == 0
    assert value(third, "pg_advisory_lock_keys_held", **ids("tenants")) == 1


class _Holder:
    """One holder of the random workload: a session (pid, backend_start) or a prepared transaction."""

    def __init__(self, pid: int | None, start: float | None, xid: int | None = None) -> None:
        self.pid, self.start, self.xid = pid, start, xid
        self.held: dict[tuple[str, int, int], str] = {}  # (database, objsubid, key) -> mode
        self.state, self.changed_at = "active", 0.0
        self.app, self.client = f"app-{pid}", "10.0.0.1"


KEYS = [5, 6, 7, 1000, 1001, (42 << 32) | 3, (42 << 32) | 4]


def _change(rng: random.Random, holder: _Holder, now: float) -> None:
    """A session's state, identity or keys change since the last poll, or not."""
    if rng.random() < 0.3:
        holder.state, holder.changed_at = rng.choice(["idle", "active", "idle in transaction"]), now - rng.uniform(0, 0.9)
    if rng.random() < 0.1:  # the same rows under another name or client (a pooler's rewrite)
        holder.app, holder.client = rng.choice([f"app-{holder.pid}", "renamed"]), rng.choice(["10.0.0.1", "10.0.0.2"])
    if rng.random() < 0.4:
        for _ in range(rng.randint(1, 3)):
            key = (rng.choice(["postgres", "other"]), rng.choice([1, 2]), rng.choice(KEYS))
            if key in holder.held and rng.random() < 0.5:
                del holder.held[key]
            else:
                holder.held[key] = rng.choice(["exclusive", "shared", "both"])


def _rows_of(rng: random.Random, holder: _Holder, now: float) -> list[Row]:
    """The poll's rows of one holder: one per database, key form and mode, keys in any order."""
    # The idle time back from the poller's clock moves by each poll's latency: a few ms either way
    # (the same for every row of a holder: one pg_stat_activity row, one prepared transaction).
    latency = rng.uniform(-0.005, 0.005)
    groups: dict[tuple[str, int, bool], list[int]] = {}
    for (database, objsubid, key), mode in sorted(holder.held.items()):
        for shared in ((False, True) if mode == "both" else (mode == "shared",)):
            groups.setdefault((database, objsubid, shared), []).append(key)
    rows = []
    for (database, objsubid, shared), held_keys in groups.items():
        rng.shuffle(held_keys)  # the server promises no order inside array_agg
        if holder.pid is None:  # a prepared transaction: no session, its gid and owner
            rows.append(row(datname=database, prepared_xid=holder.xid, objsubid=objsubid, granted=True, shared=shared,
                            keys=held_keys, application_name=f"gid-{holder.xid}", usename="u", state="prepared",
                            idle_seconds=now - holder.changed_at + latency))
            continue
        idle = now - holder.changed_at + latency if holder.state.startswith("idle") else None
        rows.append(row(datname=database, pid=holder.pid, objsubid=objsubid, granted=True, shared=shared, keys=held_keys,
                        backend_start=holder.start, application_name=holder.app, usename="u", client_addr=holder.client,
                        client_port=5000 + holder.pid, state=holder.state, outside_transaction=holder.state == "idle",
                        idle_seconds=idle))
    if holder.pid is not None:  # it waits (a backend waits for one lock at a time): for an advisory key or a table
        who = dict(pid=holder.pid, backend_start=holder.start, application_name=holder.app, usename="u",
                   client_addr=holder.client, client_port=5000 + holder.pid, state="active", outside_transaction=False,
                   granted=False, shared=False, wait_seconds=rng.choice([0.5, 2.0]))
        roll = rng.random()
        if roll < 0.15:
            rows.append(row(datname="postgres", objsubid=1, keys=[rng.choice([5, 1000])], wait_mode="ExclusiveLock", **who))
        elif roll < 0.25:
            rows.append(row(datname=rng.choice(["postgres", None]), locktype=rng.choice(["relation", "transactionid"]),
                            keys=[rng.choice([None, 731])], wait_mode="AccessExclusiveLock", wait_relation=16384, **who))
    return rows


def _view(rng: random.Random, holders: list[_Holder]) -> PoolerView | None:
    """A pooler console's view, or none configured: links come and go, clients change."""
    if rng.random() < 0.3:
        return None
    links = {}
    for holder in holders:
        if holder.pid is not None and rng.random() < 0.5:
            client = rng.choice([None, Client("10.9.9.9", "app", "real-client"), Client("10.9.9.8", "app", "other")])
            links[(holder.pid, 5000 + holder.pid)] = ServerLink("pgb", rng.choice(["session", "transaction"]), client)
    return PoolerView(by_backend=links)


def _random_polls(rng: random.Random, polls: int) -> list[tuple[list[Row], PoolerView | None, Caps]]:
    """Polls of sessions that keep, drop, take and re-mode keys, go idle and come back, change name
    or client with the same keys, prepare transactions (pid NULL, a holder of its own until it
    ends), some without backend_start (no pg_read_all_stats), some waiting; keys named, in a
    family and unnamed, in two databases; rows and keys in any order; pooler views and holder_info
    caps that change from poll to poll."""
    sessions = [_Holder(pid, float(pid) if pid % 3 else None) for pid in range(1, 9)]
    prepared: list[_Holder] = []
    xids = iter(range(700, 10_000))
    out = []
    for n in range(polls):
        now = 100.0 + n
        for index, holder in enumerate(sessions):
            roll = rng.random()
            if roll < 0.05 and holder.held:  # PREPARE TRANSACTION: its holds move to the prepared transaction
                moved = _Holder(None, None, next(xids))
                moved.held, moved.changed_at = dict(holder.held), now - rng.uniform(0, 0.9)
                prepared.append(moved)
                holder.held = {}
            elif roll < 0.12:  # the session ends; a new one takes its pid
                sessions[index] = _Holder(holder.pid, None if holder.start is None else holder.start + 100.0)
                continue
            _change(rng, holder, now)
        prepared = [p for p in prepared if rng.random() > 0.1]  # COMMIT / ROLLBACK PREPARED
        rows = [row for holder in sessions + prepared for row in _rows_of(rng, holder, now)]
        rng.shuffle(rows)
        caps = Caps(per_lock=rng.choice([1, 2, 3]), total=rng.choice([2, 5, 40]), unnamed_per_database=rng.choice([1, 4]))
        out.append((rows, _view(rng, sessions), caps))
    return out


def test_remembering_the_last_poll_gives_what_assembling_from_scratch_gives() -> None:
    config = parse_config({"dsn": "postgresql://x@localhost/postgres", "locks": [
        {"name": "five", "key": 5}, {"name": "six", "key": 6}, {"name": "six-other", "key": 6, "database": "other"},
        {"name": "tenants", "key": {"namespace": 42}}, {"name": "low", "key": {"range": [1000, 1001]}},
    ]}, "test")
    locks = resolve_locks(config, "postgres", {}, ())  # integer keys and families: nothing to ask a server
    shapes: set[str] = set()
    for seed in range(5):
        rng = random.Random(seed)
        remembering_tracker, scratch_tracker = HoldTracker(max_tracked=30), HoldTracker(max_tracked=30)
        assembler = Assembler(locks, KeyMatcher(locks), remembering_tracker)
        slacks = random.Random(seed + 100)
        for n, (rows, view, caps) in enumerate(_random_polls(rng, 150)):
            now = 100.0 + n  # as _random_polls' clock
            slack = slacks.choice([0.0, 0.002, 0.01])  # none, some or all of the latency's jitter (±5 ms)
            remembered = assembler.run(rows, now, caps, view=view, slack=slack)
            scratch = Assembler(locks, KeyMatcher(locks), scratch_tracker).run(rows, now, caps, view=view,
                                                                                 slack=slack)  # remembers nothing
            assert remembered == scratch, f"seed {seed}, poll {n}"
            # blocked_holder_info: one series per blocked session, never more than blocked_holders counts.
            waiting = {r.pid for r in rows if not r.granted}
            for lock in remembered.locks:
                pids = [h.pid for h in lock.blocked_info]
                assert len(set(pids)) == len(pids) <= min(lock.blocked_holders, caps.per_lock) and set(pids) <= waiting
            assert (remembering_tracker.tracked, remembering_tracker.dropped) == \
                (scratch_tracker.tracked, scratch_tracker.dropped)
            shapes.update(_shapes(remembered, rows, view))
    # The random polls really made every shape the assembler must agree on.
    assert shapes >= {"prepared", "blocked holder", "blocked unnamed", "pooled", "stranded", "waiter", "family",
                      "capped", "no backend_start", "both modes", "blocked holder named", "blocked holder capped",
                      "blocked family holder"}, shapes


def _shapes(result, rows, view) -> set[str]:
    found = {"prepared" for r in rows if r.pid is None} | {"no backend_start" for r in rows if r.backend_start is None
                                                               and r.pid is not None}
    found |= {"blocked holder" for lock in result.locks if lock.blocked_holders}
    found |= {"blocked unnamed" for u in result.unnamed if u.blocked_holders}
    found |= {"blocked holder named" for lock in result.locks if lock.blocked_info}
    found |= {"blocked holder capped" for lock in result.locks if len(lock.blocked_info) < lock.blocked_holders}
    found |= {"blocked family holder" for lock in result.locks if lock.keys_held and lock.blocked_info}
    found |= {"waiter" for lock in result.locks if lock.waiters}
    found |= {"family" for lock in result.locks if lock.keys_held}
    found |= {"capped" for lock in result.locks if len(lock.info_holders) < lock.holds}
    found |= {"both modes" for lock in result.locks for h in lock.info_holders if len(h.modes) == 2}
    if view is not None:
        found.add("pooled")
        found |= {"stranded" for lock in result.locks if lock.pooled_session_holders}
    return found


# What each figure is, on polls made by hand (the test above proves remembering changes nothing;
# these prove what the figures are).

def _row(pid: int | None, keys: list[int], *, datname: str = "postgres", objsubid: int = 1, granted: bool = True,
         shared: bool = False, backend_start: float | None = None, app: str | None = "", user: str | None = "u",
         addr: str | None = "", port: int | None = None, state: str | None = "active", outside: bool = False,
         wait: float | None = None, idle: float | None = None, xid: int | None = None) -> Row:
    return row(datname=datname, pid=pid, prepared_xid=xid, objsubid=objsubid, granted=granted, shared=shared,
               keys=keys, backend_start=backend_start, application_name=app, usename=user, client_addr=addr,
               client_port=port, state=state, outside_transaction=outside, wait_seconds=wait, idle_seconds=idle)


def _lock(index: int, name: str, key: keys.KeySpec, database: str = "postgres", max_hold: float | None = None,
          source: str = SOURCE_CONFIG, expect_every: float | None = None) -> ResolvedLock:
    tag = keys.literal_tag(key) if keys.is_literal(key) else None
    return ResolvedLock(LockConfig(name, key, database, max_hold=max_hold, expect_every=expect_every), index, database,
                        tag, source)


PAIR = 2  # objsubid of an int4 pair
EXCLUSIVE, SHARED = frozenset({"exclusive"}), frozenset({"shared"})
BOTH = EXCLUSIVE | SHARED


def test_every_figure_of_two_polls_by_hand() -> None:
    locks = (
        _lock(0, "five", keys.BigintKey(5), max_hold=60.0),
        _lock(1, "six-other", keys.BigintKey(6), database="other"),
        _lock(2, "tenants", keys.NamespaceFamily(42)),
        _lock(3, "low", keys.RangeFamily(1000, 1002)),
        _lock(4, "preset-idle", keys.BigintKey(8), source=SOURCE_PRESET),
        _lock(5, "preset-held", keys.BigintKey(9), source=SOURCE_PRESET),
        _lock(6, "five-again", keys.BigintKey(5)),  # a second name for the same key
    )
    assembler = Assembler(locks, KeyMatcher(locks), HoldTracker())

    def rows(idle: float, more: list[Row]) -> list[Row]:
        a = {"backend_start": 1.0, "app": "a", "addr": "10.0.0.1", "state": "idle", "idle": idle}
        b = {"backend_start": 2.0, "app": "b", "addr": "10.0.0.2"}
        return [
            _row(70, [5], datname="third"),  # a database not monitored: left out, and the rows after it read
            _row(10, [5, 1000, 77], **a), _row(10, [5], shared=True, **a),  # 5 in both modes: one hold
            _row(20, [(42 << 32) | 3, (42 << 32) | 4, (43 << 32) | 1], objsubid=PAIR, **b),
            _row(20, [1001, 9, 88], shared=True, **b),
            _row(30, [6], datname="other", backend_start=3.0, app="c", addr="10.0.0.3"),
            _row(40, [5], granted=False, wait=0.5), _row(41, [5], granted=False, wait=1.23456),
            _row(42, [99], granted=False, wait=None),  # waits on keys nobody named
            _row(43, [99], granted=False, wait=0.98765),
            *more,
        ]

    caps = Caps(per_lock=2, total=5, unnamed_per_database=1)
    run = {"caps": caps, "unnamed_max_hold": 30.0, "databases": frozenset({"postgres", "other"})}
    first = assembler.run(rows(30.0, []), 100.0, **run)  # session 10 idle for 30 s: held since 70 at the latest
    assert first.locks[0].held_since == 70.0 and first.locks[0].acquisitions == 0
    # Ten seconds later session 50 takes 1002 of "low"; the others hold what they held.
    second = assembler.run(rows(40.0, [_row(50, [1002], backend_start=4.0, app="d")]), 110.0, **run)

    def holder(pid: int, start: float, key: str, modes: frozenset[str] = EXCLUSIVE) -> Holder:
        who = {10: (1.0, "a", "10.0.0.1", "idle"), 20: (2.0, "b", "10.0.0.2", "active"),
               30: (3.0, "c", "10.0.0.3", "active")}[pid]
        return Holder(pid, who[0], modes, who[1], "u", who[2], who[3], start, key)

    # last_acquired_at: when the exporter began watching (100), or when a new holder was seen (110).
    # Who waits: the longest wait first, each waiter by pid, application, user@client and wait.
    five = LockState("five", "postgres", 1, 1, 70.0, 2, 1.235, 0, 60.0, (holder(10, 70.0, "5", BOTH),), 1, "config", "5",
                     last_acquired_at=100.0, waiting=(Waiter(41, "", "u", "", 1.235, "5"), Waiter(40, "", "u", "", 0.5, "5")))
    assert second.locks == (
        five,
        LockState("six-other", "other", 1, 0, 100.0, 0, 0.0, 0, None, (holder(30, 100.0, "6"),), 1, "config", "6",
                  last_acquired_at=100.0),
        LockState("tenants", "postgres", 2, 0, 100.0, 0, 0.0, 0, None,
                  (holder(20, 100.0, "42,3"), holder(20, 100.0, "42,4")), 2, "config", "(42, *)", 2,
                  last_acquired_at=100.0),
        # Room for one more holder_info series: the oldest hold's. The new holder is an acquisition.
        LockState("low", "postgres", 2, 1, 70.0, 0, 0.0, 1, None, (holder(10, 70.0, "1000"),), 3, "config",
                  "[1000 .. 1002]", 3, last_acquired_at=110.0),
        # A preset nobody took has no state; one held has, with no room left for its holder.
        LockState("preset-held", "postgres", 0, 1, 100.0, 0, 0.0, 0, None, (), 1, "preset", "9",
                  last_acquired_at=100.0),
        five._replace(name="five-again", max_hold=None, info_holders=()),
    )
    assert second.unnamed == (
        UnnamedLocks("postgres", 3, 2, 70.0, 0.988, (holder(10, 70.0, "77"),), 30.0,
                     waiting=(Waiter(43, "", "u", "", 0.988, "99"), Waiter(42, "", "u", "", 0.0, "99"))),
    )
    assert second.holder_info_dropped == 4  # low's two, preset-held's one, five-again's one
    assert second.seen_presets == frozenset({("preset-held", "postgres")})


def test_a_preset_lock_once_seen_keeps_its_series_and_waiters_show_it() -> None:
    locks = (_lock(0, "preset", keys.BigintKey(9), source=SOURCE_PRESET),
             _lock(1, "other-preset", keys.BigintKey(8), source=SOURCE_PRESET))
    assembler = Assembler(locks, KeyMatcher(locks), HoldTracker())
    caps = Caps(per_lock=1, total=1, unnamed_per_database=1)
    waited = assembler.run([_row(1, [9], granted=False, wait=2.0)], 100.0, caps)
    assert [lock.name for lock in waited.locks] == ["preset"] and waited.locks[0].waiters == 1
    assert waited.seen_presets == frozenset({("preset", "postgres")})
    later = assembler.run([], 101.0, caps, seen_presets=waited.seen_presets)
    assert later.locks == (LockState("preset", "postgres", 0, 0, None, 0, 0.0, 0, source="preset", key="9",
                                      last_acquired_at=100.0),)


def test_who_holds_a_pooled_backends_locks() -> None:
    view = PoolerView(by_backend={
        (60, 6000): ServerLink("pgb", "transaction", Client("10.9.9.9", "client-user", "client-app")),
        (61, 6001): ServerLink("pgb", "session", Client("10.9.9.8", "session-user", "session-app")),
        (62, 6002): ServerLink("pgb", "transaction", None),
    })
    common = {"backend_start": 5.0, "app": "last-borrower", "addr": "10.0.0.5", "state": "idle"}
    # Session-level locks left on a transaction-pool backend outside any transaction: nobody's.
    assert who_holds(_row(60, [5], port=6000, outside=True, **common), view) == \
        Who(60, 5.0, "", "u", "", "idle", "pgb", True)
    assert who_holds(_row(60, [5], port=6000, outside=True, user=None, state=None), view) == \
        Who(60, None, "", "", "", "", "pgb", True)
    assert who_holds(_row(61, [5], port=6001, state=None), view).state == ""
    # Inside a transaction, the backend's locks are its client's.
    assert who_holds(_row(60, [5], port=6000, **common), view) == \
        Who(60, 5.0, "client-app", "client-user", "10.9.9.9", "idle", "pgb", False)
    # A session pool's backend is its client's, in a transaction or not.
    assert who_holds(_row(61, [5], port=6001, outside=True, **common), view) == \
        Who(61, 5.0, "session-app", "session-user", "10.9.9.8", "idle", "pgb", False)
    # Nobody borrows it now: the backend's own names, and the pooler it belongs to.
    assert who_holds(_row(62, [5], port=6002, **common), view) == \
        Who(62, 5.0, "last-borrower", "u", "10.0.0.5", "idle", "pgb", False)
    # A pooler known by its address only.
    by_address = PoolerView(by_address={"10.0.0.7": ServerLink("pgcat", "session", Client("10.9.9.7", "cu", "ca"))})
    assert who_holds(_row(64, [5], port=7000, addr="10.0.0.7"), by_address) == \
        Who(64, None, "ca", "cu", "10.9.9.7", "active", "pgcat", False)
    # Not a pooler's backend, and a prepared transaction (no pid to look up): the row's own names.
    assert who_holds(_row(63, [5], port=6000, app=None, user=None, addr=None, state=None), view) == \
        Who(63, None, "", "", "", "", "", False)
    assert who_holds(_row(None, [5], port=6000, app="gid-1", state="prepared", xid=701), view) == \
        Who(None, None, "gid-1", "u", "", "prepared", "", False, 701)


def test_pooled_session_holders_count_the_stranded_holds() -> None:
    locks = (_lock(0, "five", keys.BigintKey(5)),)
    view = PoolerView(by_backend={(60, 6000): ServerLink("pgb", "transaction", None),
                                  (61, 6001): ServerLink("pgb", "transaction", None)})
    rows = [_row(60, [5, 77, 78], port=6000, outside=True, backend_start=1.0, state="idle", idle=3.0),
            _row(60, [79], port=6000, outside=True, shared=True, backend_start=1.0, state="idle", idle=3.0),
            _row(61, [5], port=6001, shared=True, backend_start=2.0, app="x", state="active")]
    result = Assembler(locks, KeyMatcher(locks), HoldTracker()).run(rows, 100.0, Caps(3, 10, 1), view=view)
    stranded = Holder(60, 1.0, EXCLUSIVE, "", "u", "", "idle", 97.0, "5", "pgb", True)
    assert result.locks == (LockState(
        "five", "postgres", 1, 1, 97.0, 0, 0.0, 0, None,
        (stranded, Holder(61, 2.0, SHARED, "x", "u", "", "active", 100.0, "5", "pgb")), 2, "config", "5", None, 1,
        last_acquired_at=100.0,
    ),)
    # The unnamed keys' one holder_info series is the oldest hold's, the lowest key among equals.
    assert result.unnamed == (UnnamedLocks("postgres", 3, 0, 97.0, 0.0, (stranded._replace(key="77"),), None, 3),)
    # Without a pooler configured, there is no pooled figure at all.
    plain = Assembler(locks, KeyMatcher(locks), HoldTracker()).run(rows, 100.0, Caps(3, 10, 1))
    assert plain.locks[0].pooled_session_holders is None and plain.unnamed[0].pooled_session_holders is None


def test_a_prepared_transaction_takes_over_its_sessions_holds_without_an_acquisition() -> None:
    locks = (_lock(0, "five", keys.BigintKey(5)),)
    assembler = Assembler(locks, KeyMatcher(locks), HoldTracker())
    caps = Caps(3, 10, 1)
    assembler.run([], 100.0, caps)
    prepared = assembler.run([_row(None, [5], app="gid-1", state="prepared", xid=701, idle=4.0)], 110.0, caps)
    assert prepared.locks[0].acquisitions == 0 and prepared.locks[0].held_since == 106.0
    taken = assembler.run([_row(None, [5], app="gid-1", state="prepared", xid=701, idle=5.0),
                           _row(9, [5], shared=True)], 111.0, caps)
    assert taken.locks[0].acquisitions == 1 and taken.locks[0].holds == 2


def test_the_holder_info_caps() -> None:
    locks = (_lock(0, "five", keys.BigintKey(5)), _lock(1, "six", keys.BigintKey(6)))
    rows = [_row(pid, [5, 6], backend_start=float(pid), state="idle", idle=float(pid)) for pid in (1, 2, 3)]
    result = Assembler(locks, KeyMatcher(locks), HoldTracker()).run(rows, 100.0, Caps(2, 3, 1))
    # The two longest-held of three (pid 3 idle longest, then 2), shown by pid; the rest of the room for six.
    assert [(h.pid, h.key) for h in result.locks[0].info_holders] == [(2, "5"), (3, "5")]
    assert [(h.pid, h.key) for h in result.locks[1].info_holders] == [(3, "6")]
    assert result.holder_info_dropped == 3
    # Among holds as old as each other: the lowest pid first, whatever its key.
    even = [_row(1, [9]), _row(2, [5])]
    unnamed = Assembler((), KeyMatcher(()), HoldTracker()).run(even, 100.0, Caps(1, 1, 1)).unnamed[0]
    assert [(h.pid, h.key) for h in unnamed.info_holders] == [(1, "9")]
    # No room at all: no series, and every hold counted as dropped.
    none = Assembler(locks, KeyMatcher(locks), HoldTracker()).run(rows, 100.0, Caps(2, 0, 0))
    assert none.locks[0].info_holders == () and none.holder_info_dropped == 6


def test_key_matching() -> None:
    locks = (_lock(0, "five", keys.BigintKey(5)), _lock(1, "five-too", keys.BigintKey(5)),
             _lock(2, "pair", keys.Int4PairKey(0, 5)), _lock(3, "ns", keys.NamespaceFamily(-1)),
             _lock(4, "range", keys.RangeFamily(-3, 3)), _lock(5, "elsewhere", keys.BigintKey(7), database="other"),
             _lock(6, "range-other", keys.RangeFamily(10, 20), database="other"))
    matcher = KeyMatcher(locks)
    # A bigint and an int4 pair with the same 64 bits are different keys; two names for a key share it.
    assert matcher.partition("postgres", 1, [5, 6]) == {0: [5], 1: [5], None: [6]}
    assert matcher.named("postgres", 1) == {5: (0, 1)}
    assert matcher.named("postgres", 2) == {5: (2,)}
    assert matcher.named("other", 1) == {7: (5,)} and matcher.named("nowhere", 1) == {}
    # Families: the namespace is the pair's first int (negative ones too), the range inclusive at both ends.
    assert matcher.family("postgres", 2, (0xFFFFFFFF << 32) | 9) == 3
    assert matcher.family("postgres", 2, (0xFFFFFFFE << 32) | 9) is None
    assert matcher.family("postgres", 2, (1 << 31) | 9) is None  # not namespace -1's
    assert [matcher.family("postgres", 1, key) for key in (-4, -3, 3, 4)] == [None, 4, 4, None]
    assert matcher.family("postgres", 1, 0xFFFFFFFF << 32) is None  # a bigint is not in a namespace
    assert matcher.family("other", 1, 10) == 6 and matcher.family("other", 2, 10 << 32) is None
    assert matcher.family("nowhere", 1, 0) is None
    assert matcher.has_families("postgres") and matcher.has_families("other") and not matcher.has_families("x")
    assert matcher.partition("postgres", 1, [5, 6, 3, 100]) == {0: [5], 1: [5], 4: [3], None: [6, 100]}
    assert matcher.partition("postgres", 2, [5, (0xFFFFFFFF << 32) | 1]) == {2: [5], 3: [(0xFFFFFFFF << 32) | 1]}
    assert matcher.partition("other", 1, [7, 15, 30]) == {5: [7], 6: [15], None: [30]}
    # Named keys only, or nothing named at all.
    only_named = KeyMatcher(locks[:2])
    assert only_named.partition("postgres", 1, [6, 5, 8]) == {0: [5], 1: [5], None: [6, 8]}
    assert only_named.partition("postgres", 1, [5]) == {0: [5], 1: [5]}
    assert only_named.partition("postgres", 1, [6]) == {None: [6]}
    assert only_named.partition("postgres", 2, [5]) == {None: [5]}
    only_families = KeyMatcher(locks[3:5])
    assert only_families.partition("postgres", 1, [2, 9]) == {4: [2], None: [9]}
    assert only_families.has_families("postgres") and not only_families.has_families("other")


def test_an_idle_holder_whose_idle_time_moves_within_the_polls_slack_is_not_assembled_again() -> None:
    """The idle time back from now moves by each poll's latency; inside the poll's round trip (its
    slack) that proves no earlier start, so the lock keeps its state, reused as it was."""
    locks = (_lock(0, "leader", keys.BigintKey(5)),)
    assembler = Assembler(locks, KeyMatcher(locks), HoldTracker())
    idle = dict(backend_start=1.0, state="idle", outside=True)
    first = assembler.run([_row(7, [5], idle=5.0, **idle)], 100.0, CAPS, slack=0.002)  # since 95.0
    within = assembler.run([_row(7, [5], idle=6.004, **idle)], 101.0, CAPS, slack=0.005)  # 94.996
    assert within.locks[0] is first.locks[0]
    beyond = assembler.run([_row(7, [5], idle=7.004, **idle)], 102.0, CAPS, slack=0.001)  # 94.996 again
    assert beyond.locks[0] is not first.locks[0]
    assert round(102.0 - beyond.locks[0].held_since, 3) == 7.004


def _waits(pid: int, locktype: str, *, keys: list[int | None], datname: str | None = "postgres",
           mode: str = "AccessExclusiveLock", relation: int | None = None, wait: float | None = None) -> Row:
    """A session's own wait, for a lock of any type (the poll's row with granted false)."""
    return row(datname=datname, pid=pid, objsubid=1 if locktype == "advisory" else 0, granted=False, shared=False,
               keys=keys, locktype=locktype, wait_mode=mode, wait_relation=relation, state="active",
               application_name="", usename="u", wait_seconds=wait)


def test_holders_that_wait_themselves_are_blocked_holders_and_say_for_what() -> None:
    locks = (_lock(0, "five", keys.BigintKey(5)), _lock(1, "six", keys.BigintKey(6)),
             _lock(2, "free", keys.BigintKey(8)))
    rows = [
        _waits(13, "advisory", keys=[6], mode="ExclusiveLock", wait=3.0),  # holds nothing: a waiter only
        _row(10, [5]), _waits(10, "relation", keys=[None], relation=16384, wait=0.75),
        _row(11, [5, 77]), _waits(11, "transactionid", keys=[731], datname=None, mode="ShareLock", wait=1.23456),
        _row(12, [6]), _waits(12, "advisory", keys=[5], mode="ExclusiveLock", wait=0.5),  # and so a waiter of five
        _row(14, [6, 78]), _waits(14, "relation", keys=[None], relation=16385, wait=None),  # no wait start known (PG 13)
        _waits(15, "relation", keys=[None], datname="third", relation=1, wait=9.0),  # a database not monitored
    ]
    run = {"caps": CAPS, "databases": frozenset({"postgres"})}
    result = Assembler(locks, KeyMatcher(locks), HoldTracker()).run(rows, 100.0, **run)
    five, six, free = result.locks
    figures = [(s.blocked_holders, s.blocked_holder_wait_seconds, s.waiters, s.wait_seconds) for s in (five, six, free)]
    assert figures == [(2, 1.235, 1, 0.5), (2, 0.5, 1, 3.0), (0, 0.0, 0, 0.0)]
    assert [(u.database, u.blocked_holders, u.blocked_holder_wait_seconds) for u in result.unnamed] == \
        [("postgres", 2, 1.235)]
    # What each blocked holder waits for, by pid; a waiter that holds nothing is not one.
    assert result.blocked == (
        OwnWait(10, "postgres", "relation", "AccessExclusiveLock", 16384, None, None, 0.75),
        OwnWait(11, "", "transactionid", "ShareLock", None, 731, None, 1.235),
        OwnWait(12, "postgres", "advisory", "ExclusiveLock", None, 5, 1, 0.5),
        OwnWait(14, "postgres", "relation", "AccessExclusiveLock", 16385, None, None, 0.0),
    )
    # Every session that waits, for whatever and wherever, is a waiting pid (the chain is asked for them).
    assert result.waiting_pids == frozenset({10, 11, 12, 13, 14, 15})
    # The next poll, the same holds and nobody waiting: no blocked holder is left.
    calm = Assembler(locks, KeyMatcher(locks), HoldTracker())
    calm.run(rows, 100.0, **run)
    after = calm.run([r for r in rows if r.granted], 101.0, **run)
    assert [(s.blocked_holders, s.blocked_holder_wait_seconds) for s in after.locks] == [(0, 0.0)] * 3
    assert (after.unnamed[0].blocked_holders, after.blocked, after.waiting_pids) == (0, (), frozenset())


def test_blocked_holder_info_names_each_blocked_holder_once_the_longest_waits_within_the_caps() -> None:
    locks = (_lock(0, "five", keys.BigintKey(5)), _lock(1, "tenants", keys.NamespaceFamily(42)),
             _lock(2, "six", keys.BigintKey(6)))
    pair = lambda low: (42 << 32) | low  # noqa: E731 - an int4 pair (42, low) as pg_locks' 64 bits
    rows = [
        _row(10, [5], app="short-wait"), _waits(10, "relation", keys=[None], relation=16384, wait=0.75),
        _row(11, [5], app="long-wait"), _waits(11, "transactionid", keys=[731], datname=None, wait=9.5),
        _row(12, [5], app="not-blocked"),
        # A family's holder of two keys, the older (42, 2): one series, with that key.
        _row(20, [pair(1)], objsubid=PAIR, app="tenant-job", state="idle in transaction"),
        _row(20, [pair(2)], objsubid=PAIR, shared=True, app="tenant-job",
             state="idle in transaction", idle=30.0),
        _waits(20, "relation", keys=[None], relation=16385, wait=2.0),
        _row(30, [6]), _waits(30, "relation", keys=[None], relation=16385, wait=1.0),
    ]
    result = Assembler(locks, KeyMatcher(locks), HoldTracker()).run(rows, 100.0, CAPS)
    five, tenants, six = result.locks
    assert [(h.pid, h.application_name, h.key) for h in five.blocked_info] == [(10, "short-wait", "5"), (11, "long-wait", "5")]
    assert [(h.pid, h.key) for h in tenants.blocked_info] == [(20, "42,2")]
    assert (tenants.blocked_holders, len(tenants.info_holders)) == (1, 2)  # holder_info still shows both keys
    assert [h.pid for h in six.blocked_info] == [30]
    # The caps: the longest wait of a lock first; the total runs out in the locks' order.
    capped = Assembler(locks, KeyMatcher(locks), HoldTracker()).run(rows, 100.0, Caps(1, 2, 4))
    assert [[h.pid for h in lock.blocked_info] for lock in capped.locks] == [[11], [20], []]
    # The counts count every one: six's blocked holder has no series, so PgAdvisoryLockHolderBlocked's
    # second arm (blocked_holders without blocked_holder_info) fires for it (alerts/tests.yml).
    assert [lock.blocked_holders for lock in capped.locks] == [2, 1, 1]
    # Nobody waits any more: no series.
    assembler = Assembler(locks, KeyMatcher(locks), HoldTracker())
    assembler.run(rows, 100.0, CAPS)
    calm = assembler.run([r for r in rows if r.granted], 101.0, CAPS)
    assert [lock.blocked_info for lock in calm.locks] == [(), (), ()]


def test_a_family_holder_waiting_for_another_key_of_its_family_is_its_own_locks_waiter_and_blocked_holder() -> None:
    # What PgAdvisoryLockHolderBlocked's text says of pg_advisory_lock_waiters: a blocked holder's
    # own wait counts when it waits for a key of the lock, so the alert may fire with nobody else
    # waiting. (Left counted: WaitersPilingUp must still see a wait for a family's key.)
    locks = (_lock(0, "tenants", keys.NamespaceFamily(42)),)
    pair = lambda low: (42 << 32) | low  # noqa: E731 - an int4 pair (42, low) as pg_locks' 64 bits
    rows = [
        _row(20, [pair(2)], objsubid=PAIR, app="tenant-job"),
        _row(20, [pair(3)], objsubid=PAIR, granted=False, app="tenant-job", wait=4.0),  # held by 21
        _row(21, [pair(3)], objsubid=PAIR, app="other-tenant-job"),
    ]
    (tenants,) = Assembler(locks, KeyMatcher(locks), HoldTracker()).run(rows, 100.0, CAPS).locks
    assert (tenants.waiters, tenants.blocked_holders) == (1, 1)
    assert [(w.pid, w.key) for w in tenants.waiting] == [(20, "42,3")]  # the only waiter is the blocked holder
    assert [(h.pid, h.key) for h in tenants.blocked_info] == [(20, "42,2")]


def test_a_stranded_locks_release_is_the_soonest_its_pooler_frees_one_of_its_connections() -> None:
    locks = (_lock(0, "five", keys.BigintKey(5)), _lock(1, "six", keys.BigintKey(6)),
             _lock(2, "seven", keys.BigintKey(7)))

    def link(seconds: float | None, pid: int, mode: str = "transaction") -> ServerLink:
        release = None if seconds is None else Release(seconds, "server_lifetime", pid)
        return ServerLink("pgb", mode, None, release)

    view = PoolerView(by_backend={
        (60, 6000): link(120.0, 60), (61, 6001): link(30.0, 61), (62, 6002): link(None, 62),
        (63, 6003): link(10.0, 63), (64, 6004): link(45.0, 64), (65, 6005): link(5.0, 65, mode="session"),
    })
    stranded = {"outside": True, "state": "idle"}
    rows = [
        _row(60, [5, 77], port=6000, **stranded), _row(61, [5], port=6001, **stranded),
        _row(62, [6], port=6002, **stranded),  # its pooler does not say when: no release from it
        _row(63, [6], port=6003),  # in its client's transaction: not stranded, its release is not the lock's
        _row(64, [6], port=6004, **stranded),
        _row(65, [7], port=6005, **stranded),  # a session pool's connection: its client still owns the lock
    ]
    assembler = Assembler(locks, KeyMatcher(locks), HoldTracker())
    result = assembler.run(rows, 100.0, CAPS, view=view)
    assert result.releases == {0: Release(30.0, "server_lifetime", 61), 1: Release(45.0, "server_lifetime", 64),
                               "postgres": Release(120.0, "server_lifetime", 60)}
    assert result.backend_releases == {pid: Release(s, "server_lifetime", pid) for pid, s in ((60, 120.0), (61, 30.0),
                                                                                              (64, 45.0))}
    # Read again at each poll from the console, never remembered: the same holds, a later read.
    later = PoolerView(by_backend={**view.by_backend, (61, 6001): link(None, 61), (60, 6000): link(110.0, 60)})
    again = assembler.run(rows, 110.0, CAPS, view=later)
    assert again.releases == {0: Release(110.0, "server_lifetime", 60), 1: Release(45.0, "server_lifetime", 64),
                              "postgres": Release(110.0, "server_lifetime", 60)}
    assert set(again.backend_releases) == {60, 64}
    # Without a pooler's console there is no release at all.
    plain = Assembler(locks, KeyMatcher(locks), HoldTracker()).run(rows, 100.0, CAPS)
    assert (plain.releases, plain.backend_releases) == ({}, {})


def test_a_lock_nobody_changed_keeps_its_state_and_any_change_makes_a_new_one() -> None:
    """The Assembler's contract: an unchanged lock is its last state, the very same object (the
    exposition then keeps its text); a change of its holders, waiters, caps or pooling is a new one."""
    locks = (_lock(0, "five", keys.BigintKey(5)), _lock(1, "six", keys.BigintKey(6)),
             _lock(2, "seven", keys.BigintKey(7), expect_every=3600.0))  # a cron's lock, taken hourly
    assembler = Assembler(locks, KeyMatcher(locks), HoldTracker())

    def poll(now: float, *more: Row, reverse: bool = False, caps: Caps = CAPS,
             view: PoolerView | None = None) -> tuple[LockState, ...]:
        # Session 10 idle since 50 (each poll proves that same start again), 20 active.
        idle = {"backend_start": 1.0, "state": "idle", "idle": now - 50.0}
        rows = [_row(10, [1000, 5, 77][::-1 if reverse else 1], **idle), _row(10, [5], shared=True, **idle),
                _row(20, [6], backend_start=2.0), *more]
        return assembler.run(rows[::-1] if reverse else rows, now, caps, view=view).locks

    first = poll(100.0)
    # The same rows in another order, the keys in each row's array too: nothing changed.
    same = poll(101.0, reverse=True)
    assert all(now is then for now, then in zip(same, first, strict=True))
    assert same[0].held_since == 50.0 and same[0].info_holders[0].modes == BOTH
    # A new holder of six: six is new, five and seven are kept.
    joined = poll(102.0, _row(30, [6], backend_start=3.0))
    assert (joined[0] is first[0], joined[1] is first[1], joined[2] is first[2]) == (True, False, True)
    assert (joined[1].exclusive, joined[1].acquisitions) == (2, 1)
    # A lock with a waiter is made anew at each poll (the wait grows); gone, it is remembered again.
    waited = [poll(now, _row(40, [7], granted=False, wait=now - 102.5))[2] for now in (103.0, 104.0, 105.0)]
    assert [s.wait_seconds for s in waited] == [0.5, 1.5, 2.5] and waited[1] is not waited[0]
    free = [poll(now)[2] for now in (106.0, 107.0)]
    assert (free[0].waiters, free[0].expect_every) == (0, 3600.0) and free[1] is free[0]
    # Another holder_info limit, or a pooler's console configured: new states of the same holds.
    capped = poll(108.0, caps=Caps(1, 40, 4))
    assert capped[0] is not first[0] and capped[0]._replace(info_holders=first[0].info_holders) == first[0]
    pooled = poll(109.0, caps=Caps(1, 40, 4), view=PoolerView())
    assert pooled[0] is not capped[0]
    assert (pooled[0].pooled_session_holders, capped[0].pooled_session_holders) == (0, None)


def test_who_waits_is_named_longest_first_and_bounded() -> None:
    """A pile-up is a count and the WAITERS_NAMED longest waits, never every waiter's name; a
    lock nobody waits for any more names nobody (its state is remembered without waiters)."""
    locks = (_lock(0, "leader", keys.BigintKey(5)),)
    assembler = Assembler(locks, KeyMatcher(locks), HoldTracker())
    caps = Caps(per_lock=2, total=5, unnamed_per_database=1)
    holder = _row(10, [5], backend_start=1.0, app="leader")
    waiting = [_row(100 + n, [5], granted=False, wait=float(n), app=f"pod-{n}", addr="10.0.0.9")
               for n in range(WAITERS_NAMED + 2)]
    state = assembler.run([holder, *waiting], 100.0, caps).locks[0]
    assert state.waiters == WAITERS_NAMED + 2
    longest = range(WAITERS_NAMED + 1, 1, -1)
    assert state.waiting == tuple(Waiter(100 + n, f"pod-{n}", "u", "10.0.0.9", float(n), "5") for n in longest)
    assert assembler.run([holder], 101.0, caps).locks[0].waiting == ()


def test_a_waiter_through_a_pooler_is_named_by_its_client() -> None:
    """A waiter is inside its lock call, so inside its client's transaction: through a transaction
    pool the waiter named is the client the pooler lends the backend to, not the backend's names."""
    locks = (_lock(0, "leader", keys.BigintKey(5)),)
    view = PoolerView(by_backend={(60, 6000): ServerLink("pgb", "transaction", Client("10.9.9.9", "cu", "client-app"))})
    rows = [_row(10, [5], backend_start=1.0, app="leader"),
            _row(60, [5], granted=False, wait=2.0, port=6000, app="last-borrower", addr="10.0.0.5")]
    state = Assembler(locks, KeyMatcher(locks), HoldTracker()).run(rows, 100.0, Caps(2, 5, 1), view=view).locks[0]
    assert state.waiting == (Waiter(60, "client-app", "cu", "10.9.9.9", 2.0, "5", "pgb"),)
