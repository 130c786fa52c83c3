"""One way to write an age for people: the landing page and the `locks` command."""

from __future__ import annotations


def age(seconds: float | None, at_least: bool = False) -> str:
    """41s, 2m13s, 1h05m; '≥' in front for a proven lower bound; '?' when nothing is known."""
    if seconds is None:
        return "?"
    s = int(seconds)
    text = f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
    return ("≥" if at_least else "") + text
