"""Connection strings, as text: parse and describe them without secrets, find their hosts and ports,
and turn database errors into one log line. Pure: connection.py opens the connections."""

from __future__ import annotations

import getpass
import ipaddress
import os
import random
from collections.abc import Callable

import psycopg
from psycopg import conninfo

from . import dsnparse


BACKOFF_FIRST = 0.25
LIBPQ_DEFAULT_PORT = 5432  # what libpq connects to when neither the dsn nor $PGPORT names a port

_SHOWN_PARAMS = ("host", "hostaddr", "port", "dbname", "user", "sslmode")


# An index in the dsn -> the index in the text the user wrote (config.py expands ${VAR}s first).
Origin = Callable[[int], int]


class DsnError(Exception):
    """The dsn is not a libpq connection string; the message says where, with none of its text."""


def _parse(dsn: str, origin: Origin | None = None) -> dict[str, str]:
    """libpq's reading of the dsn: libpq is the judge. DsnError, placed, when it refuses."""
    refused = dsnparse.text_problem(dsn)
    if refused is None:
        try:
            return conninfo.conninfo_to_dict(dsn)
        except (psycopg.Error, ValueError):
            # libpq's message quotes a fragment of the string, which may be the password: say where
            # instead (dsnparse), never what.
            refused = dsnparse.explain(dsn)
    raise DsnError(refused.say(origin)) from None


def check_dsn(dsn: str, origin: Origin | None = None) -> None:
    """DsnError, located, when libpq refuses the dsn or a value it would refuse at every connect;
    origin maps its positions to the text the user wrote. Nothing else escapes, whatever the text."""
    refused = dsnparse.port_problem(dsn, _parse(dsn, origin).get("port"))
    if refused:
        raise DsnError(refused.say(origin))


def redact(text: str, dsn: str) -> str:
    """text with the dsn's password, if any, blanked out."""
    try:
        password = _parse(dsn).get("password")
    except DsnError:
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


# The server keeps statement_timeout and lock_timeout in an int of milliseconds (about 24.8 days):
# config.py refuses every duration that would become a larger one.
MAX_TIMEOUT_MS = 2_147_483_647


def timeout_ms(timeout_seconds: float) -> int:
    """A statement_timeout / lock_timeout in milliseconds: at least 1 (0 would mean none); at most
    MAX_TIMEOUT_MS for every duration the config takes (config.py's limits)."""
    return max(1, int(timeout_seconds * 1000))


def normal_address(host: str | None) -> object:
    """An IP address as one value whatever its spelling (::ffff:127.0.0.1 is 127.0.0.1)."""
    if not host:
        return None
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return host
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


def dsn_port(dsn: str) -> int | None:
    """The port the dsn names (or $PGPORT), None when neither says or it is not one number."""
    try:
        port = _parse(dsn).get("port") or os.environ.get("PGPORT") or ""
    except DsnError:
        return None
    return int(port) if str(port).isascii() and str(port).isdigit() else None


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
    return [(host.strip() or "localhost", int(port) if port.isascii() and port.isdigit() else LIBPQ_DEFAULT_PORT)
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
    if _server_full(str(error)):
        # The server words it two ways (whether superuser slots are left): one failure, one line.
        return f"connection to {describe_hosts(dsn)} refused: the server is full" + hint(error)
    text = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
    return redact(text or type(error).__name__, dsn) + hint(error)


def _server_full(text: str) -> bool:
    return "too many clients" in text or "remaining connection slots" in text


def hint(error: BaseException) -> str:
    """What to do about the errors a missing grant or a full server gives."""
    text = str(error)
    if "CONNECT privilege" in text:
        return " (the role needs GRANT CONNECT ON DATABASE to connect)"
    if _server_full(text):
        return " (max_connections is reached: the exporter retries until a slot frees)"
    return ""


def reconnect_delay(failures: int, cap: float) -> float:
    """Jittered exponential delay after the n-th consecutive failure: 250 ms doubling, capped."""
    return min(cap, BACKOFF_FIRST * 2 ** min(failures - 1, 30)) * random.uniform(0.5, 1.0)
