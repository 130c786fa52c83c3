"""Connection strings: described and logged without their secrets, even when libpq refuses them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from unittest import mock

import psycopg
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg import conninfo, pq

from exporter import dsnparse
from exporter.config import ConfigError, parse_config
from exporter.configvalues import expand_env_mapped
from exporter.dsn import (
    DsnError, check_dsn, database_name, describe_dsn, describe_hosts, dsn_endpoints, dsn_port, error_line, redact,
    server_name,
)
from tests.exporter_proc import ExporterProcess
from tests.metrics_util import parse, up
from tests.pgcluster import free_port
from tests.test_config import run_cli

# dsns libpq really refuses, each with a distinctive password, and what --check-config says of it.
REFUSED = {
    "an unterminated quote": ("host=db dbname=app password='quote-secret-81",
                              "parameter \"password\" at character 29: the value's opening quote (') is never closed"),
    "a bad URI escape": ("postgresql://exp:esc%zzsecret-82@db:5432/app",
                         'parameter "password" at character 21: "%" is not followed by two hexadecimal digits'),
    "an unknown option": ("host=db password=opt-secret-83 colour=blue", "at character 32: not a libpq parameter name"),
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


@pytest.mark.parametrize("dsn, message", list(REFUSED.values()), ids=list(REFUSED))
def test_a_refused_dsn_is_named_without_its_password(dsn: str, message: str) -> None:
    with pytest.raises(DsnError) as info:
        describe_dsn(dsn)
    assert str(info.value) == message and clean(message) and server_name(dsn) == "(unparsable dsn)"


@pytest.mark.parametrize("dsn, message", list(REFUSED.values()), ids=list(REFUSED))
def test_check_config_and_start_up_refuse_it_without_the_password(tmp_path, dsn: str, message: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"dsn": dsn}))
    check = run_cli("--check-config", f"--config.file={path}")
    assert check.returncode == 1
    assert check.stderr.splitlines() == [f"{path}: dsn: {message}"]
    started = run_cli(f"--config.file={path}", f"--web.listen-address=127.0.0.1:{free_port()}")
    assert started.returncode == 1
    assert clean(check.stdout + check.stderr + started.stdout + started.stderr)


def test_a_refused_reload_keeps_every_password_out_of_log_metrics_and_page(tmp_path, server) -> None:
    good = {"dsn": server.dsn(), "poll_interval": "200ms", "locks": [{"name": "leader", "key": 4242}]}
    proc = ExporterProcess(tmp_path, good)
    try:
        proc.metrics_when(lambda t: up(t) == 1)
        for number, (dsn, _) in enumerate(REFUSED.values(), start=1):
            proc.config_path.write_text(yaml.safe_dump({**good, "dsn": dsn}))
            proc.proc.send_signal(signal.SIGHUP)
            proc.metrics_when(lambda t: proc.log().count("config reload refused") >= number)
            text = proc.metrics_when(lambda t: parse(t)[("pg_advisory_lock_exporter_config_last_reload_successful", ())] == 0)
            page = proc.get("/")[1]
            assert up(text) == 1 and clean(text) and clean(page)
    finally:
        proc.stop()
    log = proc.log()
    # logfmt escapes the message's quotes
    assert all(log.count("dsn: " + message.replace('"', '\\"')) == 1 for _, message in REFUSED.values()) and clean(log)


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


# Where a dsn goes wrong, said without any of it: the password is in every one of these.
SECRET = "s3cr3t-Pa55"
LOCATED = [
    (SECRET, 'at character 1: expected key=value (a parameter name followed by "=")'),
    ("x", 'at character 1: expected key=value (a parameter name followed by "=")'),
    (f"host password={SECRET}", 'parameter "host" at character 1: expected "=" and a value after the name'),
    # A word after a password may be the rest of it (one with a space): not named, nothing suggested for it.
    (f"password={SECRET} host", 'at character 22: expected key=value (a parameter name followed by "=")'),
    (f"host=db password={SECRET} horse=battery", "at character 30: not a libpq parameter name"),
    (f"host=db sslpassword={SECRET} prot=5432", "at character 33: not a libpq parameter name"),
    (f"host=db hots=db password={SECRET}", "at character 9: not a libpq parameter name; did you mean host?"),
    (f"hots=db password={SECRET}", "at character 1: not a libpq parameter name; did you mean host?"),
    (f"postgresql://exp:{SECRET}@db/app?sslmod=require", "at character 37: not a libpq parameter name"),
    (f"postgresql://exp@db/app?password={SECRET}&prot=1", "at character 46: not a libpq parameter name"),
    (f"postgresql://exp@db/app?prot=1&password={SECRET}", "at character 25: not a libpq parameter name; did you mean "
                                                          "port?"),
    # A password with "/" in it ends the user part early: what follows may be the password's, up to its "@".
    (f"postgresql://exp:{SECRET}/x?hots=1@db/app", "at character 32: not a libpq parameter name"),
    (f"password=s3cr3t Pa55 host=db", 'at character 17: expected key=value (a parameter name followed by "=")'),
    (f"host=db password='{SECRET}", "parameter \"password\" at character 18: the value's opening quote (') is never closed"),
    (f"host=db port=5432 hots=db password={SECRET}", "at character 19: not a libpq parameter name; did you mean host?"),
    (f"password={SECRET} ={SECRET}", 'at character 22: expected a parameter name before "="'),
    (f"host=db password={SECRET} port=54x2", 'parameter "port" at character 35: expected a port number (1 to 65535) '
                                              "or a comma-separated list of them"),
    (f"host=a,b password={SECRET} port=5432,99999", 'parameter "port" at character 36: expected a port number '
                                                      "(1 to 65535) or a comma-separated list of them"),
    (f"postgresql://exp:{SECRET}%g1@db/app", 'parameter "password" at character 29: "%" is not followed by two '
                                             "hexadecimal digits"),
    (f"postgresql://exp:{SECRET}@db/app%00", 'parameter "dbname" at character 36: %00 is not allowed'),
    (f"postgresql://exp:{SECRET}@db:5x/app", 'parameter "port" at character 33: expected a port number (1 to 65535) '
                                             "or a comma-separated list of them"),
    (f"postgresql://exp:{SECRET}@[::1/app", 'at character 30: "[" opens an IPv6 host address that no "]" closes'),
    (f"postgresql://exp:{SECRET}@[]/app", "at character 30: an empty IPv6 host address ([])"),
    (f"postgresql://exp:{SECRET}@[::1]x/app", 'at character 35: expected ":", "/", "?" or "," after the IPv6 host address'),
    (f"postgresql://exp@db/app?sslmode&password={SECRET}",
     'parameter "sslmode" at character 25: a query parameter without "=" (expected key=value)'),
    (f"postgresql://exp@db/app?password={SECRET}=x", 'parameter "password" at character 45: a second "=" in a query '
                                                    "parameter (write it %3D)"),
    (f"postgresql://exp@db/app?password={SECRET}&{SECRET}=1", "at character 46: not a libpq parameter name"),
]


def fragments(secret: str, shortest: int = 3) -> set[str]:
    """Every piece of secret of at least shortest characters."""
    return {secret[i:j] for i in range(len(secret)) for j in range(i + shortest, len(secret) + 1)}


@pytest.mark.parametrize("dsn, message", LOCATED)
def test_a_dsn_error_names_the_parameter_and_the_place_never_a_fragment(dsn: str, message: str) -> None:
    with pytest.raises(DsnError) as info:
        check_dsn(dsn)
    assert str(info.value) == message
    assert not any(fragment in message for fragment in fragments(SECRET))


# A place counts in the text written, before ${VAR} expansion: one after an expanded password says
# nothing of its length, one inside it points at its "${". Each with two passwords of other lengths.
PLAIN = ("sh0rt", "a-much-l0nger-Pa55w0rd-0f-28")
WITH_A_SPACE = ("c0rr3ct h0rse=b4tt3ry", "Tr0ub4dor&3 h0st=st4pl3-and-m0re")  # the word after it: not a name
EXPANDED = [
    ("password=${PW} prot=5432", PLAIN, "at character 16: not a libpq parameter name"),
    ("host=db password=${PW}", WITH_A_SPACE, "at character 18: not a libpq parameter name"),
    ("host=db password=${PW} port=54x2", PLAIN, 'parameter "port" at character 29: expected a port number (1 to 65535) '
                                                "or a comma-separated list of them"),
    ("password='${PW}' host=db 'x", WITH_A_SPACE, 'at character 26: expected key=value (a parameter name followed by '
                                                  '"=")'),
    ("postgresql://exp:${PW}@db/app%zz", PLAIN, 'parameter "dbname" at character 30: "%" is not followed by two '
                                                "hexadecimal digits"),
]


@pytest.mark.parametrize("written, passwords, message", EXPANDED)
def test_a_place_counts_in_the_text_written_and_tells_nothing_of_an_expanded_password(
        monkeypatch, written: str, passwords: tuple[str, str], message: str) -> None:
    said = []
    for password in passwords:
        monkeypatch.setenv("PW", password)
        with pytest.raises(ConfigError) as info:
            parse_config({"dsn": written, "locks": [{"name": "a", "key": 1}]}, "config.yaml")
        said.append(info.value.details)
        assert not any(fragment in detail for fragment in fragments(password) for detail in info.value.details)
    assert said == [[f"dsn: {message}"]] * len(passwords)


def test_check_config_places_an_error_in_the_file_written(tmp_path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"dsn": "host=db password=${PW} prot=5432", "locks": [{"name": "a", "key": 1}]}))
    said = [run_cli("--check-config", f"--config.file={path}", env={"PW": password}) for password in PLAIN]
    assert [(check.returncode, check.stderr) for check in said] == \
        [(1, f"{path}: dsn: at character 24: not a libpq parameter name\n")] * len(PLAIN)


def test_check_config_names_a_targets_dsn_error_in_one_line(tmp_path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"targets": {"a": {"dsn": "host=a"}, "b": {"dsn": SECRET}}}))
    check = run_cli("--check-config", f"--config.file={path}")
    assert check.returncode == 1 and check.stdout == ""
    assert check.stderr.splitlines() == [f'{path}: targets.b.dsn: at character 1: expected key=value '
                                         '(a parameter name followed by "=")']


# The walk mirrors libpq: over random strings of the characters that matter, it refuses exactly
# what libpq refuses, and reads what libpq reads.
_KEY_VALUE_PARTS = ["host", "port", "password", "hots", "=", " ", "'", "\\", "a", "5432", ",", "\t"]
_URI_PARTS = ["postgresql://", "u", ":", "@", "/", "?", "&", "=", "[", "]", "::1", ",", "%41", "%4", "%00",
              "%zz", "sslmode", "ssl", "true", "require", "port", "h", "5432", "colour", " "]


def _agrees(dsn: str) -> None:
    try:
        expected = conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        with pytest.raises(dsnparse.Refused):
            dsnparse.params(dsn)
        return
    read = {param.name: param.value for param in dsnparse.params(dsn)}
    assert read == expected


@settings(max_examples=400, deadline=None, derandomize=True)
@given(st.lists(st.sampled_from(_KEY_VALUE_PARTS), max_size=12))
def test_the_walk_agrees_with_libpq_on_key_values(parts: list[str]) -> None:
    _agrees("".join(parts))


@settings(max_examples=400, deadline=None, derandomize=True)
@given(st.lists(st.sampled_from(_URI_PARTS), max_size=12))
def test_the_walk_agrees_with_libpq_on_uris(parts: list[str]) -> None:
    _agrees("postgresql://" + "".join(parts))


@pytest.mark.parametrize("port", ["5432", " 5432 ", "+5432", "05432", "5432,", "1,65535", "", "abc", "0", "65536",
                                  "-1", "54 32", "5432,abc", "٥٤٣٢", "+"])
def test_a_port_is_refused_exactly_when_libpq_refuses_it_at_connect(port: str) -> None:
    dsn = f"host=/nonexistent-a,/nonexistent-b port='{port}' connect_timeout=1"
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(dsn)  # no server: a socket that is not there, or the port refused before
    libpq_refuses = "invalid integer value" in str(info.value) or "invalid port number" in str(info.value)
    problem = dsnparse.port_problem(dsn, conninfo.conninfo_to_dict(dsn).get("port"))
    assert (problem is not None) == libpq_refuses, str(info.value)


# What libpq takes is taken. Before 18 it takes a space inside a URI's part (and connects with it);
# 18 refuses one there. The walk that places a refusal must never refuse what libpq took.
SPACED = {  # dsn: what libpq 18 says of it (None: every libpq takes it)
    "postgresql://u:my pass@db/app": 'parameter "password" at character 18: a space (write it %20)',
    "postgresql://u@db/app?application_name=a b": 'parameter "application_name" at character 41: a space '
                                                  "(write it %20)",
    "postgresql://u@db/my app?port=54x2": 'parameter "dbname" at character 21: a space (write it %20)',
    "postgresql://u@ db : 5432 /app": None,  # 15 keeps the spaces around a part, 18 drops them
    "host=db password='my pass' application_name='a b'": None,
}


@pytest.mark.parametrize("dsn", SPACED)
def test_a_dsn_with_a_space_is_taken_when_libpq_takes_it(dsn: str) -> None:
    refused_by_18 = SPACED[dsn]
    if pq.version() < 180000 and "54x2" in dsn:  # taken, but its port is none: placed all the same
        with pytest.raises(DsnError, match=r'^parameter "port" at character 31: expected a port number'):
            check_dsn(dsn)
    elif pq.version() < 180000 or refused_by_18 is None:
        conninfo.conninfo_to_dict(dsn)  # libpq takes it, and so does the exporter
        check_dsn(dsn)
        assert dsnparse.params(dsn)  # and the walk reads it: it could place a port that is none
    else:
        with pytest.raises(DsnError) as info:
            check_dsn(dsn)
        assert str(info.value) == refused_by_18


def _libpq_version(impl: str) -> int | None:
    """The libpq version psycopg's implementation impl loads, None when it cannot be loaded here."""
    child = subprocess.run([sys.executable, "-c", "from psycopg import pq; print(pq.version())"],
                           capture_output=True, text=True, timeout=30, env={**os.environ, "PSYCOPG_IMPL": impl})
    return int(child.stdout) if child.returncode == 0 else None


