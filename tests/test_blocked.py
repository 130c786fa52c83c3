"""Why is it stuck: a holder of an advisory lock that waits itself for another lock, and who
blocks it, down to the root, on a real server: in the metrics, on the landing page (a real
browser), in `locks` and `locks --json`."""

from __future__ import annotations

import json
import threading
import time

import psycopg
import pytest

from exporter import chains as chains_module
from exporter import landing, locksview
from exporter.config import parse_config
from exporter.snapshot import ReloadStatus
from tests.conftest import wait_until, waiting_pids
from tests.exporter_proc import ExporterProcess
from exporter.metrics import render
from tests.metrics_util import parse, series, value
from tests.test_landing import chromium

LOCKS = [{"name": "migrations", "key": 4242}, {"name": "shard", "key": 7}, {"name": "tenants", "key": {"namespace": 42}}]


def ids(name: str) -> dict[str, str]:
    return {"lock": name, "database": "postgres"}


def all_waiting(server) -> set[int]:
    """Sessions waiting for a lock of any type now."""
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        return {r[0] for r in conn.execute("SELECT pid FROM pg_locks WHERE NOT granted AND pid IS NOT NULL").fetchall()}


class Deploy:
    """The 3 a.m. story: a report reads users in an open transaction; a deploy's migration takes
    its advisory lock, then waits for ACCESS EXCLUSIVE on users; two more pods wait for the lock."""

    def __init__(self, server, sessions) -> None:
        setup = sessions.open()
        setup.execute("DROP TABLE IF EXISTS users; CREATE TABLE users (id int)")
        self.report = sessions.open(autocommit=False, application_name="report-runner")
        self.report.execute("SELECT count(*) FROM users")  # its transaction stays open: AccessShareLock held
        self.migration = sessions.open(autocommit=False, application_name="migrate")
        self.migration.execute("SELECT pg_advisory_lock(4242)")
        self.threads = [threading.Thread(target=self.migration.execute, args=("LOCK TABLE users IN ACCESS EXCLUSIVE MODE",),
                                         daemon=True)]
        self.pods = [sessions.open(application_name=f"pod-{i}") for i in (2, 3)]
        self.threads += [threading.Thread(target=pod.execute, args=("SELECT pg_advisory_lock(4242)",), daemon=True)
                         for pod in self.pods]
        for thread in self.threads:
            thread.start()
        wait_until(lambda: {self.migration.info.backend_pid, *(p.info.backend_pid for p in self.pods)} <= all_waiting(server))

    def end(self) -> None:
        self.report.rollback()  # the migration gets its table, then lets go of everything
        self.threads[0].join(10)
        self.migration.rollback()
        self.migration.execute("SELECT pg_advisory_unlock_all()")
        self.migration.commit()
        # The pods get the lock in whichever order the server grants it: each lets go once it has it
        # (a pod still waiting cannot be asked to: its connection is busy with its wait).
        pending = list(zip(self.pods, self.threads[1:]))
        deadline = time.monotonic() + 20
        while pending and time.monotonic() < deadline:
            for pod, thread in list(pending):
                thread.join(0.05)
                if not thread.is_alive():
                    pod.execute("SELECT pg_advisory_unlock_all()")
                    pending.remove((pod, thread))


