"""Connection strings: describe them without secrets, and open the exporter's connections."""

from __future__ import annotations

import contextlib
import getpass
import ipaddress
import math
import os
import random
import re
import socket
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import conninfo

from . import queries

BACKOFF_FIRST = 0.25
LIBPQ_DEFAULT_PORT = 5432  # what libpq connects to when neither the dsn nor $PGPORT names a port

_SHOWN_PARAMS = ("host", "hostaddr", "port", "dbname", "user", "sslmode")
_QUOTED = re.compile(r'"[^"]*"')


class DsnError(Exception):
    """The dsn is not a libpq connection string."""


def _parse(dsn: str) -> dict[str, str]:
    try:
        return conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        # libpq quotes fragments of the string in its message, and a fragment may be the
        # password: drop every quoted part.
        message = _QUOTED.sub('"..."', (str(exc).splitlines() or ["unparsable"])[0])
        raise DsnError(f"not a valid libpq connection string ({message})") from None


def redact(text: str, dsn: str) -> str:
    """text with the dsn's password, if any, blanked out."""
    try:
        password = conninfo.conninfo_to_dict(dsn).get("password")
    except psycopg.ProgrammingError:
        return text
    return text.replace(str(password), "***") if password else text


def describe_dsn(dsn: str) -> str:
    """'host=db port=5432 dbname=app user=exp': the dsn's identity, never its password."""
    params = _parse(dsn)
    shown = [f"{name}={params[name]}" for name in _SHOWN_PARAMS if params.get(name)]
    return " ".join(shown) if shown else "(libpq defaults and PG* environment)"


def server_name(dsn: str) -> str:
    """'db:5432/app' for log lines about this server."""
    try:
        params = _parse(dsn)
    except DsnError:
        return "(unparsable dsn)"
    host = params.get("host") or params.get("hostaddr") or "localhost"
    port = params.get("port") or "5432"
    db = params.get("dbname") or params.get("user") or ""
    return f"{host}:{port}/{db}"


def connect(
    dsn: str, application_name: str, timeout_seconds: float, database: str | None = None, password_file: str | None = None,
) -> psycopg.Connection:
    """An autocommit connection with connect_timeout and application_name; to database instead of
    the dsn's, if given; with the password read from password_file at each connect, if given (a
    rotated Kubernetes secret is picked up). It sets nothing on the session: every caller bounds
    its own transactions with settings LOCAL to them (local_timeouts, the poll and the probe's
    one-string transactions), so nothing of ours stays on a backend a pooler hands to someone else."""
    extra: dict[str, str] = {}
    if database:
        extra["dbname"] = database
    if password_file:
        try:
            with open(password_file, encoding="utf-8") as handle:
                extra["password"] = handle.read().rstrip("\r\n")
        except OSError as exc:
            raise psycopg.OperationalError(f"password_file: cannot read {password_file!r}: {exc.strerror}") from None
    return psycopg.connect(
        conninfo.make_conninfo(dsn, **extra) if extra else dsn,
        autocommit=True,
        application_name=application_name,
        # libpq takes whole seconds and treats anything below 2 as 2.
        connect_timeout=max(2, math.ceil(timeout_seconds)),
        prepare_threshold=None,  # psycopg never prepares a statement on its own
    )


def timeout_ms(timeout_seconds: float) -> int:
    """A statement_timeout / lock_timeout in milliseconds: at least 1 (0 would mean none)."""
    return max(1, int(timeout_seconds * 1000))


@contextlib.contextmanager
def local_timeouts(conn: psycopg.Connection, timeout_seconds: float) -> Iterator[psycopg.Connection]:
    """A transaction whose statements are bounded by statement_timeout and lock_timeout set LOCAL
    to it: they end with it, and never outlive it on a backend a pooler hands to someone else."""
    with conn.transaction():
        conn.execute(queries.LOCAL_TIMEOUTS, {"ms": str(timeout_ms(timeout_seconds))})
        yield conn


