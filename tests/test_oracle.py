"""The chaos oracle's rules (README: What the exporter promises), each fed a hand-made truth beside
an exposition that keeps the rule (no lie, and checks made) and one that breaks it (exactly that
rule's lie found), so no rule is a check that cannot fail. No server: the truth and the scrapes are
written here."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from chaos.oracle import NamedLock, Scrape, TargetSetup, Verdict, judge
from chaos.served import INTERVAL, LAST_POLL_DURATION, Served
from chaos.truth import ANY_BACKEND, EXCLUSIVE, SHARED, TX_POOL, Busy, Fault, Hold, Holder, Span, Truth, Wait
from exporter.metrics import render
from exporter.snapshot import Holder as Shown
from exporter.snapshot import LockState, PollStats, ProbeResult, ReloadStatus, Snapshot

T0 = 1_700_000_000.0
P = "pg_advisory_lock_"
JOB = (0, 42, 1)  # pg_advisory_lock(42)
UNNAMED = (0, 99, 1)  # pg_advisory_lock(99): nobody names it


def tenant(n: int) -> tuple[int, int, int]:
    """pg_advisory_lock(7, n): a key of the family `tenants`."""
    return (7, n, 2)


LOCKS = (
    NamedLock("job", "app", lambda key: key == JOB, probe_expect="free"),
    NamedLock("tenants", "app", lambda key: key[0] == 7 and key[2] == 2, family=True),
)


def setup(cap: int = 10, stale_after: float = 3.0, backoff: float = 5.0) -> dict[str, TargetSetup]:
    return {"": TargetSetup("", LOCKS, ("app",), max_holder_info_per_lock=cap, reconnect_backoff_max=backoff,
                            stale_after=stale_after)}


def at(lo: float, width: float = 0.01) -> Span:
    """An event of the truth somewhere inside [T0 + lo, T0 + lo + width]."""
    return Span(T0 + lo, T0 + lo + width)


def session(pid: int = 100, app: str = "w1") -> Holder:
    return Holder(pid=pid, backend_start=T0 - 100, application_name=app)


def hold(granted: float, released: float | None = None, key: tuple[int, int, int] = JOB, mode: str = EXCLUSIVE,
         holder: Holder | None = None, **more: Any) -> Hold:
    """A hold of database app granted at T0 + granted (released at T0 + released, or never)."""
    return Hold("", "app", key, mode, holder or session(), at(granted), None if released is None else at(released),
                **more)


@dataclass
class Expo:
    """An exposition written by hand, in the exporter's family names; `text` renders it."""

    poll: float  # seconds after T0 the poll's rows arrived
    duration: float = 0.01
    interval: float = 1.0
    up: int = 1
    samples: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)

    def add(self, name: str, value: float, **labels: str) -> "Expo":
        self.samples.setdefault(name, []).append((labels, value))
        return self

    def lock(self, name: str, exclusive: int = 0, shared: int = 0, waiters: int = 0, held: float = 0.0,
             acquisitions: float | None = None, pooled: int | None = None) -> "Expo":
        """Every series of a named lock, as an up-1 poll serves it."""
        the = {"lock": name, "database": "app"}
        self.add("holders", exclusive, **the, mode=EXCLUSIVE).add("holders", shared, **the, mode=SHARED)
        self.add("waiters", waiters, **the).add("held_seconds", held, **the)
        if acquisitions is not None:
            self.add("acquisitions_total", acquisitions, **the)
        if pooled is not None:
            self.add("pooled_session_holders", pooled, **the)
        return self

    def info(self, lock: str, key: str, pid: str, app: str) -> "Expo":
        return self.add("holder_info", 1, lock=lock, database="app", key=key, pid=pid, application_name=app,
                        usename="u", client_addr="", state="idle", source="config", pooler="")

    def unnamed(self, holders: int = 0, waiters: int = 0, held: float = 0.0) -> "Expo":
        return (self.add("unnamed_holders", holders, database="app").add("unnamed_waiters", waiters, database="app")
                .add("unnamed_held_seconds", held, database="app"))

    def probe(self, last_run: float, acquirable: int | None, ok: int | None, trusted: int = 1) -> "Expo":
        the = {"lock": "job", "database": "app"}
        self.add("probe_trusted", trusted, **the).add("probe_duration_seconds", 0.01, **the)
        self.add("probe_last_run_timestamp_seconds", T0 + last_run, **the)
        if acquirable is not None:
            self.add("probe_acquirable", acquirable, **the)
        if ok is not None:
            self.add("probe_ok", ok, **the)
        return self

    def text(self) -> str:
        lines = [f"# TYPE {P}exporter_up gauge", f"{P}exporter_up {self.up}",
                 f"# TYPE {P}exporter_poll_interval_seconds gauge",
                 f"{P}exporter_poll_interval_seconds {self.interval}"]
        if self.up:
            lines += [f"# TYPE {P}exporter_last_poll_timestamp_seconds gauge",
                      f"{P}exporter_last_poll_timestamp_seconds {T0 + self.poll!r}",
                      f"# TYPE {P}exporter_last_poll_duration_seconds gauge",
                      f"{P}exporter_last_poll_duration_seconds {self.duration}"]
            for name, samples in self.samples.items():
                kind = "counter" if name.endswith("_total") else "gauge"
                lines.append(f"# TYPE {P}{name} {kind}")
                for labels, value in samples:
                    pairs = ",".join(f'{k}="{v}"' for k, v in labels.items())
                    lines.append(f"{P}{name}{{{pairs}}} {value}")
        return "\n".join(lines) + "\n"

    def scrape(self, late: float = 0.2) -> Scrape:
        return Scrape("", T0 + self.poll + late, T0 + self.poll + late + 0.01, self.text())