def test_a_migration_waiting_for_a_table_is_a_blocked_holder_with_its_chain(make_poller, server, sessions) -> None:
    deploy = Deploy(server, sessions)
    try:
        time.sleep(1.0)
        snap = make_poller({"locks": LOCKS}).poll_once()
        assert value(snap, "pg_advisory_lock_waiters", **ids("migrations")) == 2
        assert value(snap, "pg_advisory_lock_blocked_holders", **ids("migrations")) == 1
        assert value(snap, "pg_advisory_lock_blocked_holder_wait_seconds", **ids("migrations")) >= 1.0
        assert value(snap, "pg_advisory_lock_blocked_holders", **ids("shard")) == 0  # present, and 0
        # The blocked holder by name, and only it: not the pods that wait for its lock.
        assert series(render(snap).decode(), "pg_advisory_lock_blocked_holder_info") == [{
            **ids("migrations"), "key": "4242", "pid": str(deploy.migration.info.backend_pid), "application_name": "migrate",
            "usename": "postgres", "client_addr": "127.0.0.1", "state": "active", "pooler": ""}]
        (chain,) = snap.chains
        assert chain.wait.pid == deploy.migration.info.backend_pid
        assert (chain.waits_for, chain.wait.mode) == ("relation public.users", "AccessExclusiveLock")
        (root,) = chain.roots
        assert (root.pid, root.application_name, root.state) == (deploy.report.info.backend_pid, "report-runner",
                                                                 "idle in transaction")
        assert root.query == ""  # show_queries is off: no query text anywhere
        page = landing.render(snap, (), ReloadStatus(), "/metrics").decode()
        assert (f"which waits for relation public.users (AccessExclusiveLock) for 1s, blocked by pid "
                f"{deploy.report.info.backend_pid} (report-runner, postgres@127.0.0.1, idle in transaction") in page
        # With show_queries, the root's query, cut to 200 characters.
        shown = make_poller({"locks": LOCKS, "show_queries": True}).poll_once()
        assert shown.chains[0].roots[0].query == "SELECT count(*) FROM users"
        # The locks command: the chain under the holder, and in --json.
        config = parse_config({"dsn": server.dsn(), "locks": LOCKS}, "t")
        rows = locksview.read_locks(config)
        (holder,) = [r for r in rows if r.granted and r.name == "migrations"]
        assert holder.waits.startswith("waits for relation public.users (AccessExclusiveLock)")
        assert holder.chain["roots"] == [deploy.report.info.backend_pid]
        assert "which waits for relation public.users" in locksview.format_table(rows)
        assert json.loads(json.dumps([r.__dict__ for r in rows]))  # serialisable as the command prints it
    finally:
        deploy.end()


def test_a_holder_waiting_for_another_advisory_lock(make_poller, sessions, server) -> None:
    owner = sessions.open(application_name="shard-owner")
    owner.execute("SELECT pg_advisory_lock(7)")
    worker = sessions.open(application_name="worker")
    worker.execute("SELECT pg_advisory_lock(42, 1)")
    thread = threading.Thread(target=worker.execute, args=("SELECT pg_advisory_lock(7)",), daemon=True)
    thread.start()
    wait_until(lambda: worker.info.backend_pid in waiting_pids(server))
    try:
        snap = make_poller({"locks": LOCKS}).poll_once()
        assert value(snap, "pg_advisory_lock_blocked_holders", **ids("tenants")) == 1  # it holds (42, 1) and waits
        (named,) = series(render(snap).decode(), "pg_advisory_lock_blocked_holder_info")
        assert (named["lock"], named["key"], named["pid"], named["application_name"]) == \
            ("tenants", "42,1", str(worker.info.backend_pid), "worker")
        assert value(snap, "pg_advisory_lock_waiters", **ids("shard")) == 1
        (chain,) = snap.chains
        assert chain.waits_for == "advisory lock 7 in postgres"
        assert [(b.pid, b.application_name, b.waiting) for b in chain.blockers] == [
            (owner.info.backend_pid, "shard-owner", False)]
    finally:
        owner.execute("SELECT pg_advisory_unlock_all()")
        thread.join(10)
        worker.execute("SELECT pg_advisory_unlock_all()")


