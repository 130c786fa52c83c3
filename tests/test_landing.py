"""GET /: the landing page, rendered by a real browser (headless Chromium) over a real workload."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from exporter import landing, metrics
from exporter.snapshot import (Blocker, Chain, Holder, LockState, OwnWait, ProbeResult, ReloadStatus, Snapshot,
                               UnnamedLocks, Waiter)
from tests.conftest import stuck_with_waiter
from tests.exporter_proc import ExporterProcess
from tests.metrics_util import parse

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium(url: str, tmp_path: Path, *args: str) -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail("chromium not found: `make tools` unpacks Debian's chromium into the project's cache (tools/fetch.py)")
    # Its profile, crash reports and caches in the test's folder, not in the home directory.
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    result = subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args, url],
                            capture_output=True, text=True, timeout=120, env=env)
    return result.stdout


# Appended to a page before the browser loads it: the page's own width against the window's, read
# by the browser after layout, into the DOM it dumps.
MEASURE = ("<script>document.body.setAttribute('data-widths', document.documentElement.scrollWidth + ' ' + "
           "document.documentElement.clientWidth)</script>")


def widths_at(page: str, width: int, tmp_path: Path) -> tuple[int, int, str]:
    """(scrollWidth, clientWidth, the DOM) of a page in a real browser window `width` px wide."""
    path = tmp_path / "page.html"
    path.write_text(page.replace("</body>", MEASURE + "</body>"))
    dom = chromium(path.as_uri(), tmp_path, "--dump-dom", f"--window-size={width},800")
    found = re.search(r'data-widths="(\d+) (\d+)"', dom)
    assert found, dom[:2000]
    return int(found[1]), int(found[2]), dom


def row_names(page: str) -> list[str]:
    """The named locks' rows of the table, top to bottom."""
    table = page.split('<table id="locks">', 1)[1].split("</table>", 1)[0]
    return re.findall(r"<tr[^>]*><td><b>([^<]*)</b>", table)


NOW = 10_000.0


def _holder(pid: int | None, held: float, app: str = "worker", **more) -> Holder:
    return Holder(pid, 1.0, frozenset({"exclusive"}), app, "postgres", "10.20.30.40", "idle in transaction",
                  NOW - held, **more)


def _lock(name: str, held: float | None, *, holders: tuple[Holder, ...] = (), **more) -> LockState:
    return LockState(name, "app", len(holders), 0, None if held is None else NOW - held, more.pop("waiters", 0),
                     more.pop("wait_seconds", 0.0), 1, info_holders=holders, holds=len(holders), key="4242", **more)


LONG = "a-rather-long-application-name-from-a-kubernetes-pod-7f9c8d6b5-x2x9q"
WAITERS = (Waiter(501, LONG, "svc_billing_batch", "10.244.17.203", 125.5, "4242"),
           Waiter(502, "billing-cron", "svc_billing_batch", "10.244.17.204", 3.0, "4242"))


def trouble_of_every_kind() -> tuple[Snapshot, tuple[ProbeResult, ...]]:
    """A lock with each trouble (and one with two), listed in the config in the reverse order of
    trouble, with the longest values the page shows: what the page must order and fit."""
    chain = Chain(OwnWait(301, "app", "relation", "AccessExclusiveLock", 16384, None, None, 2400.0),
                  "relation public.a_table_with_a_long_name_for_a_test",
                  (Blocker(302, 1, 301, "report-runner-with-a-long-name", "svc_reporting", "10.244.99.201",
                           "idle in transaction", 7200.0, False),))
    locks = (
        _lock("calm", 10.0, holders=(_holder(101, 10.0), _holder(None, 9.0, "job-3003-a-long-prepared-gid-xyz",
                                                                       prepared_xid=77)), max_hold=3600.0),
        _lock("probed", None),
        _lock("waited", 20.0, holders=(_holder(201, 20.0),), waiters=2, wait_seconds=125.5, waiting=WAITERS),
        _lock("stranded", 30.0, holders=(_holder(401, 30.0, "", pooler="pgbouncer-main", stranded=True),),
              pooled_session_holders=1),
        _lock("blocked", 40.0, holders=(_holder(301, 40.0, "deploy-migrate"),), blocked_holders=1,
              blocked_holder_wait_seconds=2400.0),
        _lock("over", 120.0, holders=(_holder(601, 120.0),), max_hold=60.0),
        _lock("over-and-waited", 90.0, holders=(_holder(701, 90.0),), max_hold=60.0, waiters=2, wait_seconds=125.5,
              waiting=WAITERS),
        _lock("free", None),
        _lock("probe-failing", None),
    )
    unnamed = (UnnamedLocks("app", 1, 1, NOW - 50.0, 4.0, (_holder(801, 50.0, key="-9223372036854775808"),), 30.0,
                            waiting=(Waiter(802, LONG, "svc_legacy", "10.244.17.205", 4.0, "-9223372036854775808"),)),)
    probes = (ProbeResult("probed", "app", True, False, 0.01, 0, 0.0),
              ProbeResult("calm", "app", False, True, 0.01, 0, 0.0),
              ProbeResult("probe-failing", "app", None, False, 2.0, 12, 0.0, trusted=False),
              ProbeResult("waited", "app", True, True, 0.01, 0, 0.0, trusted=False))
    return Snapshot(up=True, locks=locks, unnamed=unnamed, chains=(chain,), taken_at=NOW, wall_at=1.7e9), probes


