"""Every SQL statement the exporter runs, as named constants.

Reading pg_locks takes all 16 lock-manager partition locks, so a poll reads it exactly once
(the CTE, which the plan materialises) and pg_stat_activity once; the exporter names the keys.
"""

from __future__ import annotations

from .dsn import timeout_ms

# Exporter connections identify themselves (a name proves nothing: no session is left out for it;
# the probe's own hold never meets a poll, since probe and poll of a server take turns).
APPLICATION_NAME = "pg-advisory-lock-exporter"
PROBE_APPLICATION_NAME = "pg-advisory-lock-exporter-probe"

SERVER_INFO = """
SELECT current_setting('server_version_num')::int AS version_num,
       pg_backend_pid() AS backend_pid,
       inet_server_port() AS server_port,
       host(inet_server_addr()) AS server_addr,
       inet_client_port() AS client_port,
       host(inet_client_addr()) AS client_addr,
       current_setting('port')::int AS port_setting,
       current_database() AS database,
       current_user AS username,
       (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) AS is_superuser,
       pg_has_role(current_user, 'pg_read_all_stats', 'MEMBER') AS can_read_all_stats
"""

# Every statement of every exporter connection is bounded, and none may queue on a lock; the
# settings are LOCAL to the transaction they bound, so nothing of ours stays on a backend that a
# transaction-mode pooler hands to the application next. enable_sort goes back to the server's
# default for the transaction: a direct poller connection turns it off for the poll statement
# (DIRECT_SETTINGS), and the chain statement planned without sorting took 0.6 s instead of 2 ms.
# Simple protocol (ms is an integer we write): the three in one round trip.
LOCAL_TIMEOUTS = "SET LOCAL statement_timeout = {ms}; SET LOCAL lock_timeout = {ms}; SET LOCAL enable_sort TO DEFAULT"

# The databases presets are computed for: every one that takes connections.
DATABASES = "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY datname"

# hashtext() returns int4; pg_advisory_lock(hashtext(...)) widens it to bigint with sign.
RESOLVE_STRING_KEYS = """
SELECT t AS text, hashtext(t)::int8 AS hashtext, hashtextextended(t, 0) AS hashtextextended
FROM unnest(%(texts)s::text[]) AS t
"""

# pg_locks is read once and pg_stat_activity once. The server does only what it must: it folds
# the rows of one session, database, key form, mode and grant into one row with the keys as an
# array, so a poll returns about one row per holding session, not one per lock. Naming keys
# (configured, families, presets) is done by the exporter, whose CPU is not the database's: the
# statement is the same whatever the config names, and costs what the floor costs.
# keys are (classid << 32) | objid as a signed bigint: the bigint itself for pg_advisory_lock(bigint),
# the two int4 halves for pg_advisory_lock(int4, int4) (objsubid tells which).
#
# A prepared transaction (PREPARE TRANSACTION) keeps its locks with pid NULL. Its advisory rows and
# its transactionid row share one virtualtransaction, so the same scan also takes the
# transactionid rows of pid NULL (a handful), grouped on their own; the groups (a few hundred
# rows, not the locks) are materialised so that pg_prepared_xacts, joined on those transaction
# ids, names each prepared holder (its gid, owner and since when) without a second scan.
# A prepared transaction is its own holder, known by its transaction id.
#
# The same scan takes every waiting row of any lock type (a backend waits for one lock at a time,
# so a waiting group is one row, and the three FILTERed aggregates read only those rows): a holder
# of an advisory lock that itself waits (for a table a report reads, for another advisory lock) is
# a blocked holder, and the poll says for what, in which mode, since when. Who blocks it is asked
# by a second statement only when some holder waits (CHAIN).
#
# Through a transaction-mode pooler the backend this poll runs on may hold someone else's session
# lock (our own connections never hold one while a poll runs: the probe waits its turn). Such a
# lock is session-level by proof (its backend is inside our transaction), so its row says idle,
# outside any transaction, with no proven idle time.
_POLL_TEMPLATE = """
WITH held AS MATERIALIZED (
    SELECT l.locktype = 'advisory' AS advisory, l.database, l.pid,
           CASE WHEN l.pid IS NULL THEN l.virtualtransaction END AS vxact,
           l.objsubid, l.granted, l.mode = 'ShareLock' AS shared,
           array_agg(coalesce((l.classid::int8 << 32) | l.objid::int8, l.transactionid::text::int8)) AS keys,
           min({waitstart}) AS waitstart,
           min(l.locktype) FILTER (WHERE NOT l.granted) AS wait_locktype,
           min(l.mode) FILTER (WHERE NOT l.granted) AS wait_mode,
           min(l.relation) FILTER (WHERE NOT l.granted) AS wait_relation
    FROM pg_locks AS l
    WHERE l.locktype = 'advisory' OR NOT l.granted OR (l.pid IS NULL AND l.locktype = 'transactionid')
    GROUP BY 1, 2, 3, 4, 5, 6, 7
), prepared AS (
    SELECT h.vxact, p.transaction::text::int8 AS xid, p.gid, p.owner::text AS owner, p.prepared
    FROM held AS h JOIN pg_prepared_xacts AS p ON p.transaction::text::int8 = ANY(h.keys)
    WHERE NOT h.advisory AND h.pid IS NULL
)
SELECT {columns}
FROM held AS h
LEFT JOIN prepared AS px ON h.pid IS NULL AND px.vxact = h.vxact
LEFT JOIN pg_stat_activity AS a ON a.pid = h.pid
LEFT JOIN pg_database AS d ON d.oid = h.database
WHERE h.advisory OR NOT h.granted
"""

