"""The probe against a real server: expectations, never blocking, never leaving a lock held."""

from __future__ import annotations

import signal
import threading
import time

import psycopg
import pytest

from exporter import queries
from exporter.metrics import render
from tests.conftest import OTHER_DB, hang_lookups, wait_until
from tests.exporter_proc import ExporterProcess
from tests.metrics_util import parse

LOCKS = [
    {"name": "leader", "key": 4242, "probe": {"expect": "held"}},
    {"name": "cron", "key": {"hashtext": "hourly-digest"}, "probe": {"expect": "free"}, "max_hold": "15m"},
    {"name": "shard", "key": [-42, 7], "probe": {"expect": "any"}},
    {"name": "export", "key": {"hashtextextended": "nightly-export"}, "probe": {"expect": "free"}},
    {"name": "unprobed", "key": 5},
]
TAKE = {
    "leader": "pg_advisory_lock(4242)",
    "cron": "pg_advisory_lock(hashtext('hourly-digest'))",
    "shard": "pg_advisory_lock(-42, 7)",
    "export": "pg_advisory_lock(hashtextextended('nightly-export', 0))",
}
UNLOCK = {name: sql.replace("pg_advisory_lock", "pg_advisory_unlock") for name, sql in TAKE.items()}


def lock_config(name: str):
    from exporter.config import parse_config

    return next(l for l in parse_config({"locks": LOCKS}, "t").locks if l.name == name)


@pytest.mark.parametrize(
    "name, ok_when_free, ok_when_held",
    [("leader", False, True), ("cron", True, False), ("shard", True, True), ("export", True, False)],
)
def test_expectation_in_both_states(make_prober, sessions, name, ok_when_free, ok_when_held) -> None:
    prober = make_prober({"locks": LOCKS})
    lock = lock_config(name)
    free = prober.try_lock(lock)
    assert (free.acquirable, free.ok, free.errors) == (True, ok_when_free, 0)
    holder = sessions.open()
    holder.execute(f"SELECT {TAKE[name]}")
    held = prober.try_lock(lock)
    assert (held.acquirable, held.ok, held.errors) == (False, ok_when_held, 0)
    holder.execute(f"SELECT {UNLOCK[name]}")
    again = prober.try_lock(lock)
    assert (again.acquirable, again.ok) == (True, ok_when_free)
    assert again.database == "postgres"


def test_probe_metrics_and_max_hold(make_prober, make_poller, sessions) -> None:
    sessions.open().execute(f"SELECT {TAKE['leader']}")
    prober = make_prober({"locks": LOCKS})
    before = time.time()
    for lock in prober._config.probed:  # noqa: SLF001
        prober.try_lock(lock)
    samples = parse(render(make_poller({"locks": LOCKS}).poll_once(), prober.results()).decode())
    ids = (("database", "postgres"), ("lock", "leader"))
    assert samples[("pg_advisory_lock_probe_acquirable", ids)] == 0
    assert samples[("pg_advisory_lock_probe_ok", ids)] == 1
    assert 0 < samples[("pg_advisory_lock_probe_duration_seconds", ids)] < 1
    assert samples[("pg_advisory_lock_probe_errors_total", ids)] == 0
    assert before <= samples[("pg_advisory_lock_probe_last_run_timestamp_seconds", ids)] <= time.time()
    assert samples[("pg_advisory_lock_max_hold_seconds", (("database", "postgres"), ("lock", "cron")))] == 900
    # Locks without probe: or max_hold: have no such series.
    unprobed = (("database", "postgres"), ("lock", "unprobed"))
    assert ("pg_advisory_lock_probe_ok", unprobed) not in samples
    assert ("pg_advisory_lock_max_hold_seconds", unprobed) not in samples


def test_probe_tries_in_the_locks_database(make_prober, sessions) -> None:
    locks = [{"name": "there", "key": 4242, "database": OTHER_DB, "probe": {"expect": "held"}}]
    prober = make_prober({"locks": locks})
    lock = prober._config.probed[0]  # noqa: SLF001
    sessions.open().execute("SELECT pg_advisory_lock(4242)")  # the same key, another database
    assert prober.try_lock(lock).acquirable is True
    sessions.open(OTHER_DB).execute("SELECT pg_advisory_lock(4242)")
    result = prober.try_lock(lock)
    assert (result.acquirable, result.ok, result.database) == (False, True, OTHER_DB)


def test_probe_never_queues_behind_a_holder(make_prober, sessions, server) -> None:
    holder = sessions.open()
    holder.execute("SELECT pg_advisory_lock(4242)")
    prober = make_prober({"locks": LOCKS})
    lock = lock_config("leader")
    results = [prober.try_lock(lock) for _ in range(50)]
    # Returned, false, every time: it never waited for the holder (the bench has the timings).
    assert [r.acquirable for r in results] == [False] * 50
    assert max(r.duration for r in results) < 10.0
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        waiting = conn.execute(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
            "WHERE NOT l.granted AND a.application_name = %s", [queries.PROBE_APPLICATION_NAME]
        ).fetchone()[0]
    assert waiting == 0


