"""Every SQL statement the exporter runs, as named constants.

Reading pg_locks takes all 16 lock-manager partition locks, so a poll reads it exactly once
(the MATERIALIZED CTE) and pg_stat_activity once, and matches names to keys on the server.
"""

from __future__ import annotations

# Exporter connections identify themselves; the probe's sessions are left out of every figure.
APPLICATION_NAME = "pg-advisory-lock-exporter"
PROBE_APPLICATION_NAME = "pg-advisory-lock-exporter-probe"

# pg_lock_status() is estimated at 5 advisory rows whatever the truth (10,000 or 50,000), so with
# a few hundred named keys the planner picks a nested loop over them: 86 ms instead of 18 ms at
# 10,000 locks and 100 names. The poller's session joins by hash or merge only.
POLLER_PLANNER_SETUP = "SELECT set_config('enable_nestloop', 'off', false)"

SERVER_INFO = """
SELECT current_setting('server_version_num')::int AS version_num,
       current_database() AS database,
       current_user AS username,
       (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) AS is_superuser,
       pg_has_role(current_user, 'pg_read_all_stats', 'MEMBER') AS can_read_all_stats
"""

# Every statement of every exporter connection is bounded; none may queue on a lock.
SESSION_SETUP = "SELECT set_config('statement_timeout', %(ms)s, false), set_config('lock_timeout', %(ms)s, false)"

# The databases presets are computed for: every one that takes connections.
DATABASES = "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY datname"

# hashtext() returns int4; pg_advisory_lock(hashtext(...)) widens it to bigint with sign.
RESOLVE_STRING_KEYS = """
SELECT t, hashtext(t)::int8, hashtextextended(t, 0)
FROM unnest(%(texts)s::text[]) AS t
"""

# pg_locks is read once, and each advisory row tagged with the configured lock it belongs to
# (idx, or NULL for keys nobody named); rows of three kinds come back:
#   holder  - one per (configured lock, holding session), modes "1" exclusive, "2" shared,
#             "3" both, with who the session is and
#             hold_floor_s: how long pg_stat_activity proves it has held the lock at least
#             (an idle session took it no later than its last state change);
#   waiters - one per configured lock with waiters: how many, and the longest wait;
#   unnamed - one per database with advisory locks no configured name matches.
# %(datnames)s .. %(objsubids)s are parallel arrays, one element per configured lock, in
# config order; idx is the 1-based position.
_POLL_TEMPLATE = """
WITH activity AS MATERIALIZED (
    SELECT pid, backend_start, application_name, usename, client_addr, state, state_change,
           query_start
    FROM pg_stat_activity
),
named AS (
    SELECT k.idx::int AS idx, d.oid AS database, k.classid::oid AS classid,
           k.objid::oid AS objid, k.objsubid::int2 AS objsubid
    FROM unnest(%(datnames)s::text[], %(classids)s::int8[], %(objids)s::int8[],
                %(objsubids)s::int4[]) WITH ORDINALITY AS k(datname, classid, objid, objsubid, idx)
    JOIN pg_database AS d ON d.datname = k.datname
),
advisory AS MATERIALIZED (
    SELECT n.idx, l.database, l.pid, l.mode, l.granted, {waitstart} AS waitstart
    FROM pg_locks AS l
    LEFT JOIN named AS n
           ON (n.database, n.classid, n.objid, n.objsubid) = (l.database, l.classid, l.objid, l.objsubid)
    WHERE l.locktype = 'advisory'
      AND l.pid <> ALL (ARRAY(SELECT pid FROM activity WHERE application_name = %(probe_app)s))
)
SELECT 'holder' AS kind, h.idx, NULL::text AS datname, h.pid, h.modes,
       extract(epoch FROM act.backend_start)::float8 AS backend_start,
       act.application_name, act.usename::text, host(act.client_addr) AS client_addr, act.state,
       CASE WHEN act.state LIKE 'idle%%'
            THEN greatest(extract(epoch FROM now() - act.state_change)::float8, 0)
            ELSE 0 END AS seconds,
       0::bigint AS holders, 0::bigint AS waiters
FROM (
    -- one row per holding session, its modes folded into 1 (exclusive) + 2 (shared)
    SELECT m.idx, m.pid, (bool_or(m.mode = 'ExclusiveLock')::int + 2 * bool_or(m.mode = 'ShareLock')::int)::text AS modes
    FROM advisory AS m
    WHERE m.idx IS NOT NULL AND m.granted
    GROUP BY m.idx, m.pid
) AS h
LEFT JOIN activity AS act USING (pid)
UNION ALL
SELECT 'waiters', m.idx, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       coalesce(max(greatest(extract(epoch FROM now() - coalesce(m.waitstart, act.query_start))::float8, 0)), 0),
       0, count(DISTINCT m.pid)
FROM advisory AS m
LEFT JOIN activity AS act USING (pid)
WHERE m.idx IS NOT NULL AND NOT m.granted
GROUP BY m.idx
UNION ALL
SELECT 'unnamed', NULL, coalesce(d.datname, u.database::text), NULL, NULL, NULL, NULL, NULL,
       NULL, NULL, NULL, u.holders, u.waiters
FROM (
    SELECT a.database, count(*) FILTER (WHERE a.granted) AS holders,
           count(*) FILTER (WHERE NOT a.granted) AS waiters
    FROM advisory AS a
    WHERE a.idx IS NULL
    GROUP BY a.database
) AS u
LEFT JOIN pg_database AS d ON d.oid = u.database
"""

# PostgreSQL 14 added pg_locks.waitstart; before it, a waiter's wait began no earlier than
# its query_start, since a waiter is blocked inside its lock call.
POLL = _POLL_TEMPLATE.format(waitstart="l.waitstart")
POLL_PG13 = _POLL_TEMPLATE.format(waitstart="NULL::timestamptz")
WAITSTART_MIN_VERSION = 140000


def poll_query(server_version_num: int) -> str:
    """The poll statement for a server of this version."""
    return POLL if server_version_num >= WAITSTART_MIN_VERSION else POLL_PG13

# The probe: one autocommit statement of a transaction-level try-lock per try. Even when it
# gets the lock, the lock is released when the statement ends, and a crash of the exporter
# can never leave it held. A try never waits: pg_try_* returns at once, and lock_timeout and
# statement_timeout bound anything else.
PROBE_TRY_BIGINT = "SELECT pg_try_advisory_xact_lock(%(key)s::int8)"
PROBE_TRY_INT4_PAIR = "SELECT pg_try_advisory_xact_lock(%(first)s::int4, %(second)s::int4)"
# The server hashes the name itself, exactly as the application's own call does.
PROBE_TRY_HASHTEXT = "SELECT pg_try_advisory_xact_lock(hashtext(%(text)s)::int8)"
PROBE_TRY_HASHTEXTEXTENDED = "SELECT pg_try_advisory_xact_lock(hashtextextended(%(text)s, 0))"

# `pg-advisory-lock-exporter locks`: every advisory lock in the cluster now, one row per session
# and lock. pg_blocking_pids() is costly: it runs only for the rows of waiting sessions.
_LOCKS_NOW_TEMPLATE = """
SELECT d.datname, l.classid::int8, l.objid::int8, l.objsubid::int, l.mode, l.granted, l.pid,
       a.application_name, a.usename::text, host(a.client_addr), a.state,
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