def free(poll: float, **more: float) -> Expo:
    """Nothing held, nothing awaited."""
    return Expo(poll, **more).lock("job", acquisitions=0).lock("tenants", acquisitions=0).unnamed()


def no_answer(when: float) -> Scrape:
    return Scrape("", T0 + when, T0 + when + 0.01, "")


def down(when: float) -> Scrape:
    return Scrape("", T0 + when, T0 + when + 0.01, Expo(0, up=0).text())


def verdict(holds: list[Hold], expos: list[Expo | Scrape], waits: Sequence[Wait] = (), faults: Sequence[Fault] = (),
            busy: Sequence[Busy] = (), **told: Any) -> Verdict:
    """The oracle's verdict on hand-made answers (an Expo is scraped 0.2 s after its poll)."""
    scrapes = [e if isinstance(e, Scrape) else e.scrape() for e in expos]
    return judge(Truth(list(holds), list(waits), list(faults), list(busy)), scrapes, setup(**told))


def lies(found: Verdict) -> set[int]:
    return {lie.rule for lie in found.lies}


def truthful(found: Verdict, *rules: int) -> None:
    assert not found.lies, [lie.what for lie in found.lies]
    assert not found.unexplained_blind, found.unexplained_blind
    for rule in rules:
        assert found.checks.get(rule, 0) > 0, (rule, found.checks)


def caught(found: Verdict, rule: int) -> None:
    assert found.lies and lies(found) == {rule}, [(lie.rule, lie.what) for lie in found.lies]
    for lie in found.lies:
        assert "\n" not in lie.what and any(word in lie.what for word in ("served", "absent", "lacks", "recovery"))


# One session has held key 42 since T0 + 2; the exporter polled before (T0 + 1) and at T0 + 10.
HELD = [hold(2)]


def held(poll: float = 10, exclusive: int = 1, age: float | None = None, pid: str = "100") -> Expo:
    return (Expo(poll).lock("job", exclusive=exclusive, held=poll - 2 if age is None else age, acquisitions=1)
            .info("job", "42", pid, "w1").lock("tenants", acquisitions=0).unnamed())


# Rule 1: counts.
def test_rule1_true_counts_are_no_lie() -> None:
    truthful(verdict(HELD, [free(1), held()]), 1)


def test_rule1_a_holder_count_one_too_high_is_caught() -> None:
    found = verdict(HELD, [free(1), held(exclusive=2)])
    caught(found, 1)
    assert f'{P}holders{{lock="job",database="app",mode="exclusive"}} served 2, truth [1, 1]' in found.lies[0].what


def test_rule1_a_hold_granted_inside_the_polls_window_is_no_lie_either_way() -> None:
    # The poll read pg_locks somewhere inside [T0 + 9.99, T0 + 10]; the grant came inside it.
    inside = [hold(9.995, key=tenant(1), mode=SHARED)]
    seen = free(10).add("holder_info", 1, lock="tenants", database="app", key="7,1", pid="100",
                        application_name="w1")
    seen.samples["holders"][3] = ({"lock": "tenants", "database": "app", "mode": SHARED}, 1)
    truthful(verdict(inside, [free(1), seen]), 1, 3)
    truthful(verdict(inside, [free(1), free(10)]), 1)


def test_rule1_a_grant_surely_inside_the_window_is_excused_and_one_surely_before_it_is_not() -> None:
    inside = [Hold("", "app", JOB, EXCLUSIVE, session(), Span(T0 + 9.992, T0 + 9.998))]
    truthful(verdict(inside, [free(1), free(10)]), 1)
    before = [Hold("", "app", JOB, EXCLUSIVE, session(), Span(T0 + 9.97, T0 + 9.98))]
    unseen = Expo(10).lock("job", acquisitions=0).info("job", "42", "100", "w1").lock("tenants", acquisitions=0)
    caught(verdict(before, [free(1), unseen.unnamed()]), 1)


