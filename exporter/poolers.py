"""The pooler consoles: who borrows which server connection, and in which pool mode.

PgBouncer's admin console speaks only the simple query protocol: SHOW SERVERS gives each server
connection's backend pid (remote_pid), its local_port (the backend's client_port) and the client
it is linked to now (link = that client's ptr); SHOW CLIENTS gives each client's ptr, addr, user
and application_name; SHOW POOLS the pool_mode of each (database, user) pool. Columns are read by
name, so versions that lack one (application_name before 1.18) still work. A console dsn whose
host resolves to several addresses (replicas behind one name) is one console per address, the
name looked up again at every read (an answer at most deadline.RESOLVED_SECONDS old), under the
read's deadline. A console that cannot be read never fails the poll.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import conninfo
from psycopg.rows import dict_row

from .config import Config, PoolerConfig
from .deadline import DEADLINES, StuckCall
from .connection import break_off, lookup_addresses, open_connection, proven_direct
from .dsn import describe_hosts, dsn_endpoints, error_line, normal_address, redact
from .pooled import EMPTY_VIEW, Client, PoolerView, Release, ServerLink, release_after
from .snapshot import ConsoleStatus

log = logging.getLogger(__name__)

SHOW_SERVERS = "SHOW SERVERS"
SHOW_CLIENTS = "SHOW CLIENTS"
SHOW_POOLS = "SHOW POOLS"
SHOW_DATABASES = "SHOW DATABASES"
SHOW_CONFIG = "SHOW CONFIG"
CONSOLE_TIMEOUT = 2.0  # seconds for one console's read (name resolution and connect included)
UNIX_ADDR = "unix"  # SHOW SERVERS' local_addr of a server connection over a Unix socket


@dataclass(frozen=True)
class ConsoleAddress:
    """One address to read a console at: the dsn's host and port, and one address it resolves to."""

    host: str
    port: int
    address: str
    label: str  # the address label of pooler_up: the address, with the port where one address has several


def resolve_console(dsn: str, timeout: float, what: str) -> list[ConsoleAddress]:
    """Every address of every host of a console dsn (host=a,b port=6432,6433 lists several),
    looked up now, within timeout (StuckCall past it); a Unix socket directory is its own address,
    and so is a name that cannot be looked up (connecting says why, once)."""
    endpoints = dsn_endpoints(dsn)
    answers = lookup_addresses([host for host, _ in endpoints], timeout)
    found = []
    for host, port in endpoints:
        answer = answers[host]
        if isinstance(answer, StuckCall):
            raise StuckCall(f"{what} did not return within {timeout:g}s")
        addresses = (host,) if isinstance(answer, Exception) else sorted(set(answer))
        found += [(host, port, address) for address in addresses]
    shared = {address for _, _, address in found if sum(a == address for _, _, a in found) > 1}
    return [ConsoleAddress(host, port, address, f"{address}:{port}" if address in shared else address)
            for host, port, address in dict.fromkeys(found)]


def pooler_fronting(poolers: tuple[PoolerConfig, ...], dsn: str, timeout: float) -> str | None:
    """The configured pooler the dsn points at, if any: a console pooler listening on one of
    the dsn's addresses and ports (its console shares the pool's listener), or a pooler known
    by address at one of the dsn's addresses. Every name is looked up at once, within timeout
    (connection.lookup_addresses): one that cannot be looked up in time stands for itself."""
    if not poolers:
        return None
    endpoints = {pooler.name: dsn_endpoints(pooler.dsn) for pooler in poolers if pooler.dsn is not None}
    names = [host for host, _ in dsn_endpoints(dsn)] + [host for pairs in endpoints.values() for host, _ in pairs] + \
        [host for pooler in poolers for host in pooler.addresses]
    answers = lookup_addresses(names, timeout)

    def addresses(host: str) -> set[object]:
        answer = answers[host]
        return {normal_address(a) for a in ((host,) if isinstance(answer, Exception) else answer)}

    ours = {(address, port) for host, port in dsn_endpoints(dsn) for address in addresses(host)}
    for pooler in poolers:
        if pooler.name in endpoints:
            theirs = {(address, port) for host, port in endpoints[pooler.name] for address in addresses(host)}
            if ours & theirs:
                return pooler.name
        if any(address in addresses(host) for host in pooler.addresses for address, _ in ours):
            return pooler.name
    return None