def _who(pid: str) -> dict[str, str]:
    """Who holds a row, said the same way by the poll and the locks command (pid: the row's pid
    column): a prepared transaction (pid NULL) by its gid and owner; the backend this statement runs
    on, which holds nothing of ours (through a pooler: someone else's session lock) as idle, outside
    any transaction, with no name of ours on it; any other by pg_stat_activity."""
    own = f"{pid} = pg_backend_pid()"
    return {
        "application_name": f"CASE WHEN {pid} IS NULL THEN px.gid WHEN {own} THEN '' ELSE a.application_name END",
        "usename": f"CASE WHEN {pid} IS NULL THEN px.owner ELSE a.usename::text END",
        "state": f"CASE WHEN {pid} IS NULL THEN 'prepared' WHEN {own} THEN 'idle' ELSE a.state END",
        "outside_transaction": f"CASE WHEN {own} THEN true ELSE a.xact_start IS NULL AND a.state = 'idle' END",
        "idle_seconds": (f"CASE WHEN {pid} IS NULL THEN greatest(extract(epoch FROM now() - px.prepared)::float8, 0) "
                         f"WHEN a.state LIKE 'idle%%' AND ({own}) IS NOT TRUE "
                         "THEN greatest(extract(epoch FROM now() - a.state_change)::float8, 0) END"),
    }


_POLL_WHO = _who("h.pid")

