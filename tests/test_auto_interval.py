"""poll_interval: auto on a real server: the interval follows the polls' cost, short holds are
seen, and every lock says when it was last taken (and how often it is expected to be)."""

from __future__ import annotations

import threading
import time

import pytest

from exporter import landing
from exporter.config import parse_config
from exporter.poller import Poller, connect_poller
from exporter.scheduler import PollTask, Scheduler
from exporter.snapshot import ReloadStatus, Snapshot
from tests.metrics_util import value

LOCKS = [{"name": "cron", "key": 300, "expect_every": "1h"}, {"name": "leader", "key": 301}]


def ids(name: str) -> dict[str, str]:
    return {"lock": name, "database": "postgres"}


def run_poller(config: dict, seconds: float) -> list[Snapshot]:
    """A poller run by the scheduler for a while: every snapshot it published."""
    published: list[Snapshot] = []
    poller = Poller(parse_config(config, "t"), connect=connect_poller, publish=published.append)
    scheduler = Scheduler(2)
    task = PollTask(poller, None)
    scheduler.add(task)
    time.sleep(seconds)
    scheduler.remove(task)
    scheduler.stop()
    return published


@pytest.mark.slow
def test_a_300_ms_hold_every_second_is_counted_under_auto(server, sessions) -> None:
    worker = sessions.open(application_name="cron-worker")
    done = threading.Event()

    def work() -> None:
        for _ in range(10):  # 10 runs in 10 s, each holding its lock for 300 ms
            worker.execute("SELECT pg_advisory_lock(300)")
            time.sleep(0.3)
            worker.execute("SELECT pg_advisory_unlock(300)")
            time.sleep(0.7)
        done.set()

    threading.Thread(target=work, daemon=True).start()
    # poll_interval: auto (the default). The upper bound keeps this test about counting, not about
    # the machine's speed: whether the default bounds catch a 300 ms hold is the benchmark's claim.
    snapshots = run_poller({"dsn": server.dsn(), "locks": LOCKS, "max_poll_interval": "250ms"}, 10.5)
    done.wait(5)
    last = next(s for s in reversed(snapshots) if s.up)
    assert value(last, "pg_advisory_lock_acquisitions_total", **ids("cron")) >= 8
    interval = value(last, "pg_advisory_lock_exporter_poll_interval_seconds")
    # The controller follows the cost one poll behind, so a busy machine can overshoot the share for
    # a while; how close it stays is measured by the benchmark. Here: measured, and of that order.
    assert 0 < value(last, "pg_advisory_lock_exporter_db_time_ratio") <= 0.005 * 2 or interval in (0.1, 0.25)


def test_the_bounds_win_and_a_fixed_interval_stays_fixed(server) -> None:
    # A share so small that the cost asks for more than max_poll_interval: the bound wins.
    poller = Poller(parse_config({"dsn": server.dsn(), "locks": LOCKS, "max_db_time_share": "0.0001%",
                                  "max_poll_interval": "700ms"}, "t"), connect=connect_poller, publish=lambda s: None)
    try:
        for _ in range(3):
            snap = poller.poll_once()
        assert value(snap, "pg_advisory_lock_exporter_poll_interval_seconds") == 0.7
    finally:
        poller.close()
    fixed = Poller(parse_config({"dsn": server.dsn(), "locks": LOCKS, "poll_interval": "2s"}, "t"),
                   connect=connect_poller, publish=lambda s: None)
    try:
        assert value(fixed.poll_once(), "pg_advisory_lock_exporter_poll_interval_seconds") == 2
    finally:
        fixed.close()


def test_last_taken_is_when_watching_began_until_a_new_holder_is_seen(make_poller, sessions) -> None:
    before = time.time()
    poller = make_poller({"locks": LOCKS})
    first = poller.poll_once()
    watched = value(first, "pg_advisory_lock_last_acquired_timestamp_seconds", **ids("cron"))
    assert before - 1 <= watched <= time.time() + 1  # the series exists from the first poll
    assert value(first, "pg_advisory_lock_expect_every_seconds", **ids("cron")) == 3600
    assert value(first, "pg_advisory_lock_expect_every_seconds", **ids("leader")) is None
    time.sleep(1.0)
    sessions.open(application_name="cron-run").execute("SELECT pg_advisory_lock(300)")
    taken = poller.poll_once()
    assert value(taken, "pg_advisory_lock_last_acquired_timestamp_seconds", **ids("cron")) >= watched + 1.0
    assert value(taken, "pg_advisory_lock_last_acquired_timestamp_seconds", **ids("leader")) == watched
    page = landing.render(taken, (), ReloadStatus(), "/metrics").decode()
    assert "last taken 0s ago (expected every 1h00m)" in page
