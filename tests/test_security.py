"""--web.config.file (TLS, mutual TLS, basic auth) and secrets kept out of every output."""

from __future__ import annotations

import base64
import http.client
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import bcrypt
import pytest
import yaml

from tests.exporter_proc import ExporterProcess
from tests.metrics_util import parse

LOCKS = [{"name": "leader", "key": 4242}]


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA, a server certificate for 127.0.0.1, and a client certificate, made with openssl."""
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=test-ca", cwd=d)
    for name, extra in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}", cwd=d)
        (d / f"{name}.ext").write_text(extra + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    return d


@pytest.fixture
def start(tmp_path, server):
    started: list[ExporterProcess] = []

    def run(web: dict | None, *args: str) -> ExporterProcess:
        extra = list(args)
        if web is not None:
            path = tmp_path / "web.yaml"
            path.write_text(yaml.safe_dump(web))
            extra.append(f"--web.config.file={path}")
        proc = ExporterProcess(tmp_path, {"dsn": server.dsn(), "poll_interval": "200ms", "locks": LOCKS}, *extra)
        started.append(proc)
        return proc

    yield run
    for proc in started:
        proc.stop()


def https_get(port: int, context: ssl.SSLContext, headers: dict[str, str] | None = None, timeout: float = 10) -> tuple[int, str]:
    request = urllib.request.Request(f"https://127.0.0.1:{port}/metrics", headers=headers or {})
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(request, context=context, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except (ConnectionRefusedError, urllib.error.URLError) as exc:
            if isinstance(getattr(exc, "reason", exc), ssl.SSLError) or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def client_context(pki: Path, with_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    if with_cert:
        context.load_cert_chain(str(pki / "client.crt"), str(pki / "client.key"))
    return context


def test_tls(pki, start) -> None:
    proc = start({"tls_server_config": {"cert_file": str(pki / "server.crt"), "key_file": str(pki / "server.key")}})
    status, body = https_get(proc.port, client_context(pki, with_cert=False))
    assert status == 200 and "pg_advisory_lock_exporter_build_info" in body
    with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):  # plain HTTP gets no answer
        urllib.request.urlopen(f"http://127.0.0.1:{proc.port}/metrics", timeout=5).read()
    assert "Traceback" not in proc.log()


def test_mutual_tls(pki, start) -> None:
    proc = start({"tls_server_config": {
        "cert_file": str(pki / "server.crt"), "key_file": str(pki / "server.key"),
        "client_auth_type": "RequireAndVerifyClientCert", "client_ca_file": str(pki / "ca.crt"),
    }})
    status, _ = https_get(proc.port, client_context(pki, with_cert=True))
    assert status == 200
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        https_get(proc.port, client_context(pki, with_cert=False), timeout=1)
    assert "Traceback" not in proc.log()


def test_basic_auth(start) -> None:
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode().replace("$2b$", "$2y$")
    proc = start({"basic_auth_users": {"prometheus": hashed}})
    deadline = time.monotonic() + 10
    while True:
        try:
            status, _ = proc.get("/metrics")
            break
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert status == 401  # no password
    def with_auth(user: str, password: str) -> int:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request = urllib.request.Request(proc.url + "/metrics", headers={"Authorization": f"Basic {token}"})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            assert exc.headers["WWW-Authenticate"].startswith("Basic ")
            return exc.code
    assert with_auth("prometheus", "wrong") == 401
    assert with_auth("nobody", "s3cret") == 401
    assert with_auth("prometheus", "s3cret") == 200
    assert with_auth("prometheus", "s3cret") == 200  # the remembered pair (bcrypt calls: test_webconfig)


@pytest.mark.parametrize(
    "web, message",
    [
        ({"tls_server_config": {"cert_file": "/nope.crt", "key_file": "/nope.key"}}, "tls_server_config.cert_file: cannot read '/nope.crt'"),
        ({"tls_server_config": {"cert_file": "/etc/hostname"}}, "tls_server_config.key_file: required"),
        ({"basic_auth_users": {"a": "plaintext"}}, "basic_auth_users.a: expected a bcrypt hash"),
        ({"tls_server_config": {"cert_file": "x", "key_file": "y", "client_auth_type": "Maybe"}}, "client_auth_type: 'Maybe' is not one of"),
        ({"tsl_server_config": {}}, "tsl_server_config: unknown field"),
    ],
)
def test_bad_web_config_is_one_line_each_and_exit_1(start, web, message) -> None:
    proc = start(web)
    assert proc.wait() == 1
    assert message in proc.log() and "Traceback" not in proc.log()


def test_password_stays_out_of_logs_metrics_and_check_config(server, tmp_path, sessions) -> None:
    """The dsn password and a password_file's content appear nowhere."""
    from tests.test_config import run_cli

    secret_file = tmp_path / "password"
    secret_file.write_text("file-secret-42\n")
    config = {"dsn": server.dsn(password="dsn-secret-17"), "password_file": str(secret_file),
              "poll_interval": "200ms", "locks": LOCKS}
    proc = ExporterProcess(tmp_path, config, "--log.level=debug")
    try:
        text = proc.metrics_when(lambda t: parse(t).get(("pg_advisory_lock_exporter_up", ())) == 1)
    finally:
        proc.stop()
    check = run_cli("--check-config", f"--config.file={proc.config_path}")
    other_dsn = tmp_path / "other.yaml"
    other_dsn.write_text(yaml.safe_dump({"dsn": "host=x password=dsn-secret-17 port=5433", "locks": []}))
    other = run_cli("--check-config", f"--config.file={other_dsn}")
    # The summary shows the dsn, not the password.
    assert other.returncode == 0 and "host=x port=5433" in other.stdout
    bad_dsn = tmp_path / "bad.yaml"
    bad_dsn.write_text(yaml.safe_dump({"dsn": "host=x password=dsn-secret-17 port=notaport", "locks": []}))
    bad = run_cli("--check-config", f"--config.file={bad_dsn}")
    # A port that is no port is refused at load, the parameter named and its value never shown.
    assert bad.returncode == 1 and 'parameter "port"' in bad.stderr + bad.stdout
    everything = proc.log() + text + check.stdout + check.stderr + other.stdout + other.stderr + bad.stdout + bad.stderr
    assert "dsn-secret-17" not in everything and "file-secret-42" not in everything