def test_rule1_a_family_sums_its_keys_and_a_session_holding_both_modes_counts_in_both() -> None:
    truth = [hold(2, key=tenant(1)), hold(3, key=tenant(2)), hold(3, key=tenant(2), mode=SHARED),
             hold(2, key=tenant(1), holder=session(101, "w2"), mode=SHARED),
             hold(2.5, key=tenant(1)), hold(4, key=tenant(1))]  # re-entered twice: still one holder
    infos = [("7,1", "100", "w1"), ("7,2", "100", "w1"), ("7,1", "101", "w2")]

    def expo(exclusive: int) -> Expo:
        out = Expo(10).lock("job", acquisitions=0).lock("tenants", exclusive=exclusive, shared=2, held=8,
                                                        acquisitions=2).unnamed()
        for key, pid, app in infos:
            out.info("tenants", key, pid, app)
        return out

    truthful(verdict(truth, [free(1), expo(2)]), 1, 3)
    caught(verdict(truth, [free(1), expo(3)]), 1)


def test_rule1_waiters_and_the_unnamed_figures() -> None:
    truth = [hold(2, key=UNNAMED), hold(12, waited=at(3), holder=session(101, "w2"))]  # granted after the poll
    gone = [Wait("", "app", JOB, EXCLUSIVE, session(102, "w3"), at(3), at(4))]  # cancelled: no waiter at T0 + 10
    waiting = Expo(10).lock("job", waiters=1, acquisitions=0).lock("tenants", acquisitions=0).unnamed(holders=1, held=8)
    truthful(verdict(truth, [free(1), waiting], waits=gone), 1)
    unnamed_missed = Expo(10).lock("job", waiters=1, acquisitions=0).lock("tenants", acquisitions=0).unnamed(held=8)
    caught(verdict(truth, [free(1), unnamed_missed], waits=gone), 1)
    no_waiter = Expo(10).lock("job", acquisitions=0).lock("tenants", acquisitions=0).unnamed(holders=1, held=8)
    caught(verdict(truth, [free(1), no_waiter], waits=gone), 1)
    unnamed_wait = [Wait("", "app", UNNAMED, SHARED, session(103, "w4"), at(5), None)]

    def expo(waiters: int, held: float = 8) -> Expo:
        return (Expo(10).lock("job", waiters=1, acquisitions=0).lock("tenants", acquisitions=0)
                .unnamed(holders=1, waiters=waiters, held=held))

    truthful(verdict(truth, [free(1), expo(1)], waits=unnamed_wait), 1, 2)
    caught(verdict(truth, [free(1), expo(0)], waits=unnamed_wait), 1)
    caught(verdict(truth, [free(1), expo(1, held=9)], waits=unnamed_wait), 2)


# Rule 2: held_seconds.
def test_rule2_the_true_age_is_no_lie() -> None:
    truthful(verdict(HELD, [free(1), held(age=8.0)]), 2)
    truthful(verdict(HELD, [free(1), held(age=7.2)]), 2)  # seen up to one interval late


def test_rule2_an_age_above_the_true_one_is_caught() -> None:
    caught(verdict(HELD, [free(1), held(age=9.0)]), 2)
    truthful(verdict(HELD, [free(1), held(age=8.01)]), 2)  # granted from T0 + 2, read by T0 + 10, a round trip
    found = verdict(HELD, [free(1), held(age=8.1)])
    caught(found, 2)
    assert f'{P}held_seconds{{lock="job",database="app"}} served 8.1, truth [.., 8.010]' in found.lies[0].what


def test_rule2_an_age_short_by_more_than_an_interval_is_caught() -> None:
    caught(verdict(HELD, [free(1), held(age=6.5)]), 2)


def test_rule2_a_hold_older_than_the_exporters_first_poll_may_be_younger() -> None:
    truthful(verdict(HELD, [held(poll=3, age=0.0), held(age=6.0)]), 2)


def test_rule2_a_hold_that_began_while_the_exporter_was_blind_may_be_younger() -> None:
    began_blind = [hold(3)]
    restart = Fault("restart-fast", "", at(2.4), at(2.8))
    truthful(verdict(began_blind, [free(1), down(2.5), held(age=3.0)], faults=[restart], backoff=8), 2, 8)
    caught(verdict(began_blind, [free(1), held(age=3.0)]), 2)


