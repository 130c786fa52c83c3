"""Behind a real PgBouncer: who really holds a lock, and session locks stranded by transaction pooling."""

from __future__ import annotations

import socket
import threading
import time

import psycopg
import pytest

from exporter import landing, queries
from exporter.config import parse_config
from exporter.snapshot import ReloadStatus, Snapshot
from exporter.metrics import render
from exporter.probe import Prober, connect_probe
from tests.conftest import hang_lookups, wait_until
from tests.exporter_proc import ExporterProcess
from tests.metrics_util import parse, series, value
from tests.pgbouncer import PgBouncer, PgBouncerError

LOCKS = [{"name": "answer", "key": 42}, {"name": "other", "key": 43}, {"name": "tenants", "key": {"namespace": 7}}]


@pytest.fixture
def bouncers(server):
    cluster = server.require_cluster()
    started: list[PgBouncer] = []

    def start(**kwargs) -> PgBouncer:
        try:
            bouncer = PgBouncer(cluster.port, **kwargs).start()
        except PgBouncerError as exc:
            pytest.fail(str(exc))
        started.append(bouncer)
        return bouncer

    yield start
    for bouncer in started:
        bouncer.stop()


def through(bouncer: PgBouncer, app: str, **extra) -> psycopg.Connection:
    return psycopg.connect(bouncer.dsn(application_name=app, **extra), autocommit=True, prepare_threshold=None)


def pooled_config(bouncer: PgBouncer, **extra) -> dict:
    return {"locks": LOCKS, "poolers": [{"name": "pgb", "type": "pgbouncer", "dsn": bouncer.console_dsn()}], **extra}


def answer(snap, name: str = "answer") -> dict[str, float | None]:
    ids = {"lock": name, "database": "postgres"}
    return {
        "holders": value(snap, "pg_advisory_lock_holders", **ids, mode="exclusive"),
        "stranded": value(snap, "pg_advisory_lock_pooled_session_holders", **ids),
    }


def holder_info(snap, name: str = "answer") -> list[dict[str, str]]:
    return [h for h in series(render(snap).decode(), "pg_advisory_lock_holder_info") if h["lock"] == name]


def test_the_transaction_pool_story_step_by_step(bouncers, make_poller) -> None:
    bouncer = bouncers(pool_mode="transaction", pool_size=2)
    poller = make_poller(pooled_config(bouncer))
    a, b, c = through(bouncer, "client-a"), through(bouncer, "client-b"), through(bouncer, "client-c")
    try:
        # 1. A takes a session lock and goes on: the lock stays on server backend P.
        p = a.execute("SELECT pg_backend_pid() FROM (SELECT pg_advisory_lock(42)) AS taken").fetchone()[0]
        snap = poller.poll_once()
        assert answer(snap) == {"holders": 1, "stranded": 1}
        assert holder_info(snap) == [{
            "lock": "answer", "database": "postgres", "key": "42", "pid": str(p), "application_name": "",
            "usename": "postgres", "client_addr": "", "state": "idle", "source": "config", "pooler": "pgb",
        }]
        # 2. B, handed P for its next transaction, "gets" the same lock: mutual exclusion is gone.
        got, on = b.execute("SELECT pg_try_advisory_lock(42), pg_backend_pid()").fetchone()
        assert (got, on) == (True, p)
        assert b.execute("SELECT pg_advisory_unlock(42)").fetchone()[0] is True
        # 3. While C is inside a transaction on P, C is the one holding it (not flagged: not idle).
        c.execute("BEGIN")
        assert c.execute("SELECT pg_backend_pid()").fetchone()[0] == p
        snap = poller.poll_once()
        assert answer(snap) == {"holders": 1, "stranded": 0}
        (info,) = holder_info(snap)
        assert (info["application_name"], info["client_addr"], info["pooler"]) == ("client-c", "127.0.0.1", "pgb")
        # 4. A's unlock lands on another backend: a warning and false; the lock stays on P.
        notices: list[str] = []
        a.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
        released, elsewhere = a.execute("SELECT pg_advisory_unlock(42), pg_backend_pid()").fetchone()
        assert released is False and elsewhere != p
        assert any("you don't own a lock of type ExclusiveLock" in n for n in notices), notices
        c.execute("COMMIT")
    finally:
        for conn in (a, b, c):
            conn.close()
    # 5. Every client is gone; P still holds the lock until the pooler closes it.
    snap = poller.poll_once()
    assert answer(snap) == {"holders": 1, "stranded": 1}
    assert holder_info(snap)[0]["pid"] == str(p)
    with psycopg.connect(bouncer.dsn(), autocommit=True, prepare_threshold=None) as cleanup:
        cleanup.execute("SELECT pg_advisory_unlock_all()")