def test_rows_in_order_of_trouble_and_who_waits_named() -> None:
    snapshot, probes = trouble_of_every_kind()
    page = landing.render(snapshot, probes, ReloadStatus(), "/metrics").decode()
    # Over max_hold (two troubles before one), blocked, stranded, waited for, probe not as
    # expected, probe failing (free locks, shown for their probes), then the rest; free locks by
    # name below.
    assert row_names(page) == ["over-and-waited", "over", "blocked", "stranded", "waited", "probed", "probe-failing",
                               "calm"]
    assert '<tr class="trouble over">' in page and "Named locks free (1)</h2><p>free</p>" in page
    # Who waits: pid, application, user@client, for how long; the longest wait first.
    assert f"pid 501 {LONG} svc_billing_batch@10.244.17.203, waiting 2m05s<br>pid 502 billing-cron" in page
    assert f"key -9223372036854775808, pid 802 {LONG} svc_legacy@10.244.17.205, waiting 4s" in page


def _row(page: str, name: str) -> str:
    table = page.split('<table id="locks">', 1)[1].split("</table>", 1)[0]
    return next(row for row in table.split("</tr>") if f"<td><b>{name}</b>" in row)


def _listed(page: str, name: str) -> str:
    """A probe's item in the list of probes not as expected, failing or untrusted."""
    found = re.search(r"<h2[^>]*>Probes [^<]*</h2><ul>(.*?)</ul>", page)
    items = found[1].split("</li>") if found else []
    return next((item for item in items if item.startswith(f"<li>{name} ")), "")


def test_each_probe_state_has_its_own_label_and_only_a_served_mismatch_is_not_as_expected() -> None:
    """'NOT as expected' where /metrics says probe_ok 0 with probe_acquirable served (what
    PgAdvisoryLockProbeExpectationFailed fires on), nowhere else: a failed try serves no
    probe_acquirable, an untrusted one no probe_ok. A failing probe is trouble, after one not as
    expected; an untrusted one is none (its free lock stays free)."""
    locks = tuple(_lock(name, None) for name in ("matched", "untrusted", "untrusted-failed", "failed", "found-free"))
    locks += (_lock("untrusted-held", 5.0, holders=(_holder(901, 5.0),)),)
    # As the prober makes them (probe.Prober._record): (acquirable, ok, ..., errors, ..., trusted).
    probes = (ProbeResult("matched", "app", False, True, 0.01, 0, 0.0),
              ProbeResult("untrusted", "app", True, False, 0.01, 0, 0.0, trusted=False),
              ProbeResult("untrusted-failed", "app", None, False, 2.0, 4, 0.0, trusted=False),
              ProbeResult("failed", "app", None, False, 2.0, 3, 0.0),
              ProbeResult("found-free", "app", True, False, 0.01, 0, 0.0),
              ProbeResult("untrusted-held", "app", True, True, 0.01, 0, 0.0, trusted=False))
    snapshot = Snapshot(up=True, locks=locks, taken_at=NOW, wall_at=1.7e9)
    page = landing.render(snapshot, probes, ReloadStatus(), "/metrics").decode()
    served = parse(metrics.render(snapshot, probes).decode())

    for p in probes:
        ids = (("database", "app"), ("lock", p.lock))
        mismatch_served = (served.get(("pg_advisory_lock_probe_ok", ids)) == 0
                           and ("pg_advisory_lock_probe_acquirable", ids) in served)
        said = _row(page, p.lock) if p.lock in row_names(page) else ""
        said += _listed(page, p.lock)
        assert ("NOT as expected" in said) == mismatch_served, (p, said)

    assert row_names(page) == ["found-free", "untrusted-failed", "failed", "untrusted-held"]  # ties: config order
    assert "Named locks free (2)</h2><p>matched, untrusted</p>" in page
    assert '<span class="tag">probe not as expected</span>' in _row(page, "found-free")
    assert "found it free: nobody holds it" in _row(page, "found-free")
    for name, errors in (("failed", "3 tries"), ("untrusted-failed", "4 tries")):
        row = _row(page, name)
        assert '<span class="tag">probe failing</span>' in row and "NOT as expected" not in row
        assert f'probe: <span class="bad">failing</span>: its last try failed ({errors} failed so far' in row
    assert "not proven to reach PostgreSQL itself either" in _row(page, "untrusted-failed")
    assert "either" not in _row(page, "failed")
    held = _row(page, "untrusted-held")
    assert '<span class="tag">' not in held  # held, no trouble: in the table for its holder only
    assert 'probe: <span class="muted">untrusted</span>: its connection is not proven to reach PostgreSQL' in held
    assert '<span class="muted">untrusted</span>' in _listed(page, "untrusted")  # a free lock's: in the list
    assert _listed(page, "matched") == "" and _listed(page, "failed")


