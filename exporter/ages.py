"""One way to write an age or a count for people: the landing page, the `locks` command, the config's
summary and its messages."""

from __future__ import annotations


def age(seconds: float | None, at_least: bool = False) -> str:
    """41s, 2m13s, 1h05m; '≥' in front for a proven lower bound; '?' when nothing is known."""
    if seconds is None:
        return "?"
    s = int(seconds)
    text = f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
    return ("≥" if at_least else "") + text


def counted(number: int, noun: str, plural: str | None = None) -> str:
    """'1 family', '2 families', '0 locks': a count and its noun in agreement. The plural is the
    noun with -s (-ies after a consonant's y, -es after s, x, ch, sh) unless given."""
    if number == 1:
        return f"{number} {noun}"
    if plural is None:
        if noun.endswith("y") and noun[-2:-1] not in tuple("aeiou"):
            plural = noun[:-1] + "ies"
        elif noun.endswith(("s", "x", "ch", "sh")):
            plural = noun + "es"
        else:
            plural = noun + "s"
    return f"{number} {plural}"
