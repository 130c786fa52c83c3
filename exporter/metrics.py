"""Snapshot + ProbeResults -> exposition text, built fresh from the data and rendered once per
change, off the scrape path.

The lock series are written directly: prometheus_client's generate_latest took 43 ms for 1,000
locks (~10,000 samples), this writer a fraction of that. The process figures (a few dozen samples)
come from prometheus_client's own collectors and generate_latest.
"""

from __future__ import annotations

import logging
import math
import operator
import struct
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from itertools import chain
from typing import Any, NamedTuple

from prometheus_client import CONTENT_TYPE_LATEST, GCCollector, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.registry import CollectorRegistry

from . import __version__
from .logs import LoopErrors
from .snapshot import MODE_EXCLUSIVE, MODE_SHARED, Holder, LockState, ProbeResult, ReloadStatus, Snapshot

log = logging.getLogger(__name__)

PREFIX = "pg_advisory_lock"
CONTENT_TYPE = CONTENT_TYPE_LATEST

# (sample suffix, label text without braces, value)
_Sample = tuple[str, str, float]


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def labels(**pairs: str) -> str:
    return ",".join(f'{name}="{escape_label(value)}"' for name, value in pairs.items())


def format_value(value: float) -> str:
    if type(value) is int:  # most values: counts
        return str(value)
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    if value != value:
        return "NaN"
    return repr(float(value))


def _family(name: str, kind: str, help_text: str, samples: Iterable[_Sample]) -> Iterator[str]:
    yield f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n"
    for suffix, label_text, value in samples:
        if label_text:
            yield f"{name}{suffix}{{{label_text}}} {format_value(value)}\n"
        else:
            yield f"{name}{suffix} {format_value(value)}\n"


# The fields of a LockState each per-lock family is made of.
_NAME_AND_DATABASE = operator.attrgetter("name", "database")
_HOLDERS = operator.attrgetter("exclusive", "shared")
_WAITERS = operator.attrgetter("waiters")
_WAIT_SECONDS = operator.attrgetter("wait_seconds")
_ACQUISITIONS = operator.attrgetter("acquisitions")
_MAX_HOLD = operator.attrgetter("max_hold")
_HOLDER_INFO = operator.attrgetter("info_holders", "source")
_KEYS_HELD = operator.attrgetter("keys_held")
_POOLED = operator.attrgetter("pooled_session_holders")


_CHUNK = 100  # locks per cached piece of a family


