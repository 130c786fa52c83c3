"""Config validation: every problem found at once, each located; --check-config."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import psycopg
import pytest

from exporter import keys
from exporter.config import (
    MAX_AUTO_POLL_INTERVAL, MAX_POLL_INTERVAL, ConfigError, load_config, parse_config, parse_duration, parse_fleet,
)
from exporter.configvalues import MAX_DURATION

GOOD = {"dsn": "host=db dbname=app user=exp", "locks": [{"name": "a", "key": 1}]}


def errors_of(raw: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, "config.yaml")
    return info.value.details


def test_the_documented_example_loads() -> None:
    config = load_config(str(Path(__file__).parent.parent / "config.yaml"))
    assert [lock.name for lock in config.locks][:3] == ["hourly-digest", "billing-leader", "shard-7"]
    assert config.locks[0].key == keys.HashtextKey("hourly-digest")
    assert config.locks[1].key == keys.BigintKey(4242)
    assert config.locks[2].key == keys.Int4PairKey(42, 7)
    assert config.locks[2].database == "app"
    assert config.poll_auto and (config.max_db_time_share, config.min_poll_interval, config.max_poll_interval) == (
        0.005, 0.1, 30.0)
    assert config.locks[0].expect_every == 3600


@pytest.mark.parametrize(
    "text, seconds",
    [("500ms", 0.5), ("5s", 5.0), ("1m", 60.0), ("1m30s", 90.0), ("1h", 3600.0), ("1.5s", 1.5), ("2d", 172800.0)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["5", "", "5 s", "s", "5x", "1s1m", "-1s", "1s1s", "\u0665s", "\uff15s"])  # Arabic-Indic and full-width 5: as the schema, ASCII digits only
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


CASES = [
    ({**GOOD, "extra": 1}, "extra: unknown field"),
    ({**GOOD, "min_poll_interval": "1m"}, "min_poll_interval: 60s is above max_poll_interval 30s"),
    ({**GOOD, "max_db_time_share": "0%"}, "max_db_time_share: expected a percentage of one core above 0% and at most 100%"),
    ({**GOOD, "max_db_time_share": "101%"}, "max_db_time_share: expected a percentage of one core above 0% and at most 100%"),
    ({**GOOD, "max_db_time_share": 0.5}, "max_db_time_share: expected a percentage of one core above 0% and at most 100%"),
    ({**GOOD, "poll_interval": "sometimes"}, "poll_interval: 'sometimes' is not a duration"),
    ({**GOOD, "show_queries": "yes"}, "show_queries: expected true or false"),
    ({**GOOD, "locks": [{"name": "t", "key": {"namespace": 4}, "expect_every": "1h"}]},
     "locks[0].expect_every: a key family cannot expect_every"),
    ({**GOOD, "locks": [{"name": "t", "key": 4, "expect_every": "soon"}]}, "locks[0].expect_every: 'soon' is not a duration"),
    ({**GOOD, "locks": [{"name": "a", "key": 1, "colour": "red"}]}, "locks[0].colour: unknown field"),
    ({**GOOD, "locks": "a"}, "locks: expected a list"),
    ({**GOOD, "locks": [{"name": "a", "key": {"namespace": 2**31}}]}, "locks[0].key.namespace: 2147483648 is outside int4"),
    ({**GOOD, "locks": [{"name": "a", "key": {"namespace": "x"}}]}, "locks[0].key.namespace: expected an integer (int4)"),
    ({**GOOD, "locks": [{"name": "a", "key": {"range": [5]}}]}, "locks[0].key.range: expected [low, high], two bigints"),
    ({**GOOD, "locks": [{"name": "a", "key": {"range": [5, 2**63]}}]}, "locks[0].key.range[1]: 9223372036854775808 is outside bigint"),
    ({**GOOD, "locks": [{"name": "a", "key": {"range": [5, 4]}}]}, "locks[0].key.range: low 5 is above high 4"),
    (
        {**GOOD, "locks": [{"name": "a", "key": {"namespace": 42}, "probe": {"expect": "free"}}]},
        "locks[0].probe: a key family cannot be probed: it has no one key to try",
    ),
    (
        {**GOOD, "locks": [{"name": "a", "key": {"range": [1, 10]}}, {"name": "b", "key": {"range": [10, 20]}}]},
        "locks[1].key: family 'b' [10 .. 20] overlaps family 'a' [1 .. 10] (locks[0]) in database 'app'",
    ),
    (
        {**GOOD, "locks": [{"name": "a", "key": {"namespace": 42}}, {"name": "b", "key": {"namespace": 42}, "database": "app"}]},
        "locks[1].key: family 'b' (42, *) overlaps family 'a' (42, *) (locks[0]) in database 'app'",
    ),
    ({**GOOD, "unnamed_max_hold": "never"}, "unnamed_max_hold: 'never' is not a duration"),
    ({**GOOD, "max_tracked_holds": -5}, "max_tracked_holds: -5 is outside a count"),
    ({**GOOD, "max_unnamed_holder_info": "ten"}, "max_unnamed_holder_info: expected an integer"),
    ({**GOOD, "dsn": 5}, "dsn: expected a connection string, got an integer (5)"),
    ({**GOOD, "dsn": "host=a password"}, 'dsn: parameter "password" at character 8: expected "=" and a value after the name'),
    ({**GOOD, "poll_interval": "5"}, "poll_interval: '5' is not a duration"),
    ({**GOOD, "poll_interval": 5}, "poll_interval: expected a duration"),
    ({**GOOD, "poll_interval": "10ms"}, "poll_interval: must be at least 100ms"),
    ({**GOOD, "locks": [{"key": 1}]}, "locks[0].name: expected a non-empty string, got nothing"),
    ({**GOOD, "locks": [{"name": "a"}]}, "locks[0].key: required"),
    ({**GOOD, "locks": [{"name": 7, "key": 1}]}, "locks[0].name: expected a non-empty string, got an integer (7)"),
    ({**GOOD, "locks": [{"name": "a", "key": 2**63}]}, "locks[0].key: 9223372036854775808 is outside bigint"),
    ({**GOOD, "locks": [{"name": "a", "key": -(2**63) - 1}]}, "locks[0].key: -9223372036854775809 is outside bigint"),
    ({**GOOD, "locks": [{"name": "a", "key": [2**31, 1]}]}, "locks[0].key[0]: 2147483648 is outside int4"),
    ({**GOOD, "locks": [{"name": "a", "key": [1, -(2**31) - 1]}]}, "locks[0].key[1]: -2147483649 is outside int4"),
    ({**GOOD, "locks": [{"name": "a", "key": [1, 2, 3]}]}, "locks[0].key: a two-int4 key is a list of exactly two integers, got 3"),
    ({**GOOD, "locks": [{"name": "a", "key": [1, "x"]}]}, "locks[0].key[1]: expected an integer (int4), got a string ('x')"),
    ({**GOOD, "locks": [{"name": "a", "key": True}]}, "locks[0].key: expected a bigint"),
    ({**GOOD, "locks": [{"name": "a", "key": "4242"}]}, "locks[0].key: expected a bigint"),
    ({**GOOD, "locks": [{"name": "a", "key": {"md5": "x"}}]}, "locks[0].key: a key mapping has one field: hashtext or hashtextextended"),
    ({**GOOD, "locks": [{"name": "a", "key": {"hashtext": ""}}]}, "locks[0].key.hashtext: expected a non-empty string"),
    ({**GOOD, "locks": [{"name": "a", "key": 1, "database": 3}]}, "locks[0].database: expected a database name"),
    ({**GOOD, "locks": [{"name": "a", "key": {"with_advisory_lock": ""}}]},
     "locks[0].key.with_advisory_lock: expected the lock name, a non-empty string"),
    ({**GOOD, "locks": [{"name": "a", "key": {"with_advisory_lock": {"name": "x", "prefix": "7"}}}]},
     "locks[0].key.with_advisory_lock.prefix: expected an integer (WITH_ADVISORY_LOCK_PREFIX)"),
    ({**GOOD, "locks": [{"name": "a", "key": {"with_advisory_lock": {"prefix": 7}}}]}, "locks[0].key.with_advisory_lock.name: required"),
    ({**GOOD, "locks": [{"name": "a", "key": {"with_advisory_lock": {"name": "x", "salt": 1}}}]},
     "locks[0].key.with_advisory_lock.salt: unknown field (allowed: name, prefix)"),
    (
        {**GOOD, "locks": [{"name": "a", "key": [215750275, 0]}, {"name": "b", "key": {"with_advisory_lock": "x"}}]},
        "locks[1].key: 'b' and 'a' (locks[0]) name the same lock (215750275, 0)",
    ),
    ({**GOOD, "presets": ["rails", "ecto"]}, "presets[1]: ecto takes a parameter (an Elixir module name such as MyApp.Repo)"),
    ({**GOOD, "presets": ["all", {"ecto": "my_app repo"}]}, "presets[1].ecto: expected an Elixir module name such as MyApp.Repo"),
    ({**GOOD, "presets": [{"ecto": 7}]}, "presets[0].ecto: expected an Elixir module name such as MyApp.Repo, got an integer (7)"),
    ({**GOOD, "presets": [{"oban": "MyApp.Repo"}]}, "presets[0]: a preset with a parameter is a mapping of one field (ecto), got oban"),
    ({**GOOD, "presets": [{"ecto": "A.Repo", "rails": "x"}]}, "presets[0]: a preset with a parameter is a mapping of one field"),
    ({**GOOD, "locks": [{"name": "a", "key": 1}, {"name": "a", "key": 2}]}, "locks[1].name: duplicate name 'a' (first at locks[0])"),
    (
        {**GOOD, "locks": [{"name": "a", "key": 9}, {"name": "b", "key": 9}]},
        "locks[1].key: 'b' and 'a' (locks[0]) name the same lock 9",
    ),
    (
        {**GOOD, "locks": [{"name": "a", "key": [1, 2]}, {"name": "b", "key": [1, 2]}]},
        "locks[1].key: 'b' and 'a' (locks[0]) name the same lock (1, 2)",
    ),
    ({**GOOD, "locks": ["a"]}, "locks[0]: expected a mapping with name and key, got a string ('a')"),
    ({**GOOD, "locks": [{"name": "a", "key": 1, "probe": "held"}]}, "locks[0].probe: expected a mapping such as {expect: held}"),
    ({**GOOD, "locks": [{"name": "a", "key": 1, "probe": {"expect": "taken"}}]}, "locks[0].probe.expect: expected one of held, free, any, got a string ('taken')"),
    ({**GOOD, "locks": [{"name": "a", "key": 1, "probe": {"expect": "held", "every": "1s"}}]}, "locks[0].probe.every: unknown field"),
    ({**GOOD, "locks": [{"name": "a", "key": 1, "probe": {"interval": "1ms"}}]}, "locks[0].probe.interval: must be at least 10ms"),
    ({**GOOD, "locks": [{"name": "a", "key": 1, "max_hold": "soon"}]}, "locks[0].max_hold: 'soon' is not a duration"),
    ({**GOOD, "probe_interval": "0s"}, "probe_interval: must be at least 10ms"),
    # A duration that becomes the server's statement_timeout fits its int of milliseconds (issue 27).
    ({**GOOD, "poll_interval": "600h"}, "poll_interval: must be at most 2147483.647s (about 24.8 days: the poll's "
     "statement_timeout, an int of milliseconds on the server)"),
    ({**GOOD, "poll_interval": "2147483648ms"}, "poll_interval: must be at most 2147483.647s"),
    ({**GOOD, "max_poll_interval": "99999999999999999999h"}, "max_poll_interval: must be at most 2097152s (about "
     "24.3 days: rounded up to a power of two seconds, the poll's statement_timeout, an int of milliseconds on the server)"),
    ({**GOOD, "max_poll_interval": "2097152001ms"}, "max_poll_interval: must be at most 2097152s"),
    ({**GOOD, "min_poll_interval": "25d", "max_poll_interval": "26d"}, "min_poll_interval: must be at most 2097152s"),
    # Every other duration stays finite and to the millisecond, however many digits it is written with.
    ({**GOOD, "unnamed_max_hold": "1" + "0" * 400 + "s"}, "unnamed_max_hold: must be at most 8796093022208s (about "
     "278,000 years: beyond, a float of seconds loses milliseconds)"),
    ({**GOOD, "probe_interval": "8796093022209s"}, "probe_interval: must be at most 8796093022208s"),
    ({**GOOD, "locks": [{"name": "a", "key": 1, "probe": {"interval": "9" * 400 + "d"}}]},
     "locks[0].probe.interval: must be at most 8796093022208s"),
    ({**GOOD, "locks": [{"name": "a", "key": 1, "max_hold": "99999999999999999999h"}]},
     "locks[0].max_hold: must be at most 8796093022208s"),
    ({**GOOD, "locks": [{"name": "a", "key": 1, "expect_every": "1" + "0" * 400 + "ms"}]},
     "locks[0].expect_every: must be at most 8796093022208s"),
    ({**GOOD, "poll_interval": "1e400s"}, "poll_interval: '1e400s' is not a duration"),
    ({**GOOD, "max_poll_interval": "inf"}, "max_poll_interval: 'inf' is not a duration"),
    ({**GOOD, "unnamed_max_hold": "nan"}, "unnamed_max_hold: 'nan' is not a duration"),
    ([1, 2], "expected a mapping at the top level, got a list"),
    (None, "the file is empty"),
]


@pytest.mark.parametrize("raw, message", CASES, ids=[c[1][:40] for c in CASES])
def test_each_error_is_located(raw: object, message: str) -> None:
    assert any(d.startswith(message) for d in errors_of(raw)), errors_of(raw)


def test_the_longest_durations_are_taken_to_the_millisecond() -> None:
    """Each limit is the largest value that works, written in whatever units."""
    config = parse_config({**GOOD, "poll_interval": "24d20h31m23s647ms", "unnamed_max_hold": "8796093022208s",
                           "locks": [{"name": "a", "key": 1, "max_hold": "8796093022208000ms"}]}, "x")
    assert config.poll_interval == parse_duration("2147483647ms") == MAX_POLL_INTERVAL == 2147483.647
    assert config.unnamed_max_hold == config.locks[0].max_hold == MAX_DURATION == 2**43
    auto = parse_config({**GOOD, "min_poll_interval": "24d6h32m32s", "max_poll_interval": "2097152s"}, "x")
    assert auto.poll_auto and auto.min_poll_interval == auto.max_poll_interval == MAX_AUTO_POLL_INTERVAL == 2**21
    with pytest.raises(ValueError, match=r"^must be at most 8796093022208s \(about 278,000 years"):
        parse_duration("1" + "0" * 400 + "s")  # float() makes these digits infinite


def test_at_their_limits_the_intervals_fit_the_server_after_every_derivation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every statement_timeout, lock_timeout and connect_timeout made from the longest intervals fits
    the server's int, and every wait for them a thread's; a millisecond more would not fit."""
    from exporter import connection, queries
    from exporter.dsn import MAX_TIMEOUT_MS, timeout_ms
    from exporter.poller import Poller, connect_poller

    connect_timeouts: list[int] = []
    monkeypatch.setattr(connection, "open_connection",
                        lambda *args, **kwargs: connect_timeouts.append(kwargs["connect_timeout"]))
    monkeypatch.setattr(connection, "with_addresses", lambda dsn, timeout: dsn)  # no name lookup of host=db

    def bounds(poller: Poller) -> list[int]:
        config = poller._config  # noqa: SLF001 - the values the poller derives its bounds from
        poll = re.findall(r"statement_timeout = (\d+);", queries.poll_query(150000, poller._timeout()))  # noqa: SLF001
        connection.connect(config.dsn, "t", config.timeout_seconds)
        return [timeout_ms(config.timeout_seconds), *map(int, poll), poller._session_bound()]  # noqa: SLF001

    def never_polled(raw: dict) -> Poller:
        return Poller(parse_config({**GOOD, **raw}, "x"), connect=connect_poller, publish=print)

    fixed = never_polled({"poll_interval": "2147483647ms"})
    assert max(bounds(fixed)) == MAX_TIMEOUT_MS
    auto = never_polled({"max_poll_interval": "2097152s"})
    auto._controller.interval = MAX_AUTO_POLL_INTERVAL  # noqa: SLF001 - as if the polls had become that dear
    assert max(bounds(auto)) == 2**21 * 1000 <= MAX_TIMEOUT_MS
    assert max(connect_timeouts) <= MAX_TIMEOUT_MS  # libpq's connect_timeout is an int of seconds
    for poller in (fixed, auto):
        poller._direct = True  # noqa: SLF001 - the deadline counts a direct session's rounded bound
        assert poller.deadline() < threading.TIMEOUT_MAX
    assert timeout_ms(MAX_POLL_INTERVAL + 0.001) > MAX_TIMEOUT_MS
    auto._controller.interval = MAX_AUTO_POLL_INTERVAL + 0.001  # noqa: SLF001
    assert auto._session_bound() > MAX_TIMEOUT_MS  # noqa: SLF001 - the next power of two


