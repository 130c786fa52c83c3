"""The latest snapshot, probe results and reload status of one target, and their rendering (text
and gzip), made by a renderer thread after each change (one Renderer for every target of the
process): a scrape only ever takes bytes already made. Between two renderings, what was last published is rendered or about to be: a rendering
that fails keeps the last one (and is tried again), and under
PG_ADVISORY_LOCK_EXPORTER_CHECK_INVARIANTS=1 every rendering is compared with one made from
nothing (the reused pieces and deflates must give the very same bytes).
"""

from __future__ import annotations

import gzip
import logging
import math
import struct
import threading
import time
import zlib
from collections.abc import Callable
from typing import NamedTuple

from prometheus_client import CONTENT_TYPE_LATEST, GCCollector, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.registry import CollectorRegistry

from .assemble import InvariantBroken, checking_invariants
from .deadline import DEADLINES
from .logs import LoopErrors
from .memory import give_back_freed_memory
from .metrics import render_fleet, render_parts, shard_text
from .pieces import FamilyTexts
from .shards import Shard
from .snapshot import ProbeResult, ReloadStatus, Snapshot

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Rendered(NamedTuple):
    """One rendering of the exposition: the text, and the same gzipped; and, for a good poll, its
    staleness bound (the poller's clock) and the "don't know" text served past it: a scrape
    chooses between the two by one comparison and renders nothing."""

    plain: bytes
    gzipped: bytes
    fresh_until: float = math.inf
    stale_plain: bytes = b""
    stale_gzipped: bytes = b""


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
    the whole text deflated at once (gzip.compress).

    The gzip's CRC-32 runs over the whole text in order; it is kept at each part's end, so only the
    text from the first part that changed is read again (0.8 ms for the 925 KB of the default point,
    whose first 80% does not change between polls); each part's bytes are kept the same way."""

    def __init__(self) -> None:
        self._deflated: dict[str, bytes] = {}
        self._encoded: dict[str, bytes] = {}
        self._parts: tuple[str, ...] = ()
        self._crcs: list[int] = []  # the CRC-32 of the text up to the end of each of the last parts

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
        plain, crc = self._plain_and_crc(parts)
        trailer = struct.pack("<II", crc, len(plain) & 0xFFFFFFFF)
        return Rendered(plain, b"".join((_GZIP_HEADER, *chunks, _LAST_BLOCK, trailer)))

    def _plain_and_crc(self, parts: list[str]) -> tuple[bytes, int]:
        """The text's bytes, and their CRC-32 from the first part that is not the very same string
        as last time on (the same strings: the text before them is the same)."""
        same = 0
        for now, then in zip(parts, self._parts):
            if now is not then:
                break
            same += 1
        crcs = self._crcs[:same]
        crc = crcs[-1] if crcs else 0
        encoded: dict[str, bytes] = {}
        pieces = []
        for n, part in enumerate(parts):
            piece = encoded[part] = self._encoded.get(part) or part.encode()
            pieces.append(piece)
            if n >= same:
                crc = zlib.crc32(piece, crc)
                crcs.append(crc)
        self._encoded, self._parts, self._crcs = encoded, tuple(parts), crcs  # a copy: the caller may reuse its list
        return b"".join(pieces), crc


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

    def __init__(self, snapshot: Snapshot | None = None, with_process: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock  # the poller's clock: Snapshot.fresh_until is a reading of it
        self._lock = threading.Lock()
        self._snapshot = snapshot or Snapshot(up=False)
        self._probes: tuple[ProbeResult, ...] = ()
        self._reload = ReloadStatus()
        self._shard = shard_text(Shard(), 1)  # the exporter's own /metrics says which shard it is
        # A fleet's targets serve lock figures only: the process figures are the exporter's (/metrics).
        self._registry = process_registry() if with_process else None
        # The renderer's own (only one rendering runs at a time): the last rendering's parts.
        self._texts = FamilyTexts()
        self._gzip = Gzipper()
        self._check = checking_invariants()
        self._render_lock = threading.Lock()
        self._rendered = self._render()
        self._renderer: Renderer | None = None  # set by start(): who renders each change
        self._own_renderer = False

    def _state(self) -> tuple[Snapshot, tuple[ProbeResult, ...], ReloadStatus]:
        with self._lock:
            return self._snapshot, self._probes, self._reload

    def _parts(self, state: tuple[Snapshot, tuple[ProbeResult, ...], ReloadStatus]) -> list[str]:
        """The figures of what was last published (the process figures are added to them)."""
        parts = render_parts(*state, texts=self._texts)
        if self._check and parts != render_parts(*state):
            raise InvariantBroken("a reused piece of the exposition differs from the same figures written anew")
        return parts

    def _render(self) -> Rendered:
        state = self._state()
        parts = self._parts(state)
        process = self._shard + generate_latest(self._registry).decode() if self._registry is not None else ""
        rendered = self._gzip([*parts, process] if process else parts)
        if self._check and gzip.decompress(rendered.gzipped) != rendered.plain:
            raise InvariantBroken("the gzip joined from reused deflates is not the text")
        snapshot, probes, reload = state
        if snapshot.up and snapshot.fresh_until != math.inf:
            # What a failed poll would serve (up 0, no lock series), made now: past fresh_until a
            # scrape serves it instead, even before the watchdog has looked (an exporter stopped and
            # continued answers its first scrape with the clock, not with a poll from before).
            stale = "".join(render_parts(Snapshot(up=False, stats=snapshot.stats), probes, reload)) + process
            plain = stale.encode()
            rendered = rendered._replace(fresh_until=snapshot.fresh_until, stale_plain=plain,
                                         stale_gzipped=gzip.compress(plain, GZIP_LEVEL, mtime=0))
        return rendered

    def publish(self, snapshot: Snapshot) -> None:
        with self._lock:
            self._snapshot = snapshot
            self._dirty()

    def publish_instead_of(self, current: Snapshot, replacement: Snapshot) -> bool:
        """Publish replacement only if current is still the latest snapshot (the watchdog: a poll
        that publishes meanwhile wins); whether it did."""
        with self._lock:
            if self._snapshot is not current:
                return False
            self._snapshot = replacement
            self._dirty()
            return True

    def publish_probes(self, probes: tuple[ProbeResult, ...]) -> None:
        with self._lock:
            self._probes = probes
            self._dirty()

    def publish_shard(self, shard: Shard, owned: int) -> None:
        """Which shard this exporter is, and how many targets it owns (with the process figures)."""
        with self._lock:
            self._shard = shard_text(shard, owned)
            self._dirty()

    def publish_reload(self, reload: ReloadStatus) -> None:
        with self._lock:
            self._reload = reload
            self._dirty()

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
        """The latest rendering: never renders, never waits for a render. Past its poll's
        staleness bound, the "don't know" text made with it."""
        rendered = self._rendered
        if self._clock() > rendered.fresh_until:
            return rendered.stale_gzipped if gzipped else rendered.stale_plain
        return rendered.gzipped if gzipped else rendered.plain

    def render_now(self) -> None:
        """Render what was last published (the renderer's work; tests call it directly)."""
        with self._render_lock:  # the renderer, or a test calling this directly
            self._rendered = self._render()

    def _dirty(self) -> None:
        """Something was published (under _lock): the renderer renders it."""
        if self._renderer is not None:
            self._renderer.changed(self)

    def start(self, renderer: Renderer | None = None) -> None:
        """Render after every change, on renderer's thread (shared by a fleet's targets), or on a
        renderer of its own, until stop()."""
        self._own_renderer = renderer is None
        self._renderer = renderer or Renderer()
        self._renderer.changed(self)  # what was published before start

    def stop(self) -> None:
        renderer, self._renderer = self._renderer, None
        if renderer is not None:
            renderer.forget(self)
            if self._own_renderer:
                renderer.stop()


class Renderer:
    """One thread that renders every exposition published to since its last rendering, in the
    order they changed. A rendering that fails keeps the last one served (and is logged), and is
    tried again a second later. Once none is left to render, the C heap's freed pages are given
    back (memory.py): the polls' and the renderings' peak does not stay resident; and at least
    every GIVE_BACK_SECONDS while renderings keep coming (a renderer that never catches up, at
    thousands of targets on a starved CPU, must not go without the only full passes there are)."""

    RETRY_SECONDS = 1.0
    GIVE_BACK_SECONDS = 5.0

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: dict[Exposition, None] = {}  # an ordered set
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._unexpected = LoopErrors(log, "renderer")
        self._given_back = time.monotonic()

    def changed(self, exposition: Exposition) -> None:
        with self._cond:
            if self._stopped:
                return
            self._pending[exposition] = None
            if self._thread is None:
                thread = threading.Thread(target=self._loop, name="render", daemon=True)
                try:
                    thread.start()
                    self._thread = thread
                except RuntimeError as exc:  # out of threads: kept pending, the next change tries again
                    log.error("could not start the renderer thread (%s): tried again at the next change", exc)
            self._cond.notify()

    def forget(self, exposition: Exposition) -> None:
        with self._cond:
            self._pending.pop(exposition, None)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2)

    def _next(self) -> Exposition | None:
        with self._cond:
            while not self._pending and not self._stopped:
                self._cond.wait()
            if self._stopped:
                return None
            exposition = next(iter(self._pending))
            del self._pending[exposition]
            return exposition

    def _loop(self) -> None:
        while (exposition := self._next()) is not None:
            try:
                exposition.render_now()
            except Exception as exc:  # noqa: BLE001 - every loop survives: the last rendering stays
                self._unexpected.report(exc)
                DEADLINES.watch(self.RETRY_SECONDS, exposition._dirty)  # noqa: SLF001 - not rendered yet: again
            del exposition
            with self._cond:
                idle = not self._pending
            if idle or time.monotonic() >= self._given_back + self.GIVE_BACK_SECONDS:
                give_back_freed_memory()
                self._given_back = time.monotonic()


