"""The faults of the truth test: each one started, proven to have taken effect, ended, and
recorded as a truth.Fault (the span in which it took effect, the span in which it ended, whom it
may blind, and the proof the harness saw).

A fault that cannot prove itself is recorded with an empty proof, and the run fails on it: a
fault that did not happen would make every "no lie" after it worthless. Times are the harness's
wall clock (time.time()), on the same machine as the servers whose clock the truth is in.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psycopg
from psycopg.rows import namedtuple_row

from chaos.proxy import BLACKHOLE, PASS, RESET, STALL, Proxy
from chaos.truth import Fault, Span
from exporter.queries import APPLICATION_NAME
from tests.metrics_util import parse
from tests.pgbouncer import PgBouncer
from tests.pgcluster import Cluster

PROVE_WITHIN = 10.0  # seconds a fault has to show it took effect
SLOW_CHUNK_DELAY = 0.2  # seconds the slow console waits on each chunk, each way
FILLER_APP = "chaos-max-connections"

# Every statement the faults send, by name (the exporter's own and the filler connections are
# found by application_name; never the connection that asks).
TERMINATE_EXPORTER = """
SELECT pid, pg_terminate_backend(pid) AS terminated
  FROM pg_stat_activity
 WHERE application_name LIKE %(pattern)s AND pid <> pg_backend_pid()
"""
PREPARED_IN = "SELECT count(*) AS n FROM pg_prepared_xacts WHERE database = %(db)s"
DATABASE_OID = "SELECT oid FROM pg_database WHERE datname = %(db)s"
RELOAD_METRIC = "pg_advisory_lock_exporter_config_last_reload_success_timestamp_seconds"
RELOAD_OK_METRIC = "pg_advisory_lock_exporter_config_last_reload_successful"


class Workload(Protocol):
    def paused(self, target: str) -> contextlib.AbstractContextManager[None]: ...


@dataclass
class Site:
    """One exporter target's world: its server, how the exporter reaches it, what fronts it."""

    name: str  # the exporter's target name
    topology: str  # the letter: a (direct, console), b (through the proxy), c (through the pool)
    cluster: Cluster
    database: str  # the dsn's database
    other_database: str  # another watched database of the same server
    dsn_proxy: Proxy | None = None  # the proxy the exporter's dsn goes through
    console_proxy: Proxy | None = None  # the proxy the exporter's pooler console goes through
    pool: PgBouncer | None = None  # the pooler the exporter's dsn goes through
    bouncers: dict[str, PgBouncer] = field(default_factory=dict)  # every PgBouncer before this server

    def direct_dsn(self, database: str | None = None) -> str:
        return self.cluster.dsn(database or "postgres", connect_timeout="2")


@dataclass
class Exporter:
    """The exporter process, as the faults that hit it need it."""

    pid: int
    metrics_url: str  # its own /metrics (process figures, reloads)
    rewrite_config: Callable[[int], None]  # write the config of the n-th reload


@dataclass
class Planned:
    """One entry of the schedule."""

    kind: str
    target: str  # a Site's name, or "exporter"
    detail: str = ""  # which pooler, which database
    duration: float = 2.0
    gap: float = 3.0  # seconds after it ends before the next fault starts