def test_rule2_counting_the_wait_as_held_time_is_caught() -> None:
    waited = [hold(6, waited=at(2))]  # waited from T0 + 2, granted at T0 + 6
    truthful(verdict(waited, [free(1), held(age=4.0)]), 2)
    caught(verdict(waited, [free(1), held(age=8.0)]), 2)


def test_rule2_counting_the_wait_as_held_time_is_caught_in_the_shape_the_workload_records() -> None:
    """The workload cannot read the clock while it waits: a grant after a wait is recorded with the
    blocking call's whole round trip (from T0 + 2) as both its wait and its grant. The blocker,
    another session, surely held the key then and let go at T0 + 6: the grant came after that."""
    call = Span(T0 + 2, T0 + 6.02)
    blocker = hold(1, released=6, holder=session(200, "w2"))
    waited = Hold("", "app", JOB, EXCLUSIVE, session(), call, waited=call)
    truthful(verdict([blocker, waited], [held(poll=10, age=4.0)]), 2)
    caught(verdict([blocker, waited], [held(poll=10, age=8.0)]), 2)  # counted from the wait's start


def test_rule2_a_retake_no_known_poll_saw_free_keeps_its_age_and_one_a_poll_saw_starts_anew() -> None:
    retaken = [hold(2, released=4), hold(4.5)]
    truthful(verdict(retaken, [free(1), held(age=8.0)]), 2)  # bridged: no known poll in the gap
    truthful(verdict(retaken, [free(1), held(age=5.5)]), 2)  # or seen anew by a poll we never scraped
    seen_free = free(4.3)
    seen_free.samples["acquisitions_total"][0] = ({"lock": "job", "database": "app"}, 1)
    truthful(verdict(retaken, [free(1), seen_free, held(age=5.5)]), 2)
    caught(verdict(retaken, [free(1), seen_free, held(age=8.0)]), 2)


# Rule 3: holder_info and pooled_session_holders.
def test_rule3_a_holder_info_of_a_pid_that_does_not_hold_is_caught() -> None:
    found = verdict(HELD, [free(1), held(pid="999")])
    caught(found, 3)
    assert any('pid="999"' in lie.what and "no such holder" in lie.what for lie in found.lies)


def test_rule3_the_cap_serves_true_holders_and_as_many_as_it_allows() -> None:
    truth = [hold(2, mode=SHARED, holder=session(100 + n, f"w{n}")) for n in range(3)]

    def expo(served: int) -> Expo:
        out = Expo(10).lock("job", shared=3, held=8, acquisitions=3).lock("tenants", acquisitions=0).unnamed()
        for n in range(served):
            out.info("job", "42", str(100 + n), f"w{n}")
        return out

    truthful(verdict(truth, [free(1), expo(2)], cap=2), 3)
    caught(verdict(truth, [free(1), expo(1)], cap=2), 3)
    caught(verdict(truth, [free(1), expo(3)], cap=2), 3)
    truthful(verdict(truth, [free(1), expo(3)]), 3)
    found = verdict(truth, [free(1), expo(2)])  # within the cap, every holder has its series
    caught(found, 3)
    assert "lacks key=42 pid='102' application_name='w2', truth: it holds" in found.lies[0].what


def test_rule3_a_prepared_transaction_is_a_holder_of_its_own() -> None:
    prepared = Holder(pid=None, gid="nightly-7")
    truth = [hold(2, released=5, holder=session(100)), hold(5, holder=prepared)]  # PREPARE at T0 + 5

    def expo(pid: str, app: str) -> Expo:
        return (Expo(10).lock("job", exclusive=1, held=5, acquisitions=1).info("job", "42", pid, app)
                .lock("tenants", acquisitions=0).unnamed())

    truthful(verdict(truth, [free(1), expo("", "nightly-7")]), 1, 2, 3)
    caught(verdict(truth, [free(1), expo("100", "w1")]), 3)


