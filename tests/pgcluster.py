"""Throwaway PostgreSQL clusters for the tests, the demo and the benchmark.

initdb + pg_ctl on a free port of 127.0.0.1, in a temporary folder; as root, every server
command runs as the postgres system user (runuser), since PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

SERVER_USER = "postgres"


class ClusterError(Exception):
    """A throwaway cluster could not be created or started."""


def find_bindir(explicit: str | None = None) -> str:
    """The folder with initdb and pg_ctl: explicit, $PG_BINDIR, pg_config --bindir, Debian's paths."""
    looked: list[str] = []
    candidates: list[str] = []
    if explicit:
        candidates.append(explicit)
    if os.environ.get("PG_BINDIR"):
        candidates.append(os.environ["PG_BINDIR"])
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            candidates.append(subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True).stdout.strip())
        except (OSError, subprocess.CalledProcessError):
            looked.append("pg_config --bindir (failed)")
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    candidates += [os.path.dirname(p) for p in (shutil.which("pg_ctl"), shutil.which("initdb")) if p]
    for path in candidates:
        if os.path.exists(os.path.join(path, "pg_ctl")) and os.path.exists(os.path.join(path, "initdb")):
            return path
        looked.append(path)
    raise ClusterError(
        "no PostgreSQL server binaries (initdb, pg_ctl) found; looked in: "
        + (", ".join(looked) or "nothing: set PG_BINDIR, or put pg_config on PATH")
        + ". On Debian/Ubuntu: apt-get install postgresql"
    )


# A Unix socket's path holds at most 107 bytes (sun_path): a deep checkout's cache is too long for
# the sockets of clusters and PgBouncers in it, which then go to /tmp (removed with them).
SOCKET_PATH_MAX = 100


def short_tempdir(prefix: str) -> str:
    """A temporary folder (in TMPDIR, the project's cache under make test) short enough for a
    Unix socket in it, '.s.PGSQL.65535'; in /tmp when the cache's path is too deep."""
    root = tempfile.mkdtemp(prefix=prefix)
    if len(os.path.join(root, ".s.PGSQL.65535")) > SOCKET_PATH_MAX:
        os.rmdir(root)
        root = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    return root


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def terminate(proc: "subprocess.Popen[bytes]", grace: float = 10.0) -> None:
    """SIGTERM a child process, and SIGKILL it if it has not gone within grace seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _as_server_user() -> list[str]:
    return ["runuser", "-u", SERVER_USER, "--"] if os.geteuid() == 0 else []


@dataclass
class Cluster:
    """One throwaway cluster: create with start(), remove with destroy()."""

    bindir: str = field(default_factory=find_bindir)
    settings: dict[str, str] = field(default_factory=dict)
    lib_dir: str | None = None  # LD_LIBRARY_PATH for relocated (embedded) builds
    port: int = 0
    root: str = ""
    _running: bool = False

    @property
    def datadir(self) -> str:
        return os.path.join(self.root, "data")

    @property
    def logfile(self) -> str:
        return os.path.join(self.root, "server.log")

    def dsn(self, dbname: str = "postgres", user: str = "postgres", **extra: str) -> str:
        params = {"host": "127.0.0.1", "port": str(self.port), "dbname": dbname, "user": user, **extra}
        return " ".join(f"{k}={v}" for k, v in params.items())

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        if self.lib_dir:
            env["LD_LIBRARY_PATH"] = self.lib_dir
        return env

    def _run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        cmd = [*_as_server_user(), os.path.join(self.bindir, args[0]), *args[1:]]
        result = subprocess.run(cmd, capture_output=True, text=True, env=self._env(), timeout=timeout)
        if check and result.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}")
        return result

    def _options(self) -> str:
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": self.root,
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "100",
            **self.settings,
        }
        return " ".join(f"-c {k}={v}" for k, v in settings.items())

    def init(self) -> "Cluster":
        """initdb a new cluster in a temporary folder and pick its port, without starting it."""
        self.root = short_tempdir("pgale-")
        os.chmod(self.root, 0o755)
        if os.geteuid() == 0:
            entry = pwd.getpwnam(SERVER_USER)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        atexit.register(self.destroy)
        self._run("initdb", "-D", self.datadir, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync", "--locale=C")
        self.port = free_port()
        return self

    def start(self) -> "Cluster":
        """initdb a new cluster in a temporary folder and start it."""
        self.init()
        for attempt in range(5):
            self.port = free_port()
            try:
                self.pg_ctl_start()
                return self
            except ClusterError:
                if attempt == 4:
                    raise
        return self

    def pg_ctl_start(self) -> None:
        self._run("pg_ctl", "-D", self.datadir, "-l", self.logfile, "-o", self._options(), "-w", "-t", "60", "start")
        self._running = True

    def stop(self, mode: str = "fast") -> None:
        if self._running:
            self._run("pg_ctl", "-D", self.datadir, "-m", mode, "-w", "-t", "60", "stop", check=False)
            self._running = False

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.pg_ctl_start()

    def postmaster_pid(self) -> int:
        with open(os.path.join(self.datadir, "postmaster.pid")) as handle:
            return int(handle.readline())

    def server_pids(self) -> list[int]:
        """The postmaster and its children."""
        try:
            pid = self.postmaster_pid()
        except (OSError, ValueError):
            return []
        children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
        return [pid, *map(int, children)]

    def signal_all(self, signum: signal.Signals) -> None:
        """Send a signal to the postmaster and every backend (SIGSTOP to make the server hang)."""
        for target in self.server_pids():
            try:
                os.kill(target, signum)
            except ProcessLookupError:
                pass

    def log_text(self) -> str:
        try:
            with open(self.logfile, errors="replace") as handle:
                return handle.read()
        except OSError:
            return ""

    def destroy(self) -> None:
        """Stop the server (immediately) and remove every file of the cluster."""
        if not self.root:
            return
        pids = self.server_pids() if self._running else []
        self.signal_all(signal.SIGCONT)
        self.stop("immediate")
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = ""
