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
            for family in text_string_to_metric_families(text):
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