# The poll's columns, declared once: (name, type, expression). Code and tests read them by name
# (Row = namedtuple("Row", POLL_COLUMN_NAMES)); STABLE_COLUMNS are the ones compared with the last
# poll's to skip a session that did not change (assemble.Assembler): every column but
# idle_seconds, which grows with time. Leaving it out loses nothing: with the state unchanged,
# state_change can only stay or move later, so the start it proves cannot move earlier.
POLL_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("datname", "text", "coalesce(d.datname, h.database::text)"),
    ("pid", "int4", "h.pid"),  # NULL for a prepared transaction
    ("prepared_xid", "int8", "px.xid"),  # a prepared transaction's id; NULL for a session
    ("objsubid", "int4", "h.objsubid::int"),
    ("granted", "bool", "h.granted"),
    ("shared", "bool", "h.shared"),
    ("keys", "int8[]", "h.keys"),  # a transactionid wait: the transaction waited for
    ("locktype", "text", "CASE WHEN h.advisory THEN 'advisory' ELSE h.wait_locktype END"),  # advisory, or what a waiter waits for
    ("wait_mode", "text", "h.wait_mode"),  # the mode a waiter asks for
    ("wait_relation", "int8", "h.wait_relation::int8"),  # the table a relation (or tuple, page) waiter waits for
    ("backend_start", "float8", "extract(epoch FROM a.backend_start)::float8"),
    ("application_name", "text", _POLL_WHO["application_name"]),
    ("usename", "text", _POLL_WHO["usename"]),
    ("client_addr", "text", "host(a.client_addr)"),
    ("client_port", "int4", "a.client_port"),
    ("state", "text", _POLL_WHO["state"]),
    ("outside_transaction", "bool", _POLL_WHO["outside_transaction"]),
    ("wait_seconds", "float8",
     "CASE WHEN NOT h.granted "
     "THEN greatest(extract(epoch FROM now() - coalesce(h.waitstart, a.query_start))::float8, 0) END"),
    ("idle_seconds", "float8", _POLL_WHO["idle_seconds"]),
)
POLL_COLUMN_NAMES = tuple(name for name, _, _ in POLL_COLUMNS)
STABLE_COLUMNS = tuple(name for name in POLL_COLUMN_NAMES if name != "idle_seconds")
_SELECT_LIST = ",\n       ".join(f"{expression} AS {name}" for name, _, expression in POLL_COLUMNS).replace("%%", "%")

# PostgreSQL 14 added pg_locks.waitstart; before it, a waiter's wait began no earlier than
# its query_start, since a waiter is blocked inside its lock call.
POLL = _POLL_TEMPLATE.format(waitstart="l.waitstart", columns=_SELECT_LIST)
POLL_PG13 = _POLL_TEMPLATE.format(waitstart="NULL::timestamptz", columns=_SELECT_LIST)
WAITSTART_MIN_VERSION = 140000

# A poll is its own transaction, sent as one simple-protocol string (one round trip), with its
# settings made LOCAL to it, so nothing is left on a backend a transaction-mode pooler hands to the
# application next:
# - statement_timeout and lock_timeout bound the poll (the poll interval);
# - enable_sort off: pg_lock_status() is always estimated at 5 advisory rows, so the planner
#   groups them by sorting; at 50,000 held locks that sort spilled to disk and cost 86 ms against
#   51 ms for the hash aggregate this setting leaves it;
# - extra_float_digits 1: float8 columns (backend_start is part of a session's identity) come back
#   exact, as a direct connection's binary rows give them, whatever a role or database set.
# On a connection proven to reach PostgreSQL itself (connection.proven_direct, and no configured
# pooler in front), nobody else ever borrows the backend, so the poll runs leaner there:
# - the poll statement is prepared once (PREPARE, under a name of its own, so it never meets
#   another client's statements): planning it cost more than running it when little is held (0.2 ms
#   of 0.4 ms with 200 databases and nothing held);
# - the three settings are the session's (DIRECT_SETTINGS, sent again only when the bound changes)
#   and the poll is the bare EXECUTE, in the extended protocol with binary results: the statements
#   around it (BEGIN, the SET LOCALs, COMMIT) cost 0.27 ms of a 2.38 ms round trip at 100 held locks after an idle
#   interval (median of 55, 2.38 -> 2.11 ms), and binary rows cost the exporter 31% less CPU to
#   read at 10,000 held locks (1.68 -> 1.15 ms).
# Through a pooler (or unproven) it is the one-string transaction below, settings LOCAL, planned
# at every poll: a prepared statement or a session setting would stay on a backend the application
# borrows next.
POLL_STATEMENT_NAME = "pg_advisory_lock_exporter_poll"
DIRECT_POLL = f"EXECUTE {POLL_STATEMENT_NAME}"
# The session settings are made only on the backend the connection was proven to reach, checked
# by the server in the same statement (its pid and both ports, as SERVER_INFO read them): anywhere
# else the statement returns no row and sets nothing (a WHERE that fails leaves the select list
# unevaluated), and the poller falls back to the one-string transaction. Plain SQL, not a DO
# block: plpgsql may be dropped or closed to PUBLIC. All values are integers we write.
DIRECT_SETTINGS = """SELECT set_config('statement_timeout', '{ms}', false), set_config('lock_timeout', '{ms}', false),
       set_config('enable_sort', 'off', false)
WHERE pg_backend_pid() = {pid} AND inet_client_port() = {client_port} AND inet_server_port() = {server_port}"""
_POLL_TRANSACTION = """BEGIN;
SET LOCAL statement_timeout = {ms};
SET LOCAL lock_timeout = {ms};
SET LOCAL enable_sort = off;
SET LOCAL extra_float_digits = 1;
{poll};
COMMIT"""