def test_the_locks_command_shows_the_chain_and_the_hazard(bouncers, tmp_path) -> None:
    from tests.test_locksview import run_locks

    bouncer = bouncers(pool_mode="transaction")
    with through(bouncer, "runner") as client:
        pid = client.execute("SELECT pg_backend_pid() FROM (SELECT pg_advisory_lock(42)) AS taken").fetchone()[0]
    try:
        config = {"dsn": bouncer.dsn().replace(f"port={bouncer.port}", f"port={bouncer.server_port}"), **pooled_config(bouncer)}
        result = run_locks(tmp_path, config)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        at = lines.index("answer  [42]  in postgres")
        assert lines[at + 1].split()[:2] == ["holds", str(pid)]
        assert lines[at + 2].strip().startswith("STRANDED on pooler pgb: a session lock left on a pooled connection")
        assert "whoever borrows that connection next also 'has' it" in " ".join(result.stdout.split())  # wrapped, not cut
        assert all(len(line) <= 80 for line in lines)
    finally:
        with psycopg.connect(bouncer.dsn(), autocommit=True, prepare_threshold=None) as cleanup:
            cleanup.execute("SELECT pg_advisory_unlock_all()")


def test_a_session_pool_raises_no_hazard_and_names_the_client(bouncers, make_poller) -> None:
    bouncer = bouncers(pool_mode="session")
    with through(bouncer, "session-client") as client:
        pid = client.execute("SELECT pg_backend_pid() FROM (SELECT pg_advisory_lock(42)) AS taken").fetchone()[0]
        snap = make_poller(pooled_config(bouncer)).poll_once()
        assert answer(snap) == {"holders": 1, "stranded": 0}
        (info,) = holder_info(snap)
        assert (info["pid"], info["application_name"], info["client_addr"], info["pooler"]) == (
            str(pid), "session-client", "127.0.0.1", "pgb")


def test_a_pool_with_another_server_user_shows_the_clients_user(bouncers, make_poller, server) -> None:
    with psycopg.connect(server.dsn(), autocommit=True) as admin:
        for role in ("app", "pool_user"):
            admin.execute(f"DROP ROLE IF EXISTS {role}")
            admin.execute(f"CREATE ROLE {role} LOGIN")
    bouncer = bouncers(pool_mode="session", force_user="pool_user")
    with through(bouncer, "as-app", user="app") as client:
        client.execute("SELECT pg_advisory_lock(43)")
        (info,) = holder_info(make_poller(pooled_config(bouncer)).poll_once(), "other")
        assert info["usename"] == "app"  # the server sees pool_user; the console knows the client


def test_a_transaction_lock_inside_an_open_transaction_is_not_flagged(bouncers, make_poller) -> None:
    bouncer = bouncers(pool_mode="transaction")
    with through(bouncer, "xact-client") as client:
        client.execute("BEGIN")
        client.execute("SELECT pg_advisory_xact_lock(7, 1)")
        snap = make_poller(pooled_config(bouncer)).poll_once()
        assert answer(snap, "tenants") == {"holders": 1, "stranded": 0}
        (info,) = holder_info(snap, "tenants")
        assert (info["application_name"], info["pooler"], info["key"]) == ("xact-client", "pgb", "7,1")
        client.execute("ROLLBACK")


def test_unnamed_stranded_locks_are_counted(bouncers, make_poller) -> None:
    bouncer = bouncers(pool_mode="transaction")
    with through(bouncer, "legacy") as client:
        client.execute("SELECT pg_advisory_lock(999)")
        snap = make_poller(pooled_config(bouncer)).poll_once()
        assert value(snap, "pg_advisory_lock_unnamed_pooled_session_holders", database="postgres") == 1
        (info,) = series(render(snap).decode(), "pg_advisory_lock_unnamed_holder_info")
        assert (info["key"], info["pooler"], info["client_addr"]) == ("999", "pgb", "")
        client.execute("SELECT pg_advisory_unlock_all()")


