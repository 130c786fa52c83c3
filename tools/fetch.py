"""`make tools`: the Debian tools the tests need, fetched into the project's cache without
changing anything the machine has installed.

For every tool the machine lacks, `apt-get -s install` (a simulation: it changes nothing) names
the packages the tool needs that are not installed in a version that would do; those are
downloaded with `apt-get download` into CACHE/tools/debs and unpacked with `dpkg -x` into
CACHE/tools/root (CACHE: default_cache), and CACHE/tools/bin gets a wrapper per command that runs the unpacked binary
with the unpacked libraries (LD_LIBRARY_PATH). Installing the same packages could upgrade
postgresql-15, postgresql-client-15 and libpq5 and restart the machine's clusters; unpacking
them into the cache cannot. PostgreSQL 15 itself is unpacked with pg_partman and pg_repack, so
the extensions sit in that server's own share and lib folders and the preset tests run a
cluster of it (tests/cachedtools.py).

Every tool is unpacked first. Only a tool whose unpacked copy does not run (the check in
TOOLS), and which may be installed (INSTALLABLE), is installed instead, and only when the
simulation shows that no installed package would be upgraded, downgraded or removed: what it
installs is printed first. Otherwise the script stops with the command to run and why.

Before anything else it writes dpkg's list of installed packages to CACHE/dpkg-before.txt;
tests/test_machine.py checks that every one of them is still installed in the same version.
Stdlib only: it runs before the venv exists.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def default_cache() -> Path:
    """The project's cache, one folder every checkout shares, so a clean clone finds it warm:
    PGALE_CACHE; as root /var/cache/pg-advisory-lock-exporter (the clusters run as the postgres
    user, who must reach their folders in it: root's home is closed to it); otherwise
    $XDG_CACHE_HOME/pg-advisory-lock-exporter (~/.cache/...). Nothing the suite fetches or
    leaves lands outside the checkout and this one folder."""
    if os.environ.get("PGALE_CACHE"):
        return Path(os.environ["PGALE_CACHE"])
    if os.geteuid() == 0:
        return Path("/var/cache/pg-advisory-lock-exporter")
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pg-advisory-lock-exporter"


CACHE = default_cache().resolve()
TOOLS_DIR = CACHE / "tools"
DEBS = TOOLS_DIR / "debs"
UNPACKED = TOOLS_DIR / "root"
BIN = TOOLS_DIR / "bin"
STAMPS = TOOLS_DIR / "stamps"
DPKG_BEFORE = CACHE / "dpkg-before.txt"
SERVER_USER = "postgres"
# Unpacked libraries live in the multiarch folders (and a few in subfolders of them, like
# pulseaudio's), both under /usr and /lib.
LIB_DIRS = ("usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu")
# Tools whose unpacked copy may turn out not to run (setuid helpers, system configuration, a
# browser's dozens of libraries and data files): only these may be installed, and only when the
# simulation shows nothing installed would change.
INSTALLABLE = {"chromium", "buildah", "mmdebstrap"}
DPKG_QUERY = ["dpkg-query", "-W", "-f", "${Package}:${Architecture} ${Version} ${db:Status-Abbrev}\n"]


class FetchError(Exception):
    """A tool could not be fetched or used from the cache; the message says what to run."""


# ---------------------------------------------------------------- the simulation, parsed

@dataclass(frozen=True)
class Action:
    """One line of `apt-get -s`: kind is install (new), upgrade, downgrade or remove."""

    kind: str
    package: str
    installed: str | None  # the version the machine has, for upgrade, downgrade and remove
    version: str | None  # the version apt would install, for install, upgrade and downgrade

    @property
    def changes_installed(self) -> bool:
        return self.kind != "install"


# Inst pkg [old] (new Release [arch]) [...]   or   Inst pkg (new Release [arch])
_INST = re.compile(r"^Inst (?P<pkg>\S+)(?: \[(?P<old>[^\]]+)\])? \((?P<new>\S+)")
# Remv pkg [old] [...]
_REMV = re.compile(r"^Remv (?P<pkg>\S+)(?: \[(?P<old>[^\]]+)\])?")


def parse_simulation(text: str, newer: Callable[[str, str], bool] | None = None) -> list[Action]:
    """The Inst and Remv lines of `apt-get -s install` output. An Inst of a package that is
    already installed (its installed version in brackets) is an upgrade, or a downgrade when
    newer(installed, new) says the installed one is newer (dpkg --compare-versions by default)."""
    newer = newer or _dpkg_newer
    actions = []
    for line in text.splitlines():
        if match := _INST.match(line):
            old, new = match["old"], match["new"]
            kind = "install" if old is None else ("downgrade" if newer(old, new) else "upgrade")
            actions.append(Action(kind, match["pkg"], old, new))
        elif match := _REMV.match(line):
            actions.append(Action("remove", match["pkg"], match["old"], None))
    return actions


def _dpkg_newer(a: str, b: str) -> bool:
    return subprocess.run(["dpkg", "--compare-versions", a, "gt", b]).returncode == 0


def refusals(actions: Sequence[Action]) -> list[str]:
    """What an install would do to packages the machine has: empty when it only adds new ones."""
    return [f"{a.kind} {a.package} {a.installed}" + (f" -> {a.version}" if a.version else "")
            for a in actions if a.changes_installed]


# ---------------------------------------------------------------- the tools

@dataclass(frozen=True)
class Tool:
    """A tool the tests run: the Debian packages it comes in, and the commands they provide."""

    name: str
    packages: tuple[str, ...]
    commands: dict[str, str]  # command on PATH -> its file inside the unpacked root
    check: tuple[str, ...]  # a command that must succeed from CACHE/tools/bin (proves it runs)
    env: dict[str, str] = field(default_factory=dict)  # more environment for the wrappers ({root}: the unpacked root)
    skip: tuple[str, ...] = ()  # prefixes of dependencies the tests never use (left out of the download)
    # Binaries (inside the unpacked root) that re-execute themselves with an emptied environment,
    # so LD_LIBRARY_PATH is lost: they get a RUNPATH to the unpacked libraries instead (patchelf).
    runpath: tuple[str, ...] = ()

    def present(self) -> bool:
        """The machine has it already (installed, or on PATH): then nothing is fetched."""
        return all(_on_machine(command) for command in self.commands)


def _on_machine(command: str) -> bool:
    path = shutil.which(command)
    if path and not Path(path).resolve().is_relative_to(CACHE):
        return True
    return os.access(f"/usr/sbin/{command}", os.X_OK)  # pgbouncer: sbin is not on every PATH


ERTS = "erts-13.1.5"  # erlang-base 25.2.3 in bookworm; checked after unpacking
TOOLS = [
    # The JavaScript and fonts of Prometheus's console templates (218 MB unpacked): the tests use
    # its API and promtool, never those pages.
    Tool("prometheus", ("prometheus",), {"promtool": "usr/bin/promtool", "prometheus": "usr/bin/prometheus"},
         ("promtool", "--version"), skip=("libjs-", "fonts-")),
    Tool("pgbouncer", ("pgbouncer",), {"pgbouncer": "usr/sbin/pgbouncer"}, ("pgbouncer", "--version")),
    # erl is a script with /usr/lib/erlang written into it: the wrapper runs erlexec itself with
    # the variables the script would set, pointed at the unpacked tree.
    Tool("erlang", ("erlang-base",), {"erl": f"usr/lib/erlang/{ERTS}/bin/erlexec"},
         ("erl", "-noshell", "-eval", "halt()."),
         {"ROOTDIR": "{root}/usr/lib/erlang", "BINDIR": f"{{root}}/usr/lib/erlang/{ERTS}/bin", "EMU": "beam",
          "PROGNAME": "erl"}),
    # Chromium's own wrapper script (usr/bin/chromium) hard-codes /usr/lib/chromium; its binary
    # finds its resources next to itself. Its profile and caches go to the cache, not the home
    # directory (XDG_*).
    Tool("chromium", ("chromium",), {"chromium": "usr/lib/chromium/chromium"},
         ("chromium", "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", "about:blank"),
         {"XDG_CONFIG_HOME": "{cache}/chromium/config", "XDG_CACHE_HOME": "{cache}/chromium/cache"}),
    # As root, buildah reads the signature policy from $HOME/.config/containers/policy.json
    # before /etc: the wrapper's HOME is in the cache, with the policy the package ships.
    # Its RUN steps re-execute buildah (as buildah-chroot-runtime) with the container's environment:
    # hence the RUNPATH, for libgpgme, the one library it needs that the machine lacks.
    Tool("buildah", ("buildah",), {"buildah": "usr/bin/buildah"}, ("buildah", "--version"),
         {"HOME": "{cache}/buildah/home", "CONTAINERS_REGISTRIES_CONF": "{root}/etc/containers/registries.conf"},
         runpath=("usr/bin/buildah",)),
    Tool("mmdebstrap", ("mmdebstrap",), {"mmdebstrap": "usr/bin/mmdebstrap"}, ("mmdebstrap", "--version")),
]
# PostgreSQL 15 with the extensions the preset tests create: the server package too, so that the
# extensions sit in that server's own share and lib folders (tests/cachedtools.py starts it).
POSTGRES = Tool("postgresql-15", ("postgresql-15", "postgresql-15-partman", "postgresql-15-repack"),
                {}, ("usr/lib/postgresql/15/bin/postgres", "-V"))
PG_BINDIR = UNPACKED / "usr/lib/postgresql/15/bin"
# Sets the RUNPATH of the binaries named in Tool.runpath: unpacked too, used by fetch.py only.
PATCHELF = Tool("patchelf", ("patchelf",), {}, ("usr/bin/patchelf", "--version"))


def _run(cmd: Sequence[str], **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, **kwargs)


def installed_packages() -> list[str]:
    """`package:arch version` of every package dpkg has installed, sorted."""
    out = _run(DPKG_QUERY, check=True).stdout
    return sorted(f"{name} {version}" for name, version, status in
                  (line.split(" ", 2) for line in out.splitlines() if line) if status[1:2] == "i")  # held too


def simulate(packages: Sequence[str]) -> list[Action]:
    result = _run(["apt-get", "-s", "-q", "install", "--no-install-recommends", *packages],
                  env={**os.environ, "LC_ALL": "C"})
    if result.returncode != 0:
        raise FetchError(f"apt-get -s install {' '.join(packages)} failed: {result.stderr.strip()[-800:]}"
                         " (apt's lists may be stale: apt-get update)")
    return parse_simulation(result.stdout)


def lib_path() -> str:
    dirs = []
    for base in LIB_DIRS:
        top = UNPACKED / base
        if top.is_dir():
            dirs.append(top)
            dirs += sorted(d for d in top.iterdir() if d.is_dir() and not d.is_symlink() and any(d.glob("*.so*")))
    return ":".join(map(str, dirs))


def download_and_unpack(tool: Tool) -> list[str]:
    """Every package of the tool (and its dependencies) the machine does not have in a version
    that would do, downloaded and unpacked into the cache. Returns the .deb files."""
    wanted = [a for a in simulate(tool.packages) if a.version and not a.package.startswith(tool.skip)]
    DEBS.mkdir(parents=True, exist_ok=True)
    UNPACKED.mkdir(parents=True, exist_ok=True)
    debs = []
    for action in wanted:
        name = action.package.split(":")[0]
        found = _deb_file(name, action.version)
        if found is None:
            result = _run(["apt-get", "download", "-q", f"{name}={action.version}"], cwd=DEBS)
            found = _deb_file(name, action.version)
            if result.returncode != 0 or found is None:
                raise FetchError(f"apt-get download {name}={action.version} failed: {result.stderr.strip()[-500:]}"
                                 " (apt's lists may be stale: apt-get update)")
        debs.append(found)
    for deb in debs:
        _run(["dpkg-deb", "-x", str(deb), str(UNPACKED)], check=True)
    names = [d.name for d in debs]
    for deb in debs:  # unpacked, they are not needed again (the stamp keeps their names)
        deb.unlink()
    return names


def _deb_file(name: str, version: str) -> Path | None:
    # apt-get download names the file name_version_arch.deb, the version's epoch colon as %3a
    matches = list(DEBS.glob(f"{name}_{version.replace(':', '%3a')}_*.deb"))
    return matches[0] if matches else None


def write_wrappers(tools: Sequence[Tool]) -> None:
    BIN.mkdir(parents=True, exist_ok=True)
    libs = lib_path()
    for tool in tools:
        env = {key: value.format(root=UNPACKED, cache=CACHE) for key, value in tool.env.items()}
        if "HOME" in env:
            Path(env["HOME"]).mkdir(parents=True, exist_ok=True)
        if tool.name == "buildah":
            policy = Path(env["HOME"]) / ".config/containers/policy.json"
            policy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(UNPACKED / "etc/containers/policy.json", policy)
        for command, target in tool.commands.items():
            exports = "".join(f"export {key}='{value}'\n" for key, value in env.items())
            wrapper = BIN / command
            wrapper.write_text(f"#!/bin/sh\n# written by tools/fetch.py: {tool.name}, unpacked into the cache\n"
                               f"export LD_LIBRARY_PATH='{libs}'${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}\n"
                               f"{exports}exec '{UNPACKED / target}' \"$@\"\n")
            wrapper.chmod(0o755)


def runs(tool: Tool) -> tuple[bool, str]:
    """Whether the tool's check succeeds from the cache (its wrapper on PATH first)."""
    cmd = list(tool.check)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    if "/" in cmd[0]:  # a file of the unpacked root, run without a wrapper
        cmd[0] = str(UNPACKED / cmd[0])
        env["LD_LIBRARY_PATH"] = lib_path()
    try:
        result = _run(cmd, env=env, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    return result.returncode == 0, (result.stderr or result.stdout).strip()[-600:]


def install(tool: Tool, why: str) -> None:
    """Install a tool that cannot run unpacked, only when nothing installed would change."""
    command = f"apt-get install --no-install-recommends {' '.join(tool.packages)}"
    changes = refusals(simulate(tool.packages))
    if changes:
        raise FetchError(f"{tool.name} does not run unpacked ({why}) and installing it would change what is "
                         f"installed: {'; '.join(changes)}. Install it yourself if that is acceptable: {command}")
    if os.geteuid() != 0:
        raise FetchError(f"{tool.name} does not run unpacked ({why}); installing it changes nothing installed: "
                         f"as root, run {command}")
    # Exactly the versions the simulation showed, and simulated again as pinned: apt's lists may
    # change in between (a daily update), and an unpinned install would then take what they say.
    pinned = [f"{a.package}={a.version}" for a in simulate(tool.packages)]
    if refusals(simulate(pinned)):
        raise FetchError(f"{tool.name}: apt's package lists changed while it was checked: run make tools again")
    print(f"tools: {tool.name} does not run unpacked ({why}); installing (only new packages, nothing installed "
          f"changes): {' '.join(pinned)}", flush=True)
    result = _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *pinned],
                  env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if result.returncode != 0:
        raise FetchError(f"{command} failed: {result.stderr.strip()[-500:]}")


def reachable_by_server_user(path: Path) -> bool:
    """The postgres system user (as whom the test clusters run when root) can read path."""
    if os.geteuid() != 0:
        return True
    return _run(["runuser", "-u", SERVER_USER, "--", "test", "-r", str(path)]).returncode == 0


def set_runpath(tool: Tool) -> None:
    if not (STAMPS / PATCHELF.name).exists() or not runs(PATCHELF)[0]:
        fetch(PATCHELF)
    for binary in tool.runpath:
        path = UNPACKED / binary
        # Absolute, not $ORIGIN: buildah re-executes a copy of itself that lives in memory.
        _run([str(UNPACKED / "usr/bin/patchelf"), "--set-rpath", lib_path(), str(path)], check=True)


def unpacked_tools() -> list[Tool]:
    """The tools used from the cache (not those that had to be installed)."""
    return [t for t in TOOLS if (STAMPS / t.name).exists() and (STAMPS / t.name).read_text().startswith("unpacked")]


def fetch(tool: Tool) -> str:
    stamp = STAMPS / tool.name
    if stamp.exists() and runs(tool)[0]:
        return "cached"
    debs = download_and_unpack(tool)
    if tool.runpath:
        set_runpath(tool)
    write_wrappers([tool])
    ok, why = runs(tool)
    STAMPS.mkdir(parents=True, exist_ok=True)
    if not ok:
        if tool.name not in INSTALLABLE:
            raise FetchError(f"{tool.name} unpacked into {UNPACKED} does not run: {why}")
        for command in tool.commands:
            (BIN / command).unlink(missing_ok=True)
        install(tool, why.splitlines()[-1] if why else "its check failed")
        stamp.write_text("installed\n")
        return "installed"
    stamp.write_text("unpacked\n" + "\n".join(debs) + "\n")
    return f"unpacked {len(debs)} packages"


def main() -> int:
    started = time.monotonic()
    if not (shutil.which("apt-get") and shutil.which("dpkg-query")):
        missing = [command for tool in TOOLS if not tool.present() for command in tool.commands]
        if missing:
            print(f"tools: missing {', '.join(missing)}: make tools fetches them from Debian's packages "
                  f"(apt-get, dpkg), which this system lacks: install them yourself", file=sys.stderr)
            return 1
        return 0
    CACHE.mkdir(parents=True, exist_ok=True)
    # First of all, what the machine has: the test compares it with what it has after.
    DPKG_BEFORE.write_text("".join(f"{line}\n" for line in installed_packages()))
    wanted = [tool for tool in TOOLS if not tool.present()] + [POSTGRES]
    try:
        for tool in wanted:
            print(f"tools: {tool.name}: {fetch(tool)}", flush=True)
        write_wrappers(unpacked_tools())  # every wrapper names every unpacked library folder
        if not reachable_by_server_user(PG_BINDIR / "postgres"):
            raise FetchError(f"the {SERVER_USER} user, as whom the test clusters run, cannot read {PG_BINDIR}: "
                             f"let it through the folders above the checkout (chmod o+x), or set PGALE_CACHE "
                             f"to a folder it can read")
    except FetchError as exc:
        print(f"tools: {exc}", file=sys.stderr)
        return 1
    print(f"tools: ready in {time.monotonic() - started:.0f}s: {BIN} (du -sh {CACHE})", flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--cache"]:  # the Makefile's CACHE: one rule for where it is
        print(CACHE)
        sys.exit(0)
    sys.exit(main())
