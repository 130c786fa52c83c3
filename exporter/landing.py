"""GET /: what the exporter sees now, from the latest snapshot (never from the database).

Plain HTML, no external assets, refreshing itself every few seconds.
"""

from __future__ import annotations

import time
from html import escape

from . import __version__
from .ages import age, counted
from .snapshot import MODE_EXCLUSIVE, Holder, LockState, ProbeResult, ReloadStatus, Snapshot, Waiter

REFRESH_SECONDS = 5
FREE_NAMES_SHOWN = 50
# The troubles of a named lock, worst first: the order of the page's rows.
OVER_MAX_HOLD = "over max_hold"
BLOCKED = "blocked"
STRANDED = "stranded"
WAITERS = "waited for"
# What a probe's last try says, as /metrics says it (probe_state). Only a trusted try that ran and
# did not match is "not as expected" (probe_ok 0 with probe_acquirable served: what
# PgAdvisoryLockProbeExpectationFailed fires on). A failed try (probe_errors_total up, no
# probe_acquirable) says nothing of the lock but that nobody checks it: trouble, after "not as
# expected", which is a finding about the lock itself. An untrusted try (probe_trusted 0, no
# probe_ok) is a fact of the exporter's connection, the same for every probe through it and lasting
# until the dsn changes: it is said on the row and in the probes' list, never a trouble of the lock.
PROBE_AS_EXPECTED = "probe as expected"
PROBE_NOT_AS_EXPECTED = "probe not as expected"
PROBE_FAILING = "probe failing"
PROBE_UNTRUSTED = "probe untrusted"
TROUBLES = (OVER_MAX_HOLD, BLOCKED, STRANDED, WAITERS, PROBE_NOT_AS_EXPECTED, PROBE_FAILING)
_CLASSES = {OVER_MAX_HOLD: "over", BLOCKED: "blocked", STRANDED: "stranded", WAITERS: "waiters",
            PROBE_NOT_AS_EXPECTED: "probe", PROBE_FAILING: "probe"}
# Fits a 900 px window without sideways scrolling: tables take the page's width and long words
# (a key, user@client, a gid) break where they must rather than push the table past the edge.
_STYLE = """
body{font-family:system-ui,sans-serif;margin:1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;width:100%}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top;overflow-wrap:anywhere}
th{background:#f3f3f3}.bad{color:#b00;font-weight:bold}.ok{color:#070}.muted{color:#777}
tr.over{background:#fde8e8}tr.trouble td:first-child{border-left:4px solid #b00}
.tag{font-size:.8em;color:#fff;background:#b00;border-radius:3px;padding:0 .3em;white-space:nowrap}
code{overflow-wrap:anywhere}.n{white-space:nowrap;overflow-wrap:normal}
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


def _waiter_line(w: Waiter, with_key: bool) -> str:
    """'pid 41 shard-7-worker-b postgres@10.0.0.7, waiting 2m10s': who waits, and for how long."""
    who = w.usename + (f"@{w.client_addr}" if w.client_addr else "")
    via = f" via pooler {w.pooler}" if w.pooler else ""
    return escape(f"{'key ' + w.key + ', ' if with_key else ''}pid {w.pid} {w.application_name or '-'} "
                  f"{who or '?'}{via}, waiting {age(w.wait_seconds)}")


def _waiters_cell(waiters: int, wait_seconds: float, waiting: tuple[Waiter, ...], with_key: bool) -> str:
    """How many wait, the longest wait, then who waits (the longest waits the snapshot names)."""
    if not waiters:
        return "0"
    named = "".join(f"<br>{_waiter_line(w, with_key)}" for w in waiting)
    more = waiters - len(waiting)
    return (f'<span class="bad">{waiters} (longest {age(wait_seconds)})</span>{named}'
            + (f'<br><span class="muted">and {more} more</span>' if more > 0 else ""))


def probe_state(probe: ProbeResult) -> str:
    """What the last try says: failing (it did not run; an untrusted connection or not), untrusted
    (it ran where a pooled backend may hold the lock itself), as expected, or not as expected."""
    if probe.acquirable is None:
        return PROBE_FAILING
    if not probe.trusted:
        return PROBE_UNTRUSTED
    return PROBE_AS_EXPECTED if probe.ok else PROBE_NOT_AS_EXPECTED


def _probe_line(probe: ProbeResult) -> str:
    """The probe's state in words: what it found, or why it says nothing of the lock."""
    state = probe_state(probe)
    if state == PROBE_AS_EXPECTED:
        return '<span class="ok">as expected</span>'
    if state == PROBE_NOT_AS_EXPECTED:
        found = "free: nobody holds it" if probe.acquirable else "held: someone holds it"
        return f'<span class="bad">NOT as expected</span>, found it {found}'
    if state == PROBE_FAILING:
        also = "; its connection is not proven to reach PostgreSQL itself either" if not probe.trusted else ""
        return (f'<span class="bad">failing</span>: its last try failed ({counted(probe.errors, "try")} failed '
                f"so far{also}), so nobody checks this lock: the exporter's log says why")
    return ('<span class="muted">untrusted</span>: its connection is not proven to reach PostgreSQL itself (a pooler, '
            "proxy, NAT or Unix socket), where a try may land on a backend that holds the lock itself and succeed, "
            "so what it finds is not checked: the exporter's log says why")


