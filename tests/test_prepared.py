"""Prepared transactions (PREPARE TRANSACTION) hold their locks with pid NULL: each is a holder of
its own, known by its transaction id, named by its gid, aged from when it was prepared."""

from __future__ import annotations

import threading
import time

import psycopg

from exporter import landing, locksview
from exporter.config import parse_config
from exporter.metrics import render
from exporter.poller import Poller, connect_poller
from exporter.snapshot import ReloadStatus, Snapshot
from tests.conftest import wait_until
from tests.metrics_util import series, value

LOCKS = [{"name": "session", "key": 78}, {"name": "prepared", "key": 77}, {"name": "shared", "key": 79}]


def ids(name: str) -> dict[str, str]:
    return {"lock": name, "database": "postgres"}


def prepare(dsn: str, gid: str, take: str) -> None:
    """A transaction that takes locks and is prepared: its session ends, its locks stay."""
    with psycopg.connect(dsn, application_name=f"preparer-{gid}") as conn:
        conn.execute(f"SELECT {take}")
        conn.execute(f"PREPARE TRANSACTION '{gid}'")


def one_poll(dsn: str) -> Snapshot:
    """One poll of LOCKS by a poller of its own."""
    poller = Poller(parse_config({"dsn": dsn, "poll_interval": "1s", "locks": LOCKS}, "t"),
                    connect=connect_poller, publish=lambda s: None)
    try:
        return poller.poll_once()
    finally:
        poller.close()


