"""What really happened, as the server said it: the record the oracle judges scrapes against.

Every time here is the server's own clock (`clock_timestamp()`, epoch seconds) or, where only
the harness can tell (a kill, a restart), the harness's wall clock on the same machine. An
event is never a point: it happened somewhere inside [lo, hi] (the round trip that asked, or
the span of a fault), and the oracle treats that whole span as uncertain.

The workers and the fault injector append Records as JSON lines (one file per process, merged
by `load`); the oracle reads them back with `Truth`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

EXCLUSIVE = "exclusive"
SHARED = "shared"

# How a holder reached the server.
DIRECT = "direct"
TX_POOL = "txpool"  # a PgBouncer transaction pool: pid is the server connection's backend
SESSION_POOL = "sessionpool"


@dataclass(frozen=True)
class Span:
    """An instant known only to lie within [lo, hi] (epoch seconds)."""

    lo: float
    hi: float

    def __post_init__(self) -> None:
        if self.hi < self.lo:
            raise ValueError(f"span ends before it begins: {self.lo} > {self.hi}")


@dataclass(frozen=True)
class Holder:
    """Who holds or waits: a backend (pid; pid + backend_start is a session), or a prepared
    transaction (gid, pid None)."""

    pid: int | None
    backend_start: float | None = None
    gid: str | None = None
    application_name: str = ""


# A Busy's holder when which server connection of the pool ran the statement is unknown (it failed
# before answering): every backend of that target is taken as busy then.
ANY_BACKEND = Holder(pid=None, backend_start=None, gid=None, application_name="")


@dataclass(frozen=True)
class Hold:
    """One key held by one holder in one mode, from a grant to a release (None: still held at
    the record's end). waited: the wait before the grant began within this span (None: granted
    at once). A PREPARE ends the session's hold and begins the prepared transaction's: two Holds."""

    target: str  # the exporter's target name ("" in single-server mode)
    database: str
    key: tuple[int, int, int]  # classid, objid, objsubid as pg_locks shows them
    mode: str
    holder: Holder
    granted: Span
    released: Span | None = None
    waited: Span | None = None
    level: str = "session"  # or "xact"
    via: str = DIRECT
    stranded: Span | None = None  # a session lock left on a pooled server connection: since when

    def to_json(self) -> str:
        return json.dumps({"kind": "hold", **asdict(self)})


@dataclass(frozen=True)
class Wait:
    """A wait for a key that ended without a grant (cancelled, timed out, the session killed).
    A wait that ended in a grant is the Hold's `waited`."""

    target: str
    database: str
    key: tuple[int, int, int]
    mode: str
    holder: Holder
    began: Span
    ended: Span | None = None

    def to_json(self) -> str:
        return json.dumps({"kind": "wait", **asdict(self)})


@dataclass(frozen=True)
class Fault:
    """One fault of the schedule: what, where, and when it took effect and ended (proven: the
    harness saw it take effect, e.g. the server refused a connection, the process state was T)."""

    kind: str  # restart-fast, restart-immediate, freeze, net-stall, net-blackhole, net-reset, ...
    target: str  # the target (or "console", "exporter") it hit
    began: Span
    ended: Span | None = None
    blinds: bool = True  # a fault of a console, a pooler or another target blinds nothing
    proof: str = ""  # how the harness saw it take effect

    def to_json(self) -> str:
        return json.dumps({"kind": "fault", "fault": self.kind, **{k: v for k, v in asdict(self).items() if k != "kind"}})


@dataclass(frozen=True)
class Busy:
    """A transaction of a client of a transaction pool on one server connection: from before its
    BEGIN to after its COMMIT or ROLLBACK, or one statement outside a transaction (a strand's), from
    before it was sent to after its answer. The exporter proves a stranded lock only on an idle
    server connection, so a stranded lock on a busy one may go unproven (rule 3). holder
    ANY_BACKEND: it ran on a server connection nobody knows (every one is busy then)."""

    target: str
    holder: Holder  # the server connection's backend
    began: Span
    ended: Span | None = None

    def to_json(self) -> str:
        return json.dumps({"kind": "busy", **asdict(self)})


def _span(value: dict[str, float] | None) -> Span | None:
    return None if value is None else Span(value["lo"], value["hi"])


def parse(line: str) -> Hold | Wait | Fault | Busy:
    data = json.loads(line)
    kind = data.pop("kind")
    if kind == "fault":
        data["kind"] = data.pop("fault")
        return Fault(**{**data, "began": _span(data["began"]), "ended": _span(data.get("ended"))})
    data["holder"] = Holder(**data["holder"])
    if kind == "busy":
        return Busy(**{**data, "began": _span(data["began"]), "ended": _span(data.get("ended"))})
    data["key"] = tuple(data["key"])
    if kind == "hold":
        return Hold(**{**data, "granted": _span(data["granted"]), "released": _span(data.get("released")),
                       "waited": _span(data.get("waited")), "stranded": _span(data.get("stranded"))})
    if kind == "wait":
        return Wait(**{**data, "began": _span(data["began"]), "ended": _span(data.get("ended"))})
    raise ValueError(f"unknown record kind {kind!r}")


def load(paths: Iterable[Path]) -> Iterator[Hold | Wait | Fault | Busy]:
    for path in paths:
        with open(path) as handle:
            for line in handle:
                if line.strip():
                    yield parse(line)


@dataclass
class Truth:
    """Every record of a run, to ask what was true when."""

    holds: list[Hold] = field(default_factory=list)
    waits: list[Wait] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    busy: list[Busy] = field(default_factory=list)

    @classmethod
    def of(cls, records: Iterable[Hold | Wait | Fault | Busy]) -> "Truth":
        truth = cls()
        for record in records:
            {Hold: truth.holds, Wait: truth.waits, Fault: truth.faults, Busy: truth.busy}[type(record)].append(record)
        return truth
