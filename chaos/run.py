"""The truth test's runner: `python -m chaos --seconds 1800 --seed N --out DIR` (or `make chaos`,
CHAOS_SECONDS=... to change its 30 minutes).

What it sets up, all on loopback and thrown away at the end: three PostgreSQL clusters; before the
first, a PgBouncer in transaction mode and one in session mode, the transaction one's console
behind the harness's TCP proxy; before the second, the proxy; before the third, a PgBouncer in
transaction mode. One exporter process in `targets:` mode watches the three at once, each in one
topology of issue 27:

- `direct` (a): the dsn straight to the server (proven direct), a pooler console configured,
  reached through the console proxy;
- `proxied` (b): the dsn through the TCP proxy (network stalls, black holes, resets);
- `pooled` (c): the dsn through the transaction pool, with that pool's console;
- and (d), `targets:` over three servers: every fault hits one server at a time (or the exporter
  process itself), and the targets it did not hit must not notice (no blind time).

The workload (chaos/workload.py) takes and releases advisory locks on every target, directly and
through both pools, recording the server's truth; a scraper asks `/probe?target=NAME` of every
target about every 200 ms; the faults (chaos/faults.py) follow a schedule drawn from
random.Random(seed) (the seed is printed; the same seed gives the same schedule), one at a time.
At the end the oracle (chaos/oracle.py) holds every scrape against the truth, and the report
(OUT/report.md, printed, and OUT/timeline.png) says what it found.

What a passing run proves: over every fault kind, the exporter never said something false while it
said it was up (no lie by any rule of README's "What the exporter promises"), it said "don't know"
only while a fault that could blind that target lasted and within the recovery bound after it,
every rule made real checks, and every fault proved it took effect. The exit status is 1 otherwise.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib
import json
import os
import random
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg
import yaml
from psycopg.rows import namedtuple_row

from chaos import faults, oracle, truth
from chaos.faults import Exporter, FaultRecorder, Injector, Planned, Site
from chaos.oracle import NamedLock, Scrape, TargetSetup
from chaos.proxy import Proxy
from exporter.poolers import CONSOLE_TIMEOUT
from exporter.queries import APPLICATION_NAME
from tests.exporter_proc import ExporterProcess
from tests.metrics_util import parse
from tests.pgbouncer import PgBouncer
from tests.pgcluster import Cluster

DATABASES = ("app", "jobs")  # every server's watched databases; the dsn's is the first
NAMED_KEYS = (1001, 1002, 1003, 1004)
PROBED_KEY = 1004  # probed with expect: free (the workload takes it too: probe_ok must then say 0)
FAMILY_CLASSID = 77  # the family: every (77, n) int4-pair key
UNNAMED_KEYS = (5001, 5002, 5003, 5004, 5005)
RELOAD_KEY_BASE = 9000  # the reloads' own lock: key 9000 + n, a key nobody takes
SCRAPE_EVERY = 0.2
SCRAPE_TIMEOUT = 2.0
# The exporter connects as a role of its own with pg_monitor, as the README asks: through a pool
# that is a pool of its own (PgBouncer pools per database and user), so workers waiting for locks
# on every server connection of theirs cannot starve its polls (the first 30-minute run: 20 s of
# blindness on the pooled target with no fault to explain it).
EXPORTER_USER = "exporter"
CREATE_EXPORTER_ROLE = f"CREATE ROLE {EXPORTER_USER} LOGIN IN ROLE pg_monitor"
CLUSTER_SETTINGS = {"max_connections": "100", "max_prepared_transactions": "20"}
# After a failed server login (the server restarting, its database dropped) PgBouncer waits
# server_login_retry (default 15 s) before it tries again, answering every client with an error
# meanwhile: no exporter behind it could recover within rule 8's bound. The harness's pools retry
# after half a second, so what is measured is the exporter's recovery, not the pooler's wait.
# A client queued for a server connection waits query_wait_timeout (default 120 s): a worker's
# statement queued so across a pause request kept db-recreate from pausing the workload within its
# 30 s (the 30-minute run of seed 2028); 10 s makes such a wait an error the worker records.
BOUNCER_SETTINGS = {"server_login_retry": "0.5", "query_wait_timeout": "10"}


@dataclass
class Options:
    seconds: float = 1800.0
    seed: int = 1
    out: Path = Path("chaos-out")
    poll_interval: float = 0.5
    short: bool = False  # the short run of make test: every kind once, short faults
    hold_seconds: tuple[float, float] = (0.05, 120.0)  # from 50 ms to minutes (the short run: seconds)
    workers: int = 6
    settle: float = 90.0  # seconds after the last fault for threads and connections to come back


# -- the world: servers, poolers, proxies ------------------------------------------------------


@dataclass
class World:
    sites: dict[str, Site] = field(default_factory=dict)
    clusters: list[Cluster] = field(default_factory=list)
    bouncers: list[PgBouncer] = field(default_factory=list)
    proxies: list[Proxy] = field(default_factory=list)

    def close(self) -> None:
        for proxy in self.proxies:
            proxy.close()
        for bouncer in self.bouncers:
            bouncer.stop()
        for cluster in self.clusters:
            cluster.destroy()


def _cluster(world: World) -> Cluster:
    cluster = Cluster(settings=dict(CLUSTER_SETTINGS)).start()
    world.clusters.append(cluster)
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        for database in DATABASES:
            conn.execute(f'CREATE DATABASE "{database}"')
        conn.execute(CREATE_EXPORTER_ROLE)
    return cluster


def _bouncer(world: World, cluster: Cluster, mode: str, size: int) -> PgBouncer:
    bouncer = PgBouncer(cluster.port, pool_mode=mode, pool_size=size, extra=dict(BOUNCER_SETTINGS)).start()
    world.bouncers.append(bouncer)
    return bouncer


def _proxy(world: World, port: int, name: str) -> Proxy:
    proxy = Proxy(("127.0.0.1", port), name=name).start()
    world.proxies.append(proxy)
    return proxy


def build_world() -> World:
    world = World()
    try:
        a, b, c = _cluster(world), _cluster(world), _cluster(world)
        a_tx, a_session = _bouncer(world, a, "transaction", 3), _bouncer(world, a, "session", 4)
        c_tx = _bouncer(world, c, "transaction", 3)
        app, jobs = DATABASES
        world.sites = {
            "direct": Site("direct", "a", a, app, jobs, console_proxy=_proxy(world, a_tx.port, "console-proxy"),
                           bouncers={"direct-txpool": a_tx, "direct-sessionpool": a_session}),
            "proxied": Site("proxied", "b", b, app, jobs, dsn_proxy=_proxy(world, b.port, "dsn-proxy")),
            "pooled": Site("pooled", "c", c, app, jobs, pool=c_tx, bouncers={"pooled-txpool": c_tx}),
        }
    except BaseException:
        world.close()
        raise
    return world


# -- what the exporter is told, and what the oracle is told of it --------------------------------


def _proxied_dsn(proxy: Proxy, database: str, **extra: str) -> str:
    params = {"host": "127.0.0.1", "port": str(proxy.port), "dbname": database, "user": EXPORTER_USER, **extra}
    return " ".join(f"{k}={v}" for k, v in params.items())


def target_dsn(site: Site) -> str:
    if site.dsn_proxy is not None:
        return _proxied_dsn(site.dsn_proxy, site.database)
    if site.pool is not None:
        return site.pool.dsn(site.database, user=EXPORTER_USER)
    return site.cluster.dsn(site.database, user=EXPORTER_USER)


def consoles(site: Site) -> list[dict[str, str]]:
    """The poolers: entries of a site: the console through its proxy, or the pool's own."""
    if site.console_proxy is not None:
        bouncer = next(b for b in site.bouncers.values() if b.port == site.console_proxy.upstream[1])
        dsn = _proxied_dsn(site.console_proxy, "pgbouncer", user="console", password=_console_password(bouncer))
        return [{"name": "console", "type": "pgbouncer", "dsn": dsn}]
    if site.pool is not None:
        return [{"name": "pool", "type": "pgbouncer", "dsn": site.pool.console_dsn()}]
    return []


