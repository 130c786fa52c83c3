"""A thousand targets in one process (issue 29): 250 on each of four clusters, each target its own
dsn (they differ by application_name) naming 10 locks, each cluster holding 100 advisory locks,
polled every 15 s, on the default max_workers. Measured, in three phases so the measuring does not
load what is measured:

1. steady: the exporter's CPU share and RSS, and /metrics scraped once a second (its p95);
2. gaps: every target's /probe read round after round, the gaps between the last_poll_timestamp
   values it serves (the exporter's own clock; a pair between which a poll failed or went unseen is
   counted, not measured), and at the end the time since each target's last poll (a target polled
   no more shows there, not nowhere);
3. one cluster stopped (SIGSTOP): the same over the other three clusters' targets, from the
   moment it stops: how late past due any of them was polled. Due times are a grid (each due one
   interval after the last was due, not after it ran: scheduler.PollTask), so a poll's lateness is
   its time minus (the last poll before the stop + polls since x interval), not its gap minus the
   interval, which is only how much later than the poll before it it was.

Then the same targets over four shards, four processes at once (measure_shards): what each owns,
its threads, RSS and CPU, and how many targets a fifth shard would move.

`python -m bench.thousand` runs these two points alone and prints their figures.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psycopg
import yaml

from bench import gcwatch
from bench.measure import Servers, cpu_seconds, rss_mb, stop, threads
from tests.metrics_util import parse
from tests.pgcluster import Cluster, free_port

CLUSTERS = 4
PER_CLUSTER = 250
NAMED = 10
HELD = 100
INTERVAL = "15s"
LAST_POLL = ("pg_advisory_lock_exporter_last_poll_timestamp_seconds", ())
POLLS = ("pg_advisory_lock_exporter_poll_duration_seconds_count", ())
INTERVAL_FIGURE = ("pg_advisory_lock_exporter_poll_interval_seconds", ())


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def _scrape_ms(url: str) -> float:
    request = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()
    return (time.perf_counter() - started) * 1000


class Gaps:
    """Each target's gaps between consecutive polls, as its own last_poll_timestamp says, and how
    late past due each poll was (see the module's docstring)."""

    def __init__(self) -> None:
        self.last: dict[str, tuple[float, float]] = {}  # target -> (stamp, poll count)
        self.gaps: dict[str, list[float]] = {}
        self.late: dict[str, list[float]] = {}
        self.interval: dict[str, float] = {}
        self.asked: dict[str, float] = {}  # target -> when its last reading was asked for
        self._grid: dict[str, tuple[float, int]] = {}  # target -> (a poll's stamp, successive polls since)
        self.unseen = 0  # pairs not measured: a poll failed, or ran unseen, between two readings

    def read(self, base: str, name: str) -> None:
        asked = time.time()  # what the answer says was so at this time already (the epoch, as the stamps)
        self.see(name, parse(_get(f"{base}/probe?target={name}").decode()), asked)

    def see(self, name: str, figures: dict, asked: float) -> None:
        stamp, count = figures.get(LAST_POLL), figures.get(POLLS)
        self.interval[name] = figures.get(INTERVAL_FIGURE, 0.0)
        self.asked[name] = asked
        if stamp is None or count is None:
            return
        before = self.last.get(name)
        if before is not None and stamp != before[0]:
            if count - before[1] == 1:
                self.gaps.setdefault(name, []).append(stamp - before[0])
                first, since = self._grid[name]
                self._grid[name] = (first, since + 1)
                self.late.setdefault(name, []).append(stamp - (first + (since + 1) * self.interval[name]))
            else:
                self.unseen += 1  # a failure's backoff moves the grid: it starts anew here
                self._grid[name] = (stamp, 0)
        if before is None:
            self._grid[name] = (stamp, 0)
        if before is None or stamp != before[0]:
            self.last[name] = (stamp, count)

    def watch(self, base: str, names: list[str], seconds: float) -> None:
        ended = time.monotonic() + seconds
        while time.monotonic() < ended:
            for name in names:
                self.read(base, name)
        self.end()

    def end(self) -> None:
        """The watch is over: a target not polled between its last stamp and its last reading counts
        that time as a gap, and as lateness past its next due time (each at its own reading: a poll
        after it, not read, is not counted late)."""
        for name, (stamp, _) in self.last.items():
            self.gaps.setdefault(name, []).append(self.asked[name] - stamp)
            first, since = self._grid[name]
            self.late.setdefault(name, []).append(self.asked[name] - (first + (since + 1) * self.interval[name]))

    @property
    def seen(self) -> int:
        """Targets with a poll seen (a target never polled has no stamp: counted against the budget)."""
        return len(self.last)

    def worst_gap(self) -> float:
        return max((max(g) for g in self.gaps.values() if g), default=float("nan"))

    def worst_late(self) -> float:
        """The most any target was polled past due (or is, at the end, still not polled)."""
        return max((max(late) for late in self.late.values() if late), default=float("nan"))


class Site(Servers):
    """The thousand targets' servers: four clusters, each holding 100 advisory locks, and the config
    naming 250 targets on each (each its own dsn). One site serves the one-process point and the
    shards point, so both measure the same targets."""

    def __init__(self, workdir: Path, per_cluster: int = PER_CLUSTER) -> None:
        super().__init__()
        self.workdir, self.per_cluster = workdir, per_cluster
        self.targets: dict[str, dict] = {}
        self.config = workdir / "thousand.yaml"

    def build(self) -> None:
        for _ in range(CLUSTERS):
            self.clusters.append(Cluster(settings={"max_connections": str(self.per_cluster + 50)}).start())
        for c, cluster in enumerate(self.clusters):
            conn = psycopg.connect(cluster.dsn(), autocommit=True, application_name="thousand-holder")
            conn.execute("SELECT count(pg_advisory_lock(k)) FROM generate_series(1, %s) AS k", [HELD])
            self.holders.append(conn)
            for t in range(self.per_cluster):
                name = f"c{c}-t{t:03d}"
                first = 1 + (t * NAMED) % HELD  # each target names 10 of its cluster's 100 held keys
                self.targets[name] = {"dsn": cluster.dsn(application_name=name),
                                      "locks": [{"name": f"key-{k}", "key": k} for k in range(first, first + NAMED)]}
        self.config.write_text(yaml.safe_dump({"poll_interval": INTERVAL, "targets": self.targets}))

    def exporter(self, log_name: str, *flags: str, gc_out: Path | None = None) -> tuple[subprocess.Popen, str]:
        """An exporter over the site's config (with flags), and its base URL."""
        base = f"http://127.0.0.1:{free_port()}"
        args = [f"--config.file={self.config}", f"--web.listen-address={base.removeprefix('http://')}",
                "--log.level=warning", *flags]
        command = ([sys.executable, "-m", "bench.gcwatch", str(gc_out), "--", *args] if gc_out is not None
                   else [sys.executable, "-m", "exporter", *args])
        log = open(self.workdir / log_name, "wb")  # noqa: SIM115 - the process's output, for a post-mortem
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), base


