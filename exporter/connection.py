"""The exporter's connections: open them (setting nothing on the session), bound each transaction
with LOCAL settings, prove a connection reaches PostgreSQL itself, look host names up (under a
deadline: deadline.resolve), and find a result among those of a multi-statement string.
Everything here talks to a server or the network."""

from __future__ import annotations

import contextlib
import gc
import ipaddress
import math
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import conninfo

from . import queries
from .deadline import StuckCall, lookup
from .dsn import normal_address, timeout_ms


def connect(
    dsn: str, application_name: str, timeout_seconds: float, database: str | None = None, password_file: str | None = None,
) -> psycopg.Connection:
    """An autocommit connection with connect_timeout and application_name; to database instead of
    the dsn's, if given; with the password read from password_file at each connect, if given (a
    rotated Kubernetes secret is picked up). It sets nothing on the session: every caller bounds
    its own transactions with settings LOCAL to them (local_timeouts, the poll and the probe's
    one-string transactions), so nothing of ours stays on a backend a pooler hands to someone else.
    Only the poller, on a connection proven to reach PostgreSQL itself, sets its poll's settings on
    the session (queries.DIRECT_SETTINGS, guarded by the server)."""
    extra: dict[str, str] = {}
    if database:
        extra["dbname"] = database
    if password_file:
        try:
            with open(password_file, encoding="utf-8") as handle:
                extra["password"] = handle.read().rstrip("\r\n")
        except OSError as exc:
            raise psycopg.OperationalError(f"password_file: cannot read {password_file!r}: {exc.strerror}") from None
    return open_connection(
        with_addresses(conninfo.make_conninfo(dsn, **extra) if extra else dsn, timeout_seconds),
        application_name=application_name,
        # libpq takes whole seconds and treats anything below 2 as 2.
        connect_timeout=max(2, math.ceil(timeout_seconds)),
    )


class BreakableConnection(psycopg.Connection[Any]):
    """psycopg's connection with a second descriptor of its socket, taken at connect: another
    thread can shut that socket down (break_off) to end a call stuck on it, and never touches a
    descriptor number the connection has closed and the process handed to another socket since."""

    _breaker: socket.socket | None = None
    _breaker_lock: threading.Lock

    def arm(self) -> None:
        self._breaker_lock = threading.Lock()
        self._breaker = socket.socket(fileno=os.dup(self.pgconn.socket))

    def break_off(self) -> None:
        with self._breaker_lock:
            if self._breaker is not None:
                try:
                    self._breaker.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # not connected any more: the call has ended already

    def close(self) -> None:
        try:
            super().close()
        finally:
            # The second descriptor keeps the socket open: closed with the connection.
            if self._breaker is not None:
                with self._breaker_lock:
                    breaker, self._breaker = self._breaker, None
                    if breaker is not None:
                        breaker.close()


def open_connection(conninfo_text: str, **params: Any) -> BreakableConnection:
    """An autocommit BreakableConnection that prepares nothing on its own; a failed attempt
    closes its socket before the error is raised."""
    failure: psycopg.Error
    try:
        conn = BreakableConnection.connect(conninfo_text, autocommit=True, prepare_threshold=None, **params)
    except psycopg.Error as exc:
        # A timed-out attempt (psycopg 3.3) leaves its half-open connection in a reference cycle,
        # reachable from the error's traceback and context: its socket stays open to the server
        # until the cyclic collector runs, one more connection per try against a hung server. The
        # error without them, and the youngest generation collected, close it now.
        exc.__context__ = exc.__cause__ = None
        failure = exc.with_traceback(None)
    else:
        try:
            conn.arm()
        except BaseException:
            conn.close()
            raise
        return conn
    gc.collect(0)
    raise failure


def break_off(conn: psycopg.Connection | None) -> None:
    """End the call stuck on conn, from another thread: shut its socket down, so the call returns
    at once with an error and its connection is dropped. A black-holed network answers nothing and
    TCP never tells (the bytes were taken by a proxy, or by a peer that lost them): a call left to
    return by itself may never return, and no new call may start before it does. A connection not
    made by open_connection (a test's own) is left alone."""
    if isinstance(conn, BreakableConnection):
        conn.break_off()


@contextlib.contextmanager
def local_timeouts(conn: psycopg.Connection, timeout_seconds: float) -> Iterator[psycopg.Connection]:
    """A transaction whose statements are bounded by statement_timeout and lock_timeout set LOCAL
    to it, and planned with the session's default enable_sort (a direct poller session turns it
    off for its poll): they end with it, and never outlive it on a backend a pooler hands to
    someone else."""
    with conn.transaction():
        conn.execute(queries.LOCAL_TIMEOUTS.format(ms=timeout_ms(timeout_seconds)))
        yield conn