class FaultRecorder:
    """Appends every fault to a JSON-lines file truth.load reads, and keeps them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.faults: list[Fault] = []
        path.write_text("")

    def add(self, fault: Fault) -> Fault:
        self.faults.append(fault)
        with open(self.path, "a") as handle:
            handle.write(fault.to_json() + "\n")
        return fault


def prove_within(check: Callable[[], str], timeout: float | None = None, step: float = 0.05) -> str:
    """The first non-empty proof check() gives within timeout seconds (PROVE_WITHIN, read at the
    call), or ""."""
    deadline = time.monotonic() + (PROVE_WITHIN if timeout is None else timeout)
    while True:
        try:
            proof = check()
        except Exception:  # noqa: BLE001 - a check that breaks proves nothing yet
            proof = ""
        if proof or time.monotonic() >= deadline:
            return proof
        time.sleep(step)


def episode(kind: str, target: str, blinds: bool, start: Callable[[], None], prove: Callable[[], str],
            end: Callable[[], None], duration: float) -> Fault:
    """Start; prove (the fault took effect within [before start, the proof]); hold for duration
    from the proof on; end (within [before end, after it returned])."""
    lo = hi = time.time()
    proof = ""
    try:
        try:
            start()
            proof = prove_within(prove)
        except Exception as exc:  # noqa: BLE001 - a fault that could not start proves nothing: the run fails on it
            print(f"chaos: {kind} on {target} did not start: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        hi = time.time()
        if proof:
            time.sleep(max(0.0, duration - (time.time() - hi)))
    finally:
        end_lo = time.time()
        end()
        end_hi = time.time()
    return Fault(kind, target, Span(lo, hi), Span(end_lo, end_hi), blinds, proof)


# -- what proves a fault ------------------------------------------------------------------------


# What a stopped or stopping server answers. Not "too many clients" nor "reserved": those a live
# server says (the workload or the max-connections fault), and proved a restart that was not.
DOWN = ("refused", "shutting down", "starting up", "No such file")


def refused(dsn: str) -> str:
    """A proof that the server at dsn is down: the error, or "" if it answered or is merely full."""
    try:
        with psycopg.connect(dsn, connect_timeout=1, autocommit=True):
            return ""
    except psycopg.OperationalError as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"connection refused: {text}" if any(word in text for word in DOWN) else ""


def port_refused(address: tuple[str, int]) -> str:
    try:
        with socket.create_connection(address, timeout=1):
            return ""
    except ConnectionRefusedError:
        return f"connection to {address[0]}:{address[1]} refused"


def process_state(pid: int) -> str:
    """The state letter of /proc/PID/stat (R, S, T, ...), or "" if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def all_stopped(pids: list[int]) -> str:
    states = {pid: process_state(pid) for pid in pids}
    states = {pid: s for pid, s in states.items() if s}  # a backend that exited is not running
    if states and all(s in ("T", "t") for s in states.values()):
        shown = ", ".join(map(str, sorted(states)[:5])) + (", ..." if len(states) > 5 else "")
        return f"/proc/PID/stat state T for {len(states)} processes ({shown})"
    return ""


def counter_grew(proxy: Proxy, name: str, before: int, what: str) -> Callable[[], str]:
    def check() -> str:
        now = getattr(proxy.snapshot(), name)
        return f"{proxy.name}: {now - before} {what}" if now > before else ""
    return check


def scrape_own(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=2) as response:
        return parse(response.read().decode())


# -- the fault kinds ----------------------------------------------------------------------------


def restart(site: Site, planned: Planned, mode: str) -> Fault:
    return episode(planned.kind, site.name, True, lambda: site.cluster.stop(mode),
                   lambda: refused(site.direct_dsn()), site.cluster.pg_ctl_start, planned.duration)


def freeze(site: Site, planned: Planned) -> Fault:
    def stop_all() -> None:
        # Twice: a backend forked while the postmaster was being stopped is stopped the second time.
        site.cluster.signal_all(signal.SIGSTOP)
        site.cluster.signal_all(signal.SIGSTOP)

    def proof() -> str:
        # A backend forked just before the postmaster stopped is stopped when it shows up.
        pids = site.cluster.server_pids()
        for pid in pids:
            if process_state(pid) not in ("T", "t", ""):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
        return all_stopped(pids)

    return episode(planned.kind, site.name, True, stop_all, proof,
                   lambda: site.cluster.signal_all(signal.SIGCONT), planned.duration)


def proxy_fault(kind: str, target: str, blinds: bool, proxy: Proxy, mode: str, duration: float) -> Fault:
    counter, what = {STALL: ("bytes_held", "bytes held back"), BLACKHOLE: ("bytes_dropped", "bytes dropped"),
                     RESET: ("resets", "connections reset")}[mode]
    before = getattr(proxy.snapshot(), counter)
    return episode(kind, target, blinds, lambda: proxy.set_mode(mode), counter_grew(proxy, counter, before, what),
                   lambda: proxy.set_mode(PASS), duration)


def console_refusing(site: Site, planned: Planned) -> Fault:
    proxy = _console(site)
    return episode(planned.kind, site.name, False, lambda: proxy.refuse(True), lambda: port_refused(proxy.address),
                   lambda: proxy.refuse(False), planned.duration)


def console_slow(site: Site, planned: Planned) -> Fault:
    proxy = _console(site)
    before = proxy.snapshot().chunks_delayed
    return episode(planned.kind, site.name, False, lambda: proxy.slow(SLOW_CHUNK_DELAY),
                   counter_grew(proxy, "chunks_delayed", before, f"chunks delayed {SLOW_CHUNK_DELAY:g}s each"),
                   lambda: proxy.slow(0.0), planned.duration)


