"""held_seconds against a real server, as docs/metrics.md's "Hold age" defines it: now minus the start of the
earliest hold of that session and key from which every poll saw it held, a start being known only
as its first sighting or what pg_stat_activity proves. A re-take between two polls keeps the age; a
re-take a poll saw free starts anew; time a poll saw a session wait is never held time.

Ages are compared with the server's own clock (clock_timestamp() around what the test does), or
with the poller's injected clock; no test times a sleep.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import psycopg
import pytest

from exporter.poller import Poller
from exporter.snapshot import Snapshot
from tests.conftest import Sessions, wait_until
from tests.metrics_util import value

KEY = 4243
OTHER = 4244
LOCKS = [{"name": "job", "key": KEY}, {"name": "other", "key": OTHER}]
# held_seconds is written to the millisecond: a difference of half of one is rounding, not a lie.
ROUNDING = 0.0005


def held(snap: Snapshot, name: str = "job") -> float:
    age = value(snap, "pg_advisory_lock_held_seconds", lock=name, database="postgres")
    assert age is not None
    return age


def server_time(conn: psycopg.Connection) -> float:
    row = conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()
    assert row is not None
    return float(row[0])


def waited(conn: psycopg.Connection, pid: int, seconds: float) -> bool:
    """Whether pid has waited for a lock at least this long, by the server's clock."""
    row = conn.execute("SELECT coalesce(max(extract(epoch FROM clock_timestamp() - waitstart)), 0) FROM pg_locks "
                       "WHERE pid = %s AND NOT granted", [pid]).fetchone()
    return row is not None and row[0] >= seconds


class Waiter:
    """A session that runs one statement in a thread of its own (a lock call that waits)."""

    def __init__(self, conn: psycopg.Connection, statement: str) -> None:
        self.conn = conn
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(statement,), daemon=True)
        self._thread.start()

    def _run(self, statement: str) -> None:
        try:
            self.conn.execute(statement)
        except BaseException as exc:  # noqa: BLE001 - the test asserts it did not happen
            self.error = exc

    def join(self) -> None:
        self._thread.join(10)
        assert not self._thread.is_alive() and self.error is None, self.error


@pytest.fixture
def watch(sessions: Sessions) -> Iterator[psycopg.Connection]:
    """A session of the test's own that reads the server's clock and pg_locks."""
    yield sessions.open(application_name="watch")


def wait_behind(watch: psycopg.Connection, waiter: psycopg.Connection, statement: str, seconds: float = 0.3) -> Waiter:
    """waiter runs statement, which waits; returned once it has waited `seconds` (server clock)."""
    started = Waiter(waiter, statement)
    wait_until(lambda: waited(watch, waiter.info.backend_pid, seconds))
    return started


def unlock(conn: psycopg.Connection, key: int = KEY) -> float:
    """Let go of the key; the server's clock before it did: whoever waited is granted after this."""
    row = conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8, pg_advisory_unlock(%s::int8)",
                       [key]).fetchone()
    assert row is not None and row[1] is True
    return float(row[0])


def poll_and_age(poller: Poller, watch: psycopg.Connection, since: float, name: str = "job") -> tuple[float, float]:
    """(held_seconds of the poll, the most it may be: the server's time after the poll minus since)."""
    snap = poller.poll_once()
    assert snap.up
    return held(snap, name), server_time(watch) - since


# -- waiting is never held time ---------------------------------------------------------------


def test_a_waiter_granted_and_idle_is_aged_from_its_grant_not_its_wait(make_poller, sessions, watch) -> None:
    poller = make_poller({"locks": LOCKS})
    holder, waiter = sessions.open(application_name="holder"), sessions.open(application_name="waiter")
    holder.execute("SELECT pg_advisory_lock(%s::int8)", [KEY])
    wait = wait_behind(watch, waiter, f"SELECT pg_advisory_lock({KEY}::int8)")
    snap = poller.poll_once()  # sees it wait
    assert value(snap, "pg_advisory_lock_waiters", lock="job", database="postgres") == 1
    freed = unlock(holder)
    wait.join()  # granted, and idle since its statement ended: after the grant
    age, most = poll_and_age(poller, watch, freed)
    assert age <= most + ROUNDING, f"held {age} s, but the key was granted less than {most} s ago after a wait"


