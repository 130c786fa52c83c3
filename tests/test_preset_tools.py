"""The tools themselves, run here against the test cluster and stalled while they hold their lock:
the exporter names the lock while it is held and does not count it as unnamed.

Kysely and graphile-migrate come from npm (tests/npmpack.py), pg_partman 4.7 and pg_repack 1.4.8
from Debian, unpacked by `make tools` with the PostgreSQL 15 this module's cluster runs
(tests/cachedtools.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import conninfo

from exporter import landing
from exporter.config import parse_config
from exporter.snapshot import ReloadStatus
from exporter.locksview import format_table, read_locks
from tests.cachedtools import NoServerWithExtensions, server_with_extensions
from tests.conftest import Server, _warm, wait_until
from tests.pgcluster import Cluster, ClusterError
from tests.metrics_util import value
from tests.npmpack import installed

pytestmark = pytest.mark.slow

KYSELY, PG, GRAPHILE_MIGRATE = ("kysely", "0.29.9"), ("pg", "8.16.3"), ("graphile-migrate", "1.4.1")


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """This module's own cluster, of the PostgreSQL 15 that has pg_partman and pg_repack (the
    conftest's server may be the machine's, without them); PG_TEST_DSN's server when it is set."""
    external = os.environ.get("PG_TEST_DSN")
    if external:
        yield Server(external, None)
        return
    try:
        bindir, lib_dir = server_with_extensions()
        cluster = Cluster(bindir=bindir, lib_dir=lib_dir, settings={"max_prepared_transactions": "10"}).start()
    except (NoServerWithExtensions, ClusterError) as exc:
        pytest.fail(str(exc))
    try:
        _warm(cluster.dsn())
        yield Server(cluster.dsn(), cluster)
    finally:
        cluster.destroy()


@pytest.fixture
def own_database(server: Server) -> Iterator[Callable[[str], str]]:
    """A database of the test's own, dropped (with whoever is still in it) at the end."""
    made: list[str] = []

    def make(name: str) -> str:
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            conn.execute(f"CREATE DATABASE {name}")
        made.append(name)
        return name

    yield make
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        for name in made:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def named_while_held(make_poller, database: str, name: str, presets: object = "all", **extra: object) -> None:
    """Poll until the preset lock `name` has a holder in database; nothing there is unnamed."""
    poller = make_poller({"presets": presets, **extra})

    def held() -> object:
        snap = poller.poll_once()
        return snap if value(snap, "pg_advisory_lock_holders", lock=name, database=database, mode="exclusive") == 1 else None

    snap = wait_until(held, timeout=30, interval=0.2)
    assert value(snap, "pg_advisory_lock_unnamed_holders", database=database) is None, name


def node_env(*packages: tuple[str, str]) -> dict[str, str]:
    paths = [str(installed(*package) / "node_modules") for package in packages]
    return {**os.environ, "NODE_PATH": os.pathsep.join(paths)}


# Kysely's own Migrator, with one migration that waits for a file: acquireMigrationLock holds the
# lock meanwhile. Kysely is ESM-only, so it is imported by path; pg through require (NODE_PATH).
KYSELY_SCRIPT = """
const {{ createRequire }} = require('module');
const pg = createRequire(process.env.NODE_PATH.split(':')[1] + '/')('pg');
const fs = require('fs');
Promise.all([import({kysely} + '/index.js'), import({kysely} + '/migration/index.js')]).then(async ([{{ Kysely, PostgresDialect, sql }}, {{ Migrator }}]) => {{
  const db = new Kysely({{ dialect: new PostgresDialect({{ pool: new pg.Pool({{ connectionString: {dsn} }}) }}) }});
  const until = async (f) => {{ while (!fs.existsSync(f)) await new Promise(r => setTimeout(r, 50)); }};
  const migrations = {{ '001_wait': {{ up: async (db) => {{ await sql`select 1`.execute(db); await until({stop}); }} }} }};
  const migrator = new Migrator({{ db, provider: {{ getMigrations: async () => migrations }} }});
  const {{ error, results }} = await migrator.migrateToLatest();
  console.log(JSON.stringify(results)); await db.destroy(); if (error) {{ console.error(error); process.exit(1); }}
}});
"""