def test_targets_and_their_defaults_are_held_to_the_same_limits() -> None:
    with pytest.raises(ConfigError) as info:
        parse_fleet({"max_poll_interval": "30d", "targets": {
            "a": {"dsn": "host=a", "poll_interval": "600h"},
            "b": {"dsn": "host=b", "locks": [{"name": "x", "key": 1, "probe": {"interval": "9" * 400 + "s"}}]}}}, "t")
    assert [detail.split(" (")[0] for detail in info.value.details] == [
        "max_poll_interval: must be at most 2097152s",
        "targets.a.poll_interval: must be at most 2147483.647s",
        "targets.b.locks[0].probe.interval: must be at most 8796093022208s",
    ]


def test_at_their_limits_the_polls_run_on_a_real_server(make_poller, sessions) -> None:
    """The server takes the longest bounds the config allows, on both ways of polling, and
    refuses a millisecond more."""
    from exporter.dsn import MAX_TIMEOUT_MS
    from tests.scheduling_util import poll_under_deadline

    fixed = make_poller({"poll_interval": "2147483647ms"})
    assert poll_under_deadline(fixed)[-1].up and fixed._direct  # noqa: SLF001 - under its deadline, as a worker polls
    fixed._unprepare()  # noqa: SLF001 - and the one-string transaction
    assert poll_under_deadline(fixed)[-1].up and fixed.poll_once().stats.errors == 0
    auto = make_poller({"poll_interval": "auto", "max_poll_interval": "2097152s"})
    auto._controller.interval = MAX_AUTO_POLL_INTERVAL  # noqa: SLF001 - as if the polls had become that dear
    assert poll_under_deadline(auto)[-1].up
    conn = auto._conn  # noqa: SLF001 - only the poller's own session can read its settings
    assert conn is not None and conn.execute("SELECT current_setting('statement_timeout')").fetchone() == ("2097152s",)
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        sessions.open().execute(f"SET statement_timeout = {MAX_TIMEOUT_MS + 1}")


