"""The per-lock families' text, in pieces of 100 locks, each piece reused while the values it was
made from are the same: between two polls most figures of most locks do not change, and writing
1,000 locks' ~8,000 lines anew at every poll was most of the exporter's CPU at the benchmark's
default point (13 ms of 22).

Two kinds of family, two writers, one cache:
- a family with a fixed set of lines per lock (holders by mode, waiters, ages, counts) is written
  by one %-format of a piece's values into a template made once per set of locks, at C speed
  (held_seconds changes for every held lock at every poll: line by line it took 25 ms of CPU per
  poll at 10,000 named locks);
- a family whose lines per lock vary (holder_info, and figures only some locks have) is written
  line by line.
Values are written the one way the whole exposition writes them: format.value, which for every
value a lock figure takes (an int, a finite float) is Python's %s.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from itertools import chain
from typing import Any

from .format import PREFIX, labels
from .snapshot import LockState

CHUNK = 100  # locks per piece
_NAME_AND_DATABASE = operator.attrgetter("name", "database")
_Piece = tuple[tuple[object, ...], str]  # (the values it was written from, its text)


class LockLabels:
    """The label text of each lock of the current set ('lock="a",database="b"'), and the line
    templates made from them. Both belong to one set of locks: a new set drops both."""

    def __init__(self) -> None:
        self._locks: tuple[tuple[str, str], ...] = ()
        self.texts: tuple[str, ...] = ()
        self._templates: dict[tuple[str, tuple[str, ...]], list[str]] = {}

    def update(self, locks: tuple[LockState, ...]) -> bool:
        """Take the set of locks of a snapshot; True when it is another set than the last."""
        current = tuple(map(_NAME_AND_DATABASE, locks))
        if current == self._locks:
            return False
        self._locks = current
        self.texts = tuple(labels(lock=name, database=database) for name, database in current)
        self._templates.clear()
        return True

    def templates(self, name: str, extra: tuple[str, ...]) -> list[str]:
        """One %-template per piece: a line of metric name, each lock's labels plus each of extra
        (the per-lock lines: ',mode="exclusive"'...), and a %s for the value."""
        templates = self._templates.get((name, extra))
        if templates is None:
            metric = f"{PREFIX}_{name}"
            escaped = [text.replace("%", "%%") for text in self.texts]
            templates = self._templates[(name, extra)] = [
                "".join(f"{metric}{{{text}{suffix}}} %s\n" for text in escaped[first:first + CHUNK] for suffix in extra)
                for first in range(0, len(escaped), CHUNK)
            ]
        return templates


class FamilyTexts:
    """The per-lock families of the last rendering. Between two renderings: each family's text is
    its HELP and TYPE then its pieces' texts; a piece is reused only while its values are equal
    to the new ones; every piece belongs to the current set of locks (a new set drops them all).
    Unchanged, a family is the very same string: the gzip step then finds its deflate without
    reading it."""

    def __init__(self) -> None:
        self.labels = LockLabels()
        self._pieces: dict[str, tuple[list[_Piece], str]] = {}  # name -> (pieces, the family's text)

    def begin(self, locks: tuple[LockState, ...]) -> None:
        """A rendering of these locks starts."""
        if self.labels.update(locks):
            self._pieces.clear()

    def samples(self, name: str, kind: str, help_text: str, values: tuple[Any, ...],
                extra: tuple[str, ...] = ("",)) -> str:
        """A family with one line per lock and per label suffix in extra (values then flat, lock
        by lock, in the order of extra)."""
        templates = self.labels.templates(name, extra)
        per_lock = len(extra)
        if per_lock == 1:
            return self._text(name, kind, help_text, values, lambda first, part: templates[first // CHUNK] % part)
        return self._text(name, kind, help_text, values,
                          lambda first, part: templates[first // CHUNK] % tuple(chain.from_iterable(part)))

    def lines(self, name: str, kind: str, help_text: str, values: tuple[Any, ...],
              line: Callable[[str, Any], str]) -> str:
        """A family whose lines per lock vary: line(the lock's label text, its value) writes them."""
        texts = self.labels.texts
        return self._text(name, kind, help_text, values,
                          lambda first, part: "".join(map(line, texts[first:first + CHUNK], part)))

    def _text(self, name: str, kind: str, help_text: str, values: tuple[Any, ...],
              write: Callable[[int, tuple[Any, ...]], str]) -> str:
        before, text = self._pieces.get(name, ([], ""))
        pieces = []
        for n, first in enumerate(range(0, len(values), CHUNK)):
            part = values[first:first + CHUNK]
            pieces.append(before[n] if n < len(before) and before[n][0] == part else (part, write(first, part)))
        if len(pieces) != len(before) or any(now is not then for now, then in zip(pieces, before)):
            metric = f"{PREFIX}_{name}"
            text = "".join((f"# HELP {metric} {help_text}\n# TYPE {metric} {kind}\n", *(piece for _, piece in pieces)))
        self._pieces[name] = (pieces, text)
        return text
