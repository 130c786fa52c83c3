"""The text exposition format's small pieces: label values, label sets, sample values, families."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

PREFIX = "pg_advisory_lock"

# (sample suffix, label text without braces, value)
Sample = tuple[str, str, float]


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def labels(**pairs: str) -> str:
    return ",".join(f'{name}="{escape_label(value)}"' for name, value in pairs.items())


def value(number: float) -> str:
    """A sample value, the one way every family writes it: Python's %s of an int or a finite
    float (what the per-lock templates write at C speed), and the format's own spelling of the
    infinities and NaN."""
    if type(number) is int or math.isfinite(number):
        return "%s" % number
    if number != number:
        return "NaN"
    return "+Inf" if number > 0 else "-Inf"


def bound(upper: float) -> str:
    """A histogram bucket's le label: 0.005, 1, 2.5, +Inf (the label values this exporter has
    always written, so a bucket keeps its series)."""
    if upper == math.inf:
        return "+Inf"
    return str(int(upper)) if float(upper).is_integer() else repr(float(upper))


def family(name: str, kind: str, help_text: str, samples: Iterable[Sample]) -> Iterator[str]:
    """A family's HELP, TYPE and samples, each sample one line."""
    yield f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n"
    for suffix, label_text, number in samples:
        if label_text:
            yield f"{name}{suffix}{{{label_text}}} {value(number)}\n"
        else:
            yield f"{name}{suffix} {value(number)}\n"
