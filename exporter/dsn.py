"""Connection strings: describe them without secrets, and open the exporter's connections."""

from __future__ import annotations

import contextlib
import getpass
import math
import os
import random
import re
from collections.abc import Iterator

import psycopg
from psycopg import conninfo

from . import queries

BACKOFF_FIRST = 0.25

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
    session_timeouts: bool = True,
) -> psycopg.Connection:
    """An autocommit connection with connect_timeout and application_name (and, with
    session_timeouts, statement_timeout and lock_timeout for the whole session); to database
    instead of the dsn's, if given; with the password read from password_file at each connect, if
    given (a rotated Kubernetes secret is picked up). Without session_timeouts the caller bounds
    each transaction itself (local_timeouts), so nothing stays on a pooled backend."""
    extra: dict[str, str] = {}
    if database:
        extra["dbname"] = database
    if password_file:
        try:
            with open(password_file, encoding="utf-8") as handle:
                extra["password"] = handle.read().rstrip("\r\n")
        except OSError as exc:
            raise psycopg.OperationalError(f"password_file: cannot read {password_file!r}: {exc.strerror}") from None
    conn = psycopg.connect(
        conninfo.make_conninfo(dsn, **extra) if extra else dsn,
        autocommit=True,
        application_name=application_name,
        # libpq takes whole seconds and treats anything below 2 as 2.
        connect_timeout=max(2, math.ceil(timeout_seconds)),
        prepare_threshold=None,
    )
    if session_timeouts:
        try:
            conn.execute(queries.SESSION_SETUP, {"ms": str(max(1, int(timeout_seconds * 1000)))})
        except BaseException:
            conn.close()
            raise
    return conn


@contextlib.contextmanager
def local_timeouts(conn: psycopg.Connection, timeout_seconds: float) -> Iterator[psycopg.Connection]:
    """A transaction whose statements are bounded by statement_timeout and lock_timeout set LOCAL
    to it: they end with it, and never outlive it on a backend a pooler hands to someone else."""
    with conn.transaction():
        conn.execute(queries.LOCAL_TIMEOUTS, {"ms": str(max(1, int(timeout_seconds * 1000)))})
        yield conn


LIBPQ_DEFAULT_PORT = 5432  # what libpq connects to when neither the dsn nor $PGPORT names a port


def dsn_port(dsn: str) -> int | None:
    """The port the dsn names (or $PGPORT), None when neither says or it is not one number."""
    try:
        port = _parse(dsn).get("port") or os.environ.get("PGPORT") or ""
    except DsnError:
        return None
    return int(port) if str(port).isdigit() else None


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
