"""Rules 1-7 of README "What the exporter promises", judged on one up-1 scrape (rule 7: on two in a
row) against the History. Each comparison that could have failed is a check; each failed one a Lie
of one line: the figure, what was served, the truth's range, the scrape's time."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .history import CERTAIN, History, Poll, Spell, Window, holder_id, info_identity
from .oracle import Lie, NamedLock, Scrape, TargetSetup, Verdict
from .served import (ACQUISITIONS, HELD_SECONDS, HOLDER_INFO, HOLDERS, INTERVAL, LAST_POLL, LAST_POLL_DURATION,
                     POOLED, PROBE_ACQUIRABLE, PROBE_DURATION, PROBE_LAST_RUN, PROBE_OK, PROBE_TRUSTED,
                     UNNAMED_HELD_SECONDS, UNNAMED_HOLDERS, UNNAMED_WAITERS, WAITERS, Served)
from .truth import ANY_BACKEND, EXCLUSIVE, SHARED, Hold

# held_seconds and the timestamps are written to the millisecond: a difference below this is the
# rendering's, never a lie.
EPSILON = 0.001

Present = list[tuple[Hold, int]]
Matches = Callable[[NamedLock, tuple[int, int, int]], bool]  # whether a key is that lock's


@dataclass
class TargetLog:
    """What the scrapes of one target tell of its exporter: when its first known poll read pg_locks,
    and when it may have seen nothing (around its blind stretches, and its blinding faults with
    their recovery bound): holds that began then may be first seen late, so rule 2's lower bound
    leaves them out."""

    first_poll: float
    blind: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class Moment:
    """One up-1 scrape of a target, as the rules need it."""

    target: str
    sent: float
    received: float
    served: Served
    poll: Poll

    @property
    def window(self) -> Window:
        return self.poll.window


def moments_of(ledger: "Ledger", answers: list[tuple[Scrape, Served]]) -> list[Moment | None]:
    """A target's answers as Moments, None for a blind one (it breaks rule 7's run of scrapes)."""
    moments: list[Moment | None] = []
    for scrape, served in answers:
        polled = served.get(LAST_POLL) if served.up else None
        if served.up and polled is None:
            ledger.check("5.stale", False, None, scrape.target, scrape.received,
                         f"{LAST_POLL} absent from an up-1 answer (scrape sent {scrape.sent:.3f})")
        if polled is None:
            moments.append(None)
            continue
        poll = Poll(polled, served.get(LAST_POLL_DURATION) or 0.0, served.get(INTERVAL) or 0.0)
        moments.append(Moment(scrape.target, scrape.sent, scrape.received, served, poll))
    return moments


class Matcher:
    """NamedLock.matches, remembered per lock and key (the rules ask it for every hold at every scrape)."""

    def __init__(self) -> None:
        self._known: dict[tuple[int, tuple[int, int, int]], bool] = {}

    def __call__(self, lock: NamedLock, key: tuple[int, int, int]) -> bool:
        found = self._known.get((id(lock), key))
        if found is None:
            found = self._known[(id(lock), key)] = bool(lock.matches(key))
        return found


class Ledger:
    """Counts checks and records lies into a Verdict (the oracle's)."""

    def __init__(self, verdict: Verdict) -> None:
        self.verdict = verdict

    def check(self, clause: str, holds: bool, moment: Moment | None, target: str, received: float,
              what: str) -> bool:
        """One comparison of a clause ("2.upper": rule 2's upper bound): counted for the clause and its
        rule; a Lie when it failed (with the scrape's time and poll window)."""
        self.verdict.count(clause)
        rule = int(clause.split(".")[0])
        if not holds:
            where = "" if moment is None else (f" (scrape sent {moment.sent:.3f}, poll read in "
                                               f"[{moment.window.lo:.3f}, {moment.window.hi:.3f}])")
            self.verdict.lies.append(Lie(rule, target, received, what + where))
        return holds


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


def _range(items: list[tuple[object, int]]) -> tuple[int, int]:
    """How many distinct things are certainly there, and how many may be."""
    return len({i for i, p in items if p == CERTAIN}), len({i for i, _ in items})


def _value(number: float) -> str:
    return f"{number:g}"


class ScrapeRules:
    """Rules 1-6 on one scrape of one target: named locks (and the unnamed figures per database)."""

    def __init__(self, ledger: Ledger, history: History, log: TargetLog, setup: TargetSetup, moment: Moment) -> None:
        self.ledger, self.history, self.log, self.setup, self.m = ledger, history, log, setup, moment
        self.holds: Present = list(history.holds(moment.target, moment.window))
        self.waits: list[tuple[Spell, int]] = list(history.waits(moment.target, moment.window))
        self._busy: set[tuple[object, ...]] | None = None

    def check(self, clause: str, holds: bool, what: str) -> bool:
        return self.ledger.check(clause, holds, self.m, self.m.target, self.m.received, what)

    def run(self, matches: Matches) -> None:
        for lock in self.setup.locks:
            mine = [(h, p) for h, p in self.holds if h.database == lock.database and matches(lock, h.key)]
            waits = [(s, p) for s, p in self.waits if s.database == lock.database and matches(lock, s.key)]
            labels = {"lock": lock.name, "database": lock.database}
            self.counts(labels, mine, waits)
            self.ages(HELD_SECONDS, labels, mine)
            self.infos(labels, mine)
            self.pooled(labels, mine)
            self.series_present(labels, mine)
        for database in self.setup.databases:
            named = [lock for lock in self.setup.locks if lock.database == database]
            mine = [(h, p) for h, p in self.holds
                    if h.database == database and not any(matches(lock, h.key) for lock in named)]
            waits = [(s, p) for s, p in self.waits
                     if s.database == database and not any(matches(lock, s.key) for lock in named)]
            self.unnamed_counts(database, mine, waits)
            self.ages(UNNAMED_HELD_SECONDS, {"database": database}, mine)
        self.staleness()

    # Rule 1: counts.
    def counts(self, labels: dict[str, str], holds: Present, waits: list[tuple[Spell, int]]) -> None:
        for mode in (EXCLUSIVE, SHARED):
            truth = _range([((holder_id(h.holder), h.key), p) for h, p in holds if h.mode == mode])
            self.compare(HOLDERS, {**labels, "mode": mode}, self.m.served.get(HOLDERS, **labels, mode=mode), truth)
        truth = _range([(holder_id(s.holder), p) for s, p in waits])
        self.compare(WAITERS, labels, self.m.served.get(WAITERS, **labels), truth)

    def unnamed_counts(self, database: str, holds: Present, waits: list[tuple[Spell, int]]) -> None:
        """The unnamed series exist only for databases with unnamed locks: absent is 0."""
        truth = _range([((holder_id(h.holder), h.key, h.mode), p) for h, p in holds])
        self.compare(UNNAMED_HOLDERS, {"database": database},
                     self.m.served.get(UNNAMED_HOLDERS, database=database) or 0.0, truth)
        truth = _range([(holder_id(s.holder), p) for s, p in waits])
        self.compare(UNNAMED_WAITERS, {"database": database},
                     self.m.served.get(UNNAMED_WAITERS, database=database) or 0.0, truth)

    def compare(self, name: str, labels: dict[str, str], served: float | None, truth: tuple[int, int],
                clause: str = "1.counts") -> None:
        if served is not None:
            self.check(clause, truth[0] <= served <= truth[1],
                       f"{name}{_labels(**labels)} served {_value(served)}, truth [{truth[0]}, {truth[1]}]")

    # Rule 2: the age of the oldest current hold.
    def ages(self, name: str, labels: dict[str, str], holds: Present) -> None:
        served = self.m.served.get(name, **labels)
        if served is None:
            return
        poll = self.m.poll
        oldest = max((poll.timestamp - self.history.oldest_start[id(h)] for h, _ in holds), default=0.0)
        upper = oldest + poll.duration
        self.check("2.upper", served <= upper + EPSILON,
                   f"{name}{_labels(**labels)} served {_value(served)}, truth [.., {upper:.3f}] (the oldest "
                   f"hold possibly present, from its chain's first grant, plus the poll's round trip)")
        lower, why = self.lower_age(holds)
        if lower > 0:
            self.check("2.lower", served >= lower - EPSILON,
                       f"{name}{_labels(**labels)} served {_value(served)}, truth [{lower:.3f}, ..] ({why})")

    def lower_age(self, holds: Present) -> tuple[float, str]:
        """The least the served age may be: the youngest certain hold's age at the read, less one
        interval in force and the round trips, for holds the exporter could have seen from their start."""
        poll, best, why = self.m.poll, 0.0, ""
        for hold, seen in holds:
            start = self.history.youngest_start[id(hold)]
            if seen != CERTAIN or self.exempt(start):
                continue
            between = self.history.polls_between(self.m.target, start, poll.timestamp) + [poll]
            slack = max(p.interval for p in between) + max(p.duration for p in between) + poll.duration
            if poll.timestamp - start - slack > best:
                best = poll.timestamp - start - slack
                why = (f"the hold of key {info_identity(hold)[0]} by {holder_id(hold.holder)} granted by "
                       f"{start:.3f}, less {slack:.3f} s of interval and round trips")
        return best, why

    def exempt(self, start: float) -> bool:
        return start <= self.log.first_poll or any(lo <= start <= hi for lo, hi in self.log.blind)

    # Rule 3: holder_info and pooled_session_holders.
    def infos(self, labels: dict[str, str], holds: Present) -> None:
        served = self.m.served.series(HOLDER_INFO, **labels)
        certain = {info_identity(h) for h, p in holds if p == CERTAIN}
        possible = {info_identity(h) for h, _ in holds}
        if not served and certain:
            return  # no series at all for a held lock: rule 4's lie
        cap = self.setup.max_holder_info_per_lock
        for series in served:
            self.check("3.info", any(_is(series, i) for i in possible),
                       f"{HOLDER_INFO}{_labels(**_short(series))} served 1, truth: no such holder")
        self.check("3.info", len(served) <= cap, f"{HOLDER_INFO}{_labels(**labels)} served {len(served)} series, "
                                          f"truth [.., {cap}] (max_holder_info_per_lock)")
        if len(possible) > cap:
            least = min(cap, len(certain))
            self.check("3.info", len(served) >= least, f"{HOLDER_INFO}{_labels(**labels)} served {len(served)} series, "
                                                f"truth [{least}, {cap}] (more hold than the cap)")
            return
        for ident in sorted(certain, key=repr):
            self.check("3.info", any(_is(s, ident) for s in served),
                       f"{HOLDER_INFO}{_labels(**labels)} lacks key={ident[0]} pid={ident[1]!r} "
                       f"application_name={ident[2]!r}, truth: it holds")

    def pooled(self, labels: dict[str, str], holds: Present) -> None:
        served = self.m.served.get(POOLED, **labels)
        if served is None:
            return
        busy = self.busy_backends()
        certain = {(holder_id(h.holder), h.key) for h, p in holds if p == CERTAIN and h.stranded is not None
                   and h.stranded.hi < self.m.window.lo and holder_id(h.holder) not in busy}
        possible = {(holder_id(h.holder), h.key) for h, _ in holds
                    if h.stranded is not None and h.stranded.lo <= self.m.window.hi}
        self.compare(POOLED, labels, served, (len(certain), len(certain | possible)), clause="3.pooled")

    def busy_backends(self) -> set[tuple[object, ...]]:
        """Backends that may have been inside a transaction or a statement of the truth at the read:
        the exporter proves a stranded lock only on an idle backend, so theirs are uncertain."""
        if self._busy is not None:
            return self._busy
        window, busy = self.m.window, set()
        for hold, _ in self.holds:
            events = [hold.granted] + ([hold.released] if hold.released is not None else [])
            if hold.level != "session" or any(e.lo <= window.hi and e.hi >= window.lo for e in events):
                busy.add(holder_id(hold.holder))
        busy |= {holder_id(spell.holder) for spell, _ in self.waits}
        # A client's transaction on the server connection (from before its BEGIN): the backend is
        # not idle outside a transaction, whatever it holds.
        busy |= {holder_id(b.holder) for b in self.history.busy(self.m.target, window)}
        if holder_id(ANY_BACKEND) in busy:  # a statement on a server connection nobody knows: any
            busy |= {holder_id(hold.holder) for hold, _ in self.holds}
        self._busy = busy
        return busy

    # Rule 4: a held lock has its series.
    def series_present(self, labels: dict[str, str], holds: Present) -> None:
        served = self.m.served
        for mode in sorted({h.mode for h, p in holds if p == CERTAIN}):
            self.check("4.series", served.get(HOLDERS, **labels, mode=mode) is not None,
                       f"{HOLDERS}{_labels(**labels, mode=mode)} absent, truth: held ({mode})")
        if any(p == CERTAIN for _, p in holds):
            self.check("4.series", served.get(HELD_SECONDS, **labels) is not None,
                       f"{HELD_SECONDS}{_labels(**labels)} absent, truth: held")
            if self.setup.max_holder_info_per_lock > 0:
                self.check("4.series", bool(served.series(HOLDER_INFO, **labels)),
                           f"{HOLDER_INFO}{_labels(**labels)} absent, truth: held")

    # Rule 5: staleness.
    def staleness(self) -> None:
        bound = self.setup.stale_after
        if bound > 0:
            age = self.m.sent - self.m.poll.timestamp
            self.check("5.stale", age <= bound, f"last_poll_timestamp_seconds {self.m.poll.timestamp:.3f} served to a "
                                        f"scrape sent {age:.3f} s later, truth [.., {bound:.3f}] (stale_after)")


class ProbeRules:
    """Rule 6: each probe try judged once, at the first up-1 scrape that serves it."""

    def __init__(self, ledger: Ledger, history: History) -> None:
        self.ledger, self.history = ledger, history
        self._judged: set[tuple[str, str, str, float]] = set()

    def run(self, setup: TargetSetup, moment: Moment, matches: Matches) -> None:
        served = moment.served
        for lock in setup.locks:
            labels = {"lock": lock.name, "database": lock.database}
            last_run = served.get(PROBE_LAST_RUN, **labels)
            if lock.family or last_run is None or (moment.target, lock.name, lock.database, last_run) in self._judged:
                continue
            self._judged.add((moment.target, lock.name, lock.database, last_run))
            window = Window(last_run - (served.get(PROBE_DURATION, **labels) or 0.0), last_run)
            seen = [p for h, p in self.history.holds(moment.target, window)
                    if h.database == lock.database and matches(lock, h.key)]
            held = (CERTAIN in seen, bool(seen))  # certainly held, possibly held (an exclusive try: any mode)
            self.judge(lock, labels, served, held, moment, window)

    def judge(self, lock: NamedLock, labels: dict[str, str], served: Served, held: tuple[bool, bool],
              moment: Moment, window: Window) -> None:
        truth = "held" if held[0] else "free" if not held[1] else "held or free"
        where = f", truth {truth} at the try [{window.lo:.3f}, {window.hi:.3f}] (scrape sent {moment.sent:.3f})"
        acquirable = served.get(PROBE_ACQUIRABLE, **labels)
        trusted = served.get(PROBE_TRUSTED, **labels)
        if acquirable is not None and trusted != 0:
            agrees = not (acquirable == 1 and held[0]) and not (acquirable == 0 and not held[1])
            self.ledger.check("6.acquirable", agrees, None, moment.target, moment.received,
                              f"{PROBE_ACQUIRABLE}{_labels(**labels)} served {_value(acquirable)} with "
                              f"probe_trusted {trusted if trusted is None else _value(trusted)}{where}")
        if served.get(PROBE_OK, **labels) == 1 and lock.probe_expect in ("free", "held"):
            agrees = not held[0] if lock.probe_expect == "free" else held[1]
            self.ledger.check("6.ok", agrees, None, moment.target, moment.received,
                              f"{PROBE_OK}{_labels(**labels)} served 1 (expect {lock.probe_expect}){where}")


def counters(ledger: Ledger, history: History, setup: TargetSetup, before: Moment, now: Moment,
             matches: Matches) -> None:
    """Rule 7 on two up-1 scrapes of a target in a row: acquisitions_total never decreases, and
    grows by no more than the holds whose grant could lie between the two polls' windows."""
    for lock in setup.locks:
        labels = {"lock": lock.name, "database": lock.database}
        old, new = before.served.get(ACQUISITIONS, **labels), now.served.get(ACQUISITIONS, **labels)
        if old is None or new is None:
            continue
        name = f"{ACQUISITIONS}{_labels(**labels)}"
        ledger.check("7.monotone", new >= old, now, now.target, now.received,
                     f"{name} served {_value(new)} after {_value(old)}, truth [{_value(old)}, ..]")
        grants = sum(1 for h in history.granted_between(now.target, before.window.lo, now.window.hi)
                     if h.database == lock.database and matches(lock, h.key))
        ledger.check("7.growth", new - old <= grants, now, now.target, now.received,
                     f"{name} served {_value(new)} after {_value(old)}, truth [.., {_value(old + grants)}] "
                     f"({grants} grants could lie since the poll read in [{before.window.lo:.3f}, "
                     f"{before.window.hi:.3f}])")


def _is(series: dict[str, str], ident: tuple[str, str, str | None]) -> bool:
    return (series.get("key") == ident[0] and series.get("pid") == ident[1]
            and (ident[2] is None or series.get("application_name") == ident[2]))


def _short(series: dict[str, str]) -> dict[str, str]:
    return {k: series[k] for k in ("lock", "database", "key", "pid", "application_name") if k in series}

