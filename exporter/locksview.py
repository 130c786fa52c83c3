"""`pg-advisory-lock-exporter locks`: every advisory lock in the cluster now, named where the
config or a preset names it, for a person (80 columns) or a script (--json)."""

from __future__ import annotations

import json
import signal
import sys
import textwrap
import time
from dataclasses import asdict, dataclass
from typing import Any, TextIO

import psycopg
from psycopg.rows import namedtuple_row

from . import keys, presets, queries
from .ages import age
from .holders import who_holds
from .matching import KeyMatcher
from .config import Config
from .connection import local_timeouts
from .poolers import PoolerReader
from .poller import connect_poller
from .chains import read_chains
from .relations import PG_REPACK_FAMILY, RelationNames
from .naming import SOURCE_PRESET, ResolvedLock
from .resolve import resolve_on_server
from .snapshot import MODE_EXCLUSIVE, MODE_SHARED, Chain, OwnWait

WIDTH = 80
FIX_INDENT = " " * 9  # under a holder line, past its role
_MODES = {"ExclusiveLock": MODE_EXCLUSIVE, "ShareLock": MODE_SHARED}
_STATES = {"idle in transaction": "idle txn", "idle in transaction (aborted)": "idle txn!"}


@dataclass(frozen=True)
class LockRow:
    """One session holding or waiting for one advisory lock."""

    name: str  # configured or preset name, or the decoded key
    source: str  # "config", "preset" or "unnamed"
    database: str
    key: str  # the decoded key: 4242 or (42, 7)
    family: str  # for a key of a configured family, the family's key set: (42, *); else ""
    mode: str
    granted: bool
    pid: int | None  # None: a prepared transaction (application_name is its gid)
    application_name: str
    usename: str
    client_addr: str
    state: str
    held_at_least_seconds: float | None  # what pg_stat_activity proves; None when nothing is
    waiting_seconds: float | None
    blocked_by: list[int]
    pooler: str = ""  # the pooler whose server connection this session is; "" for a direct one
    stranded: bool = False  # a session lock left on a transaction-pool connection: nobody owns it
    detail: str = ""  # what the key stands for, where a preset says: the table a pg_repack key repacks
    waits: str = ""  # a holder that waits itself: for what, and who blocks it down to the root
    chain: dict[str, Any] | None = None  # the same, for scripts: waits_for, mode, wait_seconds, blockers


def read_locks(config: Config) -> list[LockRow]:
    """One read of pg_locks, names attached."""
    with connect_poller(config) as conn, local_timeouts(conn, config.timeout_seconds), \
            conn.cursor(row_factory=namedtuple_row) as cur:
        server = cur.execute(queries.SERVER_INFO).fetchone()
        assert server is not None
        locks = resolve_on_server(conn, config, server.database)
        rows = cur.execute(queries.locks_now_query(server.version_num)).fetchall()
        matcher = KeyMatcher(locks)
        tables = _repacked_tables(cur, rows, locks, matcher, server.database)
        chains = _chains(conn, config, server, {row.pid for row in rows if row.granted and row.pid is not None})
    names = {(r.database, r.tag): r for r in locks if r.tag is not None}
    reader = PoolerReader(config)
    try:
        view = reader.read(server.port_setting)
    finally:
        reader.close()
    result = []
    for row in rows:
        tag = keys.LockTag(row.classid, row.objid, row.objsubid)
        key = keys.decode_tag(tag).describe()
        lock = names.get((row.datname, tag))
        family = ""
        if lock is None:
            index = matcher.family(row.datname, row.objsubid, keys.signed64(keys.tag_key64(tag)))
            lock = locks[index] if index is not None else None
            family = lock.config.key.describe() if lock is not None else ""
        name, source = (lock.config.name, lock.source) if lock is not None else (key, "unnamed")
        detail = ""
        if lock is not None and lock.family == PG_REPACK_FAMILY:
            oid = presets.pg_repack_table_oid(keys.decode_tag(tag).second)  # type: ignore[union-attr]
            detail = tables.get((row.datname, oid), f"table oid {oid}")
        who = who_holds(row, view)
        chain = chains.get(row.pid) if row.granted else None
        result.append(LockRow(name, source, row.datname or "", key, family, _MODES.get(row.mode, row.mode), row.granted,
                              row.pid, who.application_name, who.usename, who.client_addr, row.state or "",
                              row.held_at_least, row.waiting, list(row.blocked_by or []), who.pooler,
                              row.granted and who.stranded, detail, chain.describe() if chain else "",
                              _chain_json(chain) if chain else None))
    return result


def _chains(conn: psycopg.Connection, config: Config, server: Any, holders: set[int]) -> dict[int, Chain]:
    """The chain of every holder of an advisory lock that waits itself, by its pid."""
    with conn.cursor(row_factory=namedtuple_row) as cur:
        waiting = cur.execute(queries.waiting_now_query(server.version_num)).fetchall()
    blocked = tuple(sorted(OwnWait(w.pid, w.datname, w.locktype, w.mode, w.relation, w.key,
                                   w.objsubid if w.locktype == "advisory" else None, round(w.wait_seconds, 3))
                           for w in waiting if w.pid in holders))
    if not blocked:
        return {}
    tables = {w.relation for w in blocked if w.relation is not None and w.database == server.database}
    names = RelationNames().names(conn, config.timeout_seconds, tables)
    found = read_chains(conn, config.timeout_seconds, blocked, frozenset(w.pid for w in waiting), config.show_queries,
                        server.database, names)
    return {chain.wait.pid: chain for chain in found}


