"""Load and validate config.yaml into frozen dataclasses.

Every problem is collected, located ("locks[2].key: ...") and reported at once in one ConfigError.
Here: the fields and what a config means as a whole (names, collisions, overlaps, targets, files);
one value at a time is configvalues.py (durations, counts, ${VAR}s), a lock's key configkeys.py.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace
from typing import Any

import yaml

from . import keys, presets
from .ages import counted
from .configkeys import parse_key
from .configvalues import (  # noqa: F401 - parse_duration: for those who import it from here (the tests)
    AUTO, Checker, boolean, count, did_you_mean, duration, expand_env, expand_env_mapped, format_duration,
    int_in, interval_or_auto, names, parse_duration, percentage, show, unknown_fields,
)
from .interval import AutoInterval
from .dsn import MAX_TIMEOUT_MS, DsnError, check_dsn, database_name, describe_dsn

MAX_CONFIG_BYTES = 1024 * 1024
DEFAULT_POLL_INTERVAL = 5.0  # what a fixed interval falls back to in a refused reload's summary; the default is auto
MIN_POLL_INTERVAL = 0.1
# A fixed poll_interval is the statement_timeout and lock_timeout of the poll (and of every
# statement the exporter runs): the server's int of milliseconds is its limit.
MAX_POLL_INTERVAL = MAX_TIMEOUT_MS / 1000
MAX_POLL_INTERVAL_WHY = "about 24.8 days: the poll's statement_timeout, an int of milliseconds on the server"
DEFAULT_MAX_DB_TIME_SHARE = 0.005  # 0.5% of one server core
DEFAULT_MIN_POLL_INTERVAL = 0.1
DEFAULT_MAX_POLL_INTERVAL = 30.0
# With auto a direct session's statement_timeout is the interval in force rounded up to a power of
# two seconds (poller._session_bound): the bounds stop at the largest power of two within the int.
MAX_AUTO_POLL_INTERVAL = 2.0 ** math.floor(math.log2(MAX_TIMEOUT_MS / 1000))
MAX_AUTO_POLL_INTERVAL_WHY = ("about 24.3 days: rounded up to a power of two seconds, the poll's statement_timeout, "
                              "an int of milliseconds on the server")
# With poll_interval auto, the statements outside the poll (resolving keys, the chain, the locks
# command) and the poll itself are bounded by at least this, whatever the interval in force.
AUTO_TIMEOUT_FLOOR = 2.0
DEFAULT_PROBE_INTERVAL = 30.0
MIN_PROBE_INTERVAL = 0.01
DEFAULT_MAX_HOLDER_INFO_PER_LOCK = 100
DEFAULT_MAX_HOLDER_INFO = 1000
DEFAULT_MAX_UNNAMED_HOLDER_INFO = 10
DEFAULT_MAX_TRACKED_HOLDS = 100_000

# The fields of config.yaml. config.schema.json says the same (tests/test_schema.py checks every
# field, enum and bound both ways); docs/development.md says how to add one.
#
# A target's scalars: field -> (its checker, its default; None: unset). Each is a field of Config
# of the same name, may be set at the top level, and with targets is every target's default, which
# a target may override. parse_config reads them in this order.
SCALARS: dict[str, tuple[Checker, Any]] = {
    "poll_interval": (interval_or_auto(MIN_POLL_INTERVAL, MAX_POLL_INTERVAL, MAX_POLL_INTERVAL_WHY), AUTO),
    "probe_interval": (duration(MIN_PROBE_INTERVAL), DEFAULT_PROBE_INTERVAL),
    "max_holder_info_per_lock": (count, DEFAULT_MAX_HOLDER_INFO_PER_LOCK),
    "max_holder_info": (count, DEFAULT_MAX_HOLDER_INFO),
    "max_unnamed_holder_info": (count, DEFAULT_MAX_UNNAMED_HOLDER_INFO),
    "max_tracked_holds": (count, DEFAULT_MAX_TRACKED_HOLDS),
    "unnamed_max_hold": (duration(0.001), None),
    "show_queries": (boolean, False),
    "max_db_time_share": (percentage, DEFAULT_MAX_DB_TIME_SHARE),
    "min_poll_interval": (duration(MIN_POLL_INTERVAL, MAX_AUTO_POLL_INTERVAL, MAX_AUTO_POLL_INTERVAL_WHY),
                          DEFAULT_MIN_POLL_INTERVAL),
    "max_poll_interval": (duration(MIN_POLL_INTERVAL, MAX_AUTO_POLL_INTERVAL, MAX_AUTO_POLL_INTERVAL_WHY),
                          DEFAULT_MAX_POLL_INTERVAL),
}
# With targets: fields a target may override (the top level holds their defaults), fields that
# belong to a target only, and what a target may hold.
DEFAULTABLE_FIELDS = (*SCALARS, "presets")
TARGET_ONLY_FIELDS = ("dsn", "password_file", "poolers", "locks", "databases")
_TOP_FIELDS = ("dsn", "password_file", *DEFAULTABLE_FIELDS, "locks", "poolers", "databases", "max_workers")
_TARGET_FIELDS = (*TARGET_ONLY_FIELDS, *DEFAULTABLE_FIELDS)
_TARGET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_LOCK_FIELDS = ("name", "key", "database", "probe", "max_hold", "expect_every")
_PROBE_FIELDS = ("expect", "interval")
EXPECT_HELD, EXPECT_FREE, EXPECT_ANY = "held", "free", "any"
_EXPECTATIONS = (EXPECT_HELD, EXPECT_FREE, EXPECT_ANY)
_POOLER_FIELDS = ("name", "type", "dsn", "password_file", "addresses", "pool_mode")
POOLER_TYPES = ("pgbouncer",)
POOL_MODES = ("session", "transaction", "statement")
# An Elixir alias (MyApp.Repo), as Ecto's repo module is written.
_ELIXIR_MODULE = re.compile(r"[A-Z][A-Za-z0-9_]*(\.[A-Z][A-Za-z0-9_]*)*")


class ConfigError(Exception):
    """The config cannot be used; details holds one located message per problem."""

    def __init__(self, source: str, details: list[str]) -> None:
        self.source = source
        self.details = details
        super().__init__(f"{source}: " + "; ".join(details))


@dataclass(frozen=True)
class ProbeConfig:
    """How the probe tries one lock: what state to expect, and how often."""

    expect: str
    interval: float


@dataclass(frozen=True)
class LockConfig:
    """One named advisory lock."""

    name: str
    key: keys.KeySpec
    database: str | None = None  # None: the database the dsn connects to
    probe: ProbeConfig | None = None  # None: not probed
    max_hold: float | None = None
    expect_every: float | None = None  # a new holder is expected at least this often


@dataclass(frozen=True)
class PoolerConfig:
    """A connection pooler in front of the server: read through its console (type pgbouncer, dsn),
    or known only by the addresses its server connections come from (addresses, pool_mode)."""

    name: str
    type: str | None = None  # "pgbouncer"; None: known by address only
    dsn: str | None = None  # its admin console
    password_file: str | None = None
    addresses: tuple[str, ...] = ()
    pool_mode: str | None = None  # for a pooler known by address only


@dataclass(frozen=True)
class Config:
    """A validated config file."""

    dsn: str
    poll_interval: float
    locks: tuple[LockConfig, ...]
    probe_interval: float = DEFAULT_PROBE_INTERVAL
    max_holder_info_per_lock: int = DEFAULT_MAX_HOLDER_INFO_PER_LOCK
    max_holder_info: int = DEFAULT_MAX_HOLDER_INFO
    password_file: str | None = None
    presets: tuple[presets.Chosen, ...] = ()
    max_unnamed_holder_info: int = DEFAULT_MAX_UNNAMED_HOLDER_INFO
    max_tracked_holds: int = DEFAULT_MAX_TRACKED_HOLDS
    unnamed_max_hold: float | None = None
    poolers: tuple[PoolerConfig, ...] = ()
    databases: tuple[str, ...] = ()  # limit the figures to these databases; () = every database
    name: str = ""  # the target's name; "" in single-server mode
    # Show the query text of blocking sessions on the landing page and in `locks` (never in a metric):
    # off by default, since a page that needs no login must not leak literals.
    show_queries: bool = False
    # poll_interval auto (the default): the interval follows the polls' cost within this share of
    # one server core, inside these bounds; poll_interval is then min_poll_interval, the start.
    poll_auto: bool = False
    max_db_time_share: float = DEFAULT_MAX_DB_TIME_SHARE
    min_poll_interval: float = DEFAULT_MIN_POLL_INTERVAL
    max_poll_interval: float = DEFAULT_MAX_POLL_INTERVAL

    @property
    def interval_budget(self) -> AutoInterval:
        """What the poller's interval controller follows: the share and bounds, or, with a fixed
        interval, bounds that leave it nothing to choose."""
        if self.poll_auto:
            return AutoInterval(self.max_db_time_share, self.min_poll_interval, self.max_poll_interval)
        return AutoInterval(1.0, self.poll_interval, self.poll_interval)

    @property
    def timeout_seconds(self) -> float:
        """statement_timeout of the statements outside the poll, and of the poll at least."""
        return max(self.poll_interval, AUTO_TIMEOUT_FLOOR) if self.poll_auto else self.poll_interval

    def _interval_text(self) -> str:
        if not self.poll_auto:
            return format_duration(self.poll_interval)
        return (f"auto ({self.max_db_time_share * 100:g}% of a core, {format_duration(self.min_poll_interval)}"
                f"..{format_duration(self.max_poll_interval)})")

    @property
    def probed(self) -> tuple[LockConfig, ...]:
        return tuple(lock for lock in self.locks if lock.probe is not None)

    def summary(self) -> str:
        """One line for --check-config and the start-up log; never shows a password."""
        forms: dict[str, int] = {}
        families = 0
        for lock in self.locks:
            if keys.is_family(lock.key):
                families += 1
                continue
            form = _FORM_NAMES[type(lock.key)]
            forms[form] = forms.get(form, 0) + 1
        form_text = ", ".join(f"{n} {f}" for f, n in sorted(forms.items()))
        return (
            f"{counted(len(self.locks) - families, 'lock')} ({form_text or 'none'}), {counted(families, 'family')}, "
            f"{len(self.probed)} probed, "
            f"presets: {', '.join(map(str, self.presets)) or 'none'}, "
            f"poolers: {', '.join(p.name for p in self.poolers) or 'none'}, "
            f"poll_interval {self._interval_text()}, "
            f"dsn {describe_dsn(self.dsn)}"
        )


_FORM_NAMES = {
    keys.BigintKey: "bigint",
    keys.Int4PairKey: "int4 pair",
    keys.HashtextKey: "hashtext",
    keys.HashtextExtendedKey: "hashtextextended",
}


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping key given twice instead of keeping the last."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _hint(value: Any, known: tuple[str, ...]) -> str:
    """'; did you mean held?' for a misspelt choice, '' for anything else."""
    return did_you_mean(value, known) if isinstance(value, str) else ""


def _named_entry(entry: Any, allowed: tuple[str, ...], what: str, where: str, errors: list[str]) -> tuple[bool, str | None]:
    """(whether entry is a mapping, its name or None): a list entry's common checks, located."""
    if not isinstance(entry, dict):
        errors.append(f"{where}: expected a mapping with {what}, got {show(entry)}")
        return False, None
    errors.extend(unknown_fields(entry, allowed, where))
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        errors.append(f"{where}.name: expected a non-empty string, got {show(name)}")
        return True, None
    return True, name


