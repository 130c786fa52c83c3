"""Connection strings: described and logged without their secrets, even when libpq refuses them."""

from __future__ import annotations

import signal

import pytest
import yaml

from exporter.dsn import DsnError, database_name, describe_dsn, dsn_port, error_line, redact, server_name
from tests.exporter_proc import ExporterProcess
from tests.metrics_util import parse, up
from tests.pgcluster import free_port
from tests.test_config import run_cli

# dsns libpq really refuses, each with a distinctive password.
REFUSED = {
    "an unterminated quote": "host=db dbname=app password='quote-secret-81",
    "a bad URI escape": "postgresql://exp:esc%zzsecret-82@db:5432/app",
    "an unknown option": "host=db password=opt-secret-83 colour=blue",
}
SECRETS = ("quote-secret-81", "secret-82", "opt-secret-83", "conn-secret-84")


def clean(text: str) -> bool:
    return not any(secret in text for secret in SECRETS)


def test_describe_and_redact() -> None:
    dsn = "postgresql://exp:hunter2@db.example:6432/app?sslmode=require"
    assert describe_dsn(dsn) == "host=db.example port=6432 dbname=app user=exp sslmode=require"
    assert server_name(dsn) == "db.example:6432/app"
    assert dsn_port(dsn) == 6432 and database_name(dsn) == "app"
    assert redact("password hunter2 failed", dsn) == "password *** failed"
    assert "hunter2" not in error_line(Exception("FATAL: password authentication failed: hunter2"), dsn)


@pytest.mark.parametrize("dsn", list(REFUSED.values()), ids=list(REFUSED))
def test_a_refused_dsn_is_named_without_its_password(dsn: str) -> None:
    with pytest.raises(DsnError) as info:
        describe_dsn(dsn)
    assert clean(str(info.value)) and server_name(dsn) == "(unparsable dsn)"


@pytest.mark.parametrize("dsn", list(REFUSED.values()), ids=list(REFUSED))
def test_check_config_and_start_up_refuse_it_without_the_password(tmp_path, dsn: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"dsn": dsn}))
    check = run_cli("--check-config", f"--config.file={path}")
    assert check.returncode == 1
    assert check.stderr.strip().startswith(f"{path}: dsn: not a valid libpq connection string")
    started = run_cli(f"--config.file={path}", f"--web.listen-address=127.0.0.1:{free_port()}")
    assert started.returncode == 1
    assert clean(check.stdout + check.stderr + started.stdout + started.stderr)


def test_a_refused_reload_keeps_every_password_out_of_log_metrics_and_page(tmp_path, server) -> None:
    good = {"dsn": server.dsn(), "poll_interval": "200ms", "locks": [{"name": "leader", "key": 4242}]}
    proc = ExporterProcess(tmp_path, good)
    try:
        proc.metrics_when(lambda t: up(t) == 1)
        for number, dsn in enumerate(REFUSED.values(), start=1):
            proc.config_path.write_text(yaml.safe_dump({**good, "dsn": dsn}))
            proc.proc.send_signal(signal.SIGHUP)
            proc.metrics_when(lambda t: proc.log().count("config reload refused") >= number)
            text = proc.metrics_when(lambda t: parse(t)[("pg_advisory_lock_exporter_config_last_reload_successful", ())] == 0)
            page = proc.get("/")[1]
            assert up(text) == 1 and clean(text) and clean(page)
    finally:
        proc.stop()
    log = proc.log()
    assert log.count("dsn: not a valid libpq connection string") == 3 and clean(log)


def test_a_dsn_that_parses_but_cannot_connect(tmp_path) -> None:
    dsn = f"host=127.0.0.1 port={free_port()} user=exp dbname=app password=conn-secret-84"
    path = tmp_path / "check.yaml"
    path.write_text(yaml.safe_dump({"dsn": dsn}))
    check = run_cli("--check-config", f"--config.file={path}")
    assert check.returncode == 0 and "dsn host=127.0.0.1" in check.stdout  # no database needed to check
    proc = ExporterProcess(tmp_path, {"dsn": dsn, "poll_interval": "200ms", "locks": [{"name": "a", "key": 1}]})
    try:
        text = proc.metrics_when(lambda t: parse(t).get(("pg_advisory_lock_exporter_poll_errors_total", ())) == 2)
        page = proc.get("/")[1]
    finally:
        proc.stop()
    assert up(text) == 0 and "poll failed on 127.0.0.1:" in proc.log()
    assert clean(check.stdout + check.stderr + text + page + proc.log())
