"""The benchmark's load: sessions holding many advisory locks, some shared, some in open
transactions, and some sessions waiting."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import psycopg

# Keys 1..locks are held; the first `named` keys are the ones the exporters name.
SHARED_EVERY = 5        # every 5th key is taken shared, by two sessions
XACT_EVERY = 4          # every 4th session holds its locks inside an open transaction
CHURN_KEYS = 900_000_000  # the churning sessions' own keys start here


@dataclass
class Load:
    dsn: str
    sessions: int = 200
    locks: int = 10_000
    waiters: int = 10
    namespace: int | None = None  # take pg_advisory_lock(namespace, k) instead of pg_advisory_lock(k)
    # Every session outside a transaction takes or lets go of a key of its own every half second,
    # so every poll sees most sessions changed (the exporter's dearest case: nothing to reuse).
    churn: bool = False
    _conns: list[psycopg.Connection] = field(default_factory=list)
    _churning: list[threading.Thread] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _waiting: list[tuple[psycopg.Connection, threading.Thread]] = field(default_factory=list)

    def start(self) -> "Load":
        sessions = max(1, min(self.sessions, self.locks))
        for s in range(sessions):
            xact = s % XACT_EVERY == 1
            conn = psycopg.connect(self.dsn, autocommit=not xact, application_name=f"bench-holder-{s}")
            self._conns.append(conn)
            mine = list(range(1 + s, self.locks + 1, sessions))
            exclusive = [k for k in mine if k % SHARED_EVERY]
            shared = [k for k in mine if not k % SHARED_EVERY]
            fn = "pg_advisory_xact_lock" if xact else "pg_advisory_lock"
            arg = "k" if self.namespace is None else f"{int(self.namespace)}, k::int4"
            conn.execute(f"SELECT count({fn}({arg})) FROM unnest(%s::int8[]) AS k", [exclusive])
            conn.execute(f"SELECT count({fn}_shared({arg})) FROM unnest(%s::int8[]) AS k", [shared])
        # A second holder of each shared key, so shared locks have two holders.
        sharer = psycopg.connect(self.dsn, autocommit=True, application_name="bench-sharer")
        self._conns.append(sharer)
        arg = "k" if self.namespace is None else f"{int(self.namespace)}, k::int4"
        sharer.execute(
            f"SELECT count(pg_advisory_lock_shared({arg})) FROM generate_series(%s::int8, %s::int8, %s::int8) AS k",
            [SHARED_EVERY, self.locks, SHARED_EVERY],
        )
        if self.churn:
            movers = [conn for s, conn in enumerate(self._conns[:sessions]) if s % XACT_EVERY != 1]
            thread = threading.Thread(target=self._churn, args=(movers,), daemon=True)
            thread.start()
            self._churning.append(thread)
        for w in range(self.waiters):
            key = 1 + w if (1 + w) % SHARED_EVERY else 2 + w  # an exclusively held key
            conn = psycopg.connect(self.dsn, autocommit=True, application_name=f"bench-waiter-{w}")
            thread = threading.Thread(target=self._wait, args=(conn, key, self.namespace), daemon=True)
            thread.start()
            self._waiting.append((conn, thread))
        return self

    @staticmethod
    def _wait(conn: psycopg.Connection, key: int, namespace: int | None) -> None:
        try:
            if namespace is None:
                conn.execute("SELECT pg_advisory_lock(%s::int8)", [key])
            else:
                conn.execute("SELECT pg_advisory_lock(%s::int4, %s::int4)", [namespace, key])
        except psycopg.Error:
            pass

    def _churn(self, movers: list[psycopg.Connection]) -> None:
        held = [False] * len(movers)
        while not self._stop.is_set():
            for n, conn in enumerate(movers):
                spare = CHURN_KEYS + n  # a key no other session takes
                conn.execute("SELECT pg_advisory_unlock(%s::int8)" if held[n] else "SELECT pg_advisory_lock(%s::int8)",
                             [spare])
                held[n] = not held[n]
            self._stop.wait(0.5)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._churning:
            thread.join(10)
        for conn, thread in self._waiting:
            conn.cancel()
            thread.join(5)
            conn.close()
        for conn in self._conns:
            conn.close()
        self._conns.clear()
        self._waiting.clear()
