"""Hold tracking over polls (the logic production calls; the real-server side is in test_poller)."""

from exporter.tracker import HoldTracker


def poll(t: HoldTracker, now: float, holds: list[tuple], proven: float = 0.0,
         slack: float = 0.0) -> list[tuple[list[float], set[int]]]:
    """holds: (slot, pid, backend_start, [keys]) of one poll -> (ages, keys seen again) of each."""
    t.begin(now, slack)
    seen = []
    for slot, pid, bstart, keys in holds:
        starts, again = t.see(slot, (pid, bstart, None), keys, proven)
        seen.append(([now - start for start in starts], again))
    t.end()
    return seen


def test_first_poll_is_a_baseline_and_later_holders_count() -> None:
    t = HoldTracker()
    poll(t, 100.0, [("a", 1, 10.0, [7])])
    assert t.acquisitions("a") == 0
    poll(t, 101.0, [("a", 1, 10.0, [7]), ("a", 2, 11.0, [7])])
    assert t.acquisitions("a") == 1
    # Released and taken again between polls is seen only if a poll misses it.
    poll(t, 102.0, [])
    poll(t, 103.0, [("a", 1, 10.0, [7])])
    assert t.acquisitions("a") == 2


def test_a_family_counts_each_key_a_worker_moves_to() -> None:
    t = HoldTracker()
    poll(t, 0.0, [])
    for second, key in enumerate((7, 8, 9), start=1):
        poll(t, float(second), [("tenants", 1, 10.0, [key])])
    assert t.acquisitions("tenants") == 3


def test_a_reused_pid_with_a_new_backend_start_is_a_new_holder() -> None:
    t = HoldTracker()
    poll(t, 0.0, [("a", 7, 1.0, [1])])
    ((ages, _),) = poll(t, 5.0, [("a", 7, 2.0, [1])])
    assert t.acquisitions("a") == 1 and ages == [0.0]


def test_the_earliest_proven_start_wins() -> None:
    t = HoldTracker()
    assert poll(t, 100.0, [("a", 1, None, [1])]) == [([0.0], set())]  # active: nothing proven
    assert poll(t, 110.0, [("a", 1, None, [1])], proven=30.0) == [([30.0], set())]  # idle 30 s: since 80
    assert poll(t, 120.0, [("a", 1, None, [1])], proven=1.0) == [([40.0], set())]  # a weaker proof changes nothing


def test_the_same_hold_in_both_modes_is_seen_again_not_anew() -> None:
    t = HoldTracker()
    poll(t, 0.0, [])
    assert poll(t, 1.0, [("a", 1, 1.0, [5, 6]), ("a", 1, 1.0, [5])]) == [([0.0, 0.0], set()), ([0.0], {5})]
    assert t.acquisitions("a") == 2


def test_tracking_is_bounded_and_old_holds_keep_their_age() -> None:
    t = HoldTracker(max_tracked=2)
    poll(t, 0.0, [("a", 1, 1.0, [1, 2])])
    assert t.tracked == 2
    # Two new holds arrive first: there is no room for them, and the old two keep their start.
    ((ages, _),) = poll(t, 10.0, [("a", 1, 1.0, [3, 4, 1, 2])])
    assert ages == [0.0, 0.0, 10.0, 10.0]
    assert t.dropped == 2 and t.tracked == 2
    # Holds that end are dropped from tracking.
    poll(t, 11.0, [])
    assert t.tracked == 0


def test_a_flood_of_new_holds_fills_the_room_and_no_more() -> None:
    t = HoldTracker(max_tracked=2)
    poll(t, 0.0, [("a", 1, 1.0, [1, 2, 3])])
    assert (t.tracked, t.dropped) == (2, 1)


def test_a_proof_moves_only_the_starts_it_is_earlier_than() -> None:
    t = HoldTracker()
    poll(t, 100.0, [("a", 1, None, [1])])
    poll(t, 110.0, [("a", 1, None, [1, 2])])
    # Both seen before: idle since 105 proves key 2 (first seen at 110) older, and not key 1 (100).
    assert poll(t, 120.0, [("a", 1, None, [1, 2])], proven=15.0) == [([20.0, 15.0], set())]
    # A key seen before beside a new one: the proof applies to both.
    assert poll(t, 130.0, [("a", 1, None, [1, 3])], proven=100.0) == [([100.0, 100.0], set())]


def test_a_negative_idle_time_proves_nothing() -> None:
    t = HoldTracker()
    assert poll(t, 100.0, [("a", 1, None, [1])], proven=-5.0) == [([0.0], set())]