@pytest.mark.parametrize("impl", ["python", "binary"])  # the system's libpq (15 here), the wheel's (18)
def test_check_config_takes_a_dsn_with_a_space_when_libpq_does(tmp_path, impl: str) -> None:
    version = _libpq_version(impl)
    if version is None:
        pytest.skip(f"psycopg's {impl} implementation cannot be loaded here")
    for number, dsn in enumerate(SPACED):
        path = tmp_path / f"spaced-{number}.yaml"
        path.write_text(yaml.safe_dump({"dsn": dsn, "locks": [{"name": "a", "key": 1}]}))
        check = run_cli("--check-config", f"--config.file={path}", env={"PSYCOPG_IMPL": impl})
        expected = None if version < 180000 else SPACED[dsn]
        if "54x2" in dsn and expected is None:
            expected = 'parameter "port" at character 31: expected a port number (1 to 65535) or a comma-separated ' \
                       "list of them"
        if expected is None:
            assert (check.returncode, check.stderr) == (0, ""), check.stderr
            assert check.stdout.startswith(f"{path}: ok: ")
        else:
            assert (check.returncode, check.stdout, check.stderr.splitlines()) == (1, "", [f"{path}: dsn: {expected}"])


def test_the_dsn_tests_pass_on_the_other_libpq_too() -> None:
    """The walk follows the libpq psycopg loaded: these tests run again on the system's libpq (the
    python implementation), when that is not the one this run loaded."""
    if pq.__impl__ == "python" or _libpq_version("python") is None:
        pytest.skip("this run is the python implementation's, or the system has no libpq")
    child = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider",
         "-k", "walk or escapes or space or never_a_fragment or place_counts or libpq_refuses"],
        capture_output=True, text=True, timeout=240, env={**os.environ, "PSYCOPG_IMPL": "python"},
        cwd=Path(__file__).parent.parent,
    )
    assert child.returncode == 0, child.stdout[-3000:]