def measure_thousand(site: Site, steady_seconds: float = 90.0, gap_seconds: float = 75.0,
                     stopped_seconds: float = 75.0) -> dict[str, float]:
    gc_out = site.workdir / "thousand-gc.txt"
    proc, base = site.exporter("thousand.log", gc_out=gc_out)
    try:
        first_metrics = _first_answer(base, started=time.monotonic())
        time.sleep(20)  # every target past its first poll
        threads_start = threads(proc.pid)
        cpu0, started = cpu_seconds(proc.pid), time.monotonic()
        passes_before = len(gcwatch.passes(gc_out))
        scrapes = []
        while time.monotonic() < started + steady_seconds:
            scrapes.append(_scrape_ms(f"{base}/metrics"))
            time.sleep(1)
        elapsed = time.monotonic() - started
        cpu = (cpu_seconds(proc.pid) - cpu0) / elapsed * 100
        rss = rss_mb(proc.pid)
        full_passes = gcwatch.passes(gc_out)[passes_before:]
        gaps = Gaps()
        gaps.watch(base, list(site.targets), gap_seconds)
        stopped = site.clusters[3]
        others = [name for name in site.targets if not name.startswith("c3-")]
        late = Gaps()
        for name in others:  # the readings before it stops: the first gap counts from the last poll before
            late.read(base, name)
        stopped.signal_all(signal.SIGSTOP)
        try:
            late.watch(base, others, stopped_seconds)
            threads_stopped = threads(proc.pid)
            # The budget is "at most": the peak, over the gaps' readings and the stop too, not the
            # steady phase's one reading.
            rss_peak = rss_mb(proc.pid, "VmHWM")
        finally:
            stopped.signal_all(signal.SIGCONT)
        p95 = sorted(scrapes)[int(len(scrapes) * 0.95)]
        return {
            "targets": len(site.targets), "first_metrics_seconds": round(first_metrics, 1),
            "threads": threads_start, "threads_one_cluster_stopped": threads_stopped,
            "rss_mb": round(rss, 1), "rss_peak_mb": round(rss_peak, 1), "cpu_percent_of_core": round(cpu, 1), "scrape_p95_ms": round(p95, 2),
            "scrape_max_ms": round(max(scrapes), 2),
            "full_gc_passes": len(full_passes), "full_gc_pass_max_ms": round(max(full_passes, default=0.0) * 1000, 1),
            "full_gc_share_percent": round(sum(full_passes) / elapsed * 100, 3),
            "worst_gap_seconds": round(gaps.worst_gap(), 2), "targets_gaps_seen": gaps.seen,
            "gaps_unmeasured": gaps.unseen,
            "worst_late_seconds_one_cluster_stopped": round(late.worst_late(), 2),
            "targets_gaps_seen_one_cluster_stopped": late.seen, "targets_one_cluster_stopped": len(others),
            "gaps_unmeasured_one_cluster_stopped": late.unseen,
        }
    finally:
        stop(proc)


