"""The oracle: every scrape held against the recorded truth (README: What the exporter promises).

Interface only (the rules come in their own commit): the harness hands `judge` the truth, every
scrape it made, and what the exporter was told; it gets back a Verdict.
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


@dataclass
class Verdict:
    checks: dict[int, int] = field(default_factory=dict)  # rule -> how many real checks it made
    lies: list[Lie] = field(default_factory=list)
    blind: dict[str, list[float]] = field(default_factory=dict)  # fault kind -> blind seconds per fault
    recovery: dict[str, list[float]] = field(default_factory=dict)  # fault kind -> seconds to a good poll
    unexplained_blind: list[tuple[str, float, float]] = field(default_factory=list)  # target, from, to

    @property
    def ok(self) -> bool:
        return not self.lies and not self.unexplained_blind and all(self.checks.get(r, 0) > 0 for r in range(1, 9))


def judge(truth: Truth, scrapes: list[Scrape], setups: dict[str, TargetSetup]) -> Verdict:
    raise NotImplementedError("the rules come in their own commit")
