"""Load and validate config.yaml into frozen dataclasses.

Every problem is collected, located ("locks[2].key: ...") and reported at once in one ConfigError.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import yaml

from . import keys, presets
from .interval import AutoInterval
from .dsn import DsnError, database_name, describe_dsn

MAX_CONFIG_BYTES = 1024 * 1024
AUTO = "auto"
DEFAULT_POLL_INTERVAL = 5.0  # a fixed interval's starting point in the docs; the default is auto
MIN_POLL_INTERVAL = 0.1
DEFAULT_MAX_DB_TIME_SHARE = 0.005  # 0.5% of one server core
DEFAULT_MIN_POLL_INTERVAL = 0.1
DEFAULT_MAX_POLL_INTERVAL = 30.0
# With poll_interval auto, the statements outside the poll (resolving keys, the chain, the locks
# command) and the poll itself are bounded by at least this, whatever the interval in force.
AUTO_TIMEOUT_FLOOR = 2.0
_PERCENT = re.compile(r"(\d+(?:\.\d+)?)%")

_DURATION_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|d|h|m|s)")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

DEFAULT_PROBE_INTERVAL = 30.0
MIN_PROBE_INTERVAL = 0.01

DEFAULT_MAX_HOLDER_INFO_PER_LOCK = 100
DEFAULT_MAX_HOLDER_INFO = 1000
DEFAULT_MAX_UNNAMED_HOLDER_INFO = 10
DEFAULT_MAX_TRACKED_HOLDS = 100_000

_TOP_FIELDS = (
    "dsn", "password_file", "poll_interval", "probe_interval", "max_holder_info_per_lock", "max_holder_info",
    "max_unnamed_holder_info", "max_tracked_holds", "unnamed_max_hold", "presets", "locks", "poolers", "databases",
    "show_queries", "max_db_time_share", "min_poll_interval", "max_poll_interval",
)
# With targets: fields a target may override (the top level holds their defaults), fields that
# belong to a target only, and what a target may hold.
DEFAULTABLE_FIELDS = (
    "poll_interval", "probe_interval", "max_holder_info_per_lock", "max_holder_info", "max_unnamed_holder_info",
    "max_tracked_holds", "unnamed_max_hold", "presets", "show_queries", "max_db_time_share", "min_poll_interval",
    "max_poll_interval",
)
TARGET_ONLY_FIELDS = ("dsn", "password_file", "poolers", "locks", "databases")
_TARGET_FIELDS = (*TARGET_ONLY_FIELDS, *DEFAULTABLE_FIELDS)
_TARGET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_POOLER_FIELDS = ("name", "type", "dsn", "password_file", "addresses", "pool_mode")
POOLER_TYPES = ("pgbouncer",)
POOL_MODES = ("session", "transaction", "statement")
# Caps: field -> default.
_LIMITS = {
    "max_holder_info_per_lock": DEFAULT_MAX_HOLDER_INFO_PER_LOCK,
    "max_holder_info": DEFAULT_MAX_HOLDER_INFO,
    "max_unnamed_holder_info": DEFAULT_MAX_UNNAMED_HOLDER_INFO,
    "max_tracked_holds": DEFAULT_MAX_TRACKED_HOLDS,
}
_LOCK_FIELDS = ("name", "key", "database", "probe", "max_hold", "expect_every")
_PROBE_FIELDS = ("expect", "interval")
EXPECT_HELD, EXPECT_FREE, EXPECT_ANY = "held", "free", "any"
_EXPECTATIONS = (EXPECT_HELD, EXPECT_FREE, EXPECT_ANY)
_STRING_KEY_FORMS = {"hashtext": keys.HashtextKey, "hashtextextended": keys.HashtextExtendedKey}
_MAPPING_KEY_FORMS = (*_STRING_KEY_FORMS, "namespace", "range", "with_advisory_lock")
_WITH_ADVISORY_LOCK_FIELDS = ("name", "prefix")
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

    def _interval_text(self) -> str:
        if not self.poll_auto:
            return format_duration(self.poll_interval)
        return (f"auto ({self.max_db_time_share * 100:g}% of a core, {format_duration(self.min_poll_interval)}"
                f"..{format_duration(self.max_poll_interval)})")

    @property
    def timeout_seconds(self) -> float:
        """statement_timeout of the statements outside the poll, and of the poll at least."""
        return max(self.poll_interval, AUTO_TIMEOUT_FLOOR) if self.poll_auto else self.poll_interval

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
            f"{len(self.locks) - families} locks ({form_text or 'none'}), {families} families, "
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


def parse_duration(text: Any) -> float:
    """'500ms', '5s', '1m30s' -> seconds. Raises ValueError with the reason."""
    if not isinstance(text, str):
        raise ValueError(f"expected a duration such as 5s or 500ms, got {_show(text)}")
    pos, total, last_rank = 0, 0.0, -1
    ranks = list(_DURATION_UNITS)
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        rank = ranks.index(match.group(2))
        if rank <= last_rank:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos, last_rank = match.end(), rank
    if pos != len(text) or not text:
        raise ValueError(f"{text!r} is not a duration: use a number and a unit (ms, s, m, h, d), e.g. 5s")
    return total


def format_duration(seconds: float) -> str:
    """Seconds -> the shortest config spelling."""
    if seconds < 1 and seconds * 1000 == int(seconds * 1000):
        return f"{int(seconds * 1000)}ms"
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{seconds:g}s"


def _show(value: Any) -> str:
    if value is None:
        return "nothing"
    name = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)
    return f"{name} ({value!r})" if not isinstance(value, (list, dict)) else name


def expand_env(text: str, where: str, errors: list[str]) -> str:
    """Replace ${VAR} with the environment's value; an unset variable is an error."""

    def sub(match: re.Match[str]) -> str:
        value = os.environ.get(match.group(1))
        if value is None:
            errors.append(f"{where}: environment variable {match.group(1)} is not set")
            return ""
        return value

    return _ENV_REF.sub(sub, text)