def test_kysely_migrator(make_poller, server, own_database, tmp_path: Path) -> None:
    database = own_database("presets_kysely")
    stop = tmp_path / "stop"
    kysely = installed(*KYSELY) / "node_modules" / "kysely" / "dist"  # 0.29: the Migrator is kysely/migration
    script = KYSELY_SCRIPT.format(kysely=json.dumps(str(kysely)), dsn=json.dumps(conninfo_uri(server, database)),
                                  stop=json.dumps(str(stop)))
    proc = subprocess.Popen(["node", "-e", script], env=node_env(PG, KYSELY), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        named_while_held(make_poller, database, "kysely:migrations")
    finally:
        stop.touch()
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and '"status":"Success"' in out, err


def conninfo_uri(server: Server, database: str) -> str:
    params = conninfo.conninfo_to_dict(server.dsn(database))
    return f"postgresql://{params['user']}@{params['host']}:{params['port']}/{database}"


def test_graphile_migrate(make_poller, server, own_database, tmp_path: Path) -> None:
    """`graphile-migrate migrate --forceActions`: withAdvisoryLock holds the lock while an
    afterAllMigrations command action waits for a file."""
    database = own_database("presets_graphile")
    stop = tmp_path / "stop"
    (tmp_path / "migrations" / "committed").mkdir(parents=True)
    (tmp_path / ".gmrc").write_text(json.dumps({
        "connectionString": conninfo_uri(server, database),
        "afterAllMigrations": [{"_": "command", "command": f"while [ ! -e '{stop}' ]; do sleep 0.05; done"}],
    }))
    cli = installed(*GRAPHILE_MIGRATE) / "node_modules" / ".bin" / "graphile-migrate"
    proc = subprocess.Popen([str(cli), "migrate", "--forceActions"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        named_while_held(make_poller, database, "graphile-migrate:migrate")
    finally:
        stop.touch()
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err


def stalled(server: Server, database: str, blocker_sql: str, call: str, check: Callable[[], None]) -> None:
    """Run call in a session of its own while another session's open transaction (blocker_sql) makes
    it wait, holding its advisory lock; check; then let it finish."""
    with psycopg.connect(server.dsn(database)) as blocker:
        blocker.execute(blocker_sql)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with psycopg.connect(server.dsn(database), autocommit=True, application_name="tool") as conn:
                    conn.execute(call)
            except BaseException as exc:  # reported in the test's thread
                failure.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        try:
            check()
        finally:
            blocker.rollback()
            thread.join(60)
        assert not thread.is_alive() and not failure, (call, failure)


# pg_partman 4.7.2, as Debian ships it: each call takes its lock, then reads part_config, which
# the blocker holds ACCESS EXCLUSIVE.
PARTMAN_CALLS = {
    "pg_partman:run_maintenance": ["SELECT partman.run_maintenance(p_jobmon := false)",
                                   "CALL partman.run_maintenance_proc(p_jobmon := false)"],  # 4.7: the same key
    "pg_partman:partition_data_proc": ["CALL partman.partition_data_proc('public.events')"],
    "pg_partman:run_analyze": ["CALL partman.run_analyze()"],
    "pg_partman:reapply_constraints": ["CALL partman.reapply_constraints_proc('public.events')"],
}


@pytest.mark.timeout(600)
def test_pg_partman(make_poller, server, own_database) -> None:
    database = own_database("presets_partman")
    with psycopg.connect(server.dsn(database), autocommit=True) as conn:
        conn.execute("CREATE SCHEMA partman")
        conn.execute("CREATE EXTENSION pg_partman SCHEMA partman")
        assert conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'pg_partman'").fetchone()[0] == "4.7.2"
        conn.execute("CREATE TABLE public.events (id bigint NOT NULL, note text) PARTITION BY RANGE (id)")
        conn.execute("SELECT partman.create_parent('public.events', 'id', 'native', '10')")
    for name, calls in PARTMAN_CALLS.items():
        for call in calls:
            stalled(server, database, "LOCK TABLE partman.part_config IN ACCESS EXCLUSIVE MODE", call,
                    lambda name=name: named_while_held(make_poller, database, name))


@pytest.mark.timeout(600)
def test_pg_repack_names_the_table(make_poller, server, own_database, tmp_path: Path) -> None:
    """pg_repack takes (16185446, oid - 2**31), then waits for its ACCESS EXCLUSIVE lock on the
    table behind a reader's open transaction (--no-kill-backend: it never cancels the reader)."""
    database = own_database("presets_repack")
    with psycopg.connect(server.dsn(database), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION pg_repack")
        conn.execute("CREATE TABLE orders (id int PRIMARY KEY, note text)")
        conn.execute("INSERT INTO orders SELECT g, 'n' || g FROM generate_series(1, 1000) AS g")
        oid = conn.execute("SELECT 'orders'::regclass::oid::int8").fetchone()[0]
    params = conninfo.conninfo_to_dict(server.dsn(database))
    env = {**os.environ, "PGHOST": params["host"], "PGPORT": str(params["port"]), "PGUSER": params["user"]}
    bindir, lib_dir = server_with_extensions()
    if lib_dir:
        env["LD_LIBRARY_PATH"] = lib_dir
    with psycopg.connect(server.dsn(database)) as reader:
        reader.execute("SELECT count(*) FROM orders")
        proc = subprocess.Popen([os.path.join(bindir, "pg_repack"), "--no-kill-backend", "--wait-timeout=120",
                                 "-d", database, "-t", "orders"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        try:
            named_while_held(make_poller, database, "pg_repack:table", presets=["pg_repack"])
            snap = make_poller({"presets": ["pg_repack"]}).poll_once()
            assert value(snap, "pg_advisory_lock_keys_held", lock="pg_repack:table", database=database) == 1
            assert value(snap, "pg_advisory_lock_held_seconds", lock="pg_repack:table", database=database) is not None
            # The landing page, from a poller connected to that database, names the table too.
            here = make_poller({"dsn": server.dsn(database), "presets": ["pg_repack"]}).poll_once()
            key = f"16185446,{oid - 2**31}"
            assert here.key_notes == {(database, key): "table public.orders"}
            assert "&mdash; table public.orders" in landing.render(here, (), ReloadStatus(), "/metrics").decode()
            # From another database the catalog is out of reach: the oid.
            assert snap.key_notes == {(database, key): f"table oid {oid}"}
            # The locks command, connected to that database, names the table.
            config = parse_config({"dsn": server.dsn(database), "presets": ["pg_repack"]}, "t")
            (row,) = [r for r in read_locks(config) if r.source == "preset"]
            assert (row.name, row.detail, row.key) == ("pg_repack:table", "public.orders", f"(16185446, {oid - 2**31})")
            assert "pg_repack:table public.orders  [(16185446, " in format_table([row])
            # From another database the catalog is out of reach: the oid is shown.
            config = parse_config({"dsn": server.dsn(), "presets": ["pg_repack"]}, "t")
            (row,) = [r for r in read_locks(config) if r.source == "preset"]
            assert row.detail == f"table oid {oid}"
        finally:
            reader.rollback()
            out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err