def _parse_lock(entry: Any, default_interval: float, where: str, errors: list[str]) -> LockConfig | None:
    is_mapping, name = _named_entry(entry, _LOCK_FIELDS, "name and key", where, errors)
    if not is_mapping:
        return None
    key = None
    if "key" not in entry:
        errors.append(f"{where}.key: required")
    else:
        key = parse_key(entry["key"], f"{where}.key", errors)
    database = entry.get("database")
    if database is not None and (not isinstance(database, str) or not database):
        errors.append(f"{where}.database: expected a database name, got {show(database)}")
        database = None
    probe = _parse_probe(entry["probe"], default_interval, f"{where}.probe", errors) if "probe" in entry else None
    if probe is not None and key is not None and keys.is_family(key):
        errors.append(f"{where}.probe: a key family cannot be probed: it has no one key to try (probe a single key instead)")
        probe = None
    max_hold = duration(0.001)(entry["max_hold"], f"{where}.max_hold", errors) if "max_hold" in entry else None
    expect_every = duration(0.001)(entry["expect_every"], f"{where}.expect_every", errors) if "expect_every" in entry else None
    if expect_every is not None and key is not None and keys.is_family(key):
        errors.append(f"{where}.expect_every: a key family cannot expect_every: its keys are taken by many, not "
                      "one job on a schedule (give the job's own key a name)")
        expect_every = None
    if name is None or key is None:
        return None
    return LockConfig(name=name, key=key, database=database, probe=probe, max_hold=max_hold, expect_every=expect_every)