def _poll_statement(server_version_num: int) -> str:
    return (POLL if server_version_num >= WAITSTART_MIN_VERSION else POLL_PG13).strip()


def prepare_poll(server_version_num: int) -> str:
    """The PREPARE of the poll statement for a server of this version."""
    return f"PREPARE {POLL_STATEMENT_NAME} AS {_poll_statement(server_version_num)}"


def poll_query(server_version_num: int, timeout_seconds: float) -> str:
    """The poll transaction for a server of this version, through a pooler or on a connection not
    proven direct. Its rows are the one result whose columns are POLL_COLUMN_NAMES."""
    return _POLL_TRANSACTION.format(ms=timeout_ms(timeout_seconds), poll=_poll_statement(server_version_num))


def direct_settings(timeout_ms: int, backend_pid: int, client_port: int, server_port: int) -> str:
    """The session settings of a proven-direct poller connection, for a poll bound of timeout_ms,
    made only on the backend of this pid seen from these ports."""
    return DIRECT_SETTINGS.format(ms=int(timeout_ms), pid=int(backend_pid), client_port=int(client_port),
                                  server_port=int(server_port))


# The probe: one transaction per try, sent as one simple-protocol string (one round trip), its
# timeouts LOCAL to it so nothing stays on a pooled backend, around a transaction-level try-lock.
# Even when it gets the lock, the lock is released at that COMMIT, inside the same message, and a
# crash of the exporter can never leave it held. A try never waits: pg_try_* returns at once, and
# lock_timeout and statement_timeout bound anything else. The key goes in as a literal (the simple
# protocol takes no parameters), quoted by psycopg.sql.
# Through a pooler a try on a backend holding a stranded session lock would succeed (advisory
# locks are re-entrant per backend), so only a connection proven direct is trusted (probe.py);
# each try also says which backend ran it, and a change of backend ends that trust as well.
PROBE_TRANSACTION = """BEGIN;
SET LOCAL statement_timeout = {ms};
SET LOCAL lock_timeout = {ms};
SELECT pg_try_advisory_xact_lock({lock}) AS got, pg_backend_pid() AS backend_pid;
COMMIT"""
PROBE_RESULT_COLUMNS = ("got", "backend_pid")
PROBE_LOCK_BIGINT = "{key}::int8"
PROBE_LOCK_INT4_PAIR = "{first}::int4, {second}::int4"
# The server hashes the name itself, exactly as the application's own call does.
PROBE_LOCK_HASHTEXT = "hashtext({text})::int8"
PROBE_LOCK_HASHTEXTEXTENDED = "hashtextextended({text}, 0)"

