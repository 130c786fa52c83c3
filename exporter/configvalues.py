"""The values of config.yaml, one at a time: durations, integers in a range, lists of names, ${VAR}s.

Each checker takes the value and where it sits ("locks[2].max_hold"), appends one located message
per problem to errors, and returns the value or None; none raises. Pure but for the environment.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

_DURATION_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|d|h|m|s)")  # ASCII digits, as the schema
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
MAX_COUNT = 10_000_000
# Seconds in a float tell one millisecond (the config's unit) from the next below 2**43 s, and
# nothing the exporter adds or multiplies them by comes near overflowing there; beyond, "...ms"
# would be read as another number, and enough digits make a float infinite. So every duration stops
# there, about 278,000 years; one that becomes a server's timeout stops far sooner (config.py).
MAX_DURATION = 2.0**43
MAX_DURATION_WHY = "about 278,000 years: beyond, a float of seconds loses milliseconds"

# (value, where, errors) -> the value, or None after appending the reason to errors.
Checker = Callable[[Any, str, list[str]], Any]


def parse_duration(text: Any) -> float:
    """'500ms', '5s', '1m30s' -> seconds, at most MAX_DURATION. Raises ValueError with the reason."""
    seconds = _seconds(text)
    if seconds > MAX_DURATION:
        raise ValueError(too_long(MAX_DURATION, MAX_DURATION_WHY))
    return seconds


def _seconds(text: Any) -> float:
    """A duration's seconds, however many: infinite when the digits overflow a float."""
    if not isinstance(text, str):
        raise ValueError(f"expected a duration such as 5s or 500ms, got {show(text)}")
    pos, total, last_rank = 0, 0.0, -1
    ranks = list(_DURATION_UNITS)
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        rank = ranks.index(match.group(2))
        if rank <= last_rank:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos, last_rank = match.end(), rank
    if pos != len(text) or not text:
        raise ValueError(f"{text!r} is not a duration: use a number and a unit (ms, s, m, h, d), e.g. 5s")
    return round(total, 9)  # 700ms is 0.7, not 0.7000000000000001 (and too many digits: inf)


def too_long(maximum: float, why: str) -> str:
    """The reason a duration above maximum is refused: the limit, and what sets it."""
    return f"must be at most {format_duration(maximum)} ({why})"


def format_duration(seconds: float) -> str:
    """Seconds -> the shortest config spelling."""
    if seconds < 1 and seconds * 1000 == int(seconds * 1000):
        return f"{int(seconds * 1000)}ms"
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{seconds:.15g}s"  # every digit a duration keeps: 2147483.647s, not 2.14748e+06s


def show(value: Any) -> str:
    """What a value is, for "got ...": 'an integer (5)', 'a list', 'nothing'."""
    if value is None:
        return "nothing"
    name = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)
    return f"{name} ({value!r})" if not isinstance(value, (list, dict)) else name


def expand_env(text: str, where: str, errors: list[str]) -> str:
    """Replace ${VAR} with the environment's value; an unset variable is an error."""
    return expand_env_mapped(text, where, errors)[0]


def expand_env_mapped(text: str, where: str, errors: list[str]) -> tuple[str, Callable[[int], int]]:
    """expand_env's text, and where each of its indexes came from in text: a character written as it
    is maps to itself, one from a variable to its "${" (so a message that gives a place never tells
    how long a variable's value, such as a password, is), the end to the end."""
    parts: list[str] = []
    origins: list[int] = []
    written = 0
    for match in _ENV_REF.finditer(text):
        parts.append(text[written:match.start()])
        origins += range(written, match.start())
        value = os.environ.get(match.group(1))
        if value is None:
            errors.append(f"{where}: environment variable {match.group(1)} is not set")
            value = ""
        parts.append(value)
        origins += [match.start()] * len(value)
        written = match.end()
    parts.append(text[written:])
    origins += range(written, len(text) + 1)  # and the end of the expanded text: the end of text
    return "".join(parts), lambda index: origins[min(index, len(origins) - 1)]


