"""A throwaway PgBouncer in front of a test cluster, on a free loopback port.

Debian's pgbouncer (`make tools` unpacks it into the project's cache (tools/fetch.py) when the machine lacks it), run as
the postgres system user when root (like the clusters). Trust auth to the server; the console
user 'console' is a stats_users member with a password (md5), so the tests can also give it a
wrong one.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import psycopg

from tests.pgcluster import SERVER_USER, free_port, short_tempdir, terminate
from tools.fetch import BIN as TOOLS_BIN

CONSOLE_USER = "console"
CONSOLE_PASSWORD = "console-secret"
POOL_USERS = ("postgres", "app", "pool_user", "exporter")


class PgBouncerError(Exception):
    """PgBouncer could not be found or started."""


def binary() -> str:
    """PATH's pgbouncer, else the one `make tools` unpacked (the demo runs without the tests' PATH)."""
    cached = TOOLS_BIN / "pgbouncer"
    path = (shutil.which("pgbouncer") or (str(cached) if cached.exists() else None)
            or ("/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None))
    if path is None:
        raise PgBouncerError("pgbouncer not found: `make tools` unpacks Debian's pgbouncer into the project's cache (tools/fetch.py)")
    return path


@dataclass
class PgBouncer:
    """One PgBouncer: start() it, stop() it."""

    server_port: int
    pool_mode: str = "transaction"
    pool_size: int = 2
    force_user: str | None = None  # the server user of every pool, whoever the client is
    listen_addr: str = "127.0.0.1"
    server_host: str = "127.0.0.1"  # or the server's Unix socket directory
    extra: dict[str, str] = field(default_factory=dict)
    port: int = 0
    root: str = ""
    proc: subprocess.Popen[bytes] | None = None

    def dsn(self, dbname: str = "postgres", user: str = "postgres", **extra: str) -> str:
        params = {"host": self.listen_addr, "port": str(self.port), "dbname": dbname, "user": user, **extra}
        return " ".join(f"{k}={v}" for k, v in params.items())

    def console_dsn(self, password: str = CONSOLE_PASSWORD) -> str:
        return self.dsn("pgbouncer", CONSOLE_USER, password=password)

    def start(self) -> "PgBouncer":
        self.root = short_tempdir("pgale-bouncer-")
        self.port = self.port or free_port()
        users = os.path.join(self.root, "userlist.txt")
        with open(users, "w") as handle:
            # trust still needs the user listed; the server itself trusts loopback.
            handle.write(f'"{CONSOLE_USER}" "{CONSOLE_PASSWORD}"\n' + "".join(f'"{u}" ""\n' for u in POOL_USERS))
        hba = os.path.join(self.root, "hba.conf")
        with open(hba, "w") as handle:
            handle.write(f"host pgbouncer {CONSOLE_USER} 127.0.0.1/32 md5\nhost all all 127.0.0.1/32 trust\n")
        settings = {
            "listen_addr": self.listen_addr,
            "listen_port": str(self.port),
            "unix_socket_dir": self.root,  # its own: two replicas may share a port
            "auth_type": "hba",
            "auth_file": users,
            "auth_hba_file": hba,
            "auth_user": "",
            "stats_users": CONSOLE_USER,
            "pool_mode": self.pool_mode,
            "default_pool_size": str(self.pool_size),
            "max_client_conn": "100",
            "server_lifetime": "3600",
            "ignore_startup_parameters": "extra_float_digits",
            "logfile": os.path.join(self.root, "pgbouncer.log"),
            "pidfile": os.path.join(self.root, "pgbouncer.pid"),
            **self.extra,
        }
        target = f"host={self.server_host} port={self.server_port}" + (f" user={self.force_user}" if self.force_user else "")
        lines = ["[databases]", f"* = {target}", "[pgbouncer]"]
        lines += [f"{k} = {v}" for k, v in settings.items() if v != ""]
        ini = os.path.join(self.root, "pgbouncer.ini")
        with open(ini, "w") as handle:
            handle.write("\n".join(lines) + "\n")
        cmd = [binary(), ini]
        if os.geteuid() == 0:
            entry = pwd.getpwnam(SERVER_USER)
            for path in (self.root, ini, users, hba):
                os.chown(path, entry.pw_uid, entry.pw_gid)
            cmd = ["runuser", "-u", SERVER_USER, "--", *cmd]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while True:
            try:
                with psycopg.connect(self.console_dsn(), autocommit=True, connect_timeout=2):
                    return self
            except psycopg.OperationalError as exc:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = self.log()
                    self.stop()
                    raise PgBouncerError(f"pgbouncer did not start: {exc}; log: {log[-2000:]}") from None
                time.sleep(0.05)

    def log(self) -> str:
        try:
            with open(os.path.join(self.root, "pgbouncer.log"), errors="replace") as handle:
                return handle.read()
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)
        if self.root:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = ""
