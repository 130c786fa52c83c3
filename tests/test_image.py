"""The release's artefacts, made by `make dist`'s steps (tools/dist.py), and the image, built and
run for real without a Docker engine: Debian's buildah builds the real Dockerfile on a stand-in
base (Debian bookworm made with mmdebstrap: the official python image cannot be pulled here) into
the OCI archive, the archive is loaded back, and the entry point runs as the image's user on a
read-only root, as the chart runs it. One build serves every test here. What this proves and what
it does not: docs/deployment.md, "Deploy"."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from exporter import __version__
from tests.conftest import needs_own_clusters
from tests.metrics_util import parse, up
from tests.pgcluster import free_port
from tools.dist import archive_name, blob_info_cache_left_clean, buildah
from tools.fetch import CACHE as TOOLS_CACHE

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
CACHE = TOOLS_CACHE / "image"
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


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """make dist's artefacts (its recipe runs tools.dist: test_make_dist_runs_tools_dist), the
    image on the stand-in base; removed after the module (the archive is 100 MB)."""
    needs_own_clusters()
    for tool in ("buildah", "mmdebstrap"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not found: `make tools` unpacks Debian's {tool} into the project's cache")
    out = tmp_path_factory.mktemp("dist")
    with blob_info_cache_left_clean():
        stand_in_base()
    started = time.monotonic()
    made = subprocess.run([sys.executable, "-m", "tools.dist", "--out", str(out), "--python-image", BASE],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert made.returncode == 0, made.stderr
    print(f"make dist: {time.monotonic() - started:.0f} s")
    yield out
    shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="module")
def image(dist: Path):
    """The image loaded back from make dist's OCI archive (the archive loads), as a container."""
    with blob_info_cache_left_clean():
        loaded = buildah("pull", "-q", f"oci-archive:{dist / archive_name()}")
        buildah("tag", loaded, IMAGE)
        container = buildah("from", "-q", IMAGE)
        mount = Path(buildah("mount", container))
        yield container, mount
        buildah("umount", container, check=False)
        buildah("rm", container, check=False)
        # Only the stand-in base stays cached: the project's image (266 MB in vfs) goes with each run.
        buildah("rmi", "-f", IMAGE, loaded, check=False)
        buildah("rmi", "--prune", check=False)


def test_make_dist_runs_tools_dist() -> None:
    dry = subprocess.run(["make", "--dry-run", "--always-make", "dist", "DIST=out", "PYTHON_IMAGE=base:1", "PY=python"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert "python -m tools.dist --out out --python-image base:1" in dry.stdout.splitlines()


def test_the_wheel_and_the_sdist_pass_twine_check_and_the_wheel_installs_and_runs(dist: Path, tmp_path: Path) -> None:
    wheel = dist / f"pg_advisory_lock_exporter-{__version__}-py3-none-any.whl"
    sdist = dist / f"pg_advisory_lock_exporter-{__version__}.tar.gz"
    check = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and check.stdout.count("PASSED") == 2, check.stdout + check.stderr
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[-1] for name in archive.getnames()}
    assert {"pyproject.toml", "README.md", "CHANGELOG.md", "exporter/__init__.py", "exporter/cli.py"} <= names
    # A fresh venv, nothing of the checkout on its path: the wheel alone, with its dependencies.
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True, timeout=120)
    env = {**os.environ, "PIP_CACHE_DIR": str(TOOLS_CACHE / "pip"), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    install = subprocess.run([str(tmp_path / "venv/bin/pip"), "install", "-q", str(wheel)],
                             capture_output=True, text=True, env=env, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    version = subprocess.run([str(tmp_path / "venv/bin/python"), "-m", "exporter", "--version"],
                             capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert version.stdout.strip() == f"pg-advisory-lock-exporter {__version__}", version.stderr
    script = subprocess.run([str(tmp_path / "venv/bin/pg-advisory-lock-exporter"), "--version"],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert script.stdout.strip() == f"pg-advisory-lock-exporter {__version__}", script.stderr


def test_the_oci_archive_holds_one_image_whose_blobs_are_all_there(dist: Path) -> None:
    """Read as a registry or `skopeo copy` would: index -> manifest -> config and layers, each
    blob present with the digest and size its parent names."""
    with tarfile.open(dist / archive_name()) as archive:
        def blob(descriptor: dict) -> bytes:
            algorithm, digest = descriptor["digest"].split(":")
            data = archive.extractfile(f"blobs/{algorithm}/{digest}").read()
            assert hashlib.new(algorithm, data).hexdigest() == digest and len(data) == descriptor["size"], descriptor
            return data

        assert json.loads(archive.extractfile("oci-layout").read())["imageLayoutVersion"] == "1.0.0"
        index = json.loads(archive.extractfile("index.json").read())
        (entry,) = index["manifests"]
        assert entry["annotations"]["org.opencontainers.image.ref.name"] == f"pg-advisory-lock-exporter:{__version__}"
        manifest = json.loads(blob(entry))
        config = json.loads(blob(manifest["config"]))["config"]
        assert config["Entrypoint"] == ["pg-advisory-lock-exporter"] and config["User"] == "65532:65532"
        assert manifest["layers"] and all(blob(layer) for layer in manifest["layers"])


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
