"""poll_interval: auto: each next interval from the measured cost of recent polls, so that the
poller's share of one server core (cost / interval) stays within max_db_time_share, inside the
bounds. Pure: the poller measures, this decides.

The cost of a poll is the duration of the statements it ran on the server (a round trip, which
bounds the server's time from above). A cost that rises is followed at once (the next interval is
made from the larger of the last cost and the recent average), so a server that slows down gets a
longer interval from the next poll on; a cost that falls is followed as the average falls, so one
quick poll does not shorten the interval much.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

WINDOW_SECONDS = 60.0  # db_time_ratio is measured over the last minute
SMOOTHING = 0.3  # weight of the newest cost in the recent average


@dataclass(frozen=True)
class AutoInterval:
    """The budget and bounds of poll_interval: auto."""

    share: float  # max_db_time_share, a fraction of one core (0.005 for 0.5%)
    minimum: float  # min_poll_interval, seconds
    maximum: float  # max_poll_interval, seconds


class IntervalController:
    """The interval in force, and the share of a core the polls took over the last minute.

    Between two polls: interval is within [minimum, maximum] and, bounds permitting, at least the
    cost estimate divided by the share; the costs remembered are those of polls that ended in the
    last minute (by the poller's clock)."""

    def __init__(self, auto: AutoInterval) -> None:
        self.auto = auto
        self.interval = auto.minimum
        self._average: float | None = None
        self._recent: deque[tuple[float, float]] = deque()  # (when the poll ended, its cost)
        self._first: float | None = None

    def record(self, cost: float, now: float) -> float:
        """One poll's cost (seconds on the server), ended at now: the next interval."""
        self._average = cost if self._average is None else SMOOTHING * cost + (1 - SMOOTHING) * self._average
        estimate = max(cost, self._average)
        self.interval = min(max(estimate / self.auto.share, self.auto.minimum), self.auto.maximum)
        if self._first is None:
            self._first = now - cost
        self._recent.append((now, cost))
        while self._recent and self._recent[0][0] < now - WINDOW_SECONDS:
            self._recent.popleft()
        return self.interval

    def ratio(self, now: float) -> float:
        """The polls' time on the server over the last minute (or since the first poll, if less),
        as a fraction of that time."""
        if self._first is None:
            return 0.0
        span = min(WINDOW_SECONDS, max(now - self._first, 1e-9))
        return sum(cost for ended, cost in self._recent if ended >= now - WINDOW_SECONDS) / span
