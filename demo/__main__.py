"""make demo: the exporter over a throwaway PostgreSQL with a sample workload.

Three cron contenders race for hourly-digest, a leader holds billing-leader, a crashed-but-connected
worker sits on shard-7 inside an open transaction, and a second worker waits for it; a deploy's
migration holds its lock and waits for a table a report reads, and another pod waits for the
migration's lock (a chain to a root blocker); where Debian's pgbouncer is installed, a migration
runner leaves a session lock stranded on a transaction pool. And trouble to see: the stuck shard-7
is over its max_hold of 5s within seconds (red on the landing page), the deploy's migration over
its 30s within a minute, the legacy job's keys nobody named over unnamed_max_hold; the probe of
nightly-export expects it held and finds it free. Ctrl-C stops and removes all of it.
DEMO_DSN=... uses your server instead of a throwaway one.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import psycopg
from prometheus_client.parser import text_string_to_metric_families

from tests.pgbouncer import PgBouncer, PgBouncerError
from tests.pgcluster import Cluster, ClusterError, free_port

DEMO_DB = "app"
SHARD_7_MAX_HOLD = 5.0  # seconds: the stuck worker turns red within seconds of the start
CONFIG = """\
dsn: "{dsn}"
poll_interval: 1s
probe_interval: 2s
unnamed_max_hold: 5s                  # the legacy job's keys nobody named: over it within seconds
locks:
  - name: hourly-digest
    key: {{hashtext: hourly-digest}}
    max_hold: 10s                     # a contender works 2-5 s: never over
  - name: billing-leader
    key: 4242
    probe: {{expect: held}}             # the leader is there: as expected
  - name: shard-7
    key: [42, 7]
    max_hold: 5s                      # the crashed worker never lets go: red within seconds
  - name: nightly-export
    key: {{hashtextextended: nightly-export}}
    probe: {{expect: held}}             # the export should be running; nobody holds it: NOT as expected
  - name: schema-migration
    key: 777
  - name: deploy-migrations
    key: 8888
    max_hold: 30s                     # the blocked migration: red within a minute
{poolers}"""
POOLERS = """poolers:
  - name: pgbouncer
    type: pgbouncer
    dsn: "{console}"
"""


def cron_contender(dsn: str, name: str, stop: threading.Event) -> None:
    """Every few seconds, try the digest lock; whoever gets it works for a while."""
    with psycopg.connect(dsn, autocommit=True, application_name=name) as conn:
        while not stop.is_set():
            got = conn.execute("SELECT pg_try_advisory_lock(hashtext('hourly-digest'))").fetchone()[0]
            if got:
                stop.wait(random.uniform(2, 5))
                conn.execute("SELECT pg_advisory_unlock(hashtext('hourly-digest'))")
            stop.wait(random.uniform(0.5, 2))


def hold_forever(dsn: str, name: str, sql: str, stop: threading.Event, autocommit: bool = True) -> None:
    with psycopg.connect(dsn, autocommit=autocommit, application_name=name) as conn:
        conn.execute(sql)
        stop.wait()
        if not autocommit:
            conn.rollback()


def waiter(dsn: str, stop: threading.Event) -> None:
    """Blocks in pg_advisory_lock(42, 7) behind the stuck worker until the demo ends."""
    with psycopg.connect(dsn, autocommit=True, application_name="shard-7-worker-b") as conn:
        threading.Thread(target=lambda: (stop.wait(), conn.cancel()), daemon=True).start()
        try:
            conn.execute("SELECT pg_advisory_lock(42, 7)")
        except psycopg.errors.QueryCanceled:
            pass


def blocked_migration(dsn: str, stop: threading.Event) -> None:
    """A report reads users in an open transaction; a deploy's migration takes its advisory lock,
    then waits for ACCESS EXCLUSIVE on users; another pod waits for the migration's lock."""
    with psycopg.connect(dsn, autocommit=True) as setup:
        setup.execute("CREATE TABLE IF NOT EXISTS demo_users (id int)")
    with psycopg.connect(dsn, application_name="report-runner") as report, \
            psycopg.connect(dsn, application_name="deploy-migrate") as migration, \
            psycopg.connect(dsn, autocommit=True, application_name="deploy-pod-2") as pod:
        report.execute("SELECT count(*) FROM demo_users")
        migration.execute("SELECT pg_advisory_lock(8888)")
        threading.Thread(target=lambda: (stop.wait(), migration.cancel(), pod.cancel()), daemon=True).start()
        threading.Thread(target=_quietly, args=(pod, "SELECT pg_advisory_lock(8888)"), daemon=True).start()
        _quietly(migration, "LOCK TABLE demo_users IN ACCESS EXCLUSIVE MODE")


def _quietly(conn: psycopg.Connection, sql: str) -> None:
    try:
        conn.execute(sql)
    except psycopg.errors.QueryCanceled:
        pass


def strand_a_session_lock(bouncer_dsn: str) -> None:
    """A migration runner, through the transaction-mode PgBouncer, takes a session lock and exits:
    the lock stays on the pooled server connection, owned by nobody."""
    with psycopg.connect(bouncer_dsn, autocommit=True, application_name="migration-runner", prepare_threshold=None) as conn:
        conn.execute("SELECT pg_advisory_lock(777)")


