"""The previous release's poll (57bb5b5, before issue 21), run the way that release ran it, as a
subject of its own: the statement it sent and the way it sent it, without its Python.

Issue 21 widened the poll (every waiting row of any lock type, the transactionid rows of prepared
transactions, a materialised CTE, pg_prepared_xacts); its budget is that with nobody waiting the
default point shows no database time above this statement's beyond the run-to-run spread. So the
statement below is 57bb5b5's exporter/queries.py POLL (the PostgreSQL 14+ form, with waitstart)
and _POLL_TRANSACTION, copied verbatim (tests/test_bench.py compares them with git's copy), and
the loop is 57bb5b5's poller: an autocommit connection, the statement PREPAREd once per connection
inside a transaction with LOCAL timeouts, then at each poll one simple-protocol string (BEGIN,
three SET LOCALs, EXECUTE, COMMIT) whose fifth result is read.
"""

from __future__ import annotations

import psycopg

from bench.measure import Background

COMMIT = "57bb5b5"
APPLICATION_NAME = "bench-previous-release"
POLL_STATEMENT_NAME = "pg_advisory_lock_exporter_poll"
LOCAL_TIMEOUTS = "SELECT set_config('statement_timeout', %(ms)s, true), set_config('lock_timeout', %(ms)s, true)"

# -- verbatim from 57bb5b5:exporter/queries.py ----------------------------------------------
_POLL_TEMPLATE = """
WITH held AS (
    SELECT l.database, l.pid, l.objsubid, l.granted, l.mode = 'ShareLock' AS shared,
           array_agg((l.classid::int8 << 32) | l.objid::int8) AS keys,
           min({waitstart}) AS waitstart
    FROM pg_locks AS l
    WHERE l.locktype = 'advisory'
    GROUP BY l.database, l.pid, l.objsubid, l.granted, l.mode
)
SELECT coalesce(d.datname, h.database::text) AS datname, h.pid, h.objsubid::int AS objsubid, h.granted,
       h.shared, h.keys,
       extract(epoch FROM a.backend_start)::float8 AS backend_start,
       a.application_name, a.usename::text AS usename, host(a.client_addr) AS client_addr,
       a.client_port, a.state,
       a.xact_start IS NULL AND a.state = 'idle' AS outside_transaction,
       CASE WHEN NOT h.granted
            THEN greatest(extract(epoch FROM now() - coalesce(h.waitstart, a.query_start))::float8, 0) END AS wait_seconds,
       CASE WHEN a.state LIKE 'idle%'
            THEN greatest(extract(epoch FROM now() - a.state_change)::float8, 0) END AS idle_seconds
FROM held AS h
LEFT JOIN pg_stat_activity AS a ON a.pid = h.pid
LEFT JOIN pg_database AS d ON d.oid = h.database
"""

POLL = _POLL_TEMPLATE.format(waitstart="l.waitstart")
_POLL_TRANSACTION = """BEGIN;
SET LOCAL statement_timeout = {ms};
SET LOCAL lock_timeout = {ms};
SET LOCAL enable_sort = off;
{poll};
COMMIT"""
POLL_RESULT_INDEX = 4  # the poll's rows are the fifth result of the transaction
# -- end of the verbatim part -------------------------------------------------------------------

PREPARE_POLL = f"PREPARE {POLL_STATEMENT_NAME} AS {POLL.strip()}"


def poll_transaction(interval: float) -> str:
    """57bb5b5's poll_query(version, interval, prepared=True): the timeouts were the poll interval."""
    return _POLL_TRANSACTION.format(ms=max(1, int(interval * 1000)), poll=f"EXECUTE {POLL_STATEMENT_NAME}")
MARKER = "%WITH held AS%"


class PreviousRelease(Background):
    """57bb5b5's poll statement every interval, on its own connection and role, in this process."""

    role = "bench_previous"
    marker = MARKER

    def __init__(self, dsn: str, interval: float) -> None:
        super().__init__()
        self._dsn, self._interval = dsn, interval
        self._ms = str(max(1, int(interval * 1000)))  # 57bb5b5's local_timeouts around the PREPARE
        self.rows = 0  # rows of the last poll

    def _loop(self) -> None:
        query = poll_transaction(self._interval)
        with psycopg.connect(self._dsn, autocommit=True, application_name=APPLICATION_NAME,
                             prepare_threshold=None) as conn:
            with conn.transaction():
                conn.execute(LOCAL_TIMEOUTS, {"ms": self._ms})
                conn.execute(PREPARE_POLL)
            while not self._stop.is_set():
                with conn.cursor() as cur:
                    cur.execute(query)
                    for _ in range(POLL_RESULT_INDEX):
                        cur.nextset()
                    self.rows = len(cur.fetchall())
                self._stop.wait(self._interval)
