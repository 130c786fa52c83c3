"""`pg-advisory-lock-exporter locks`, run and read as a person would."""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import yaml

from tests.conftest import OTHER_DB, stuck_with_waiter


def run_locks(tmp_path: Path, config: dict, *args: str, columns: int = 80) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, "-m", "exporter", "locks", f"--config.file={path}", *args],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": str(columns)})


def test_locks_shows_names_holders_waiters_and_raw_keys(tmp_path, server, sessions) -> None:
    leader = sessions.open(application_name="billing-leader-with-a-long-application-name")
    leader.execute("SELECT pg_advisory_lock(4242), pg_advisory_lock(-7, 8), pg_advisory_lock(-9, 1)")
    shard = stuck_with_waiter(sessions, server, "shard-worker-a", "shard-worker-b")
    stuck, waiter = shard.holder, shard.waiter
    sessions.open(OTHER_DB, application_name="prisma").execute("SELECT pg_advisory_lock(72707369)")
    config = {"dsn": server.dsn(), "presets": ["prisma"],
              "locks": [{"name": "billing-leader", "key": 4242}, {"name": "shard-7", "key": [42, 7]},
                        {"name": "tenants", "key": {"namespace": -9}}]}

    result = run_locks(tmp_path, config)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    print(out)
    lines = out.splitlines()
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    assert "billing-leader  [4242]  in postgres" in lines
    assert "(-7, 8)  in postgres" in lines  # nobody named it: the decoded key
    assert "tenants  [(-9, 1) of (-9, *)]  in postgres" in lines  # a family's key: the family and the key
    assert "prisma:migrations  [72707369, preset]  in other_db" in lines
    at = lines.index("shard-7  [(42, 7)]  in postgres")
    holder, waiting, blocked = lines[at + 1], lines[at + 2], lines[at + 3]
    assert holder.split()[:3] == ["holds", str(stuck.info.backend_pid), "shard-worker-a"] and "idle txn" in holder
    assert waiting.split()[:3] == ["waits", str(waiter.info.backend_pid), "shard-worker-b"]
    assert blocked.strip() == f"blocked by pid {stuck.info.backend_pid}"
    assert "billing-leader-wi… " in out  # long values are cut, not wrapped
    assert lines[-1] == "5 held, 1 waiting"

    as_json = json.loads(run_locks(tmp_path, config, "--json").stdout)
    shard_rows = [r for r in as_json if r["name"] == "shard-7"]
    assert [(r["granted"], r["blocked_by"]) for r in shard_rows] == [(True, []), (False, [stuck.info.backend_pid])]
    assert {r["source"] for r in as_json} == {"config", "preset", "unnamed"}
    assert [(r["name"], r["key"], r["family"]) for r in as_json if r["family"]] == [("tenants", "(-9, 1)", "(-9, *)")]
    assert all(r["held_at_least_seconds"] is not None for r in as_json if r["granted"] and r["state"].startswith("idle"))
    shard.release()


def test_locks_with_nothing_held(tmp_path, server) -> None:
    result = run_locks(tmp_path, {"dsn": server.dsn(), "locks": []})
    assert result.returncode == 0 and result.stdout == "no advisory locks are held or awaited\n"


def test_locks_names_the_server_it_cannot_reach(tmp_path) -> None:
    from tests.pgcluster import free_port

    port = free_port()
    result = run_locks(tmp_path, {"dsn": f"host=127.0.0.1 port={port} user=x password=hunter2", "locks": []})
    assert result.returncode == 1
    assert result.stderr.startswith(f"locks: cannot read 127.0.0.1:{port}/")
    assert "Traceback" not in result.stderr and "hunter2" not in result.stderr and len(result.stderr.splitlines()) == 1


def test_watch_refreshes(tmp_path, server, sessions) -> None:
    sessions.open().execute("SELECT pg_advisory_lock(4242)")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"dsn": server.dsn(), "locks": [{"name": "leader", "key": 4242}]}))
    proc = subprocess.Popen([sys.executable, "-m", "exporter", "locks", "--watch", "0.2", f"--config.file={path}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # Every read has a deadline and stops at end of file: a crash fails the test, never hangs it.
        frames = ""
        deadline = time.monotonic() + 30
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            while frames.count("\033[H\033[2J") < 3:
                remaining = deadline - time.monotonic()
                assert remaining > 0 and selector.select(remaining), f"no third frame in 30 s: {frames!r}"
                chunk = os.read(proc.stdout.fileno(), 65536)
                assert chunk, f"the locks command ended: {proc.wait(10)}, {frames!r}"
                frames += chunk.decode()
    finally:
        proc.send_signal(subprocess.signal.SIGINT)
        _, err = proc.communicate(timeout=20)  # read on: a frame being written must not keep it from ending
        assert proc.returncode == 0
    assert frames.count("leader  [4242]  in postgres") >= 2
    assert err == b""  # Ctrl-C in the middle of a read: no statement cancelled, no psycopg warning


def test_the_fix_of_a_prepared_transaction_is_whole_on_lines_of_its_own(tmp_path, server) -> None:
    """`COMMIT PREPARED 'job-3003' or ROLLBACK PREPARE…` was cut at 80 columns whatever COLUMNS said:
    each command is a line of its own, whole, to copy, at any terminal width."""
    gid = "job-3003-nightly-reconciliation-of-invoices"  # long enough that one line with both would not fit
    with psycopg.connect(server.dsn(), application_name="job-3003") as conn:
        conn.execute("SELECT pg_advisory_xact_lock(3003)")
        conn.execute(f"PREPARE TRANSACTION '{gid}'")
    try:
        for columns in (80, 200):
            result = run_locks(tmp_path, {"dsn": server.dsn(), "locks": [{"name": "job", "key": 3003}]}, columns=columns)
            assert result.returncode == 0, result.stderr
            lines = [line.strip() for line in result.stdout.splitlines()]
            assert f"COMMIT PREPARED '{gid}';" in lines and f"ROLLBACK PREPARED '{gid}';" in lines, result.stdout
            assert "…" not in result.stdout.split("a prepared transaction keeps", 1)[1]
    finally:
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            conn.execute(f"ROLLBACK PREPARED '{gid}'")
