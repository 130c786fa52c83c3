"""One exporter, many servers: targets polled continuously, each served on /probe?target=."""

from __future__ import annotations

import base64
import signal
import threading
import urllib.error
import urllib.request

import bcrypt
import pytest
import yaml

from exporter.config import ConfigError, parse_config, parse_fleet
from exporter.fleet import Runtime
from exporter.poller import Poller
from exporter.probe import Prober
from exporter.snapshot import PollStats, Snapshot
from tests.conftest import OTHER_DB, needs_own_clusters, wait_until
from tests.exporter_proc import ExporterProcess
from tests.metrics_util import parse, series, up
from tests.pgcluster import Cluster

LEADER = [{"name": "leader", "key": 4242}]


def fleet_config(server, **targets) -> dict:
    return {"poll_interval": "200ms", "targets": targets or {
        "orders": {"dsn": server.dsn(), "locks": LEADER},
        "billing": {"dsn": server.dsn(OTHER_DB), "locks": LEADER, "poll_interval": "300ms"},
    }}


def probe(proc: ExporterProcess, target: str) -> tuple[int, str]:
    """(status, body) of /probe?target=; (0, "") while the exporter does not listen yet."""
    try:
        return proc.get(f"/probe?target={target}")
    except OSError:
        return 0, ""


def test_targets_config_rules() -> None:
    fleet = parse_fleet({"poll_interval": "2s", "presets": ["rails"], "targets": {
        "orders": {"dsn": "host=o dbname=orders", "locks": LEADER},
        "billing": {"dsn": "host=b dbname=billing", "poll_interval": "1s", "presets": [], "databases": ["billing"]}}}, "t")
    orders, billing = fleet.target("orders"), fleet.target("billing")
    assert (orders.poll_interval, orders.presets, orders.name) == (2.0, ("rails",), "orders")
    assert (billing.poll_interval, billing.presets, billing.databases) == (1.0, (), ("billing",))
    with pytest.raises(ConfigError) as info:
        parse_fleet({"dsn": "host=x", "poll_interval": "fast", "targets": {
            "a": {"dsn": "host=a", "locks": [{"name": "x", "key": 2**64}]}, "bad name": {}, "b": {"colour": 1}}}, "t")
    assert info.value.details == [
        "dsn: with targets, dsn belongs to each target (targets.NAME.dsn); a config has either a top-level dsn "
        "(one server) or targets",
        "poll_interval: 'fast' is not a duration: use a number and a unit (ms, s, m, h, d), e.g. 5s",
        "targets.a.locks[0].key: 18446744073709551616 is outside bigint (-9223372036854775808 .. 9223372036854775807)",
        "targets.bad name: a target name is letters, digits, '_', '.' and '-' (it goes in URLs and labels)",
        "targets.b.colour: unknown field (allowed: dsn, password_file, poolers, locks, databases, poll_interval, "
        "probe_interval, max_holder_info_per_lock, max_holder_info, max_unnamed_holder_info, max_tracked_holds, "
        "unnamed_max_hold, show_queries, max_db_time_share, min_poll_interval, max_poll_interval, presets)",
    ]