def proven_direct(conn: psycopg.Connection, server_addr: str | None, server_port: int | None,
                  client_addr: str | None, client_port: int | None) -> bool:
    """Whether the connection reaches PostgreSQL itself: both ends of our TCP socket are what the
    server sees (inet_client_addr/port for our end, inet_server_addr/port for its end). A pooler,
    a proxy, a TCP forwarder or NAT in between changes one of the four, even on the same port
    number. Over a Unix socket nothing can be proven (a pooler's backend sees -1 as well)."""
    try:
        with socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                return False
            local, peer = sock.getsockname()[:2], sock.getpeername()[:2]
    except (OSError, psycopg.Error):
        return False
    return (normal_address(local[0]), local[1]) == (normal_address(client_addr), client_port) and \
        (normal_address(peer[0]), peer[1]) == (normal_address(server_addr), server_port)


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    return True


def _local(host: str) -> bool:
    """A Unix socket directory (or a Windows path, as psycopg sees it): no name to look up."""
    return host.startswith(("/", "@")) or host[1:2] == ":"


def _getaddrinfo(host: str) -> tuple[str, ...]:
    """Every TCP address of host, in the resolver's order (libpq tries them in it)."""
    infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP, type=socket.SOCK_STREAM)
    return tuple(dict.fromkeys(str(info[4][0]) for info in infos))


def lookup_addresses(hosts: list[str], timeout: float) -> dict[str, tuple[str, ...] | Exception]:
    """Each host name's addresses, or why it has none (OSError, or StuckCall when its lookup did not
    return within timeout): looked up at once, each on a resolver thread (deadline.lookup, shared
    with everyone asking for that name), all waited for within timeout together, so a hung name
    never holds the caller longer and never delays the others. An address is its own answer."""
    pending = {host: lookup(("getaddrinfo", host), lambda h=host: _getaddrinfo(h))
               for host in dict.fromkeys(hosts) if not _is_address(host) and not _local(host)}
    found: dict[str, tuple[str, ...] | Exception] = {host: (host,) for host in hosts if host not in pending}
    ends = time.monotonic() + timeout
    for host, waiting in pending.items():
        try:
            found[host] = waiting.wait(max(0.0, ends - time.monotonic()), f"name resolution of {host!r}")
        except StuckCall:
            found[host] = StuckCall(f"name resolution of {host!r} did not return within {timeout:g}s")
        except OSError as exc:
            found[host] = exc
    return found


def with_addresses(conninfo_text: str, timeout: float) -> str:
    """conninfo_text with every host name it lists looked up now, within timeout (lookup_addresses),
    and given as hostaddr: psycopg would look them up itself, on the calling thread, with no bound
    (connect_timeout starts after), so a hung resolver would hold the caller past its deadline.
    host stays for TLS verification and the password file; a name with several addresses becomes
    one host entry per address, in the resolver's order, as psycopg makes one attempt per address;
    a name that cannot be looked up is left out, as psycopg leaves it, and when none can the error
    is psycopg's. An address is its own hostaddr (as psycopg makes it); a Unix socket, or a host
    given its hostaddr, is kept as it is; a dsn with no name to look up is returned unchanged."""
    params = conninfo.conninfo_to_dict(conninfo_text)
    hosts = str(params.get("host") or os.environ.get("PGHOST") or "").split(",")
    hostaddrs = str(params.get("hostaddr") or os.environ.get("PGHOSTADDR") or "").split(",")
    ports = str(params.get("port") or os.environ.get("PGPORT") or "").split(",")
    if hostaddrs == [""]:
        hostaddrs *= len(hosts)
    if len(hostaddrs) != len(hosts) or 1 < len(ports) != len(hosts):
        return conninfo_text  # psycopg says what is wrong
    names = [host for host, addr in zip(hosts, hostaddrs) if host and not addr]
    if not [host for host in names if not _is_address(host) and not _local(host)]:
        return conninfo_text
    found = lookup_addresses(names, timeout)
    entries: list[tuple[str, str, str]] = []
    failure: tuple[str, Exception] | None = None
    for index, (host, addr) in enumerate(zip(hosts, hostaddrs)):
        port = ports[index] if len(ports) > 1 else ports[0]
        answer = found.get(host) if host and not addr else None
        if answer is None:
            entries.append((host, addr, port))
        elif isinstance(answer, Exception):
            failure = (host, answer)
        else:
            entries += [(host, "" if _local(host) else address, port) for address in answer]
    if not entries:
        assert failure is not None
        host, error = failure
        raise psycopg.OperationalError(str(error) if isinstance(error, StuckCall) else f"failed to resolve host {host!r}: {error}")
    extra = {"host": ",".join(e[0] for e in entries), "hostaddr": ",".join(e[1] for e in entries)}
    if ports != [""]:
        extra["port"] = ",".join(e[2] for e in entries)
    return conninfo.make_conninfo(conninfo_text, **extra)


def result_rows(cur: psycopg.Cursor[Any], columns: tuple[str, ...]) -> list[Any]:
    """The rows of the one result, among those of a multi-statement string, whose columns are
    these: found by name, not by counting the statements before it."""
    while True:
        if cur.description is not None and tuple(column.name for column in cur.description) == columns:
            return cur.fetchall()
        if not cur.nextset():
            raise psycopg.ProgrammingError(f"no result with the columns {', '.join(columns)}")