def _console_password(bouncer: PgBouncer) -> str:
    return dict(part.split("=", 1) for part in bouncer.console_dsn().split())["password"]


def lock_entries(reload_number: int) -> list[dict[str, Any]]:
    """The named locks: bigint keys (one probed), a family, and the reloads' own lock, a new
    one at every reload (each reload adds one lock and removes one)."""
    locks: list[dict[str, Any]] = [{"name": f"lock-{key}", "key": key} for key in NAMED_KEYS]
    locks[NAMED_KEYS.index(PROBED_KEY)]["probe"] = {"expect": "free"}
    locks.append({"name": f"family-{FAMILY_CLASSID}", "key": {"namespace": FAMILY_CLASSID}})
    locks.append({"name": f"reload-{reload_number}", "key": RELOAD_KEY_BASE + reload_number})
    return locks


def exporter_config(world: World, poll_interval: float, reload_number: int = 0) -> dict[str, Any]:
    targets = {}
    for site in world.sites.values():
        target: dict[str, Any] = {"dsn": target_dsn(site), "locks": lock_entries(reload_number),
                                  "databases": list(DATABASES)}
        if consoles(site):
            target["poolers"] = consoles(site)
        targets[site.name] = target
    return {"poll_interval": f"{int(poll_interval * 1000)}ms", "probe_interval": "1s", "targets": targets}


