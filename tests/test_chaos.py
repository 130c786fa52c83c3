"""The truth test's own parts: the proxy's modes on a plain echo server, each fault proving it
took effect on a real cluster, the seeded schedule, and the short run inside `make test`."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import socket
import socketserver
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from chaos import faults, run, truth
from chaos import report as run_report
from chaos.faults import Exporter, Planned, Site
from chaos.oracle import CLAUSES, Lie, Scrape, TargetSetup, Verdict
from chaos.proxy import BLACKHOLE, PASS, RESET, STALL, Proxy, wait_for
from chaos.run import World
from exporter.poolers import CONSOLE_TIMEOUT
from exporter.queries import APPLICATION_NAME
from tests import metrics_util
from tests.conftest import needs_own_clusters
from tests.pgcluster import Cluster


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        try:
            while data := self.request.recv(4096):
                self.request.sendall(data)
        except ConnectionResetError:  # the proxy's reset reaches the upstream too
            pass


@pytest.fixture
def echo() -> Iterator[tuple[str, int]]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address  # type: ignore[misc]
    server.shutdown()
    server.server_close()


@pytest.fixture
def proxy(echo: tuple[str, int]) -> Iterator[Proxy]:
    proxy = Proxy(echo).start()
    yield proxy
    proxy.close()


def _client(proxy: Proxy, timeout: float = 2.0) -> socket.socket:
    return socket.create_connection(proxy.address, timeout=timeout)


def _echoes(sock: socket.socket, data: bytes = b"ping") -> bool:
    """True when data comes back whole, False on a timeout."""
    sock.sendall(data)
    got = b""
    try:
        while len(got) < len(data):
            chunk = sock.recv(4096)
            if not chunk:
                return False
            got += chunk
    except socket.timeout:
        return False
    return got == data


def test_pass_forwards_both_ways_and_counts(proxy: Proxy) -> None:
    with _client(proxy) as sock:
        assert _echoes(sock, b"hello")
    assert wait_for(lambda: proxy.snapshot().bytes_forwarded == 10, 2)  # there and back


def test_stall_holds_bytes_and_sends_them_on_when_it_ends(proxy: Proxy) -> None:
    with _client(proxy, timeout=0.5) as sock:
        assert _echoes(sock)
        proxy.set_mode(STALL)
        assert not _echoes(sock, b"held")
        assert proxy.snapshot().bytes_held == 4
        proxy.set_mode(PASS)
        sock.settimeout(2)
        assert sock.recv(4096) == b"held"  # the same connection goes on: nothing was lost
        assert proxy.connections() == 1


def test_blackhole_reads_and_answers_nothing_then_resets_what_it_broke(proxy: Proxy) -> None:
    with _client(proxy, timeout=0.5) as before:
        assert _echoes(before)
        proxy.set_mode(BLACKHOLE)
        assert not _echoes(before, b"lost")
        with _client(proxy, timeout=0.5) as new:  # a new connection is accepted, and never answered
            assert not _echoes(new, b"void")
            assert wait_for(lambda: proxy.snapshot().bytes_dropped == 8, 2)
            proxy.set_mode(PASS)
            with pytest.raises(ConnectionResetError):
                before.sendall(b"x")
                before.recv(10)
        assert wait_for(lambda: proxy.snapshot().resets == 2, 2)
    with _client(proxy) as after:
        assert _echoes(after)


def test_a_client_that_closes_inside_a_black_hole_leaves_the_server_knowing_nothing_until_it_ends() -> None:
    ended = threading.Event()

    class Upstream(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            try:
                while self.request.recv(4096):
                    pass
            except ConnectionResetError:
                pass
            ended.set()

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Upstream)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    proxy = Proxy(server.server_address).start()  # type: ignore[arg-type]
    try:
        client = _client(proxy)
        client.sendall(b"hello")
        assert wait_for(lambda: proxy.snapshot().bytes_forwarded == 5, 2)
        proxy.set_mode(BLACKHOLE)
        client.close()  # its FIN reaches the proxy, and goes no further
        assert not ended.wait(1.0)
        proxy.set_mode(PASS)  # the black hole ends: what it broke is reset
        assert ended.wait(2.0)
    finally:
        proxy.close()
        server.shutdown()
        server.server_close()


def test_reset_sends_an_rst_to_open_and_new_connections(proxy: Proxy) -> None:
    with _client(proxy) as sock:
        assert _echoes(sock)
        proxy.set_mode(RESET)
        with pytest.raises(ConnectionResetError):
            sock.recv(10)
    # A new connection is reset as soon as it is accepted: at the first read, or (the RST
    # racing the handshake's end) already at connect.
    with pytest.raises(ConnectionResetError), _client(proxy) as sock:
        sock.recv(10)
    assert wait_for(lambda: proxy.snapshot().resets == 2, 2)
    proxy.set_mode(PASS)
    with _client(proxy) as sock:
        assert _echoes(sock)


def test_refusing_closes_the_listener_and_listens_again_on_the_same_port(proxy: Proxy) -> None:
    port = proxy.port
    proxy.refuse(True)
    with pytest.raises(ConnectionRefusedError):
        _client(proxy)
    proxy.refuse(False)
    assert proxy.port == port
    with _client(proxy) as sock:
        assert _echoes(sock)


def test_slow_delays_every_chunk(proxy: Proxy) -> None:
    proxy.slow(0.6)
    with _client(proxy, timeout=0.3) as sock:
        assert not _echoes(sock)  # not within 0.3 s: it waits 0.6 s each way
        sock.settimeout(3)
        assert sock.recv(10) == b"ping"
    assert proxy.snapshot().chunks_delayed == 2


def test_an_unknown_mode_is_refused(proxy: Proxy) -> None:
    with pytest.raises(ValueError, match="unknown proxy mode 'drop'"):
        proxy.set_mode("drop")


# -- each fault proves itself on a real server ------------------------------------------------


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    needs_own_clusters()
    cluster = Cluster(settings={"max_connections": "12"}).start()
    try:
        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE app")
            conn.execute("CREATE DATABASE jobs")
        yield Site("one", "a", cluster, "app", "jobs")
    finally:
        cluster.destroy()


def _answers(site: Site) -> bool:
    with psycopg.connect(site.direct_dsn(), autocommit=True) as conn:
        return conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize("kind", ["restart-fast", "restart-immediate"])
def test_a_restart_proves_itself_by_a_refused_connection(site: Site, kind: str) -> None:
    fault = faults.restart(site, Planned(kind, "one", duration=0.2), kind.removeprefix("restart-"))
    assert fault.proof.startswith("connection refused") and fault.blinds and fault.target == "one"
    assert fault.began.hi <= fault.ended.lo  # type: ignore[union-attr]
    assert _answers(site)


@pytest.mark.parametrize("answer", ["FATAL:  sorry, too many clients already",
                                    "FATAL:  remaining connection slots are reserved for roles with the SUPERUSER attribute"])
def test_a_full_server_proves_no_restart(monkeypatch: pytest.MonkeyPatch, answer: str) -> None:
    def full(*args: Any, **kwargs: Any) -> None:
        raise psycopg.OperationalError(f'connection to server at "127.0.0.1", port 5432 failed: {answer}')
    monkeypatch.setattr(faults.psycopg, "connect", full)
    assert faults.refused("host=127.0.0.1") == ""


def test_a_freeze_proves_itself_by_state_t_and_thaws(site: Site) -> None:
    with psycopg.connect(site.direct_dsn(), autocommit=True):  # a backend to stop too
        fault = faults.freeze(site, Planned("freeze", "one", duration=0.2))
        assert fault.proof.startswith("/proc/PID/stat state T for ")
        assert int(fault.proof.split(" for ")[1].split()[0]) >= 3  # the postmaster, its helpers, our backend
    assert all(faults.process_state(pid) != "T" for pid in site.cluster.server_pids())
    assert _answers(site)


def test_max_connections_proves_itself_by_the_refusal_ends_the_exporters_sessions_and_gives_them_back(site: Site) -> None:
    with psycopg.connect(site.direct_dsn(), autocommit=True, application_name=APPLICATION_NAME) as ours:
        pid = ours.info.backend_pid
        fault = faults.max_connections(site, Planned("max-connections", "one", duration=0.1))
        assert "too many clients" in fault.proof and fault.proof.startswith("11 connections open")
        assert f"the exporter's backends [{pid}] ended" in fault.proof
        with pytest.raises(psycopg.OperationalError):
            ours.execute("SELECT 1")
    assert _answers(site)


def test_terminating_the_exporters_backends_ends_only_them(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(faults, "PROVE_WITHIN", 0.5)  # the last try proves nothing: not 10 s for it
    with psycopg.connect(site.direct_dsn(), autocommit=True, application_name=APPLICATION_NAME) as ours, \
            psycopg.connect(site.direct_dsn(), autocommit=True, application_name="app") as theirs:
        pid = ours.info.backend_pid
        fault = faults.terminate_exporter(site, Planned("terminate-backends", "one"))
        assert fault.proof == f"pg_terminate_backend ended the exporter's backends [{pid}]"
        with pytest.raises(psycopg.OperationalError):
            ours.execute("SELECT 1")
        assert theirs.execute("SELECT 1").fetchone() == (1,)
    assert faults.terminate_exporter(site, Planned("terminate-backends", "one")).proof == ""  # nothing to end


@pytest.mark.parametrize("database", ["app", "jobs"])
def test_a_database_dropped_and_created_again_blinds_only_through_the_dsns(site: Site, database: str) -> None:
    paused = []

    class Pausing:
        @contextlib.contextmanager
        def paused(self, target: str) -> Iterator[None]:
            paused.append(target)
            yield

    fault = faults.db_recreate(site, Planned("db-recreate", "one", database, duration=0.1), Pausing())
    assert fault.proof.startswith(f"database {database} (oid ") and paused == ["one"]
    assert fault.blinds == (database == site.database)
    with psycopg.connect(site.direct_dsn(database), autocommit=True) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (database,)


def test_stopping_a_process_proves_itself_by_state_t() -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        fault = faults.exporter_stop(Exporter(sleeper.pid, "", lambda n: None), Planned("exporter-stop", "exporter", duration=0.1))
        assert fault.proof == f"/proc/PID/stat state T for 1 processes ({sleeper.pid})"
        assert fault.target == "exporter" and fault.blinds
        assert faults.process_state(sleeper.pid) in ("S", "R")
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_fault_that_cannot_take_effect_is_recorded_unproven(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(faults, "PROVE_WITHIN", 0.2)
    ended = []
    fault = faults.episode("freeze", "one", True, lambda: None, lambda: "", lambda: ended.append(1), 5.0)
    assert fault.proof == "" and ended == [1]  # ended at once, not after the 5 s it would have lasted


def test_a_console_proxy_fault_blinds_nothing(proxy: Proxy) -> None:
    with _client(proxy) as sock:
        assert _echoes(sock)
        fault = faults.proxy_fault("console-net-reset", "one", False, proxy, RESET, 0.0)
    assert fault.proof == "proxy: 1 connections reset" and not fault.blinds


# -- the schedule --------------------------------------------------------------------------------


def _world() -> World:
    """Sites as the runner builds them, with nothing behind them (the schedule only reads their shape)."""
    none: Any = None
    proxy: Any = object()
    return World(sites={
        "direct": Site("direct", "a", none, "app", "jobs", console_proxy=proxy, bouncers={"tx": none, "session": none}),
        "proxied": Site("proxied", "b", none, "app", "jobs", dsn_proxy=proxy),
        "pooled": Site("pooled", "c", none, "app", "jobs", bouncers={"pooled-tx": none}),
    })


def test_the_same_seed_gives_the_same_schedule_and_another_seed_another() -> None:
    world = _world()
    assert run.schedule(5, world, 1800, short=False) == run.schedule(5, world, 1800, short=False)
    assert run.schedule(5, world, 1800, short=False) != run.schedule(6, world, 1800, short=False)
    assert run.schedule(5, world, 120, short=True) == run.schedule(5, world, 120, short=True)


def test_the_short_schedule_has_every_kind_once() -> None:
    plan = run.schedule(3, _world(), 120, short=True)
    assert sorted(p.kind for p in plan) == sorted(faults.KINDS)
    assert sum(p.duration + p.gap for p in plan) < 90  # room in 120 s for restarts and recoveries


def test_the_long_schedule_has_every_kind_at_every_place_twice_in_30_minutes() -> None:
    world = _world()
    plan = run.schedule(3, world, 1800, short=False)
    seen = Counter((p.kind, p.target, p.detail) for p in plan)
    places = {(kind, target, detail) for kind, where in run.choices(world).items() for target, detail in where}
    assert len(plan) >= 100 and set(seen) == places and min(seen.values()) >= 2
    assert {target for _, target, _ in places} == {"direct", "proxied", "pooled", "exporter"}
    assert {"net-stall", "net-blackhole", "net-reset"} == {k for k, t, _ in places if t == "proxied" and k.startswith("net-")}


def test_stale_after_is_the_interval_the_turn_and_twice_the_deadline() -> None:
    # A fixed 500ms interval, so a 0.5 s timeout: the turn is P, the deadline P + 4t = 2.5 s, and
    # with one console of one address CONSOLE_TIMEOUT for its name and its address more.
    assert run.stale_after(0.5, []) == 0.5 + 0.5 + 2 * 2.5
    assert run.stale_after(0.5, [1]) == 0.5 + 0.5 + 2 * (2.5 + 2 * CONSOLE_TIMEOUT) == 14.0
    # The exporter is stopped for longer than that, so rule 5 judges the first answer after SIGCONT.
    assert run.EXPORTER_STOP_SECONDS > 14.0


def test_named_locks_match_the_keys_pg_locks_shows() -> None:
    lock, family = run.named_locks("app")[0], run.named_locks("app")[-1]
    assert lock.matches((0, run.NAMED_KEYS[0], 1)) and not lock.matches((0, run.NAMED_KEYS[0], 2))
    assert family.family and family.matches((run.FAMILY_CLASSID, 12, 2)) and not family.matches((run.FAMILY_CLASSID, 12, 1))
    assert run._bigint(-1) == (0xFFFFFFFF, 0xFFFFFFFF, 1)


# -- the short run -------------------------------------------------------------------------------


def _others_stayed_up(result: run.Result) -> list[str]:
    """Scrapes of a target that no fault of its own could excuse and that did not say up 1, during
    a fault of another target: topology (d)'s promise, checked without the oracle."""
    wrong = []
    for fault in result.faults:
        if fault.target == "exporter":
            continue
        lo, hi = fault.began.lo, (fault.ended or fault.began).hi + 2
        for scrape in result.scrapes:
            if scrape.target != fault.target and lo <= scrape.sent and scrape.received <= hi \
                    and (not scrape.text or metrics_util.up(scrape.text) != 1):
                wrong.append(f"{scrape.target} at {scrape.received:.3f} during {fault.kind} of {fault.target}")
    return wrong


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_the_short_run_finds_no_lie(tmp_path: Path) -> None:
    """make test's truth test: fixed seed, poll_interval 500ms, every fault kind once, at most 120 s
    of faults after set-up; no lie, no unexplained blind time, every rule made checks, every fault
    proved itself."""
    needs_own_clusters()
    options = run.Options(seconds=120, seed=27, out=tmp_path, short=True, settle=5, hold_seconds=(0.05, 8.0))
    result = run.run(options)
    report = run_report.write_report(result)
    verdict = result.verdict
    assert verdict.lies == [], report
    assert verdict.unexplained_blind == [], report
    assert all(verdict.checks.get(rule, 0) > 0 for rule in range(1, 9)), verdict.checks
    assert not result.unproven, [f.kind for f in result.unproven]
    assert sorted(f.kind for f in result.faults) == sorted(faults.KINDS)
    assert result.faults[-1].ended.hi - result.faults[0].began.lo < 120  # type: ignore[union-attr]
    assert {s.target for s in result.scrapes} == {"direct", "proxied", "pooled"}
    assert _others_stayed_up(result) == []
    assert result.ok
    assert report.startswith("# Truth test: **passed**") and "Seed **27**" in report
    if importlib.util.find_spec("matplotlib"):  # the bench extra; make chaos installs it
        assert (tmp_path / "timeline.png").stat().st_size > 10_000
    again = run.rejudge(tmp_path)  # the saved run judged again, as it was
    assert (again.scrapes, again.faults, again.verdict, again.plan) == (result.scrapes, result.faults, result.verdict, result.plan)
    assert again.setups["direct"].stale_after == 14.0
    assert run_report.write_report(again) == report