def start_workload(dsn: str, stop: threading.Event) -> list[threading.Thread]:
    jobs = [
        (cron_contender, (dsn, f"digest-cron-{i}", stop)) for i in range(1, 4)
    ] + [
        (hold_forever, (dsn, "billing-leader", "SELECT pg_advisory_lock(4242)", stop)),
        (hold_forever, (dsn, "shard-7-worker-a", "SELECT pg_advisory_lock(42, 7)", stop, False)),
        (hold_forever, (dsn, "legacy-job", "SELECT pg_advisory_lock(900001), pg_advisory_lock(900002)", stop)),
        (blocked_migration, (dsn, stop)),
    ]
    threads = [threading.Thread(target=fn, args=args, daemon=True) for fn, args in jobs]
    for t in threads:
        t.start()
    time.sleep(0.5)
    waiting = threading.Thread(target=waiter, args=(dsn, stop), daemon=True)
    waiting.start()
    return [*threads, waiting]


def scrape(url: str) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """The exposition, and its samples by (name, sorted labels)."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return text, {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                  for family in text_string_to_metric_families(text) for sample in family.samples}


def showing_trouble(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> bool:
    """Whether a scrape shows what the demo is for: shard-7 over its max_hold, the keys nobody named
    over unnamed_max_hold, the failing probe tried, a digest contender holding its lock."""
    def get(name: str, **labels: str) -> float:
        return samples.get((f"pg_advisory_lock_{name}", tuple(sorted({"database": DEMO_DB, **labels}.items()))), 0.0)

    return (get("held_seconds", lock="shard-7") > SHARD_7_MAX_HOLD and get("unnamed_held_seconds") > 5.0
            and ("pg_advisory_lock_probe_ok", (("database", DEMO_DB), ("lock", "nightly-export"))) in samples
            and get("holders", lock="hourly-digest", mode="exclusive") == 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0, help="stop by itself after this long (0: until Ctrl-C)")
    parser.add_argument("--port", type=int, default=10105, help="where the exporter listens; 0: a free port")
    args = parser.parse_args()
    if not 0 <= args.port <= 65535:
        parser.error(f"--port: {args.port} is not a port (0 to 65535)")

    cluster = None
    dsn = os.environ.get("DEMO_DSN")
    if not dsn:
        try:
            print("starting a throwaway PostgreSQL ...", flush=True)
            cluster = Cluster().start()
        except ClusterError as exc:
            print(f"demo: {exc}\nor run with DEMO_DSN='postgresql://user@host/db' to use your own server", file=sys.stderr)
            return 1
        print(f"throwaway PostgreSQL on port {cluster.port}, data dir {cluster.datadir}", flush=True)
        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DEMO_DB}")
        dsn = cluster.dsn(DEMO_DB)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    bouncer = None
    poolers = ""
    if cluster is not None:
        try:
            bouncer = PgBouncer(cluster.port, pool_mode="transaction").start()
            strand_a_session_lock(bouncer.dsn(DEMO_DB))
            poolers = POOLERS.format(console=bouncer.console_dsn())
            print("a PgBouncer in transaction mode holds a stranded session lock (schema-migration)", flush=True)
        except PgBouncerError as exc:
            print(f"no PgBouncer in this demo ({exc})", flush=True)
            bouncer = None
    workdir = tempfile.mkdtemp(prefix="pgale-demo-")
    config_path = os.path.join(workdir, "config.yaml")
    with open(config_path, "w") as handle:
        handle.write(CONFIG.format(dsn=dsn, poolers=poolers))
    port = args.port or free_port()
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
        port = free_port()  # something already answers there
    except OSError:
        pass

    exporter = None
    try:
        start_workload(dsn, stop)
        exporter = subprocess.Popen(
            [sys.executable, "-m", "exporter", f"--config.file={config_path}", f"--web.listen-address=127.0.0.1:{port}"]
        )
        url = f"http://127.0.0.1:{port}/metrics"
        # Print once there is trouble to see (a few seconds), or after 30 s whatever the scrape shows.
        give_up = time.monotonic() + 30
        text = ""
        while not stop.is_set():
            time.sleep(1)
            try:
                text, samples = scrape(url)
            except OSError:
                samples = {}  # the exporter is still starting
            if showing_trouble(samples) or time.monotonic() > give_up:
                break
        lines = [l for l in text.splitlines() if l.startswith("pg_advisory_lock_") and "_bucket" not in l]
        print("\n".join(lines[:150]))
        locks = subprocess.run([sys.executable, "-m", "exporter", "locks", f"--config.file={config_path}"],
                               capture_output=True, text=True, timeout=30)
        print("\n$ pg-advisory-lock-exporter locks\n" + locks.stdout.rstrip())
        print(f"\nlanding page: http://127.0.0.1:{port}/   metrics: {url}")
        print("      (in order of trouble: shard-7 over its max_hold, red; the blocked migration; the stranded lock; ...)")
        print(f"try:  curl -s {url} | grep -E 'holders|held_seconds|waiters|holder_info|probe_ok'")
        print(f"      {sys.executable} -m exporter locks --config.file={config_path}")
        print("Ctrl-C stops the exporter, the workload and the throwaway PostgreSQL.", flush=True)
        deadline = time.monotonic() + args.seconds if args.seconds else None
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            stop.wait(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        if exporter is not None:
            exporter.terminate()
            exporter.wait(10)
        if bouncer is not None:
            bouncer.stop()
        if cluster is not None:
            cluster.destroy()
        shutil.rmtree(workdir, ignore_errors=True)
        print("demo stopped and cleaned up")
    return 0


if __name__ == "__main__":
    sys.exit(main())