def _bigint(key: int) -> tuple[int, int, int]:
    """pg_locks' (classid, objid, objsubid) of pg_advisory_lock(bigint)."""
    unsigned = key & 0xFFFFFFFFFFFFFFFF
    return (unsigned >> 32, unsigned & 0xFFFFFFFF, 1)


def named_locks(database: str) -> tuple[NamedLock, ...]:
    locks = [NamedLock(f"lock-{key}", database, (lambda k: lambda triple: triple == k)(_bigint(key)),
                       probe_expect="free" if key == PROBED_KEY else None) for key in NAMED_KEYS]
    locks.append(NamedLock(f"family-{FAMILY_CLASSID}", database,
                           lambda triple: triple[0] == FAMILY_CLASSID and triple[2] == 2, family=True))
    return tuple(locks)


def stale_after(poll_interval: float, console_addresses: list[int]) -> float:
    """Rule 5's bound (README, What the exporter promises): the interval in force, the turn and
    twice the poll deadline, here their upper bounds for a fixed interval P (exporter/poller.py
    turn_allowance() and deadline(), exporter/poolers.py read_budget()): the turn P (the next poll
    waiting for its server's turn, before its call), and the deadline: the statement's bound P,
    connecting again 2t, the explaining statements 2t (t, the timeout, is P for a fixed interval),
    and CONSOLE_TIMEOUT for each console's name and each of its addresses. So P + P + 2 (P + 4t +
    consoles), which is 4P + 8t + twice the consoles' budget: 14 s at 500ms with one console of one
    address. (Until the scheduler, the poll waited for its turn inside its deadline, which counted
    the turn twice: 5P + 8t; the wait now comes before the call, so the bound is P tighter.)"""
    timeout = poll_interval
    turn = poll_interval
    deadline = poll_interval + 4 * timeout + sum(CONSOLE_TIMEOUT * (1 + n) for n in console_addresses)
    return poll_interval + turn + 2 * deadline


def setups(world: World, poll_interval: float) -> dict[str, TargetSetup]:
    return {site.name: TargetSetup(name=site.name, locks=named_locks(site.database), databases=DATABASES,
                                   max_holder_info_per_lock=100, reconnect_backoff_max=poll_interval,
                                   stale_after=stale_after(poll_interval, [1] * len(consoles(site))))
            for site in world.sites.values()}