def test_every_problem_is_reported_at_once() -> None:
    details = errors_of({"dsn": 1, "poll_interval": "x", "locks": [{"name": "a", "key": 2**64}, {"key": [1]}], "zzz": 0})
    wheres = [d.split(":")[0] for d in details]
    assert wheres == ["zzz", "dsn", "poll_interval", "locks[0].key", "locks[1].name", "locks[1].key"]


def test_durations_beyond_their_limits_are_reported_with_every_other_problem() -> None:
    details = errors_of({"dsn": 1, "poll_interval": "600h", "max_poll_interval": "99999999999999999999h",
                         "locks": [{"name": "a", "key": 2**64, "max_hold": "9" * 400 + "s"}]})
    assert [d.split(":")[0] for d in details] == ["dsn", "poll_interval", "max_poll_interval", "locks[0].key",
                                                  "locks[0].max_hold"]


def test_probe_defaults() -> None:
    config = parse_config({**GOOD, "probe_interval": "10s", "locks": [
        {"name": "a", "key": 1, "probe": {}}, {"name": "b", "key": 2, "probe": {"expect": "held", "interval": "1s"}},
        {"name": "c", "key": 3, "max_hold": "15m"},
    ]}, "x")
    a, b, c = config.locks
    assert (a.probe.expect, a.probe.interval) == ("any", 10.0)
    assert (b.probe.expect, b.probe.interval) == ("held", 1.0)
    assert c.probe is None and c.max_hold == 900.0
    assert config.probed == (a, b)