class FleetExposition(Exposition):
    """/metrics of a fleet: the targets' health and the process figures, rendered after a change,
    but never more than RENDER_SHARE of the time: every target's poll changes it (67 times a second
    at 1,000 targets polled every 15 s), and each rendering writes every target's figures (at that
    size rendering after each poll took most of a core, and a tenth of the time still held scrapes
    up: /metrics p95 42 ms against 7.5 at a rendering a second). After a rendering that took t,
    the next waits until t / RENDER_SHARE has passed since it began: a few targets' counts wait
    tens of milliseconds, 1,000 targets' a second or two. t is the rendering thread's CPU time, not
    the wall clock's (a SIGSTOP or CPU starvation during a rendering must not freeze the counts for
    fifty times as long), and the wait is MAX_GAP_SECONDS at most. A target added, gone, or whose
    up changed is rendered at once all the same: only its counts wait."""

    RENDER_SHARE = 0.02
    MAX_GAP_SECONDS = 5.0

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 cpu_clock: Callable[[], float] = time.thread_time) -> None:
        self._targets: dict[str, Snapshot] = {}
        self._cpu_clock = cpu_clock  # what a rendering costs: this thread's CPU time
        self._next_render = -math.inf  # not before this (the clock)
        self._deferred = False  # a rendering is asked for at _next_render already
        super().__init__(clock=clock)

    def render_now(self) -> None:
        began, cpu = self._clock(), self._cpu_clock()
        super().render_now()
        gap = (self._cpu_clock() - cpu) / self.RENDER_SHARE
        self._next_render = began + min(gap, self.MAX_GAP_SECONDS)

    def _dirty(self) -> None:
        """Under _lock: render now, or when the last rendering's share allows."""
        if self._renderer is None or self._deferred:
            return
        wait = self._next_render - self._clock()
        if wait <= 0:
            self._renderer.changed(self)
            return
        self._deferred = True
        DEADLINES.watch(wait, self._gap_over)

    def _gap_over(self) -> None:
        with self._lock:
            self._deferred = False
            self._dirty()

    def publish_target(self, name: str, snapshot: Snapshot) -> None:
        with self._lock:
            before = self._targets.get(name)
            self._targets = {**self._targets, name: snapshot}
            if before is None or before.up != snapshot.up:
                self._dirty_now()  # a target's health changed: said at once
            else:
                self._dirty()

    def forget_target(self, name: str) -> None:
        with self._lock:
            self._targets = {k: v for k, v in self._targets.items() if k != name}
            self._dirty_now()

    def _dirty_now(self) -> None:
        """Under _lock: render now, whatever the share."""
        if self._renderer is not None:
            self._renderer.changed(self)

    def _parts(self, state: tuple[Snapshot, tuple[ProbeResult, ...], ReloadStatus]) -> list[str]:
        with self._lock:
            targets, reload = self._targets, self._reload
        return [render_fleet(targets, reload).decode()]