@pytest.mark.slow
def test_every_trouble_fits_a_900_px_window_in_a_browser(tmp_path) -> None:
    snapshot, probes = trouble_of_every_kind()
    page = landing.render(snapshot, probes, ReloadStatus(), "/metrics").decode()
    scroll, client, dom = widths_at(page, 900, tmp_path)
    assert 850 <= client <= 900 and scroll <= client, f"{scroll} px wide in a {client} px window"  # less a scroll bar
    assert row_names(dom)[0] == "over-and-waited"
    chromium((tmp_path / "page.html").as_uri(), tmp_path, f"--screenshot={tmp_path / 'trouble.png'}", "--window-size=900,1400")
    assert (tmp_path / "trouble.png").stat().st_size > 10_000


@pytest.mark.slow
def test_landing_page_shows_names_and_holders_in_a_browser(tmp_path, server, sessions) -> None:
    leader = sessions.open(application_name="billing-leader-7")
    leader.execute("SELECT pg_advisory_lock(4242), pg_advisory_lock(99), pg_advisory_lock(77, 1), pg_advisory_lock(77, 2)")
    stuck = stuck_with_waiter(sessions, server, "shard <worker> & co", "shard-worker-b")
    config = {"dsn": server.dsn(), "poll_interval": "200ms", "locks": [
        {"name": "billing-leader", "key": 4242, "probe": {"expect": "held", "interval": "200ms"}},
        {"name": "shard-7", "key": [42, 7], "max_hold": "1s"},
        {"name": "nightly-export", "key": {"hashtext": "nightly-export"}},
        {"name": "tenants", "key": {"namespace": 77}},
    ]}
    proc = ExporterProcess(tmp_path, config)
    shard_7 = {"database": "postgres", "lock": "shard-7"}  # sorted, as parse keys them
    try:
        # shard-7 held past its max_hold of 1 s: its row turns red and comes first.
        proc.metrics_when(lambda t: parse(t).get(("pg_advisory_lock_held_seconds", tuple(shard_7.items())), 0) > 1.5)
        status, page = proc.get("/")
        scroll, client, dom = widths_at(page, 900, tmp_path)
        chromium(proc.url + "/", tmp_path, f"--screenshot={tmp_path / 'landing.png'}", "--window-size=900,800")
    finally:
        proc.stop()
        stuck.release()
    assert status == 200 and '<table id="locks">' in dom
    assert scroll <= client, f"{scroll} px wide in a {client} px window"  # no sideways scrolling at 900 px
    assert row_names(dom) == ["shard-7", "billing-leader", "tenants"]  # over max_hold (and waited for) first
    assert '<tr class="trouble over">' in dom and "OVER</span>" in dom
    assert f"pid {leader.info.backend_pid} billing-leader-7" in dom
    assert "shard &lt;worker&gt; &amp; co" in dom  # escaped, not markup
    assert "1 (longest" in dom  # shard-7's waiter, named
    assert f"pid {stuck.waiter.info.backend_pid} shard-worker-b postgres@127.0.0.1, waiting" in dom
    assert "Named locks free (1)" in dom and "nightly-export" in dom
    assert '<table id="unnamed">' in dom  # key 99
    assert "key 99, exclusive: pid" in dom  # who holds the oldest key nobody named
    assert "<b>tenants</b><br><span class=\"muted\">key (77, *) in postgres" in dom and "2 keys held" in dom
    assert f"key 77,1, exclusive: pid {leader.info.backend_pid}" in dom
    assert 'href="/metrics"' in dom and 'http-equiv="refresh"' in dom
    assert (tmp_path / "landing.png").stat().st_size > 10_000
