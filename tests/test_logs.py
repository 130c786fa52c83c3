"""Log lines: one per event, logfmt for people, json for machines, nothing split by a newline."""

from __future__ import annotations

import json
import logging

from exporter.logs import JsonFormatter, LogfmtFormatter


def record(message: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("exporter.poller", logging.WARNING, __file__, 1, message, args, None)


def test_logfmt_quotes_what_needs_quoting_and_keeps_one_line() -> None:
    line = LogfmtFormatter().format(record("poll failed on %s: %s", "db:5432/app", 'bad "thing"\nsecond line'))
    assert "\n" not in line
    assert line.split(" ", 1)[1].startswith("level=warning logger=exporter.poller msg=")
    assert 'msg="poll failed on db:5432/app: bad \\"thing\\"\\nsecond line"' in line


def test_json_is_one_object_per_line() -> None:
    line = JsonFormatter().format(record("connected to %s", "db:5432/app ü"))
    parsed = json.loads(line)
    assert parsed["msg"] == "connected to db:5432/app ü" and parsed["level"] == "warning"
    assert set(parsed) == {"ts", "level", "logger", "msg"} and "\n" not in line