def test_each_target_is_served_on_probe_and_the_exporter_on_metrics(exporters, server, sessions) -> None:
    sessions.open(OTHER_DB, application_name="billing-leader").execute("SELECT pg_advisory_lock(4242)")
    proc = exporters(fleet_config(server))
    wait_until(lambda: up(probe(proc, "billing")[1]) == 1 and up(probe(proc, "orders")[1]) == 1, timeout=30)
    orders, billing = parse(probe(proc, "orders")[1]), parse(probe(proc, "billing")[1])
    key = ("pg_advisory_lock_holders", (("database", "postgres"), ("lock", "leader"), ("mode", "exclusive")))
    assert orders[key] == 0
    assert billing[("pg_advisory_lock_holders", (("database", OTHER_DB), ("lock", "leader"), ("mode", "exclusive")))] == 1
    # The same names as single-server mode; no process figures on /probe, no lock figures on /metrics.
    assert not any(name.startswith("process_") for name, _ in orders)
    metrics = proc.get("/metrics")[1]
    own = parse(metrics)
    assert own[("pg_advisory_lock_exporter_target_up", (("target", "orders"),))] == 1
    assert own[("pg_advisory_lock_exporter_target_poll_errors_total", (("target", "billing"),))] == 0
    assert ("pg_advisory_lock_exporter_target_poll_duration_seconds_count", (("target", "orders"),)) in own
    assert ("process_resident_memory_bytes", ()) in own
    assert not any(name in ("pg_advisory_lock_holders", "pg_advisory_lock_exporter_up") for name, _ in own)
    status, body = probe(proc, "shipping")
    assert status == 404 and "unknown target 'shipping'; known targets: billing, orders" in body
    status, page = proc.get("/")
    assert status == 200 and 'href="/?target=orders"' in page and 'href="/probe?target=billing"' in page
    status, page = proc.get("/?target=billing")
    assert status == 200 and "target billing" in page and "billing-leader" in page


def test_databases_limit_a_targets_unnamed_figures(exporters, server, sessions) -> None:
    sessions.open(OTHER_DB).execute("SELECT pg_advisory_lock(777001)")
    sessions.open().execute("SELECT pg_advisory_lock(777002)")
    proc = exporters(fleet_config(server, everything={"dsn": server.dsn()},
                                  limited={"dsn": server.dsn(), "databases": ["postgres"]}))
    wait_until(lambda: up(probe(proc, "limited")[1]) == 1 and up(probe(proc, "everything")[1]) == 1, timeout=30)
    everything, limited = parse(probe(proc, "everything")[1]), parse(probe(proc, "limited")[1])
    assert everything[("pg_advisory_lock_unnamed_holders", (("database", OTHER_DB),))] == 1
    assert ("pg_advisory_lock_unnamed_holders", (("database", OTHER_DB),)) not in limited
    assert limited[("pg_advisory_lock_unnamed_holders", (("database", "postgres"),))] == 1


@pytest.mark.slow
def test_a_hung_target_never_delays_another(exporters, server) -> None:
    needs_own_clusters()
    hung = Cluster().start()
    try:
        proc = exporters(fleet_config(server, healthy={"dsn": server.dsn(), "locks": LEADER},
                                      frozen={"dsn": hung.dsn(), "locks": LEADER}))
        wait_until(lambda: up(probe(proc, "frozen")[1]) == 1 and up(probe(proc, "healthy")[1]) == 1, timeout=30)
        hung.signal_all(signal.SIGSTOP)
        try:
            wait_until(lambda: up(probe(proc, "frozen")[1]) == 0, timeout=30)
            before = parse(probe(proc, "healthy")[1])[("pg_advisory_lock_exporter_poll_duration_seconds_count", ())]
            wait_until(lambda: parse(probe(proc, "healthy")[1])[
                ("pg_advisory_lock_exporter_poll_duration_seconds_count", ())] >= before + 5, timeout=30)
            assert up(probe(proc, "healthy")[1]) == 1
            assert parse(proc.get("/metrics")[1])[("pg_advisory_lock_exporter_target_up", (("target", "frozen"),))] == 0
        finally:
            hung.signal_all(signal.SIGCONT)
    finally:
        hung.destroy()


