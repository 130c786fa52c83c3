"""Polls and tries run the way the scheduler runs them, from a test."""

from __future__ import annotations

from exporter.poller import Poller
from exporter.scheduler import PollTask, run_call
from exporter.snapshot import Snapshot


def poll_under_deadline(poller: Poller) -> list[Snapshot]:
    """One poll as a worker runs it (scheduler.run_call: under its deadline, given up at it), on
    this thread: what it published (a poll given up publishes up 0 at its deadline, and nothing
    when its call returns after)."""
    published: list[Snapshot] = []
    original = poller._publish  # noqa: SLF001 - the test's own poller
    poller._publish = published.append  # noqa: SLF001
    try:
        run_call(PollTask(poller, None))
    finally:
        poller._publish = original  # noqa: SLF001
    return published