def test_rule3_a_stranded_pooled_hold_is_counted_and_its_holder_info_compared_by_pid() -> None:
    stranded = [hold(2, via=TX_POOL, stranded=at(3))]

    def expo(pooled: int) -> Expo:
        return (Expo(10).lock("job", exclusive=1, held=8, acquisitions=1, pooled=pooled)
                .info("job", "42", "100", "the-client-it-serves-now").lock("tenants", acquisitions=0).unnamed())

    truthful(verdict(stranded, [free(1), expo(1)]), 3)
    caught(verdict(stranded, [free(1), expo(0)]), 3)
    # Its server connection lent to a client in a transaction (or a wait) around the poll: the
    # exporter cannot prove it idle, so 0 is no lie there (nor is 1).
    lent = hold(9, released=10.5, key=UNNAMED, level="xact", via=TX_POOL)
    truthful(verdict(stranded + [lent], [free(1), expo(0).add("unnamed_holders", 1, database="app")]), 3)
    waiting = Wait("", "app", UNNAMED, EXCLUSIVE, session(), at(9.5), at(10.5))
    truthful(verdict(stranded, [free(1), expo(0).add("unnamed_waiters", 1, database="app")], waits=[waiting]), 3)
    # A client's transaction began on it just before the poll and took its first lock just after
    # (seen in two short runs): no grant inside the window, but the transaction was.
    begun = Busy("", session(), at(9.9), at(10.2))
    truthful(verdict(stranded, [free(1), expo(0)], busy=[begun]), 3)
    caught(verdict(stranded, [free(1), expo(0)], busy=[Busy("", session(), at(11), at(12))]), 3)
    # Another client's strand ran on it around the poll, one statement through the pool (found by
    # the 30-minute run: that statement's grant came after the read, its backend active at it).
    strand = Busy("", session(), at(9.99), at(10.2))
    truthful(verdict(stranded, [free(1), expo(0)], busy=[strand]), 3)
    # ... or a strand that failed, on a server connection nobody knows: any may have run it.
    truthful(verdict(stranded, [free(1), expo(0)], busy=[Busy("", ANY_BACKEND, at(9.99), at(10.2))]), 3)
    caught(verdict(stranded, [free(1), expo(0)], busy=[Busy("", ANY_BACKEND, at(11), at(12))]), 3)


# Rule 4: a held lock has its series.
def test_rule4_a_held_lock_with_no_series_is_caught() -> None:
    truthful(verdict(HELD, [free(1), held()]), 4)
    bare = Expo(10).add("acquisitions_total", 1, lock="job", database="app").lock("tenants", acquisitions=0).unnamed()
    caught(verdict(HELD, [free(1), bare]), 4)
    no_holders = held()
    no_holders.samples["holders"] = no_holders.samples["holders"][2:]  # job's two series gone
    found = verdict(HELD, [free(1), no_holders])
    caught(found, 4)
    assert len(found.lies) == 1 and found.lies[0].what.startswith(
        f'{P}holders{{lock="job",database="app",mode="exclusive"}} absent, truth: held (exclusive)')


# Rule 5: staleness.
def test_rule5_a_poll_older_than_the_bound_is_caught() -> None:
    truthful(verdict(HELD, [free(1), held()]), 5)
    found = verdict(HELD, [free(1), held().scrape(late=3.5)])
    caught(found, 5)
    assert "truth [.., 3.000] (stale_after)" in found.lies[0].what


# Rule 6: the probe.
def test_rule6_a_try_that_agrees_with_the_truth_is_no_lie() -> None:
    truthful(verdict(HELD, [free(1).probe(0.5, acquirable=1, ok=1), held().probe(9.5, acquirable=0, ok=0)]), 6)
    truthful(verdict(HELD, [free(1), held().probe(9.5, acquirable=None, ok=None, trusted=0)]))


def test_rule6_trusted_and_acquirable_while_another_session_holds_it_is_caught() -> None:
    found = verdict(HELD, [free(1), held().probe(9.5, acquirable=1, ok=1)])
    caught(found, 6)
    assert len(found.lies) == 2  # probe_acquirable, and probe_ok (expect free)


def test_rule6_a_try_during_a_grant_is_excused() -> None:
    truthful(verdict(HELD, [free(1).probe(2.005, acquirable=1, ok=1), held()]))
    truthful(verdict(HELD, [free(1).probe(2.005, acquirable=0, ok=0), held()]))


# Rule 7: acquisitions_total.
def test_rule7_a_counter_that_counts_each_new_holder_once_is_no_lie() -> None:
    truthful(verdict(HELD, [free(1), held(5), held(10)]), 7)


def test_rule7_a_counter_that_decreases_is_caught() -> None:
    later = held(10)
    later.samples["acquisitions_total"][0] = ({"lock": "job", "database": "app"}, 0)
    caught(verdict(HELD, [held(5), later]), 7)


def test_rule7_a_counter_that_counts_one_hold_twice_is_caught() -> None:
    later = held(10)
    later.samples["acquisitions_total"][0] = ({"lock": "job", "database": "app"}, 2)
    found = verdict(HELD, [free(1), held(5), later])
    caught(found, 7)
    assert "0 grants could lie" in found.lies[0].what


