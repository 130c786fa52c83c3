"""What the pooler consoles say about the server's backends, as data: which pooler each backend
is a server connection of, in which pool mode, borrowed by whom. Pure: poolers.py reads the
consoles, assemble.py reads this."""

from __future__ import annotations

from dataclasses import dataclass, field

HAZARD_MODES = frozenset({"transaction", "statement"})
UNIX_CLIENT_PORT = -1  # pg_stat_activity.client_port of a client over a Unix socket


@dataclass(frozen=True)
class Client:
    """A pooler's client connection, as its console shows it."""

    addr: str
    user: str
    application_name: str


@dataclass(frozen=True)
class Release:
    """When the pooler closes an unused server connection by itself, as of the console's read."""

    seconds: float  # from the read on; a lower bound: a connection lent to a client is not closed
    reason: str  # server_lifetime or server_idle_timeout
    backend: int  # the server connection's backend pid


def release_after(age: float, idle: float, lifetime: float, idle_timeout: float, min_pool_size: int) -> tuple[float, str]:
    """Seconds until PgBouncer closes an unused server connection, by its own rules (janitor.c,
    check_unused_servers): idle longer than server_idle_timeout (0 disables it; not while the pool
    is at min_pool_size, which this does not count, so it is left out when min_pool_size is set),
    or connected longer than server_lifetime (0: the connection is used once, then closed).
    PgBouncer spaces lifetime closes in a pool (life_over), so this is the soonest, not the time."""
    soonest = (max(lifetime - age, 0.0), "server_lifetime")
    if idle_timeout > 0 and min_pool_size == 0:
        soonest = min(soonest, (max(idle_timeout - idle, 0.0), "server_idle_timeout"))
    return soonest


@dataclass(frozen=True)
class ServerLink:
    """A server connection of a pooler: which pooler, in which pool mode, borrowed by whom now,
    and when the pooler would close it, unused."""

    pooler: str
    pool_mode: str
    client: Client | None  # None: nobody borrows it now (or the console is not known)
    release: Release | None = None  # None: not known (a pooler known by address only)


@dataclass(frozen=True)
class PoolerView:
    """Every pooler's server connections, as one poll sees them.

    Over TCP a server connection is its backend pid and the port it connects from (the backend's
    client_port): unique on the server. Over a Unix socket the backend's client_port is -1 for
    every client, so such a connection is its backend pid and the server's port (SHOW SERVERS'
    `port`, the server's `port` setting): the pid alone could be a backend of another server the
    pooler also serves.
    """

    by_backend: dict[tuple[int, int], ServerLink] = field(default_factory=dict)  # (pid, local_port)
    by_unix_backend: dict[tuple[int, int], ServerLink] = field(default_factory=dict)  # (pid, server port)
    by_address: dict[str, ServerLink] = field(default_factory=dict)  # poolers known by address only
    server_port: int | None = None  # the monitored server's port setting
    consoles: tuple[object, ...] = ()  # snapshot.ConsoleStatus of each console read

    def lookup(self, pid: int, client_port: int | None, client_addr: str | None) -> ServerLink | None:
        """The pooler a backend is a server connection of, if any."""
        if client_port == UNIX_CLIENT_PORT:
            if self.server_port is not None:
                link = self.by_unix_backend.get((pid, self.server_port))
                if link is not None:
                    return link
        elif client_port is not None:
            link = self.by_backend.get((pid, client_port))
            if link is not None:
                return link
        return self.by_address.get(client_addr or "")


EMPTY_VIEW = PoolerView()
