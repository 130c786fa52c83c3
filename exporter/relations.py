"""The tables that lock keys stand for: pg_repack's key (16185446, oid - 2**31) is held while that
table is repacked. Names are looked up in the one database the exporter is connected to (a
catalog is per database, and no connection is opened just for a name); elsewhere the oid is
what there is. A lookup runs only when a key shows an oid not seen before, and never fails a poll.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import psycopg
from psycopg.rows import namedtuple_row

from . import keys, presets, queries
from .connection import local_timeouts
from .snapshot import LockState

log = logging.getLogger(__name__)

PG_REPACK_FAMILY = keys.NamespaceFamily(presets.PG_REPACK_NAMESPACE)
PG_REPACK_KEY_SET = PG_REPACK_FAMILY.describe()


def repacked_oids(locks: Iterable[LockState]) -> dict[tuple[str, str], int]:
    """(database, key label) -> table oid, for every shown holder of pg_repack's key family."""
    found = {}
    for lock in locks:
        if lock.key != PG_REPACK_KEY_SET:
            continue
        for holder in lock.info_holders:
            second = int(holder.key.split(",")[1])
            found[(lock.database, holder.key)] = presets.pg_repack_table_oid(second)
    return found


class RelationNames:
    """Table names by oid in the connection's database, remembered while something shows them
    (a held pg_repack key, a holder waiting for a table); looked up once per new oid."""

    def __init__(self) -> None:
        self._names: dict[int, str] = {}

    def names(self, conn: psycopg.Connection, timeout: float, oids: Iterable[int]) -> dict[int, str]:
        """oid -> name for those of oids the connection's database has; the others are forgotten."""
        wanted = set(oids)
        missing = sorted(wanted - self._names.keys())
        if missing:
            try:
                with local_timeouts(conn, timeout), conn.cursor(row_factory=namedtuple_row) as cur:
                    rows = cur.execute(queries.RELATION_NAMES, {"oids": missing}).fetchall()
                self._names.update((row.oid, row.relation) for row in rows)
            except psycopg.Error as exc:  # a name is a nicety: the figures stand without it
                log.debug("table names not read: %s", exc)
        self._names = {oid: name for oid, name in self._names.items() if oid in wanted}
        return dict(self._names)

    def notes(self, conn: psycopg.Connection, database: str, timeout: float,
              locks: Iterable[LockState], also: Iterable[int] = ()) -> tuple[dict[tuple[str, str], str], dict[int, str]]:
        """(database, key label) -> 'table public.orders' (or 'table oid 16384' elsewhere), and the
        names of also (other oids of the connection's database to name)."""
        oids = repacked_oids(locks)
        here = {oid for (db, _), oid in oids.items() if db == database}
        names = self.names(conn, timeout, here | set(also)) if here or also else self.names(conn, timeout, ())
        return {slot: f"table {names.get(oid) or f'oid {oid}'}" for slot, oid in oids.items()}, names
