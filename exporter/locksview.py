"""`pg-advisory-lock-exporter locks`: every advisory lock in the cluster now, named where the
config or a preset names it, for a person (80 columns) or a script (--json)."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import TextIO

from . import keys, queries
from .config import Config
from .poller import connect_poller
from .resolve import SOURCE_PRESET, resolve_on_server
from .snapshot import MODE_EXCLUSIVE, MODE_SHARED

WIDTH = 80
_MODES = {"ExclusiveLock": MODE_EXCLUSIVE, "ShareLock": MODE_SHARED}
_STATES = {"idle in transaction": "idle txn", "idle in transaction (aborted)": "idle txn!"}


@dataclass(frozen=True)
class LockRow:
    """One session holding or waiting for one advisory lock."""

    name: str  # configured or preset name, or the decoded key
    source: str  # "config", "preset" or "unnamed"
    database: str
    key: str  # the decoded key: 4242 or (42, 7)
    mode: str
    granted: bool
    pid: int
    application_name: str
    usename: str
    client_addr: str
    state: str
    held_at_least_seconds: float | None  # what pg_stat_activity proves; None when nothing is
    waiting_seconds: float | None
    blocked_by: list[int]


def read_locks(config: Config) -> list[LockRow]:
    """One read of pg_locks, names attached."""
    with connect_poller(config) as conn:
        row = conn.execute(queries.SERVER_INFO).fetchone()
        assert row is not None
        version, database = int(row[0]), row[1]
        names = {(r.database, r.tag): (r.config.name, r.source) for r in resolve_on_server(conn, config, database)}
        rows = conn.execute(queries.locks_now_query(version), {"probe_app": queries.PROBE_APPLICATION_NAME}).fetchall()
    result = []
    for (datname, classid, objid, objsubid, mode, granted, pid, app, user, client, state, held, waiting, blocked) in rows:
        tag = keys.LockTag(classid, objid, objsubid)
        key = keys.decode_tag(tag).describe()
        name, source = names.get((datname, tag), (key, "unnamed"))
        result.append(LockRow(name, source, datname or "", key, _MODES.get(mode, mode), granted, pid, app or "",
                              user or "", client or "", state or "", held, waiting, list(blocked or [])))
    return result


def _age(seconds: float | None, floor: bool) -> str:
    if seconds is None:
        return "?"
    s = int(seconds)
    text = f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
    return ("≥" if floor else "") + text


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
            label = r.name if r.source == "unnamed" else f"{r.name}  [{r.key}{', preset' if r.source == SOURCE_PRESET else ''}]"
            lines.append(_fit(f"{label}  in {r.database}", WIDTH))
        role = ("holds" if r.mode == MODE_EXCLUSIVE else "shares") if r.granted else "waits"
        who = r.usename + (f"@{r.client_addr}" if r.client_addr else "")
        age = _age(r.held_at_least_seconds, floor=True) if r.granted else _age(r.waiting_seconds, floor=False)
        state = _STATES.get(r.state, r.state)
        lines.append(f"  {role:<6} {r.pid:>7} {_fit(r.application_name or '-', 18):<18} {_fit(who or '-', 21):<21} "
                     f"{_fit(state or '?', 9):<9} {age:>8}")
        if r.blocked_by:
            lines.append(_fit(f"         blocked by pid {', '.join(map(str, r.blocked_by))}", WIDTH))
    held = sum(r.granted for r in rows)
    lines.append(f"{held} held, {len(rows) - held} waiting")
    return "\n".join(lines) + "\n"


def run(config: Config, as_json: bool, watch: float | None, out: TextIO = sys.stdout) -> int:
    """Print the locks once, or every `watch` seconds until interrupted."""
    while True:
        rows = read_locks(config)
        if as_json:
            text = json.dumps([asdict(r) for r in rows], ensure_ascii=False) + "\n"
        else:
            text = format_table(rows)
        if watch:
            out.write("\033[H\033[2J" + time.strftime("%H:%M:%S ") + f"every {watch:g}s, Ctrl-C stops\n")
        out.write(text)
        out.flush()
        if not watch:
            return 0
        time.sleep(watch)

