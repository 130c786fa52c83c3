"""The exporter's connections: open them (setting nothing on the session), bound each transaction
with LOCAL settings, prove a connection reaches PostgreSQL itself, resolve host names, and find a
result among those of a multi-statement string. Everything here talks to a server or the network."""

from __future__ import annotations

import contextlib
import gc
import math
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import conninfo

from . import queries
from .dsn import LIBPQ_DEFAULT_PORT, normal_address, timeout_ms


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
        conninfo.make_conninfo(dsn, **extra) if extra else dsn,
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


def resolve_host(host: str, port: int = LIBPQ_DEFAULT_PORT) -> set[object]:
    """The addresses a host name (or address) stands for now; itself when it cannot be resolved."""
    if host.startswith("/"):
        return {host}
    try:
        return {normal_address(str(info[4][0])) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    except OSError:
        return {normal_address(host)}


def result_rows(cur: psycopg.Cursor[Any], columns: tuple[str, ...]) -> list[Any]:
    """The rows of the one result, among those of a multi-statement string, whose columns are
    these: found by name, not by counting the statements before it."""
    while True:
        if cur.description is not None and tuple(column.name for column in cur.description) == columns:
            return cur.fetchall()
        if not cur.nextset():
            raise psycopg.ProgrammingError(f"no result with the columns {', '.join(columns)}")
