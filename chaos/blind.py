"""Rule 8 of README "What the exporter promises": a "don't know" (up 0, or no answer) is allowed only
inside a blinding fault of that target, from its start to its end plus the recovery bound (the
reconnect back-off cap plus two intervals in force); and after every fault a good poll comes within
that bound. Also measures, per fault kind, the blind seconds and the recovery time."""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from .oracle import Scrape, TargetSetup, Verdict
from .rules import Ledger, TargetLog
from .served import INTERVAL, LAST_POLL, LAST_POLL_DURATION, Served
from .truth import Fault

EVERY_TARGET = ("exporter", "*")  # fault targets that hit every target of the exporter


@dataclass
class Seen:
    """The answers of one target, in the order they were asked (after its first up-1 answer)."""

    target: str
    setup: TargetSetup
    answers: list[tuple[Scrape, Served]]
    never_up: list[Scrape] = field(default_factory=list)  # every answer, when none said up 1

    def __post_init__(self) -> None:
        ups = [(s.sent, a.get(INTERVAL) or 0.0) for s, a in self.answers if a.up]
        self._times = [t for t, _ in ups]
        self._intervals = [i for _, i in ups]

    def interval_near(self, when: float) -> float:
        """The interval in force served by the last up-1 answer asked by `when` (else the first after)."""
        if not self._times:
            return 0.0
        at = bisect.bisect_right(self._times, when)
        return self._intervals[max(at - 1, 0)]

    def window(self, fault: Fault) -> tuple[float, float]:
        """When the fault may keep this target blind: [its start, its end + the recovery bound]."""
        if fault.ended is None:
            return fault.began.lo, math.inf
        return fault.began.lo, fault.ended.hi + self.recovery_bound(fault)

    def recovery_bound(self, fault: Fault) -> float:
        end = fault.began.hi if fault.ended is None else fault.ended.hi
        interval = max(self.interval_near(fault.began.lo), self.interval_near(end))
        return self.setup.reconnect_backoff_max + 2 * interval

    def stretches(self) -> list[tuple[int, int]]:
        """Runs of blind answers: (index of the first, index after the last)."""
        runs, start = [], None
        for at, (_, answer) in enumerate(self.answers):
            if not answer.up and start is None:
                start = at
            elif answer.up and start is not None:
                runs.append((start, at))
                start = None
        if start is not None:
            runs.append((start, len(self.answers)))
        return runs


def answers(scrapes: list[Scrape], setups: dict[str, TargetSetup]) -> list[Seen]:
    """Per target of `setups`: its answers in the order asked, from its first up-1 answer on."""
    seen, parsed = [], {}  # text -> Served: the same poll is served to several scrapes, parsed once
    for name, setup in setups.items():
        mine = [(s, parsed.get(s.text) or parsed.setdefault(s.text, Served.parse(s.text)))
                for s in sorted(scrapes, key=lambda s: s.sent) if s.target == name]
        first = next((at for at, (_, served) in enumerate(mine) if served.up), None)
        if first is not None:
            seen.append(Seen(name, setup, mine[first:]))
        elif mine:
            seen.append(Seen(name, setup, [], never_up=[scrape for scrape, _ in mine]))
    return seen


def hits(fault: Fault, target: str) -> bool:
    return fault.target == target or fault.target in EVERY_TARGET


def judge_blindness(ledger: Ledger, seen: list[Seen], faults: list[Fault]) -> dict[str, TargetLog]:
    """Rule 8 for every target; returns what rule 2 needs of each: when its exporter first saw
    anything, and when it may have been blind (its blind stretches and its blinding faults)."""
    logs = {}
    for one in seen:
        logs[one.target] = _target(ledger, one, [f for f in faults if f.blinds and hits(f, one.target)])
    _measure(ledger, seen, faults)
    return logs