def workload_spec(world: World, module: ModuleType, options: Options) -> Any:
    endpoints = []
    for site in world.sites.values():
        cluster = site.cluster
        for database in DATABASES:
            endpoints.append(module.Endpoint(site.name, database, cluster.dsn(database), truth.DIRECT, cluster.dsn(database)))
        for name, bouncer in site.bouncers.items():
            via = truth.TX_POOL if bouncer.pool_mode == "transaction" else truth.SESSION_POOL
            endpoints.append(module.Endpoint(site.name, site.database, bouncer.dsn(site.database), via,
                                             cluster.dsn(site.database)))
    return module.WorkloadSpec(endpoints=tuple(endpoints), named_keys=NAMED_KEYS, family_classid=FAMILY_CLASSID,
                               unnamed_keys=UNNAMED_KEYS, workers=options.workers, seed=options.seed,
                               hold_seconds=options.hold_seconds)


# -- the schedule --------------------------------------------------------------------------------


def choices(world: World) -> dict[str, list[tuple[str, str]]]:
    """Every fault kind: the (target, detail) it can hit."""
    found: dict[str, list[tuple[str, str]]] = {}
    for kind in faults.KINDS:
        if kind in faults.EXPORTER_KINDS:
            found[kind] = [("exporter", "")]
        else:
            found[kind] = [(site.name, detail) for site in world.sites.values() for detail in faults.options(kind, site)]
    return {kind: where for kind, where in found.items() if where}


# The exporter is stopped for longer than any target's staleness bound at the harness's 500 ms
# (14 s with a console), so that the first answer after SIGCONT must be a "don't know": rule 5
# then judges issue 27's item 5 (a poll from before the stop served as up).
EXPORTER_STOP_SECONDS = 16.0


def schedule(seed: int, world: World, seconds: float, short: bool) -> list[Planned]:
    """The faults in order, from random.Random(seed) alone: the same seed, the same schedule.
    Short: every kind once, at a target drawn for it. Long: rounds, each every kind at every
    target and detail it applies to in a shuffled order, until the rounds fill the time."""
    rng = random.Random(seed)
    where = choices(world)
    if short:
        plan = [Planned(kind, *rng.choice(sorted(where[kind])), duration=round(rng.uniform(1.0, 2.0), 2),
                        gap=round(rng.uniform(2.0, 2.5), 2)) for kind in sorted(where)]
        rng.shuffle(plan)
        return [_stop_long(p) for p in plan]
    pairs = sorted((kind, target, detail) for kind, places in where.items() for target, detail in places)
    plan, total = [], 0.0
    while total < seconds:
        round_ = list(pairs)
        rng.shuffle(round_)
        for kind, target, detail in round_:
            planned = Planned(kind, target, detail, duration=round(rng.uniform(2.0, 8.0), 2), gap=round(rng.uniform(3.0, 6.0), 2))
            planned = _stop_long(planned)
            plan.append(planned)
            total += planned.duration + planned.gap + 1.0
    return plan


def _stop_long(planned: Planned) -> Planned:
    return dataclasses.replace(planned, duration=EXPORTER_STOP_SECONDS) if planned.kind == "exporter-stop" else planned


# -- scraping ------------------------------------------------------------------------------------