def test_reload_adds_removes_and_keeps_tracking_by_server(exporters, server, sessions) -> None:
    proc = exporters(fleet_config(server), "--web.enable-lifecycle")
    wait_until(lambda: up(probe(proc, "orders")[1]) == 1, timeout=30)
    holder = sessions.open()
    holder.execute("SELECT pg_advisory_lock(4242)")
    acquisitions = ("pg_advisory_lock_acquisitions_total", (("database", "postgres"), ("lock", "leader")))
    wait_until(lambda: parse(probe(proc, "orders")[1]).get(acquisitions) == 1, timeout=30)
    # orders keeps its server (new locks): tracking kept; billing goes; shipping comes.
    proc.config_path.write_text(yaml.safe_dump(fleet_config(server, orders={
        "dsn": server.dsn(), "locks": [*LEADER, {"name": "extra", "key": 5}]}, shipping={"dsn": server.dsn(OTHER_DB)})))
    request = urllib.request.Request(proc.url + "/-/reload", method="POST", data=b"")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
    wait_until(lambda: probe(proc, "billing")[0] == 404 and up(probe(proc, "shipping")[1]) == 1, timeout=30)
    wait_until(lambda: ("pg_advisory_lock_holders", (("database", "postgres"), ("lock", "extra"), ("mode", "exclusive")))
               in parse(probe(proc, "orders")[1]), timeout=30)
    assert parse(probe(proc, "orders")[1])[acquisitions] == 1  # not reset, not counted again
    assert "target billing removed" in proc.log() and "target shipping added" in proc.log()


def test_locks_command_takes_a_target(tmp_path, server, sessions) -> None:
    from tests.test_config import run_cli

    sessions.open(OTHER_DB, application_name="billing-leader").execute("SELECT pg_advisory_lock(4242)")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(fleet_config(server)))
    result = run_cli("locks", f"--config.file={path}", "--target", "billing")
    assert result.returncode == 0 and f"leader  [4242]  in {OTHER_DB}" in result.stdout.splitlines()
    missing = run_cli("locks", f"--config.file={path}")
    assert missing.returncode == 1 and "name a target (--target NAME; known: billing, orders)" in missing.stderr


def test_probe_is_protected_like_metrics(exporters, server, tmp_path) -> None:
    web = tmp_path / "web.yaml"
    web.write_text(yaml.safe_dump({"basic_auth_users": {"prometheus": bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()}}))
    proc = exporters(fleet_config(server), f"--web.config.file={web}")
    wait_until(lambda: _status(proc.url + "/probe?target=orders", {}) == 401, timeout=30)
    token = base64.b64encode(b"prometheus:s3cret").decode()
    assert _status(proc.url + "/probe?target=orders", {"Authorization": f"Basic {token}"}) == 200


def _status(url: str, headers: dict[str, str]) -> int | None:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def test_series_of_a_target_say_who(exporters, server, sessions) -> None:
    holder = sessions.open(application_name="orders-worker")
    holder.execute("SELECT pg_advisory_lock(4242)")
    proc = exporters(fleet_config(server))
    wait_until(lambda: series(probe(proc, "orders")[1], "pg_advisory_lock_holder_info"), timeout=30)
    (info,) = series(probe(proc, "orders")[1], "pg_advisory_lock_holder_info")
    assert info["application_name"] == "orders-worker"


@pytest.mark.slow
def test_a_real_prometheus_scrapes_each_target_as_an_instance(exporters, server, tmp_path) -> None:
    """The scrape config docs/fleet.md gives: the blackbox pattern, __address__ into ?target=."""
    from tests.prometheus_util import running_prometheus

    proc = exporters(fleet_config(server))
    config = {"global": {"scrape_interval": "1s"}, "scrape_configs": [
        {"job_name": "pg-advisory-lock-exporter-exporter", "static_configs": [{"targets": [f"127.0.0.1:{proc.port}"]}]},
        {"job_name": "pg-advisory-lock-exporter", "metrics_path": "/probe",
         "static_configs": [{"targets": ["orders", "billing"]}],
         "relabel_configs": [
             {"source_labels": ["__address__"], "target_label": "__param_target"},
             {"source_labels": ["__param_target"], "target_label": "instance"},
             {"target_label": "__address__", "replacement": f"127.0.0.1:{proc.port}"},
         ]},
    ]}
    with running_prometheus(tmp_path, config) as query:
        results = wait_until(lambda: len(query("pg_advisory_lock_exporter_up == 1")) == 2 and query(
            "pg_advisory_lock_exporter_up == 1"), timeout=60, interval=0.5)
        assert sorted(r["metric"]["instance"] for r in results) == ["billing", "orders"]
        # The exporter's own job is scraped on its own schedule: wait for its first scrape too.
        health = wait_until(lambda: query("pg_advisory_lock_exporter_target_up"), timeout=60, interval=0.5)
        assert {r["metric"]["target"] for r in health} == {"billing", "orders"}