# Whatever the string (and whatever a ${VAR} in it holds), nothing escapes the dsn's functions but
# the exporter's own one-line DsnError, and every place it gives lies in the text written.
_ANY_PARTS = [*_KEY_VALUE_PARTS, *_URI_PARTS, "postgres://", "${PW}", "\0", "\ud800", "\udcff", "é", "²", "\n",
              "password=", "port=", "'${PW}'", "%", "sslpassword=", "x"]


@settings(max_examples=500, deadline=None, derandomize=True)
@given(st.lists(st.sampled_from(_ANY_PARTS), max_size=16).map("".join),
       st.text(alphabet=" =':/@?&%\\,tab5²é\udcff", max_size=8))
def test_nothing_but_a_one_line_dsn_error_ever_escapes(written: str, password: str) -> None:
    with mock.patch.dict(os.environ, {"PW": password}):
        dsn, origin = expand_env_mapped(written, "dsn", [])
    for call, text in ((lambda: check_dsn(dsn, origin), written), (lambda: describe_dsn(dsn), dsn)):
        try:
            call()
        except DsnError as error:
            message = str(error)
            assert message and "\n" not in message
            for place in re.findall(r"at character ([0-9]+)", message):
                assert 1 <= int(place) <= len(text) + 1  # check_dsn's in the text written, describe_dsn's in the dsn
    server_name(dsn), redact("text", dsn), dsn_port(dsn), dsn_endpoints(dsn), database_name(dsn), describe_hosts(dsn)


