"""Calls that may hang: the caller stops waiting at a deadline, and no second call starts meanwhile."""

from __future__ import annotations

import threading

import pytest

from exporter.deadline import OneAtATime, StuckCall
from exporter.dsn import BACKOFF_FIRST, reconnect_delay


def test_a_call_that_returns_in_time_gives_its_value_or_its_error() -> None:
    worker = OneAtATime("poll")
    assert worker.call(lambda: 42, timeout=5) == 42
    with pytest.raises(ZeroDivisionError):
        worker.call(lambda: 1 / 0, timeout=5)
    assert not worker.busy


def test_a_stuck_call_is_not_waited_for_and_blocks_the_next_until_it_returns() -> None:
    worker = OneAtATime("poll")
    release = threading.Event()
    with pytest.raises(StuckCall, match="poll did not return within"):
        worker.call(release.wait, timeout=0.05)
    assert worker.busy
    with pytest.raises(StuckCall, match="the previous poll has not returned yet"):
        worker.call(lambda: 1, timeout=5)  # never a second call (connection) behind a hung one
    release.set()
    assert worker.wait_idle(5)  # the stuck call ends once the server answers
    assert worker.call(lambda: 2, timeout=5) == 2


def test_the_reconnect_backoff_doubles_with_jitter_and_is_capped() -> None:
    for failures in range(1, 40):
        delay = reconnect_delay(failures, cap=1.0)
        expected = min(1.0, BACKOFF_FIRST * 2 ** (failures - 1))
        assert expected * 0.5 <= delay <= expected


def test_the_worker_is_kept_between_calls_and_ends_when_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    worker = OneAtATime("poll")
    assert worker.call(threading.get_ident, timeout=5) == worker.call(threading.get_ident, timeout=5)
    monkeypatch.setattr(OneAtATime, "IDLE_SECONDS", 0.05)
    first = worker.call(threading.get_ident, timeout=5)  # the worker now waits 0.05 s for the next call
    thread = worker._thread  # noqa: SLF001
    assert thread is not None
    thread.join(5)
    assert not thread.is_alive()  # idle: it ended, and a discarded caller leaves no thread behind
    assert worker.call(lambda: 3, timeout=5) == 3  # a new worker for the next call
    assert first != 0
