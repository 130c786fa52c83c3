"""The running exporter: one target (single-server mode) or many, each with its own poller,
prober, connections and snapshot, their calls run by the one scheduler (scheduler.py) and their
expositions rendered by the one renderer; the server picks the snapshot a request names.

A reload adds, removes and changes targets without disturbing the others; a target whose dsn
keeps its host, port and database keeps its hold tracking and counters.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterable

from psycopg import conninfo

from . import landing
from .config import Config, Fleet
from .logs import LoopErrors
from .exposition import Exposition, FleetExposition, Renderer
from .poller import Poller, connect_poller
from .probe import Prober, connect_probe
from .scheduler import PollTask, ProbeTask, Scheduler
from .shards import Shard, ShardError, service_discovery
from .snapshot import PollStats, ReloadStatus, Snapshot

log = logging.getLogger(__name__)

# How often the watchdog looks. (Scrapes need not wait for it: each compares the clock with its
# poll's staleness bound itself, exposition.Exposition.body.)
WATCHDOG_SECONDS = 0.5


class Watchdog:
    """A thread of its own (none of the loops it watches) that looks at every target's last good
    poll twice a second and serves up 0 for one whose poller is stuck or gone."""

    def __init__(self, targets: Callable[[], Iterable[Target]], clock: Callable[[], float] = time.monotonic) -> None:
        self._targets = targets
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unexpected = LoopErrors(log, "watchdog")

    def check(self) -> None:
        for target in list(self._targets()):
            target.check_stale(self._clock())

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.wait(WATCHDOG_SECONDS):
                try:
                    self.check()
                except Exception as exc:  # noqa: BLE001 - the watchdog survives what it watches for
                    self._unexpected.report(exc)
        self._thread = threading.Thread(target=loop, name="watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(WATCHDOG_SECONDS)


def server_identity(dsn: str) -> tuple[str, str, str]:
    """(host, port, database) of a dsn: what decides whether a changed target is the same server."""
    try:
        params = conninfo.conninfo_to_dict(dsn)
    except Exception:  # noqa: BLE001 - a dsn the config accepted; any doubt means "another server"
        return (dsn, "", "")
    return (str(params.get("host") or params.get("hostaddr") or ""), str(params.get("port") or ""),
            str(params.get("dbname") or ""))


class Target:
    """One monitored server: its poller and prober, run by the fleet's scheduler, and its own exposition."""

    def __init__(self, config: Config, with_process: bool,
                 on_snapshot: Callable[[str, Snapshot], None] | None = None, turn: Hashable | None = None,
                 scheduler: Scheduler | None = None, renderer: Renderer | None = None) -> None:
        self.config = config
        self.exposition = Exposition(Snapshot(up=False, stats=PollStats(interval=config.interval_budget.minimum)),
                                     with_process=with_process)
        self.first_poll = threading.Event()
        self._on_snapshot = on_snapshot
        self._scheduler = scheduler or Scheduler()
        self._renderer = renderer
        # One call of ours at a time on this server, probe or poll (shared by every target on the
        # same server: pg_locks is the whole cluster's, so one target's poll would see another's
        # try): the scheduler's turn, taken before a call starts, so a call waiting for it holds no worker.
        turn = turn if turn is not None else server_identity(config.dsn)[:2]
        self.prober = Prober(config, connect=connect_probe, publish=self.exposition.publish_probes)
        self.poller = Poller(config, connect=connect_poller, publish=self._publish)
        self.tasks = (PollTask(self.poller, turn, config.name, on_start=self._poll_started),
                      ProbeTask(self.prober, turn, config.name))
        # A poll's publication and the watchdog's replacement, each with its word to the fleet's view.
        self._publishing = threading.Lock()
        # Set under _publishing by stop(): a call running then (a hung server's, the usual reason a
        # target is removed) publishes nothing when it returns or gives up, so the fleet's view,
        # which forgot this target (or holds the target of that name on its new server), keeps it so.
        self._stopped = False

    @property
    def name(self) -> str:
        return self.config.name

    def _publish(self, snapshot: Snapshot) -> None:
        with self._publishing:
            if self._stopped:
                return
            self.exposition.publish(snapshot)
            if self._on_snapshot is not None:
                self._on_snapshot(self.name, snapshot)
        self.first_poll.set()

    def _poll_started(self, now: float, bound: float) -> None:
        """A poll started now (the poller's clock); bound: when it was due, plus its turn allowance
        and its deadline. The last good poll is served until then at least: its own bound counted
        the next poll's deadline as it was when it ended, and a reload since (a connection made
        anew, consoles added) may have lengthened it. Counted from the due time, which is at most
        one interval after the last poll ended, so rule 5's bound holds however long this poll
        waited for its server's turn or a worker. A bound that has passed already stays passed:
        what was served as "don't know" must not turn into figures again."""
        snapshot = self.exposition.snapshot
        if snapshot.up and now <= snapshot.fresh_until < bound:
            self.exposition.publish_instead_of(snapshot, dataclasses.replace(snapshot, fresh_until=bound))

    def check_stale(self, now: float) -> bool:
        """The watchdog's look (now: the poller's clock): past the last good poll's staleness bound
        (Snapshot.fresh_until: the next poll was due and has had its deadline) while the exposition
        still says up, the poller is stuck or gone; publish the failed-poll exposition in its
        place, so the landing page and a fleet's target_up say so too (a scrape already serves up 0
        by itself past the bound). True when it did."""
        snapshot = self.exposition.snapshot
        if not snapshot.up or now <= snapshot.fresh_until:
            return False
        stale = Snapshot(up=False, stats=snapshot.stats)
        with self._publishing:  # the fleet's view gets the same snapshot as the exposition, in order
            if self._stopped:
                return False
            if not self.exposition.publish_instead_of(snapshot, stale):
                return False  # a poll published meanwhile: not stale after all
            if self._on_snapshot is not None:
                self._on_snapshot(self.name, stale)
        log.error("target %s: no poll has been published for %.1fs after the last was read (its bound: the next "
                  "poll due and its deadline, %.1fs): the poller is stuck or gone; serving up 0", self.name or "(single)",
                  now - snapshot.taken_at, snapshot.fresh_until - snapshot.taken_at)
        return True

    def start(self) -> None:
        self.exposition.start(self._renderer)
        for task in self.tasks:
            self._scheduler.add(task)

    def reconfigure(self, config: Config) -> None:
        """The same server, a new config: from the next poll and try on, tracking kept."""
        probed = self.config.probed
        self.config = config
        self.poller.reconfigure(config)
        self.prober.reconfigure(config)
        if config.probed != probed:  # tried from now (a probe with no lock sleeps until a reload gives it one)
            self._scheduler.wake(self.tasks[1])

    def stop(self) -> None:
        """No call of this target starts from now on; one running ends by itself (under its
        deadline) and its connections are closed then; it publishes nothing."""
        with self._publishing:
            self._stopped = True
        for task in self.tasks:
            self._scheduler.remove(task)
        self.exposition.stop()