def _console(site: Site) -> Proxy:
    if site.console_proxy is None:
        raise ValueError(f"target {site.name} has no console behind a proxy")
    return site.console_proxy


def pgbouncer_restart(site: Site, planned: Planned) -> Fault:
    bouncer = site.bouncers[planned.detail]
    address = (bouncer.listen_addr, bouncer.port)
    # Only a pooler the exporter's own dsn goes through may blind it.
    return episode(planned.kind, site.name, bouncer is site.pool, bouncer.stop, lambda: port_refused(address),
                   bouncer.start, planned.duration)


def terminate_exporter(site: Site, planned: Planned) -> Fault:
    def terminate() -> str:
        with _admin(site) as cur:
            rows = cur.execute(TERMINATE_EXPORTER, {"pattern": APPLICATION_NAME + "%"}).fetchall()
        done = sorted(row.pid for row in rows if row.terminated)
        return f"pg_terminate_backend ended the exporter's backends {done}" if done else ""

    return episode(planned.kind, site.name, True, lambda: None, terminate, lambda: None, 0.0)


def max_connections(site: Site, planned: Planned) -> Fault:
    fillers: list[psycopg.Connection[Any]] = []
    refusal: list[str] = []

    def fill() -> None:
        # Connections until the server refuses one; max_connections bounds how many succeed.
        for _ in range(1000):
            try:
                fillers.append(psycopg.connect(site.direct_dsn(), autocommit=True, application_name=FILLER_APP))
            except psycopg.OperationalError as exc:
                text = (str(exc).strip().splitlines() or [""])[-1]
                refusal.append(text if "too many" in text or "reserved" in text else "")
                return

    def release() -> None:
        for conn in fillers:
            conn.close()

    def proof() -> str:
        # The exporter's sessions ended while the server is full, so it must connect into it (a
        # full server alone leaves a connected exporter untouched): a filler, a superuser's
        # session already in, ends them.
        if not (refusal and refusal[0] and fillers):
            return ""
        rows = fillers[0].execute(TERMINATE_EXPORTER, {"pattern": APPLICATION_NAME + "%"}).fetchall()
        ended = sorted(pid for pid, terminated in rows if terminated)
        return (f"{len(fillers)} connections open, then {refusal[0]}; the exporter's backends {ended} ended, "
                "to connect again into the full server")

    return episode(planned.kind, site.name, True, fill, proof, release, planned.duration)


def exporter_stop(exporter: Exporter, planned: Planned) -> Fault:
    return episode(planned.kind, "exporter", True, lambda: os.kill(exporter.pid, signal.SIGSTOP),
                   lambda: all_stopped([exporter.pid]), lambda: os.kill(exporter.pid, signal.SIGCONT),
                   planned.duration)


def reload(exporter: Exporter, planned: Planned, number: int) -> Fault:
    def before() -> float:
        return scrape_own(exporter.metrics_url).get((RELOAD_METRIC, ()), 0.0)

    then = before()

    def send() -> None:
        exporter.rewrite_config(number)
        os.kill(exporter.pid, signal.SIGHUP)

    def proof() -> str:
        samples = scrape_own(exporter.metrics_url)
        now = samples.get((RELOAD_METRIC, ()), 0.0)
        if now > then and samples.get((RELOAD_OK_METRIC, ())) == 1:
            return f"{RELOAD_METRIC} moved from {then:.3f} to {now:.3f}, the reload successful"
        return ""

    return episode(planned.kind, "exporter", False, send, proof, lambda: None, 0.0)


def db_recreate(site: Site, planned: Planned, workload: Workload) -> Fault:
    database = planned.detail
    state: dict[str, int] = {}

    def oid(cur: Any) -> int | None:
        row = cur.execute(DATABASE_OID, {"db": database}).fetchone()
        return None if row is None else row.oid

    def drop() -> None:
        with _admin(site) as cur:
            # DROP refuses while prepared transactions are in the database: the workload's pause
            # lets them finish; wait a little, and if they stay, the fault fails to prove itself.
            for _ in range(100):
                if cur.execute(PREPARED_IN, {"db": database}).fetchone().n == 0:
                    break
                time.sleep(0.05)
            state["old"] = oid(cur) or 0
            cur.execute(f'DROP DATABASE "{database}" WITH (FORCE)')
            state["gone"] = int(oid(cur) is None)

    def create() -> None:
        with _admin(site) as cur:
            cur.execute(f'CREATE DATABASE "{database}"')
            state["new"] = oid(cur) or 0

    def proof() -> str:
        return f"database {database} (oid {state['old']}) dropped: no longer in pg_database" if state.get("gone") else ""

    with workload.paused(site.name):
        fault = episode(planned.kind, site.name, database == site.database, drop, proof, create, planned.duration)
    return fault


