"""Presets: each tool's lock, taken exactly as the tool takes it, is named by the exporter."""

from __future__ import annotations

import pytest

from exporter import presets
from exporter.metrics import render
from tests.conftest import OTHER_DB
from tests.metrics_util import series, value


# Keys of the database-dependent tools, pinned as literals computed outside this codebase: with
# OpenJDK 17's java.util.zip.CRC32 and each tool's formula as its source writes it (Rails
# MIGRATOR_SALT * Zlib.crc32(db); golang-migrate uint32(crc32(schema\0table\0db) * salt) and its
# older / Grafana's form over the database alone; sqlx 0x3d32ad9e * crc32(db) as i64), so a wrong
# formula or CRC in exporter/presets.py cannot pass by being written again here.
PINNED = {
    "postgres": {"rails": 737815420147457505, "golang-migrate": 143310882, "grafana": 3057848503,
                 "sqlx": 368907709894077238},
    OTHER_DB: {"rails": 6795571841085100605, "golang-migrate": 4061107334, "grafana": 3459305211,
               "sqlx": 3397785918887888798},
}


def take_as_the_tool(database: str) -> dict[str, tuple[str, bool]]:
    """preset lock name -> (the tool's own SQL with its key, whether it is transaction-level)."""
    pinned = PINNED.get(database, PINNED["postgres"])
    return {
        # ActiveRecord::Migrator: pg_try_advisory_lock(MIGRATOR_SALT * Zlib.crc32(current_database))
        "rails:migrations": (f"SELECT pg_try_advisory_lock({pinned['rails']})", False),
        # golang-migrate postgres driver: pg_advisory_lock($1)
        "golang-migrate:migrations": (f"SELECT pg_advisory_lock({pinned['golang-migrate']})", False),
        "grafana|golang-migrate-v4.14:migrations": (f"SELECT pg_try_advisory_lock({pinned['grafana']})", False),
        # Flyway: 0x466C79776179 + '"public"."flyway_schema_history"'.hashCode(); the hash is
        # 2125624436, as OpenJDK 17 computes it (java.lang.String.hashCode).
        "flyway:migrations": ("SELECT pg_try_advisory_xact_lock(77431708279161 + 2125624436)", True),
        "prisma:migrations": ("SELECT pg_advisory_lock(72707369)", False),
        "node-pg-migrate:migrations": ("SELECT pg_try_advisory_lock(7241865325823964)", False),
        "goose:migrations": ("SELECT pg_try_advisory_lock(4097083626)", False),
        "goose:migrations-crc64": ("SELECT pg_try_advisory_lock(5887940537704921958)", False),
        # sqlx Migrator::run: pg_advisory_lock($1)
        "sqlx:migrations": (f"SELECT pg_advisory_lock({pinned['sqlx']})", False),
        "sqitch:deploy": ("SELECT pg_try_advisory_lock(75474063)", False),
        "atlas:migrate-execute": ("SELECT pg_try_advisory_lock(2686470616)", False),
        "pgroll:migrations": ("SELECT pg_advisory_xact_lock(12388221127840347)", True),
    }


@pytest.mark.parametrize("database", ["postgres", OTHER_DB])
@pytest.mark.parametrize("name", sorted(take_as_the_tool("x")))
def test_each_preset_lock_is_named(make_poller, sessions, database: str, name: str) -> None:
    sql, transactional = take_as_the_tool(database)[name]
    conn = sessions.open(database, autocommit=not transactional, application_name=name.split(":")[0])
    conn.execute(sql)
    snap = make_poller({"presets": "all"}).poll_once()
    assert value(snap, "pg_advisory_lock_holders", lock=name, database=database, mode="exclusive") == 1, name
    holders = series(render(snap).decode(), "pg_advisory_lock_holder_info")
    assert [(h["lock"], h["database"], h["source"]) for h in holders] == [(name, database, "preset")]
    assert value(snap, "pg_advisory_lock_unnamed_holders", database=database) is None
    if transactional:
        conn.rollback()


def test_presets_are_off_unless_asked_and_airflow_only_by_name(make_poller, sessions) -> None:
    sessions.open().execute("SELECT pg_advisory_lock(72707369), pg_advisory_lock(1)")
    snap = make_poller({"locks": []}).poll_once()
    assert snap.locks == () and value(snap, "pg_advisory_lock_unnamed_holders", database="postgres") == 2
    snap = make_poller({"presets": "all", "locks": []}).poll_once()
    assert value(snap, "pg_advisory_lock_holders", lock="prisma:migrations", database="postgres", mode="exclusive") == 1
    assert value(snap, "pg_advisory_lock_unnamed_holders", database="postgres") == 1  # key 1: airflow is not in all
    snap = make_poller({"presets": ["airflow"], "locks": []}).poll_once()
    assert value(snap, "pg_advisory_lock_holders", lock="airflow:migrations", database="postgres", mode="exclusive") == 1


