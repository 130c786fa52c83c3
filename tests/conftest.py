"""The throwaway PostgreSQL the suite runs against, and helpers to take locks on it.

PG_TEST_DSN=... runs the suite against an existing server instead (a role that may create
databases and roles); tests that must stop or restart the server are then skipped.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import conninfo

# Every owner of remembered state checks its invariants after every poll, in every test (and in
# the exporter processes the tests start, which inherit the environment); production never does.
os.environ["PG_ADVISORY_LOCK_EXPORTER_CHECK_INVARIANTS"] = "1"

from exporter.config import parse_config  # noqa: E402 - after the environment it reads
from exporter.poller import Poller, connect_poller
from exporter.snapshot import Snapshot
from tests.pgcluster import Cluster, ClusterError
from tools.fetch import BIN as TOOLS_BIN, CACHE


def _keep_to_the_cache() -> None:
    """The suite leaves nothing outside the checkout and its cache: the tools `make tools`
    unpacked there come first on PATH, and temporary files (pytest's tmp_path, the clusters',
    PgBouncer's) and npm's cache go under it too. The folders are world-readable, since the
    clusters run as the postgres user and must reach their folders there."""
    if TOOLS_BIN.is_dir():
        os.environ["PATH"] = f"{TOOLS_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    temporary = CACHE / "tmp"
    temporary.mkdir(parents=True, exist_ok=True)
    for folder in (CACHE, temporary):
        folder.chmod(0o755)
    os.environ["TMPDIR"] = str(temporary)
    tempfile.tempdir = str(temporary)
    os.environ.setdefault("npm_config_cache", str(CACHE / "npm-cache"))
    os.environ.setdefault("MPLCONFIGDIR", str(CACHE / "matplotlib"))  # the truth test's picture, if drawn


_keep_to_the_cache()

OTHER_DB = "other_db"
# CI (which runs .ci/run with CI=true) must prove everything: a test skipped there fails instead.
UNDER_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if UNDER_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI, where everything must run: {report.longrepr}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that asks for a server (directly or through sessions, make_poller, ...) is marked
    `server`, so `-m "not server"` runs the tests that need none (the mutation run: docs/development.md)."""
    for item in items:
        if "server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.server)


def needs_own_clusters() -> None:
    """Tests that start, stop or restart clusters of their own: skipped with PG_TEST_DSN."""
    if os.environ.get("PG_TEST_DSN"):
        pytest.skip("starts clusters of its own (PG_TEST_DSN is set)")


@dataclass
class Server:
    """A server the tests may use: our own cluster, or PG_TEST_DSN's."""

    base_dsn: str
    cluster: Cluster | None

    def dsn(self, dbname: str = "postgres", **extra: str) -> str:
        return conninfo.make_conninfo(self.base_dsn, dbname=dbname, **extra)

    def require_cluster(self) -> Cluster:
        if self.cluster is None:
            pytest.skip("needs a throwaway cluster (PG_TEST_DSN is set)")
        return self.cluster


def _warm(dsn: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
                if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [OTHER_DB]).fetchone():
                    conn.execute(f"CREATE DATABASE {OTHER_DB}")
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    external = os.environ.get("PG_TEST_DSN")
    if external:
        try:
            _warm(external)
        except psycopg.Error as exc:
            pytest.exit(f"PG_TEST_DSN: cannot use that server: {exc}", returncode=3)
        yield Server(external, None)
        return
    try:
        cluster = Cluster(settings={"max_prepared_transactions": "10"}).start()
    except ClusterError as exc:
        pytest.exit(f"cannot start a throwaway PostgreSQL: {exc}", returncode=3)
    try:
        _warm(cluster.dsn())
        yield Server(cluster.dsn(), cluster)
    finally:
        cluster.destroy()


class Sessions:
    """Workload sessions for one test, all closed when the test ends."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self._open: list[psycopg.Connection] = []

    def open(self, dbname: str = "postgres", application_name: str = "workload", autocommit: bool = True, **extra: Any) -> psycopg.Connection:
        conn = psycopg.connect(self._server.dsn(dbname, **extra), autocommit=autocommit, application_name=application_name)
        self._open.append(conn)
        return conn

    def close_all(self) -> None:
        """Close every session, and wait (5 s at most) until the server has ended their backends: a
        closed client's backend exits on its own time, and its locks would be in the next test's poll."""
        pids = []
        for conn in self._open:
            try:
                pids.append(conn.info.backend_pid)
                conn.cancel_safe(timeout=2) if hasattr(conn, "cancel_safe") else conn.cancel()
            except psycopg.Error:
                pass
            conn.close()
        self._open.clear()
        if pids:
            deadline = time.monotonic() + 5.0
            with psycopg.connect(self._server.dsn(), autocommit=True) as admin:
                while time.monotonic() < deadline and admin.execute(
                        "SELECT 1 FROM pg_stat_activity WHERE pid = ANY(%s)", [pids]).fetchone():
                    time.sleep(0.02)


@pytest.fixture
def sessions(server: Server) -> Iterator[Sessions]:
    pool = Sessions(server)
    yield pool
    pool.close_all()


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll predicate until it returns something truthy; fail the test on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def waiting_pids(server: Server) -> set[int]:
    """Sessions waiting for an advisory lock now."""
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        rows = conn.execute("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND NOT granted").fetchall()
    return {r[0] for r in rows}


@dataclass
class StuckWithWaiter:
    """A session idle in an open transaction on lock (42, 7), and one blocked waiting for it."""

    holder: psycopg.Connection
    waiter: psycopg.Connection
    thread: threading.Thread

    def release(self) -> None:
        self.holder.rollback()
        self.thread.join(5)


def stuck_with_waiter(sessions: Sessions, server: Server, holder_app: str, waiter_app: str) -> StuckWithWaiter:
    holder = sessions.open(autocommit=False, application_name=holder_app)
    holder.execute("SELECT pg_advisory_xact_lock(42, 7)")
    waiter = sessions.open(application_name=waiter_app)
    thread = threading.Thread(target=lambda: waiter.execute("SELECT pg_advisory_lock(42, 7)"), daemon=True)
    thread.start()
    wait_until(lambda: waiter.info.backend_pid in waiting_pids(server))
    return StuckWithWaiter(holder, waiter, thread)


@pytest.fixture
def make_poller(server: Server) -> Iterator[Callable[..., Poller]]:
    """Poller over a config given as a dict (dsn defaults to the test server's postgres db)."""
    made: list[Poller] = []

    def factory(raw: dict[str, Any], clock: Callable[[], float] = time.monotonic,
                turn: threading.Lock | None = None) -> Poller:
        raw = {"dsn": server.dsn(), "poll_interval": "1s", **raw}
        config = parse_config(raw, "test")
        published: list[Snapshot] = []
        poller = Poller(
            config,
            connect=connect_poller,
            publish=published.append,
            clock=clock,
            turn=turn,
        )
        made.append(poller)
        return poller

    yield factory
    for poller in made:
        poller.close()


@pytest.fixture
def make_prober(server: Server) -> Iterator[Callable[..., Any]]:
    """Prober over a config given as a dict (dsn defaults to the test server's postgres db)."""
    from exporter.probe import Prober, connect_probe

    made: list[Any] = []

    def factory(raw: dict[str, Any], publish: Callable[..., None] = lambda results: None,
                turn: threading.Lock | None = None) -> Prober:
        config = parse_config({"dsn": server.dsn(), **raw}, "test")
        prober = Prober(
            config,
            connect=connect_probe,
            publish=publish,
            turn=turn,
        )
        made.append(prober)
        return prober

    yield factory
    for prober in made:
        prober.close()


@pytest.fixture
def exporters(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """`python -m exporter` processes over configs given as dicts, each in a folder of its own (its
    config and log), all stopped when the test ends."""
    from tests.exporter_proc import ExporterProcess

    started: list[ExporterProcess] = []

    def start(config: dict[str, Any], *args: str) -> ExporterProcess:
        folder = tmp_path / str(len(started))
        folder.mkdir()
        proc = ExporterProcess(folder, config, *args)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def hang_lookups(monkeypatch: pytest.MonkeyPatch, hung: Callable[[str], bool], alias: dict[str, str] | None = None,
                 asked: list[str] | None = None) -> threading.Event:
    """socket.getaddrinfo as a resolver that never answers for the names `hung` picks (each recorded
    in `asked`), and looks up the others (through `alias`, a name for a name) as before: set the
    event to end the hung lookups."""
    import socket

    real = socket.getaddrinfo
    release = threading.Event()

    def getaddrinfo(host, *args, **kwargs):  # type: ignore[no-untyped-def]
        if hung(host):
            if asked is not None:
                asked.append(host)
            release.wait(30)  # a resolver that does not answer
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real((alias or {}).get(host, host), *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return release