def _owned_by_check_config(site: Site, total: int) -> dict[int, list[str]]:
    """Each shard's targets among total, as --check-config prints them (the exporter's own word)."""
    owned = {}
    for ordinal in range(total):
        out = subprocess.run([sys.executable, "-m", "exporter", f"--config.file={site.config}", "--check-config",
                              f"--shard={ordinal}", f"--total-shards={total}"],
                             capture_output=True, text=True, check=True).stdout
        line = next(line for line in out.splitlines() if f"shard {ordinal} of {total} owns" in line)
        names = line.split(": ", 2)[2]
        owned[ordinal] = [] if names == "none" else names.split(", ")
    return owned


def measure_shards(site: Site, total: int = 4, steady_seconds: float = 60.0) -> dict[str, object]:
    """The same targets over `total` shards, each its own process, all running at once: each
    shard's owned targets (its /sd and its targets figure), threads, RSS and CPU; then how many
    targets one more shard would move (--check-config of total+1 shards against the /sds)."""
    procs: list[tuple[subprocess.Popen, str]] = []
    try:
        for n in range(total):  # in the try: a start that fails stops the shards started before it
            procs.append(site.exporter(f"shard-{n}.log", f"--shard={n}", f"--total-shards={total}"))
        for _, base in procs:
            _first_answer(base, started=time.monotonic())
        time.sleep(20)  # every target past its first poll
        cpu0 = [cpu_seconds(proc.pid) for proc, _ in procs]
        started = time.monotonic()
        time.sleep(steady_seconds)
        # Every shard's CPU over the same window, read before any of them is scraped (a shard read
        # later counted the others' scrapes' time and its own scrape's CPU).
        cpu1 = [cpu_seconds(proc.pid) for proc, _ in procs]
        elapsed = time.monotonic() - started
        ended = [n for n, (proc, _) in enumerate(procs) if proc.poll() is not None]
        if ended:
            raise RuntimeError(f"shards {ended} ended during the window (their logs: shard-N.log)")
        shards = []
        sd: dict[int, list[str]] = {}
        for n, (proc, base) in enumerate(procs):
            figures = parse(_get(f"{base}/metrics").decode())
            sd[n] = [group["labels"]["__param_target"] for group in json.loads(_get(f"{base}/sd"))]
            shards.append({
                "shard": n, "targets_figure": int(figures[("pg_advisory_lock_exporter_targets", ())]),
                "sd_targets": len(sd[n]), "threads": threads(proc.pid), "rss_mb": round(rss_mb(proc.pid), 1),
                "cpu_percent_of_core": round((cpu1[n] - cpu0[n]) / elapsed * 100, 1)})
    finally:
        for proc, _ in procs:
            stop(proc)
    owners: dict[str, list[int]] = {}
    for n, names in sd.items():
        for name in names:
            owners.setdefault(name, []).append(n)
    wider = _owned_by_check_config(site, total + 1)
    owner_after = {name: n for n, names in wider.items() for name in names}
    moved = [name for name, was in owners.items() if owner_after.get(name) != was[0]]
    return {
        "total_shards": total, "targets": len(site.targets), "shards": shards,
        "owned_by_exactly_one": sum(len(owners.get(name, [])) == 1 for name in site.targets),
        "owned_by_none": sum(name not in owners for name in site.targets),
        "owned_by_several": sum(len(owners.get(name, [])) > 1 for name in site.targets),
        "moved_to_one_more_shard": len(moved),
        "moved_to_the_new_shard_only": all(owner_after.get(name) == total for name in moved),
        "owned_after_one_more": {str(n): len(names) for n, names in wider.items()},
    }


def _first_answer(base: str, started: float, timeout: float = 300.0) -> float:
    """Seconds until /metrics first answers."""
    while time.monotonic() < started + timeout:
        try:
            _get(f"{base}/metrics")
            return time.monotonic() - started
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"/metrics did not answer within {timeout:g}s")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder, Site(Path(folder)) as site:
        print(json.dumps({"thousand": measure_thousand(site), "shards": measure_shards(site)}, indent=1))
