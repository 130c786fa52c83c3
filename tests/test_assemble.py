"""The assembler remembers the last poll: what did not change is not recomputed, and what it
returns is what assembling each poll from scratch returns."""

from __future__ import annotations

import random
from collections import namedtuple

from exporter import queries
from exporter.assemble import Assembler, Caps
from exporter.matching import KeyMatcher
from exporter.config import parse_config
from exporter.pooled import Client, PoolerView, ServerLink
from exporter.naming import resolve_locks
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
    for (database, objsubid, shared), keys in groups.items():
        rng.shuffle(keys)  # the server promises no order inside array_agg
        if holder.pid is None:  # a prepared transaction: no session, its gid and owner
            rows.append(row(datname=database, prepared_xid=holder.xid, objsubid=objsubid, granted=True, shared=shared,
                            keys=keys, application_name=f"gid-{holder.xid}", usename="u", state="prepared",
                            idle_seconds=now - holder.changed_at + latency))
            continue
        idle = now - holder.changed_at + latency if holder.state.startswith("idle") else None
        rows.append(row(datname=database, pid=holder.pid, objsubid=objsubid, granted=True, shared=shared, keys=keys,
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
        for n, (rows, view, caps) in enumerate(_random_polls(rng, 150)):
            now = 100.0 + n  # as _random_polls' clock
            remembered = assembler.run(rows, now, caps, view=view)
            scratch = Assembler(locks, KeyMatcher(locks), scratch_tracker).run(rows, now, caps, view=view)  # remembers nothing
            assert remembered == scratch, f"seed {seed}, poll {n}"
            assert (remembering_tracker.tracked, remembering_tracker.dropped) == \
                (scratch_tracker.tracked, scratch_tracker.dropped)
            shapes.update(_shapes(remembered, rows, view))
    # The random polls really made every shape the assembler must agree on.
    assert shapes >= {"prepared", "blocked holder", "blocked unnamed", "pooled", "stranded", "waiter", "family",
                      "capped", "no backend_start", "both modes"}, shapes


def _shapes(result, rows, view) -> set[str]:
    found = {"prepared" for r in rows if r.pid is None} | {"no backend_start" for r in rows if r.backend_start is None
                                                               and r.pid is not None}
    found |= {"blocked holder" for lock in result.locks if lock.blocked_holders}
    found |= {"blocked unnamed" for u in result.unnamed if u.blocked_holders}
    found |= {"waiter" for lock in result.locks if lock.waiters}
    found |= {"family" for lock in result.locks if lock.keys_held}
    found |= {"capped" for lock in result.locks if len(lock.info_holders) < lock.holds}
    found |= {"both modes" for lock in result.locks for h in lock.info_holders if len(h.modes) == 2}
    if view is not None:
        found.add("pooled")
        found |= {"stranded" for lock in result.locks if lock.pooled_session_holders}
    return found