def test_a_configured_name_wins_over_a_preset(make_poller, sessions) -> None:
    sessions.open().execute("SELECT pg_advisory_lock(72707369)")
    sessions.open(OTHER_DB).execute("SELECT pg_advisory_lock(72707369)")
    snap = make_poller({"presets": ["prisma"], "locks": [{"name": "our-migrations", "key": 72707369}]}).poll_once()
    assert value(snap, "pg_advisory_lock_holders", lock="our-migrations", database="postgres", mode="exclusive") == 1
    assert value(snap, "pg_advisory_lock_holders", lock="prisma:migrations", database="postgres", mode="exclusive") is None
    # In the other database, where the config names nothing, the preset still applies.
    assert value(snap, "pg_advisory_lock_holders", lock="prisma:migrations", database=OTHER_DB, mode="exclusive") == 1


def test_a_preset_locks_series_appear_once_taken_and_stay(make_poller, sessions) -> None:
    poller = make_poller({"presets": "all"})
    snap = poller.poll_once()
    assert snap.locks == ()  # 21 preset locks in 2 databases, none taken: no series at all
    holder = sessions.open(OTHER_DB)
    holder.execute("SELECT pg_advisory_lock(72707369)")
    snap = poller.poll_once()
    assert [(s.name, s.database) for s in snap.locks] == [("prisma:migrations", OTHER_DB)]
    holder.execute("SELECT pg_advisory_unlock(72707369)")
    snap = poller.poll_once()
    assert value(snap, "pg_advisory_lock_holders", lock="prisma:migrations", database=OTHER_DB, mode="exclusive") == 0
    assert value(snap, "pg_advisory_lock_held_seconds", lock="prisma:migrations", database=OTHER_DB) == 0


# The advisory lock keys pg-boss's plans take (locked() and tryAdvisoryLock() in plans.js), per
# version, read in its source: the SQL of each is generated below by pg-boss's own code.
PG_BOSS = {
    "11.0.0": ("", "create-queue", "delete-queue", "queue-stats", "job_commonfailJobsByTimeout", "job_commondeletion"),
    "12.38.0": tuple(key for _, key in presets.PG_BOSS_KEYS),
}
PG_BOSS_NAMES = {key: name for name, key in presets.PG_BOSS_KEYS}
PG_BOSS_SQL = {
    # 11 exports locked(schema, sql, key), the transaction pg-boss runs; 12 exports advisoryLockKey.
    "11.0.0": "const p = require('{dir}/src/plans.js'); "
              "const out = {{}}; for (const k of {keys}) out[k] = p.locked('pgboss', 'SELECT 1', k || undefined); "
              "console.log(JSON.stringify(out))",
    "12.38.0": "import('{dir}/dist/plans.js').then(p => {{ const out = {{}}; "
               "for (const k of {keys}) out[k] = 'SELECT pg_advisory_xact_lock(' + p.advisoryLockKey('pgboss', k || undefined) + ')'; "
               "console.log(JSON.stringify(out)) }})",
}


def pg_boss_lock_sql(version: str) -> dict[str, str]:
    """key suffix -> the statement pg-boss itself generates to take that lock."""
    import json
    import re
    import subprocess

    from tests.npmpack import unpacked

    package = unpacked("pg-boss", version)
    keys = json.dumps(list(PG_BOSS[version]))
    out = subprocess.run(["node", "-e", PG_BOSS_SQL[version].format(dir=package, keys=keys)],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    statements = {}
    for key, sql in json.loads(out).items():
        statements[key] = re.search(r"SELECT pg_advisory_xact_lock\((.*)\)", sql, re.S).group(0)
    return statements


@pytest.mark.parametrize("version", sorted(PG_BOSS))
def test_every_pg_boss_lock_is_named_as_pg_boss_takes_it(make_poller, sessions, version: str) -> None:
    statements = pg_boss_lock_sql(version)
    poller = make_poller({"presets": ["pg-boss"]})
    for key, sql in statements.items():
        conn = sessions.open(OTHER_DB, autocommit=False, application_name="pg-boss")
        conn.execute(sql)
        snap = poller.poll_once()
        name = PG_BOSS_NAMES[key]
        assert value(snap, "pg_advisory_lock_holders", lock=name, database=OTHER_DB, mode="exclusive") == 1, (key, name)
        assert value(snap, "pg_advisory_lock_unnamed_holders", database=OTHER_DB) is None, key
        conn.rollback()


def test_unknown_preset_is_a_located_config_error() -> None:
    from exporter.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as info:
        parse_config({"presets": ["rails", "liquibase"], "locks": []}, "x")
    assert info.value.details[0].startswith("presets[1]: unknown preset 'liquibase' (known: rails, golang-migrate")


def test_java_string_hash_matches_java() -> None:
    assert presets.java_string_hash("hello") == 99162322
    assert presets.java_string_hash('"public"."flyway_schema_history"') == 2125624436
    assert presets.java_string_hash("ü€") == 252 * 31 + 8364
