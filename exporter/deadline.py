"""Calls that may hang on a hung server: run each on its own thread and stop waiting at a deadline.

statement_timeout is enforced by the server, so a server that is stopped outright (SIGSTOP, a
frozen VM) never answers it, and a black-holed network never answers at all. The caller stops
waiting instead and breaks the call's connection off (connection.break_off), so the call returns
with an error; no new call starts before it has returned: never two calls, nor a pile-up of
connections, behind a hung server.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class StuckCall(Exception):
    """The previous call has not returned within its deadline; it is still running."""


class OneAtATime:
    """Runs one call at a time on a daemon worker thread, waiting for it at most a deadline.

    The worker is kept between calls (a thread started per call cost the poll loop a thread
    start each interval) and ends after IDLE_SECONDS without a call, so a discarded caller
    leaves no thread behind for long.
    """

    IDLE_SECONDS = 60.0

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._running = False  # a call was handed over and has not returned

    @property
    def busy(self) -> bool:
        return self._running

    def wait_idle(self, timeout: float) -> bool:
        """Wait until the call in progress returns (tests); True if none is running then."""
        deadline = time.monotonic() + timeout
        while self._running and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._running

    def call(self, fn: Callable[[], T], timeout: float) -> T:
        if self._running:
            raise StuckCall(f"the previous {self._name} has not returned yet")
        box: dict[str, object] = {}
        done = threading.Event()

        def job() -> None:
            try:
                box["value"] = fn()
            except BaseException as exc:  # handed to the caller below
                box["error"] = exc
            finally:
                self._running = False
                done.set()

        self._running = True
        with self._lock:
            self._jobs.put(job)
            if self._thread is None:
                # A daemon thread: a call stuck on a hung server must not keep the process from exiting.
                self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
                self._thread.start()
        if not done.wait(timeout):
            raise StuckCall(f"{self._name} did not return within {timeout:g}s")
        if "error" in box:
            raise box["error"]  # type: ignore[misc]
        return box["value"]  # type: ignore[return-value]

    def _work(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=self.IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    if self._jobs.empty():
                        self._thread = None
                        return
                continue
            job()
            # Not kept until the next call: a failed call's error holds its frames, and a timed-out
            # connect's frames hold its socket, open to the server, until they are let go.
            del job