def test_superuser_gets_a_warning(server, tmp_path) -> None:
    proc = ExporterProcess(tmp_path, {"dsn": server.dsn(), "poll_interval": "200ms", "locks": LOCKS})
    try:
        proc.metrics_when(lambda t: parse(t).get(("pg_advisory_lock_exporter_up", ())) == 1)
    finally:
        proc.stop()
    assert "connected as superuser postgres: the exporter needs only pg_monitor" in proc.log()


def test_a_silent_client_does_not_stall_other_scrapes(start) -> None:
    proc = start(None)
    proc.wait_ready()
    silent = socket.create_connection(("127.0.0.1", proc.port))
    silent.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and never finishes the request
    half_open = socket.create_connection(("127.0.0.1", proc.port))
    try:
        for _ in range(5):
            started = time.monotonic()
            assert proc.get("/metrics")[0] == 200
            assert time.monotonic() - started < 1.0
    finally:
        silent.close()
        half_open.close()


@pytest.mark.slow
def test_password_file_is_read_at_connect_and_a_rotated_secret_is_picked_up(tmp_path) -> None:
    """Against a server that asks for passwords (scram), the password comes only from password_file."""
    import psycopg

    from tests.conftest import needs_own_clusters
    from tests.pgcluster import Cluster

    needs_own_clusters()
    cluster = Cluster().init()
    try:
        hba = Path(cluster.datadir) / "pg_hba.conf"
        hba.write_text("local all postgres trust\nhost all postgres 127.0.0.1/32 trust\n"
                       "host all all 127.0.0.1/32 scram-sha-256\n")
        cluster.pg_ctl_start()
        with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
            admin.execute("CREATE ROLE exporter LOGIN PASSWORD 'first-secret'; GRANT pg_monitor TO exporter")
        secret = tmp_path / "password"
        secret.write_text("first-secret\n")
        config = {"dsn": cluster.dsn(user="exporter"), "password_file": str(secret), "poll_interval": "200ms",
                  "locks": LOCKS}
        proc = ExporterProcess(tmp_path, config)
        try:
            proc.metrics_when(lambda t: parse(t).get(("pg_advisory_lock_exporter_up", ())) == 1)
            # Rotate: new password on the server and in the file; drop the session so it reconnects.
            with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
                admin.execute("ALTER ROLE exporter PASSWORD 'second-secret'")
                secret.write_text("second-secret\n")
                admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'exporter'")
            text = proc.metrics_when(lambda t: parse(t).get(("pg_advisory_lock_exporter_up", ())) == 1
                                     and parse(t)[("pg_advisory_lock_exporter_poll_errors_total", ())] >= 1)
        finally:
            proc.stop()
        assert "first-secret" not in proc.log() + text and "second-secret" not in proc.log() + text
    finally:
        cluster.destroy()