def _parse_probe(value: Any, default_interval: float, where: str, errors: list[str]) -> ProbeConfig | None:
    if not isinstance(value, dict):
        errors.append(f"{where}: expected a mapping such as {{expect: held}}, got {show(value)}")
        return None
    errors.extend(unknown_fields(value, _PROBE_FIELDS, where))
    expect = value.get("expect", EXPECT_ANY)
    if expect not in _EXPECTATIONS:
        errors.append(f"{where}.expect: expected one of {', '.join(_EXPECTATIONS)}, got {show(expect)}{_hint(expect, _EXPECTATIONS)}")
        return None
    interval = default_interval
    if "interval" in value:
        interval = duration(MIN_PROBE_INTERVAL)(value["interval"], f"{where}.interval", errors)
        if interval is None:
            return None
    return ProbeConfig(expect=expect, interval=interval)


def _parse_presets(value: Any, errors: list[str]) -> tuple[presets.Chosen, ...]:
    known = [*presets.PRESETS, presets.ALL]
    if value == presets.ALL:
        return (presets.ALL,)
    if not isinstance(value, list):
        errors.append(f"presets: expected a list of tool names or 'all', got {show(value)}")
        return ()
    chosen: list[presets.Chosen] = []
    for index, name in enumerate(value):
        where = f"presets[{index}]"
        if isinstance(name, dict):
            choice = _parse_parameterised_preset(name, where, errors)
            if choice is not None:
                chosen.append(choice)
        elif isinstance(name, str) and name in presets.PARAMETERISED:
            errors.append(f"{where}: {name} takes a parameter ({presets.PARAMETERISED[name][0]}): write {{{name}: ...}}")
        elif name not in known:
            hint = _hint(name, (*known, *presets.PARAMETERISED))
            errors.append(f"{where}: unknown preset {name!r}" + (hint or f" (known: {', '.join(known)}; "
                          f"with a parameter: {', '.join(presets.PARAMETERISED)})"))
        else:
            chosen.append(name)
    return tuple(chosen)


