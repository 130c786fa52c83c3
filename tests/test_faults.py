"""Faults the exporter must ride out, each against a real server the test controls."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import psycopg
import pytest
import yaml

from exporter import connection
from exporter.config import parse_config
from exporter.poolers import PoolerReader
from exporter.deadline import DEADLINES
from tests.conftest import needs_own_clusters, wait_until
from tests.metrics_util import parse, up
from tests.pgcluster import Cluster

LOCKS = [
    {"name": "leader", "key": 4242, "probe": {"expect": "held", "interval": "200ms"}},
    {"name": "digest", "key": {"hashtext": "hourly-digest"}},
]
LEADER = (("database", "postgres"), ("lock", "leader"))
DIGEST = (("database", "postgres"), ("lock", "digest"))


@pytest.fixture
def cluster():
    needs_own_clusters()
    made = Cluster().init()
    yield made
    made.destroy()


@pytest.mark.slow
def test_server_down_at_start_then_first_good_poll_within_an_interval(cluster, exporters) -> None:
    proc = exporters({"dsn": cluster.dsn(), "poll_interval": "1s", "locks": LOCKS})
    proc.metrics_when(lambda t: up(t) == 0 and parse(t)[("pg_advisory_lock_exporter_poll_errors_total", ())] >= 3)
    assert "pg_advisory_lock_holders" not in proc.get()[1]
    cluster.pg_ctl_start()
    # Backoff is capped at the interval (1 s): the first good poll follows (the bound itself is
    # unit-tested in test_deadline; no wall clock here).
    proc.metrics_when(lambda t: up(t) == 1, timeout=30)
    assert "Traceback" not in proc.log()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_server_restart_reconnects_and_counts_new_holders(cluster, exporters, mode) -> None:
    cluster.pg_ctl_start()
    proc = exporters({"dsn": cluster.dsn(), "poll_interval": "200ms", "locks": LOCKS})
    holder = psycopg.connect(cluster.dsn(), autocommit=True)
    holder.execute("SELECT pg_advisory_lock(4242), pg_advisory_lock(hashtext('hourly-digest'))")
    proc.metrics_when(lambda t: parse(t).get(("pg_advisory_lock_holders", (*LEADER, ("mode", "exclusive")))) == 1)
    cluster.restart(mode)
    holder.close()
    proc.metrics_when(lambda t: up(t) == 1 and parse(t).get(("pg_advisory_lock_holders", (*LEADER, ("mode", "exclusive")))) == 0)
    # A holder after the restart is a new holder; the string key was resolved again.
    with psycopg.connect(cluster.dsn(), autocommit=True) as again:
        again.execute("SELECT pg_advisory_lock(4242), pg_advisory_lock(hashtext('hourly-digest'))")
        proc.metrics_when(
            lambda t: parse(t).get(("pg_advisory_lock_acquisitions_total", LEADER)) == 1
            and parse(t).get(("pg_advisory_lock_acquisitions_total", DIGEST)) == 1
        )
    assert proc.log().count("connected to 127.0.0.1:") >= 2
    assert "Traceback" not in proc.log()


def server_connections(cluster: Cluster, pid: int) -> int:
    """Established TCP connections from the exporter process (pid) to the cluster, read with ss."""
    result = subprocess.run(["ss", "-Htnp", "state", "established", f"dst 127.0.0.1:{cluster.port}"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return sum(1 for line in result.stdout.splitlines() if f"pid={pid}," in line)


@pytest.mark.slow
def test_hung_server_keeps_metrics_answering_without_piling_up_connections(cluster, exporters) -> None:
    cluster.pg_ctl_start()
    proc = exporters({"dsn": cluster.dsn(), "poll_interval": "500ms", "locks": LOCKS})
    proc.metrics_when(lambda t: up(t) == 1)
    wait_until(lambda: server_connections(cluster, proc.proc.pid) == 2)  # ss sees the exporter: poller and probe
    cluster.signal_all(signal.SIGSTOP)
    try:
        proc.metrics_when(lambda t: up(t) == 0, timeout=30)
        counts = []
        # 4 s of a hung server: scrapes answer; the stuck calls' connections are broken off and each
        # loop (poller, probe) tries one new connection at a time: two at most, never a pile-up.
        for _ in range(20):
            status, text = proc.get(timeout=10)
            assert status == 200 and up(text) == 0
            counts.append(server_connections(cluster, proc.proc.pid))
            time.sleep(0.2)
        assert max(counts) <= 2, counts
    finally:
        cluster.signal_all(signal.SIGCONT)
    proc.metrics_when(lambda t: up(t) == 1, timeout=15)
    assert "is the server hung?" in proc.log()


@pytest.mark.slow
def test_connections_exhausted_then_a_slot_frees(cluster, exporters) -> None:
    cluster.settings.update({"max_connections": "6", "superuser_reserved_connections": "1"})
    cluster.pg_ctl_start()
    with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
        admin.execute("CREATE ROLE exporter LOGIN; GRANT pg_monitor TO exporter")
    hogs = [psycopg.connect(cluster.dsn(), autocommit=True) for _ in range(5)]
    try:
        proc = exporters({"dsn": cluster.dsn(user="exporter"), "poll_interval": "300ms", "locks": LOCKS})
        proc.metrics_when(lambda t: up(t) == 0 and parse(t)[("pg_advisory_lock_exporter_poll_errors_total", ())] >= 2)
        wait_until(lambda: "max_connections is reached" in proc.log())
        hogs.pop().close()  # the exporter needs two slots: the poller's and the probe's
        hogs.pop().close()
        proc.metrics_when(lambda t: up(t) == 1, timeout=10)
    finally:
        for hog in hogs:
            hog.close()
    lines = [l for l in proc.log().splitlines() if "exporter.poller" in l and "max_connections is reached" in l]
    assert len(lines) == 1, proc.log()  # one clear line, not one per attempt


@pytest.mark.slow
def test_missing_grants_are_named_and_the_rest_is_exported(cluster, exporters) -> None:
    cluster.pg_ctl_start()
    with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
        admin.execute("CREATE ROLE plain LOGIN")
        admin.execute("CREATE ROLE locked_out LOGIN")
        admin.execute("REVOKE CONNECT ON DATABASE postgres FROM PUBLIC")
        admin.execute("GRANT CONNECT ON DATABASE postgres TO plain")
        with psycopg.connect(cluster.dsn(), autocommit=True, application_name="worker") as holder:
            holder.execute("SELECT pg_advisory_lock(4242)")
            plain = exporters({"dsn": cluster.dsn(user="plain"), "poll_interval": "300ms", "locks": LOCKS})
            text = plain.metrics_when(lambda t: up(t) == 1)
            samples = parse(text)
            assert samples[("pg_advisory_lock_holders", (*LEADER, ("mode", "exclusive")))] == 1
            info = [dict(k[1]) for k in samples if k[0] == "pg_advisory_lock_holder_info"]
            # pid, application and user are visible to all; state and address need pg_read_all_stats.
            assert info[0]["application_name"] == "worker" and info[0]["state"] == "" and info[0]["client_addr"] == ""
            assert "role plain lacks pg_read_all_stats (GRANT pg_monitor TO plain)" in plain.log()
            locked = exporters({"dsn": cluster.dsn(user="locked_out"), "poll_interval": "300ms", "locks": LOCKS})
            locked.metrics_when(lambda t: up(t) == 0)
            wait_until(lambda: "GRANT CONNECT ON DATABASE" in locked.log())


def test_sighup_reloads_and_refuses_a_bad_config(server, exporters, sessions) -> None:
    sessions.open().execute("SELECT pg_advisory_lock(77)")
    proc = exporters({"dsn": server.dsn(), "poll_interval": "200ms", "locks": LOCKS}, "--web.enable-lifecycle")
    text = proc.metrics_when(lambda t: up(t) == 1)
    first_load = parse(text)[("pg_advisory_lock_exporter_config_last_reload_success_timestamp_seconds", ())]
    assert parse(text)[("pg_advisory_lock_exporter_config_last_reload_successful", ())] == 1
    seventy_seven = (("database", "postgres"), ("lock", "seventy-seven"))

    proc.config_path.write_text(yaml.safe_dump({"dsn": server.dsn(), "poll_interval": "200ms",
                                                "locks": [*LOCKS, {"name": "seventy-seven", "key": 77}]}))
    proc.proc.send_signal(signal.SIGHUP)
    text = proc.metrics_when(lambda t: parse(t).get(("pg_advisory_lock_holders", (*seventy_seven, ("mode", "exclusive")))) == 1)
    assert parse(text)[("pg_advisory_lock_exporter_config_last_reload_success_timestamp_seconds", ())] > first_load

    proc.config_path.write_text("locks: [{name: x, key: 99999999999999999999}]\n")
    proc.proc.send_signal(signal.SIGHUP)
    text = proc.metrics_when(lambda t: parse(t)[("pg_advisory_lock_exporter_config_last_reload_successful", ())] == 0)
    # The old config stays in force.
    assert parse(text).get(("pg_advisory_lock_holders", (*seventy_seven, ("mode", "exclusive")))) == 1
    assert "config reload refused:" in proc.log() and "locks[0].key: 99999999999999999999 is outside bigint" in proc.log()

    request = urllib.request.Request(proc.url + "/-/reload", method="POST", data=b"")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)
    assert refused.value.code == 500
    proc.config_path.write_text(yaml.safe_dump({"dsn": server.dsn(), "poll_interval": "200ms", "locks": LOCKS}))
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200
    text = proc.metrics_when(lambda t: parse(t)[("pg_advisory_lock_exporter_config_last_reload_successful", ())] == 1
                             and ("pg_advisory_lock_holders", (*seventy_seven, ("mode", "exclusive"))) not in parse(t))
    assert proc.proc.poll() is None


def test_reload_endpoint_is_off_unless_enabled(server, exporters) -> None:
    proc = exporters({"dsn": server.dsn(), "locks": LOCKS})
    proc.wait_ready()
    request = urllib.request.Request(proc.url + "/-/reload", method="POST", data=b"")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)
    assert refused.value.code == 403


def _established_to(port: int) -> int:
    result = subprocess.run(["ss", "-Htn", "state", "established", f"dst 127.0.0.1:{port}"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return len(result.stdout.splitlines())


@pytest.mark.slow
def test_a_connect_that_times_out_leaves_no_connection_open() -> None:
    """psycopg keeps a timed-out attempt's socket in a reference cycle: against a hung server
    (a listener that never answers) each failed connect must still close its own."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    try:
        for _ in range(2):
            with pytest.raises(psycopg.OperationalError, match="timeout"):
                connection.connect(f"host=127.0.0.1 port={port} dbname=postgres", "t", 1.0)
            assert _established_to(port) == 0
    finally:
        listener.close()