def test_a_transaction_lock_granted_after_a_wait_is_aged_from_its_grant(make_poller, sessions, watch) -> None:
    poller = make_poller({"locks": LOCKS})
    holder = sessions.open(application_name="holder")
    waiter = sessions.open(application_name="waiter", autocommit=False)
    holder.execute("SELECT pg_advisory_lock(%s::int8)", [KEY])
    waiter.execute("SELECT 1")  # idle in transaction since before the wait
    wait = wait_behind(watch, waiter, f"SELECT pg_advisory_xact_lock({KEY}::int8)")
    poller.poll_once()
    freed = unlock(holder)
    wait.join()
    age, most = poll_and_age(poller, watch, freed)
    assert age <= most + ROUNDING
    waiter.rollback()


def test_a_holder_that_waits_for_a_second_key_ages_each_key_from_its_own_grant(make_poller, sessions, watch) -> None:
    poller = make_poller({"locks": LOCKS})
    holder, waiter = sessions.open(application_name="holder"), sessions.open(application_name="waiter")
    waiter.execute("SELECT pg_advisory_lock(%s::int8)", [OTHER])
    taken = server_time(watch)
    holder.execute("SELECT pg_advisory_lock(%s::int8)", [KEY])
    wait = wait_behind(watch, waiter, f"SELECT pg_advisory_lock({KEY}::int8)")
    poller.poll_once()  # the first key held, the second awaited
    freed = unlock(holder)
    wait.join()
    snap = poller.poll_once()
    after = server_time(watch)
    assert held(snap, "job") <= after - freed + ROUNDING
    assert held(snap, "other") <= after - taken + ROUNDING


def test_a_waiter_seen_by_the_exporters_first_poll_is_aged_from_its_grant(make_poller, sessions, watch) -> None:
    holder, waiter = sessions.open(application_name="holder"), sessions.open(application_name="waiter")
    holder.execute("SELECT pg_advisory_lock(%s::int8)", [KEY])
    wait = wait_behind(watch, waiter, f"SELECT pg_advisory_lock({KEY}::int8), pg_sleep(0)")
    poller = make_poller({"locks": LOCKS})
    poller.poll_once()
    freed = unlock(holder)
    wait.join()
    age, most = poll_and_age(poller, watch, freed)
    assert age <= most + ROUNDING


def test_a_prepared_transaction_is_aged_from_its_prepare_not_from_the_wait_before_it(
        make_poller, sessions, watch) -> None:
    poller = make_poller({"locks": LOCKS})
    holder = sessions.open(application_name="holder")
    preparer = sessions.open(application_name="preparer", autocommit=False)
    holder.execute("SELECT pg_advisory_lock(%s::int8)", [KEY])
    wait = wait_behind(watch, preparer, f"SELECT pg_advisory_xact_lock({KEY}::int8)")
    poller.poll_once()
    freed = unlock(holder)
    wait.join()
    preparer.execute("PREPARE TRANSACTION 'hold-age-after-wait'")
    try:
        age, most = poll_and_age(poller, watch, freed)
        assert age <= most + ROUNDING
    finally:
        watch.execute("ROLLBACK PREPARED 'hold-age-after-wait'")


def test_a_session_holding_a_key_shared_keeps_its_age_through_its_wait_for_it_exclusive(
        make_poller, sessions, watch) -> None:
    """The session holds the key all along (one hold of a session and key, whatever its mode)."""
    now = [1000.0]
    poller = make_poller({"locks": LOCKS}, clock=lambda: now[0])
    reader, session = sessions.open(application_name="reader"), sessions.open(application_name="session")
    session.execute("SELECT pg_advisory_lock_shared(%s::int8), pg_sleep(0)", [KEY])
    reader.execute("SELECT pg_advisory_lock_shared(%s::int8)", [KEY])
    poller.poll_once()  # first seen at 1000
    now[0] += 10.0
    wait = wait_behind(watch, session, f"SELECT pg_advisory_lock({KEY}::int8)")
    poller.poll_once()  # holds it shared, waits for it exclusive
    now[0] += 10.0
    reader.execute("SELECT pg_advisory_unlock_shared(%s::int8)", [KEY])
    wait.join()
    session.execute("SELECT pg_advisory_unlock_shared(%s::int8)", [KEY])
    assert held(poller.poll_once()) >= 20.0


