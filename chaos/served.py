"""What one scrape said: its exposition read with prometheus_client's parser, by figure name."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

PREFIX = "pg_advisory_lock_"
UP = f"{PREFIX}exporter_up"
LAST_POLL = f"{PREFIX}exporter_last_poll_timestamp_seconds"
LAST_POLL_DURATION = f"{PREFIX}exporter_last_poll_duration_seconds"
INTERVAL = f"{PREFIX}exporter_poll_interval_seconds"
HOLDERS = f"{PREFIX}holders"
WAITERS = f"{PREFIX}waiters"
HELD_SECONDS = f"{PREFIX}held_seconds"
HOLDER_INFO = f"{PREFIX}holder_info"
ACQUISITIONS = f"{PREFIX}acquisitions_total"
POOLED = f"{PREFIX}pooled_session_holders"
UNNAMED_HOLDERS = f"{PREFIX}unnamed_holders"
UNNAMED_WAITERS = f"{PREFIX}unnamed_waiters"
UNNAMED_HELD_SECONDS = f"{PREFIX}unnamed_held_seconds"
PROBE_TRUSTED = f"{PREFIX}probe_trusted"
PROBE_ACQUIRABLE = f"{PREFIX}probe_acquirable"
PROBE_OK = f"{PREFIX}probe_ok"
PROBE_DURATION = f"{PREFIX}probe_duration_seconds"
PROBE_LAST_RUN = f"{PREFIX}probe_last_run_timestamp_seconds"

Labels = tuple[tuple[str, str], ...]

# Every sample name a rule reads: the rest of an exposition (HELP lines, histograms, the exporter's
# own figures) is left out before parsing, a run's tens of thousands of scrapes parse in a fraction
# of the time.
READ = frozenset({UP, LAST_POLL, LAST_POLL_DURATION, INTERVAL, HOLDERS, WAITERS, HELD_SECONDS, HOLDER_INFO,
                  ACQUISITIONS, POOLED, UNNAMED_HOLDERS, UNNAMED_WAITERS, UNNAMED_HELD_SECONDS, PROBE_TRUSTED,
                  PROBE_ACQUIRABLE, PROBE_OK, PROBE_DURATION, PROBE_LAST_RUN})
_TYPED = READ | {name.removesuffix("_total") for name in READ}


@dataclass
class Served:
    """One exposition's samples: name -> {sorted labels: value}. `answered` is False for no answer
    (an empty text, or a body that is no exposition)."""

    samples: dict[str, dict[Labels, float]] = field(default_factory=dict)
    answered: bool = True

    @classmethod
    def parse(cls, text: str) -> "Served":
        if not text.strip():
            return cls(answered=False)
        samples: dict[str, dict[Labels, float]] = defaultdict(dict)
        try:
            for family in text_string_to_metric_families(_read_only(text)):
                for sample in family.samples:
                    samples[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
        except ValueError:
            return cls(answered=False)
        return cls(dict(samples))

    def get(self, name: str, **labels: str) -> float | None:
        return self.samples.get(name, {}).get(tuple(sorted(labels.items())))

    def series(self, name: str, **labels: str) -> list[dict[str, str]]:
        """Label sets of every sample of `name` that carries all of `labels`."""
        wanted = labels.items()
        return [dict(key) for key in self.samples.get(name, {}) if wanted <= dict(key).items()]

    @property
    def up(self) -> bool:
        """Whether this answer claims to know (exporter_up 1)."""
        return self.answered and self.get(UP) == 1


def _read_only(text: str) -> str:
    """The exposition's TYPE lines and samples of the families in READ, nothing else."""
    kept = []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            if line.split(" ", 3)[2] in _TYPED:
                kept.append(line)
        elif not line.startswith("#") and line.split("{", 1)[0].split(" ", 1)[0] in READ:
            kept.append(line)
    return "\n".join(kept) + "\n"