def test_a_dsns_host_names_are_looked_up_before_connecting_and_given_as_hostaddr(monkeypatch) -> None:
    """connection.with_addresses: psycopg would look the names up itself, with no bound. Each name
    becomes one entry per address (host kept, for TLS), an address is its own hostaddr (as psycopg
    makes it), a Unix socket or a host given its hostaddr stays as it is, a name that cannot be looked up is left out, and with none left
    the error names the host."""
    import socket

    from exporter.connection import with_addresses

    answers = {"two.example": ["10.0.0.1", "10.0.0.2"], "one.example": ["10.0.0.3"]}

    def getaddrinfo(host, *args, **kwargs):
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, 0)) for address in answers[host]]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.delenv("PGHOST", raising=False)
    monkeypatch.delenv("PGHOSTADDR", raising=False)
    monkeypatch.delenv("PGPORT", raising=False)
    params = conninfo.conninfo_to_dict(with_addresses(
        "host=two.example,/run/postgresql,192.0.2.9,gone.example,named.example hostaddr=,,,,10.9.9.9 "
        "port=1,2,3,4,5 password=secret", 5))
    assert (params["host"], params["hostaddr"], params["port"], params["password"]) == (
        "two.example,two.example,/run/postgresql,192.0.2.9,named.example", "10.0.0.1,10.0.0.2,,192.0.2.9,10.9.9.9",
        "1,1,2,3,5", "secret")
    params = conninfo.conninfo_to_dict(with_addresses("host=one.example sslmode=verify-full dbname=app", 5))
    assert (params["host"], params["hostaddr"], "port" in params) == ("one.example", "10.0.0.3", False)
    for untouched in ("host=/tmp dbname=app", "host=127.0.0.1 port=5432", "dbname=app"):
        assert with_addresses(untouched, 5) == untouched
    with pytest.raises(psycopg.OperationalError, match="failed to resolve host 'gone.example'"):
        with_addresses("host=gone.example", 5)
