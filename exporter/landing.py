"""GET /: what the exporter sees now, from the latest snapshot (never from the database).

Plain HTML, no external assets, refreshing itself every few seconds.
"""

from __future__ import annotations

import time
from html import escape

from . import __version__
from .ages import age, counted
from .snapshot import MODE_EXCLUSIVE, Holder, LockState, ProbeResult, ReloadStatus, Snapshot

REFRESH_SECONDS = 5
FREE_NAMES_SHOWN = 50
_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}.bad{color:#b00;font-weight:bold}.ok{color:#070}.muted{color:#777}
"""


def _sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _prepared_line(h: Holder, with_key: bool, mode: str, snapshot: Snapshot) -> str:
    gid = _sql_literal(h.application_name)
    return escape(
        f"{'key ' + h.key + ', ' if with_key else ''}{mode}: prepared transaction {gid} of {h.usename or '?'}, "
        f"prepared {age(snapshot.held_seconds(h), at_least=True)} ago"
    ) + (' <span class="bad">A prepared transaction keeps its locks until someone ends it: '
         f"<code>COMMIT PREPARED {escape(gid)}</code> or <code>ROLLBACK PREPARED {escape(gid)}</code>"
         "</span>")


def _holder_line(h: Holder, with_key: bool, snapshot: Snapshot) -> str:
    mode = "exclusive" if MODE_EXCLUSIVE in h.modes else "shared"
    if h.is_prepared:
        return _prepared_line(h, with_key, mode, snapshot)
    chain = snapshot.chain_of(h.pid)
    waits = f' <span class="bad chain">which {escape(chain.describe())}</span>' if chain is not None else ""
    return _session_line(h, with_key, mode, snapshot) + waits


def _session_line(h: Holder, with_key: bool, mode: str, snapshot: Snapshot) -> str:
    line = escape(
        f"{'key ' + h.key + ', ' if with_key else ''}{mode}: pid {h.pid} "
        f"{h.application_name or '-'} {h.usename}{'@' + h.client_addr if h.client_addr else ''} "
        f"({h.state or 'state hidden'}), held {age(snapshot.held_seconds(h), at_least=True)}"
    )
    if h.stranded:
        release = snapshot.backend_releases.get(h.pid) if h.pid is not None else None
        frees = "" if release is None else (
            f" It frees itself in about {age(release.seconds)}, when {escape(h.pooler)} closes server connection "
            f"{release.backend} ({release.reason}), unless a client borrows it meanwhile.")
        return line + (f' <span class="bad">STRANDED: backend {h.pid} &rarr; pooler {escape(h.pooler)} &rarr; no client. '
                       "A session-level lock left on a transaction-pool connection: nobody owns it, and whoever "
                       f"borrows that connection next silently &ldquo;has&rdquo; it too.{frees}</span>")
    if h.pooler:
        return line + f" (backend {h.pid} &rarr; pooler {escape(h.pooler)} &rarr; this client)"
    return line


def _noted(line: str, note: str | None) -> str:
    """A holder line with what its key stands for (a table being repacked), where known."""
    return line if note is None else f"{line} &mdash; {escape(note)}"


def _lock_row(lock: LockState, probe: ProbeResult | None, snapshot: Snapshot) -> str:
    holders = "<br>".join(_noted(_holder_line(h, lock.is_family, snapshot), snapshot.key_notes.get((lock.database, h.key)))
                          for h in lock.info_holders) or '<span class="muted">none</span>'
    if lock.is_family:
        holders = f"{counted(lock.keys_held, 'key')} held<br>" + holders
    hidden = lock.holds - len(lock.info_holders)
    if hidden:
        holders += f"<br><span class=\"muted\">and {hidden} more</span>"
    held_seconds = snapshot.held_seconds(lock)
    over = lock.max_hold is not None and held_seconds > lock.max_hold
    max_hold = "" if lock.max_hold is None else age(lock.max_hold)
    waits = f"{lock.waiters} (longest {age(lock.wait_seconds)})" if lock.waiters else "0"
    probe_cell = "" if probe is None else (
        '<span class="ok">as expected</span>' if probe.ok else '<span class="bad">NOT as expected</span>'
    )
    return (
        f"<tr><td>{escape(lock.name)}</td><td>{escape(lock.key)}</td><td>{escape(lock.database)}</td>"
        f"<td>{escape(lock.source)}</td>"
        f"<td>{holders}</td><td class=\"{'bad' if over else ''}\">{age(held_seconds)}</td>"
        f"<td>{max_hold}</td><td class=\"{'bad' if lock.waiters else ''}\">{waits}</td><td>{probe_cell}</td></tr>"
    )


def _head(title: str) -> list[str]:
    return [
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\">",
        f"<meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">",
        f"<title>{escape(title)}</title>",
        f"<style>{_STYLE}</style></head><body>",
    ]


def render_targets(targets: dict[str, Snapshot], reload: ReloadStatus, telemetry_path: str) -> bytes:
    """A fleet's landing page: each target, its poll health and what it holds, linked to its view."""
    rows = []
    for name, snap in targets.items():
        link = escape(name, quote=True)
        held = sum(1 for lock in snap.locks if lock.holds)
        stranded = sum(1 for lock in snap.locks if lock.pooled_session_holders)
        rows.append(
            f"<tr><td><a href=\"/?target={link}\">{escape(name)}</a></td>"
            f"<td class=\"{'ok' if snap.up else 'bad'}\">{'UP' if snap.up else 'DOWN'}</td>"
            f"<td>{held} of {len(snap.locks)}</td><td>{sum(u.holders for u in snap.unnamed)}</td>"
            f"<td class=\"{'bad' if stranded else ''}\">{stranded or ''}</td>"
            f"<td><a href=\"/probe?target={link}\">/probe?target={escape(name)}</a></td></tr>"
        )
    parts = [
        *_head("pg-advisory-lock-exporter: targets"),
        f"<h1>pg-advisory-lock-exporter {escape(__version__)}: {counted(len(targets), 'target')}</h1>",
        f"<p><a href=\"{escape(telemetry_path, quote=True)}\">Exporter metrics</a> &middot; "
        f"config {'loaded' if reload.successful else '<span class=bad>reload refused</span>'}</p>",
        "<table id=\"targets\"><tr><th>target</th><th>polls</th><th>named locks held</th><th>unnamed holds</th>"
        "<th>stranded on a pool</th><th>figures</th></tr>",
        *rows, "</table></body></html>",
    ]
    return "".join(parts).encode()


def render(snapshot: Snapshot, probes: tuple[ProbeResult, ...], reload: ReloadStatus, telemetry_path: str,
           target: str = "") -> bytes:
    """The landing page of one server: its poll health, then what it sees now."""
    path = escape(telemetry_path, quote=True)
    parts = [
        *_head("pg-advisory-lock-exporter"),
        f"<h1>pg-advisory-lock-exporter {escape(__version__)}{': target ' + escape(target) if target else ''}</h1>",
        '<p><a href="/">all targets</a></p>' if target else "",
        f"<p><a href=\"{path}\">Metrics</a> &middot; <a href=\"/-/healthy\">healthy</a> &middot; "
        f"<a href=\"/-/ready\">ready</a> &middot; refreshes every {REFRESH_SECONDS}s</p>",
        _health(snapshot, reload),
    ]
    if not snapshot.up:
        parts.append("<p class=\"bad\">The last poll failed: no lock data is shown rather than stale data. "
                     "The exporter's log says why.</p>")
    else:
        parts += [_stranded(snapshot), *_named(snapshot, probes), _scheduled(snapshot), _failing_probes(probes),
                  *_unnamed(snapshot)]
    parts.append("</body></html>")
    return "".join(parts).encode()


def _health(snapshot: Snapshot, reload: ReloadStatus) -> str:
    stats = snapshot.stats
    last = "never" if stats.last_success_timestamp is None else \
        f"{age(max(time.time() - stats.last_success_timestamp, 0))} ago"
    return (
        f"<p>Polls: <span class=\"{'ok' if snapshot.up else 'bad'}\">{'UP' if snapshot.up else 'DOWN'}</span>"
        f" &middot; last good poll {last} &middot; {counted(stats.polls, 'poll')}, {stats.errors} failed"
        f" &middot; config {'loaded' if reload.successful else '<span class=bad>reload refused</span>'}</p>"
    )


def _stranded(snapshot: Snapshot) -> str:
    """The warning about session locks stranded on a transaction pool, if any."""
    names = [f"{lock.name} ({lock.database})" for lock in snapshot.locks if lock.pooled_session_holders]
    names += [f"a key nobody named ({u.database})" for u in snapshot.unnamed if u.pooled_session_holders]
    if not names:
        return ""
    return (
        '<p class="bad" id="stranded">Session locks stranded on a transaction pool: '
        + escape(", ".join(names))
        + ". Through transaction pooling a session-level advisory lock stays on the server connection after "
        "the client's transaction and passes to whoever borrows it next: mutual exclusion is gone. Fix: take "
        "the lock on a direct connection or a session-mode pool, or use the transaction-level lock "
        "(pg_advisory_xact_lock).</p>"
    )


def _named(snapshot: Snapshot, probes: tuple[ProbeResult, ...]) -> list[str]:
    """The named locks held or awaited (a table), then the free ones (names)."""
    by_name = {p.lock: p for p in probes}
    busy = [lock for lock in snapshot.locks if lock.holds or lock.waiters]
    free = [lock for lock in snapshot.locks if not lock.holds and not lock.waiters]
    parts = [f"<h2>Named locks held or awaited ({len(busy)})</h2>"]
    if busy:
        parts.append("<table id=\"locks\"><tr><th>lock</th><th>key</th><th>database</th><th>source</th><th>holders</th>"
                     "<th>held for</th><th>max_hold</th><th>waiters</th><th>probe</th></tr>")
        parts += [_lock_row(lock, by_name.get(lock.name), snapshot) for lock in busy]
        parts.append("</table>")
    else:
        parts.append("<p class=\"muted\">none</p>")
    shown = ", ".join(escape(lock.name) for lock in free[:FREE_NAMES_SHOWN])
    more = f" and {len(free) - FREE_NAMES_SHOWN} more" if len(free) > FREE_NAMES_SHOWN else ""
    parts.append(f"<h2>Named locks free ({len(free)})</h2><p>{shown or '-'}{more}</p>")
    return parts


def _scheduled(snapshot: Snapshot) -> str:
    """The locks expected taken on a schedule (expect_every): when last taken, and whether late."""
    expected = [lock for lock in snapshot.locks if lock.expect_every is not None]
    if not expected:
        return ""
    rows = []
    for lock in expected:
        since = max(snapshot.taken_at - lock.last_acquired_at, 0.0)
        late = since > (lock.expect_every or 0)
        taken = f"last taken {age(since)} ago" if lock.acquisitions else f"not seen taken in the {age(since)} watched"
        rows.append(f"<tr><td>{escape(lock.name)}</td><td>{escape(lock.database)}</td>"
                    f"<td class=\"{'bad' if late else 'ok'}\">{taken} (expected every {age(lock.expect_every)})"
                    f"{' LATE' if late else ''}</td></tr>")
    return ("<h2>Expected on a schedule</h2><table id=\"scheduled\"><tr><th>lock</th><th>database</th><th>taken</th></tr>"
            + "".join(rows) + "</table>")


def _failing_probes(probes: tuple[ProbeResult, ...]) -> str:
    failing = [p for p in probes if not p.ok]
    if not failing:
        return ""
    return "<h2>Probes not as expected</h2><ul>" + "".join(
        f"<li>{escape(p.lock)} ({escape(p.database)}): "
        f"{'try failed' if p.acquirable is None else 'acquirable' if p.acquirable else 'held'}</li>"
        for p in failing) + "</ul>"


def _unnamed(snapshot: Snapshot) -> list[str]:
    """Per database, the locks nobody named: how many, the oldest hold, the waits, the oldest holders."""
    if not snapshot.unnamed:
        return ["<h2>Locks nobody named</h2>", "<p class=\"muted\">none</p>"]
    rows = "".join(
        f"<tr><td>{escape(u.database)}</td><td>{u.holders}</td>"
        f"<td class=\"{'bad' if u.max_hold is not None and snapshot.held_seconds(u) > u.max_hold else ''}\">"
        f"{age(snapshot.held_seconds(u))}</td><td>{u.waiters}"
        f"{f' (longest {age(u.wait_seconds)})' if u.waiters else ''}</td>"
        f"<td>{'<br>'.join(_holder_line(h, True, snapshot) for h in u.info_holders)}</td></tr>"
        for u in snapshot.unnamed)
    return ["<h2>Locks nobody named</h2>",
            "<table id=\"unnamed\"><tr><th>database</th><th>held</th><th>oldest hold</th>"
            "<th>waiting</th><th>oldest holders</th></tr>" + rows + "</table>"]