@pytest.mark.parametrize("problem", ["down", "wrong password"])
def test_a_console_that_cannot_be_read_never_fails_the_poll(bouncers, make_poller, sessions, caplog, problem) -> None:
    bouncer = bouncers(pool_mode="transaction")
    console = bouncer.console_dsn(password="wrong") if problem == "wrong password" else bouncer.console_dsn()
    config = {"locks": LOCKS, "poolers": [{"name": "pgb", "type": "pgbouncer", "dsn": console}]}
    sessions.open().execute("SELECT pg_advisory_lock(42)")
    if problem == "down":
        bouncer.stop()
    poller = make_poller(config)
    with caplog.at_level("WARNING"):
        first, second = poller.poll_once(), poller.poll_once()
    for snap in (first, second):
        assert snap.up
        assert value(snap, "pg_advisory_lock_holders", lock="answer", database="postgres", mode="exclusive") == 1
        (status,) = snap.consoles
        assert status.pooler == "pgb" and status.up is False
        assert value(snap, "pg_advisory_lock_pooler_up", pooler="pgb", address=status.address) == 0
    lines = [r.getMessage() for r in caplog.records if "console" in r.getMessage()]
    assert len(lines) == 1 and "pooler pgb console at 127.0.0.1" in lines[0], lines  # once, not per poll
    assert "wrong" not in lines[0] or problem == "down"  # never the password


def test_replicas_behind_one_name_are_each_read(bouncers, make_poller, monkeypatch) -> None:
    """Two real PgBouncers on one port of two loopback addresses, one name resolving to both (the
    name's resolution is the only thing made up here, as a headless Service's DNS would give it)."""
    first = bouncers(pool_mode="transaction")
    second = bouncers(pool_mode="transaction", listen_addr="127.0.0.2", port=first.port)
    real = __import__("socket").getaddrinfo

    def resolve(host, *args, **kwargs):
        if host == "pgbouncer-replicas":
            return [info for address in ("127.0.0.1", "127.0.0.2") for info in real(address, *args, **kwargs)]
        return real(host, *args, **kwargs)

    monkeypatch.setattr("socket.getaddrinfo", resolve)
    with through(second, "via-replica-2") as client:
        client.execute("SELECT pg_advisory_lock(42)")
        console = first.console_dsn().replace("host=127.0.0.1", "host=pgbouncer-replicas")
        snap = make_poller({"locks": LOCKS, "poolers": [{"name": "pgb", "type": "pgbouncer", "dsn": console}]}).poll_once()
        client.execute("SELECT pg_advisory_unlock_all()")
    assert {(c.address, c.up) for c in snap.consoles} == {("127.0.0.1", True), ("127.0.0.2", True)}
    assert answer(snap) == {"holders": 1, "stranded": 1}
    assert holder_info(snap)[0]["pooler"] == "pgb"


def test_a_hung_pooler_name_blocks_no_other_poolers_name_lookup(monkeypatch, caplog) -> None:
    """Every target's reader asks for the same pooler name behind a hung resolver, more times than
    there are resolver threads: the console of another pooler is still looked up, and read."""
    from exporter import deadline, poolers
    from exporter.poolers import PoolerReader

    release = hang_lookups(monkeypatch, lambda host: host == "hung-console.example", alias={"console.example": "127.0.0.1"})
    monkeypatch.setattr(poolers, "CONSOLE_TIMEOUT", 0.1)

    def reader(host: str) -> PoolerReader:
        return PoolerReader(parse_config({"dsn": "host=127.0.0.1", "locks": [], "poolers": [
            {"name": "pgb", "type": "pgbouncer", "dsn": f"host={host} port=1 dbname=pgbouncer connect_timeout=2"}]}, "t"))

    try:
        for _ in range(deadline.RESOLVERS + 1):
            assert [c.address for c in reader("hung-console.example").read().consoles] == ["hung-console.example:1"]
        caplog.clear()
        with caplog.at_level("WARNING"):
            healthy = reader("console.example").read()
        # Looked up (its address, not the name), and then refused: nobody listens on port 1.
        assert [(c.address, c.up) for c in healthy.consoles] == [("127.0.0.1", False)]
        assert "did not return" not in caplog.text, caplog.text
    finally:
        release.set()


def test_a_hung_pooler_name_is_waited_for_no_longer_than_the_timeout(monkeypatch) -> None:
    from exporter.poolers import pooler_fronting

    release = hang_lookups(monkeypatch, lambda host: True)
    config = parse_config({"dsn": "host=127.0.0.1", "locks": [], "poolers": [
        {"name": "pgb", "type": "pgbouncer", "dsn": "host=hung-fronting.example port=6432 dbname=pgbouncer"},
        {"name": "proxy", "addresses": ["127.0.0.1"], "pool_mode": "transaction"}]}, "t")
    worker = threading.Thread(target=lambda: found.append(pooler_fronting(config.poolers, config.dsn, 0.2)), daemon=True)
    found: list[str | None] = []
    try:
        worker.start()
        worker.join(5)
        # The hung name stands for itself: the pooler known by the dsn's address is still found.
        assert found == ["proxy"]
    finally:
        release.set()


