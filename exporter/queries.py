"""Every SQL statement the exporter runs, as named constants.

Reading pg_locks takes all 16 lock-manager partition locks, so a poll reads it exactly once
(the CTE, which the plan materialises) and pg_stat_activity once; the exporter names the keys.
"""

from __future__ import annotations

# Exporter connections identify themselves; the probe's sessions are left out of every figure.
APPLICATION_NAME = "pg-advisory-lock-exporter"
PROBE_APPLICATION_NAME = "pg-advisory-lock-exporter-probe"

SERVER_INFO = """
SELECT current_setting('server_version_num')::int AS version_num,
       pg_backend_pid() AS backend_pid,
       inet_server_port() AS server_port,
       current_database() AS database,
       current_user AS username,
       (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) AS is_superuser,
       pg_has_role(current_user, 'pg_read_all_stats', 'MEMBER') AS can_read_all_stats
"""

# Every statement of every exporter connection is bounded; none may queue on a lock.
SESSION_SETUP = "SELECT set_config('statement_timeout', %(ms)s, false), set_config('lock_timeout', %(ms)s, false)"
# The same, for one transaction only (the poller's connections: see poll_query).
LOCAL_TIMEOUTS = "SELECT set_config('statement_timeout', %(ms)s, true), set_config('lock_timeout', %(ms)s, true)"

# The databases presets are computed for: every one that takes connections.
DATABASES = "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY datname"

# hashtext() returns int4; pg_advisory_lock(hashtext(...)) widens it to bigint with sign.
RESOLVE_STRING_KEYS = """
SELECT t AS text, hashtext(t)::int8 AS hashtext, hashtextextended(t, 0) AS hashtextextended
FROM unnest(%(texts)s::text[]) AS t
"""

# pg_locks is read once (advisory rows only) and pg_stat_activity once. The server does only what
# it must: it folds the rows of one session, database, key form, mode and grant into one row with
# the keys as an array, so a poll returns about one row per holding session, not one per lock.
# Naming keys (configured, families, presets) is done by the exporter, whose CPU is not the
# database's: the statement is the same whatever the config names, and costs what the floor costs.
# keys are (classid << 32) | objid as a signed bigint: the bigint itself for pg_advisory_lock(bigint),
# the two int4 halves for pg_advisory_lock(int4, int4) (objsubid tells which).
# idle_seconds comes last: it is the one column of a holder's row that grows with time, and the
# exporter compares the rest with the last poll's to skip what did not change (assemble.Assembler).
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

# PostgreSQL 14 added pg_locks.waitstart; before it, a waiter's wait began no earlier than
# its query_start, since a waiter is blocked inside its lock call.
POLL = _POLL_TEMPLATE.format(waitstart="l.waitstart")
POLL_PG13 = _POLL_TEMPLATE.format(waitstart="NULL::timestamptz")
WAITSTART_MIN_VERSION = 140000

# A poll is its own transaction, sent as one simple-protocol string (one round trip), with its
# settings made LOCAL to it, so nothing is left on a backend a transaction-mode pooler hands to the
# application next:
# - statement_timeout and lock_timeout bound the poll (the poll interval);
# - enable_sort off: pg_lock_status() is always estimated at 5 advisory rows, so the planner
#   groups them by sorting; at 50,000 held locks that sort spilled to disk and cost 86 ms against
#   51 ms for the hash aggregate this setting leaves it.
# The poll statement itself is prepared once per connection (PREPARE, under a name of its own, so
# it never meets another client's statements) and run with EXECUTE: planning it cost more than
# running it when little is held (0.2 ms of 0.4 ms with 200 databases and nothing held). Through a
# transaction-mode pooler the EXECUTE may reach a server connection that never saw the PREPARE;
# the poller then plans the statement at every poll instead (poll_query with prepared=False).
POLL_STATEMENT_NAME = "pg_advisory_lock_exporter_poll"
_POLL_TRANSACTION = """BEGIN;
SET LOCAL statement_timeout = {ms};
SET LOCAL lock_timeout = {ms};
SET LOCAL enable_sort = off;
{poll};
COMMIT"""


def _poll_statement(server_version_num: int) -> str:
    return (POLL if server_version_num >= WAITSTART_MIN_VERSION else POLL_PG13).strip()