NOT_PROVEN_DIRECT = ("it is not proven to reach PostgreSQL itself (a Unix socket, or the server sees other addresses "
                     "or ports than ours: a pooler, proxy or NAT in between)")


def why_not_direct(poolers: tuple[PoolerConfig, ...], dsn: str, conn: psycopg.Connection, server_addr: str | None,
                   server_port: int | None, client_addr: str | None, client_port: int | None,
                   timeout: float) -> str | None:
    """Why a new connection is not proven to reach PostgreSQL itself, or None when it is: no
    configured pooler at the dsn's address, and both ends of our TCP socket what the server sees
    (connection.proven_direct). The poll prepares its statement, and the probe trusts its tries,
    only on such a connection. Looks names up, within timeout (pooler_fronting)."""
    pooler = pooler_fronting(poolers, dsn, timeout)
    if pooler is not None:
        return f"the dsn points at pooler {pooler}"
    if not proven_direct(conn, server_addr, server_port, client_addr, client_port):
        return NOT_PROVEN_DIRECT
    return None


def _connect(pooler: PoolerConfig, where: ConsoleAddress) -> psycopg.Connection:
    extra: dict[str, Any] = {"host": where.host, "port": str(where.port)}
    if not where.address.startswith("/"):
        extra["hostaddr"] = where.address
    if pooler.password_file:
        with open(pooler.password_file, encoding="utf-8") as handle:
            extra["password"] = handle.read().rstrip("\r\n")
    assert pooler.dsn is not None
    return open_connection(conninfo.make_conninfo(pooler.dsn, **extra), connect_timeout=int(CONSOLE_TIMEOUT))


def _rows(conn: psycopg.Connection, command: str) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(command)  # no parameters: the simple query protocol the console speaks
        return cur.fetchall()


@dataclass
class ConsoleLinks:
    """One console's server connections: over TCP by (backend pid, local port), over a Unix
    socket by (backend pid, the server's port)."""

    tcp: dict[tuple[int, int], ServerLink] = field(default_factory=dict)
    unix: dict[tuple[int, int], ServerLink] = field(default_factory=dict)


def _pool_modes(pools: list[dict[str, Any]], databases: dict[Any, dict[str, Any]],
                settings: dict[str, str]) -> tuple[dict[tuple[Any, Any], str], str]:
    """Each (database, user) pool's mode, and the mode of a pool not listed."""
    modes = {(row.get("database"), row.get("user")): row.get("pool_mode") for row in pools}
    if not modes or any(mode is None for mode in modes.values()):
        # Before pool_mode was a column of SHOW POOLS: per database, else the default.
        default = settings.get("pool_mode") or "session"
        return {key: mode or (databases.get(key[0]) or {}).get("pool_mode") or default
                for key, mode in modes.items()}, str(default)
    return modes, "session"  # type: ignore[return-value]