# -- the report ----------------------------------------------------------------------------------


def _result(tmp_path: Path, lies: list[Any], faults_: list[truth.Fault], short: bool = False) -> run.Result:
    text = ('pg_advisory_lock_exporter_up 1\n'
            'pg_advisory_lock_holders{lock="lock-1001",database="app",mode="exclusive"} 1\n')
    scrapes = [Scrape("direct", 100.0 + i, 100.01 + i, text) for i in range(5)] + [Scrape("proxied", 101.0, 103.0, "")]
    hold = truth.Hold("direct", "app", (0, 1001, 1), truth.EXCLUSIVE, truth.Holder(42, 1.0), truth.Span(99.0, 99.1))
    verdict = Verdict(checks={rule: 3 for rule in range(1, 9)}, clauses=dict.fromkeys(CLAUSES, 3), lies=lies, blind={"freeze": [1.0, 3.0]},
                      recovery={"freeze": [0.4, 0.6, 0.9]})
    setups = {name: TargetSetup(name, run.named_locks("app"), run.DATABASES, stale_after=7.5) for name in ("direct", "proxied")}
    plan = [Planned("freeze", "direct"), Planned("exporter-stop", "exporter")]
    return run.Result(run.Options(seed=9, out=tmp_path, short=short), plan, faults_, scrapes, verdict,
                      truth.Truth(holds=[hold]), setups, [{"at": 100.0, "rss_mb": 40.0, "threads": 20, "sockets": 5}],
                      100.0, {"direct": "a", "proxied": "b"})