# `pg-advisory-lock-exporter locks`: every advisory lock in the cluster now, one row per session
# (or prepared transaction) and lock, nobody's left out. pg_locks is read once (materialised: its
# transactionid rows of pid NULL name the prepared transactions). pg_blocking_pids() is costly: it
# runs only for the rows of waiting sessions.
_LOCKS_NOW_TEMPLATE = """
WITH l AS MATERIALIZED (
    SELECT locktype, database, classid, objid, objsubid, mode, granted, pid, virtualtransaction, transactionid,
           {waitstart} AS waitstart
    FROM pg_locks
    WHERE locktype = 'advisory' OR (pid IS NULL AND locktype = 'transactionid')
), prepared AS (
    SELECT l.virtualtransaction, p.transaction::text::int8 AS xid, p.gid, p.owner::text AS owner, p.prepared
    FROM l JOIN pg_prepared_xacts AS p ON p.transaction = l.transactionid
    WHERE l.locktype = 'transactionid'
)
SELECT d.datname, l.classid::int8 AS classid, l.objid::int8 AS objid, l.objsubid::int AS objsubid, l.mode,
       l.granted, l.pid, px.xid AS prepared_xid,
       {application_name} AS application_name, {usename} AS usename,
       host(a.client_addr) AS client_addr, {state} AS state,
       a.client_port, extract(epoch FROM a.backend_start)::float8 AS backend_start,
       {outside_transaction} AS outside_transaction,
       CASE WHEN l.granted THEN {idle_seconds} END AS held_at_least,
       CASE WHEN NOT l.granted
            THEN greatest(extract(epoch FROM now() - coalesce(l.waitstart, a.query_start))::float8, 0) END AS waiting,
       CASE WHEN NOT l.granted THEN pg_blocking_pids(l.pid) END AS blocked_by
FROM l
LEFT JOIN pg_stat_activity AS a ON a.pid = l.pid
LEFT JOIN prepared AS px ON l.pid IS NULL AND px.virtualtransaction = l.virtualtransaction
LEFT JOIN pg_database AS d ON d.oid = l.database
WHERE l.locktype = 'advisory'
ORDER BY d.datname, l.classid, l.objid, l.objsubid, l.granted DESC, l.pid NULLS LAST, px.gid
"""
_LOCKS_WHO = {name: text.replace("%%", "%") for name, text in _who("l.pid").items()}
LOCKS_NOW = _LOCKS_NOW_TEMPLATE.format(waitstart="waitstart", **_LOCKS_WHO)
LOCKS_NOW_PG13 = _LOCKS_NOW_TEMPLATE.format(waitstart="NULL::timestamptz", **_LOCKS_WHO)


def locks_now_query(server_version_num: int) -> str:
    return LOCKS_NOW if server_version_num >= WAITSTART_MIN_VERSION else LOCKS_NOW_PG13

# The tables keys stand for (pg_repack's) and holders wait for, schema and all: a catalog lookup,
# so only in the database the dsn connects to. An oid dropped meanwhile has no row.
RELATION_NAMES = """
SELECT c.oid::int8 AS oid, format('%%I.%%I', n.nspname, c.relname) AS relation
FROM pg_class AS c
JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE c.oid = ANY(%(oids)s::oid[])
"""

# Who blocks each holder that waits itself, down to the root: pg_blocking_pids() of those holders,
# then of each blocker that waits too (the poll knows who waits: no call for a session that does
# not). A prepared transaction blocks as pid 0: the prepared transactions holding what the blocked
# session waits for are named by gid (pg_locks read again, only then). Only run in a poll where
# some holder waits, so the common poll stays one statement.
# PostgreSQL's lock-mode conflict table (the manual's "Conflicting Lock Modes"), for the mode a
# session waits for: the granted modes that block it. Advisory locks use ShareLock (shared) and
# ExclusiveLock, as transaction ids and rows do.
_CONFLICTING_MODES = """CASE w.mode
    WHEN 'AccessShareLock' THEN ARRAY['AccessExclusiveLock']
    WHEN 'RowShareLock' THEN ARRAY['ExclusiveLock', 'AccessExclusiveLock']
    WHEN 'RowExclusiveLock' THEN ARRAY['ShareLock', 'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock']
    WHEN 'ShareUpdateExclusiveLock' THEN ARRAY['ShareUpdateExclusiveLock', 'ShareLock', 'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock']
    WHEN 'ShareLock' THEN ARRAY['RowExclusiveLock', 'ShareUpdateExclusiveLock', 'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock']
    WHEN 'ShareRowExclusiveLock' THEN ARRAY['RowExclusiveLock', 'ShareUpdateExclusiveLock', 'ShareLock', 'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock']
    WHEN 'ExclusiveLock' THEN ARRAY['RowShareLock', 'RowExclusiveLock', 'ShareUpdateExclusiveLock', 'ShareLock', 'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock']
    WHEN 'AccessExclusiveLock' THEN ARRAY['AccessShareLock', 'RowShareLock', 'RowExclusiveLock', 'ShareUpdateExclusiveLock', 'ShareLock', 'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock']
END"""