# How alike a misspelt name and a known one must be (difflib's ratio, 0..1) to be suggested: 0.6 is
# difflib's own default; it catches a swap in a short name (dns: dsn, nmae: name) and offers nothing
# for a word that is merely another (colour, extra).
SUGGEST_CUTOFF = 0.6


def nearest(word: str, known: Iterable[str]) -> str | None:
    """The known name closest to word, None when none is close: the standard library's difflib, since
    a ratio over a few dozen names needs no dependency."""
    by_lower = {name.lower(): name for name in known}
    found = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=SUGGEST_CUTOFF)
    return by_lower[found[0]] if found else None


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """'; did you mean max_hold?' or '' when nothing known is close."""
    suggestion = nearest(word, known)
    return f"; did you mean {suggestion}?" if suggestion else ""


def unknown_fields(data: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> list[str]:
    """One message per field of data not in allowed, sorted: the nearest allowed field when one is
    close ('locks[2].max_hodl: unknown field; did you mean max_hold?'), else every allowed field.
    Every unknown field of config.yaml and web-config.yml is reported here."""
    messages = []
    for field in sorted(map(str, data)):
        if field in allowed:
            continue
        hint = did_you_mean(field, allowed) or f" (allowed: {', '.join(allowed)})"
        messages.append(f"{where}{'.' if where else ''}{field}: unknown field{hint}")
    return messages


def int_in(value: Any, low: int, high: int, type_name: str, where: str, errors: list[str]) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        errors.append(f"{where}: expected an integer ({type_name}), got {show(value)}")
        return None
    if not low <= value <= high:
        errors.append(f"{where}: {value} is outside {type_name} ({low} .. {high})")
        return None
    return value


def count(value: Any, where: str, errors: list[str]) -> int | None:
    """A cap: an integer from 0 to MAX_COUNT."""
    return int_in(value, 0, MAX_COUNT, "a count", where, errors)


def duration(minimum: float, maximum: float = MAX_DURATION, why: str = MAX_DURATION_WHY) -> Checker:
    """A checker of durations from minimum to maximum seconds; why says what sets the maximum."""

    def check(value: Any, where: str, errors: list[str]) -> float | None:
        try:
            seconds = _seconds(value)
        except ValueError as exc:
            errors.append(f"{where}: {exc}")
            return None
        if seconds < minimum:
            errors.append(f"{where}: must be at least {format_duration(minimum)}")
            return None
        if seconds > maximum:
            errors.append(f"{where}: {too_long(maximum, why)}")
            return None
        return seconds

    return check


def names(value: Any, where: str, what: str, errors: list[str]) -> tuple[str, ...]:
    """A non-empty list of non-empty strings, or () after appending the reason to errors."""
    if not isinstance(value, list) or not value or not all(isinstance(item, str) and item for item in value):
        errors.append(f"{where}: expected a list of {what}, got {show(value)}")
        return ()
    return tuple(value)


AUTO = "auto"
_PERCENT = re.compile(r"([0-9]+(?:\.[0-9]+)?)%")


def interval_or_auto(minimum: float, maximum: float, why: str) -> Checker:
    """A checker of poll_interval: auto, or a duration from minimum to maximum seconds."""
    fixed = duration(minimum, maximum, why)

    def check(value: Any, where: str, errors: list[str]) -> float | str | None:
        return AUTO if value == AUTO else fixed(value, where, errors)

    return check


def percentage(value: Any, where: str, errors: list[str]) -> float | None:
    """A share of one core in (0, 100%], written '0.5%', as a fraction."""
    match = _PERCENT.fullmatch(value) if isinstance(value, str) else None
    share = float(match.group(1)) / 100 if match else None
    if share is None or not 0 < share <= 1:
        errors.append(f"{where}: expected a percentage of one core above 0% and at most 100%, such as 0.5%, "
                      f"got {show(value)}")
        return None
    return share


def boolean(value: Any, where: str, errors: list[str]) -> bool | None:
    if not isinstance(value, bool):
        errors.append(f"{where}: expected true or false, got {show(value)}")
        return None
    return value
