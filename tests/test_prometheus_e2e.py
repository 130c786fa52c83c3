"""End to end: a real Prometheus scrapes running exporters, evaluates every alert rule the chart
ships, and answers every dashboard panel's query, each from a real situation on a real cluster.

The rules run from a copy whose `for:` durations and thresholds are shortened to seconds (the
expressions otherwise unchanged), so the whole test takes about a minute; promtool's unit tests
(alerts/tests.yml) keep covering the shipped durations.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import threading
import urllib.parse
import urllib.request
from pathlib import Path

import psycopg
import pytest
import yaml

from tests.conftest import needs_own_clusters, wait_until
from tests.exporter_proc import ExporterProcess
from tests.pgbouncer import PgBouncer
from tests.pgcluster import Cluster, free_port
from tests.test_deploy import DASHBOARD, RULES, concrete

JOB = "kubernetes-pods"  # no rule needs a job's name: these are named as a user's may be
ALERTS = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}


def api(port: int, path: str, **params: str) -> dict:
    url = f"http://127.0.0.1:{port}/api/v1/{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())["data"]


def shortened_rules(path: Path) -> None:
    """The shipped rules with every `for:` at 1s, range windows and the 5-minute wait at seconds."""
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "1s"
            rule["expr"] = re.sub(r"\[10m\]", "[10s]", rule["expr"]).replace(">= 300", ">= 1").replace(", 120)", ", 1)")
    path.write_text(yaml.safe_dump(rules))


def firing(port: int) -> dict[str, list[dict]]:
    alerts: dict[str, list[dict]] = {}
    for alert in api(port, "alerts")["alerts"]:
        if alert["state"] == "firing":
            alerts.setdefault(alert["labels"]["alertname"], []).append(alert)
    return alerts


def panel_queries() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in board["panels"] for t in p.get("targets", [])]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_every_alert_fires_from_a_real_situation_and_resolves_and_every_panel_has_data(server, sessions, tmp_path) -> None:
    needs_own_clusters()
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus not found: `make tools` unpacks Debian's prometheus into the project's cache (tools/fetch.py)")
    cluster = server.require_cluster()
    bouncer = PgBouncer(cluster.port, pool_mode="transaction", pool_size=1).start()
    # A pooler whose console nobody answers until the end: PoolerConsoleDown, then resolved.
    late_bouncer = PgBouncer(cluster.port, pool_mode="session", port=free_port())
    down_db = Cluster().start()  # a server that hangs once polled: PollsFailing and Stale
    gone_port = free_port()  # an exporter that answers, then stops: ExporterDown
    cron_stop = threading.Event()
    started: list[ExporterProcess] = []
    prometheus = None
    try:
        main_config = {
            "dsn": server.dsn(), "poll_interval": "300ms", "probe_interval": "300ms", "unnamed_max_hold": "1s",
            "poolers": [{"name": "pgb", "type": "pgbouncer", "dsn": bouncer.console_dsn()},
                        {"name": "pgb-late", "type": "pgbouncer", "dsn": late_bouncer.console_dsn()}],
            "locks": [
                {"name": "leader", "key": 4242, "max_hold": "1s"},
                {"name": "shard-7", "key": [42, 7]},
                {"name": "must-be-held", "key": 5555, "probe": {"expect": "held"}},
                {"name": "ghost", "key": 6666, "database": "not_yet_db", "probe": {"expect": "any"}},
                {"name": "tenants", "key": {"namespace": 77}, "max_hold": "1h"},
                {"name": "migrations", "key": 777},
                {"name": "deploy", "key": 8888},
                {"name": "cron", "key": 5151, "expect_every": "3s"},  # nobody takes it: NotTaken
            ],
        }
        (tmp_path / "main").mkdir()
        (tmp_path / "down").mkdir()
        main = ExporterProcess(tmp_path / "main", main_config)
        started.append(main)
        down = ExporterProcess(tmp_path / "down", {"dsn": down_db.dsn(), "poll_interval": "300ms", "locks": []})
        started.append(down)
        down.metrics_when(lambda text: "pg_advisory_lock_exporter_last_poll_timestamp_seconds " in text)
        # A probe over the cluster's Unix socket: nothing proves it reaches PostgreSQL itself (ProbeUntrusted).
        socket_config = {"dsn": f"host={cluster.root} port={cluster.port} dbname=postgres user=postgres",
                         "poll_interval": "300ms", "probe_interval": "300ms",
                         "locks": [{"name": "via-socket", "key": 3131, "probe": {"expect": "any"}}]}
        (tmp_path / "socket").mkdir()
        untrusted = ExporterProcess(tmp_path / "socket", socket_config)
        started.append(untrusted)
        down_db.signal_all(signal.SIGSTOP)  # hung after a good poll: no poll finishes from now on
        (tmp_path / "gone").mkdir()
        gone = ExporterProcess(tmp_path / "gone", {"dsn": server.dsn(), "poll_interval": "300ms", "locks": []},
                               port=gone_port)
        started.append(gone)
        # Shard 0 of 2 runs, shard 1 not yet: ShardMissing (billing is shard 0's, orders shard 1's).
        shards_config = {"poll_interval": "300ms", "targets": {"billing": {"dsn": server.dsn()}, "orders": {"dsn": server.dsn()}}}
        shard_ports = [free_port(), free_port()]
        (tmp_path / "shard-0").mkdir()
        shards = [ExporterProcess(tmp_path / "shard-0", shards_config, "--shard=0", "--total-shards=2",
                                  port=shard_ports[0])]
        started.extend(shards)

        # The situations, on a real cluster.
        holder = sessions.open(application_name="stuck-worker")
        holder.execute("SELECT pg_advisory_lock(4242), pg_advisory_lock(42, 7), pg_advisory_lock(77, 1), "
                       "pg_advisory_lock(999001)")
        waiter = sessions.open(application_name="shard-7-waiter")
        waiting = threading.Thread(target=lambda: waiter.execute("SELECT pg_advisory_lock(42, 7)"), daemon=True)
        waiting.start()
        # A deploy's migration holds its lock and waits for a table a report reads; a pod waits for the lock.
        sessions.open().execute("DROP TABLE IF EXISTS e2e_users; CREATE TABLE e2e_users (id int)")
        report = sessions.open(autocommit=False, application_name="report-runner")
        report.execute("SELECT * FROM e2e_users")
        deploy = sessions.open(autocommit=False, application_name="migrate")
        deploy.execute("SELECT pg_advisory_lock(8888)")
        pod = sessions.open(application_name="pod-2")
        blocked = [threading.Thread(target=deploy.execute, args=("LOCK TABLE e2e_users",), daemon=True),
                   threading.Thread(target=pod.execute, args=("SELECT pg_advisory_lock(8888)",), daemon=True)]
        for thread in blocked:
            thread.start()
        with psycopg.connect(bouncer.dsn(application_name="migrator"), autocommit=True, prepare_threshold=None) as migrator:
            migrator.execute("SELECT pg_advisory_lock(777)")  # stranded on the pool's only server connection

        def cron() -> None:
            with psycopg.connect(server.dsn(), autocommit=True, application_name="cron") as conn:
                while not cron_stop.is_set():
                    conn.execute("SELECT pg_advisory_lock(5151)")
                    cron_stop.wait(1.0)
                    conn.execute("SELECT pg_advisory_unlock(5151)")
                    cron_stop.wait(0.5)

        cron_runs = threading.Thread(target=cron, daemon=True)
        port = free_port()
        rules = tmp_path / "rules.yml"
        shortened_rules(rules)
        prometheus_config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [
                {"job_name": JOB, "static_configs": [{"targets": [f"127.0.0.1:{main.port}"]}]},
                {"job_name": f"{JOB}-down-db", "static_configs": [{"targets": [f"127.0.0.1:{down.port}"]}]},
                {"job_name": f"{JOB}-gone", "static_configs": [{"targets": [f"127.0.0.1:{gone_port}"]}]},
                {"job_name": f"{JOB}-socket", "static_configs": [{"targets": [f"127.0.0.1:{untrusted.port}"]}]},
                {"job_name": f"{JOB}-shards", "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in shard_ports]}]},
            ],
        }
        config_path = tmp_path / "prometheus.yml"
        # First no exporter is scraped at all: absent fires. (Reloads here only add jobs: this
        # Prometheus keeps scraping a job a reload removes.)
        unrelated = [{"job_name": "unrelated", "static_configs": [{"targets": [f"127.0.0.1:{free_port()}"]}]}]
        config_path.write_text(yaml.safe_dump({**prometheus_config, "scrape_configs": unrelated}))
        log = open(tmp_path / "prometheus.log", "wb")
        prometheus = subprocess.Popen(
            [binary, f"--config.file={config_path}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle"],
            stdout=log, stderr=subprocess.STDOUT,
        )

        # (ShardMissing does not: no shard has ever reported, so none is missed; absent says it all.)
        wait_until(lambda: _safe(lambda: "PgAdvisoryLockExporterAbsent" in firing(port)), timeout=60, interval=0.5)
        assert "PgAdvisoryLockExporterShardMissing" not in firing(port)
        config_path.write_text(yaml.safe_dump(prometheus_config))
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/-/reload", method="POST"), timeout=10)
        # The gone exporter answers as one (its build_info), then stops: Prometheus knows it by that alone.
        wait_until(lambda: _safe(lambda: api(port, "query", query=f'pg_advisory_lock_exporter_build_info{{instance="127.0.0.1:{gone_port}"}}')["result"]),
                   timeout=30, interval=0.5)
        gone.stop()

        # Every rule but "absent" fires, each from its situation; absent resolves.
        everything_but_absent = ALERTS - {"PgAdvisoryLockExporterAbsent"}
        seen: dict[str, list[dict]] = {}

        def all_firing() -> dict[str, list[dict]] | None:
            seen.clear()
            seen.update(_safe(lambda: firing(port)) or {})
            return dict(seen) if everything_but_absent <= set(seen) else None

        try:
            alerts = wait_until(all_firing, timeout=90, interval=0.5)
        except AssertionError:
            raise AssertionError(f"not firing: {sorted(everything_but_absent - set(seen))}; main log: {main.log()[-3000:]}")
        held = alerts["PgAdvisoryLockHeldTooLong"][0]
        assert held["labels"]["lock"] == "leader" and "stuck-worker" in held["annotations"]["description"]
        assert "key 999001" in alerts["PgAdvisoryLockUnnamedHeldTooLong"][0]["annotations"]["description"]
        stranded = alerts["PgAdvisoryLockStrandedOnTransactionPool"][0]
        assert stranded["labels"]["lock"] == "migrations" and "pooler pgb" in stranded["annotations"]["description"]
        assert "free: nobody holds it" in alerts["PgAdvisoryLockProbeExpectationFailed"][0]["annotations"]["description"]
        assert alerts["PgAdvisoryLockProbeErrors"][0]["labels"]["lock"] == "ghost"
        assert alerts["PgAdvisoryLockProbeUntrusted"][0]["labels"]["lock"] == "via-socket"
        assert alerts["PgAdvisoryLockWaitersPilingUp"][0]["labels"]["lock"] in ("shard-7", "deploy")
        assert alerts["PgAdvisoryLockNotTaken"][0]["labels"]["lock"] == "cron"
        assert alerts["PgAdvisoryLockPoolerConsoleDown"][0]["labels"]["pooler"] == "pgb-late"
        # The blocked holder, and only it: not the pod that waits for its lock, nor the holders of others.
        (blocked_alert,) = alerts["PgAdvisoryLockHolderBlocked"]
        assert {k: blocked_alert["labels"][k] for k in ("lock", "pid", "application_name")} == \
            {"lock": "deploy", "pid": str(deploy.info.backend_pid), "application_name": "migrate"}
        assert blocked_alert["annotations"]["summary"].startswith(f"pid {deploy.info.backend_pid} (migrate) holds advisory lock deploy")
        (down_alert,) = alerts["PgAdvisoryLockExporterDown"]
        assert down_alert["labels"]["instance"] == f"127.0.0.1:{gone_port}"
        assert [a["labels"]["job"] for a in alerts["PgAdvisoryLockExporterShardMissing"]] == [f"{JOB}-shards"]

        # Every dashboard panel answers while the situations are on.
        empty = []
        for title, expr in panel_queries():
            query = concrete(expr).replace("[1m]", "[10s]")
            if not _safe(lambda q=query: api(port, "query", query=q)["result"]):
                empty.append((title, query))
        assert not empty, empty

        # Each situation ends, and its alert resolves.
        holder.execute("SELECT pg_advisory_unlock_all()")  # leader, unnamed; the waiter gets shard-7 and goes on
        cron_runs.start()  # the cron runs again: taken for 1 s every 1.5 s
        report.rollback()  # the migration gets its table and lets go; the pod gets the lock and lets go
        blocked[0].join(10)
        deploy.rollback()
        deploy.execute("SELECT pg_advisory_unlock_all()")
        deploy.commit()
        blocked[1].join(10)
        pod.execute("SELECT pg_advisory_unlock_all()")
        waiting.join(10)
        waiter.execute("SELECT pg_advisory_unlock_all()")
        sessions.open(application_name="leader").execute("SELECT pg_advisory_lock(5555)")  # now held, as expected
        with psycopg.connect(server.dsn(), autocommit=True) as admin:
            admin.execute("CREATE DATABASE not_yet_db")  # the ghost's probe can connect now
        with psycopg.connect(bouncer.dsn(), autocommit=True, prepare_threshold=None) as cleanup:
            cleanup.execute("SELECT pg_advisory_unlock_all()")  # the same (only) server connection
        down_db.signal_all(signal.SIGCONT)
        late_bouncer.start()  # its console answers now
        untrusted.config_path.write_text(yaml.safe_dump({**socket_config, "dsn": server.dsn()}))
        untrusted.proc.send_signal(signal.SIGHUP)  # over TCP to PostgreSQL itself: trusted again
        started.append(ExporterProcess(tmp_path / "gone", {"dsn": server.dsn(), "poll_interval": "300ms", "locks": []},
                                       port=gone_port))
        (tmp_path / "shard-1").mkdir()  # the missing shard comes
        shards.append(ExporterProcess(tmp_path / "shard-1", shards_config, "--shard=1", "--total-shards=2",
                                      port=shard_ports[1]))
        started.append(shards[-1])

        def all_resolved() -> bool:
            seen.clear()
            seen.update(_safe(lambda: firing(port)) or {"(prometheus did not answer)": []})
            return not (everything_but_absent & set(seen))

        try:
            wait_until(all_resolved, timeout=90, interval=0.5)
        except AssertionError:
            raise AssertionError(f"still firing: {sorted(set(seen))}; main log: {main.log()[-3000:]}")
        assert "PgAdvisoryLockExporterAbsent" not in seen

        # Every shard of the job goes while the other exporters report: ShardMissing's other arm,
        # for that job, value 0 (a global absent() would stay quiet here).
        for shard in shards:
            shard.stop()
        gone_all = wait_until(lambda: _safe(lambda: firing(port).get("PgAdvisoryLockExporterShardMissing")),
                              timeout=60, interval=0.5)
        assert [(a["labels"]["job"], float(a["value"])) for a in gone_all] == [(f"{JOB}-shards", 0.0)]
        assert gone_all[0]["annotations"]["summary"] == f"pg-advisory-lock-exporter: no shard of job {JOB}-shards reports"

    finally:
        cron_stop.set()
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(10)
        for proc in started:
            proc.stop()
        bouncer.stop()
        late_bouncer.stop()
        down_db.destroy()
        with psycopg.connect(server.dsn(), autocommit=True) as admin:
            admin.execute("DROP DATABASE IF EXISTS not_yet_db")


def _safe(check):
    try:
        return check()
    except OSError:
        return None
