"""poll_interval: auto, the controller alone: costs in, intervals out."""

from __future__ import annotations

import random

import pytest

from exporter.interval import AutoInterval, IntervalController

BUDGET = AutoInterval(share=0.005, minimum=0.1, maximum=30.0)


def drive(controller: IntervalController, costs: list[float], start: float = 0.0) -> list[float]:
    """Polls of these costs, each starting one interval after the last: the intervals chosen."""
    now, intervals = start, []
    for cost in costs:
        intervals.append(controller.record(cost, now + cost))
        now += intervals[-1]
    return intervals


def test_the_interval_keeps_the_polls_within_the_share() -> None:
    intervals = drive(IntervalController(BUDGET), [0.001] * 20)  # 1 ms a poll: 100 locks
    assert intervals[-1] == pytest.approx(0.2)  # 1 ms / 0.5%


def test_the_bounds_win() -> None:
    assert drive(IntervalController(BUDGET), [0.0001] * 5)[-1] == 0.1  # min_poll_interval
    assert drive(IntervalController(BUDGET), [1.0] * 5)[-1] == 30.0  # max_poll_interval: the share is exceeded
    controller = IntervalController(BUDGET)
    controller.record(1.0, 1.0)
    controller.record(1.0, 31.0)
    assert controller.ratio(now=31.0) == pytest.approx(2.0 / 31.0)  # 1 s of every 30: the overrun shows


def test_a_server_that_slows_down_lengthens_the_interval_within_two_polls() -> None:
    controller = IntervalController(BUDGET)
    drive(controller, [0.001] * 20)
    step = drive(controller, [0.010, 0.010], start=100.0)
    assert step[0] == pytest.approx(2.0) and step[1] == pytest.approx(2.0)  # 10 ms / 0.5%, from the next poll on


def test_one_quick_poll_does_not_shorten_the_interval_much() -> None:
    controller = IntervalController(BUDGET)
    drive(controller, [0.010] * 20)
    (after,) = drive(controller, [0.001], start=1000.0)
    assert after > 1.0  # the average still says about 10 ms


@pytest.mark.parametrize("seed", range(5))
def test_over_any_minute_the_ratio_stays_within_the_share_plus_10_percent(seed: int) -> None:
    rng = random.Random(seed)
    controller = IntervalController(BUDGET)
    now = 0.0
    for _ in range(2000):  # noisy costs around 2 ms, with slow spells
        cost = rng.uniform(0.001, 0.003) * (5 if rng.random() < 0.05 else 1)
        interval = controller.record(cost, now + cost)
        if now > 60:
            assert controller.ratio(now + cost) <= BUDGET.share * 1.10
        now += interval