def test_the_report_names_each_lie_with_its_scrape_the_truth_and_the_seed(tmp_path: Path) -> None:
    fault = truth.Fault("freeze", "direct", truth.Span(100.5, 100.6), truth.Span(102.0, 102.1), True, "state T")
    lie = Lie(1, "direct", 102.01, 'holders{lock="lock-1001"} served 1, truth [0, 0]')
    result = _result(tmp_path, [lie], [fault, fault])
    text = run_report.write_report(result)
    assert not result.ok and text.startswith("# Truth test: **failed**")
    assert "- rule 1, target direct, scrape at 102.010 (seed 9): holders" in text
    saved = (tmp_path / "lies" / "lie-1-rule-1.txt").read_text()
    assert "pg_advisory_lock_holders" in saved and "(0, 1001, 1) exclusive pid=42" in saved
    assert "| freeze | 2 | 0 | 0 | 0 | 2.00 | 3.00 | 0.60 | 0.90 |" in text
    # Two faults, not 100; exporter-stop was planned for (d) and never played.
    assert "at least 100 faults: 2, not met" in text and "not met: exporter-stop in (d): 0" in text
    assert "Scrapes: 6 (1 failed or timed out)" in text


def test_the_reports_replay_line_gives_every_option_that_shapes_the_schedule(tmp_path: Path) -> None:
    result = _result(tmp_path, [], [], short=True)
    assert "`python -m chaos --seconds 1800 --seed 9 --short` replays" in run_report.write_report(result)
    result.options = dataclasses.replace(result.options, poll_interval=0.25)
    assert "`python -m chaos --seconds 1800 --seed 9 --short --poll-interval 0.25` replays" in run_report.write_report(result)