def _parse_parameterised_preset(entry: dict, where: str, errors: list[str]) -> presets.WithParameter | None:
    """{ecto: MyApp.Repo}: a preset that takes its parameter."""
    if len(entry) != 1 or next(iter(entry)) not in presets.PARAMETERISED:
        errors.append(f"{where}: a preset with a parameter is a mapping of one field "
                      f"({', '.join(presets.PARAMETERISED)}), got {', '.join(sorted(map(str, entry))) or 'an empty mapping'}")
        return None
    name, parameter = next(iter(entry.items()))
    if not isinstance(parameter, str) or not _ELIXIR_MODULE.fullmatch(parameter):
        errors.append(f"{where}.{name}: expected {presets.PARAMETERISED[name][0]}, got {show(parameter)}")
        return None
    return presets.WithParameter(name, parameter)


def _check_duplicate_names(entries: list[Any], errors: list[str]) -> None:
    first_by_name: dict[str, int] = {}
    for index, entry in enumerate(entries):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            continue
        if name in first_by_name:
            errors.append(f"locks[{index}].name: duplicate name {name!r} (first at locks[{first_by_name[name]}])")
        else:
            first_by_name[name] = index


def _check_literal_collisions(locks: list[tuple[int, LockConfig]], errors: list[str]) -> None:
    """Two names for one literal key; string keys are compared once the server resolves them."""
    first_by_key: dict[tuple[str | None, keys.LockTag], tuple[int, LockConfig]] = {}
    for index, lock in locks:
        if not keys.is_literal(lock.key):
            continue
        slot = (lock.database, keys.literal_tag(lock.key))
        other_index, other = first_by_key.setdefault(slot, (index, lock))
        if other.name != lock.name:
            errors.append(
                f"locks[{index}].key: {lock.name!r} and {other.name!r} (locks[{other_index}]) "
                f"name the same lock {lock.key.describe()}"
            )