def _address(host: str | None) -> object:
    """An IP address as one value whatever its spelling (::ffff:127.0.0.1 is 127.0.0.1)."""
    if not host:
        return None
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return host
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


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
    return (_address(local[0]), local[1]) == (_address(client_addr), client_port) and \
        (_address(peer[0]), peer[1]) == (_address(server_addr), server_port)


def resolved_addresses(dsn: str) -> set[object]:
    """Every address the dsn's hosts resolve to now (a Unix socket directory is itself). Blocks
    on DNS: call it under a deadline."""
    found: set[object] = set()
    for host, port in dsn_endpoints(dsn):
        found |= resolve_host(host, port)
    return found


def resolve_host(host: str, port: int = LIBPQ_DEFAULT_PORT) -> set[object]:
    """The addresses a host name (or address) stands for now; itself when it cannot be resolved."""
    if host.startswith("/"):
        return {host}
    try:
        return {_address(str(info[4][0])) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    except OSError:
        return {_address(host)}


def result_rows(cur: psycopg.Cursor[Any], columns: tuple[str, ...]) -> list[Any]:
    """The rows of the one result, among those of a multi-statement string, whose columns are
    these: found by name, not by counting the statements before it."""
    while True:
        if cur.description is not None and tuple(column.name for column in cur.description) == columns:
            return cur.fetchall()
        if not cur.nextset():
            raise psycopg.ProgrammingError(f"no result with the columns {', '.join(columns)}")



def dsn_port(dsn: str) -> int | None:
    """The port the dsn names (or $PGPORT), None when neither says or it is not one number."""
    try:
        port = _parse(dsn).get("port") or os.environ.get("PGPORT") or ""
    except DsnError:
        return None
    return int(port) if str(port).isdigit() else None


def dsn_endpoints(dsn: str) -> list[tuple[str, int]]:
    """Each (host, port) the dsn lists, as libpq reads them: host (or hostaddr) and port may be
    comma-separated lists, with one port for every host or one per host; $PGHOST and $PGPORT
    where the dsn says nothing. A host starting with / is a Unix socket directory."""
    try:
        params = _parse(dsn)
    except DsnError:
        return []
    hosts = str(params.get("host") or params.get("hostaddr") or os.environ.get("PGHOST") or "localhost").split(",")
    ports = [p.strip() for p in str(params.get("port") or os.environ.get("PGPORT") or "").split(",")]
    if len(ports) == 1:
        ports = ports * len(hosts)
    return [(host.strip() or "localhost", int(port) if port.isdigit() else LIBPQ_DEFAULT_PORT)
            for host, port in zip(hosts, ports, strict=False)]


def describe_hosts(dsn: str | None) -> str:
    """'pgbouncer:6432' or 'a:6432,b:6432': a dsn's endpoints for a log line or a label."""
    return ",".join(f"{host}:{port}" for host, port in dsn_endpoints(dsn or "")) or "(no host)"


def database_name(dsn: str) -> str:
    """The database the dsn connects to, by libpq's rule: dbname, $PGDATABASE, the user name."""
    try:
        params = _parse(dsn)
    except DsnError:
        params = {}
    return (
        params.get("dbname") or os.environ.get("PGDATABASE") or params.get("user")
        or os.environ.get("PGUSER") or _login_name()
    )


def _login_name() -> str:
    """libpq's last resort: the operating-system user, which a container's numeric user may lack."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""


def error_line(error: BaseException, dsn: str) -> str:
    """A database error as one log line, without the dsn's password, with what to do about it."""
    text = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
    return redact(text or type(error).__name__, dsn) + hint(error)


def hint(error: BaseException) -> str:
    """What to do about the errors a missing grant or a full server gives."""
    text = str(error)
    if "CONNECT privilege" in text:
        return " (the role needs GRANT CONNECT ON DATABASE to connect)"
    if "too many clients" in text or "remaining connection slots" in text:
        return " (max_connections is reached: the exporter retries until a slot frees)"
    return ""


def reconnect_delay(failures: int, cap: float) -> float:
    """Jittered exponential delay after the n-th consecutive failure: 250 ms doubling, capped."""
    return min(cap, BACKOFF_FIRST * 2 ** min(failures - 1, 30)) * random.uniform(0.5, 1.0)