def test_a_pooler_known_only_by_address(make_poller, sessions) -> None:
    holder = sessions.open(application_name="via-proxy")
    holder.execute("SELECT pg_advisory_lock(42)")
    config = {"locks": LOCKS, "poolers": [{"name": "proxy", "addresses": ["127.0.0.1"], "pool_mode": "transaction"}]}
    snap = make_poller(config).poll_once()
    assert answer(snap) == {"holders": 1, "stranded": 1}
    (info,) = holder_info(snap)
    assert (info["pooler"], info["client_addr"], info["application_name"]) == ("proxy", "", "")
    # Without poolers configured, the series is not there at all.
    assert answer(make_poller({"locks": LOCKS}).poll_once())["stranded"] is None


def test_the_exporters_own_polls_leave_no_setting_on_pooled_backends(bouncers) -> None:
    bouncer = bouncers(pool_mode="transaction", pool_size=1)
    from exporter.poller import Poller, connect_poller

    config = parse_config({"dsn": bouncer.dsn(), "poll_interval": "1s", "locks": LOCKS}, "t")
    poller = Poller(config, connect=connect_poller, publish=lambda s: None)
    try:
        for _ in range(5):  # more polls than psycopg's prepare threshold
            assert poller.poll_once().up
    finally:
        poller.close()
    with through(bouncer, "app") as app:  # the same (only) server connection
        settings = app.execute("SELECT current_setting('statement_timeout'), current_setting('lock_timeout'), "
                               "current_setting('enable_sort'), (SELECT count(*) FROM pg_prepared_statements)").fetchone()
    assert settings == ("0", "0", "on", 0)


def test_the_probe_trusts_no_lock_stranded_on_the_pool_it_connects_through(bouncers) -> None:
    """Issue 27, item 2: the one server connection of a quiet transaction pool holds the lock; the
    probe's try through that pool lands on it and succeeds (re-entrant), on the same backend at
    every try. The exposition says held and stranded, and the probe says it does not know."""
    from exporter.poller import Poller, connect_poller

    bouncer = bouncers(pool_mode="transaction", pool_size=1)
    with through(bouncer, "stranding-client") as client:
        client.execute("SELECT pg_advisory_lock(4242)")  # left on the only server connection
    config = parse_config({"dsn": bouncer.dsn(), "poll_interval": "1s", "locks": [
        {"name": "nightly", "key": 4242, "probe": {"expect": "free", "interval": "1s"}},
    ], "poolers": [{"name": "pgb", "type": "pgbouncer", "dsn": bouncer.console_dsn()}]}, "t")
    turn = threading.Lock()
    prober = Prober(config, connect=connect_probe, publish=lambda r: None, turn=turn)
    poller = Poller(config, connect=connect_poller, publish=lambda s: None, turn=turn)
    try:
        tries = [prober.try_lock(config.locks[0]) for _ in range(3)]
        samples = parse(render(poller.poll_once(), prober.results()).decode())
    finally:
        prober.close()
        poller.close()
        with through(bouncer, "cleanup") as cleanup:
            cleanup.execute("SELECT pg_advisory_unlock_all()")
    assert [t.errors for t in tries] == [0, 0, 0]
    ids = (("database", "postgres"), ("lock", "nightly"))
    assert samples[("pg_advisory_lock_holders", (*ids, ("mode", "exclusive")))] == 1
    assert samples[("pg_advisory_lock_pooled_session_holders", ids)] == 1
    assert samples[("pg_advisory_lock_probe_trusted", ids)] == 0
    assert ("pg_advisory_lock_probe_acquirable", ids) not in samples
    assert ("pg_advisory_lock_probe_ok", ids) not in samples