def test_rule7_holds_across_blind_answers() -> None:
    """The exporter process runs on through a fault, and its counters with it: across a blind
    stretch the counter neither falls nor counts a hold that lived through the fault again."""
    restarted = Fault("restart-fast", "", at(5.5), at(6))
    fell = held(10)
    fell.samples["acquisitions_total"][0] = ({"lock": "job", "database": "app"}, 0)
    caught(verdict(HELD, [held(5), down(6), fell], faults=[restarted], backoff=8), 7)
    counted_again = held(10)
    counted_again.samples["acquisitions_total"][0] = ({"lock": "job", "database": "app"}, 2)
    caught(verdict(HELD, [held(5), down(6), counted_again], faults=[restarted], backoff=8), 7)
    truthful(verdict(HELD, [held(5), down(6), held(10)], faults=[restarted], backoff=8))


# Rule 8: blind time.
def test_rule8_blind_inside_a_blinding_fault_and_its_recovery_bound_is_no_lie() -> None:
    restart = Fault("restart-fast", "", at(2.5), at(3.5))
    found = verdict([], [free(1), down(2.6), no_answer(3.6), free(5)], faults=[restart])
    truthful(found, 8)
    assert found.blind["restart-fast"] == [pytest.approx(2.6)]  # from the first blind request to the next good one
    assert found.recovery["restart-fast"] == [pytest.approx(1.49)]


def test_rule8_blind_with_no_fault_is_unexplained() -> None:
    found = verdict([], [free(1), down(2), no_answer(3), free(4)])
    assert not found.lies and found.unexplained_blind == [("", T0 + 2, T0 + 3.01)] and not found.ok


def test_rule8_blind_during_a_fault_that_blinds_nothing_is_unexplained() -> None:
    console = Fault("console-hang", "console", at(1.5), at(5), blinds=False)
    found = verdict([], [free(1), down(2), down(3), free(6)], faults=[console])
    assert not found.lies and found.unexplained_blind == [("", T0 + 2, T0 + 3.01)]
    assert found.blind["console-hang"] and found.recovery["console-hang"]


def test_rule8_a_slow_recovery_is_caught() -> None:
    freeze = Fault("freeze", "", at(2.5), at(3.5))
    found = verdict([], [free(1), down(3), down(9), down(13), free(20)], faults=[freeze])
    caught(found, 8)
    assert found.unexplained_blind == [("", T0 + 13, T0 + 13.01)]  # after T0 + 3.51 + 5 + 2 x 1


def test_start_up_is_not_judged() -> None:
    truthful(verdict(HELD, [down(0.5), no_answer(0.8), free(1)]))


def test_a_target_never_up_is_blind_all_along() -> None:
    found = verdict(HELD, [down(0.5), no_answer(0.8), down(1)])
    assert found.unexplained_blind == [("", T0 + 0.5, T0 + 1.01)] and not found.ok


# The whole: a truthful run makes checks in every rule and is ok.
def test_a_truthful_run_is_ok() -> None:
    restart = Fault("restart-fast", "", at(10.5), at(11))
    later = Expo(12).lock("job", acquisitions=1, pooled=0).lock("tenants", acquisitions=0).unnamed()
    found = verdict([hold(2, released=10.6)], [free(1).probe(0.5, acquirable=1, ok=1),
                                               held(5).probe(4.5, acquirable=0, ok=0), held(10), down(11), later],
                    faults=[restart])
    truthful(found, *range(1, 9))
    assert found.unchecked == [], found.clauses
    assert found.ok


def test_a_clause_that_never_checked_fails_the_run() -> None:
    found = verdict(HELD, [held(5)])
    truthful(found, 1)
    assert "6.ok" in found.unchecked and "8.recovery" in found.unchecked and not found.ok


def test_targets_are_judged_apart() -> None:
    """Targets mode: a hold of server b is no holder of target a, and a fault of a blinds nothing on b."""
    told = {name: TargetSetup(name, LOCKS, ("app",), stale_after=3.0) for name in ("a", "b")}
    on_b = [Hold("b", "app", JOB, EXCLUSIVE, session(), at(2))]
    freeze_a = Fault("freeze", "a", at(2.5), at(3))

    def answer(target: str, expo: Expo | None, when: float) -> Scrape:
        text = Expo(0, up=0).text() if expo is None else expo.text()
        return Scrape(target, T0 + when + 0.2, T0 + when + 0.21, text)

    scrapes = [answer("a", free(1), 1), answer("b", free(1), 1), answer("a", None, 3), answer("b", None, 3),
               answer("a", free(10), 10), answer("b", held(10), 10)]
    found = judge(Truth(on_b, [], [freeze_a]), scrapes, told)
    assert not found.lies, [lie.what for lie in found.lies]
    assert found.unexplained_blind == [("b", T0 + 3.2, T0 + 3.21)]
    wrong = [answer("a", free(1), 1), answer("a", held(10), 10)]
    found = judge(Truth(on_b, [], []), wrong, told)
    assert lies(found) == {1, 2, 3, 7} and all(lie.target == "a" for lie in found.lies)