class Runtime:
    """Every target of the config, and what the HTTP server asks of them."""

    def __init__(self, fleet: Fleet, telemetry_path: str, shard: Shard = Shard()) -> None:
        self.single = fleet.single
        self.shard = shard
        self.configured: tuple[str, ...] = fleet.names  # every shard's targets (this one runs its own)
        self.telemetry_path = telemetry_path
        self.health = None if fleet.single else FleetExposition()
        self._targets: dict[str, Target] = {}
        self.scheduler = Scheduler(fleet.max_workers)
        self.renderer = Renderer()  # every target's, and the fleet's own /metrics
        self._lock = threading.Lock()
        self.reload_status = ReloadStatus(True, time.time())
        for config in self._own(fleet):
            self._targets[config.name] = self._make(config)
        self._publish_reload()
        self._publish_shard()
        self.watchdog = Watchdog(lambda: self._targets.values())

    def _make(self, config: Config) -> Target:
        health = self.health
        # (host, port): the turn the targets of one server share
        return Target(config, with_process=self.single, on_snapshot=health.publish_target if health is not None else None,
                      turn=server_identity(config.dsn)[:2], scheduler=self.scheduler, renderer=self.renderer)

    @property
    def targets(self) -> dict[str, Target]:
        return self._targets

    def start(self) -> None:
        if self.health is not None:
            self.health.start(self.renderer)
        for target in self._targets.values():
            target.start()
        self.watchdog.start()

    def stop(self) -> None:
        self.watchdog.stop()
        for target in self._targets.values():
            target.stop()
        self.scheduler.stop()
        if self.health is not None:
            self.health.stop()
        self.renderer.stop()

    # -- reload -------------------------------------------------------------------------

    def apply(self, fleet: Fleet) -> None:
        """A reloaded config: targets added, removed, or changed in place (same server: tracking kept).
        A single-server config for a sharded exporter raises ShardError before anything changes:
        every shard would poll that one server (cli refuses it at start-up for the same reason)."""
        with self._lock:
            if fleet.single and self.shard.total > 1:
                raise ShardError(f"the config watches one server (dsn), and this exporter is {self.shard}: "
                                 "sharding spreads targets (targets:) over replicas, so every shard would poll it")
            if fleet.single != self.single:
                log.warning("config reload: switching between one server and targets needs a restart; "
                            "the targets' configs are applied, the mode stays")
            if fleet.max_workers != self.scheduler.max_workers:
                log.warning("config reload: max_workers %d -> %d needs a restart; %d workers stay the bound",
                            self.scheduler.max_workers, fleet.max_workers, self.scheduler.max_workers)
            targets = dict(self._targets)
            wanted = {config.name: config for config in self._own(fleet)}
            if self.single:
                wanted = {"": fleet.targets[0]} if fleet.single else {"": targets[""].config}
            try:
                self._change(targets, wanted)
            finally:
                # Whatever was changed before a failure is what runs: served, and stopped at exit.
                self._targets = targets
                if not self.single:
                    self.configured = fleet.names
                self._publish_shard()

    def _own(self, fleet: Fleet) -> tuple[Config, ...]:
        """The targets this shard polls (all of them unsharded; a single-server config is never
        sharded: cli refuses it at start-up, apply on reload)."""
        return fleet.targets if fleet.single else tuple(c for c in fleet.targets if self.shard.owns(c.name))

    def _publish_shard(self) -> None:
        if self.health is not None:
            self.health.publish_shard(self.shard, len(self._targets))

    def _change(self, targets: dict[str, Target], wanted: dict[str, Config]) -> None:
        """Remove, reconfigure, replace and add targets in targets, in place."""
        for name in [n for n in targets if n not in wanted]:
            targets.pop(name).stop()
            if self.health is not None:
                self.health.forget_target(name)
            log.info("target %s removed", name)
        for name, config in wanted.items():
            current = targets.get(name)
            if current is not None and server_identity(current.config.dsn) == server_identity(config.dsn):
                current.reconfigure(config)
                continue
            if current is not None:
                targets.pop(name).stop()  # gone until its replacement runs
                log.info("target %s now watches another server: its tracking starts anew", name)
            else:
                log.info("target %s added", name)
            targets[name] = self._make(config)
            targets[name].start()

    def reload_result(self, ok: bool) -> None:
        self.reload_status = ReloadStatus(ok, time.time() if ok else self.reload_status.last_success_timestamp)
        self._publish_reload()

    def _publish_reload(self) -> None:
        for target in self._targets.values():
            target.exposition.publish_reload(self.reload_status)
        if self.health is not None:
            self.health.publish_reload(self.reload_status)

    # -- what the server asks -----------------------------------------------------------

    def ready(self) -> bool:
        """Every target's first poll (good or failed) has been published."""
        return all(target.first_poll.is_set() for target in self._targets.values())

    @property
    def _only(self) -> Target:
        """The one target of single-server mode."""
        return self._targets[""]

    def metrics(self, gzipped: bool) -> bytes:
        if self.health is not None:
            return self.health.body(gzipped)
        return self._only.exposition.body(gzipped)

    def probe(self, name: str, gzipped: bool) -> bytes | None:
        """A target's figures, or None for a name that is no target."""
        target = None if self.single else self._targets.get(name)
        return None if target is None else target.exposition.body(gzipped)

    def elsewhere(self, name: str) -> str | None:
        """For a configured target another shard owns: who does ("target X belongs to shard 2 of 4").
        None unsharded, and None for a target this shard owns but does not run (a reload that
        failed part-way): it is not elsewhere, and naming this very shard would mislead."""
        if self.single or self.shard.total == 1 or name in self._targets or name not in self.configured:
            return None
        if self.shard.owner(name) == self.shard.ordinal:
            return None
        return self.shard.elsewhere(name)

    def service_discovery(self, address: str) -> bytes:
        """/sd: Prometheus's http_sd list of this shard's targets, scraped at address."""
        return service_discovery(self.shard, [] if self.single else sorted(self._targets), address)

    def names(self) -> list[str]:
        return [] if self.single else sorted(self._targets)

    def landing(self, name: str | None) -> bytes | None:
        """The landing page: the one server's, a target's, or the list of targets."""
        if self.single:
            exposition = self._only.exposition
            return landing.render(exposition.snapshot, exposition.probes, exposition.reload, self.telemetry_path)
        if name:
            target = self._targets.get(name)
            if target is None:
                return None
            exposition = target.exposition
            return landing.render(exposition.snapshot, exposition.probes, exposition.reload,
                                  f"/probe?target={name}", target=name)
        return landing.render_targets({n: t.exposition.snapshot for n, t in sorted(self._targets.items())},
                                      self.reload_status, self.telemetry_path)
