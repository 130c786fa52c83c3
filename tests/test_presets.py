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
        # Read only here (run for real in test_preset_tools.py where the tool installs):
        # Sequel::Migrator.run(use_advisory_lock: true): "sequel-migration".codepoints.reduce(:*) % 2**63
        "sequel:migrations": ("SELECT pg_try_advisory_lock(4966325471869609408)", False),
        # tern migrate/migrate.go: select pg_advisory_lock($1) with lockNum
        "tern:migrations": ("SELECT pg_advisory_lock(9628173550095224)", False),
        # pg_partman 5.x run_maintenance_proc and undo_partition (4.7 takes other names: run for real)
        "pg_partman:run_maintenance_proc": ("SELECT pg_try_advisory_lock(hashtext('pg_partman run_maintenance procedure'))", False),
        "pg_partman:undo_partition": ("SELECT pg_try_advisory_xact_lock(hashtext('pg_partman undo_partition'))", True),
        "pg_partman:undo_partition_proc": (
            "SELECT pg_try_advisory_xact_lock(hashtext('pg_partman undo_partition_proc'), hashtext('public.events'))", True),
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
    assert [(s.name, s.database) for s in snap.locks] == [(name, database)]  # no other preset's series
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
    assert snap.locks == ()  # 37 preset locks and families in 2 databases, none taken: no series at all
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


# Ecto's key is :erlang.phash2({:ecto, prefix, repo}): checked against real Erlang (erl), for
# several repo names, the one case the table of make_hash2 has for a Latin-1 letter included.
ECTO_REPOS = ["MyApp.Repo", "Repo", "Billing.Infra.ReadOnlyRepo", "A_1.B2.Repo", "Ünïcode.Repo"]


def erl(expression: str) -> str:
    import subprocess

    return subprocess.run(["erl", "-noshell", "-eval", f"io:format(\"~p~n\", [{expression}]), halt()."],
                          capture_output=True, text=True, check=True, timeout=60).stdout.strip()


def test_ecto_key_is_erlangs_phash2() -> None:
    atoms = ", ".join(f"binary_to_atom(<<\"Elixir.{repo}\"/utf8>>, utf8)" for repo in ECTO_REPOS)
    out = erl(f"[erlang:phash2({{ecto, nil, A}}) || A <- [{atoms}]]")
    assert out == "[" + ",".join(str(presets.ecto(repo)) for repo in ECTO_REPOS) + "]"
    assert presets.ecto("MyApp.Repo") == presets.ecto("Elixir.MyApp.Repo") == 41811489


def test_with_advisory_lock_key_is_crc32_as_erlang_computes_it() -> None:
    names = ["invoice-run", "x", "naïve lock", "a" * 300]
    binaries = ", ".join(f"<<\"{name}\"/utf8>>" for name in names)
    out = erl(f"[erlang:crc32(B) band 16#7fffffff || B <- [{binaries}]]")
    assert out == "[" + ",".join(str(presets.with_advisory_lock(name)[0]) for name in names) + "]"
    assert presets.with_advisory_lock("invoice-run", 7)[1] == 7
    assert presets.with_advisory_lock("x", -1)[1] == 0x7FFFFFFF  # Ruby: "-1".to_i & 0x7fffffff


def test_ecto_and_with_advisory_lock_locks_are_named(make_poller, sessions) -> None:
    repo_key = int(erl("erlang:phash2({ecto, nil, 'Elixir.Billing.Repo'})"))
    gem_key = [int(half) for half in erl("[erlang:crc32(<<\"invoice-run\">>) band 16#7fffffff, 7]").strip("[]").split(",")]
    # Ecto (postgres.ex advisory_lock): SELECT pg_try_advisory_lock(#{lock}); the gem: its two ints.
    sessions.open(OTHER_DB, application_name="ecto").execute(f"SELECT pg_try_advisory_lock({repo_key})")
    sessions.open(OTHER_DB, application_name="rails").execute(f"SELECT pg_try_advisory_lock({gem_key[0]}, {gem_key[1]})")
    poller = make_poller({"presets": ["all", {"ecto": "Billing.Repo"}], "locks": [
        {"name": "invoices", "key": {"with_advisory_lock": {"name": "invoice-run", "prefix": 7}}, "database": OTHER_DB}]})
    snap = poller.poll_once()
    assert value(snap, "pg_advisory_lock_holders", lock="ecto:Billing.Repo:migrations", database=OTHER_DB, mode="exclusive") == 1
    assert value(snap, "pg_advisory_lock_holders", lock="invoices", database=OTHER_DB, mode="exclusive") == 1
    assert value(snap, "pg_advisory_lock_unnamed_holders", database=OTHER_DB) is None
    # "all" alone never guesses a repo: the key is unnamed without the parameter.
    snap = make_poller({"presets": "all"}).poll_once()
    assert value(snap, "pg_advisory_lock_unnamed_holders", database=OTHER_DB) == 2


def test_a_configured_family_wins_over_a_preset_family(make_poller, sessions) -> None:
    sessions.open().execute("SELECT pg_advisory_lock(16185446, -2147483000)")
    sessions.open(OTHER_DB).execute("SELECT pg_advisory_lock(16185446, -2147483000)")
    snap = make_poller({"presets": ["pg_repack"], "locks": [
        {"name": "repacks", "key": {"namespace": 16185446}, "max_hold": "1h"}]}).poll_once()
    assert value(snap, "pg_advisory_lock_holders", lock="repacks", database="postgres", mode="exclusive") == 1
    assert value(snap, "pg_advisory_lock_max_hold_seconds", lock="repacks", database="postgres") == 3600
    assert value(snap, "pg_advisory_lock_holders", lock="pg_repack:table", database="postgres", mode="exclusive") is None
    # ... in its database only: elsewhere the preset family still names the key.
    assert [(s.name, s.database) for s in snap.locks] == [("repacks", "postgres"), ("pg_repack:table", OTHER_DB)]
    assert value(snap, "pg_advisory_lock_keys_held", lock="pg_repack:table", database=OTHER_DB) == 1