def admin_connect(site: Site, within: float = 10.0) -> psycopg.Connection[Any]:
    """A connection for the harness's own statements: a server full of the workload's clients
    is tried again for a while (superuser_reserved_connections does not help: they are
    superusers too)."""
    deadline = time.monotonic() + within
    while True:
        try:
            return psycopg.connect(site.direct_dsn(), autocommit=True)
        except psycopg.OperationalError as exc:
            if "too many clients" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@contextlib.contextmanager
def _admin(site: Site) -> Iterator[Any]:
    with admin_connect(site) as conn, conn.cursor(row_factory=namedtuple_row) as cur:
        yield cur


# -- the table of kinds -------------------------------------------------------------------------

SERVER_KINDS = ("restart-fast", "restart-immediate", "freeze", "terminate-backends", "max-connections", "db-recreate")
NET_KINDS = {"net-stall": STALL, "net-blackhole": BLACKHOLE, "net-reset": RESET}
CONSOLE_NET_KINDS = {"console-net-stall": STALL, "console-net-blackhole": BLACKHOLE, "console-net-reset": RESET,
                     "console-hung": BLACKHOLE}
CONSOLE_KINDS = (*CONSOLE_NET_KINDS, "console-refusing", "console-slow")
EXPORTER_KINDS = ("exporter-stop", "reload")
KINDS = (*SERVER_KINDS, *NET_KINDS, *CONSOLE_KINDS, "pgbouncer-restart", *EXPORTER_KINDS)


def options(kind: str, site: Site) -> list[str]:
    """The details a kind may take at a site ([] where it does not apply)."""
    if kind in SERVER_KINDS:
        return [site.database, site.other_database] if kind == "db-recreate" else [""]
    if kind in NET_KINDS:
        return [""] if site.dsn_proxy is not None else []
    if kind in CONSOLE_KINDS:
        return [""] if site.console_proxy is not None else []
    if kind == "pgbouncer-restart":
        return sorted(site.bouncers)
    return []


class Injector:
    """Runs planned faults against the sites and the exporter, recording each."""

    def __init__(self, sites: dict[str, Site], exporter: Exporter, workload: Workload, recorder: FaultRecorder) -> None:
        self.sites = sites
        self.exporter = exporter
        self.workload = workload
        self.recorder = recorder
        self.reloads = 0

    def run(self, planned: Planned) -> Fault:
        """Play one fault; one that breaks before it could prove itself (the workload would not
        pause, a pooler would not stop) is recorded unproven, and the run goes on (and fails)."""
        try:
            fault = self._fault(planned)
        except Exception as exc:  # noqa: BLE001 - recorded as a fault that did not prove itself
            print(f"chaos: {planned.kind} on {planned.target} broke: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            now = time.time()
            fault = Fault(planned.kind, planned.target, Span(now, now), Span(now, now), False, "")
        return self.recorder.add(fault)

    def _fault(self, planned: Planned) -> Fault:
        kind = planned.kind
        if kind == "exporter-stop":
            return exporter_stop(self.exporter, planned)
        if kind == "reload":
            self.reloads += 1
            return reload(self.exporter, planned, self.reloads)
        site = self.sites[planned.target]
        if kind in ("restart-fast", "restart-immediate"):
            return restart(site, planned, kind.removeprefix("restart-"))
        simple: dict[str, Callable[[Site, Planned], Fault]] = {
            "freeze": freeze, "terminate-backends": terminate_exporter, "max-connections": max_connections,
            "console-refusing": console_refusing, "console-slow": console_slow, "pgbouncer-restart": pgbouncer_restart}
        if kind in simple:
            return simple[kind](site, planned)
        if kind == "db-recreate":
            return db_recreate(site, planned, self.workload)
        if kind in NET_KINDS:
            assert site.dsn_proxy is not None
            return proxy_fault(kind, site.name, True, site.dsn_proxy, NET_KINDS[kind], planned.duration)
        if kind in CONSOLE_NET_KINDS:
            return proxy_fault(kind, site.name, False, _console(site), CONSOLE_NET_KINDS[kind], planned.duration)
        raise ValueError(f"unknown fault kind {kind!r}")
