"""The PostgreSQL 15 that `make tools` (tools/fetch.py) unpacked into the project's cache with
pg_partman and pg_repack in its own share and lib folders: the preset tests run a cluster of it,
so that the machine's PostgreSQL never needs the extensions installed (which would upgrade it)."""

from __future__ import annotations

import os

from tools.fetch import PG_BINDIR, lib_path

# A machine that has the extensions installed for its own PostgreSQL 15 may use that instead.
SYSTEM_BINDIR = "/usr/lib/postgresql/15/bin"
SYSTEM_PARTMAN = "/usr/share/postgresql/15/extension/pg_partman.control"


class NoServerWithExtensions(Exception):
    """Neither the cache nor the machine has a PostgreSQL 15 with pg_partman and pg_repack."""


def server_with_extensions() -> tuple[str, str | None]:
    """(bindir, LD_LIBRARY_PATH or None) of a PostgreSQL 15 with pg_partman and pg_repack."""
    if (PG_BINDIR / "postgres").exists() and (PG_BINDIR / "pg_repack").exists():
        return str(PG_BINDIR), lib_path()
    if os.path.exists(SYSTEM_PARTMAN) and os.path.exists(os.path.join(SYSTEM_BINDIR, "pg_repack")):
        return SYSTEM_BINDIR, None
    raise NoServerWithExtensions(f"no PostgreSQL 15 with pg_partman and pg_repack: `make tools` unpacks one into {PG_BINDIR}")
