"""Calls that may hang on a hung server: run each on its own thread and stop waiting at a deadline.

statement_timeout is enforced by the server, so a server that is stopped outright (SIGSTOP, a
frozen VM) never answers it. The caller stops waiting instead; the call goes on until the server
answers or the connection breaks, and no new call starts before it ends: never a pile-up of
connections behind a hung server.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class StuckCall(Exception):
    """The previous call has not returned within its deadline; it is still running."""


class OneAtATime:
    """Runs one call at a time on a daemon thread, waiting for it at most a deadline."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._thread: threading.Thread | None = None

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def call(self, fn: Callable[[], T], timeout: float) -> T:
        if self.busy:
            raise StuckCall(f"the previous {self._name} has not returned yet")
        box: dict[str, object] = {}

        def target() -> None:
            try:
                box["value"] = fn()
            except BaseException as exc:  # handed to the caller below
                box["error"] = exc

        # A daemon thread: a call stuck on a hung server must not keep the process from exiting.
        self._thread = threading.Thread(target=target, name=self._name, daemon=True)
        self._thread.start()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise StuckCall(f"{self._name} did not return within {timeout:g}s")
        if "error" in box:
            raise box["error"]  # type: ignore[misc]
        return box["value"]  # type: ignore[return-value]