def test_a_body_that_is_no_exposition_is_no_answer() -> None:
    found = verdict([], [free(1), Scrape("", T0 + 2, T0 + 2.01, "<html>502 Bad Gateway</html>\n"), free(3)])
    assert not found.lies and found.unexplained_blind == [("", T0 + 2, T0 + 2.01)]


def test_rule8_a_fault_during_a_recovery_restarts_it() -> None:
    first = Fault("restart-fast", "", at(2.5), at(3.5))
    second = Fault("freeze", "", at(9), at(12))  # before the first's recovery bound (T0 + 10.51) ran out
    found = verdict([], [free(1), down(3), down(9), down(13), free(15)], faults=[first, second])
    truthful(found, 8)
    assert found.recovery == {"restart-fast": [pytest.approx(2.99)], "freeze": [pytest.approx(2.99)]}


def test_the_exporters_own_exposition_is_read() -> None:
    """What exporter.metrics renders (HELP lines, every family) is what the rules read: a lock held
    since T0 + 2, polled at T0 + 10, judged truthful; the same with one holder too many, a lie."""
    def rendered(exclusive: int) -> Scrape:
        holder = Shown(100, T0 - 100, frozenset({EXCLUSIVE}), "w1", "u", "", "idle", 2.0, "42", "")
        job = LockState("job", "app", exclusive, 0, 2.0, 0, 0.0, 1, info_holders=(holder,), holds=1, key="42")
        snapshot = Snapshot(up=True, locks=(job,), stats=PollStats(polls=9, last_success_timestamp=T0 + 10,
                                                                     last_success_round_trip=0.01, interval=1.0),
                            taken_at=10.0, wall_at=T0 + 10)
        probe = ProbeResult("job", "app", False, False, 0.01, 0, T0 + 9.5)
        text = render(snapshot, (probe,), ReloadStatus(True, T0)).decode()
        return Scrape("", T0 + 10.2, T0 + 10.21, text)

    truthful(verdict(HELD, [free(1), rendered(1)]), 1, 2, 3, 4, 5, 6, 7)
    caught(verdict(HELD, [free(1), rendered(2)]), 1)
    served = Served.parse(rendered(1).text)
    assert (served.get(LAST_POLL_DURATION), served.get(INTERVAL)) == (0.01, 1.0)


@dataclass
class Memory:
    """What the simulated exporter keeps from one good poll to the next (as exporter/tracker.py)."""

    starts: dict[tuple[Holder, tuple[int, int, int]], float] = field(default_factory=dict)  # first sighting
    # lock -> its holders at the last poll (a family's: holder and key)
    holders: dict[str, set[tuple[Holder, tuple[int, int, int] | None]]] = field(default_factory=dict)
    acquisitions: dict[str, int] = field(default_factory=dict)
    polls: int = 0