# -- re-takes ----------------------------------------------------------------------------------


def test_a_retake_between_two_polls_keeps_the_age(make_poller, sessions) -> None:
    now = [1000.0]
    poller = make_poller({"locks": LOCKS}, clock=lambda: now[0])
    worker = sessions.open(application_name="worker")
    worker.execute("SELECT pg_advisory_lock(%s::int8), pg_sleep(0)", [KEY])
    poller.poll_once()  # first seen at 1000
    now[0] += 30.0
    worker.execute("SELECT pg_advisory_unlock(%s::int8)", [KEY])
    worker.execute("SELECT pg_advisory_lock(%s::int8)", [KEY])
    # Both holds were seen by every poll: one hold of that session and key, for alerting a hog.
    assert held(poller.poll_once()) >= 30.0


def test_a_retake_between_two_polls_after_a_wait_keeps_the_age(make_poller, sessions, watch) -> None:
    """What happens between two polls is not seen: a release, someone else's hold, a wait and a
    re-take between them are one hold of that session and key."""
    now = [1000.0]
    poller = make_poller({"locks": LOCKS}, clock=lambda: now[0])
    worker, other = sessions.open(application_name="worker"), sessions.open(application_name="other")
    worker.execute("SELECT pg_advisory_lock(%s::int8), pg_sleep(0)", [KEY])
    poller.poll_once()
    now[0] += 30.0
    worker.execute("SELECT pg_advisory_unlock(%s::int8)", [KEY])
    other.execute("SELECT pg_advisory_lock(%s::int8)", [KEY])
    wait = wait_behind(watch, worker, f"SELECT pg_advisory_lock({KEY}::int8)", seconds=0.05)
    unlock(other)
    wait.join()
    assert held(poller.poll_once()) >= 30.0


def test_a_retake_a_poll_saw_free_starts_anew(make_poller, sessions) -> None:
    now = [1000.0]
    poller = make_poller({"locks": LOCKS}, clock=lambda: now[0])
    worker = sessions.open(application_name="worker")
    worker.execute("SELECT pg_advisory_lock(%s::int8), pg_sleep(0)", [KEY])
    poller.poll_once()
    now[0] += 30.0
    worker.execute("SELECT pg_advisory_unlock(%s::int8)", [KEY])
    assert held(poller.poll_once()) == 0  # seen free
    now[0] += 30.0
    worker.execute("SELECT pg_advisory_lock(%s::int8)", [KEY])
    # Taken again after a poll saw it free: a new hold, idle for a moment (the server's clock), so
    # far less than the 30 s of the poller's clock since the free poll.
    assert held(poller.poll_once()) < 5.0


def test_a_retake_a_poll_saw_the_session_wait_for_starts_anew(make_poller, sessions, watch) -> None:
    now = [1000.0]
    poller = make_poller({"locks": LOCKS}, clock=lambda: now[0])
    worker, other = sessions.open(application_name="worker"), sessions.open(application_name="other")
    worker.execute("SELECT pg_advisory_lock(%s::int8), pg_sleep(0)", [KEY])
    poller.poll_once()
    now[0] += 30.0
    worker.execute("SELECT pg_advisory_unlock(%s::int8)", [KEY])
    other.execute("SELECT pg_advisory_lock(%s::int8)", [KEY])
    wait = wait_behind(watch, worker, f"SELECT pg_advisory_lock({KEY}::int8)", seconds=0.05)
    snap = poller.poll_once()  # the worker waits: not a holder
    assert value(snap, "pg_advisory_lock_waiters", lock="job", database="postgres") == 1
    now[0] += 30.0
    unlock(other)
    wait.join()
    assert held(poller.poll_once()) < 5.0

