"""What the exposition says: Snapshot + ProbeResults + the reload status -> the text of every
family. Written directly: prometheus_client's generate_latest took 43 ms for 1,000 locks (~10,000
samples), this writer a fraction of that; the per-lock families are kept in pieces (pieces.py).
Pure: exposition.py decides when to render, and gzips.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator

from . import __version__
from .format import PREFIX, Sample, bound, family, labels, value
from .pieces import FamilyTexts
from .shards import Shard
from .snapshot import MODE_EXCLUSIVE, MODE_SHARED, Holder, LockState, ProbeResult, ReloadStatus, Snapshot


# The fields of a LockState each per-lock family is made of.
_HOLDERS = operator.attrgetter("exclusive", "shared")
_WAITERS = operator.attrgetter("waiters")
_WAIT_SECONDS = operator.attrgetter("wait_seconds")
_ACQUISITIONS = operator.attrgetter("acquisitions")
_MAX_HOLD = operator.attrgetter("max_hold")
_HOLDER_INFO = operator.attrgetter("info_holders", "source")
_KEYS_HELD = operator.attrgetter("keys_held")
_POOLED = operator.attrgetter("pooled_session_holders")
_BLOCKED = operator.attrgetter("blocked_holders")
_LAST_ACQUIRED = operator.attrgetter("last_acquired_at")
_EXPECT_EVERY = operator.attrgetter("expect_every")
_BLOCKED_WAIT = operator.attrgetter("blocked_holder_wait_seconds")
_BLOCKED_INFO = operator.attrgetter("blocked_info")


def _pid(h: Holder) -> str:
    """The pid label: "" for a prepared transaction (its gid is the application_name label)."""
    return "" if h.pid is None else str(h.pid)


def _holder_labels(h: Holder, source: str) -> str:
    return labels(key=h.key, pid=_pid(h), application_name=h.application_name, usename=h.usename,
                  client_addr=h.client_addr, state=h.state, source=source, pooler=h.pooler)


def _blocked_labels(h: Holder) -> str:
    return labels(key=h.key, pid=_pid(h), application_name=h.application_name, usename=h.usename,
                  client_addr=h.client_addr, state=h.state, pooler=h.pooler)


def _lock_text(snapshot: Snapshot, texts: FamilyTexts) -> Iterator[str]:
    locks = snapshot.locks
    texts.begin(locks)

    def each(name: str, kind: str, help_text: str, values: tuple[object, ...]) -> str:
        """A family with one sample per lock whose value is not None."""
        metric = f"{PREFIX}_{name}"
        return texts.lines(name, kind, help_text, values,
                           lambda i, number: "" if number is None else f"{metric}{{{i}}} {value(number)}\n")

    yield texts.samples(
        "holders", "gauge", "Sessions holding the lock now, by mode.", tuple(map(_HOLDERS, locks)),
        (f',mode="{MODE_EXCLUSIVE}"', f',mode="{MODE_SHARED}"'),
    )
    yield texts.samples("waiters", "gauge", "Sessions waiting for the lock now.", tuple(map(_WAITERS, locks)))
    yield texts.samples("acquisitions_total", "counter", "New holders observed since the exporter started.",
                        tuple(map(_ACQUISITIONS, locks)))
    yield texts.samples("last_acquired_timestamp_seconds", "gauge",
                        "When a new holder of the lock was last seen, in seconds since the epoch; until one is, when the "
                        "exporter began watching the lock.", _last_acquired(snapshot))
    yield texts.samples("blocked_holders", "gauge",
                        "Holders of the lock that wait themselves for another lock now (of any type: a table, a "
                        "row, a transaction, another advisory lock).", tuple(map(_BLOCKED, locks)))
    yield texts.samples("blocked_holder_wait_seconds", "gauge",
                        "The longest current wait of a holder of the lock for another lock; 0 when none.",
                        tuple(map(_BLOCKED_WAIT, locks)))
    yield from _who_text(locks, texts)
    yield each(
        "pooled_session_holders", "gauge",
        "Holders proven to hold the lock at session level (the backend is idle, outside any transaction) on a "
        "server connection of a transaction- or statement-mode pool: the lock outlives the client's transaction "
        "and passes to whoever borrows that connection next.", tuple(map(_POOLED, locks)),
    )
    yield each("keys_held", "gauge", "Key families only: how many distinct keys of the family are held now.",
               tuple(map(_KEYS_HELD, locks)))
    yield each("max_hold_seconds", "gauge", "max_hold from the config: the longest a holder should hold the lock.",
               tuple(map(_MAX_HOLD, locks)))
    yield each("expect_every_seconds", "gauge",
               "expect_every from the config: a new holder is expected at least this often (a cron's lock).",
               tuple(map(_EXPECT_EVERY, locks)))
    # The ages change at every poll: written after the families that mostly do not, so that the
    # gzip's checksum of the unchanged text before them is kept (exposition.Gzipper).
    yield texts.samples(
        "held_seconds", "gauge",
        "Age of the oldest current hold: since the earliest hold of its session and key every poll since saw held; 0 when free.",
        snapshot.ages(locks),
    )
    yield texts.samples("wait_seconds", "gauge", "The longest current wait for the lock; 0 when none.",
                        tuple(map(_WAIT_SECONDS, locks)))
    yield from _unnamed_text(snapshot)
    yield from family(
        f"{PREFIX}_key_collision", "gauge", "1 for each pair of configured names that resolve to the same lock.",
        (("", labels(lock=c.lock, database=c.database, colliding_lock=c.other), 1) for c in snapshot.collisions),
    )


def _who_text(locks: tuple[LockState, ...], texts: FamilyTexts) -> Iterator[str]:
    """The per-lock families that name sessions: every holder, and the holders that wait themselves."""
    info = f"{PREFIX}_holder_info"
    yield texts.lines(
        "holder_info", "gauge",
        "One series per current holder of the lock (per key held, for a family), the longest-held within the caps.",
        tuple(map(_HOLDER_INFO, locks)),
        lambda i, v: "".join(f"{info}{{{i},{_holder_labels(h, v[1])}}} 1\n" for h in v[0]),
    )
    blocked_info = f"{PREFIX}_blocked_holder_info"
    yield texts.lines(
        "blocked_holder_info", "gauge",
        "One series per holder of the lock that waits itself for another lock now (those blocked_holders counts), "
        "with the key of its oldest hold of the lock; the longest waits within max_holder_info_per_lock and "
        "max_holder_info, as holder_info.",
        tuple(map(_BLOCKED_INFO, locks)),
        lambda i, held: "".join(f"{blocked_info}{{{i},{_blocked_labels(h)}}} 1\n" for h in held),
    )


def _last_acquired(snapshot: Snapshot) -> tuple[float, ...]:
    """The poller's clock -> seconds since the epoch, by an offset rounded to the millisecond (the
    value itself is not rounded): the same offset poll after poll, so an unchanged lock writes the
    same value (its piece of text is kept), at C speed."""
    offset = round(snapshot.wall_at - snapshot.taken_at, 3)
    return tuple(map(offset.__add__, map(_LAST_ACQUIRED, snapshot.locks)))


def _unnamed_text(snapshot: Snapshot) -> Iterator[str]:
    pairs = [(u, labels(database=u.database)) for u in snapshot.unnamed]
    yield from family(
        f"{PREFIX}_unnamed_blocked_holders", "gauge",
        "Holders of keys nobody named that wait themselves for another lock now.",
        (("", i, u.blocked_holders) for u, i in pairs),
    )
    yield from family(
        f"{PREFIX}_unnamed_blocked_holder_wait_seconds", "gauge",
        "The longest current wait of a holder of a key nobody named for another lock; 0 when none.",
        (("", i, u.blocked_holder_wait_seconds) for u, i in pairs),
    )
    yield from family(
        f"{PREFIX}_unnamed_holders", "gauge",
        "Advisory locks held on keys no configured lock, family or preset names (one per session, key and mode).",
        (("", i, u.holders) for u, i in pairs),
    )
    yield from family(
        f"{PREFIX}_unnamed_waiters", "gauge", "Waits for advisory locks on keys nobody named.",
        (("", i, u.waiters) for u, i in pairs),
    )
    yield from family(
        f"{PREFIX}_unnamed_held_seconds", "gauge",
        "Age of the oldest current hold among keys nobody named, aged as held_seconds is; 0 when none.",
        (("", i, snapshot.held_seconds(u)) for u, i in pairs),
    )
    yield from family(
        f"{PREFIX}_unnamed_wait_seconds", "gauge", "The longest current wait for a key nobody named; 0 when none.",
        (("", i, u.wait_seconds) for u, i in pairs),
    )
    yield from family(
        f"{PREFIX}_unnamed_holder_info", "gauge",
        "The oldest holds of keys nobody named, within max_unnamed_holder_info per database.",
        (
            ("", i + "," + labels(key=h.key, mode=MODE_EXCLUSIVE if MODE_EXCLUSIVE in h.modes else MODE_SHARED,
                                  pid=_pid(h), application_name=h.application_name, usename=h.usename,
                                  client_addr=h.client_addr, state=h.state, pooler=h.pooler), 1)
            for u, i in pairs for h in u.info_holders
        ),
    )
    yield from family(
        f"{PREFIX}_unnamed_pooled_session_holders", "gauge",
        "As pooled_session_holders, for keys nobody named.",
        (("", i, u.pooled_session_holders) for u, i in pairs if u.pooled_session_holders is not None),
    )
    yield from family(
        f"{PREFIX}_unnamed_max_hold_seconds", "gauge",
        "unnamed_max_hold from the config: the longest any hold of a key nobody named should last.",
        (("", i, u.max_hold) for u, i in pairs if u.max_hold is not None),
    )


def _release_text(snapshot: Snapshot) -> Iterator[str]:
    yield from family(
        f"{PREFIX}_pooled_session_release_seconds", "gauge",
        "For a lock stranded on a PgBouncer transaction-pool connection: the soonest PgBouncer closes such a "
        "connection by itself while it stays unused (server_lifetime, server_idle_timeout), freeing the lock; a "
        "lower bound, since a connection lent to a client is not closed.",
        (("", labels(lock=name, database=database), release.seconds)
         for (name, database), release in sorted(snapshot.releases.items())),
    )


def _pooler_text(snapshot: Snapshot) -> Iterator[str]:
    pairs = [(c, labels(pooler=c.pooler, address=c.address)) for c in snapshot.consoles]
    yield from family(f"{PREFIX}_pooler_up", "gauge", "1 if the last read of the pooler's console at this address worked.",
                       (("", i, int(c.up)) for c, i in pairs))
    yield from family(f"{PREFIX}_pooler_read_duration_seconds", "gauge",
                       "How long the last read of the pooler's console at this address took.",
                       (("", i, c.seconds) for c, i in pairs))


def _probe_text(probes: tuple[ProbeResult, ...]) -> Iterator[str]:
    pairs = [(p, labels(lock=p.lock, database=p.database)) for p in probes]
    yield from family(f"{PREFIX}_probe_acquirable", "gauge", "1 if the last try got the lock.",
                       (("", i, int(p.acquirable)) for p, i in pairs if p.acquirable is not None and p.trusted))
    yield from family(f"{PREFIX}_probe_ok", "gauge",
                       "1 if the last try matched the configured expect (any: the try ran without error).",
                       (("", i, int(p.ok)) for p, i in pairs if p.trusted))
    yield from family(f"{PREFIX}_probe_trusted", "gauge",
                       "0 when the probe's connection is not proven to reach PostgreSQL itself (a pooler configured "
                       "at the dsn's address, a Unix socket, or a pooler, proxy or NAT in between) or its backend "
                       "changed between tries: its tries cannot be trusted (probe_acquirable and probe_ok are then "
                       "left out); 1 otherwise.",
                       (("", i, int(p.trusted)) for p, i in pairs))
    yield from family(f"{PREFIX}_probe_duration_seconds", "gauge", "Duration of the last try.",
                       (("", i, p.duration) for p, i in pairs))
    yield from family(f"{PREFIX}_probe_errors_total", "counter", "Tries that failed (timeout, connection).",
                       (("", i, p.errors) for p, i in pairs))
    yield from family(f"{PREFIX}_probe_last_run_timestamp_seconds", "gauge",
                       "When the lock was last tried, in seconds since the epoch.",
                       (("", i, p.last_run) for p, i in pairs))


# The poller's own figures with one sample each: (name, type, help, the PollStats field).
_POLLER_FIGURES = (
    ("exporter_poll_errors_total", "counter", "Failed polls.", "errors"),
    ("exporter_holder_info_dropped_total", "counter",
     "holder_info series left out by max_holder_info_per_lock / max_holder_info, summed over polls.", "holder_info_dropped"),
    ("exporter_tracked_holds", "gauge",
     "Holds whose first sighting the exporter remembers (bounded by max_tracked_holds).", "tracked_holds"),
    ("exporter_tracked_holds_dropped_total", "counter",
     "Holds not remembered because max_tracked_holds was reached (they got the proven lower bound only), summed over "
     "polls.", "tracked_holds_dropped"),
    ("exporter_poll_interval_seconds", "gauge",
     "The poll interval in force: how often pg_locks is read (with poll_interval auto, it follows the polls' cost); "
     "the time between the last two good reads when that was longer.",
     "interval"),
    ("exporter_db_time_ratio", "gauge",
     "The polls' time on the server over the last minute, as a fraction of that minute (a round trip bounds the "
     "server's time from above): with poll_interval auto, at most max_db_time_share unless the bounds win.",
     "db_time_ratio"),
)


def _exporter_text(snapshot: Snapshot, reload: ReloadStatus) -> Iterator[str]:
    stats = snapshot.stats
    yield from family(f"{PREFIX}_exporter_up", "gauge", "1 if the last poll succeeded.", [("", "", int(snapshot.up))])
    buckets = [("_bucket", f'le="{bound(upper)}"', count) for upper, count in stats.duration_buckets]
    yield from family(
        f"{PREFIX}_exporter_poll_duration_seconds", "histogram", "Time of each poll, failed ones included.",
        [*buckets, ("_bucket", 'le="+Inf"', stats.polls), ("_count", "", stats.polls), ("_sum", "", stats.duration_sum)],
    )
    for name, kind, help_text, field in _POLLER_FIGURES:
        yield from family(f"{PREFIX}_{name}", kind, help_text, [("", "", getattr(stats, field))])
    if stats.last_success_timestamp is not None:
        yield from family(
            f"{PREFIX}_exporter_last_poll_timestamp_seconds", "gauge",
            "When the last successful poll read pg_locks (its rows arrived), in seconds since the epoch.",
            [("", "", stats.last_success_timestamp)],
        )
    if stats.last_success_round_trip is not None:
        yield from family(
            f"{PREFIX}_exporter_last_poll_duration_seconds", "gauge",
            "The round trip of the last successful poll's statement: the server read pg_locks within this many "
            "seconds before last_poll_timestamp_seconds.", [("", "", round(stats.last_success_round_trip, 6))],
        )
    yield from _identity_text(reload)


def _identity_text(reload: ReloadStatus) -> Iterator[str]:
    """The exporter's version and its last config load: in single-server mode and a fleet's /metrics."""
    yield from family(f"{PREFIX}_exporter_build_info", "gauge", "The exporter's version.",
                       [("", labels(version=__version__), 1)])
    yield from family(f"{PREFIX}_exporter_config_last_reload_successful", "gauge",
                       "1 if the last config load (start-up, SIGHUP or /-/reload) succeeded.",
                       [("", "", int(reload.successful))])
    if reload.last_success_timestamp is not None:
        yield from family(f"{PREFIX}_exporter_config_last_reload_success_timestamp_seconds", "gauge",
                           "When the config was last loaded successfully, in seconds since the epoch.",
                           [("", "", reload.last_success_timestamp)])


def shard_text(shard: Shard, owned: int) -> str:
    """Which shard this exporter is and how many targets it owns: on the exporter's own /metrics
    (single-server mode: shard 0 of 1, one target), never on /probe."""
    parts = list(family(f"{PREFIX}_exporter_shard_ordinal", "gauge",
                        "This exporter's shard among total_shards (0-based), in the label; the value is 1.",
                        [("", labels(shard_ordinal=str(shard.ordinal)), 1)]))
    parts += family(f"{PREFIX}_exporter_total_shards", "gauge",
                    "How many shards the targets are spread over (--total-shards).", [("", "", shard.total)])
    parts += family(f"{PREFIX}_exporter_targets", "gauge", "How many targets this shard owns and polls.",
                    [("", "", owned)])
    return "".join(parts)


def render(snapshot: Snapshot, probes: tuple[ProbeResult, ...] = (), reload: ReloadStatus = ReloadStatus()) -> bytes:
    """The text exposition (format 0.0.4) of one snapshot and the latest probe results.

    While polls fail the lock series are left out rather than served stale.
    """
    return "".join(render_parts(snapshot, probes, reload)).encode()


def render_parts(snapshot: Snapshot, probes: tuple[ProbeResult, ...] = (), reload: ReloadStatus = ReloadStatus(),
                 texts: FamilyTexts | None = None) -> list[str]:
    """render's text in parts (a family, or a line); texts: the last rendering's families, to reuse
    those that did not change."""
    parts: list[str] = []
    if snapshot.up:
        parts.extend(_lock_text(snapshot, texts or FamilyTexts()))
        parts.extend(_pooler_text(snapshot))
        parts.extend(_release_text(snapshot))
    if probes:
        parts.extend(_probe_text(probes))
    parts.extend(_exporter_text(snapshot, reload))
    return parts


def render_fleet(targets: dict[str, Snapshot], reload: ReloadStatus) -> bytes:
    """/metrics of a fleet: the exporter's own figures and each target's health, under names that
    /probe never serves (so no alert on /probe's figures fires twice)."""
    pairs = [(labels(target=name), snap) for name, snap in sorted(targets.items())]
    parts = list(family(f"{PREFIX}_exporter_target_up", "gauge", "1 if the target's last poll succeeded.",
                         (("", i, int(snap.up)) for i, snap in pairs)))
    samples: list[Sample] = []
    for i, snap in pairs:
        stats = snap.stats
        samples += [("_bucket", f'{i},le="{bound(upper)}"', count) for upper, count in stats.duration_buckets]
        samples += [("_bucket", f'{i},le="+Inf"', stats.polls), ("_count", i, stats.polls), ("_sum", i, stats.duration_sum)]
    parts += family(f"{PREFIX}_exporter_target_poll_duration_seconds", "histogram",
                     "Time of each poll of the target, failed ones included.", samples)
    parts += family(f"{PREFIX}_exporter_target_poll_errors_total", "counter", "Failed polls of the target.",
                     (("", i, snap.stats.errors) for i, snap in pairs))
    parts += _identity_text(reload)
    return "".join(parts).encode()