def test_families_and_presets_only() -> None:
    config = parse_config({"dsn": "dbname=app", "presets": ["rails"], "unnamed_max_hold": "10m", "locks": [
        {"name": "tenants", "key": {"namespace": -42}, "max_hold": "1m"},
        {"name": "accounts", "key": {"range": [-(2**63), 2**63 - 1]}},
        {"name": "other-tenants", "key": {"namespace": -42}, "database": "other"},  # another database: no overlap
        {"name": "one-tenant", "key": [-42, 7]},  # a single key inside a family: allowed, its own name wins
    ]}, "x")
    assert [lock.key for lock in config.locks[:2]] == [keys.NamespaceFamily(-42), keys.RangeFamily(-(2**63), 2**63 - 1)]
    assert config.unnamed_max_hold == 600.0 and config.max_unnamed_holder_info == 10 and config.max_tracked_holds == 100_000
    assert config.summary().startswith("1 lock (1 int4 pair), 3 families, 0 probed, presets: rails, poolers: none")
    # presets and no locks: a user who wants only the presets writes only that.
    assert parse_config({"presets": "all"}, "x").locks == ()


def test_each_scalar_is_a_config_field_with_one_default() -> None:
    """config.SCALARS is the one place a scalar field is declared: Config has each, with the same default."""
    from dataclasses import MISSING, fields

    from exporter.config import SCALARS, Config

    declared = {field.name: field.default for field in fields(Config)}
    defaults = {name: default for name, (_, default) in SCALARS.items()}
    assert {name: declared[name] for name in SCALARS if declared[name] is not MISSING} == {
        name: default for name, default in defaults.items() if declared[name] is not MISSING}
    config = parse_config(GOOD, "x")
    # poll_interval's default, auto, is a pair on Config: poll_auto, and the interval it starts at.
    assert defaults.pop("poll_interval") == "auto" and config.poll_auto
    assert config.poll_interval == config.min_poll_interval
    assert {name: getattr(config, name) for name in defaults} == defaults


