"""The pooler consoles: who borrows which server connection, and in which pool mode.

PgBouncer's admin console speaks only the simple query protocol: SHOW SERVERS gives each server
connection's backend pid (remote_pid), its local_port (the backend's client_port) and the client
it is linked to now (link = that client's ptr); SHOW CLIENTS gives each client's ptr, addr, user
and application_name; SHOW POOLS the pool_mode of each (database, user) pool. Columns are read by
name, so versions that lack one (application_name before 1.18) still work. A console dsn whose
host resolves to several addresses (replicas behind one name) is one console per address, the
name resolved again at every read. A console that cannot be read never fails the poll.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import conninfo
from psycopg.rows import dict_row

from .config import Config, PoolerConfig
from .deadline import OneAtATime, StuckCall
from .dsn import error_line
from .snapshot import ConsoleStatus

log = logging.getLogger(__name__)

SHOW_SERVERS = "SHOW SERVERS"
SHOW_CLIENTS = "SHOW CLIENTS"
SHOW_POOLS = "SHOW POOLS"
SHOW_DATABASES = "SHOW DATABASES"
SHOW_CONFIG = "SHOW CONFIG"
CONSOLE_TIMEOUT = 2.0  # seconds for one console's read, connect included
HAZARD_MODES = frozenset({"transaction", "statement"})


@dataclass(frozen=True)
class Client:
    """A pooler's client connection, as its console shows it."""

    addr: str
    user: str
    application_name: str


@dataclass(frozen=True)
class ServerLink:
    """A server connection of a pooler: which pooler, in which pool mode, borrowed by whom now."""

    pooler: str
    pool_mode: str
    client: Client | None  # None: nobody borrows it now (or the console is not known)


@dataclass(frozen=True)
class PoolerView:
    """Every pooler's server connections, as one poll sees them."""

    by_backend: dict[tuple[int, int], ServerLink] = field(default_factory=dict)  # (pid, local_port)
    by_address: dict[str, ServerLink] = field(default_factory=dict)  # poolers known by address only
    consoles: tuple[ConsoleStatus, ...] = ()

    def lookup(self, pid: int, client_port: int | None, client_addr: str | None) -> ServerLink | None:
        """The pooler a backend is a server connection of, if any."""
        if client_port is not None:
            link = self.by_backend.get((pid, client_port))
            if link is not None:
                return link
        return self.by_address.get(client_addr or "")


EMPTY_VIEW = PoolerView()


def _addresses(dsn: str) -> tuple[str, list[str]]:
    """(host as written, every address it resolves to now)."""
    params = conninfo.conninfo_to_dict(dsn)
    host = str(params.get("hostaddr") or params.get("host") or "localhost")
    if host.startswith("/"):
        return host, [host]
    port = int(params.get("port") or 5432)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return host, [host]
    return host, sorted({info[4][0] for info in infos})


def _connect(pooler: PoolerConfig, address: str) -> psycopg.Connection:
    extra: dict[str, Any] = {}
    if not address.startswith("/"):
        extra["hostaddr"] = address
    if pooler.password_file:
        with open(pooler.password_file, encoding="utf-8") as handle:
            extra["password"] = handle.read().rstrip("\r\n")
    assert pooler.dsn is not None
    return psycopg.connect(
        conninfo.make_conninfo(pooler.dsn, **extra), autocommit=True, connect_timeout=int(CONSOLE_TIMEOUT),
        prepare_threshold=None,
    )


def _rows(conn: psycopg.Connection, command: str) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(command)  # no parameters: the simple query protocol the console speaks
        return cur.fetchall()


