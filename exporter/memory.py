"""Giving freed memory back to the system after each rendering.

Two kinds of memory stay with the process after a peak unless something gives them back:

- The C heap's free pages. A poll of 50,000 family keys holds its new rows, tracker and totals
  beside the last poll's until it ends; glibc keeps the freed pages of such peaks, so the resident
  size stayed at the peak: 61 MB at the benchmark's key-family point, 55 MB once malloc_trim
  returns them (measured: 0.07 ms the first time, 1 µs when there is nothing to give back). Where
  the C library has no malloc_trim (musl, macOS), nothing is done.
- Cyclic garbage of failed calls. A failed or broken-off connect or statement leaves its error,
  traceback, frames and psycopg's parsed connection options in reference cycles; while the call
  ran, the collector's young passes found them alive and promoted them to the oldest generation,
  which a full pass visits only after a quarter as many objects again have been promoted. Under
  the truth test's faults 3,450 of psycopg's ConninfoOption and 409 tracebacks were alive at once,
  and the resident size grew by 18% in 30 minutes, in steps (Python's allocator gives an arena
  back only once it is wholly empty). So a full pass runs after a rendering, at most every
  FULL_PASS_EVERY seconds, and more rarely where it is slower: never more than FULL_PASS_SHARE of
  the time (measured 4-7 ms for the exporter's 40,000-odd objects on this machine: one pass every
  5-7 s, at most 0.1% of a core). A pass holds the interpreter for as long as it takes; where it is
  long (a heap of many targets), it is as rare: at most one pass's length per 1,000 times it.
  Unless garbage piles up meanwhile: a pass runs after a rendering whatever the share once the
  interpreter's allocated blocks have grown by FULL_PASS_GROWTH since the last pass (still at most
  every FULL_PASS_EVERY seconds). Paced by the
  share alone, a long pass meant a long wait, the garbage of that wait a longer pass and a longer
  wait again: 60 targets refused every second grew the heap 1.6 MB/s, and the pass that came at
  30 s (261 ms) set the next one 261 s later (the share would allow ever longer waits).
- The interpreter's own full passes are taken over (take_over_full_passes, at start): it starts one
  whenever a quarter as many objects again have reached the oldest generation, whether they are
  garbage or not, and a poll's rows reach it and die every interval. At 1,000 targets (a heap of
  260 MB) that was a 467 ms pass every 18 s, 2.2% of the time, the whole process frozen during each
  (a scrape waited 256 ms: the benchmark, gc.callbacks). Ours come no more often than the share
  above allows, or than the garbage's growth asks; the young generations are collected as before.
  (CPython 3.11-3.13; 3.14's incremental collector ignores the thresholds past the first and
  starts no full pass of its own: nothing to take over there.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import math
import sys
import threading
import time
from collections.abc import Callable

FULL_PASS_EVERY = 5.0  # seconds between two full passes of the cyclic collector, at least
# The oldest generation's threshold once taken over: the interpreter never reaches it (it counts
# collections of the middle generation).
NEVER = 2**31 - 1
FULL_PASS_SHARE = 0.001  # of the time, at most, spent in them
# A pass whatever the share once the allocated blocks have grown by this much since the last one
# (the interpreter's own rule, a quarter, but of what a pass left alive rather than of every object
# ever promoted: a poll's rows that die by reference counting do not count).
FULL_PASS_GROWTH = 0.25


def _malloc_trim() -> Callable[[], object] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    return lambda: trim(0)


_TRIM = _malloc_trim()


class FreedMemory:
    """After each rendering: a full pass of the cyclic collector when due, then the C heap's free
    pages back to the system. Every renderer calls the one instance (the process's Renderer, and
    one an Exposition started alone makes for itself): one pass at a time, and a thread that
    finds one running leaves it to that one."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 collect: Callable[[], object] = gc.collect, trim: Callable[[], object] | None = _TRIM,
                 blocks: Callable[[], int] = sys.getallocatedblocks) -> None:
        self._clock, self._collect, self._trim, self._blocks = clock, collect, trim, blocks
        self._due = self._last = -math.inf  # the next pass by the share; the last pass
        self._alive = 0  # allocated blocks after the last pass
        self._passing = threading.Lock()

    def _wanted(self, now: float) -> bool:
        return now >= self._due or (now >= self._last + FULL_PASS_EVERY
                                    and self._blocks() > self._alive * (1 + FULL_PASS_GROWTH))

    def give_back(self) -> None:
        now = self._clock()
        if self._wanted(now) and self._passing.acquire(blocking=False):
            try:
                if self._wanted(now):  # not done meanwhile by the thread that held the lock
                    self._collect()
                    took = self._clock() - now
                    self._due, self._last = now + max(FULL_PASS_EVERY, took / FULL_PASS_SHARE), now
                    self._alive = self._blocks()
            finally:
                self._passing.release()
        if self._trim is not None:
            self._trim()


_FREED = FreedMemory()


def take_over_full_passes() -> None:
    """From now on the interpreter starts no full pass of its own: FreedMemory's, paced, are the
    ones (see the module's docstring). The young generations' thresholds stay."""
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, NEVER)


def give_back_freed_memory() -> None:
    """Cyclic garbage collected when due, and the C heap's free pages returned (glibc)."""
    _FREED.give_back()