def troubles(lock: LockState, probe: ProbeResult | None, snapshot: Snapshot) -> tuple[str, ...]:
    """What is wrong with a lock now, in TROUBLES' order (the page's order of rows)."""
    state = None if probe is None else probe_state(probe)
    found = {
        OVER_MAX_HOLD: lock.max_hold is not None and snapshot.held_seconds(lock) > lock.max_hold,
        BLOCKED: lock.blocked_holders > 0,
        STRANDED: bool(lock.pooled_session_holders),
        WAITERS: lock.waiters > 0,
        PROBE_NOT_AS_EXPECTED: state == PROBE_NOT_AS_EXPECTED,
        PROBE_FAILING: state == PROBE_FAILING,
    }
    return tuple(kind for kind in TROUBLES if found[kind])


def by_trouble(lock: LockState, probe: ProbeResult | None, snapshot: Snapshot) -> tuple[bool, ...]:
    """A sort key: a lock over its max_hold first, then blocked, stranded, waited for, its probe not
    as expected, its probe failing, then the rest; a lock with several troubles before one with
    only its worst."""
    found = troubles(lock, probe, snapshot)
    return tuple(kind not in found for kind in TROUBLES)


def _lock_row(lock: LockState, probe: ProbeResult | None, snapshot: Snapshot) -> str:
    holders = "<br>".join(_noted(_holder_line(h, lock.is_family, snapshot), snapshot.key_notes.get((lock.database, h.key)))
                          for h in lock.info_holders) or '<span class="muted">none</span>'
    if lock.is_family:
        holders = f"{counted(lock.keys_held, 'key')} held<br>" + holders
    hidden = lock.holds - len(lock.info_holders)
    if hidden:
        holders += f"<br><span class=\"muted\">and {hidden} more</span>"
    found = troubles(lock, probe, snapshot)
    over = OVER_MAX_HOLD in found
    held = age(snapshot.held_seconds(lock))
    held = f'<span class="bad">{held} OVER</span>' if over else held
    max_hold = "" if lock.max_hold is None else f'<br><span class="muted">max_hold {age(lock.max_hold)}</span>'
    probe_line = "" if probe is None else "<br>probe: " + _probe_line(probe)
    tags = "".join(f' <span class="tag">{kind}</span>' for kind in found)
    kind = f' class="trouble {_CLASSES[found[0]]}"' if found else ""
    return (
        f"<tr{kind}><td><b>{escape(lock.name)}</b>{tags}<br><span class=\"muted\">key {escape(lock.key)} in "
        f"{escape(lock.database)} ({escape(lock.source)})</span>{probe_line}</td>"
        f"<td>{holders}</td><td class=\"n\">{held}{max_hold}</td>"
        f"<td>{_waiters_cell(lock.waiters, lock.wait_seconds, lock.waiting, lock.is_family)}</td></tr>"
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
    """The named locks held, awaited, or with a probe not as expected or failing (a table, in order
    of trouble), then the free ones (names)."""
    by_name = {(p.lock, p.database): p for p in probes}

    def probe(lock: LockState) -> ProbeResult | None:
        return by_name.get((lock.name, lock.database))

    def in_table(lock: LockState) -> bool:
        return bool(lock.holds or lock.waiters or troubles(lock, probe(lock), snapshot))

    busy = sorted(filter(in_table, snapshot.locks), key=lambda lock: by_trouble(lock, probe(lock), snapshot))
    free = [lock for lock in snapshot.locks if not in_table(lock)]
    parts = [f"<h2>Named locks held, awaited or with a probe in trouble ({len(busy)}), in order of trouble</h2>"]
    if busy:
        parts.append("<table id=\"locks\"><tr><th style=\"width:22%\">lock</th><th style=\"width:40%\">holders</th>"
                     "<th class=\"n\">held for</th><th style=\"width:28%\">waiters</th></tr>")
        parts += [_lock_row(lock, probe(lock), snapshot) for lock in busy]
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
    """Every probe that is not as expected, failing or untrusted, with what that means: an untrusted
    probe of a free lock is shown nowhere else."""
    shown = [p for p in probes if probe_state(p) != PROBE_AS_EXPECTED]
    if not shown:
        return ""
    return "<h2 id=\"probes\">Probes not as expected, failing or untrusted</h2><ul>" + "".join(
        f"<li>{escape(p.lock)} ({escape(p.database)}): {_probe_line(p)}</li>" for p in shown) + "</ul>"


def _unnamed(snapshot: Snapshot) -> list[str]:
    """Per database, the locks nobody named: how many, the oldest hold, the waits, the oldest holders."""
    if not snapshot.unnamed:
        return ["<h2>Locks nobody named</h2>", "<p class=\"muted\">none</p>"]
    rows = "".join(
        f"<tr><td>{escape(u.database)}</td><td>{u.holders}</td>"
        f"<td class=\"{'bad' if u.max_hold is not None and snapshot.held_seconds(u) > u.max_hold else ''}\">"
        f"{age(snapshot.held_seconds(u))}</td><td>{_waiters_cell(u.waiters, u.wait_seconds, u.waiting, True)}</td>"
        f"<td>{'<br>'.join(_holder_line(h, True, snapshot) for h in u.info_holders)}</td></tr>"
        for u in snapshot.unnamed)
    return ["<h2>Locks nobody named</h2>",
            "<table id=\"unnamed\"><tr><th>database</th><th>held</th><th>oldest hold</th>"
            "<th>waiting</th><th>oldest holders</th></tr>" + rows + "</table>"]
