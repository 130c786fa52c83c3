"""Core behaviour on every supported major, 13 to 18, with real server binaries of each."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from exporter.config import parse_config
from exporter.poller import Poller, connect_poller
from tests.conftest import needs_own_clusters, wait_until
from tests.metrics_util import series, value
from exporter.metrics import render
from tests.pgcluster import Cluster
from tests.pgversions import VERSIONS, FetchError, binaries
from tests.test_prepared import check_prepared_transactions_are_holders

pytestmark = pytest.mark.versions

LOCKS = [
    {"name": "min", "key": -(2**63)},
    {"name": "max", "key": 2**63 - 1},
    {"name": "neg", "key": -4242},
    {"name": "pair", "key": [-42, 7]},
    {"name": "digest", "key": {"hashtext": "hourly-digest"}},
    {"name": "export", "key": {"hashtextextended": "nightly-export"}},
]
TAKE = (
    "SELECT pg_advisory_lock(-9223372036854775808), pg_advisory_lock(9223372036854775807), "
    "pg_advisory_lock_shared(-4242), pg_advisory_lock(hashtext('hourly-digest')), "
    "pg_advisory_lock(hashtextextended('nightly-export', 0)), pg_advisory_lock(5)"
)


@pytest.fixture(scope="module", params=sorted(VERSIONS), ids=lambda m: f"pg{m}")
def versioned(request):
    needs_own_clusters()
    try:
        bindir, libdir = binaries(request.param)
    except FetchError as exc:
        pytest.fail(f"PostgreSQL {request.param}: {exc}")
    cluster = Cluster(bindir=bindir, lib_dir=libdir, settings={"max_prepared_transactions": "10"}).start()
    yield request.param, cluster
    cluster.destroy()


def test_core_behaviour(versioned) -> None:
    major, cluster = versioned
    dsn = cluster.dsn()
    config = parse_config({"dsn": dsn, "poll_interval": "1s", "locks": LOCKS}, "t")
    poller = Poller(config, connect=connect_poller, publish=lambda s: None)
    with psycopg.connect(dsn, autocommit=True, application_name="holder") as holder, \
            psycopg.connect(dsn, autocommit=True, application_name="sharer") as sharer, \
            psycopg.connect(dsn, autocommit=True, application_name="owner") as owner, \
            psycopg.connect(dsn, autocommit=True, application_name="waiter") as waiter:
        holder.execute(TAKE)
        sharer.execute("SELECT pg_advisory_lock_shared(-4242)")
        owner.execute("SELECT pg_advisory_lock(-42, 7)")
        blocked = threading.Thread(target=lambda: waiter.execute("SELECT pg_advisory_lock(-42, 7)"), daemon=True)
        blocked.start()
        wait_until(lambda: holder.execute("SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()[0] == 1)
        time.sleep(1.1)
        snap = poller.poll_once()
        assert snap.up, major
        assert poller.server.version_num // 10000 == major
        for name in ("min", "max", "digest", "export"):
            assert value(snap, "pg_advisory_lock_holders", lock=name, database="postgres", mode="exclusive") == 1, name
        assert value(snap, "pg_advisory_lock_holders", lock="neg", database="postgres", mode="shared") == 2
        assert value(snap, "pg_advisory_lock_holders", lock="pair", database="postgres", mode="exclusive") == 1
        assert value(snap, "pg_advisory_lock_waiters", lock="pair", database="postgres") == 1
        # Wait age: waitstart on 14+, the waiter's query_start on 13; both >= the 1.1 s slept.
        assert 1.0 <= value(snap, "pg_advisory_lock_wait_seconds", lock="pair", database="postgres") < 30
        # Hold age: idle holders prove their hold since their last state change.
        assert 1.0 <= value(snap, "pg_advisory_lock_held_seconds", lock="min", database="postgres") < 30
        assert value(snap, "pg_advisory_lock_unnamed_holders", database="postgres") == 1
        holders = {(h["lock"], h["application_name"]) for h in series(render(snap).decode(), "pg_advisory_lock_holder_info")}
        assert ("pair", "owner") in holders and ("neg", "sharer") in holders
        owner.execute("SELECT pg_advisory_unlock(-42, 7)")
        blocked.join(5)
        snap = poller.poll_once()
        assert value(snap, "pg_advisory_lock_acquisitions_total", lock="pair", database="postgres") == 1
        assert value(snap, "pg_advisory_lock_waiters", lock="pair", database="postgres") == 0
    poller.close()


def test_prepared_transactions_are_holders_on_every_major(versioned) -> None:
    check_prepared_transactions_are_holders(versioned[1].dsn())