def prepare_poll(server_version_num: int) -> str:
    """The PREPARE of the poll statement for a server of this version."""
    return f"PREPARE {POLL_STATEMENT_NAME} AS {_poll_statement(server_version_num)}"


def poll_query(server_version_num: int, timeout_seconds: float, prepared: bool = False) -> str:
    """The poll transaction for a server of this version (prepared: EXECUTE the statement that
    prepare_poll made); its statements' results come in order: BEGIN, three SETs, the poll's rows,
    COMMIT."""
    poll = f"EXECUTE {POLL_STATEMENT_NAME}" if prepared else _poll_statement(server_version_num)
    return _POLL_TRANSACTION.format(ms=max(1, int(timeout_seconds * 1000)), poll=poll)


POLL_RESULT_INDEX = 4  # the poll's rows are the fifth result of the transaction

# The probe: one autocommit statement of a transaction-level try-lock per try. Even when it
# gets the lock, the lock is released when the statement ends, and a crash of the exporter
# can never leave it held. A try never waits: pg_try_* returns at once, and lock_timeout and
# statement_timeout bound anything else.
# Each try also says which backend ran it: through a transaction-mode pooler the backend changes
# between tries, and a try on a backend holding a stranded session lock would succeed (advisory
# locks are re-entrant per backend), so such results are not trusted.
PROBE_TRY_BIGINT = "SELECT pg_try_advisory_xact_lock(%(key)s::int8) AS got, pg_backend_pid() AS backend_pid"
PROBE_TRY_INT4_PAIR = ("SELECT pg_try_advisory_xact_lock(%(first)s::int4, %(second)s::int4) AS got, "
                       "pg_backend_pid() AS backend_pid")
# The server hashes the name itself, exactly as the application's own call does.
PROBE_TRY_HASHTEXT = "SELECT pg_try_advisory_xact_lock(hashtext(%(text)s)::int8) AS got, pg_backend_pid() AS backend_pid"
PROBE_TRY_HASHTEXTEXTENDED = ("SELECT pg_try_advisory_xact_lock(hashtextextended(%(text)s, 0)) AS got, "
                              "pg_backend_pid() AS backend_pid")

# `pg-advisory-lock-exporter locks`: every advisory lock in the cluster now, one row per session
# and lock. pg_blocking_pids() is costly: it runs only for the rows of waiting sessions.
_LOCKS_NOW_TEMPLATE = """
SELECT d.datname, l.classid::int8 AS classid, l.objid::int8 AS objid, l.objsubid::int AS objsubid, l.mode,
       l.granted, l.pid, a.application_name, a.usename::text AS usename, host(a.client_addr) AS client_addr, a.state,
       a.client_port, extract(epoch FROM a.backend_start)::float8 AS backend_start,
       a.xact_start IS NULL AND a.state = 'idle' AS outside_transaction,
       CASE WHEN l.granted AND a.state LIKE 'idle%%'
            THEN greatest(extract(epoch FROM now() - a.state_change)::float8, 0) END AS held_at_least,
       CASE WHEN NOT l.granted
            THEN greatest(extract(epoch FROM now() - coalesce({waitstart}, a.query_start))::float8, 0) END AS waiting,
       CASE WHEN NOT l.granted THEN pg_blocking_pids(l.pid) END AS blocked_by
FROM pg_locks AS l
LEFT JOIN pg_stat_activity AS a USING (pid)
LEFT JOIN pg_database AS d ON d.oid = l.database
WHERE l.locktype = 'advisory' AND a.application_name IS DISTINCT FROM %(probe_app)s
ORDER BY d.datname, l.classid, l.objid, l.objsubid, l.granted DESC, l.pid
"""
LOCKS_NOW = _LOCKS_NOW_TEMPLATE.format(waitstart="l.waitstart")
LOCKS_NOW_PG13 = _LOCKS_NOW_TEMPLATE.format(waitstart="NULL::timestamptz")


def locks_now_query(server_version_num: int) -> str:
    return LOCKS_NOW if server_version_num >= WAITSTART_MIN_VERSION else LOCKS_NOW_PG13

# The `locks` command names the table a pg_repack key stands for: a catalog lookup, so only in the
# database the dsn connects to. An oid dropped meanwhile has no row.
RELATION_NAMES = """
SELECT c.oid::int8 AS oid, c.oid::regclass::text AS relation
FROM pg_class AS c
WHERE c.oid = ANY(%(oids)s::oid[])
"""
