"""The advisory lock keys of well-known tools, so their locks are named without configuration.

Each formula is taken from the tool's own source (see docs/presets.md). Keys that depend on
the database (or schema) are computed for each database the exporter sees.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Union

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


def with_advisory_lock(name: str, prefix: int = 0) -> tuple[int, int]:
    """The with_advisory_lock gem's (int4, int4) key of a lock name: core_advisory.rb stable_hashcode
    (Zlib.crc32) and postgresql_advisory.rb lock_keys_for, each half masked with 0x7fffffff; the
    second half is WITH_ADVISORY_LOCK_PREFIX.to_i (0 when unset)."""
    return _crc32(name) & 0x7FFFFFFF, prefix & 0x7FFFFFFF


# Erlang's erlang:phash2/1 (erts utils.c make_hash2), for the terms Ecto hashes: tuples of atoms.
# phash2 is documented to be the same on every ERTS version and machine.
_GOLDEN = 0x9E3779B9


def _mix(a: int, b: int, c: int) -> int:
    """Bob Jenkins' lookup2 mix, as erts's MIX(a, b, c): the new c."""
    m = 0xFFFFFFFF
    a = (a - b - c) & m; a ^= c >> 13  # noqa: E702 - the macro's nine lines, one per line
    b = (b - c - a) & m; b ^= (a << 8) & m  # noqa: E702
    c = (c - a - b) & m; c ^= b >> 13  # noqa: E702
    a = (a - b - c) & m; a ^= c >> 12  # noqa: E702
    b = (b - c - a) & m; b ^= (a << 16) & m  # noqa: E702
    c = (c - a - b) & m; c ^= b >> 5  # noqa: E702
    a = (a - b - c) & m; a ^= c >> 3  # noqa: E702
    b = (b - c - a) & m; b ^= (a << 10) & m  # noqa: E702
    c = (c - a - b) & m; c ^= b >> 15  # noqa: E702
    return c


def _uint32_hash(hash_: int, value: int, n: int) -> int:
    """erts UINT32_HASH(value, HCONST_n): HCONST_n is the golden ratio times n."""
    const = (_GOLDEN * n) & 0xFFFFFFFF
    return _mix((const + value) & 0xFFFFFFFF, const, hash_)


def _atom_hash(name: str) -> int:
    """erts atom.c atom_hash: hashpjw over the atom's UTF-8 bytes, a two-byte Latin-1 letter as one."""
    data = name.encode("utf-8")
    h, i = 0, 0
    while i < len(data):
        v = data[i]
        i += 1
        if i < len(data) and v & 0xFE == 0xC2 and data[i] & 0xC0 == 0x80:
            v = ((v << 6) | (data[i] & 0x3F)) & 0xFF
            i += 1
        h = ((h << 4) + v) & 0xFFFFFFFF
        g = h & 0xF0000000
        if g:
            h ^= g >> 24
            h ^= g
    return h


def phash2_atoms(*atoms: str) -> int:
    """erlang:phash2({atom1, atom2, ...}), in 0 .. 2**27 - 1."""
    h = _uint32_hash(0, len(atoms), 9)
    for atom in atoms:
        value = _atom_hash(atom)
        h = value if h == 0 else _uint32_hash(h, value, 3)
    return h & ((1 << 27) - 1)


def ecto(repo: str) -> int:
    # ecto_sql lib/ecto/adapters/postgres.ex: :erlang.phash2({:ecto, opts[:prefix], meta.repo});
    # the prefix is nil unless the migration runs with --prefix; MyApp.Repo is the atom Elixir.MyApp.Repo.
    return phash2_atoms("ecto", "nil", repo if repo.startswith("Elixir.") else f"Elixir.{repo}")


@dataclass(frozen=True)
class HashtextNamespace:
    """Every pg_advisory_lock(hashtext(text), x): a namespace family whose namespace the server's
    own hashtext() gives (it is internal and has changed between majors, so never computed here)."""

    text: str

    def describe(self) -> str:
        return f"(hashtext({self.text!r}), *)"


# What a preset's key may be: a key known here, a string key or a namespace the server hashes,
# or a whole namespace (a family).
PresetKey = Union[keys.BigintKey, keys.Int4PairKey, keys.HashtextKey, keys.NamespaceFamily, HashtextNamespace]


@dataclass(frozen=True)
class PresetLock:
    """One lock (or key family) a tool takes: its name and how to compute its key in a database."""

    name: str
    key: Callable[[str], PresetKey]


def _fixed(value: int) -> Callable[[str], keys.LiteralKey]:
    return lambda database: keys.BigintKey(value)


def _per_database(formula: Callable[[str], int]) -> Callable[[str], keys.LiteralKey]:
    return lambda database: keys.BigintKey(formula(database))


def _hashtext(text: str) -> Callable[[str], PresetKey]:
    return lambda database: keys.HashtextKey(text)