def test_a_target_removed_while_its_poll_hangs_stays_off_the_fleets_metrics(monkeypatch) -> None:
    # A target is removed mostly when its server is dead, so while its poll hangs: the poll's late
    # publication (when it returns, or is given up) must not bring it back on /metrics' target_up.
    release, running, closed = threading.Event(), threading.Event(), threading.Event()

    def poll_once(self: Poller, ticket: object = None) -> Snapshot:
        running.set()
        release.wait(10)  # a hung server's poll
        return Snapshot(up=False, stats=PollStats())

    def close(self: Poller) -> None:
        if running.is_set():
            closed.set()  # the scheduler closes it after its call returned, and published

    monkeypatch.setattr(Poller, "poll_once", poll_once)
    monkeypatch.setattr(Poller, "close", close)
    monkeypatch.setattr(Poller, "deadline", lambda self: 30.0)
    runtime = Runtime(parse_fleet({"targets": {"gone": {"dsn": "host=127.0.0.1 port=1"}}}, "t"), "/metrics")
    runtime.start()
    try:
        assert running.wait(5)
        runtime.apply(parse_fleet({"targets": {"stays": {"dsn": "host=127.0.0.2 port=1"}}}, "t"))
        release.set()
        assert closed.wait(5)
        assert runtime.health is not None
        runtime.health.render_now()
        targets = {labels for (name, labels) in parse(runtime.health.body().decode())
                   if name == "pg_advisory_lock_exporter_target_up"}
        assert (("target", "gone"),) not in targets, targets
    finally:
        release.set()
        runtime.stop()


@pytest.mark.parametrize("kind", ["poller", "prober"])
def test_a_reload_between_reading_and_clearing_the_pending_config_is_not_lost(kind: str) -> None:
    # apply_pending_config reads the reload's config and clears it; a reload landing in between
    # (another SIGHUP while the call starts) must be applied at the next call, not dropped.
    first = parse_config({"dsn": "host=h", "poll_interval": "10s", "locks": [{"name": "a", "key": 1, "probe": {}}]}, "t")
    second = parse_config({"dsn": "host=h", "poll_interval": "20s", "locks": [{"name": "b", "key": 2, "probe": {}}]}, "t")
    base = Poller if kind == "poller" else Prober

    class Racing(base):  # type: ignore[valid-type, misc]
        """Another reload comes in just as apply_pending_config has read the pending config."""

        reloads: list[threading.Thread] = []

        @property
        def _pending_config(self):  # type: ignore[override]
            pending = self.__dict__.get("pending")
            if pending is not None and not self.reloads:
                reload = threading.Thread(target=self.reconfigure, args=(second,), daemon=True)
                self.reloads.append(reload)
                reload.start()
                reload.join(0.2)  # it waits for the reader, if the reader holds a lock
            return pending

        @_pending_config.setter
        def _pending_config(self, config) -> None:  # type: ignore[no-untyped-def]
            self.__dict__["pending"] = config

    racing = Racing(first, lambda *a: None, lambda *a: None)
    racing.reconfigure(first)
    racing.apply_pending_config()
    racing.reloads[0].join(5)
    racing.apply_pending_config()
    if kind == "poller":
        assert racing.interval == 20.0
    else:
        assert [lock.name for lock in racing.locks] == ["b"]
