"""The things measured: the floor, this exporter, and query-exporter, each as its own role."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psycopg
import yaml

from bench.measure import Background
from tests.pgcluster import free_port, terminate

BENCH_DIR = Path(__file__).resolve().parent
QE_VENV = BENCH_DIR / ".venv-query-exporter"
QE_PACKAGES = ["query-exporter==5.0.2", "psycopg[binary]"]

# The floor reads only the columns an exporter with our features uses: SELECT * would format
# columns nobody reads and roughly double the figure, flattering every ratio against it.
FLOOR_LOCKS = ("SELECT database, classid, objid, objsubid, pid, mode, granted, waitstart "
               "FROM pg_locks WHERE locktype = 'advisory'")
FLOOR_ACTIVITY = ("SELECT pid, backend_start, application_name, usename, client_addr, client_port, state, "
                  "state_change, query_start, xact_start FROM pg_stat_activity")
OURS_MARKER = "%WITH held AS%"
QE_MARKER = "%bench_named_keys%"
FLOOR_MARKER = "%pg_locks%"


def wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


class Floor(Background):
    """What any exporter must make the server do per poll: read pg_locks' advisory rows and
    pg_stat_activity once each. Runs in this process, on its own connection and role."""

    role = "bench_floor"
    marker = FLOOR_MARKER

    def __init__(self, dsn: str, interval: float) -> None:
        super().__init__()
        self._dsn, self._interval = dsn, interval

    def _loop(self) -> None:
        with psycopg.connect(self._dsn, autocommit=True) as conn:
            while not self._stop.is_set():
                conn.execute(FLOOR_LOCKS).fetchall()
                conn.execute(FLOOR_ACTIVITY).fetchall()
                self._stop.wait(self._interval)


class Process:
    """A subject that runs as its own process and serves /metrics."""

    role = ""
    marker = ""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _spawn(self, cmd: list[str]) -> None:
        log = open(self.workdir / f"{self.role}.log", "wb")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=BENCH_DIR.parent)
        wait_http(self.url)

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)


class Ours(Process):
    role = "bench_ours"
    marker = OURS_MARKER

    def start(self, dsn: str, named: list[int], interval: float | None, namespaces: tuple[int, ...] = (),
              presets: str | None = None) -> "Ours":
        """interval None: poll_interval left out, so auto (the default), with its default budget."""
        config = {
            "dsn": dsn,
            **({"presets": presets} if presets else {}),
            **({"poll_interval": f"{int(interval * 1000)}ms"} if interval is not None else {}),
            "locks": [{"name": f"key-{k}", "key": k} for k in named]
            + [{"name": f"family-{n}", "key": {"namespace": n}} for n in namespaces],
        }
        path = self.workdir / "ours.yaml"
        path.write_text(yaml.safe_dump(config))
        self._spawn([sys.executable, "-m", "exporter", f"--config.file={path}",
                     f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warning"])
        return self


def query_exporter_sql(named: list[int]) -> str:
    """The best single query we could write for query-exporter: one pg_locks read, names matched
    with a hash join against a VALUES list, named and unnamed rows in one result."""
    values = ",\n".join(f"('key-{k}', {(k >> 32) & 0xFFFFFFFF}::oid, {k & 0xFFFFFFFF}::oid)" for k in named)
    return f"""
WITH bench_named_keys(lock, classid, objid) AS (VALUES {values}),
adv AS (
    SELECT l.*, n.lock FROM pg_locks AS l
    LEFT JOIN bench_named_keys AS n ON n.classid = l.classid AND n.objid = l.objid AND l.objsubid = 1
                                   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
    WHERE l.locktype = 'advisory'
)
SELECT coalesce(a.lock, '(unnamed)') AS lock, coalesce(d.datname, '') AS datname,
       count(*) FILTER (WHERE a.granted) AS advisory_lock_holders,
       count(*) FILTER (WHERE NOT a.granted) AS advisory_lock_waiters
FROM adv AS a LEFT JOIN pg_database AS d ON d.oid = a.database
GROUP BY 1, 2
UNION ALL
SELECT n.lock, current_database(), 0, 0 FROM bench_named_keys AS n
WHERE NOT EXISTS (SELECT 1 FROM adv AS a WHERE a.lock = n.lock)
"""


def ensure_query_exporter() -> Path:
    """query-exporter in a venv of its own; returns its executable."""
    exe = QE_VENV / "bin" / "query-exporter"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(QE_VENV)], check=True)
        subprocess.run([str(QE_VENV / "bin" / "pip"), "install", "--quiet", *QE_PACKAGES], check=True)
    return exe


class QueryExporter(Process):
    role = "bench_qe"
    marker = QE_MARKER

    def start(self, dsn_url: str, named: list[int], interval: float) -> "QueryExporter":
        config = {
            "databases": {"pg": {"dsn": dsn_url}},
            "metrics": {
                "advisory_lock_holders": {"type": "gauge", "labels": ["lock", "datname"]},
                "advisory_lock_waiters": {"type": "gauge", "labels": ["lock", "datname"]},
            },
            "queries": {
                "advisory": {
                    "interval": max(1, int(interval)),
                    "databases": ["pg"],
                    "metrics": ["advisory_lock_holders", "advisory_lock_waiters"],
                    "sql": query_exporter_sql(named),
                }
            },
        }
        path = self.workdir / "query-exporter.yaml"
        path.write_text(yaml.safe_dump(config))
        exe = ensure_query_exporter()
        self._spawn([str(exe), "--config", str(path), "-H", "127.0.0.1", "-p", str(self.port), "-L", "warning"])
        return self


AUTO_ROLE = "bench_auto"  # this exporter on poll_interval auto, where it runs beside other subjects


def create_role(admin: psycopg.Connection, role: str) -> None:
    """A login role of the subject's own, so pg_stat_statements tells its time from the others'."""
    admin.execute(f"DROP ROLE IF EXISTS {role}")
    admin.execute(f"CREATE ROLE {role} LOGIN")
    admin.execute(f"GRANT pg_monitor TO {role}")


def create_roles(admin: psycopg.Connection) -> None:
    from bench.previous import PreviousRelease

    for role in (Floor.role, Ours.role, QueryExporter.role, PreviousRelease.role, AUTO_ROLE):
        create_role(admin, role)


def cpu_count() -> int:
    return os.cpu_count() or 1