CHAIN = """
WITH RECURSIVE chain(blocks, blocker, depth) AS (
    SELECT w.pid, b.pid, 1
    FROM unnest(%(pids)s::int[]) AS w(pid), unnest(pg_blocking_pids(w.pid)) AS b(pid)
  UNION
    SELECT c.blocker, b.pid, c.depth + 1
    FROM chain AS c, unnest(pg_blocking_pids(c.blocker)) AS b(pid)
    WHERE c.depth < 8 AND c.blocker = ANY(%(waiting)s::int[])
)
SELECT c.blocks, c.blocker, c.depth, coalesce(a.application_name, '') AS application_name,
       coalesce(a.usename::text, '') AS usename, coalesce(host(a.client_addr), '') AS client_addr,
       coalesce(a.state, '') AS state, extract(epoch FROM now() - a.state_change)::float8 AS state_seconds,
       c.blocker = ANY(%(waiting)s::int[]) AS waiting,
       CASE WHEN %(show_queries)s THEN left(a.query, 200) END AS query,
       CASE WHEN c.blocker = 0 THEN (
           -- The prepared transactions holding what c.blocks waits for: the same lock tag, granted
           -- with pid NULL in a mode that conflicts with the one waited for, named through their
           -- transactionid row. Read only when one blocks.
           SELECT string_agg(DISTINCT quote_literal(p.gid), ', ')
           FROM pg_locks AS w
           JOIN pg_locks AS g ON g.granted AND g.pid IS NULL AND g.locktype = w.locktype
                AND g.database IS NOT DISTINCT FROM w.database AND g.relation IS NOT DISTINCT FROM w.relation
                AND g.page IS NOT DISTINCT FROM w.page AND g.tuple IS NOT DISTINCT FROM w.tuple
                AND g.transactionid IS NOT DISTINCT FROM w.transactionid
                AND g.classid IS NOT DISTINCT FROM w.classid AND g.objid IS NOT DISTINCT FROM w.objid
                AND g.objsubid IS NOT DISTINCT FROM w.objsubid AND g.mode = ANY({conflicts})
           JOIN pg_locks AS x ON x.pid IS NULL AND x.locktype = 'transactionid'
                AND x.virtualtransaction = g.virtualtransaction
           JOIN pg_prepared_xacts AS p ON p.transaction = x.transactionid
           WHERE w.pid = c.blocks AND NOT w.granted) END AS prepared
FROM chain AS c
LEFT JOIN pg_stat_activity AS a ON a.pid = c.blocker
ORDER BY c.blocks, c.depth, c.blocker
""".replace("{conflicts}", _CONFLICTING_MODES)

# The `locks` command: every session that waits now, for a lock of any type, and for what (its
# holders of advisory locks that wait themselves get their chain from CHAIN). A second read of
# pg_locks, in a command a person runs, not in a poll.
_WAITING_NOW_TEMPLATE = """
SELECT l.pid, coalesce(d.datname, '') AS datname, l.locktype, l.mode, l.relation::int8 AS relation,
       coalesce(l.transactionid::text::int8, (l.classid::int8 << 32) | l.objid::int8) AS key, l.objsubid::int AS objsubid,
       greatest(extract(epoch FROM now() - coalesce({waitstart}, a.query_start))::float8, 0) AS wait_seconds
FROM pg_locks AS l
LEFT JOIN pg_stat_activity AS a ON a.pid = l.pid
LEFT JOIN pg_database AS d ON d.oid = l.database
WHERE NOT l.granted AND l.pid IS NOT NULL
"""


def waiting_now_query(server_version_num: int) -> str:
    waitstart = "l.waitstart" if server_version_num >= WAITSTART_MIN_VERSION else "NULL::timestamptz"
    return _WAITING_NOW_TEMPLATE.format(waitstart=waitstart)