def _hashtext_namespace(text: str) -> Callable[[str], PresetKey]:
    return lambda database: HashtextNamespace(text)


# pg_repack (bin/pg_repack.c, advisory_lock): pg_try_advisory_lock(16185446, -2147483648 + the
# table's oid), held while a table (or its indexes) is repacked: a namespace family, whose second
# int names the table.
PG_REPACK_NAMESPACE = 16185446


def pg_repack_table_oid(second: int) -> int:
    """The oid of the table a pg_repack key's second int stands for."""
    return second + 2**31


# pg_partman's locks (sql/functions and sql/procedures, each pg_try_advisory_[xact_]lock(hashtext(
# 'pg_partman ...'))), in 4.7 (what Debian ships) and 5.x. The *_proc procedures that work on one
# parent table pair the name's hash with hashtext(parent table): a namespace family each.
PG_PARTMAN_KEYS = (
    ("pg_partman:run_maintenance", "pg_partman run_maintenance"),  # 5.x function; 4.7 function and procedure
    ("pg_partman:run_maintenance_proc", "pg_partman run_maintenance procedure"),  # 5.x procedure
    ("pg_partman:run_analyze", "pg_partman run_analyze"),
    ("pg_partman:reapply_constraints", "pg_partman reapply_constraints"),
    ("pg_partman:drop_partition_id", "pg_partman drop_partition_id"),
    ("pg_partman:drop_partition_time", "pg_partman drop_partition_time"),
    ("pg_partman:undo_partition", "pg_partman undo_partition"),  # 5.x
    ("pg_partman:undo_partition_native", "pg_partman undo_partition_native"),  # 4.7
)
PG_PARTMAN_FAMILIES = (
    ("pg_partman:partition_data_proc", "pg_partman partition_data_proc"),
    ("pg_partman:undo_partition_proc", "pg_partman undo_partition_proc"),
)


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
    # kysely src/dialect/postgres/postgres-adapter.ts LOCK_ID: the Migrator's pg_advisory_lock.
    "kysely": (PresetLock("kysely:migrations", _fixed(3853314791062309107)),),
    # graphile-migrate src/pgReal.ts ADVISORY_LOCK_MIGRATE ("GRAPHILE MIGRATE" on a phone keypad).
    "graphile-migrate": (PresetLock("graphile-migrate:migrate", _fixed(4727445306447283)),),
    # Sequel::Migrator.run(use_advisory_lock: true), 5.78+: "sequel-migration".codepoints.reduce(:*) % 2**63.
    "sequel": (PresetLock("sequel:migrations", _fixed(4966325471869609408)),),
    # tern migrate/migrate.go lockNum.
    "tern": (PresetLock("tern:migrations", _fixed(9628173550095224)),),
    "pg_partman": (
        *(PresetLock(name, _hashtext(text)) for name, text in PG_PARTMAN_KEYS),
        *(PresetLock(name, _hashtext_namespace(text)) for name, text in PG_PARTMAN_FAMILIES),
    ),
    "pg_repack": (PresetLock("pg_repack:table", lambda database: keys.NamespaceFamily(PG_REPACK_NAMESPACE)),),
    # Keys 1 and 2 collide easily with anything else: never part of "all".
    "airflow": (
        PresetLock("airflow:migrations", _fixed(1)),
        PresetLock("airflow:scheduler", _fixed(2)),
    ),
}
NOT_IN_ALL = frozenset({"airflow"})
ALL = "all"

# Presets whose key depends on the application: each is listed with its parameter
# ({ecto: MyApp.Repo}), never part of "all". name -> (what the parameter is, its locks).
PARAMETERISED: dict[str, tuple[str, Callable[[str], tuple[PresetLock, ...]]]] = {
    "ecto": ("an Elixir module name such as MyApp.Repo",
             lambda repo: (PresetLock(f"ecto:{repo}:migrations", _fixed(ecto(repo))),)),
}


@dataclass(frozen=True)
class WithParameter:
    """A preset that takes its parameter: {ecto: MyApp.Repo}."""

    name: str
    parameter: str

    def __str__(self) -> str:
        return f"{self.name}({self.parameter})"


Chosen = Union[str, WithParameter]


def expand(chosen: Iterable[Chosen]) -> tuple[PresetLock, ...]:
    """The preset locks of the chosen presets ("all": every preset but those NOT_IN_ALL and those
    that take a parameter), once each."""
    chosen = list(chosen)
    names = [n for n in PRESETS if n not in NOT_IN_ALL] if ALL in chosen else [c for c in chosen if isinstance(c, str)]
    seen: dict[str, PresetLock] = {}
    for name in names:
        for lock in PRESETS[name]:
            seen.setdefault(lock.name, lock)
    for choice in chosen:
        if isinstance(choice, WithParameter):
            for lock in PARAMETERISED[choice.name][1](choice.parameter):
                seen.setdefault(lock.name, lock)
    return tuple(seen.values())