def _seconds(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def _timestamp(value: Any) -> float | None:
    """A console timestamp ('2026-11-30 18:02:11 UTC', PgBouncer's local time, to the second) as
    seconds on PgBouncer's own clock: only differences of two of them are meaningful."""
    try:
        return datetime.datetime.strptime(str(value)[:19], "%Y-%m-%d %H:%M:%S").replace(
            tzinfo=datetime.timezone.utc).timestamp()
    except ValueError:
        return None


def _release(server: dict[str, Any], database: dict[str, Any], settings: dict[str, str], now: float | None) -> Release | None:
    """When PgBouncer closes this server connection, unused: from its connect and last request
    times against the console's own latest request (now, on PgBouncer's clock)."""
    connected, requested = _timestamp(server.get("connect_time")), _timestamp(server.get("request_time"))
    if now is None or connected is None or requested is None:
        return None
    lifetime = _seconds(database.get("server_lifetime") or settings.get("server_lifetime", 3600))
    min_pool = int(_seconds(database.get("min_pool_size") or settings.get("min_pool_size", 0)))
    seconds, reason = release_after(now - connected, now - requested, lifetime,
                                    _seconds(settings.get("server_idle_timeout", 600)), min_pool)
    return Release(seconds, reason, int(server["remote_pid"]))


def read_console(conn: psycopg.Connection, pooler: str) -> ConsoleLinks:
    """One console's server connections (SHOW SERVERS), with the client borrowing each (SHOW
    CLIENTS), its pool's mode (SHOW POOLS) and when PgBouncer would close it unused (SHOW CONFIG,
    SHOW DATABASES)."""
    servers = _rows(conn, SHOW_SERVERS)
    client_rows = _rows(conn, SHOW_CLIENTS)
    clients = {row.get("ptr"): row for row in client_rows}
    settings = {str(row.get("key")): str(row.get("value")) for row in _rows(conn, SHOW_CONFIG)}
    databases = {row.get("name"): row for row in _rows(conn, SHOW_DATABASES)}
    pools, fallback = _pool_modes(_rows(conn, SHOW_POOLS), databases, settings)
    # The console's "now" on PgBouncer's clock: the latest client request, our own SHOW CLIENTS.
    now = max(filter(None, (_timestamp(row.get("request_time")) for row in client_rows)), default=None)
    links = ConsoleLinks()
    for row in servers:
        pid = row.get("remote_pid")
        if not pid:
            continue
        client_row = clients.get(row.get("link")) if row.get("link") else None
        client = None if client_row is None else Client(
            str(client_row.get("addr") or ""), str(client_row.get("user") or ""), str(client_row.get("application_name") or "")
        )
        link = ServerLink(pooler, str(pools.get((row.get("database"), row.get("user"))) or fallback), client,
                          _release(row, databases.get(row.get("database")) or {}, settings, now))
        # Over a Unix socket local_port is PgBouncer's own listen port and the backend's client_port
        # is -1: the backend is known by its pid on the server whose port the connection names.
        if row.get("local_addr") == UNIX_ADDR or row.get("addr") == UNIX_ADDR:
            if row.get("port") is not None:
                links.unix[(int(pid), int(row["port"]))] = link
        elif row.get("local_port") is not None:
            links.tcp[(int(pid), int(row["local_port"]))] = link
    return links


class PoolerReader:
    """Reads every configured pooler's console (each address of it), once per poll."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._conns: dict[tuple[str, str], psycopg.Connection] = {}
        self._last_error: dict[tuple[str, str], str] = {}
        self._address_counts: dict[str, int] = {}
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        self.close()
        self._poolers = config.poolers
        # Kept for the consoles that stay: a poll's deadline counts each address a name resolved to.
        names = {p.name for p in config.poolers}
        self._address_counts = {name: n for name, n in self._address_counts.items() if name in names}
        self._by_address = {
            address: ServerLink(p.name, p.pool_mode or "session", None)
            for p in config.poolers if p.type is None for address in p.addresses
        }

    @property
    def configured(self) -> bool:
        return bool(self._poolers)

    def read_budget(self) -> float:
        """The longest a read of every console may take: per console pooler, name resolution and
        each address it resolved to last time (at least one), CONSOLE_TIMEOUT each."""
        consoles = [p for p in self._poolers if p.type is not None and p.dsn is not None]
        return sum(CONSOLE_TIMEOUT * (1 + max(1, self._address_counts.get(p.name, 1))) for p in consoles)

    def read(self, server_port: int | None = None) -> PoolerView:
        """The view of every pooler now (server_port: the monitored server's port setting, which
        names it in a pooler's Unix-socket connections); a console that fails, for whatever
        reason, is logged once and left out: it never fails the poll."""
        if not self._poolers:
            return EMPTY_VIEW
        links = ConsoleLinks()
        statuses: list[ConsoleStatus] = []
        for pooler in self._poolers:
            if pooler.type is not None and pooler.dsn is not None:
                self._read_pooler(pooler, links, statuses)
        return PoolerView(links.tcp, links.unix, self._by_address, server_port, tuple(statuses))

    def _read_pooler(self, pooler: PoolerConfig, links: ConsoleLinks, statuses: list[ConsoleStatus]) -> None:
        assert pooler.dsn is not None
        started = self._clock()
        slot = (pooler.name, "")
        try:
            # Name resolution may hang like a console: it runs under the same deadline.
            addresses = resolve_console(pooler.dsn, CONSOLE_TIMEOUT, f"pooler {pooler.name} name resolution")
        except Exception as exc:  # noqa: BLE001 - a console that cannot be read never fails the poll
            self._fail(slot, describe_hosts(pooler.dsn), exc, pooler)
            statuses.append(ConsoleStatus(pooler.name, describe_hosts(pooler.dsn), False, self._clock() - started))
            return
        self._last_error.pop(slot, None)
        self._address_counts[pooler.name] = len(addresses)
        self._forget_gone(pooler.name, {where.label for where in addresses})
        for where in addresses:
            slot = (pooler.name, where.label)
            started = self._clock()
            # On the poll's own thread; at its deadline the read's connection is broken off, so the
            # read returns with an error (a connect is bounded by its connect_timeout).
            watch = DEADLINES.watch(CONSOLE_TIMEOUT, lambda s=slot: break_off(self._conns.get(s)))
            try:
                try:
                    found = self._read_one(pooler, where)
                finally:
                    in_time = watch.cancel()
                if not in_time:  # read, but its connection was broken off meanwhile: read anew next poll
                    self._conns.pop(slot).close()
            except Exception as exc:  # noqa: BLE001 - psycopg, OS, a stuck call or a bug: one console down
                in_time = False
                failure: BaseException = exc
            if not in_time:
                if watch.fired:
                    failure = StuckCall(f"pooler {pooler.name} {where.label} did not answer within {CONSOLE_TIMEOUT:g}s")
                self._fail(slot, where.host, failure, pooler)
                statuses.append(ConsoleStatus(pooler.name, where.label, False, self._clock() - started))
                continue
            if self._last_error.pop(slot, None) is not None:
                log.info("pooler %s console at %s (%s) is read again", pooler.name, where.host, where.label)
            links.tcp.update(found.tcp)
            links.unix.update(found.unix)
            statuses.append(ConsoleStatus(pooler.name, where.label, True, self._clock() - started))

    def _forget_gone(self, pooler: str, labels: set[str]) -> None:
        """Close the connections of addresses the pooler's name no longer resolves to."""
        for slot in [slot for slot in self._conns if slot[0] == pooler and slot[1] not in labels]:
            self._conns.pop(slot).close()

    def _read_one(self, pooler: PoolerConfig, where: ConsoleAddress) -> ConsoleLinks:
        slot = (pooler.name, where.label)
        conn = self._conns.get(slot)
        if conn is None or conn.closed:
            conn = self._conns[slot] = _connect(pooler, where)
        try:
            return read_console(conn, pooler.name)
        except BaseException:
            self._conns.pop(slot, None)
            conn.close()
            raise

    def _fail(self, slot: tuple[str, str], host: str, exc: BaseException, pooler: PoolerConfig) -> None:
        if isinstance(exc, psycopg.Error):
            message = error_line(exc, pooler.dsn or "")
        else:
            message = redact(f"{type(exc).__name__}: {exc}" if not isinstance(exc, (OSError, StuckCall)) else str(exc),
                             pooler.dsn or "")
        if self._last_error.get(slot) != message:
            log.warning("pooler %s console at %s (%s) cannot be read: %s; lock figures are still served, "
                        "without who borrows its connections", pooler.name, host, slot[1] or "resolving", message)
        self._last_error[slot] = message

    def close(self) -> None:
        """Close every console connection (called between reads: none is in use)."""
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()