PASSWORD_72 = "p" * 72  # bcrypt's most


@pytest.fixture
def guarded():
    """A real MetricsServer (free port) behind basic auth: prometheus / PASSWORD_72."""
    from exporter.exposition import Exposition
    from exporter.server import ExpositionSite, MetricsServer
    from exporter.webconfig import BasicAuth, WebConfig
    from tests.test_metrics import SNAPSHOT

    exposition = Exposition(SNAPSHOT)
    exposition.render_now()
    auth = BasicAuth({"prometheus": bcrypt.hashpw(PASSWORD_72.encode(), bcrypt.gensalt(rounds=4))})
    server = MetricsServer("127.0.0.1:0", ExpositionSite(exposition, lambda: True), web=WebConfig(auth=auth))
    server.start()
    yield server
    server.stop()


def test_a_password_over_72_bytes_is_refused_with_401_never_dropped_nor_prefix_matched(guarded, caplog) -> None:
    """bcrypt reads 72 bytes at most (bcrypt 5 raises beyond; older ones truncated): a longer
    password is a wrong password, as exporter-toolkit answers it."""

    def status(candidate: str) -> tuple[int, str | None]:
        token = base64.b64encode(f"prometheus:{candidate}".encode()).decode()
        conn = http.client.HTTPConnection("127.0.0.1", guarded.port, timeout=10)
        try:
            conn.request("GET", "/metrics", headers={"Authorization": f"Basic {token}"})
            response = conn.getresponse()
            response.read()
            return response.status, response.getheader("WWW-Authenticate")
        finally:
            conn.close()

    with caplog.at_level("DEBUG", logger="exporter"):
        assert status(PASSWORD_72 + "x")[0] == 401  # never a prefix match
        assert status(PASSWORD_72 + "x")[1].startswith("Basic ")
        assert status("é" * 40)[0] == 401  # 80 bytes in 40 characters
        assert status(PASSWORD_72)[0] == 200
        assert status(PASSWORD_72 + "x")[0] == 401  # nor once the 72 bytes are remembered
    assert PASSWORD_72 not in caplog.text and "Basic " not in caplog.text


def test_a_refused_head_has_no_body_so_the_connection_stays_usable(guarded) -> None:
    """Two requests on one connection, the second closing it: nothing between the HEAD's headers
    and the next status line (a stray body there would be read as the next answer)."""
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=10) as conn:
        conn.sendall(b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET /-/healthy HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
    head, _, rest = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 ") and rest.startswith(b"HTTP/1.1 401 ")
    assert rest.endswith(b"\r\n\r\nunauthorized\n")