def read_console(conn: psycopg.Connection, pooler: str) -> dict[tuple[int, int], ServerLink]:
    """One console's server connections, by (backend pid, local port)."""
    servers = _rows(conn, SHOW_SERVERS)
    clients = {row.get("ptr"): row for row in _rows(conn, SHOW_CLIENTS)}
    pools = {(row.get("database"), row.get("user")): row.get("pool_mode") for row in _rows(conn, SHOW_POOLS)}
    if any(mode is None for mode in pools.values()) or not pools:
        # Before pool_mode was a column of SHOW POOLS: per database, else the default.
        databases = {row.get("name"): row.get("pool_mode") for row in _rows(conn, SHOW_DATABASES)}
        default = next((row.get("value") for row in _rows(conn, SHOW_CONFIG) if row.get("key") == "pool_mode"), "session")
        pools = {key: mode or databases.get(key[0]) or default for key, mode in pools.items()}
        fallback = default
    else:
        fallback = "session"
    links: dict[tuple[int, int], ServerLink] = {}
    for row in servers:
        pid, port = row.get("remote_pid"), row.get("local_port")
        if not pid or port is None:
            continue
        client_row = clients.get(row.get("link")) if row.get("link") else None
        client = None if client_row is None else Client(
            str(client_row.get("addr") or ""), str(client_row.get("user") or ""), str(client_row.get("application_name") or "")
        )
        mode = pools.get((row.get("database"), row.get("user"))) or fallback
        links[(int(pid), int(port))] = ServerLink(pooler, str(mode), client)
    return links


class PoolerReader:
    """Reads every configured pooler's console (each address of it), once per poll."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._conns: dict[tuple[str, str], psycopg.Connection] = {}
        self._workers: dict[tuple[str, str], OneAtATime] = {}
        self._last_error: dict[tuple[str, str], str] = {}
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        self.close()
        self._poolers = config.poolers
        self._by_address = {
            address: ServerLink(p.name, p.pool_mode or "session", None)
            for p in config.poolers if p.type is None for address in p.addresses
        }

    @property
    def configured(self) -> bool:
        return bool(self._poolers)

    def read(self) -> PoolerView:
        """The view of every pooler now; a console that fails is logged once and left out."""
        if not self._poolers:
            return EMPTY_VIEW
        by_backend: dict[tuple[int, int], ServerLink] = {}
        statuses: list[ConsoleStatus] = []
        for pooler in self._poolers:
            if pooler.type is None or pooler.dsn is None:
                continue
            host, addresses = _addresses(pooler.dsn)
            for address in addresses:
                slot = (pooler.name, address)
                started = self._clock()
                worker = self._workers.setdefault(slot, OneAtATime(f"pooler {pooler.name} {address}"))
                try:
                    links = worker.call(lambda p=pooler, a=address: self._read_one(p, a), timeout=CONSOLE_TIMEOUT)
                except (psycopg.Error, OSError, StuckCall) as exc:
                    self._fail(slot, host, exc, pooler)
                    statuses.append(ConsoleStatus(pooler.name, address, False, self._clock() - started))
                    continue
                if self._last_error.pop(slot, None) is not None:
                    log.info("pooler %s console at %s (%s) is read again", pooler.name, host, address)
                by_backend.update(links)
                statuses.append(ConsoleStatus(pooler.name, address, True, self._clock() - started))
        return PoolerView(by_backend, self._by_address, tuple(statuses))

    def _read_one(self, pooler: PoolerConfig, address: str) -> dict[tuple[int, int], ServerLink]:
        slot = (pooler.name, address)
        conn = self._conns.get(slot)
        if conn is None or conn.closed:
            conn = self._conns[slot] = _connect(pooler, address)
        try:
            return read_console(conn, pooler.name)
        except BaseException:
            self._conns.pop(slot, None)
            conn.close()
            raise

    def _fail(self, slot: tuple[str, str], host: str, exc: BaseException, pooler: PoolerConfig) -> None:
        message = error_line(exc, pooler.dsn or "") if isinstance(exc, psycopg.Error) else str(exc)
        if self._last_error.get(slot) != message:
            log.warning("pooler %s console at %s (%s) cannot be read: %s; lock figures are still served, "
                        "without who borrows its connections", pooler.name, host, slot[1], message)
        self._last_error[slot] = message

    def close(self) -> None:
        for slot, conn in list(self._conns.items()):
            if not self._workers.get(slot, OneAtATime("")).busy:
                conn.close()
        self._conns.clear()
