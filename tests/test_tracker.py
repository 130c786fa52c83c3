"""Hold tracking over polls (pure logic; the real-server side is in test_poller)."""

from exporter.tracker import HoldTracker, Sighting


def test_first_poll_is_a_baseline_and_later_holders_count() -> None:
    t = HoldTracker()
    t.observe(100.0, [Sighting("a", 1, 10.0, 0.0)])
    assert t.acquisitions("a") == 0
    t.observe(101.0, [Sighting("a", 1, 10.0, 0.0), Sighting("a", 2, 11.0, 0.0)])
    assert t.acquisitions("a") == 1
    # Released and taken again by the same session between polls is seen only if a poll misses it.
    t.observe(102.0, [])
    t.observe(103.0, [Sighting("a", 1, 10.0, 0.0)])
    assert t.acquisitions("a") == 2


def test_a_reused_pid_with_a_new_backend_start_is_a_new_holder() -> None:
    t = HoldTracker()
    t.observe(0.0, [Sighting("a", 7, 1.0, 0.0)])
    t.observe(5.0, [Sighting("a", 7, 2.0, 0.0)])
    assert t.acquisitions("a") == 1
    assert t.held_seconds(5.0, "a", 7, 2.0) == 0.0


def test_the_earliest_proven_start_wins() -> None:
    t = HoldTracker()
    t.observe(100.0, [Sighting("a", 1, None, 0.0)])  # active: nothing proven
    assert t.held_seconds(100.0, "a", 1, None) == 0.0
    t.observe(110.0, [Sighting("a", 1, None, 30.0)])  # now idle for 30 s: started by 80
    assert t.held_seconds(110.0, "a", 1, None) == 30.0
    t.observe(120.0, [Sighting("a", 1, None, 1.0)])  # a later, weaker proof changes nothing
    assert t.held_seconds(120.0, "a", 1, None) == 40.0