def test_nobody_waiting_costs_no_second_statement_and_the_series_are_0(make_poller, sessions, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(chains_module, "read_chains", lambda *a, **k: calls.append(a) or ())
    sessions.open().execute("SELECT pg_advisory_lock(4242), pg_advisory_lock(99)")
    from exporter import poller as poller_module

    monkeypatch.setattr(poller_module, "read_chains", lambda *a, **k: calls.append(a) or ())
    snap = make_poller({"locks": LOCKS}).poll_once()
    assert snap.chains == () and calls == []
    for lock in LOCKS:
        assert value(snap, "pg_advisory_lock_blocked_holders", **ids(lock["name"])) == 0
        assert value(snap, "pg_advisory_lock_blocked_holder_wait_seconds", **ids(lock["name"])) == 0
    assert series(render(snap).decode(), "pg_advisory_lock_blocked_holder_info") == []
    assert value(snap, "pg_advisory_lock_unnamed_blocked_holders", database="postgres") == 0


def test_a_waiter_that_holds_nothing_costs_no_second_statement(make_poller, sessions, server, monkeypatch) -> None:
    # Pods queueing for a lock are waiters, not blocked holders: the poll stays one statement.
    from exporter import poller as poller_module

    calls = []
    monkeypatch.setattr(poller_module, "read_chains", lambda *a, **k: calls.append(a) or ())
    owner = sessions.open(application_name="shard-owner")
    owner.execute("SELECT pg_advisory_lock(7)")
    pod = sessions.open(application_name="pod")
    thread = threading.Thread(target=pod.execute, args=("SELECT pg_advisory_lock(7)",), daemon=True)
    thread.start()
    wait_until(lambda: pod.info.backend_pid in waiting_pids(server))
    try:
        snap = make_poller({"locks": LOCKS}).poll_once()
        assert value(snap, "pg_advisory_lock_waiters", **ids("shard")) == 1
        assert value(snap, "pg_advisory_lock_blocked_holders", **ids("shard")) == 0
        assert series(render(snap).decode(), "pg_advisory_lock_blocked_holder_info") == []  # a waiter is not one
        assert snap.chains == () and calls == []
    finally:
        owner.execute("SELECT pg_advisory_unlock_all()")
        thread.join(10)
        pod.execute("SELECT pg_advisory_unlock_all()")


def test_an_unnamed_holder_that_waits(make_poller, sessions, server) -> None:
    setup = sessions.open()
    setup.execute("DROP TABLE IF EXISTS ledger; CREATE TABLE ledger (id int)")
    reader = sessions.open(autocommit=False, application_name="reader")
    reader.execute("SELECT * FROM ledger")
    legacy = sessions.open(autocommit=False, application_name="legacy")
    legacy.execute("SELECT pg_advisory_lock(999)")
    thread = threading.Thread(target=legacy.execute, args=("LOCK TABLE ledger",), daemon=True)
    thread.start()
    wait_until(lambda: legacy.info.backend_pid in all_waiting(server))
    try:
        snap = make_poller({"locks": LOCKS}).poll_once()
        assert value(snap, "pg_advisory_lock_unnamed_blocked_holders", database="postgres") == 1
    finally:
        reader.rollback()
        thread.join(10)
        legacy.rollback()
        legacy.execute("SELECT pg_advisory_unlock_all()")


@pytest.mark.slow
def test_the_chain_on_the_landing_page_in_a_browser(tmp_path, server, sessions) -> None:
    deploy = Deploy(server, sessions)
    proc = ExporterProcess(tmp_path, {"dsn": server.dsn(), "poll_interval": "200ms", "locks": LOCKS})
    try:
        proc.metrics_when(lambda t: parse(t).get(("pg_advisory_lock_blocked_holders", tuple(sorted(ids("migrations").items())))) == 1)
        dom = chromium(proc.url + "/", tmp_path, "--dump-dom")
        chromium(proc.url + "/", tmp_path, f"--screenshot={tmp_path / 'chain.png'}", "--window-size=1400,800")
    finally:
        proc.stop()
        deploy.end()
    assert f"pid {deploy.migration.info.backend_pid} migrate" in dom
    assert "which waits for relation public.users (AccessExclusiveLock)" in dom
    assert f"blocked by pid {deploy.report.info.backend_pid} (report-runner, postgres@127.0.0.1, idle in transaction" in dom
    assert "2 (longest" in dom  # the two pods waiting for the advisory lock
    assert (tmp_path / "chain.png").stat().st_size > 10_000