def test_breaking_off_a_stuck_call_ends_it(server) -> None:
    """A call blocked on a server that will not answer returns at once with an error when its
    connection is broken off from another thread."""
    conn = connection.connect(server.dsn(), "t", 5.0)
    holder = psycopg.connect(server.dsn(), autocommit=True)
    try:
        holder.execute("SELECT pg_advisory_lock(777)")
        watch = DEADLINES.watch(0.5, lambda: connection.break_off(conn))
        with pytest.raises(psycopg.OperationalError):  # waits for the lock, until broken off
            conn.execute("SELECT pg_advisory_lock(777)")
        assert watch.fired
        assert conn.closed or conn.broken
    finally:
        holder.close()
        conn.close()


@pytest.mark.slow
def test_a_hung_console_leaves_no_connection_open(make_poller) -> None:
    """A console that accepts and never answers: each read gives up at its deadline and its
    connect times out; neither leaves a socket open to it."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    config = parse_config({"dsn": "host=127.0.0.1", "locks": [], "poolers": [
        {"name": "pgb", "type": "pgbouncer", "dsn": f"host=127.0.0.1 port={port} dbname=pgbouncer"}]}, "t")
    reader = PoolerReader(config)
    try:
        for _ in range(2):
            assert [c.up for c in reader.read().consoles] == [False]
            assert _established_to(port) == 0
    finally:
        reader.close()
        listener.close()


def test_breaking_off_never_touches_a_socket_that_reused_the_connections_number(server) -> None:
    """The connection's descriptor is closed (by its worker, say) and its number handed to another
    socket before break_off runs: break_off ends the connection's own socket, through the second
    descriptor taken at connect, and leaves the other alone."""
    conn = connection.connect(server.dsn(), "t", 5.0)
    pid = conn.info.backend_pid
    number = conn.pgconn.socket
    os.close(number)  # behind psycopg's back, as a racing close would: the number is free
    mine, peer = socket.socketpair()
    try:
        assert number in (mine.fileno(), peer.fileno())
        connection.break_off(conn)
        peer.sendall(b"x")
        assert mine.recv(1) == b"x"
        mine.sendall(b"y")
        assert peer.recv(1) == b"y"
        with psycopg.connect(server.dsn(), autocommit=True) as watcher:  # and the backend saw its end
            wait_until(lambda: watcher.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                                               [pid]).fetchone()[0] == 0)
    finally:
        mine.close()
        peer.close()
        conn.close()