class Scraper(threading.Thread):
    """Asks /probe?target=NAME every SCRAPE_EVERY seconds; a failed or timed-out scrape is
    recorded as Scrape(text="")."""

    def __init__(self, base_url: str, target: str, stop: threading.Event) -> None:
        super().__init__(name=f"chaos-scrape-{target}", daemon=True)
        self.url = f"{base_url}/probe?target={target}"
        self.target = target
        self.stop = stop
        self.scrapes: list[Scrape] = []

    def run(self) -> None:
        while not self.stop.is_set():
            sent = time.time()
            try:
                with urllib.request.urlopen(self.url, timeout=SCRAPE_TIMEOUT) as response:
                    text = response.read().decode() if response.status == 200 else ""
            except (OSError, urllib.error.URLError, ValueError):
                text = ""
            received = time.time()
            self.scrapes.append(Scrape(self.target, sent, received, text))
            self.stop.wait(max(0.0, SCRAPE_EVERY - (received - sent)))

    def latest_up(self) -> bool:
        if not self.scrapes:
            return False
        return parse(self.scrapes[-1].text).get(("pg_advisory_lock_exporter_up", ())) == 1 if self.scrapes[-1].text else False


def save_scrapes(scrapes: list[Scrape], path: Path) -> None:
    """Every scrape as a JSON line (gzip): the oracle can judge a run again without running it."""
    with gzip.open(path, "wt") as handle:
        for scrape in scrapes:
            handle.write(json.dumps(dataclasses.asdict(scrape)) + "\n")


def load_scrapes(path: Path) -> list[Scrape]:
    with gzip.open(path, "rt") as handle:
        return [Scrape(**json.loads(line)) for line in handle if line.strip()]


# -- the exporter's own figures --------------------------------------------------------------------

COUNT_OURS = """
SELECT count(*) FILTER (WHERE application_name LIKE %(pattern)s) AS ours,
       count(*) FILTER (WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()) AS clients
  FROM pg_stat_activity
"""


