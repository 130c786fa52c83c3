"""npm packages the tests run for real (pg-boss's own plans), fetched once with `npm pack` and
cached in the project's cache, next to the PostgreSQL binaries of tests/pgversions.py (npm's own
cache too: tests/conftest.py sets npm_config_cache there)."""

from __future__ import annotations

import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from tests.pgversions import CACHE as PG_CACHE

CACHE = PG_CACHE.parent / "npm"


def unpacked(package: str, version: str) -> Path:
    """The unpacked package folder of package@version, fetched once."""
    home = CACHE / f"{package}-{version}"
    if not (home / "package" / "package.json").exists():
        if shutil.which("npm") is None:
            raise RuntimeError(f"npm is not installed: it fetches {package}@{version}")
        CACHE.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{package}-", dir=CACHE))
        try:
            subprocess.run(["npm", "pack", "--silent", f"{package}@{version}"], cwd=staging, check=True,
                           capture_output=True, text=True, timeout=600)
            (tarball,) = staging.glob("*.tgz")
            with tarfile.open(tarball) as archive:
                archive.extractall(staging, filter="tar")
            tarball.unlink()
            if home.exists():
                shutil.rmtree(home)
            staging.rename(home)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return home / "package"


def installed(package: str, version: str) -> Path:
    """A folder whose node_modules holds package@version and its dependencies, installed once."""
    home = CACHE / f"installed-{package.replace('/', '+')}-{version}"
    if not (home / "node_modules" / package / "package.json").exists():
        if shutil.which("npm") is None:
            raise RuntimeError(f"npm is not installed: it fetches {package}@{version}")
        CACHE.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="install-", dir=CACHE))
        try:
            (staging / "package.json").write_text('{"private": true}\n')
            subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", f"{package}@{version}"],
                           cwd=staging, check=True, capture_output=True, text=True, timeout=600)
            if home.exists():
                shutil.rmtree(home)
            staging.rename(home)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return home
