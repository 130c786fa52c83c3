"""Malformed configs, hostile label values, cardinality caps: nothing gets past, nothing breaks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from exporter.metrics import render
from tests.metrics_util import parse, series

GOOD_LOCK = "locks:\n  - {name: a, key: 1}\n"
BOMB = """\
a: &a ["x","x","x","x","x","x","x","x","x"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
locks: *f
"""

# (file content, the one located message expected)
MALFORMED = [
    (b"", "the file is empty"),
    (b"   \n# only a comment\n", "the file is empty"),
    (b"locks: [\n", "not valid YAML"),
    (b"\xff\xfe\x00d\x00s\x00n", "not UTF-8"),
    (b"dsn: \xc3\x28\n", "not UTF-8"),
    (b"- just\n- a list\n", "expected a mapping at the top level"),
    (b"locks: 5\n", "locks: expected a list"),
    (b"dns: x\n" + GOOD_LOCK.encode(), "dns: unknown field"),
    (b"poll_interval: fast\n" + GOOD_LOCK.encode(), "poll_interval: 'fast' is not a duration"),
    (b"poll_interval: 5\n" + GOOD_LOCK.encode(), "poll_interval: expected a duration"),
    (b"poll_interval: 1ms\n" + GOOD_LOCK.encode(), "poll_interval: must be at least 100ms"),
    (b"probe_interval: -1s\n" + GOOD_LOCK.encode(), "probe_interval: '-1s' is not a duration"),
    (b"locks:\n  - {name: a, key: 9223372036854775808}\n", "locks[0].key: 9223372036854775808 is outside bigint"),
    (b"locks:\n  - {name: a, key: [2147483648, 0]}\n", "locks[0].key[0]: 2147483648 is outside int4"),
    (b"locks:\n  - {name: a, key: [1.5, 0]}\n", "locks[0].key[0]: expected an integer (int4), got a number (1.5)"),
    (b"locks:\n  - {name: a, key: 1.0}\n", "locks[0].key: expected a bigint"),
    (b"locks:\n  - {name: a, key: null}\n", "locks[0].key: expected a bigint"),
    (b"locks:\n  - {name: a, key: {hashtext: [x]}}\n", "locks[0].key.hashtext: expected a non-empty string, got a list"),
    (b"locks:\n  - {name: a, key: {hashtext: a, hashtextextended: a}}\n", "locks[0].key: a key mapping has one field"),
    (b"locks:\n  - {name: '', key: 1}\n", "locks[0].name: expected a non-empty string"),
    (b"locks:\n  - {name: a, key: 1}\n  - {name: a, key: 2}\n", "locks[1].name: duplicate name 'a'"),
    (b"locks:\n  - {name: a, key: 1}\n  - {name: b, key: 1}\n", "locks[1].key: 'b' and 'a' (locks[0]) name the same lock 1"),
    (b"locks:\n  - {name: a, key: [-1, -1]}\n  - {name: b, key: [-1, -1]}\n", "locks[1].key: 'b' and 'a' (locks[0]) name the same lock (-1, -1)"),
    (b"locks:\n  - {name: a, key: 1, probe: {expect: maybe}}\n", "locks[0].probe.expect: expected one of held, free, any"),
    (b"locks:\n  - {name: a, key: 1, max_hold: forever}\n", "locks[0].max_hold: 'forever' is not a duration"),
    (b"locks:\n  - {name: a, key: 1, nmae: b}\n", "locks[0].nmae: unknown field"),
    (b"locks:\n  - {name: a, key: 1, name: b}\n", "duplicate key 'name'"),
    (b"dsn: ${SURELY_NOT_SET_VARIABLE}\n" + GOOD_LOCK.encode(), "dsn: environment variable SURELY_NOT_SET_VARIABLE is not set"),
    (b"max_holder_info: -1\n" + GOOD_LOCK.encode(), "max_holder_info: -1 is outside a count"),
    (b"password_file: /surely/not/here\n" + GOOD_LOCK.encode(), "password_file: cannot read '/surely/not/here'"),
    (b"!!python/object/apply:os.system [echo pwned]\n", "not valid YAML"),
    (BOMB.encode(), "a: unknown field"),
    (b"locks: " + b"[" * 5000 + b"]" * 5000 + b"\n", "not valid YAML"),
    (b"dsn: '" + b"x" * (10 * 1024 * 1024) + b"'\n", "larger than 1 MiB"),
]


@pytest.mark.parametrize("content, message", MALFORMED, ids=[m[:40] for _, m in MALFORMED])
def test_each_malformed_config_exits_1_with_a_located_message(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    result = subprocess.run([sys.executable, "-m", "exporter", "--check-config", f"--config.file={path}"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stdout
    lines = result.stderr.strip().splitlines()
    assert any(message in line for line in lines), lines
    assert all(line.startswith(f"{path}: ") for line in lines)
    assert "Traceback" not in result.stderr and len(result.stderr) < 10_000



HOSTILE = 'we"ird\\na\nme ü ✓ {lock="x"}'


def test_hostile_label_values_come_out_as_valid_exposition(make_poller, sessions, server) -> None:
    import psycopg
    from psycopg import sql

    role = 'ro"le\\b\nü'
    with psycopg.connect(server.dsn(), autocommit=True) as admin:
        admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN SUPERUSER").format(sql.Identifier(role)))
        try:
            holder = sessions.open(application_name='app "quoted" \\ back\nslash ✓', user=role)
            holder.execute("SELECT pg_advisory_lock(4242), pg_advisory_lock(43)")
            poller = make_poller({"locks": [{"name": HOSTILE, "key": 4242}, {"name": "plain", "key": 43}]})
            text = render(poller.poll_once()).decode()
            info = series(text, "pg_advisory_lock_holder_info")
            assert {i["lock"] for i in info} == {HOSTILE, "plain"}
            first = next(i for i in info if i["lock"] == HOSTILE)
            # PostgreSQL keeps application_name to printable ASCII: non-ASCII becomes '?'.
            assert first["application_name"].startswith('app "quoted" \\ back')
            assert first["usename"] == role
            assert parse(text)[("pg_advisory_lock_holders", (("database", "postgres"), ("lock", HOSTILE), ("mode", "exclusive")))] == 1
            # A newline in a value is escaped: every line is still a comment or a whole sample.
            assert all(line.startswith(("# ", "pg_advisory_lock_")) for line in text.splitlines())
        finally:
            sessions.close_all()
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def test_holder_info_is_capped_and_the_drop_counted(make_poller, sessions) -> None:
    for _ in range(5):
        sessions.open().execute("SELECT pg_advisory_lock_shared(1), pg_advisory_lock_shared(2)")
    config = {"max_holder_info_per_lock": 3, "max_holder_info": 4,
              "locks": [{"name": "one", "key": 1}, {"name": "two", "key": 2}]}
    poller = make_poller(config)
    text = render(poller.poll_once()).decode()
    info = series(text, "pg_advisory_lock_holder_info")
    assert sum(i["lock"] == "one" for i in info) == 3 and sum(i["lock"] == "two" for i in info) == 1
    samples = parse(text)
    assert samples[("pg_advisory_lock_holders", (("database", "postgres"), ("lock", "two"), ("mode", "shared")))] == 5
    assert samples[("pg_advisory_lock_exporter_holder_info_dropped_total", ())] == 6
    text = render(poller.poll_once()).decode()
    assert parse(text)[("pg_advisory_lock_exporter_holder_info_dropped_total", ())] == 12


def test_the_caps_keep_the_longest_held_holders(make_poller, sessions) -> None:
    now = [100.0]
    poller = make_poller({"max_holder_info_per_lock": 2, "locks": [{"name": "one", "key": 1}]}, clock=lambda: now[0])
    oldest = sessions.open(application_name="oldest")
    oldest.execute("SELECT pg_advisory_lock_shared(1), pg_sleep(0)")  # active at the call: seen from the first poll
    poller.poll_once()
    now[0] += 50.0
    middle = sessions.open(application_name="middle")
    middle.execute("SELECT pg_advisory_lock_shared(1), pg_sleep(0)")
    poller.poll_once()
    now[0] += 50.0
    newest = sessions.open(application_name="newest")
    newest.execute("SELECT pg_advisory_lock_shared(1), pg_sleep(0)")
    text = render(poller.poll_once()).decode()
    shown = {i["application_name"] for i in series(text, "pg_advisory_lock_holder_info")}
    assert shown == {"oldest", "middle"}
    assert parse(text)[("pg_advisory_lock_holders", (("database", "postgres"), ("lock", "one"), ("mode", "shared")))] == 3
