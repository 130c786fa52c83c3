"""Everything that asks the server about keys: its hashes of string keys (hashtext() is internal
and has changed between majors, so it is never computed here) and the databases presets apply to."""

from __future__ import annotations

from collections.abc import Iterable

import psycopg
from psycopg.rows import namedtuple_row

from . import keys, queries
from .config import Config
from .naming import ResolvedLock, preset_string_keys, resolve_locks


def resolve_string_keys(conn: psycopg.Connection, wanted_keys: Iterable[keys.StringKey]) -> dict[keys.StringKey, keys.LockTag]:
    """Ask the monitored server what its hash functions make of each string key.

    hashtext() is internal and has changed between majors, so it is never computed here.
    hashtext() returns int4; passed to pg_advisory_lock(bigint) it is sign-extended, which the
    server's own int4 -> int8 cast in the query does for us.
    """
    wanted = sorted(set(wanted_keys), key=lambda k: (type(k).__name__, k.text))
    if not wanted:
        return {}
    with conn.cursor(row_factory=namedtuple_row) as cur:
        cur.execute(queries.RESOLVE_STRING_KEYS, {"texts": [k.text for k in wanted]})
        hashes = {row.text: row for row in cur.fetchall()}
    return {
        k: keys.bigint_tag(hashes[k.text].hashtext if isinstance(k, keys.HashtextKey) else hashes[k.text].hashtextextended)
        for k in wanted
    }


def resolve_on_server(conn: psycopg.Connection, config: Config, default_database: str) -> tuple[ResolvedLock, ...]:
    """resolve_locks with what only the server knows: its hashes of the string keys (the config's
    and the presets'), and (for presets) the databases it has."""
    string_keys = [lock.key for lock in config.locks if isinstance(lock.key, (keys.HashtextKey, keys.HashtextExtendedKey))]
    string_tags = resolve_string_keys(conn, [*string_keys, *preset_string_keys(config.presets)])
    databases = tuple(row[0] for row in conn.execute(queries.DATABASES).fetchall()) if config.presets else ()
    if config.databases:
        databases = tuple(d for d in databases if d in config.databases)
    return resolve_locks(config, default_database, string_tags, databases)