def test_a_fault_that_did_not_prove_itself_fails_the_run(tmp_path: Path) -> None:
    proven = truth.Fault("freeze", "direct", truth.Span(100.5, 100.6), truth.Span(102.0, 102.1), True, "state T")
    unproven = truth.Fault("net-reset", "proxied", truth.Span(103.0, 103.0), truth.Span(103.0, 103.0), True, "")
    assert _result(tmp_path, [], [proven], short=True).ok
    result = _result(tmp_path, [], [proven, unproven], short=True)
    assert not result.ok
    assert "- NOT PROVEN: net-reset on proxied at 103.000" in run_report.write_report(result)


def test_true_holders_counts_only_holds_surely_held() -> None:
    holder = truth.Holder(1)
    holds = [truth.Hold("t", "app", (0, 1, 1), truth.EXCLUSIVE, holder, truth.Span(1.0, 2.0), truth.Span(5.0, 6.0)),
             truth.Hold("t", "app", (0, 1, 1), truth.SHARED, holder, truth.Span(3.0, 3.5))]
    # Inside a grant's or a release's span the hold is not surely held.
    assert run_report._true_holders(holds, [0.5, 1.5, 2.0, 3.2, 4.0, 5.0, 7.0]) == [0, 0, 1, 1, 2, 1, 1]
    # A lock call whose answer a fault lost: granted and released within the same span, never surely held.
    lost = truth.Hold("t", "app", (0, 1, 1), truth.EXCLUSIVE, holder, truth.Span(1.0, 3.0), truth.Span(1.0, 3.0))
    assert run_report._true_holders([lost], [0.5, 2.0, 4.0]) == [0, 0, 0]


def test_the_report_shows_ten_lies_of_a_rule_and_keeps_them_all_in_lies_txt(tmp_path: Path) -> None:
    fault = truth.Fault("freeze", "direct", truth.Span(100.5, 100.6), truth.Span(102.0, 102.1), True, "state T")
    lies = [Lie(1, "direct", 100.01 + i, f"lie {i}") for i in range(5)] * 3 + [Lie(7, "direct", 100.01, "counter")]
    text = run_report.write_report(_result(tmp_path, lies, [fault]))
    assert text.count("- rule 1, ") == 10 and text.count("- rule 7, ") == 1
    assert "- and more (all 16 in lies.txt): 5 of rule 1" in text
    assert len((tmp_path / "lies.txt").read_text().splitlines()) == 16
    assert len(list((tmp_path / "lies").iterdir())) == 11