def waiting_for_anything(dsn: str) -> set[int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return {r[0] for r in conn.execute("SELECT pid FROM pg_locks WHERE NOT granted AND pid IS NOT NULL").fetchall()}


def end_prepared(dsn: str, *gids: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for gid in gids:
            conn.execute(f"ROLLBACK PREPARED '{gid}'")


def check_prepared_transactions_are_holders(dsn: str) -> None:
    """The issue's reproduction, then what a prepared holder must look like (any major)."""
    config = parse_config({"dsn": dsn, "poll_interval": "1s", "locks": LOCKS}, "t")
    poller = Poller(config, connect=connect_poller, publish=lambda s: None)
    with psycopg.connect(dsn, autocommit=True, application_name="session-holder") as holder:
        try:
            holder.execute("SELECT pg_advisory_lock(78)")
            assert poller.poll_once().up  # a baseline: holders at the first poll are not acquisitions
            with psycopg.connect(dsn, application_name="preparer") as preparer:
                preparer.execute("SELECT pg_advisory_xact_lock(77)")
                seen = poller.poll_once()  # the session takes it: one acquisition
                assert value(seen, "pg_advisory_lock_acquisitions_total", **ids("prepared")) == 1
                preparer.execute("PREPARE TRANSACTION 'x'")
            prepare(dsn, "reader-1", "pg_advisory_xact_lock_shared(79)")
            prepare(dsn, "reader-2", "pg_advisory_xact_lock_shared(79)")
            time.sleep(1.0)
            snap = poller.poll_once()
            assert snap.up, "a prepared transaction's lock (pid NULL) must not fail the poll"
            assert value(snap, "pg_advisory_lock_holders", **ids("session"), mode="exclusive") == 1
            assert value(snap, "pg_advisory_lock_holders", **ids("prepared"), mode="exclusive") == 1
            # A PREPARE moves the hold: it is not a new acquisition.
            assert value(snap, "pg_advisory_lock_acquisitions_total", **ids("prepared")) == 1
            # Each prepared transaction is a holder of its own, never merged with another.
            assert value(snap, "pg_advisory_lock_holders", **ids("shared"), mode="shared") == 2
            # Its age is proven from pg_prepared_xacts.prepared: a poller that started after the PREPARE knows it too.
            fresh = Poller(config, connect=connect_poller, publish=lambda s: None)
            try:
                late = fresh.poll_once()
            finally:
                fresh.close()
            assert value(late, "pg_advisory_lock_held_seconds", **ids("shared")) >= 1.0
            info = {h["lock"] + ":" + h["application_name"]: h for h in series(render(snap).decode(),
                                                                               "pg_advisory_lock_holder_info")}
            assert info["prepared:x"] == {
                "lock": "prepared", "database": "postgres", "key": "77", "pid": "", "application_name": "x",
                "usename": "postgres", "client_addr": "", "state": "prepared", "source": "config", "pooler": "",
            }
            assert {"shared:reader-1", "shared:reader-2"} <= info.keys()
            page = landing.render(snap, (), ReloadStatus(), "/metrics").decode()
            assert "ROLLBACK PREPARED &#x27;x&#x27;" in page and "COMMIT PREPARED &#x27;reader-1&#x27;" in page
            rows = [r for r in locksview.read_locks(config) if r.pid is None]
            assert sorted((r.name, r.application_name, r.state) for r in rows) == [
                ("prepared", "x", "prepared"), ("shared", "reader-1", "prepared"), ("shared", "reader-2", "prepared")]
            assert "ROLLBACK PREPARED 'x'" in locksview.format_table(rows)
        finally:
            with psycopg.connect(dsn, autocommit=True) as conn:
                for (gid,) in conn.execute("SELECT gid FROM pg_prepared_xacts").fetchall():
                    conn.execute(f"ROLLBACK PREPARED '{gid}'")
        after = poller.poll_once()
        assert value(after, "pg_advisory_lock_holders", **ids("prepared"), mode="exclusive") == 0
        assert value(after, "pg_advisory_lock_holders", **ids("shared"), mode="shared") == 0
    poller.close()


def test_prepared_transactions_are_holders(server) -> None:
    check_prepared_transactions_are_holders(server.dsn())


def test_a_prepared_transaction_with_subtransactions_is_one_holder_named_by_its_gid(server) -> None:
    # Locks taken in savepoints, with writes that give the subtransactions ids of their own: whatever
    # transaction ids the prepared transaction keeps, it is one holder, named by its gid, aged from
    # the PREPARE.
    dsn = server.dsn()
    with psycopg.connect(dsn, autocommit=True) as setup:
        setup.execute("DROP TABLE IF EXISTS ledger_sub; CREATE TABLE ledger_sub (id int)")
    try:
        with psycopg.connect(dsn, application_name="preparer") as conn:
            conn.execute("SAVEPOINT a")
            conn.execute("INSERT INTO ledger_sub VALUES (1)")  # the first id is a subtransaction's
            conn.execute("SELECT pg_advisory_xact_lock(77)")
            conn.execute("RELEASE SAVEPOINT a")
            conn.execute("INSERT INTO ledger_sub VALUES (2)")
            conn.execute("SAVEPOINT b")
            conn.execute("INSERT INTO ledger_sub VALUES (3)")
            conn.execute("SELECT pg_advisory_xact_lock_shared(79)")
            conn.execute("PREPARE TRANSACTION 'with-savepoints'")
        time.sleep(1.0)
        snap = one_poll(dsn)
        assert value(snap, "pg_advisory_lock_holders", **ids("prepared"), mode="exclusive") == 1
        assert value(snap, "pg_advisory_lock_holders", **ids("shared"), mode="shared") == 1
        assert value(snap, "pg_advisory_lock_held_seconds", **ids("prepared")) >= 1.0
        names = {(h["lock"], h["application_name"], h["state"])
                 for h in series(render(snap).decode(), "pg_advisory_lock_holder_info")}
        assert names == {("prepared", "with-savepoints", "prepared"), ("shared", "with-savepoints", "prepared")}
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for (gid,) in conn.execute("SELECT gid FROM pg_prepared_xacts").fetchall():
                conn.execute(f"ROLLBACK PREPARED '{gid}'")


def test_a_chain_names_only_the_prepared_transactions_that_block(server, sessions) -> None:
    # A migration holding its advisory lock waits for SHARE on a table: the prepared transaction
    # that wrote to it (ROW EXCLUSIVE) blocks it; the one that only read it (ACCESS SHARE) does not,
    # and must not be named (ROLLBACK PREPARED of it would unblock nothing).
    dsn = server.dsn()
    with psycopg.connect(dsn, autocommit=True) as setup:
        setup.execute("DROP TABLE IF EXISTS ledger_chain; CREATE TABLE ledger_chain (id int)")
    migration = None
    try:
        prepare(dsn, "writer", "1; INSERT INTO ledger_chain VALUES (1)")
        prepare(dsn, "reader", "count(*) FROM ledger_chain")
        migration = sessions.open(autocommit=False, application_name="migrate")
        migration.execute("SELECT pg_advisory_lock(78)")
        pid = migration.info.backend_pid
        thread = threading.Thread(target=migration.execute, args=("LOCK TABLE ledger_chain IN SHARE MODE",), daemon=True)
        thread.start()
        wait_until(lambda: pid in waiting_for_anything(dsn))
        snap = one_poll(dsn)
        (chain,) = snap.chains
        assert chain.wait.pid == pid
        assert [(b.pid, b.prepared) for b in chain.blockers] == [(0, "'writer'")]
    finally:
        end_prepared(dsn, "writer", "reader")
        if migration is not None:
            thread.join(10)
            migration.rollback()
            migration.execute("SELECT pg_advisory_unlock_all()")
            migration.commit()
