"""The image, built and run for real without a Docker engine: Debian's buildah builds the real
Dockerfile on a stand-in base (Debian bookworm made with mmdebstrap: the official python image
cannot be pulled here), and the entry point runs as the image's user on a read-only root, as the
chart runs it. What this proves and what it does not: docs/deployment.md, "Deploy"."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import needs_own_clusters
from tests.metrics_util import parse, up
from tests.pgcluster import free_port
from tools.fetch import CACHE as TOOLS_CACHE

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
CACHE = TOOLS_CACHE / "image"
# buildah's images and containers, in the project's cache instead of /var/lib/containers.
STORAGE = ["--storage-driver", "vfs", "--root", str(TOOLS_CACHE / "buildah" / "storage"),
           "--runroot", str(TOOLS_CACHE / "buildah" / "run")]
BASE = "localhost/pgale-stand-in-base:bookworm"
IMAGE = "localhost/pg-advisory-lock-exporter:test"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
# The stand-in base: what python:*-slim gives a build (python3, pip, venv, CA certificates), and
# this machine's CA bundle, since package downloads go through its TLS proxy.
BASE_CONTAINERFILE = f"""FROM scratch
ADD rootfs.tar /
COPY ca-certificates.crt {CA_BUNDLE}
ENV PIP_CERT={CA_BUNDLE} PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1
"""


def buildah(*args: str, check: bool = True, timeout: float = 600) -> str:
    result = subprocess.run(["buildah", *STORAGE, *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"buildah {' '.join(args)} failed: {result.stderr[-3000:]}")
    return result.stdout.strip()


def stand_in_base() -> None:
    """Build the stand-in base once; it stays cached (rootfs.tar and the image) between runs."""
    if buildah("images", "-q", BASE, check=False):
        return
    CACHE.mkdir(parents=True, exist_ok=True)
    rootfs = CACHE / "rootfs.tar"
    if not rootfs.exists():
        partial = CACHE / "rootfs.tar.partial"
        subprocess.run(["mmdebstrap", "--variant=minbase", "--include=python3,python3-pip,python3-venv,ca-certificates",
                        "--quiet", "bookworm", str(partial)], check=True, capture_output=True, timeout=900)
        partial.rename(rootfs)
    shutil.copy(CA_BUNDLE, CACHE / "ca-certificates.crt")
    (CACHE / "Containerfile").write_text(BASE_CONTAINERFILE)
    buildah("bud", "--isolation", "chroot", "-q", "-t", BASE, "-f", str(CACHE / "Containerfile"), str(CACHE))


# buildah 1.28 run as root keeps its blob-info cache here when it commits, whatever --root says
# (containers/image's default for root): removed at the end when this run made it.
BLOB_INFO_CACHE = Path("/var/lib/containers")


@pytest.fixture(scope="module")
def image():
    needs_own_clusters()
    for tool in ("buildah", "mmdebstrap"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not found: `make tools` unpacks Debian's {tool} into the project's cache")
    ours = not BLOB_INFO_CACHE.exists()
    try:
        stand_in_base()
        buildah("bud", "--isolation", "chroot", "-q", "--build-arg", f"PYTHON_IMAGE={BASE}", "-t", IMAGE, str(ROOT))
        container = buildah("from", "-q", IMAGE)
        mount = Path(buildah("mount", container))
        yield container, mount
        buildah("umount", container, check=False)
        buildah("rm", container, check=False)
        # Only the stand-in base stays cached: the project's image (266 MB in vfs) goes with each run.
        buildah("rmi", "-f", IMAGE, check=False)
        buildah("rmi", "--prune", check=False)
    finally:
        if ours:
            shutil.rmtree(BLOB_INFO_CACHE, ignore_errors=True)


def image_config() -> dict:
    return json.loads(buildah("inspect", "--type", "image", IMAGE))["OCIv1"]["config"]


def test_the_image_runs_as_a_numeric_user_that_is_not_root(image) -> None:
    config = image_config()
    assert config["User"] == "65532:65532" and config["Entrypoint"] == ["pg-advisory-lock-exporter"]
    assert "10105/tcp" in config["ExposedPorts"]
    container, _ = image
    assert buildah("run", "--isolation", "chroot", "--user", config["User"], container, "--", "id", "-u") == "65532"


def test_version_and_the_baked_in_config_check(image) -> None:
    container, _ = image
    user = image_config()["User"]
    from exporter import __version__

    version = buildah("run", "--isolation", "chroot", "--user", user, container, "--", "pg-advisory-lock-exporter", "--version")
    assert version == f"pg-advisory-lock-exporter {__version__}"
    check = buildah("run", "--isolation", "chroot", "--user", user, container, "--", "pg-advisory-lock-exporter", "--check-config")
    assert check.startswith("/etc/pg-advisory-lock-exporter/config.yaml: ok: 4 locks")


def test_no_compiler_no_tests_and_its_size(image) -> None:
    _, mount = image
    for folder in ("usr/bin", "usr/local/bin"):
        assert not {"gcc", "cc", "g++", "c++", "clang"} & set(os.listdir(mount / folder))
    site = next((mount / "usr/local/lib").glob("python3*/dist-packages"))
    assert (site / "exporter" / "cli.py").exists()
    assert not (site / "tests").exists() and not list(site.glob("exporter/test*"))
    assert not (mount / "wheels").exists() and not (mount / "src").exists()
    size = buildah("images", "--format", "{{.Size}}", IMAGE)
    print(f"image size: {size}")  # reported in docs/deployment.md


def test_it_serves_metrics_from_a_real_cluster_on_a_read_only_root(image, server, tmp_path) -> None:
    """As the chart runs it: numeric user, read-only root, the config mounted read-only."""
    container, mount = image
    root = tmp_path / "root"
    config_dir = tmp_path / "config"
    root.mkdir()
    config_dir.mkdir()
    (config_dir / "config.yaml").write_text(yaml.safe_dump({
        "dsn": server.dsn(), "poll_interval": "200ms", "locks": [{"name": "leader", "key": 4242}]}))
    os.chmod(config_dir, 0o755)
    port = free_port()
    mounts: list[Path] = []

    def bind(source: Path, target: Path, *extra: str) -> None:
        subprocess.run(["mount", "--bind", str(source), str(target)], check=True)
        mounts.append(target)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True)

    proc = None
    try:
        bind(mount, root)
        subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)
        mounts.append(root / "proc")
        bind(config_dir, root / "etc/pg-advisory-lock-exporter")
        env = [f"{k}" for k in image_config().get("Env", [])]
        proc = subprocess.Popen(
            ["chroot", "--userspec=65532:65532", str(root), "/usr/bin/env", "-i", *env,
             "pg-advisory-lock-exporter", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        with psycopg_connect(server.dsn()) as holder:
            holder.execute("SELECT pg_advisory_lock(4242)")
            deadline = time.monotonic() + 60
            text = ""
            while time.monotonic() < deadline:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                        text = response.read().decode()
                    if up(text) == 1:
                        break
                except OSError:
                    pass
                assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
                time.sleep(0.2)
            samples = parse(text)
            assert samples[("pg_advisory_lock_holders", (("database", "postgres"), ("lock", "leader"), ("mode", "exclusive")))] == 1
            assert ("process_resident_memory_bytes", ()) in samples
        # The chart's liveness and readiness paths answer.
        for path in ("/-/healthy", "/-/ready"):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
                assert response.status == 200
        # Writing is impossible on this root, and the exporter never needed to.
        touch = subprocess.run(["chroot", "--userspec=65532:65532", str(root), "/usr/bin/touch", "/tmp/x"],
                               capture_output=True, text=True)
        assert touch.returncode != 0 and "Read-only file system" in touch.stderr
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        for target in reversed(mounts):
            subprocess.run(["umount", str(target)], check=False)
    log = proc.stdout.read().decode() if proc and proc.stdout else ""
    assert "Traceback" not in log and "stopped" in log, log


def psycopg_connect(dsn: str):
    import psycopg

    return psycopg.connect(dsn, autocommit=True, application_name="image-holder")