def test_same_key_in_different_databases_is_not_a_collision() -> None:
    config = parse_config({**GOOD, "locks": [{"name": "a", "key": 9}, {"name": "b", "key": 9, "database": "other"}]}, "x")
    assert len(config.locks) == 2


def test_bigint_and_pair_with_same_halves_are_different_locks() -> None:
    # pg_advisory_lock(1, 2) and pg_advisory_lock((1 << 32) | 2) differ only in objsubid.
    parse_config({**GOOD, "locks": [{"name": "a", "key": [1, 2]}, {"name": "b", "key": (1 << 32) | 2}]}, "x")


def test_dsn_expands_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DB_PASSWORD", "s3cret")
    config = parse_config({**GOOD, "dsn": "host=db password=${DB_PASSWORD}"}, "x")
    assert config.dsn == "host=db password=s3cret"
    assert "s3cret" not in config.summary()


def test_unset_environment_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOPE_UNSET", raising=False)
    assert errors_of({**GOOD, "dsn": "host=${NOPE_UNSET}"}) == ["dsn: environment variable NOPE_UNSET is not set"]


def _write(tmp_path: Path, text: str | bytes) -> str:
    path = tmp_path / "config.yaml"
    path.write_bytes(text if isinstance(text, bytes) else textwrap.dedent(text).encode())
    return str(path)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read: No such file"):
        load_config(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize(
    "text, message",
    [
        ("locks: [a\n", "not valid YAML"),
        (b"dsn: \xff\xfe\n", "not UTF-8"),
        ("locks:\n  - name: a\n    name: b\n    key: 1\n", "line 3, column 5: not valid YAML: duplicate key 'name'"),
        ("!!python/object/apply:os.system ['true']\n", "not valid YAML"),
    ],
)
def test_file_level_errors(tmp_path: Path, text: str | bytes, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text))
    assert any(message in d for d in info.value.details), info.value.details


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exporter", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


