"""The assembler remembers the last poll: what did not change is not recomputed, and what it
returns is what assembling each poll from scratch returns."""

from __future__ import annotations

import random
from collections import namedtuple

from exporter.assemble import Assembler, Caps, KeyMatcher
from exporter.config import parse_config
from exporter.resolve import resolve_locks
from exporter.tracker import HoldTracker
from tests.metrics_util import value

CAPS = Caps(per_lock=3, total=40, unnamed_per_database=4)
# The columns of queries.POLL, in its order (idle_seconds last).
Row = namedtuple("Row", "datname pid objsubid granted shared keys backend_start application_name usename client_addr "
                        "client_port state outside_transaction wait_seconds idle_seconds")


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
    assert 10.0 <= value(second, "pg_advisory_lock_held_seconds", **ids("steady")) < 11.0  # (idle: proven a bit earlier)
    # A changed session's locks are assembled anew, the unchanged session's holds keep their start.
    assert again["tenants"] is not by_name["tenants"] and again["tenants"].holds == 2
    assert 10.0 <= value(second, "pg_advisory_lock_held_seconds", **ids("tenants")) < 11.0
    assert value(second, "pg_advisory_lock_acquisitions_total", **ids("tenants")) == 1
    assert value(second, "pg_advisory_lock_holders", **ids("moving"), mode="exclusive") == 1
    # A session that ends takes its holds with it.
    moving.execute("SELECT pg_advisory_unlock_all()")
    now[0] += 1.0
    third = poller.poll_once()
    assert value(third, "pg_advisory_lock_holders", **ids("moving"), mode="exclusive") == 0
    assert value(third, "pg_advisory_lock_keys_held", **ids("tenants")) == 1


def _random_polls(rng: random.Random, polls: int) -> list[list[Row]]:
    """Polls of a few sessions that keep, drop, take and re-mode keys, go idle and come back,
    some waiting; keys named, in a family and unnamed, in two databases."""
    sessions = {pid: (float(pid), {}) for pid in range(1, 9)}
    states = {pid: ("active", 0.0) for pid in sessions}  # (state, state_change)
    out = []
    for n in range(polls):
        now = 100.0 + n
        for pid, (start, held) in list(sessions.items()):
            if rng.random() < 0.3:  # the session's state changed since the last poll
                states[pid] = (rng.choice(["idle", "active", "idle in transaction"]), now - rng.uniform(0.0, 0.9))
            roll = rng.random()
            if roll < 0.1:  # the session ends; a new one takes its pid
                sessions[pid] = (start + 100.0, {})
                continue
            if roll < 0.5:  # some keys change
                for _ in range(rng.randint(1, 3)):
                    key = (rng.choice(["postgres", "other"]), rng.choice([1, 2]), rng.choice([5, 6, 7, 1000, 1001, (42 << 32) | 3, (42 << 32) | 4]))
                    if key in held and rng.random() < 0.5:
                        del held[key]
                    else:
                        held[key] = rng.choice(["exclusive", "shared", "both"])
        rows = []
        for pid, (start, held) in sessions.items():
            state, changed_at = states[pid]
            idle = now - changed_at if state.startswith("idle") else None
            groups: dict[tuple[str, int, bool], list[int]] = {}
            for (database, objsubid, key), mode in sorted(held.items()):
                for shared in ((False, True) if mode == "both" else (mode == "shared",)):
                    groups.setdefault((database, objsubid, shared), []).append(key)
            for (database, objsubid, shared), keys in groups.items():
                rows.append(Row(database, pid, objsubid, True, shared, keys, start, f"app-{pid}", "u", "10.0.0.1", 5000 + pid,
                                state, state == "idle", None, idle))
            if rng.random() < 0.2:
                rows.append(Row("postgres", pid, 1, False, False, [rng.choice([5, 1000])], start, f"app-{pid}", "u",
                                "10.0.0.1", 5000 + pid, "active", False, rng.choice([0.5, 2.0]), None))
        rng.shuffle(rows)
        out.append(rows)
    return out


def test_remembering_the_last_poll_gives_what_assembling_from_scratch_gives() -> None:
    config = parse_config({"dsn": "postgresql://x@localhost/postgres", "locks": [
        {"name": "five", "key": 5}, {"name": "six", "key": 6}, {"name": "six-other", "key": 6, "database": "other"},
        {"name": "tenants", "key": {"namespace": 42}}, {"name": "low", "key": {"range": [1000, 1001]}},
    ]}, "test")
    locks = resolve_locks(config, "postgres", {}, ())  # integer keys and families: nothing to ask a server
    for seed in range(3):
        rng = random.Random(seed)
        remembering_tracker, scratch_tracker = HoldTracker(max_tracked=30), HoldTracker(max_tracked=30)
        assembler = Assembler(locks, KeyMatcher(locks), remembering_tracker)
        for n, rows in enumerate(_random_polls(rng, 100)):
            now = 100.0 + n  # as _random_polls' clock
            remembered = assembler.run(rows, now, CAPS)
            scratch = Assembler(locks, KeyMatcher(locks), scratch_tracker).run(rows, now, CAPS)  # remembers nothing
            assert remembered == scratch, f"seed {seed}, poll {n}"
            assert (remembering_tracker.tracked, remembering_tracker.dropped) == \
                (scratch_tracker.tracked, scratch_tracker.dropped)
