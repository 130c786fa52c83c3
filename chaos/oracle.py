"""The oracle: every scrape held against the recorded truth (README: What the exporter promises).

The harness hands `judge` the truth, every scrape it made, and what the exporter was told; it gets
back a Verdict. The rules live in chaos/rules.py (1-7, per scrape) and chaos/blind.py (8, per
target), over chaos/history.py (the truth asked at a poll's moment) and chaos/served.py (a scrape
read with prometheus_client's parser).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .truth import Truth


@dataclass(frozen=True)
class Scrape:
    """One HTTP answer of the exporter: /metrics (single-server mode) or /probe?target=NAME."""

    target: str  # "" in single-server mode
    sent: float  # wall clock (epoch seconds) when the request was sent
    received: float  # when the whole body was in
    text: str  # the exposition, as served (decompressed)


@dataclass(frozen=True)
class NamedLock:
    """A lock of the exporter's config: its name, database, and which pg_locks keys
    (classid, objid, objsubid) are it (one key, or a family)."""

    name: str
    database: str
    matches: Callable[[tuple[int, int, int]], bool]
    family: bool = False
    probe_expect: str | None = None  # "free", "held" or "any" when probed


@dataclass(frozen=True)
class TargetSetup:
    """What one target's exporter was told, as far as the rules need it."""

    name: str  # "" in single-server mode
    locks: tuple[NamedLock, ...]
    databases: tuple[str, ...]  # the databases whose unnamed figures are judged
    max_holder_info_per_lock: int = 10
    reconnect_backoff_max: float = 5.0  # the back-off cap the recovery bound (rule 8) allows
    # The staleness bound of a poll read at time t (rule 5): t + bound; from the config and the
    # documented formula (README: What the exporter promises).
    stale_after: float = 0.0


@dataclass
class Lie:
    rule: int
    target: str
    scrape_received: float
    what: str  # one line: the figure, what the scrape said, what the truth was


# Every clause of every rule, each of which must make real checks in a run (a clause that never
# checked anything proves nothing: rule 2's lower bound never reached, the probe's ok never served).
CLAUSES = ("1.counts", "2.upper", "2.lower", "3.info", "3.pooled", "4.series", "5.stale",
           "6.acquirable", "6.ok", "7.monotone", "7.growth", "8.blind", "8.recovery")


@dataclass
class Verdict:
    checks: dict[int, int] = field(default_factory=dict)  # rule -> how many real checks it made
    clauses: dict[str, int] = field(default_factory=dict)  # clause ("2.lower") -> its checks
    lies: list[Lie] = field(default_factory=list)
    blind: dict[str, list[float]] = field(default_factory=dict)  # fault kind -> blind seconds per fault
    recovery: dict[str, list[float]] = field(default_factory=dict)  # fault kind -> seconds to a good poll
    unexplained_blind: list[tuple[str, float, float]] = field(default_factory=list)  # target, from, to

    def count(self, clause: str) -> None:
        """One real check of a clause (and of its rule)."""
        rule = int(clause.split(".")[0])
        self.checks[rule] = self.checks.get(rule, 0) + 1
        self.clauses[clause] = self.clauses.get(clause, 0) + 1

    @property
    def unchecked(self) -> list[str]:
        """The clauses that made no check."""
        return [clause for clause in CLAUSES if self.clauses.get(clause, 0) == 0]

    @property
    def ok(self) -> bool:
        return not self.lies and not self.unexplained_blind and not self.unchecked


def judge(truth: Truth, scrapes: list[Scrape], setups: dict[str, TargetSetup]) -> Verdict:
    """Every scrape of a target in `setups` held against the truth. Before a target's first up-1
    answer nothing is judged (start-up); an empty text is no answer."""
    # The rules build on this module's dataclasses: imported once they exist.
    from .blind import answers, judge_blindness
    from .history import History
    from .rules import Ledger, Matcher, ProbeRules, ScrapeRules, counters, moments_of

    verdict = Verdict()
    ledger = Ledger(verdict)
    seen = answers(scrapes, setups)
    logs = judge_blindness(ledger, seen, truth.faults)
    moments = {one.target: moments_of(ledger, one.answers) for one in seen}
    polls = {target: sorted({m.poll.timestamp: m.poll for m in ms if m is not None}.values(),
                            key=lambda p: p.timestamp) for target, ms in moments.items()}
    history = History(truth, polls, horizon=max((s.received for s in scrapes), default=0.0) + 1.0)
    matches = Matcher()
    probes = ProbeRules(ledger, history)
    for one in seen:
        before = None
        for moment in moments[one.target]:
            if moment is not None:
                ScrapeRules(ledger, history, logs[one.target], one.setup, moment).run(matches)
                probes.run(one.setup, moment, matches)
                if before is not None:
                    counters(ledger, history, one.setup, before, moment, matches)
                # Across blind answers too: the exporter process runs on through every fault, and
                # its counters with it (a fault that made it count surviving holders again is a lie).
                before = moment
    return verdict
