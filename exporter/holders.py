"""Who holds a poll row's locks: the session, the client a pooler lends its backend to, nobody (a
session lock stranded on a transaction pool), or a prepared transaction. Pure."""

from __future__ import annotations

from typing import Any, NamedTuple

from .pooled import EMPTY_VIEW, HAZARD_MODES, PoolerView
from .snapshot import MODE_EXCLUSIVE, Holder
from .tracker import SessionId


class Who(NamedTuple):
    """Who holds a row's locks: the session, or through a pooler the client it serves now; or a
    prepared transaction (pid None, known by its transaction id; application_name is its gid)."""

    pid: int | None
    backend_start: float | None
    application_name: str
    usename: str
    client_addr: str
    state: str
    pooler: str
    stranded: bool  # a session-level hold on a transaction-pool backend: owned by nobody
    prepared_xid: int | None = None

    @property
    def order(self) -> tuple[bool, int, int]:
        """Sessions by pid, then prepared transactions by transaction id: a total order without None."""
        return (self.pid is None, self.pid or 0, self.prepared_xid or 0)


def session_id(row: Any) -> SessionId:
    """(pid, backend_start, prepared transaction id): a reused pid is another session, and each
    prepared transaction is a holder of its own."""
    return (row.pid, row.backend_start, row.prepared_xid)


def who_holds(row: Any, view: PoolerView) -> Who:
    """The holder of a row's locks. Through a pooler: the linked client when the pool is in
    session mode or the backend is inside that client's transaction; nobody when the backend of a
    transaction or statement pool is outside any transaction (its locks are session-level, left by
    some earlier borrower: application_name is then the last borrower's and not trusted)."""
    link = view.lookup(row.pid, row.client_port, row.client_addr) \
        if view is not EMPTY_VIEW and row.pid is not None else None
    if link is not None:
        outside = bool(row.outside_transaction)
        if outside and link.pool_mode in HAZARD_MODES:
            return Who(row.pid, row.backend_start, "", row.usename or "", "", row.state or "", link.pooler, True)
        client = link.client
        if client is not None and (link.pool_mode == "session" or not outside):
            return Who(row.pid, row.backend_start, client.application_name, client.user, client.addr, row.state or "",
                       link.pooler, False)
    return Who(row.pid, row.backend_start, row.application_name or "", row.usename or "", row.client_addr or "",
               row.state or "", link.pooler if link is not None else "", False, row.prepared_xid)


def by_pid_and_key(holder: Holder) -> tuple[tuple[bool, int, int], str]:
    """holder_info's order for a lock: by holder, then key."""
    return holder.order, holder.key


def by_pid_key_and_mode(holder: Holder) -> tuple[tuple[bool, int, int], str, bool]:
    """unnamed_holder_info's order: by holder, key, then mode."""
    return holder.order, holder.key, MODE_EXCLUSIVE in holder.modes