def test_a_hold_with_no_room_is_never_an_acquisition() -> None:
    # Not remembered, such a hold would look new at every poll: counted, it would be an acquisition
    # per poll and move last_acquired with it. Only the hold that found room counts.
    t = HoldTracker(max_tracked=2)
    poll(t, 0.0, [("a", 1, 1.0, [1])])  # the baseline: one hold remembered, room for one more
    poll(t, 10.0, [("a", 1, 1.0, [1]), ("b", 2, 2.0, [5]), ("c", 3, 3.0, [6])])  # b fits, c does not
    assert (t.acquisitions("b"), t.acquisitions("c")) == (1, 0)
    for now in (20.0, 30.0):
        poll(t, now, [("a", 1, 1.0, [1]), ("b", 2, 2.0, [5]), ("c", 3, 3.0, [6])])
    assert (t.acquisitions("b"), t.acquisitions("c")) == (1, 0)


def test_a_proof_earlier_by_no_more_than_the_polls_slack_moves_nothing() -> None:
    """A poll's idle time is read on the server somewhere inside its round trip (the slack)."""
    t = HoldTracker()
    poll(t, 100.0, [("a", 1, 10.0, [7, 8])], proven=5.0)  # held since 95.0 at the latest
    ((ages, _),) = poll(t, 101.0, [("a", 1, 10.0, [7, 8])], proven=6.004, slack=0.005)  # 94.996: within the slack
    assert ages == [6.0, 6.0]
    ((ages, _),) = poll(t, 102.0, [("a", 1, 10.0, [8, 7])], proven=7.004, slack=0.001)  # 94.996: beyond it
    assert [round(age, 3) for age in ages] == [7.004, 7.004]


def test_an_idle_time_under_a_second_proves_an_earlier_start() -> None:
    # With polls every 100 ms, a session idle for 0.5 s took its lock at least 0.5 s before the poll.
    t = HoldTracker()
    assert poll(t, 100.0, [("a", 1, None, [1])], proven=0.5) == [([0.5], set())]


def test_the_slack_holds_for_each_key_alone_whether_seen_before_or_new() -> None:
    t = HoldTracker()
    poll(t, 100.0, [("a", 1, 10.0, [7])], proven=5.0)  # 7 since 95.0
    # 7 remembered, 8 new, in one poll: 7 keeps its start within the slack, 8 takes the proof.
    ((ages, _),) = poll(t, 101.0, [("a", 1, 10.0, [7, 8])], proven=6.004, slack=0.005)
    assert [round(age, 3) for age in ages] == [6.0, 6.004]
    t = HoldTracker()
    poll(t, 100.0, [("a", 1, 10.0, [7])])  # 7 since 100 (active: nothing proven)
    poll(t, 102.0, [("a", 1, 10.0, [7, 8])])  # 8 since 102
    # One proof (99.998), within the slack of 7's start, beyond it for 8's: only 8 moves.
    ((ages, _),) = poll(t, 103.0, [("a", 1, 10.0, [7, 8])], proven=3.002, slack=0.005)
    assert [round(age, 3) for age in ages] == [3.0, 3.002]


def test_a_proof_earlier_by_exactly_the_slack_moves_nothing() -> None:
    """"More than the slack" is strict: at the boundary the start stays (fast and slow path)."""
    t = HoldTracker()
    poll(t, 100.0, [("a", 1, 10.0, [7])], proven=5.0)  # 7 since 95.0
    ((ages, _),) = poll(t, 101.0, [("a", 1, 10.0, [7])], proven=6.5, slack=0.5)  # 94.5: exactly 0.5 earlier
    assert ages == [6.0]
    ((ages, _),) = poll(t, 102.0, [("a", 1, 10.0, [7, 8])], proven=7.5, slack=0.5)  # 8 new: the slow path
    assert ages == [7.0, 7.5]
    t = HoldTracker()
    poll(t, 100.0, [("a", 1, 10.0, [7])], proven=5.0)  # 7 since 95.0
    poll(t, 101.0, [("a", 1, 10.0, [7, 8])])  # 8 since 101.0
    # Both remembered (the fast path), one proof: exactly the slack before 7's start, well before 8's.
    ((ages, _),) = poll(t, 102.0, [("a", 1, 10.0, [7, 8])], proven=7.5, slack=0.5)
    assert ages == [7.0, 7.5]


def test_a_start_is_the_earliest_hold_every_poll_since_saw() -> None:
    """docs/metrics.md's Hold age: a hold seen by every poll keeps its start, whatever happened between two
    polls; the first poll that does not see it (released, or only waited for: the assembler hands
    the tracker granted rows only) ends it, and the next sighting starts anew."""
    t = HoldTracker()
    poll(t, 100.0, [("a", 1, 10.0, [7])])
    assert poll(t, 130.0, [("a", 1, 10.0, [7])]) == [([30.0], set())]  # re-taken between the polls, or not
    poll(t, 140.0, [("a", 1, 10.0, [8])])  # a poll that saw 7 free of this session
    assert poll(t, 150.0, [("a", 1, 10.0, [7, 8])]) == [([0.0, 10.0], set())]
    poll(t, 160.0, [])  # the session held nothing (it waited, say)
    assert poll(t, 170.0, [("a", 1, 10.0, [7, 8])]) == [([0.0, 0.0], set())]