def test_a_wrong_proof_is_caught_when_the_backend_changes(bouncers, caplog, monkeypatch) -> None:
    """The second guard: were a pooled connection ever proven direct (a transparent proxy keeping
    both addresses), the first change of backend between tries still ends its trust."""
    monkeypatch.setattr("exporter.poolers.proven_direct", lambda *args: True)
    bouncer = bouncers(pool_mode="transaction", pool_size=2)
    config = parse_config({"dsn": bouncer.dsn(), "locks": [{"name": "answer", "key": 42, "probe": {"expect": "free"}}]}, "t")
    prober = Prober(config, connect=connect_probe, publish=lambda r: None)
    assert prober.try_lock(config.locks[0]).trusted is True  # what the made-up proof says
    stop = threading.Event()

    def rotate() -> None:  # another client keeps both server connections busy in turn
        with through(bouncer, "rotator") as conn:
            while not stop.is_set():
                with conn.transaction():
                    conn.execute("SELECT pg_sleep(0.003)")

    rotators = [threading.Thread(target=rotate, daemon=True) for _ in range(2)]
    for thread in rotators:
        thread.start()
    try:
        with caplog.at_level("WARNING"):
            result = wait_until(lambda: (r := prober.try_lock(config.locks[0])).trusted is False and r, timeout=30,
                                interval=0.001)
    finally:
        stop.set()
        for thread in rotators:
            thread.join(5)
        prober.close()
    samples = parse(render(Snapshot(up=False), (result,)).decode())
    ids = (("database", "postgres"), ("lock", "answer"))
    assert samples[("pg_advisory_lock_probe_trusted", ids)] == 0
    assert ("pg_advisory_lock_probe_ok", ids) not in samples and ("pg_advisory_lock_probe_acquirable", ids) not in samples
    assert any("goes through a transaction-mode pooler" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_the_exporter_behind_a_pooler_end_to_end(bouncers, server, tmp_path) -> None:
    bouncer = bouncers(pool_mode="transaction")
    with through(bouncer, "stranding-client") as client:
        client.execute("SELECT pg_advisory_lock(42)")
    proc = ExporterProcess(tmp_path, {"dsn": server.dsn(), "poll_interval": "200ms", **pooled_config(bouncer)})
    try:
        text = proc.metrics_when(lambda t: parse(t).get(
            ("pg_advisory_lock_pooled_session_holders", (("database", "postgres"), ("lock", "answer")))) == 1)
        assert parse(text)[("pg_advisory_lock_pooler_up", (("address", "127.0.0.1"), ("pooler", "pgb")))] == 1
        status, page = proc.get("/")
        assert status == 200 and "stranded" in page
    finally:
        proc.stop()
        with psycopg.connect(bouncer.dsn(), autocommit=True, prepare_threshold=None) as cleanup:
            cleanup.execute("SELECT pg_advisory_unlock_all()")
    assert "console-secret" not in proc.log()
    time.sleep(0)


# -- nothing of ours on a pooled backend, and every holder seen ------------------------------------


class Forwarder:
    """A TCP forwarder on a free loopback port in front of the server: a proxy the exporter
    cannot see, as a Kubernetes Service or a cloud proxy would be."""

    def __init__(self, target_port: int) -> None:
        import socketserver

        class Pipe(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                upstream = socket.create_connection(("127.0.0.1", target_port))
                done = threading.Event()

                def pump(src, dst) -> None:
                    try:
                        while data := src.recv(65536):
                            dst.sendall(data)
                    except OSError:
                        pass
                    finally:
                        done.set()

                threading.Thread(target=pump, args=(upstream, self.request), daemon=True).start()
                pump(self.request, upstream)
                done.wait(5)
                upstream.close()

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Pipe)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def own_statements(poller) -> set[str]:
    """The prepared statements of the poller's own backend (a direct or forwarded connection)."""
    return {row[0] for row in poller._conn.execute("SELECT name FROM pg_prepared_statements").fetchall()}  # noqa: SLF001


@pytest.mark.parametrize("path", ["direct", "unix socket", "tcp forwarder"])
def test_the_poll_statement_is_prepared_only_where_the_connection_is_proven_direct(server, path) -> None:
    from exporter.poller import Poller, connect_poller

    cluster = server.require_cluster()
    forwarder = Forwarder(cluster.port) if path == "tcp forwarder" else None
    dsn = {"direct": server.dsn(), "unix socket": f"host={cluster.root} port={cluster.port} dbname=postgres user=postgres",
           "tcp forwarder": f"host=127.0.0.1 port={forwarder.port if forwarder else 0} dbname=postgres user=postgres"}[path]
    poller = Poller(parse_config({"dsn": dsn, "poll_interval": "1s", "locks": LOCKS}, "t"), connect=connect_poller,
                    publish=lambda s: None)
    try:
        assert poller.poll_once().up and poller.poll_once().up
        assert own_statements(poller) == ({"pg_advisory_lock_exporter_poll"} if path == "direct" else set())
    finally:
        poller.close()
        if forwarder:
            forwarder.close()


@pytest.mark.parametrize("path, trusted", [
    ("direct", True), ("unix socket", False), ("tcp forwarder", False), ("pooler configured at the address", False),
    ("session pool", False),
])
def test_the_probe_trusts_only_a_connection_proven_direct(bouncers, server, caplog, path, trusted) -> None:
    cluster = server.require_cluster()
    forwarder = Forwarder(cluster.port) if path == "tcp forwarder" else None
    dsn = {"unix socket": f"host={cluster.root} port={cluster.port} dbname=postgres user=postgres",
           "tcp forwarder": f"host=127.0.0.1 port={forwarder.port if forwarder else 0} dbname=postgres user=postgres",
           "session pool": bouncers(pool_mode="session").dsn() if path == "session pool" else ""}.get(path, server.dsn())
    poolers = [{"name": "proxy", "addresses": ["127.0.0.1"], "pool_mode": "transaction"}] \
        if path == "pooler configured at the address" else []
    config = parse_config({"dsn": dsn, "locks": [{"name": "answer", "key": 42, "probe": {"expect": "free"}}],
                           "poolers": poolers}, "t")
    prober = Prober(config, connect=connect_probe, publish=lambda r: None)
    try:
        with caplog.at_level("WARNING"):
            tries = [prober.try_lock(config.locks[0]) for _ in range(2)]
    finally:
        prober.close()
        if forwarder:
            forwarder.close()
    assert [(t.errors, t.trusted) for t in tries] == [(0, trusted)] * 2
    samples = parse(render(Snapshot(up=False), (tries[-1],)).decode())
    ids = (("database", "postgres"), ("lock", "answer"))
    assert samples[("pg_advisory_lock_probe_trusted", ids)] == int(trusted)
    assert samples.get(("pg_advisory_lock_probe_ok", ids)) == (1 if trusted else None)
    warned = [r.getMessage() for r in caplog.records if "marked untrusted" in r.getMessage()]
    assert len(warned) == (0 if trusted else 1), warned  # once, at connect, not per try


def test_a_failed_try_keeps_the_trust_of_its_connection(server) -> None:
    """A try that fails on an unproven connection says nothing trusted either: no probe_ok 0 that
    would claim the lock is not as expected."""
    cluster = server.require_cluster()
    dsn = f"host={cluster.root} port={cluster.port} dbname=postgres user=postgres"
    config = parse_config({"dsn": dsn, "locks": [{"name": "answer", "key": 42, "probe": {"expect": "free"}}]}, "t")
    prober = Prober(config, connect=connect_probe, publish=lambda r: None)
    try:
        first = prober.try_lock(config.locks[0])
        with psycopg.connect(server.dsn(), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
                          [queries.PROBE_APPLICATION_NAME])
        failed = prober.try_lock(config.locks[0])
    finally:
        prober.close()
    assert (first.errors, first.trusted, failed.errors, failed.trusted) == (0, False, 1, False)
    samples = parse(render(Snapshot(up=False), (failed,)).decode())
    ids = (("database", "postgres"), ("lock", "answer"))
    assert samples[("pg_advisory_lock_probe_trusted", ids)] == 0
    assert ("pg_advisory_lock_probe_ok", ids) not in samples


def test_a_configured_pooler_at_the_dsns_address_means_pooled(server, caplog) -> None:
    from exporter.poller import Poller, connect_poller

    config = parse_config({"dsn": server.dsn(), "poll_interval": "1s", "locks": LOCKS,
                           "poolers": [{"name": "proxy", "addresses": ["127.0.0.1"], "pool_mode": "transaction"}]}, "t")
    poller = Poller(config, connect=connect_poller, publish=lambda s: None)
    try:
        with caplog.at_level("INFO"):
            assert poller.poll_once().up
        assert own_statements(poller) == set()
        assert "points at pooler proxy" in caplog.text
    finally:
        poller.close()


def test_a_pooler_on_the_same_port_number_gets_no_prepared_statement(bouncers, server) -> None:
    from exporter.poller import Poller, connect_poller

    cluster = server.require_cluster()
    # PgBouncer on 127.0.0.2:P in front of PostgreSQL on 127.0.0.1:P, as a pooler Service on 5432
    # in front of a server on 5432: the server reports the dsn's port, yet a pooler is in between.
    bouncer = bouncers(pool_mode="transaction", pool_size=1, listen_addr="127.0.0.2", port=cluster.port)
    poller = Poller(parse_config({"dsn": bouncer.dsn(), "poll_interval": "1s", "locks": LOCKS}, "t"),
                    connect=connect_poller, publish=lambda s: None)
    try:
        for _ in range(5):
            assert poller.poll_once().up
    finally:
        poller.close()
    with through(bouncer, "app") as app:  # the same (only) server connection
        assert app.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()[0] == 0


@pytest.mark.slow
def test_nothing_of_ours_stays_on_a_pooled_backend_over_many_polls_and_tries(bouncers) -> None:
    from exporter.fleet import Target

    bouncer = bouncers(pool_mode="transaction", pool_size=2)
    config = parse_config({"dsn": bouncer.dsn(), "poll_interval": "200ms", "locks": [
        {"name": "a", "key": 42, "probe": {"expect": "free", "interval": "1s"}},
        {"name": "b", "key": 43, "probe": {"expect": "free", "interval": "1s"}},
    ]}, "t")
    target = Target(config, with_process=False)
    seen: list[tuple] = []
    stop = threading.Event()

    def rotate() -> None:  # another client of the pool, borrowing both server connections in turn
        with through(bouncer, "rotator") as conn:
            while not stop.is_set():
                with conn.transaction():
                    seen.append(conn.execute(
                        "SELECT current_setting('statement_timeout'), current_setting('lock_timeout'), "
                        "current_setting('enable_sort'), (SELECT count(*) FROM pg_prepared_statements)").fetchone())
                time.sleep(0.01)

    rotator = threading.Thread(target=rotate, daemon=True)
    tries: set[tuple[str, float]] = set()  # (lock, when tried): each try of the probe once

    def enough() -> bool:
        tries.update((p.lock, p.last_run) for p in target.exposition.probes if p.errors == 0)
        return target.exposition.snapshot.stats.polls >= 20 and len(tries) >= 20

    target.start()
    rotator.start()
    try:
        wait_until(enough, timeout=60, interval=0.2)
    finally:
        stop.set()
        rotator.join(5)
        target.stop()
    assert seen and set(seen) == {("0", "0", "on", 0)}, set(seen)


def test_a_stranded_lock_is_seen_at_every_poll_whoever_borrowed_its_backend_last(bouncers) -> None:
    from exporter.poller import Poller, connect_poller

    bouncer = bouncers(pool_mode="transaction", pool_size=1)
    with through(bouncer, "stranding-client") as client:
        client.execute("SELECT pg_advisory_lock(8201)")  # left on the only server connection
    config = parse_config({"dsn": bouncer.dsn(), "poll_interval": "1s", "locks": [
        {"name": "stranded", "key": 8201}, {"name": "probed", "key": 8300, "probe": {"expect": "free", "interval": "1s"}},
    ], "poolers": [{"name": "pgb", "type": "pgbouncer", "dsn": bouncer.console_dsn()}]}, "t")
    turn = threading.Lock()  # as every target's poller and probe share one
    prober = Prober(config, connect=connect_probe, publish=lambda r: None, turn=turn)
    poller = Poller(config, connect=connect_poller, publish=lambda s: None, turn=turn)
    stop = threading.Event()

    def hammer() -> None:  # the probe borrows the backend between polls, leaving its name on it
        while not stop.is_set():
            prober.try_lock(config.locks[1])

    thread = threading.Thread(target=hammer, daemon=True)
    thread.start()
    try:
        for _ in range(30):
            snap = poller.poll_once()
            assert snap.up
            assert answer(snap, "stranded") == {"holders": 1, "stranded": 1}
            probed = next(lock for lock in snap.locks if lock.name == "probed")
            assert (probed.holds, probed.acquisitions) == (0, 0)
            assert snap.unnamed == ()
    finally:
        stop.set()
        thread.join(5)
        prober.close()
        poller.close()
        with through(bouncer, "cleanup") as cleanup:
            cleanup.execute("SELECT pg_advisory_unlock_all()")


def test_a_unix_socket_pgbouncer_is_matched_to_its_backends(bouncers, make_poller, server) -> None:
    cluster = server.require_cluster()
    bouncer = bouncers(pool_mode="transaction", pool_size=1, server_host=cluster.root)
    poller = make_poller(pooled_config(bouncer))
    with through(bouncer, "stranding-client") as client:
        p = client.execute("SELECT pg_backend_pid() FROM (SELECT pg_advisory_lock(42)) AS taken").fetchone()[0]
    try:
        snap = poller.poll_once()
        assert answer(snap) == {"holders": 1, "stranded": 1}
        assert [(h["pid"], h["pooler"], h["client_addr"]) for h in holder_info(snap)] == [(str(p), "pgb", "")]
        with through(bouncer, "the-real-client") as inside:  # inside its transaction, the client owns it
            inside.execute("BEGIN")
            assert inside.execute("SELECT pg_backend_pid()").fetchone()[0] == p
            snap = poller.poll_once()
            assert answer(snap) == {"holders": 1, "stranded": 0}
            assert [(h["application_name"], h["pooler"]) for h in holder_info(snap)] == [("the-real-client", "pgb")]
            inside.execute("ROLLBACK")
    finally:
        with through(bouncer, "cleanup") as cleanup:
            cleanup.execute("SELECT pg_advisory_unlock_all()")


def test_a_console_dsn_with_several_hosts_is_read_at_each(bouncers, make_poller) -> None:
    bouncer = bouncers(pool_mode="transaction", pool_size=1)
    console = f"host=127.0.0.1,localhost port={bouncer.port},{bouncer.port} dbname=pgbouncer user=console password=console-secret"
    poller = make_poller({"locks": LOCKS, "poolers": [{"name": "pgb", "type": "pgbouncer", "dsn": console}]})
    with through(bouncer, "stranding-client") as client:
        client.execute("SELECT pg_advisory_lock(42)")
    try:
        snap = poller.poll_once()
        assert snap.up and snap.consoles and all(c.up for c in snap.consoles)
        assert answer(snap) == {"holders": 1, "stranded": 1}
    finally:
        with through(bouncer, "cleanup") as cleanup:
            cleanup.execute("SELECT pg_advisory_unlock_all()")


def test_a_chain_through_a_transaction_pool(bouncers, make_poller, sessions, server) -> None:
    """A client of a transaction pool holds an advisory lock inside its transaction and waits for a
    table a direct reader holds: the holder is the pool's client, blocked, and the chain names the reader."""
    bouncer = bouncers(pool_mode="transaction", pool_size=1)
    sessions.open().execute("DROP TABLE IF EXISTS invoices; CREATE TABLE invoices (id int)")
    reader = sessions.open(autocommit=False, application_name="report")
    reader.execute("SELECT * FROM invoices")
    client = through(bouncer, "billing-job")
    client.execute("BEGIN")
    backend = client.execute("SELECT pg_backend_pid() FROM (SELECT pg_advisory_xact_lock(42)) AS taken").fetchone()[0]
    thread = threading.Thread(target=client.execute, args=("LOCK TABLE invoices",), daemon=True)
    thread.start()
    try:
        wait_until(lambda: _waits(server, backend))
        snap = make_poller(pooled_config(bouncer)).poll_once()
        assert value(snap, "pg_advisory_lock_blocked_holders", lock="answer", database="postgres") == 1
        assert [(h["application_name"], h["pooler"]) for h in holder_info(snap)] == [("billing-job", "pgb")]
        (chain,) = snap.chains
        assert chain.waits_for == "relation public.invoices"
        assert [(b.pid, b.application_name) for b in chain.roots] == [(reader.info.backend_pid, "report")]
    finally:
        reader.rollback()
        thread.join(10)
        client.execute("ROLLBACK")
        client.close()


def _waits(server, pid: int) -> bool:
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        return bool(conn.execute("SELECT 1 FROM pg_locks WHERE pid = %s AND NOT granted", [pid]).fetchone())


@pytest.mark.parametrize("settings, reason, low, high", [
    ({}, "server_idle_timeout", 590, 600),  # PgBouncer's defaults: idle 600 s comes before lifetime 3600 s
    ({"server_idle_timeout": "0"}, "server_lifetime", 3590, 3600),  # 0 disables the idle timeout
    ({"server_lifetime": "30", "server_idle_timeout": "120"}, "server_lifetime", 20, 30),
])
def test_when_a_stranded_lock_frees_itself(bouncers, make_poller, settings, reason, low, high) -> None:
    bouncer = bouncers(pool_mode="transaction", pool_size=1, extra=settings)
    with through(bouncer, "stranding-client") as client:
        backend = client.execute("SELECT pg_backend_pid() FROM (SELECT pg_advisory_lock(42)) AS taken").fetchone()[0]
    try:
        snap = make_poller(pooled_config(bouncer)).poll_once()
        release = snap.releases[("answer", "postgres")]
        assert (release.reason, release.backend) == (reason, backend)
        assert low <= release.seconds <= high
        assert value(snap, "pg_advisory_lock_pooled_session_release_seconds", lock="answer", database="postgres") == \
            release.seconds
        page = landing.render(snap, (), ReloadStatus(), "/metrics").decode()
        assert f"when pgb closes server connection {backend} ({reason})" in page
    finally:
        with through(bouncer, "cleanup") as cleanup:
            cleanup.execute("SELECT pg_advisory_unlock_all()")


def test_pgbouncers_own_rules_for_closing_an_unused_server_connection() -> None:
    from exporter.pooled import release_after

    assert release_after(age=100, idle=10, lifetime=3600, idle_timeout=600, min_pool_size=0) == (590, "server_idle_timeout")
    assert release_after(age=3500, idle=10, lifetime=3600, idle_timeout=600, min_pool_size=0) == (100, "server_lifetime")
    assert release_after(age=100, idle=10, lifetime=3600, idle_timeout=0, min_pool_size=0) == (3500, "server_lifetime")
    assert release_after(age=5, idle=5, lifetime=0, idle_timeout=600, min_pool_size=0) == (0, "server_lifetime")  # used once
    # A pool at min_pool_size keeps its idle connections: only the lifetime counts.
    assert release_after(age=100, idle=10, lifetime=3600, idle_timeout=600, min_pool_size=2) == (3500, "server_lifetime")
    assert release_after(age=4000, idle=700, lifetime=3600, idle_timeout=600, min_pool_size=0)[0] == 0