def test_check_config_ok_prints_summary_without_password(tmp_path: Path) -> None:
    path = _write(tmp_path, """
        dsn: "postgresql://exp:hunter2@db:5432/app"
        poll_interval: 2s
        locks:
          - {name: a, key: 1}
          - {name: b, key: [1, 2]}
          - {name: c, key: {hashtext: c}}
    """)
    result = run_cli("--check-config", f"--config.file={path}")
    assert result.returncode == 0, result.stderr
    assert "ok: 3 locks (1 bigint, 1 hashtext, 1 int4 pair), 0 families, 0 probed, presets: none, poolers: none, poll_interval 2s" in result.stdout
    assert "host=db port=5432 dbname=app user=exp" in result.stdout
    assert "hunter2" not in result.stdout + result.stderr


def test_check_config_prints_every_problem_and_exits_1(tmp_path: Path) -> None:
    path = _write(tmp_path, """
        dsn: "postgresql://exp:hunter2@db/app"
        locks:
          - {name: a, key: 99999999999999999999}
          - {name: a, key: [1]}
    """)
    result = run_cli("--check-config", f"--config.file={path}")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"{path}: locks[0].key: 99999999999999999999 is outside bigint (-9223372036854775808 .. 9223372036854775807)",
        f"{path}: locks[1].key: a two-int4 key is a list of exactly two integers, got 1 item",
        f"{path}: locks[1].name: duplicate name 'a' (first at locks[0])",
    ]
    assert "Traceback" not in result.stderr and "hunter2" not in result.stderr


def test_check_config_reads_flag_from_environment(tmp_path: Path) -> None:
    path = _write(tmp_path, "dsn: ''\nlocks: []\n")
    result = run_cli(env={"PG_ADVISORY_LOCK_EXPORTER_CHECK_CONFIG": "true", "PG_ADVISORY_LOCK_EXPORTER_CONFIG_FILE": path})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{path}: ok: 0 locks")


def test_missing_config_file_is_one_line(tmp_path: Path) -> None:
    result = run_cli(f"--config.file={tmp_path}/nope.yaml")
    assert result.returncode == 1
    assert result.stderr.strip() == f"{tmp_path}/nope.yaml: cannot read: No such file or directory"


def test_version() -> None:
    from exporter import __version__

    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"pg-advisory-lock-exporter {__version__}"