def resources(pid: int, world: World) -> dict[str, float]:
    """RSS (MB) and threads from /proc, its open sockets from /proc/PID/fd, and its backends
    (pg_stat_activity of every server, the pooled target's server connections included)."""
    sample: dict[str, float] = {"at": time.time()}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                name, _, value = line.partition(":")
                if name == "VmRSS":
                    sample["rss_mb"] = int(value.split()[0]) / 1024
                elif name == "Threads":
                    sample["threads"] = int(value)
        sample["sockets"] = sum(os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:") for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        pass
    sample["backends"] = sample["server_clients"] = 0
    for site in world.sites.values():
        try:
            with psycopg.connect(site.direct_dsn(), autocommit=True) as conn:
                row = conn.cursor(row_factory=namedtuple_row).execute(COUNT_OURS, {"pattern": APPLICATION_NAME + "%"}).fetchone()
            sample["backends"] += row.ours
            sample["server_clients"] += row.clients  # the workload's too: a leak shows here
        except psycopg.Error:
            pass
    return sample


# -- the run ---------------------------------------------------------------------------------------


@dataclass
class Result:
    """What a run found; report.py writes it out."""

    options: Options
    plan: list[Planned]
    faults: list[truth.Fault]
    scrapes: list[Scrape]
    verdict: oracle.Verdict
    truth: truth.Truth
    setups: dict[str, TargetSetup]
    samples: list[dict[str, float]]
    started: float
    sites: dict[str, str]  # target -> topology letter

    @property
    def unproven(self) -> list[truth.Fault]:
        return [f for f in self.faults if not f.proof]

    @property
    def ok(self) -> bool:
        from .report import budget_failures  # the report says what each budget is; the run fails on it
        return self.verdict.ok and not self.unproven and len(self.faults) > 0 and not budget_failures(self)


def run(options: Options, workload_module: ModuleType | None = None,
        judge: Callable[[truth.Truth, list[Scrape], dict[str, TargetSetup]], oracle.Verdict] | None = None) -> Result:
    """Set up, run the schedule, judge; everything set up is torn down, whatever happens."""
    module = workload_module or importlib.import_module("chaos.workload")
    judge = judge or oracle.judge
    options.out.mkdir(parents=True, exist_ok=True)
    print(f"chaos: seed {options.seed}, {options.seconds:g} s, out {options.out}", flush=True)
    world = build_world()
    try:
        return _run_in(world, options, module, judge)
    finally:
        world.close()


def _start_exporter(world: World, options: Options) -> tuple[ExporterProcess, Exporter]:
    proc = ExporterProcess(options.out, exporter_config(world, options.poll_interval))

    def rewrite(number: int) -> None:
        proc.config_path.write_text(yaml.safe_dump(exporter_config(world, options.poll_interval, number)))

    return proc, Exporter(proc.proc.pid, proc.url + "/metrics", rewrite)


def _wait_all_up(scrapers: list[Scraper], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(s.latest_up() for s in scrapers):
            return True
        time.sleep(0.1)
    return False


def _run_in(world: World, options: Options, module: ModuleType, judge: Callable[..., oracle.Verdict]) -> Result:
    plan = schedule(options.seed, world, options.seconds, options.short)
    (options.out / "schedule.json").write_text(json.dumps([dataclasses.asdict(p) for p in plan], indent=1))
    print(f"chaos: {len(plan)} faults planned from seed {options.seed}", flush=True)
    (options.out / "truth").mkdir(exist_ok=True)
    workload = module.Workload(workload_spec(world, module, options), options.out / "truth")
    proc, exporter = _start_exporter(world, options)
    stop = threading.Event()
    scrapers = [Scraper(proc.url, name, stop) for name in world.sites]
    recorder = FaultRecorder(options.out / "faults.jsonl")
    samples: list[dict[str, float]] = []
    workload_started = False
    try:
        proc.wait_ready(timeout=60)
        for scraper in scrapers:
            scraper.start()
        if not _wait_all_up(scrapers, 60):
            raise RuntimeError(f"the exporter's targets never all came up; log:\n{proc.log()[-3000:]}")
        workload.start()
        workload_started = True
        started = time.time()
        samples.append(resources(exporter.pid, world))
        _play(plan, Injector(world.sites, exporter, workload, recorder), scrapers, options, samples, started, world)
        samples.append(_settle(exporter.pid, world, samples[0], options.settle))
    finally:
        stop.set()
        for scraper in scrapers:
            scraper.join(SCRAPE_TIMEOUT + 1)
        if workload_started:
            workload.stop()
            if proc.proc.poll() is None:  # the end's figures: the workload's connections gone, a leak would stay
                samples.append(resources(exporter.pid, world))
        proc.stop()
    scrapes = sorted((s for scraper in scrapers for s in scraper.scrapes), key=lambda s: s.received)
    save_scrapes(scrapes, options.out / "scrapes.jsonl.gz")
    target_setups = setups(world, options.poll_interval)
    files = [*workload.files(), recorder.path]
    _save_run(options, plan, samples, started, world, target_setups, files)
    record = truth.Truth.of(truth.load(files))
    verdict = judge(record, scrapes, target_setups)
    return Result(options, plan, recorder.faults, scrapes, verdict, record, target_setups, samples, started,
                  {name: site.topology for name, site in world.sites.items()})


RUN_FILE = "run.json"


def _save_run(options: Options, plan: list[Planned], samples: list[dict[str, float]], started: float, world: World,
              target_setups: dict[str, TargetSetup], files: list[Path]) -> None:
    """What `--rejudge` needs besides the scrapes and the truth: the oracle can judge the run
    again (a rule mended, a lie looked into) without running it."""
    data = {"options": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(options).items()},
            "plan": [dataclasses.asdict(p) for p in plan], "samples": samples, "started": started,
            "sites": {name: site.topology for name, site in world.sites.items()},
            "setups": {name: {"database": world.sites[name].database, "stale_after": setup.stale_after,
                              "reconnect_backoff_max": setup.reconnect_backoff_max,
                              "max_holder_info_per_lock": setup.max_holder_info_per_lock}
                       for name, setup in target_setups.items()},
            "truth": [str(path.relative_to(options.out)) for path in files]}
    (options.out / RUN_FILE).write_text(json.dumps(data, indent=1))


def rejudge(out: Path, judge: Callable[..., oracle.Verdict] | None = None) -> Result:
    """A finished run's OUT folder judged again: the same scrapes, truth and setups."""
    data = json.loads((out / RUN_FILE).read_text())
    raw = data["options"]
    options = Options(**{**raw, "out": out, "hold_seconds": tuple(raw["hold_seconds"])})
    target_setups = {name: TargetSetup(name, named_locks(setup["database"]), DATABASES,
                                       max_holder_info_per_lock=setup["max_holder_info_per_lock"],
                                       reconnect_backoff_max=setup["reconnect_backoff_max"],
                                       stale_after=setup["stale_after"])
                     for name, setup in data["setups"].items()}
    record = truth.Truth.of(truth.load([out / path for path in data["truth"]]))
    scrapes = load_scrapes(out / "scrapes.jsonl.gz")
    verdict = (judge or oracle.judge)(record, scrapes, target_setups)
    return Result(options, [Planned(**p) for p in data["plan"]], record.faults, scrapes, verdict, record,
                  target_setups, data["samples"], data["started"], data["sites"])


def _play(plan: list[Planned], injector: Injector, scrapers: list[Scraper], options: Options,
          samples: list[dict[str, float]], started: float, world: World) -> None:
    """Each planned fault in turn until the time is up (the short run plays them all), then its
    gap, and until every target is up again (so faults never overlap)."""
    for number, planned in enumerate(plan, 1):
        if not options.short and time.time() - started > options.seconds:
            break
        fault = injector.run(planned)
        state = f"proved: {fault.proof}" if fault.proof else "NOT PROVEN"
        print(f"chaos: [{number}/{len(plan)}] {planned.kind} on {planned.target}"
              f"{' (' + planned.detail + ')' if planned.detail else ''}: {state}", flush=True)
        time.sleep(planned.gap)
        _wait_all_up(scrapers, 60)
        if time.time() - samples[-1]["at"] > 60:
            samples.append(resources(injector.exporter.pid, world))


def _settle(pid: int, world: World, first: dict[str, float], within: float) -> dict[str, float]:
    """The end's figures: once threads and backends are back to their starting counts, or
    after `within` seconds, whichever is first."""
    deadline = time.monotonic() + within
    while True:
        sample = resources(pid, world)
        # Its own sockets, not pg_stat_activity: a pool's server connections carry whichever
        # client's application_name came last.
        back = all(sample.get(k) == first.get(k) for k in ("threads", "sockets"))
        if back or time.monotonic() >= deadline:
            sample["settled_after"] = within - max(0.0, deadline - time.monotonic())
            return sample
        time.sleep(1.0)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from chaos.report import write_report

    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1800.0, help="how long the faults go on (default 1800)")
    parser.add_argument("--seed", type=int, default=None, help="the schedule's seed (default: drawn, and printed)")
    parser.add_argument("--out", type=Path, default=Path("chaos-out"), help="where the truth, faults and report go")
    parser.add_argument("--poll-interval", type=float, default=0.5, help="the exporter's poll_interval in seconds")
    parser.add_argument("--short", action="store_true", help="every fault kind once, short faults (make test's run)")
    parser.add_argument("--rejudge", type=Path, metavar="OUT", help="judge a finished run's folder again, and report")
    args = parser.parse_args(argv)
    if args.rejudge is not None:
        result = rejudge(args.rejudge)
        print(write_report(result), flush=True)
        return 0 if result.ok else 1
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 2**31)
    options = Options(seconds=args.seconds, seed=seed, out=args.out, poll_interval=args.poll_interval, short=args.short,
                      settle=10.0 if args.short else 90.0, hold_seconds=(0.05, 8.0) if args.short else (0.05, 120.0))
    try:
        module = importlib.import_module("chaos.workload")
    except ModuleNotFoundError as exc:
        print(f"python -m chaos: cannot import the workload ({exc})", file=sys.stderr)
        return 2
    result = run(options, module)
    print(write_report(result), flush=True)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