def _chain_json(chain: Chain) -> dict[str, Any]:
    return {"waits_for": chain.waits_for, "mode": chain.wait.mode, "wait_seconds": chain.wait.wait_seconds,
            "blockers": [b._asdict() for b in chain.blockers], "roots": [b.pid for b in chain.roots]}


# pg_repack's keys, named by its preset or by a configured family on its namespace (with a max_hold).


def _repacked_tables(cur: Any, rows: list[Any], locks: tuple[ResolvedLock, ...], matcher: KeyMatcher,
                     database: str) -> dict[tuple[str, int], str]:
    """(database, oid) -> table name, for the pg_repack keys held in the dsn's database: only there
    can this connection read the catalog."""
    oids = set()
    for row in rows:
        if row.datname != database or row.objsubid != keys.OBJSUBID_INT4_PAIR:
            continue
        tag = keys.LockTag(row.classid, row.objid, row.objsubid)
        index = matcher.family(database, row.objsubid, keys.signed64(keys.tag_key64(tag)))
        if index is not None and locks[index].family == PG_REPACK_FAMILY:
            oids.add(presets.pg_repack_table_oid(keys.decode_tag(tag).second))  # type: ignore[union-attr]
    if not oids:
        return {}
    return {(database, r.oid): r.relation for r in cur.execute(queries.RELATION_NAMES, {"oids": sorted(oids)}).fetchall()}


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(rows: list[LockRow]) -> str:
    """Grouped by lock: a header line, then one line per holder or waiter, within 80 columns."""
    if not rows:
        return "no advisory locks are held or awaited\n"
    lines = []
    last = None
    for r in rows:
        if (r.database, r.key) != last:
            last = (r.database, r.key)
            if r.source == "unnamed":
                label = r.name
            elif r.family:
                label = f"{r.name}{' ' + r.detail if r.detail else ''}  [{r.key} of {r.family}]"
            else:
                label = f"{r.name}  [{r.key}{', preset' if r.source == SOURCE_PRESET else ''}]"
            lines.append(_fit(f"{label}  in {r.database}", WIDTH))
        role = ("holds" if r.mode == MODE_EXCLUSIVE else "shares") if r.granted else "waits"
        who = r.usename + (f"@{r.client_addr}" if r.client_addr else "")
        held = age(r.held_at_least_seconds, at_least=True) if r.granted else age(r.waiting_seconds)
        state = _STATES.get(r.state, r.state)
        if r.pid is None:
            gid = "'" + r.application_name.replace("'", "''") + "'"
            lines.append(f"  {role:<6} {'prepared':>7} {_fit(gid, 18):<18} {_fit(r.usename or '-', 21):<21} "
                         f"{'prepared':<9} {held:>8}")
            # The fix, each command a line of its own and never cut (a long gid runs past 80
            # columns rather than lose its end): it is what gets copied.
            lines += [f"{FIX_INDENT}a prepared transaction keeps its locks until one of these ends it:",
                      f"{FIX_INDENT}  COMMIT PREPARED {gid};", f"{FIX_INDENT}  ROLLBACK PREPARED {gid};"]
            continue
        lines.append(f"  {role:<6} {r.pid:>7} {_fit(r.application_name or '-', 18):<18} {_fit(who or '-', 21):<21} "
                     f"{_fit(state or '?', 9):<9} {held:>8}")
        if r.stranded:
            lines += [f"{FIX_INDENT}{line}" for line in textwrap.wrap(
                f"STRANDED on pooler {r.pooler}: a session lock left on a pooled connection; nobody owns it, and "
                "whoever borrows that connection next also 'has' it", WIDTH - len(FIX_INDENT))]
        elif r.pooler:
            lines.append(_fit(f"         via pooler {r.pooler} (the client shown is the one it serves now)", WIDTH))
        if r.blocked_by:
            lines.append(_fit(f"         blocked by pid {', '.join(map(str, r.blocked_by))}", WIDTH))
        if r.waits:
            lines += [f"         {line}" for line in textwrap.wrap("which " + r.waits, WIDTH - 9)]
    held = sum(r.granted for r in rows)
    lines.append(f"{held} held, {len(rows) - held} waiting")
    return "\n".join(lines) + "\n"


def run(config: Config, as_json: bool, watch: float | None, out: TextIO = sys.stdout) -> int:
    """Print the locks once, or every `watch` seconds until interrupted (SIGINT, Ctrl-C)."""
    if not watch:
        out.write(_frame(config, as_json))
        out.flush()
        return 0
    # Ctrl-C ends the wait between two reads at once, and a read only once it is over (within its
    # deadline): raised in the middle of a read, it made psycopg cancel the statement and warn
    # about the transaction it could not roll back, and once under load the command did not end.
    state = {"waiting": False, "stop": False}

    def on_sigint(signum: int, frame: Any) -> None:
        if state["waiting"]:
            raise KeyboardInterrupt
        state["stop"] = True

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        while not state["stop"]:
            text = _frame(config, as_json)
            out.write("\033[H\033[2J" + time.strftime("%H:%M:%S ") + f"every {watch:g}s, Ctrl-C stops\n" + text)
            out.flush()
            try:
                state["waiting"] = True
                if state["stop"]:  # came during the read, or just before: it raised nothing
                    break
                time.sleep(watch)
                state["waiting"] = False
            except KeyboardInterrupt:
                break
    finally:
        signal.signal(signal.SIGINT, previous)
    return 0


def _frame(config: Config, as_json: bool) -> str:
    rows = read_locks(config)
    if as_json:
        return json.dumps([asdict(r) for r in rows], ensure_ascii=False) + "\n"
    return format_table(rows)