def test_probe_counts_errors_and_recovers(server) -> None:
    from exporter.config import parse_config
    from exporter.connection import connect
    from exporter.probe import Prober
    from exporter.snapshot import Snapshot
    from tests.pgcluster import free_port

    config = parse_config({"dsn": server.dsn(), "locks": LOCKS}, "t")
    down = [True]

    def connect_while_down(config, database):
        dsn = f"host=127.0.0.1 port={free_port()} dbname=postgres user=postgres" if down[0] else config.dsn
        return connect(dsn, queries.PROBE_APPLICATION_NAME, 1.0, database)

    prober = Prober(config, connect=connect_while_down, publish=lambda r: None)
    lock = lock_config("leader")
    first, second = prober.try_lock(lock), prober.try_lock(lock)
    assert (first.acquirable, first.ok, first.errors, second.errors) == (None, False, 1, 2)
    samples = parse(render(Snapshot(up=False), (second,)).decode())
    ids = (("database", "postgres"), ("lock", "leader"))
    assert samples[("pg_advisory_lock_probe_errors_total", ids)] == 2
    assert samples[("pg_advisory_lock_probe_ok", ids)] == 0
    assert ("pg_advisory_lock_probe_acquirable", ids) not in samples
    down[0] = False
    time.sleep(0.3)  # past the first reconnect backoff
    recovered = prober.try_lock(lock)
    assert (recovered.acquirable, recovered.errors) == (True, 2)
    prober.close()


def test_the_poller_never_counts_the_probes_hold(make_poller, make_prober, server) -> None:
    """Race the probe against the poller: the probe's momentary holds never show up (they take
    turns on the server, as every target's poller and probe do)."""
    turn = threading.Lock()
    prober = make_prober({"locks": LOCKS}, turn=turn)
    poller = make_poller({"locks": LOCKS}, turn=turn)
    lock = lock_config("cron")
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            prober.try_lock(lock)

    thread = threading.Thread(target=hammer, daemon=True)
    thread.start()
    try:
        poller.poll_once()
        for _ in range(100):
            snap = poller.poll_once()
            cron = next(s for s in snap.locks if s.name == "cron")
            assert cron.holds == 0 and cron.acquisitions == 0
            assert snap.unnamed == ()
    finally:
        stop.set()
        thread.join(5)


def held_probe_keys(server) -> int:
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").fetchone()[0]


@pytest.mark.slow
def test_sigkill_mid_probe_leaves_no_lock_held(tmp_path, server) -> None:
    locks = [
        {"name": f"k{i}", "key": 1000 + i, "probe": {"expect": "free", "interval": "10ms"}} for i in range(20)
    ]
    for round_ in range(5):
        proc = ExporterProcess(tmp_path, {"dsn": server.dsn(), "poll_interval": "1s", "locks": locks})
        proc.metrics_when(lambda t: "pg_advisory_lock_probe_ok{" in t)
        time.sleep(0.2 + round_ * 0.037)  # land the kill at a different point of the probe cycle
        proc.stop(signal.SIGKILL)
        # Whatever statement was running finishes and commits; nothing stays held.
        wait_until(lambda: held_probe_keys(server) == 0, timeout=10)
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            got = conn.execute("SELECT bool_and(pg_try_advisory_lock(k)) FROM generate_series(1000, 1019) k").fetchone()[0]
        assert got


def test_probe_interference_stays_small_and_the_worker_never_waits(make_prober, sessions) -> None:
    """A worker try-locking as fast as it can while the probe hammers the same key."""
    worker = sessions.open(application_name="worker")
    prober = make_prober({"locks": LOCKS})
    lock = lock_config("export")
    stop = threading.Event()
    counts = {"tries": 0, "lost": 0, "slowest": 0.0}

    def work() -> None:
        while not stop.is_set():
            started = time.monotonic()
            got = worker.execute("SELECT pg_try_advisory_lock(hashtextextended('nightly-export', 0))").fetchone()[0]
            counts["slowest"] = max(counts["slowest"], time.monotonic() - started)
            counts["tries"] += 1
            if got:
                worker.execute("SELECT pg_advisory_unlock(hashtextextended('nightly-export', 0))")
            else:
                counts["lost"] += 1

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    probes = 1000
    for _ in range(probes):
        prober.try_lock(lock)
    stop.set()
    thread.join(5)
    lost_per_thousand = counts["lost"] * 1000 / probes
    print(f"worker tries {counts['tries']}, lost to the probe {counts['lost']} ({lost_per_thousand:.1f} per 1000 probes)")
    assert counts["tries"] > 100, counts
    assert counts["slowest"] < 10.0, counts  # a try-lock returns at once: it never waited
    # docs/probe.md's bound: fewer than 100 lost worker tries per 1,000 back-to-back probes (the
    # benchmark gives the measured figures; six runs here gave 0, 1, 3, 3, 11 and 41: a bound of
    # 30 failed one make test in ten, so it was a timing claim, which belongs to the benchmark).
    assert lost_per_thousand < 100, counts


def test_a_hung_lookup_of_the_dsns_host_holds_a_try_no_longer_than_its_deadline(monkeypatch) -> None:
    """psycopg looks the dsn's host up on the calling thread before connect_timeout applies: the
    lookup is made under the try's timeout instead, and the try fails in time."""
    from exporter.config import parse_config
    from exporter.probe import Prober, connect_probe

    release = hang_lookups(monkeypatch, lambda host: host == "hung-probe.example")
    config = parse_config({"dsn": "host=hung-probe.example dbname=x user=x", "locks": [
        {"name": "leader", "key": 4242, "probe": {"expect": "any", "interval": "1s"}}]}, "t")
    prober = Prober(config, connect=connect_probe, publish=lambda results: None)
    results: list = []
    worker = threading.Thread(target=lambda: results.append(prober.try_lock(config.probed[0])), daemon=True)
    try:
        worker.start()
        worker.join(prober.deadline() + 2)
        assert not worker.is_alive(), f"the try is still held {prober.deadline() + 2:g}s after its deadline"
        assert results[0].acquirable is None and results[0].errors == 1
    finally:
        release.set()
        prober.close()
