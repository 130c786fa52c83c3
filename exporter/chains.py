"""Why a lock is stuck: for each holder that waits itself, what it waits for and who blocks it,
down to the root blocker. One statement (queries.CHAIN), only in a poll where a holder waits."""

from __future__ import annotations

import psycopg
from psycopg.rows import namedtuple_row

from . import keys, queries
from .connection import local_timeouts
from .snapshot import Blocker, Chain, OwnWait

TABLE_WAITS = frozenset({"relation", "tuple", "page", "extend"})


def waits_for(wait: OwnWait, database: str, names: dict[int, str]) -> str:
    """'relation public.users', 'a row of public.users', 'transaction 1234', 'advisory lock 42,7':
    a table by name in the connection's database (names), elsewhere by oid and database."""
    if wait.locktype in TABLE_WAITS and wait.relation is not None:
        table = names.get(wait.relation) if wait.database == database else None
        table = table or f"oid {wait.relation} in database {wait.database or '?'}"
        return f"relation {table}" if wait.locktype == "relation" else f"{wait.locktype} of relation {table}"
    if wait.locktype == "transactionid" and wait.key is not None:
        return f"transaction {wait.key}"
    if wait.locktype == "advisory" and wait.key is not None and wait.objsubid is not None:
        return f"advisory lock {keys.key_label(wait.objsubid, wait.key)} in {wait.database}"
    return f"a {wait.locktype or 'lock'}"


def read_chains(conn: psycopg.Connection, timeout: float, blocked: tuple[OwnWait, ...], waiting: frozenset[int],
                show_queries: bool, database: str, names: dict[int, str]) -> tuple[Chain, ...]:
    """The chain of every holder that waits: who blocks it, and who blocks them."""
    with local_timeouts(conn, timeout), conn.cursor(row_factory=namedtuple_row) as cur:
        rows = cur.execute(queries.CHAIN, {"pids": [w.pid for w in blocked], "waiting": sorted(waiting),
                                           "show_queries": show_queries}).fetchall()
    by_holder: dict[int, list[Blocker]] = {}
    for row in rows:
        by_holder.setdefault(row.blocks, []).append(Blocker(
            row.blocker, row.depth, row.blocks, row.application_name, row.usename, row.client_addr, row.state,
            row.state_seconds, bool(row.waiting), row.query or "", row.prepared or ""))
    return tuple(Chain(wait, waits_for(wait, database, names), tuple(_down_from(wait.pid, by_holder)))
                 for wait in blocked)


def _down_from(pid: int, by_blocked: dict[int, list[Blocker]], depth: int = 1) -> list[Blocker]:
    """Who blocks pid, then who blocks them, in order of depth (each blocker once)."""
    found: list[Blocker] = []
    seen: set[int] = set()
    level = [b for b in by_blocked.get(pid, []) if b.depth == depth]
    while level and depth <= 8:
        found += [b for b in level if b.pid not in seen]
        seen.update(b.pid for b in level)
        depth += 1
        level = [b for blocker in level for b in by_blocked.get(blocker.pid, []) if b.depth == depth and b.pid not in seen]
    return found
