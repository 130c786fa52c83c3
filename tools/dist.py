"""`make dist`: what a release is made of, in dist/: the wheel and the sdist (python -m build,
checked with twine check), and the image as an OCI archive, pg-advisory-lock-exporter-VERSION.oci.tar.

The image is built from the Dockerfile by buildah, without a Docker engine: `--isolation chroot`,
vfs storage in the project's cache (tools/fetch.py's CACHE), so nothing lands outside the checkout
and that folder; the image is pushed into the archive and removed from the store again. Push the
archive to a registry of your own (README: Build the image), e.g.
`skopeo copy oci-archive:dist/pg-advisory-lock-exporter-0.2.0.oci.tar docker://registry.example.com/team/pg-advisory-lock-exporter:0.2.0`.

The version is exporter.__version__, the one place it is written (pyproject.toml reads it, the
chart's appVersion and so its default image tag must agree: tests/test_release.py).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from exporter import __version__
from tools.fetch import BIN, CACHE

ROOT = Path(__file__).resolve().parent.parent
NAME = "pg-advisory-lock-exporter"
# buildah's images and containers, in the project's cache instead of /var/lib/containers.
STORAGE = ["--storage-driver", "vfs", "--root", str(CACHE / "buildah" / "storage"),
           "--runroot", str(CACHE / "buildah" / "run")]
# buildah 1.28 run as root keeps its blob-info cache here when it commits or pushes, whatever
# --root says (containers/image's default for root): removed again when this run made it.
BLOB_INFO_CACHE = Path("/var/lib/containers")


class DistError(Exception):
    """A step of make dist failed; the message says which and why, in one line or its tool's tail."""


def archive_name(version: str = __version__) -> str:
    return f"{NAME}-{version}.oci.tar"


def buildah_command() -> str:
    """The machine's buildah, else the one `make tools` unpacked into the cache (its wrapper sets
    the libraries and the signature policy's HOME)."""
    found = shutil.which("buildah") or shutil.which("buildah", path=str(BIN))
    if found is None:
        raise DistError("buildah not found: install it (Debian: apt-get install buildah) "
                        "or run `make tools`, which unpacks Debian's buildah into the project's cache")
    return found


def buildah(*args: str, check: bool = True, timeout: float = 900) -> str:
    """buildah with the project's storage; its stdout, stripped."""
    result = subprocess.run([buildah_command(), *STORAGE, *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise DistError(f"buildah {' '.join(args)} failed: {result.stderr[-3000:]}")
    return result.stdout.strip()


@contextmanager
def blob_info_cache_left_clean() -> Iterator[None]:
    """Whatever buildah writes to /var/lib/containers during the block is removed after it, when
    the folder was not there before (then it is the machine's, and stays)."""
    ours = not BLOB_INFO_CACHE.exists()
    try:
        yield
    finally:
        if ours:
            shutil.rmtree(BLOB_INFO_CACHE, ignore_errors=True)


def _run(step: str, cmd: list[str], timeout: float) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise DistError(f"{step} failed ({' '.join(cmd)}):\n{(result.stdout + result.stderr)[-3000:]}")


def python_artefacts(out: Path) -> list[Path]:
    """The sdist, and the wheel built from it (so the sdist is proven complete), checked by twine."""
    for old in [*out.glob(f"{NAME.replace('-', '_')}-{__version__}*"), *out.glob(f"{NAME}-{__version__}.tar.gz")]:
        old.unlink()
    # setuptools leaves its build/ folder in the checkout: gone again unless it was there before.
    leftover = ROOT / "build"
    ours = not leftover.exists()
    try:
        _run("python -m build", [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], 600)
    finally:
        if ours:
            shutil.rmtree(leftover, ignore_errors=True)
    made = sorted([*out.glob(f"*-{__version__}-*.whl"), *out.glob(f"*-{__version__}.tar.gz")])
    if len(made) != 2:
        raise DistError(f"python -m build made {[p.name for p in made]}, not one wheel and one sdist")
    _run("twine check", [sys.executable, "-m", "twine", "check", "--strict", *map(str, made)], 120)
    return made


def image_archive(out: Path, python_image: str | None) -> Path:
    """The Dockerfile built by buildah and pushed into out/NAME-VERSION.oci.tar; the built image
    is removed from the store afterwards (the archive is the artefact)."""
    tag = f"localhost/{NAME}:{__version__}"
    archive = out / archive_name()
    archive.unlink(missing_ok=True)
    base = ["--build-arg", f"PYTHON_IMAGE={python_image}"] if python_image else []
    with blob_info_cache_left_clean():
        try:
            buildah("bud", "--isolation", "chroot", "-q", *base, "-t", tag, str(ROOT))
            buildah("push", "-q", tag, f"oci-archive:{archive}:{NAME}:{__version__}")
        finally:
            buildah("rmi", "-f", tag, check=False)
            buildah("rmi", "--prune", check=False)  # the build stage, left untagged
    return archive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.dist", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="where the artefacts go (default dist/)")
    parser.add_argument("--python-image", default="",
                        help="the base image (the Dockerfile's PYTHON_IMAGE; default: the Dockerfile's own)")
    parser.add_argument("--no-image", action="store_true", help="the wheel and the sdist only")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        if not args.no_image:
            buildah_command()  # said at once, not after the wheel was built
        made = python_artefacts(args.out)
        if not args.no_image:
            made.append(image_archive(args.out, args.python_image or None))
    except (DistError, subprocess.TimeoutExpired) as error:
        print(f"make dist: {error}", file=sys.stderr)
        return 1
    for path in made:
        print(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
