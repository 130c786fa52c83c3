"""The advisory lock keys of well-known tools, so their locks are named without configuration.

Each formula is taken from the tool's own source (see README, "Presets"). Keys that depend on
the database (or schema) are computed for each database the exporter sees.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from . import keys

DEFAULT_SCHEMA = "public"


def _u32(value: int) -> int:
    return value & 0xFFFFFFFF


def _crc32(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def java_string_hash(text: str) -> int:
    """java.lang.String.hashCode(): s[0]*31^(n-1) + ... over UTF-16 code units, as a signed int."""
    h = 0
    for unit in text.encode("utf-16-be").hex(" ", 2).split():
        h = (31 * h + int(unit, 16)) & 0xFFFFFFFF
    return h - 2**32 if h > 0x7FFFFFFF else h


def rails(database: str) -> int:
    # activerecord/lib/active_record/migration.rb: MIGRATOR_SALT * Zlib.crc32(current_database)
    return 2053462845 * _crc32(database)


def golang_migrate(database: str, schema: str = DEFAULT_SCHEMA, table: str = "schema_migrations") -> int:
    # database/util.go: uint32(crc32(schema \0 table \0 database) * 1486364155), v4.15+
    return _u32(_crc32("\x00".join((schema, table, database))) * 1486364155)


def golang_migrate_database_only(database: str) -> int:
    # The same formula over the database name alone: golang-migrate before v4.15, and Grafana.
    return _u32(_crc32(database) * 1486364155)


def flyway(schema: str = DEFAULT_SCHEMA, table: str = "flyway_schema_history") -> int:
    # PostgreSQLAdvisoryLockTemplate.java: 0x466C79776179 ("Flyway") + table.toString().hashCode()
    return 0x466C79776179 + java_string_hash(f'"{schema}"."{table}"')


def sqlx(database: str) -> int:
    # sqlx-postgres migrate.rs: 0x3d32ad9e * crc32(current_database()) as i64
    return 0x3D32AD9E * _crc32(database)


def pg_boss(database: str, schema: str = "pgboss", key: str = "") -> int:
    # plans.js advisoryLockKey():
    # ('x' || encode(sha224((current_database() || '.pgboss.' || schema || key)::bytea), 'hex'))::bit(64)::bigint
    digest = hashlib.sha224(f"{database}.pgboss.{schema}{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


# Every advisory lock pg-boss takes (plans.js, locked() and tryAdvisoryLock()): one key per purpose,
# hashed with the database and schema. The maintenance keys of the queues' shared table
# (job_common) are named; a partitioned queue's own table gets keys of its own, unnamed here.
PG_BOSS_KEYS = (
    ("pg-boss:install", ""),                                  # install and migrations (every version)
    ("pg-boss:create-queue", "create-queue"),                 # 11+
    ("pg-boss:delete-queue", "delete-queue"),                 # 11+
    ("pg-boss:queue-stats", "queue-stats"),                   # 11+ (a try-lock in 12)
    ("pg-boss:queue-stats-insert", "queue-stats-insert"),     # 12
    ("pg-boss:bam-claim", "bamClaim"),                        # 12
    ("pg-boss:expire", "job_commonfailJobsByTimeout"),        # 11+: supervise, jobs past their expiry
    ("pg-boss:heartbeat", "job_commonfailJobsByHeartbeat"),   # 12
    ("pg-boss:deletion", "job_commondeletion"),               # 11+: supervise, retention
    ("pg-boss:cleanup-dependencies", "job_commoncleanupDependencies"),  # 12
)


@dataclass(frozen=True)
class PresetLock:
    """One lock a tool takes: its name and how to compute its key in a database."""

    name: str
    key: Callable[[str], keys.LiteralKey]


def _fixed(value: int) -> Callable[[str], keys.LiteralKey]:
    return lambda database: keys.BigintKey(value)


def _per_database(formula: Callable[[str], int]) -> Callable[[str], keys.LiteralKey]:
    return lambda database: keys.BigintKey(formula(database))


# Grafana and golang-migrate before v4.15 take the very same key: the name says so.
_SHARED_GRAFANA_GOLANG_MIGRATE = PresetLock("grafana|golang-migrate-v4.14:migrations", _per_database(golang_migrate_database_only))

PRESETS: dict[str, tuple[PresetLock, ...]] = {
    "rails": (PresetLock("rails:migrations", _per_database(rails)),),
    "golang-migrate": (
        PresetLock("golang-migrate:migrations", _per_database(golang_migrate)),
        _SHARED_GRAFANA_GOLANG_MIGRATE,
    ),
    "grafana": (_SHARED_GRAFANA_GOLANG_MIGRATE,),
    "flyway": (PresetLock("flyway:migrations", lambda database: keys.BigintKey(flyway())),),
    "prisma": (PresetLock("prisma:migrations", _fixed(72707369)),),
    "node-pg-migrate": (PresetLock("node-pg-migrate:migrations", _fixed(7241865325823964)),),
    # goose's lock.DefaultLockID: crc32("goose") today, crc64("goose") in earlier releases.
    "goose": (
        PresetLock("goose:migrations", _fixed(4097083626)),
        PresetLock("goose:migrations-crc64", _fixed(5887940537704921958)),
    ),
    "sqlx": (PresetLock("sqlx:migrations", _per_database(sqlx)),),
    "sqitch": (PresetLock("sqitch:deploy", _fixed(75474063)),),
    "atlas": (PresetLock("atlas:migrate-execute", _fixed(2686470616)),),
    "pgroll": (PresetLock("pgroll:migrations", _fixed(12388221127840347)),),
    "pg-boss": tuple(
        PresetLock(name, _per_database(lambda database, key=key: pg_boss(database, key=key))) for name, key in PG_BOSS_KEYS
    ),
    # Keys 1 and 2 collide easily with anything else: never part of "all".
    "airflow": (
        PresetLock("airflow:migrations", _fixed(1)),
        PresetLock("airflow:scheduler", _fixed(2)),
    ),
}
NOT_IN_ALL = frozenset({"airflow"})
ALL = "all"


def expand(names: Iterable[str]) -> tuple[PresetLock, ...]:
    """The preset locks of the named presets ("all": every preset but those NOT_IN_ALL), once each."""
    chosen = [n for n in PRESETS if n not in NOT_IN_ALL] if ALL in names else list(names)
    seen: dict[str, PresetLock] = {}
    for name in chosen:
        for lock in PRESETS[name]:
            seen.setdefault(lock.name, lock)
    return tuple(seen.values())