def unknown_fields(data: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> list[str]:
    return [
        f"{where}{'.' if where else ''}{field}: unknown field (allowed: {', '.join(allowed)})"
        for field in sorted(map(str, data))
        if field not in allowed
    ]


def _int_in(value: Any, low: int, high: int, type_name: str, where: str, errors: list[str]) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        errors.append(f"{where}: expected an integer ({type_name}), got {_show(value)}")
        return None
    if not low <= value <= high:
        errors.append(f"{where}: {value} is outside {type_name} ({low} .. {high})")
        return None
    return value


def parse_key(value: Any, where: str, errors: list[str]) -> keys.KeySpec | None:
    """A key in any of its config forms, or None after appending the reason to errors."""
    if isinstance(value, list):
        if len(value) != 2:
            errors.append(f"{where}: a two-int4 key is a list of exactly two integers, got {len(value)} items")
            return None
        first = _int_in(value[0], keys.INT4_MIN, keys.INT4_MAX, "int4", f"{where}[0]", errors)
        second = _int_in(value[1], keys.INT4_MIN, keys.INT4_MAX, "int4", f"{where}[1]", errors)
        return None if first is None or second is None else keys.Int4PairKey(first, second)
    if isinstance(value, dict):
        if len(value) != 1 or next(iter(value)) not in _MAPPING_KEY_FORMS:
            errors.append(
                f"{where}: a key mapping has one field: hashtext or hashtextextended (a string key), "
                f"namespace or range (a key family), with_advisory_lock (the gem's lock name), "
                f"got {', '.join(sorted(map(str, value))) or 'an empty mapping'}"
            )
            return None
        form, text = next(iter(value.items()))
        if form == "with_advisory_lock":
            return _parse_with_advisory_lock(text, f"{where}.with_advisory_lock", errors)
        if form == "namespace":
            namespace = _int_in(text, keys.INT4_MIN, keys.INT4_MAX, "int4", f"{where}.namespace", errors)
            return None if namespace is None else keys.NamespaceFamily(namespace)
        if form == "range":
            return _parse_range(text, f"{where}.range", errors)
        if not isinstance(text, str) or not text:
            errors.append(f"{where}.{form}: expected a non-empty string, got {_show(text)}")
            return None
        return _STRING_KEY_FORMS[form](text)
    if isinstance(value, int) and not isinstance(value, bool):
        number = _int_in(value, keys.INT64_MIN, keys.INT64_MAX, "bigint", where, errors)
        return None if number is None else keys.BigintKey(number)
    errors.append(
        f"{where}: expected a bigint (4242), two int4 ([42, 7]) or a string key "
        f"({{hashtext: name}}), got {_show(value)}"
    )
    return None


def _parse_with_advisory_lock(value: Any, where: str, errors: list[str]) -> keys.Int4PairKey | None:
    """{with_advisory_lock: NAME} or {with_advisory_lock: {name: NAME, prefix: N}}: the gem's int4 pair."""
    prefix: Any = 0
    if isinstance(value, dict):
        errors.extend(unknown_fields(value, _WITH_ADVISORY_LOCK_FIELDS, where))
        prefix = value.get("prefix", 0)
        if isinstance(prefix, bool) or not isinstance(prefix, int):
            errors.append(f"{where}.prefix: expected an integer (WITH_ADVISORY_LOCK_PREFIX), got {_show(prefix)}")
            return None
        if "name" not in value:
            errors.append(f"{where}.name: required")
            return None
        value, where = value["name"], f"{where}.name"
    if not isinstance(value, str) or not value:
        errors.append(f"{where}: expected the lock name, a non-empty string, got {_show(value)}")
        return None
    return keys.Int4PairKey(*presets.with_advisory_lock(value, prefix))


def _parse_range(value: Any, where: str, errors: list[str]) -> keys.RangeFamily | None:
    if not isinstance(value, list) or len(value) != 2:
        errors.append(f"{where}: expected [low, high], two bigints (inclusive), got {_show(value)}")
        return None
    low = _int_in(value[0], keys.INT64_MIN, keys.INT64_MAX, "bigint", f"{where}[0]", errors)
    high = _int_in(value[1], keys.INT64_MIN, keys.INT64_MAX, "bigint", f"{where}[1]", errors)
    if low is None or high is None:
        return None
    if low > high:
        errors.append(f"{where}: low {low} is above high {high}")
        return None
    return keys.RangeFamily(low, high)


def _named_entry(entry: Any, allowed: tuple[str, ...], what: str, where: str, errors: list[str]) -> tuple[bool, str | None]:
    """(whether entry is a mapping, its name or None): a list entry's common checks, located."""
    if not isinstance(entry, dict):
        errors.append(f"{where}: expected a mapping with {what}, got {_show(entry)}")
        return False, None
    errors.extend(unknown_fields(entry, allowed, where))
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        errors.append(f"{where}.name: expected a non-empty string, got {_show(name)}")
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
        errors.append(f"{where}.database: expected a database name, got {_show(database)}")
        database = None
    probe = _parse_probe(entry["probe"], default_interval, f"{where}.probe", errors) if "probe" in entry else None
    if probe is not None and key is not None and keys.is_family(key):
        errors.append(f"{where}.probe: a key family cannot be probed: it has no one key to try (probe a single key instead)")
        probe = None
    max_hold = None
    if "max_hold" in entry:
        max_hold = _duration_field(entry["max_hold"], f"{where}.max_hold", 0.001, errors)
    expect_every = None
    if "expect_every" in entry:
        expect_every = _duration_field(entry["expect_every"], f"{where}.expect_every", 0.001, errors)
        if key is not None and keys.is_family(key):
            errors.append(f"{where}.expect_every: a key family cannot expect_every: its keys are taken by many, not "
                          "one job on a schedule (give the job's own key a name)")
            expect_every = None
    if name is None or key is None:
        return None
    return LockConfig(name=name, key=key, database=database, probe=probe, max_hold=max_hold, expect_every=expect_every)


def _parse_interval(data: dict[str, Any], errors: list[str]) -> dict[str, Any]:
    """poll_interval (auto, the default, or a duration) and auto's share and bounds."""
    share = DEFAULT_MAX_DB_TIME_SHARE
    if "max_db_time_share" in data:
        share = _share(data["max_db_time_share"], errors) or share
    bounds = {}
    for field, default in (("min_poll_interval", DEFAULT_MIN_POLL_INTERVAL), ("max_poll_interval", DEFAULT_MAX_POLL_INTERVAL)):
        bounds[field] = default
        if field in data:
            bounds[field] = _duration_field(data[field], field, MIN_POLL_INTERVAL, errors) or default
    if bounds["min_poll_interval"] > bounds["max_poll_interval"]:
        errors.append(f"min_poll_interval: {format_duration(bounds['min_poll_interval'])} is above max_poll_interval "
                      f"{format_duration(bounds['max_poll_interval'])}")
    value = data.get("poll_interval", AUTO)
    if value == AUTO:
        return {"poll_auto": True, "poll_interval": bounds["min_poll_interval"], "max_db_time_share": share, **bounds}
    fixed = _duration_field(value, "poll_interval", MIN_POLL_INTERVAL, errors)
    return {"poll_auto": False, "poll_interval": fixed or DEFAULT_POLL_INTERVAL, "max_db_time_share": share, **bounds}


def _share(value: Any, errors: list[str]) -> float | None:
    """max_db_time_share: a percentage of one core in (0, 100%], written '0.5%'."""
    match = _PERCENT.fullmatch(value) if isinstance(value, str) else None
    share = float(match.group(1)) / 100 if match else None
    if share is None or not 0 < share <= 1:
        errors.append(f"max_db_time_share: expected a percentage of one core above 0% and at most 100%, such as 0.5%, "
                      f"got {_show(value)}")
        return None
    return share


def _duration_field(value: Any, where: str, minimum: float, errors: list[str]) -> float | None:
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        errors.append(f"{where}: {exc}")
        return None
    if seconds < minimum:
        errors.append(f"{where}: must be at least {format_duration(minimum)}")
        return None
    return seconds


def _parse_probe(value: Any, default_interval: float, where: str, errors: list[str]) -> ProbeConfig | None:
    if not isinstance(value, dict):
        errors.append(f"{where}: expected a mapping such as {{expect: held}}, got {_show(value)}")
        return None
    errors.extend(unknown_fields(value, _PROBE_FIELDS, where))
    expect = value.get("expect", EXPECT_ANY)
    if expect not in _EXPECTATIONS:
        errors.append(f"{where}.expect: expected one of {', '.join(_EXPECTATIONS)}, got {_show(expect)}")
        return None
    interval = default_interval
    if "interval" in value:
        interval = _duration_field(value["interval"], f"{where}.interval", MIN_PROBE_INTERVAL, errors)
        if interval is None:
            return None
    return ProbeConfig(expect=expect, interval=interval)


def _parse_presets(value: Any, errors: list[str]) -> tuple[presets.Chosen, ...]:
    known = [*presets.PRESETS, presets.ALL]
    if value == presets.ALL:
        return (presets.ALL,)
    if not isinstance(value, list):
        errors.append(f"presets: expected a list of tool names or 'all', got {_show(value)}")
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
            errors.append(f"{where}: unknown preset {name!r} (known: {', '.join(known)}; "
                          f"with a parameter: {', '.join(presets.PARAMETERISED)})")
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
        errors.append(f"{where}.{name}: expected {presets.PARAMETERISED[name][0]}, got {_show(parameter)}")
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
        errors.append(f"{where}: expected a file path, got {_show(value)}")
        return None
    path = expand_env(value, where, errors)
    if not os.access(path, os.R_OK):
        errors.append(f"{where}: cannot read {path!r}")
    return path


def _dsn_field(value: Any, where: str, errors: list[str]) -> str:
    if not isinstance(value, str):
        errors.append(f"{where}: expected a connection string, got {_show(value)}")
        return ""
    dsn = expand_env(value, where, errors)
    try:
        describe_dsn(dsn)
    except DsnError as exc:
        errors.append(f"{where}: {exc}")
    return dsn


def _names(value: Any, where: str, what: str, errors: list[str]) -> tuple[str, ...]:
    """A non-empty list of non-empty strings, or () after appending the reason to errors."""
    if not isinstance(value, list) or not value or not all(isinstance(item, str) and item for item in value):
        errors.append(f"{where}: expected a list of {what}, got {_show(value)}")
        return ()
    return tuple(value)


def _parse_pooler(entry: Any, where: str, errors: list[str]) -> PoolerConfig | None:
    is_mapping, name = _named_entry(entry, _POOLER_FIELDS, "name and dsn (or addresses)", where, errors)
    if not is_mapping:
        return None
    kind = entry.get("type")
    if kind is not None and kind not in POOLER_TYPES:
        errors.append(f"{where}.type: expected one of {', '.join(POOLER_TYPES)}, got {_show(kind)}")
        kind = None
    dsn = _dsn_field(entry["dsn"], f"{where}.dsn", errors) if "dsn" in entry else None
    password_file = _password_file(entry.get("password_file"), f"{where}.password_file", errors)
    addresses: tuple[str, ...] = ()
    if "addresses" in entry:
        addresses = _names(entry["addresses"], f"{where}.addresses", "IP addresses or host names", errors)
    mode = entry.get("pool_mode")
    if mode is not None and mode not in POOL_MODES:
        errors.append(f"{where}.pool_mode: expected one of {', '.join(POOL_MODES)}, got {_show(mode)}")
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
        errors.append(f"poolers: expected a list, got {_show(value)}")
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


@dataclass(frozen=True)
class Fleet:
    """What a config file configures: one server (single-server mode), or named targets."""

    targets: tuple[Config, ...]
    single: bool = True

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(target.name for target in self.targets)

    def target(self, name: str) -> Config | None:
        return next((target for target in self.targets if target.name == name), None)

    def summary(self) -> str:
        if self.single:
            return self.targets[0].summary()
        return f"{len(self.targets)} targets: " + "; ".join(f"{t.name}: {t.summary()}" for t in self.targets)


def parse_fleet(data: Any, source: str) -> Fleet:
    """Validate loaded YAML, in single-server mode or with targets; ConfigError lists every problem."""
    if not isinstance(data, dict) or "targets" not in data:
        return Fleet((parse_config(data, source),), single=True)
    errors: list[str] = []
    for field in sorted(map(str, data)):
        if field in TARGET_ONLY_FIELDS:
            errors.append(f"{field}: with targets, {field} belongs to each target (targets.NAME.{field}); "
                          "a config has either a top-level dsn (one server) or targets")
        elif field not in (*DEFAULTABLE_FIELDS, "targets"):
            errors.append(f"{field}: unknown field (allowed with targets: {', '.join((*DEFAULTABLE_FIELDS, 'targets'))})")
    defaults = {field: data[field] for field in DEFAULTABLE_FIELDS if field in data}
    try:
        parse_config(defaults, source)
    except ConfigError as exc:
        errors.extend(exc.details)
    raw_targets = data["targets"]
    targets: list[Config] = []
    if not isinstance(raw_targets, dict) or not raw_targets:
        errors.append(f"targets: expected a mapping of target names to their dsn and locks, got {_show(raw_targets)}")
        raw_targets = {}
    for name, raw in raw_targets.items():
        where = f"targets.{name}"
        if not isinstance(name, str) or not _TARGET_NAME.fullmatch(name):
            errors.append(f"{where}: a target name is letters, digits, '_', '.' and '-' (it goes in URLs and labels)")
            continue
        if not isinstance(raw, dict):
            errors.append(f"{where}: expected a mapping with dsn and locks, got {_show(raw)}")
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
    return Fleet(tuple(targets), single=False)


def parse_config(data: Any, source: str) -> Config:
    """Validate loaded YAML; raise ConfigError listing every problem."""
    errors: list[str] = []
    if data is None:
        raise ConfigError(source, ["the file is empty: it needs at least dsn and locks"])
    if not isinstance(data, dict):
        raise ConfigError(source, [f"expected a mapping at the top level, got {_show(data)}"])
    errors.extend(unknown_fields(data, _TOP_FIELDS, ""))

    dsn = _dsn_field(data.get("dsn", ""), "dsn", errors)

    interval = _parse_interval(data, errors)
    probe_interval = DEFAULT_PROBE_INTERVAL
    if "probe_interval" in data:
        probe_interval = _duration_field(data["probe_interval"], "probe_interval", MIN_PROBE_INTERVAL, errors) or probe_interval

    limits = {}
    for field, default in _LIMITS.items():
        value = data.get(field, default)
        limits[field] = _int_in(value, 0, 10_000_000, "a count", field, errors)
    unnamed_max_hold = None
    if "unnamed_max_hold" in data:
        unnamed_max_hold = _duration_field(data["unnamed_max_hold"], "unnamed_max_hold", 0.001, errors)
    password_file = _password_file(data.get("password_file"), "password_file", errors)
    poolers = _parse_poolers(data["poolers"], errors) if "poolers" in data else ()
    databases = _names(data["databases"], "databases", "database names", errors) if "databases" in data else ()

    chosen_presets = _parse_presets(data.get("presets", []), errors)
    show_queries = data.get("show_queries", False)
    if not isinstance(show_queries, bool):
        errors.append(f"show_queries: expected true or false, got {_show(show_queries)}")

    raw_locks = data.get("locks", [])
    parsed: list[tuple[int, LockConfig]] = []
    if not isinstance(raw_locks, list):
        errors.append(f"locks: expected a list, got {_show(raw_locks)}")
    else:
        for index, entry in enumerate(raw_locks):
            lock = _parse_lock(entry, probe_interval, f"locks[{index}]", errors)
            if lock is not None:
                parsed.append((index, lock))
        _check_duplicate_names(raw_locks, errors)
        _check_literal_collisions(parsed, errors)
        if not any("dsn:" in e for e in errors):
            _check_family_overlaps(parsed, database_name(dsn), errors)

    if errors:
        raise ConfigError(source, errors)
    return Config(
        dsn=dsn, locks=tuple(lock for _, lock in parsed), probe_interval=probe_interval, **interval,
        max_holder_info_per_lock=limits["max_holder_info_per_lock"] or 0, max_holder_info=limits["max_holder_info"] or 0,
        max_unnamed_holder_info=limits["max_unnamed_holder_info"] or 0, max_tracked_holds=limits["max_tracked_holds"] or 0,
        unnamed_max_hold=unnamed_max_hold, password_file=password_file, presets=chosen_presets, poolers=poolers,
        databases=databases, show_queries=show_queries is True,
    )


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