class Honest:
    """An exporter that tells the truth as polling can see it, simulated from a random truth: each
    poll reads the true state at one moment inside its window, keeps a hold's start from its first
    sighting while every poll sees it, and counts a holder new when the poll before did not see it.
    The oracle must never call it a liar (so no rule is stricter than polling allows)."""

    KEYS = (JOB, tenant(1), tenant(2), tenant(3), UNNAMED)
    LOCKS = (("job", lambda key: key == JOB), ("tenants", lambda key: key[0] == 7))

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.holds: list[Hold] = []
        self.waits: list[Wait] = []
        # What really happened, inside the recorded spans: id(record) -> (wait or grant, grant or end, release).
        self.actual: dict[int, tuple[float, float, float]] = {}
        for pid in range(100, 106):
            self.session(session(pid, f"w{pid}"))

    def span(self, moment: float) -> Span:
        """The round trip that saw an event: a few ms either side of it."""
        return Span(moment - self.rng.uniform(0, 0.004), moment + self.rng.uniform(0, 0.004))

    def session(self, holder: Holder) -> None:
        """Holds of random keys one after another: short and long, quick re-takes, waits (some
        given up), and re-entries of a key while held."""
        rng, now = self.rng, T0 + self.rng.uniform(0.5, 3)
        while now < T0 + 40:
            key, mode = rng.choice(self.KEYS), rng.choice((EXCLUSIVE, SHARED))
            waits = rng.random() < 0.2
            if waits and rng.random() < 0.3:
                ended = now + rng.uniform(0.05, 1.5)
                self.waits.append(Wait("", "app", key, mode, holder, self.span(now), self.span(ended)))
                self.actual[id(self.waits[-1])] = (now, ended, ended)
                now = ended + rng.uniform(0.001, 0.3)
                continue
            granted = now + (rng.uniform(0.05, 1.5) if waits else 0.0)
            released = granted + rng.choice((rng.uniform(0.02, 0.4), rng.uniform(0.4, 6)))
            self.add(key, mode, holder, granted, released, now if waits else None)
            if rng.random() < 0.15 and released - granted > 0.1:
                self.add(key, mode, holder, granted + 0.05, released - 0.02, None)
            now = released + rng.choice((rng.uniform(0.001, 0.02), rng.uniform(0.02, 1.5)))

    def add(self, key: tuple[int, int, int], mode: str, holder: Holder, granted: float, released: float,
            waited: float | None) -> None:
        hold = Hold("", "app", key, mode, holder, self.span(granted), self.span(released),
                    None if waited is None else self.span(waited))
        self.holds.append(hold)
        self.actual[id(hold)] = (granted if waited is None else waited, granted, released)

    def scrapes(self, interval: float = 0.5, blind: tuple[float, float] | None = None) -> list[Scrape]:
        """Scrapes every 0.2 s of polls every interval; inside `blind` (seconds after T0) every
        poll fails: up 0, and the memory kept for the next good poll."""
        out, memory, expo = [], Memory(), Expo(0, up=0)
        poll, scrape = T0 + 1, T0 + 1.05
        while scrape < T0 + 45:
            while poll <= scrape:
                duration = self.rng.uniform(0.001, 0.02)
                if blind is not None and T0 + blind[0] <= poll < T0 + blind[1]:
                    expo = Expo(0, up=0)
                else:
                    expo = self.poll(poll, duration, interval, memory)
                poll += interval + duration
            out.append(Scrape("", scrape, scrape + 0.002, expo.text()))
            scrape += 0.2
        return out

    def poll(self, at: float, duration: float, interval: float, memory: Memory) -> Expo:
        read = at - self.rng.uniform(0, duration)
        held = [h for h in self.holds if self.actual[id(h)][1] <= read < self.actual[id(h)][2]]
        waiting = [w for w in [*self.holds, *self.waits] if self.actual[id(w)][0] <= read < self.actual[id(w)][1]]
        memory.starts = {(h.holder, h.key): memory.starts.get((h.holder, h.key), read) for h in held}
        expo = Expo(at - T0, duration, interval)
        for name, wanted in self.LOCKS:
            mine = [h for h in held if wanted(h.key)]
            holders = {(h.holder, h.key if name == "tenants" else None) for h in mine}
            new = len(holders - memory.holders.get(name, set())) if memory.polls else 0
            memory.acquisitions[name] = memory.acquisitions.get(name, 0) + new
            memory.holders[name] = holders
            expo.lock(name, exclusive=len({(h.holder, h.key) for h in mine if h.mode == EXCLUSIVE}),
                      shared=len({(h.holder, h.key) for h in mine if h.mode == SHARED}),
                      waiters=len({w.holder for w in waiting if wanted(w.key)}),
                      held=self.age(read, mine, memory), acquisitions=memory.acquisitions[name])
            for holder, key in sorted({(h.holder, h.key) for h in mine}, key=repr):
                expo.info(name, "42" if key == JOB else f"7,{key[1]}", str(holder.pid), holder.application_name)
        unnamed = [h for h in held if h.key == UNNAMED]
        expo.unnamed(holders=len({(h.holder, h.mode) for h in unnamed}),
                     waiters=len({w.holder for w in waiting if w.key == UNNAMED}), held=self.age(read, unnamed, memory))
        memory.polls += 1
        return expo

    @staticmethod
    def age(read: float, holds: list[Hold], memory: Memory) -> float:
        return round(max((read - memory.starts[(h.holder, h.key)] for h in holds), default=0.0), 3)


@pytest.mark.parametrize("seed", range(6))
def test_an_honest_exporter_is_never_called_a_liar(seed: int) -> None:
    honest = Honest(seed)
    found = judge(Truth(honest.holds, honest.waits, []), honest.scrapes(), setup())
    truthful(found, 1, 2, 3, 4, 5, 7)


@pytest.mark.parametrize("seed", range(6))
def test_an_honest_exporter_blinded_by_a_fault_is_never_called_a_liar(seed: int) -> None:
    """Holds that began while it was blind are first seen late: rule 2's lower bound excuses them."""
    honest = Honest(seed)
    blackhole = Fault("net-blackhole", "", Span(T0 + 20, T0 + 20.01), Span(T0 + 23, T0 + 23.01))
    found = judge(Truth(honest.holds, honest.waits, [blackhole]), honest.scrapes(blind=(20, 23)), setup())
    truthful(found, 1, 2, 3, 4, 5, 7, 8)
    assert found.blind["net-blackhole"] and found.recovery["net-blackhole"][0] < 1