class FamilyTexts:
    """The per-lock families' texts of the last rendering, in pieces of 100 locks, each piece
    reused while the values it was made from are the same (one C-level tuple comparison): between
    two polls most figures of most locks do not change, and writing 1,000 locks' ~8,000 lines anew
    at every poll was most of the exporter's CPU at the benchmark's default point (13 ms of 22)."""

    def __init__(self) -> None:
        self._locks: tuple[tuple[str, str], ...] = ()
        self._ids: tuple[str, ...] = ()
        self._pieces: dict[str, tuple[list[tuple[tuple[object, ...], str]], str]] = {}  # name -> (pieces, text)
        self._templates: dict[str, list[str]] = {}  # name -> a %-template per piece

    def ids(self, locks: tuple[LockState, ...]) -> tuple[str, ...]:
        """Each lock's label text (lock, database); every cached piece is dropped when they change."""
        key = tuple(map(_NAME_AND_DATABASE, locks))
        if key != self._locks:
            self._locks = key
            self._ids = tuple(labels(lock=name, database=database) for name, database in key)
            self._pieces.clear()
            self._templates.clear()
        return self._ids

    def family(self, name: str, kind: str, help_text: str, values: tuple[object, ...],
               lines: Callable[[str, Any], str]) -> str:
        """A family's text: its HELP and TYPE, then lines(label text, value) of each lock in order
        (values: one per lock of the last ids())."""
        ids = self._ids
        return self._text(name, kind, help_text, values,
                          lambda first, part: "".join(map(lines, ids[first:first + _CHUNK], part)))

    def samples(self, name: str, kind: str, help_text: str, values: tuple[float, ...],
                labels_of: Callable[[str], tuple[str, ...]] = lambda i: (i,)) -> str:
        """A family with a sample per lock, or one per label text labels_of gives for it (values then
        in that order, flat): lines made by one %-format of a piece's values into a template
        made once per set of locks, at C speed. held_seconds changes for every held lock at every
        poll: line by line, writing it took 25 ms of CPU per poll at 10,000 named locks."""
        templates = self._templates.get(name)
        if templates is None:
            metric = f"{PREFIX}_{name}"
            escaped = [i.replace("%", "%%") for i in self._ids]
            templates = self._templates[name] = [
                "".join(f"{metric}{{{text}}} %s\n" for i in escaped[first:first + _CHUNK] for text in labels_of(i))
                for first in range(0, len(escaped), _CHUNK)
            ]
        per_lock = len(labels_of(""))
        if per_lock == 1:
            return self._text(name, kind, help_text, values, lambda first, part: templates[first // _CHUNK] % part)
        return self._text(name, kind, help_text, values,
                          lambda first, part: templates[first // _CHUNK] % tuple(chain.from_iterable(part)))

    def _text(self, name: str, kind: str, help_text: str, values: tuple[object, ...],
              piece_of: Callable[[int, tuple[object, ...]], str]) -> str:
        before, text = self._pieces.get(name, ([], ""))
        pieces = []
        for n, first in enumerate(range(0, len(values), _CHUNK)):
            part = values[first:first + _CHUNK]
            if n < len(before) and before[n][0] == part:
                pieces.append(before[n])
            else:
                pieces.append((part, piece_of(first, part)))
        if len(pieces) != len(before) or any(now is not then for now, then in zip(pieces, before)):
            metric = f"{PREFIX}_{name}"
            text = "".join((f"# HELP {metric} {help_text}\n# TYPE {metric} {kind}\n", *(piece for _, piece in pieces)))
        # Unchanged, the very same string: the gzip step then finds its deflate without reading it.
        self._pieces[name] = (pieces, text)
        return text


def _pid(h: Holder) -> str:
    """The pid label: "" for a prepared transaction (its gid is the application_name label)."""
    return "" if h.pid is None else str(h.pid)


def _holder_labels(h: Holder, source: str) -> str:
    return labels(key=h.key, pid=_pid(h), application_name=h.application_name, usename=h.usename,
                  client_addr=h.client_addr, state=h.state, source=source, pooler=h.pooler)


def _lock_text(snapshot: Snapshot, texts: FamilyTexts) -> Iterator[str]:
    locks = snapshot.locks
    texts.ids(locks)

    def each(name: str, kind: str, help_text: str, values: tuple[object, ...]) -> str:
        """A family with one sample per lock whose value is not None."""
        metric = f"{PREFIX}_{name}"
        return texts.family(name, kind, help_text, values,
                            lambda i, value: "" if value is None else f"{metric}{{{i}}} {format_value(value)}\n")

    yield texts.samples(
        "holders", "gauge", "Sessions holding the lock now, by mode.", tuple(map(_HOLDERS, locks)),
        lambda i: (f'{i},mode="{MODE_EXCLUSIVE}"', f'{i},mode="{MODE_SHARED}"'),
    )
    yield texts.samples("waiters", "gauge", "Sessions waiting for the lock now.", tuple(map(_WAITERS, locks)))
    yield texts.samples(
        "held_seconds", "gauge",
        "How long the longest current holder has held the lock (a proven lower bound); 0 when free.",
        snapshot.ages(locks),
    )
    yield texts.samples("wait_seconds", "gauge", "The longest current wait for the lock; 0 when none.",
                        tuple(map(_WAIT_SECONDS, locks)))
    yield texts.samples("acquisitions_total", "counter", "New holders observed since the exporter started.",
                        tuple(map(_ACQUISITIONS, locks)))
    info = f"{PREFIX}_holder_info"
    yield texts.family(
        "holder_info", "gauge",
        "One series per current holder of the lock (per key held, for a family), the longest-held within the caps.",
        tuple(map(_HOLDER_INFO, locks)),
        lambda i, v: "".join(f"{info}{{{i},{_holder_labels(h, v[1])}}} 1\n" for h in v[0]),
    )
    yield each(
        "pooled_session_holders", "gauge",
        "Holders proven to hold the lock at session level (the backend is idle, outside any transaction) on a "
        "server connection of a transaction- or statement-mode pool: the lock outlives the client's transaction "
        "and passes to whoever borrows that connection next.", tuple(map(_POOLED, locks)),
    )
    yield each("keys_held", "gauge", "Key families: how many distinct keys of the family are held now.",
               tuple(map(_KEYS_HELD, locks)))
    yield each("max_hold_seconds", "gauge", "max_hold from the config: the longest a holder should hold the lock.",
               tuple(map(_MAX_HOLD, locks)))
    yield from _unnamed_text(snapshot)
    yield from _family(
        f"{PREFIX}_key_collision", "gauge", "1 for each pair of configured names that resolve to the same lock.",
        (("", labels(lock=c.lock, database=c.database, colliding_lock=c.other), 1) for c in snapshot.collisions),
    )


def _unnamed_text(snapshot: Snapshot) -> Iterator[str]:
    pairs = [(u, labels(database=u.database)) for u in snapshot.unnamed]
    yield from _family(
        f"{PREFIX}_unnamed_holders", "gauge",
        "Advisory locks held on keys no configured lock, family or preset names (one per session, key and mode).",
        (("", i, u.holders) for u, i in pairs),
    )
    yield from _family(
        f"{PREFIX}_unnamed_waiters", "gauge", "Waits for advisory locks on keys nobody named.",
        (("", i, u.waiters) for u, i in pairs),
    )
    yield from _family(
        f"{PREFIX}_unnamed_held_seconds", "gauge",
        "The oldest current hold among keys nobody named (a proven lower bound); 0 when none.",
        (("", i, snapshot.held_seconds(u)) for u, i in pairs),
    )
    yield from _family(
        f"{PREFIX}_unnamed_wait_seconds", "gauge", "The longest current wait for a key nobody named; 0 when none.",
        (("", i, u.wait_seconds) for u, i in pairs),
    )
    yield from _family(
        f"{PREFIX}_unnamed_holder_info", "gauge",
        "The oldest holds of keys nobody named, within max_unnamed_holder_info per database.",
        (
            ("", i + "," + labels(key=h.key, mode=MODE_EXCLUSIVE if MODE_EXCLUSIVE in h.modes else MODE_SHARED,
                                  pid=_pid(h), application_name=h.application_name, usename=h.usename,
                                  client_addr=h.client_addr, state=h.state, pooler=h.pooler), 1)
            for u, i in pairs for h in u.info_holders
        ),
    )
    yield from _family(
        f"{PREFIX}_unnamed_pooled_session_holders", "gauge",
        "As pooled_session_holders, for keys nobody named.",
        (("", i, u.pooled_session_holders) for u, i in pairs if u.pooled_session_holders is not None),
    )
    yield from _family(
        f"{PREFIX}_unnamed_max_hold_seconds", "gauge",
        "unnamed_max_hold from the config: the longest any hold of a key nobody named should last.",
        (("", i, u.max_hold) for u, i in pairs if u.max_hold is not None),
    )


def _pooler_text(snapshot: Snapshot) -> Iterator[str]:
    pairs = [(c, labels(pooler=c.pooler, address=c.address)) for c in snapshot.consoles]
    yield from _family(f"{PREFIX}_pooler_up", "gauge", "1 if the last read of the pooler's console at this address worked.",
                       (("", i, int(c.up)) for c, i in pairs))
    yield from _family(f"{PREFIX}_pooler_read_duration_seconds", "gauge",
                       "How long the last read of the pooler's console at this address took.",
                       (("", i, c.seconds) for c, i in pairs))


def _probe_text(probes: tuple[ProbeResult, ...]) -> Iterator[str]:
    pairs = [(p, labels(lock=p.lock, database=p.database)) for p in probes]
    yield from _family(f"{PREFIX}_probe_acquirable", "gauge", "1 if the last try got the lock.",
                       (("", i, int(p.acquirable)) for p, i in pairs if p.acquirable is not None and p.trusted))
    yield from _family(f"{PREFIX}_probe_ok", "gauge",
                       "1 if the last try matched the configured expectation (any: the try ran).",
                       (("", i, int(p.ok)) for p, i in pairs if p.trusted))
    yield from _family(f"{PREFIX}_probe_trusted", "gauge",
                       "0 when the probe's connection goes through a transaction-mode pooler, whose tries cannot "
                       "be trusted (acquirable and ok are then left out); 1 otherwise.",
                       (("", i, int(p.trusted)) for p, i in pairs))
    yield from _family(f"{PREFIX}_probe_duration_seconds", "gauge", "Duration of the last try.",
                       (("", i, p.duration) for p, i in pairs))
    yield from _family(f"{PREFIX}_probe_errors_total", "counter", "Tries that failed (timeout, connection).",
                       (("", i, p.errors) for p, i in pairs))
    yield from _family(f"{PREFIX}_probe_last_run_timestamp_seconds", "gauge",
                       "When the lock was last tried, in seconds since the epoch.",
                       (("", i, p.last_run) for p, i in pairs))


def _exporter_text(snapshot: Snapshot, reload: ReloadStatus) -> Iterator[str]:
    stats = snapshot.stats
    yield from _family(f"{PREFIX}_exporter_up", "gauge", "1 if the last poll succeeded.", [("", "", int(snapshot.up))])
    buckets = [("_bucket", f'le="{format_value(bound)}"', count) for bound, count in stats.duration_buckets]
    yield from _family(
        f"{PREFIX}_exporter_poll_duration_seconds", "histogram", "Time of each poll.",
        [*buckets, ("_bucket", 'le="+Inf"', stats.polls), ("_count", "", stats.polls), ("_sum", "", stats.duration_sum)],
    )
    yield from _family(f"{PREFIX}_exporter_poll_errors_total", "counter", "Failed polls.", [("", "", stats.errors)])
    yield from _family(
        f"{PREFIX}_exporter_holder_info_dropped_total", "counter",
        "holder_info series left out by max_holder_info_per_lock / max_holder_info, summed over polls.",
        [("", "", stats.holder_info_dropped)],
    )
    yield from _family(
        f"{PREFIX}_exporter_tracked_holds", "gauge",
        "Holds whose first sighting the exporter remembers (bounded by max_tracked_holds).",
        [("", "", stats.tracked_holds)],
    )
    yield from _family(
        f"{PREFIX}_exporter_tracked_holds_dropped_total", "counter",
        "Holds not remembered because max_tracked_holds was reached (they got the proven lower bound only), "
        "summed over polls.",
        [("", "", stats.tracked_holds_dropped)],
    )
    yield from _family(
        f"{PREFIX}_exporter_poll_interval_seconds", "gauge",
        "The poll interval in force: how often pg_locks is read.", [("", "", stats.interval)],
    )
    if stats.last_success_timestamp is not None:
        yield from _family(
            f"{PREFIX}_exporter_last_poll_timestamp_seconds", "gauge",
            "End of the last successful poll, in seconds since the epoch.", [("", "", stats.last_success_timestamp)],
        )
    yield from _identity_text(reload)


def _identity_text(reload: ReloadStatus) -> Iterator[str]:
    """The exporter's version and its last config load: in single-server mode and a fleet's /metrics."""
    yield from _family(f"{PREFIX}_exporter_build_info", "gauge", "The exporter's version.",
                       [("", labels(version=__version__), 1)])
    yield from _family(f"{PREFIX}_exporter_config_last_reload_successful", "gauge",
                       "1 if the last config load (start-up, SIGHUP or /-/reload) succeeded.",
                       [("", "", int(reload.successful))])
    if reload.last_success_timestamp is not None:
        yield from _family(f"{PREFIX}_exporter_config_last_reload_success_timestamp_seconds", "gauge",
                           "When the config was last loaded successfully, in seconds since the epoch.",
                           [("", "", reload.last_success_timestamp)])


def render(snapshot: Snapshot, probes: tuple[ProbeResult, ...] = (), reload: ReloadStatus = ReloadStatus()) -> bytes:
    """The text exposition (format 0.0.4) of one snapshot and the latest probe results.

    While polls fail the lock series are left out rather than served stale.
    """
    return "".join(render_parts(snapshot, probes, reload)).encode()


def render_parts(snapshot: Snapshot, probes: tuple[ProbeResult, ...] = (), reload: ReloadStatus = ReloadStatus(),
                 texts: FamilyTexts | None = None) -> list[str]:
    """render's text in parts (a family, or a line); texts: the last rendering's families, to reuse
    those that did not change."""
    parts: list[str] = []
    if snapshot.up:
        parts.extend(_lock_text(snapshot, texts or FamilyTexts()))
        parts.extend(_pooler_text(snapshot))
    if probes:
        parts.extend(_probe_text(probes))
    parts.extend(_exporter_text(snapshot, reload))
    return parts


class Rendered(NamedTuple):
    """One rendering of the exposition: the text, and the same gzipped."""

    plain: bytes
    gzipped: bytes


# gzip level 3: a 630 KB exposition of 1,000 locks compresses to 35 KB in 1.2 ms (level 6: 33 KB in 2.8 ms),
# once per snapshot, off the scrape path.
GZIP_LEVEL = 3
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # deflate, no name, mtime 0, unknown OS
_LAST_BLOCK = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS).flush()  # an empty final block
_OWN_CHUNK = 4096  # parts at least this long are deflated on their own, and kept while unchanged


def _deflate(data: bytes) -> bytes:
    """data as raw deflate blocks that end byte-aligned and refer to nothing before them, so such
    chunks can be joined into one stream (as pigz does)."""
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)


class Gzipper:
    """An exposition's parts -> its text and its gzip, each big part (a family of many locks)
    deflated on its own and its deflate reused while the part is the same text: at the default
    benchmark point most families do not change between polls, and deflating all 650 KB anew cost
    1.5 ms of a poll's 10. A part's deflate starts with no history: the 32 KB window of deflate
    reaches little across families of this size: at that point the gzip is 33 KB, against 38 KB for
    the whole text deflated at once (gzip.compress)."""

    def __init__(self) -> None:
        self._deflated: dict[str, bytes] = {}

    def __call__(self, parts: list[str]) -> Rendered:
        chunks: list[bytes] = []
        kept: dict[str, bytes] = {}
        small: list[str] = []
        for part in parts:
            if len(part) < _OWN_CHUNK:
                small.append(part)
                continue
            if small:
                chunks.append(_deflate("".join(small).encode()))
                small = []
            deflated = kept[part] = self._deflated.get(part) or _deflate(part.encode())
            chunks.append(deflated)
        if small:
            chunks.append(_deflate("".join(small).encode()))
        self._deflated = kept
        plain = "".join(parts).encode()
        trailer = struct.pack("<II", zlib.crc32(plain), len(plain) & 0xFFFFFFFF)
        return Rendered(plain, b"".join((_GZIP_HEADER, *chunks, _LAST_BLOCK, trailer)))


def process_registry() -> CollectorRegistry:
    """The exporter's own process figures, as every Prometheus exporter exposes them, from
    prometheus_client's own collectors (process_*, python_info, python_gc_*), on a private registry."""
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class Exposition:
    """The latest snapshot, probe results and reload status, and their rendering (text and gzip),
    made by a renderer thread after each change, so a scrape only ever writes bytes already made."""

    def __init__(self, snapshot: Snapshot | None = None, with_process: bool = True) -> None:
        self._lock = threading.Lock()
        self._snapshot = snapshot or Snapshot(up=False)
        self._probes: tuple[ProbeResult, ...] = ()
        self._reload = ReloadStatus()
        # A fleet's targets serve lock figures only: the process figures are the exporter's (/metrics).
        self._registry = process_registry() if with_process else None
        # The renderer's own (only one rendering runs at a time): the last rendering's parts.
        self._texts = FamilyTexts()
        self._gzip = Gzipper()
        self._render_lock = threading.Lock()
        self._changed = threading.Event()
        self._rendered = self._render()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def _parts(self) -> list[str]:
        """The figures of what was last published (the process figures are added to them)."""
        with self._lock:
            state = (self._snapshot, self._probes, self._reload)
        return render_parts(*state, texts=self._texts)

    def _render(self) -> Rendered:
        parts = self._parts()
        if self._registry is not None:
            parts.append(generate_latest(self._registry).decode())
        return self._gzip(parts)

    def publish(self, snapshot: Snapshot) -> None:
        with self._lock:
            self._snapshot = snapshot
            self._changed.set()

    def publish_instead_of(self, current: Snapshot, replacement: Snapshot) -> bool:
        """Publish replacement only if current is still the latest snapshot (the watchdog: a poll
        that publishes meanwhile wins); whether it did."""
        with self._lock:
            if self._snapshot is not current:
                return False
            self._snapshot = replacement
            self._changed.set()
            return True

    def publish_probes(self, probes: tuple[ProbeResult, ...]) -> None:
        with self._lock:
            self._probes = probes
            self._changed.set()

    def publish_reload(self, reload: ReloadStatus) -> None:
        with self._lock:
            self._reload = reload
            self._changed.set()

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    @property
    def probes(self) -> tuple[ProbeResult, ...]:
        return self._probes

    @property
    def reload(self) -> ReloadStatus:
        return self._reload

    def body(self, gzipped: bool = False) -> bytes:
        """The latest rendering: never renders, never waits for a render."""
        rendered = self._rendered
        return rendered.gzipped if gzipped else rendered.plain

    def render_now(self) -> None:
        """Render what was last published (the renderer thread's work; tests call it directly)."""
        self._changed.clear()
        with self._render_lock:  # the renderer thread, or a test calling this directly
            self._rendered = self._render()

    def start(self) -> None:
        """Render after every change, on a thread of its own, until stop(). A rendering that fails
        keeps the last one served (and is logged); the loop goes on."""
        unexpected = LoopErrors(log, "renderer")

        def loop() -> None:
            while True:
                self._changed.wait()
                if self._stop.is_set():
                    return
                try:
                    self.render_now()
                except Exception as exc:  # noqa: BLE001 - every loop survives: the last rendering stays
                    unexpected.report(exc)
                    self._stop.wait(1.0)
                    self._changed.set()  # what was published is not rendered yet: try again
        self._thread = threading.Thread(target=loop, name="render", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._changed.set()  # wakes the renderer now
        if self._thread is not None:
            self._thread.join(2)


def render_fleet(targets: dict[str, Snapshot], reload: ReloadStatus) -> bytes:
    """/metrics of a fleet: the exporter's own figures and each target's health, under names that
    /probe never serves (so no alert on /probe's figures fires twice)."""
    pairs = [(labels(target=name), snap) for name, snap in sorted(targets.items())]
    parts = list(_family(f"{PREFIX}_exporter_target_up", "gauge", "1 if the target's last poll succeeded.",
                         (("", i, int(snap.up)) for i, snap in pairs)))
    samples: list[_Sample] = []
    for i, snap in pairs:
        stats = snap.stats
        samples += [("_bucket", f'{i},le="{format_value(bound)}"', count) for bound, count in stats.duration_buckets]
        samples += [("_bucket", f'{i},le="+Inf"', stats.polls), ("_count", i, stats.polls), ("_sum", i, stats.duration_sum)]
    parts += _family(f"{PREFIX}_exporter_target_poll_duration_seconds", "histogram",
                     "Time of each poll of the target, failed ones included.", samples)
    parts += _family(f"{PREFIX}_exporter_target_poll_errors_total", "counter", "Failed polls of the target.",
                     (("", i, snap.stats.errors) for i, snap in pairs))
    parts += _identity_text(reload)
    return "".join(parts).encode()


class FleetExposition(Exposition):
    """/metrics of a fleet: the targets' health and the process figures, rendered after each change."""

    def __init__(self) -> None:
        self._targets: dict[str, Snapshot] = {}
        super().__init__()

    def publish_target(self, name: str, snapshot: Snapshot) -> None:
        with self._lock:
            self._targets = {**self._targets, name: snapshot}
            self._changed.set()

    def forget_target(self, name: str) -> None:
        with self._lock:
            self._targets = {k: v for k, v in self._targets.items() if k != name}
            self._changed.set()

    def _parts(self) -> list[str]:
        with self._lock:
            targets, reload = self._targets, self._reload
        return [render_fleet(targets, reload).decode()]