def _target(ledger: Ledger, one: Seen, blinding: list[Fault]) -> TargetLog:
    if one.never_up:  # no start-up ever ended: the whole run blind
        ledger.verdict.count("8.blind")
        ledger.verdict.unexplained_blind.append((one.target, one.never_up[0].sent, one.never_up[-1].received))
        return TargetLog(first_poll=math.inf)
    first = next(a.get(LAST_POLL) for _, a in one.answers if a.up)
    log = TargetLog(first_poll=first if first is not None else -math.inf)
    windows = [one.window(f) for f in blinding]
    log.blind.extend(windows)
    for start, end in one.stretches():
        before = one.answers[start - 1][1] if start > 0 else None
        after = one.answers[end][1] if end < len(one.answers) else None
        log.blind.append((_poll_or(before, -math.inf, read_from=True), _poll_or(after, math.inf)))
        unexplained: list[Scrape] = []
        for scrape, _ in one.answers[start:end]:
            explained = any(lo <= scrape.received and scrape.sent <= hi for lo, hi in windows)
            ledger.verdict.count("8.blind")
            if not explained:
                unexplained.append(scrape)
            elif unexplained:
                ledger.verdict.unexplained_blind.append((one.target, unexplained[0].sent, unexplained[-1].received))
                unexplained = []
        if unexplained:
            ledger.verdict.unexplained_blind.append((one.target, unexplained[0].sent, unexplained[-1].received))
    return log


def _poll_or(answer: Served | None, default: float, read_from: bool = False) -> float:
    """The poll an up-1 answer published (its timestamp; with read_from, the start of its window),
    or `default` where there is none."""
    value = None if answer is None else answer.get(LAST_POLL)
    if value is None or answer is None:
        return default
    return value - (answer.get(LAST_POLL_DURATION) or 0.0) if read_from else value


def _measure(ledger: Ledger, seen: list[Seen], faults: list[Fault]) -> None:
    """Per fault: the blind seconds it covers and the time from its end to a good poll after it
    (on the target it hit; on every target for a fault of the exporter, a console or a pooler)."""
    verdict: Verdict = ledger.verdict
    names = {one.target for one in seen}
    for fault in faults:
        measured = [one for one in seen if one.target == fault.target or fault.target not in names]
        if not measured:
            continue
        verdict.blind.setdefault(fault.kind, []).append(max(_blind_seconds(one, one.window(fault)) for one in measured))
        if fault.ended is None:
            continue
        recoveries = []
        for one in measured:
            ended = _settled(one, fault, faults)
            found = None if ended is None else _recovery(one, ended)
            if found is None:
                continue
            took, scrape = found
            recoveries.append(took)
            if fault.blinds and hits(fault, one.target):
                bound = one.recovery_bound(fault)
                ledger.check("8.recovery", took <= bound, None, one.target, scrape.received,
                             f"recovery after {fault.kind} on {fault.target!r} (ended by {ended:.3f}): first "
                             f"good poll served {took:.3f} s later (scrape sent {scrape.sent:.3f}), truth [.., "
                             f"{bound:.3f}] (reconnect back-off cap plus two intervals)")
        if recoveries:
            verdict.recovery.setdefault(fault.kind, []).append(max(recoveries))


def _settled(one: Seen, fault: Fault, faults: list[Fault]) -> float | None:
    """When the target was free of blinding faults again after `fault`: its end, or the end of a
    blinding fault that began before the target had to recover from the one before (None: never
    ended). Recovery is measured from there: a fault that strikes during a recovery restarts it."""
    if fault.ended is None:
        return None
    ended = fault.ended.hi
    others = [f for f in faults if f.blinds and hits(f, one.target) and f is not fault]
    moved = True
    while moved:
        moved = False
        for other in others:
            if other.began.lo <= ended + one.recovery_bound(fault) and (other.ended is None or other.ended.hi > ended):
                if other.ended is None:
                    return None
                ended, moved = other.ended.hi, True
    return ended


def _blind_seconds(one: Seen, window: tuple[float, float]) -> float:
    """Blind time inside the window: each stretch from its first blind answer's request to the
    next up-1 answer's request (the last blind one's answer, at the end of the run)."""
    total = 0.0
    for start, end in one.stretches():
        lo = one.answers[start][0].sent
        hi = one.answers[end][0].sent if end < len(one.answers) else one.answers[end - 1][0].received
        total += max(0.0, min(hi, window[1]) - max(lo, window[0]))
    return total


def _recovery(one: Seen, ended: float) -> tuple[float, Scrape] | None:
    """Seconds from a fault's end to the first up-1 answer whose poll was read after it, and that answer."""
    for scrape, answer in one.answers:
        polled = answer.get(LAST_POLL) if answer.up else None
        if polled is not None and polled > ended:
            return polled - ended, scrape
    return None
