"""Log set-up: logfmt for people, json for machines; one line per event."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import traceback
from collections.abc import Callable

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("logfmt", "json")


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


def _logfmt_value(value: str) -> str:
    if value and not any(c in value for c in ' ="\\\n\t'):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t") + '"'


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in fields.items())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {"ts": _timestamp(record), "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()},
            ensure_ascii=False,
        )


def setup(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # psycopg's pool and prometheus_client are quiet unless asked.
    logging.getLogger("psycopg").setLevel(max(logging.WARNING, root.level))


def describe_exception(exc: BaseException) -> str:
    """'ValueError: invalid literal ... (poolers.py:57 in resolve_console)': what and where, one line."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [frame for frame in frames if f"{os.sep}exporter{os.sep}" in frame.filename] or frames
    where = f" ({os.path.basename(ours[-1].filename)}:{ours[-1].lineno} in {ours[-1].name})" if ours else ""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}{': ' + text if text else ''}{where}"


class LoopErrors:
    """Unexpected exceptions of one loop, which goes on after each: one error line naming the
    exception and where it was raised, at most once a minute for the same one; the traceback at
    debug level every time."""

    EVERY_SECONDS = 60.0

    def __init__(self, logger: logging.Logger, loop: str, clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self._loop = loop
        self._clock = clock
        self._last: dict[str, float] = {}

    def report(self, exc: BaseException) -> str:
        """Log one unexpected exception; returns its one-line description."""
        line = describe_exception(exc)
        now = self._clock()
        if now - self._last.get(line, -math.inf) >= self.EVERY_SECONDS:
            if len(self._last) > 100:  # errors whose text varies: forget the old ones
                self._last.clear()
            self._last[line] = now
            self._log.error("%s: unexpected error, going on: %s", self._loop, line)
        self._log.debug("%s: unexpected error", self._loop, exc_info=exc)
        return line