def _password_file(value: Any, where: str, errors: list[str]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        errors.append(f"{where}: expected a file path, got {show(value)}")
        return None
    path = expand_env(value, where, errors)
    if not os.access(path, os.R_OK):
        errors.append(f"{where}: cannot read {path!r}")
    return path


def _dsn_field(value: Any, where: str, errors: list[str]) -> str:
    if not isinstance(value, str):
        errors.append(f"{where}: expected a connection string, got {show(value)}")
        return ""
    dsn, origin = expand_env_mapped(value, where, errors)
    try:
        check_dsn(dsn, origin)  # its places counted in the text written, before ${VAR} expansion
    except DsnError as exc:
        errors.append(f"{where}: {exc}")
    return dsn


def _parse_pooler(entry: Any, where: str, errors: list[str]) -> PoolerConfig | None:
    is_mapping, name = _named_entry(entry, _POOLER_FIELDS, "name and dsn (or addresses)", where, errors)
    if not is_mapping:
        return None
    kind = entry.get("type")
    if kind is not None and kind not in POOLER_TYPES:
        errors.append(f"{where}.type: expected one of {', '.join(POOLER_TYPES)}, got {show(kind)}{_hint(kind, POOLER_TYPES)}")
        kind = None
    dsn = _dsn_field(entry["dsn"], f"{where}.dsn", errors) if "dsn" in entry else None
    password_file = _password_file(entry.get("password_file"), f"{where}.password_file", errors)
    addresses: tuple[str, ...] = ()
    if "addresses" in entry:
        addresses = names(entry["addresses"], f"{where}.addresses", "IP addresses or host names", errors)
    mode = entry.get("pool_mode")
    if mode is not None and mode not in POOL_MODES:
        errors.append(f"{where}.pool_mode: expected one of {', '.join(POOL_MODES)}, got {show(mode)}{_hint(mode, POOL_MODES)}")
        mode = None
    if kind == "pgbouncer" and dsn is None:
        errors.append(f"{where}.dsn: required with type pgbouncer: the dsn of its admin console (dbname=pgbouncer)")
    if "type" not in entry:
        if dsn is not None:
            errors.append(f"{where}.type: required with dsn: the console's kind (pgbouncer)")
        if "addresses" not in entry:
            errors.append(f"{where}.addresses: required for a pooler without a console (or give type and dsn)")
        if "pool_mode" not in entry:
            errors.append(f"{where}.pool_mode: required for a pooler without a console: {', '.join(POOL_MODES)}")
    if name is None:
        return None
    return PoolerConfig(name, kind, dsn, password_file, addresses, mode)


def _parse_poolers(value: Any, errors: list[str]) -> tuple[PoolerConfig, ...]:
    if not isinstance(value, list):
        errors.append(f"poolers: expected a list, got {show(value)}")
        return ()
    poolers: list[PoolerConfig] = []
    first: dict[str, int] = {}
    for index, entry in enumerate(value):
        pooler = _parse_pooler(entry, f"poolers[{index}]", errors)
        if pooler is None:
            continue
        if pooler.name in first:
            errors.append(f"poolers[{index}].name: duplicate name {pooler.name!r} (first at poolers[{first[pooler.name]}])")
            continue
        first[pooler.name] = index
        poolers.append(pooler)
    return tuple(poolers)


def _check_family_overlaps(locks: list[tuple[int, LockConfig]], default_database: str, errors: list[str]) -> None:
    """Two families that share a key in one database: which name would it go to?"""
    families = [(index, lock) for index, lock in locks if keys.is_family(lock.key)]
    for position, (index, lock) in enumerate(families):
        for other_index, other in families[:position]:
            if (lock.database or default_database) != (other.database or default_database):
                continue
            if lock.key.overlaps(other.key):  # type: ignore[union-attr]
                errors.append(
                    f"locks[{index}].key: family {lock.name!r} {lock.key.describe()} overlaps family "
                    f"{other.name!r} {other.key.describe()} (locks[{other_index}]) in database "
                    f"{lock.database or default_database!r}: a key may belong to one family only"
                )


# The process's own, at the top level in either mode: how many threads run polls, probes and
# console reads for all targets (scheduler.py). 32 serve 1,000 targets (README, Benchmark).
DEFAULT_MAX_WORKERS = 32
MAX_WORKERS_LIMIT = 1024
PROCESS_FIELDS = ("max_workers",)


@dataclass(frozen=True)
class Fleet:
    """What a config file configures: one server (single-server mode), or named targets."""

    targets: tuple[Config, ...]
    single: bool = True
    max_workers: int = DEFAULT_MAX_WORKERS

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(target.name for target in self.targets)

    def target(self, name: str) -> Config | None:
        return next((target for target in self.targets if target.name == name), None)

    def summary(self) -> str:
        if self.single:
            return self.targets[0].summary()
        return f"{counted(len(self.targets), 'target')}: " + "; ".join(f"{t.name}: {t.summary()}" for t in self.targets)


def parse_fleet(data: Any, source: str) -> Fleet:
    """Validate loaded YAML, in single-server mode or with targets; ConfigError lists every problem."""
    errors: list[str] = []
    max_workers = DEFAULT_MAX_WORKERS
    if isinstance(data, dict) and "max_workers" in data:
        data = dict(data)
        max_workers = int_in(data.pop("max_workers"), 1, MAX_WORKERS_LIMIT, "a count of threads", "max_workers",
                             errors) or DEFAULT_MAX_WORKERS
    if not isinstance(data, dict) or "targets" not in data:
        try:
            config = parse_config(data, source)
        except ConfigError as exc:
            raise ConfigError(source, [*errors, *exc.details]) from None
        if errors:
            raise ConfigError(source, errors)
        return Fleet((config,), single=True, max_workers=max_workers)
    for field in sorted(map(str, data)):
        if field in TARGET_ONLY_FIELDS:
            errors.append(f"{field}: with targets, {field} belongs to each target (targets.NAME.{field}); "
                          "a config has either a top-level dsn (one server) or targets")
    errors.extend(unknown_fields({f: v for f, v in data.items() if f not in TARGET_ONLY_FIELDS},
                                 (*DEFAULTABLE_FIELDS, *PROCESS_FIELDS, "targets"), ""))
    defaults = {field: data[field] for field in DEFAULTABLE_FIELDS if field in data}
    try:
        parse_config(defaults, source)
    except ConfigError as exc:
        errors.extend(exc.details)
    raw_targets = data["targets"]
    targets: list[Config] = []
    if not isinstance(raw_targets, dict) or not raw_targets:
        errors.append(f"targets: expected a mapping of target names to their dsn and locks, got {show(raw_targets)}")
        raw_targets = {}
    for name, raw in raw_targets.items():
        where = f"targets.{name}"
        if not isinstance(name, str) or not _TARGET_NAME.fullmatch(name):
            errors.append(f"{where}: a target name is letters, digits, '_', '.' and '-' (it goes in URLs and labels)")
            continue
        if not isinstance(raw, dict):
            errors.append(f"{where}: expected a mapping with dsn and locks, got {show(raw)}")
            continue
        errors.extend(unknown_fields(raw, _TARGET_FIELDS, where))
        try:
            config = parse_config({**defaults, **{k: v for k, v in raw.items() if k in _TARGET_FIELDS}}, source)
        except ConfigError as exc:
            # A default's own problem is reported once, above; the target's own, under its name.
            errors.extend(f"{where}.{detail}" for detail in exc.details
                          if re.split(r"[.\[:]", detail, maxsplit=1)[0] in raw)
            continue
        targets.append(replace(config, name=name))
    if errors:
        raise ConfigError(source, errors)
    return Fleet(tuple(targets), single=False, max_workers=max_workers)


def parse_config(data: Any, source: str) -> Config:
    """Validate loaded YAML; raise ConfigError listing every problem."""
    errors: list[str] = []
    if data is None:
        raise ConfigError(source, ["the file is empty: it needs at least dsn and locks"])
    if not isinstance(data, dict):
        raise ConfigError(source, [f"expected a mapping at the top level, got {show(data)}"])
    errors.extend(unknown_fields(data, _TOP_FIELDS, ""))

    dsn = _dsn_field(data.get("dsn", ""), "dsn", errors)
    scalars: dict[str, Any] = {}
    for field, (check, default) in SCALARS.items():
        value = check(data[field], field, errors) if field in data else None
        scalars[field] = default if value is None else value
    password_file = _password_file(data.get("password_file"), "password_file", errors)
    poolers = _parse_poolers(data["poolers"], errors) if "poolers" in data else ()
    databases = names(data["databases"], "databases", "database names", errors) if "databases" in data else ()

    chosen_presets = _parse_presets(data.get("presets", []), errors)

    raw_locks = data.get("locks", [])
    parsed: list[tuple[int, LockConfig]] = []
    if not isinstance(raw_locks, list):
        errors.append(f"locks: expected a list, got {show(raw_locks)}")
    else:
        for index, entry in enumerate(raw_locks):
            lock = _parse_lock(entry, scalars["probe_interval"], f"locks[{index}]", errors)
            if lock is not None:
                parsed.append((index, lock))
        _check_duplicate_names(raw_locks, errors)
        _check_literal_collisions(parsed, errors)
        if not any("dsn:" in e for e in errors):
            _check_family_overlaps(parsed, database_name(dsn), errors)

    _settle_interval(scalars, errors)
    if errors:
        raise ConfigError(source, errors)
    return Config(
        dsn=dsn, locks=tuple(lock for _, lock in parsed), password_file=password_file, presets=chosen_presets,
        poolers=poolers, databases=databases, **scalars,
    )


def _settle_interval(scalars: dict[str, Any], errors: list[str]) -> None:
    """poll_interval auto starts at min_poll_interval; the bounds must be in order."""
    if scalars["min_poll_interval"] > scalars["max_poll_interval"]:
        errors.append(f"min_poll_interval: {format_duration(scalars['min_poll_interval'])} is above max_poll_interval "
                      f"{format_duration(scalars['max_poll_interval'])}")
    scalars["poll_auto"] = scalars["poll_interval"] == AUTO
    if scalars["poll_auto"]:
        scalars["poll_interval"] = scalars["min_poll_interval"]


def load_yaml_text(text: bytes, source: str) -> Any:
    """Decode and parse YAML bytes; ConfigError on anything that is not YAML."""
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(source, [f"not UTF-8 text (byte {exc.start})"]) from None
    try:
        return yaml.load(decoded, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [f"{where}not valid YAML: {problem}"]) from None
    except RecursionError:
        raise ConfigError(source, ["not valid YAML: nested too deeply"]) from None


def load_config(path: str) -> Config:
    """Read, parse and validate a single-server config file."""
    fleet = load_fleet(path)
    if not fleet.single:
        raise ConfigError(path, ["targets: this needs a single-server config (one top-level dsn)"])
    return fleet.targets[0]


def load_fleet(path: str) -> Fleet:
    """Read, parse and validate a config file, with or without targets."""
    try:
        with open(path, "rb") as handle:
            text = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(path, [f"cannot read: {exc.strerror or exc}"]) from None
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(path, [f"larger than {MAX_CONFIG_BYTES // 1024 // 1024} MiB: not a config file"])
    return parse_fleet(load_yaml_text(text, path), path)
