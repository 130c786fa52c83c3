"""Config help: a misspelt field gets the nearest known one at every level of config.yaml and
web-config.yml, and a count agrees with its noun wherever a person reads it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from exporter import configvalues, landing
from exporter.ages import counted
from exporter.config import ConfigError, parse_fleet
from exporter.snapshot import PollStats, ReloadStatus, Snapshot
from exporter.webconfig import load_web_config
from tests.test_config import run_cli

LOCK = {"name": "a", "key": 1}


def details(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_fleet(data, "t")
    return info.value.details


@pytest.mark.parametrize("data, message", [
    ({"dns": "host=a", "locks": [LOCK]}, "dns: unknown field; did you mean dsn?"),
    ({"dsn": "host=a", "locks": [LOCK, LOCK | {"name": "b"}, LOCK | {"name": "c", "max_hodl": "1s"}]},
     "locks[2].max_hodl: unknown field; did you mean max_hold?"),
    ({"dsn": "host=a", "locks": [LOCK | {"probe": {"expcet": "held"}}]}, "locks[0].probe.expcet: unknown field; did you mean expect?"),
    ({"dsn": "host=a", "locks": [{"name": "a", "key": {"with_advisory_lock": {"nmae": "x"}}}]},
     "locks[0].key.with_advisory_lock.nmae: unknown field; did you mean name?"),
    ({"dsn": "host=a", "poolers": [{"name": "p", "adresses": ["10.0.0.1"], "pool_mode": "session"}]},
     "poolers[0].adresses: unknown field; did you mean addresses?"),
    ({"Poll_Intervall": "1s", "targets": {"a": {"dsn": "host=a"}}}, "Poll_Intervall: unknown field; did you mean poll_interval?"),
    ({"targets": {"a": {"dsn": "host=a", "lcoks": [LOCK]}}}, "targets.a.lcoks: unknown field; did you mean locks?"),
    ({"dsn": "host=a", "presets": ["rials"]}, "presets[0]: unknown preset 'rials'; did you mean rails?"),
    ({"dsn": "host=a", "locks": [LOCK | {"probe": {"expect": "hold"}}]},
     "locks[0].probe.expect: expected one of held, free, any, got a string ('hold'); did you mean held?"),
    ({"dsn": "host=a", "poolers": [{"name": "p", "addresses": ["10.0.0.1"], "pool_mode": "transactions"}]},
     "poolers[0].pool_mode: expected one of session, transaction, statement, got a string ('transactions'); "
     "did you mean transaction?"),
    ({"dsn": "host=a", "poolers": [{"name": "p", "type": "pgbounce", "dsn": "host=p"}]},
     "poolers[0].type: expected one of pgbouncer, got a string ('pgbounce'); did you mean pgbouncer?"),
])
def test_a_misspelt_field_gets_the_nearest_known_one(data: dict, message: str) -> None:
    assert message in details(data)


@pytest.mark.parametrize("data, start", [
    ({"dsn": "host=a", "locks": [LOCK | {"colour": "red"}]}, "locks[0].colour: unknown field (allowed: name, key, "),
    ({"dsn": "host=a", "extra": 1}, "extra: unknown field (allowed: dsn, "),
    ({"targets": {"a": {"dsn": "host=a"}}, "x": 1}, "x: unknown field (allowed: poll_interval, "),
])
def test_nothing_close_lists_every_allowed_field(data: dict, start: str) -> None:
    found = [d for d in details(data) if d.startswith(start)]
    assert found and "did you mean" not in found[0]


def test_a_misspelt_key_form_gets_the_nearest() -> None:
    [message] = details({"dsn": "host=a", "locks": [{"name": "a", "key": {"hashtxt": "x"}}]})
    assert message.startswith("locks[0].key: a key mapping has one field") and message.endswith("; did you mean hashtext?")


def test_the_cutoff() -> None:
    assert configvalues.nearest("max_holds", ("max_hold", "name")) == "max_hold"
    assert configvalues.nearest("MAX_HOLD", ("max_hold",)) == "max_hold"
    assert configvalues.nearest("colour", ("name", "key", "database", "probe", "max_hold", "expect_every")) is None
    assert configvalues.did_you_mean("zzz", ("max_hold",)) == ""


def test_the_web_config_shares_it(tmp_path: Path) -> None:
    path = tmp_path / "web.yml"
    path.write_text(yaml.safe_dump({"tsl_server_config": {}, "basic_auth_user": {}}))
    with pytest.raises(ConfigError) as info:
        load_web_config(str(path))
    assert info.value.details == ["basic_auth_user: unknown field; did you mean basic_auth_users?",
                                  "tsl_server_config: unknown field; did you mean tls_server_config?"]


def test_check_config_suggests_in_one_line_and_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"dsn": "host=db dbname=app", "locks": [
        {"name": "a", "key": 1}, {"name": "b", "key": 2}, {"name": "c", "key": 3, "max_hodl": "5m"}]}))
    result = run_cli("--check-config", f"--config.file={path}")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [f"{path}: locks[2].max_hodl: unknown field; did you mean max_hold?"]


@pytest.mark.parametrize("noun, plural, one, two", [
    ("family", None, "1 family", "2 families"),
    ("lock", None, "1 lock", "2 locks"),
    ("key", None, "1 key", "2 keys"),
    ("target", None, "1 target", "2 targets"),
    ("poll", None, "1 poll", "2 polls"),
    ("item", None, "1 item", "2 items"),
    ("second", None, "1 second", "2 seconds"),
    ("address", None, "1 address", "2 addresses"),
    ("series", "series", "1 series", "2 series"),
])
def test_counted(noun: str, plural: str | None, one: str, two: str) -> None:
    assert (counted(1, noun, plural), counted(2, noun, plural), counted(0, noun, plural)) == (one, two, "0 " + two[2:])


def test_the_summary_agrees_in_number() -> None:
    one = parse_fleet({"dsn": "host=a", "locks": [LOCK, {"name": "f", "key": {"namespace": 1}}]}, "t").summary()
    assert one.startswith("1 lock (1 bigint), 1 family, ")
    two = parse_fleet({"dsn": "host=a", "locks": [LOCK, LOCK | {"name": "b", "key": 2},
                                                  {"name": "f", "key": {"namespace": 1}},
                                                  {"name": "g", "key": {"namespace": 2}}]}, "t").summary()
    assert two.startswith("2 locks (2 bigint), 2 families, ")
    fleet = parse_fleet({"targets": {"a": {"dsn": "host=a"}}}, "t").summary()
    assert fleet.startswith("1 target: a: 0 locks (none), 0 families, ")


def test_a_key_list_of_one_item() -> None:
    assert "locks[0].key: a two-int4 key is a list of exactly two integers, got 1 item" in \
        details({"dsn": "host=a", "locks": [{"name": "a", "key": [1]}]})


def test_the_landing_page_agrees_in_number() -> None:
    one = landing.render_targets({"a": Snapshot(up=False)}, ReloadStatus(), "/metrics").decode()
    two = landing.render_targets({"a": Snapshot(up=False), "b": Snapshot(up=False)}, ReloadStatus(), "/metrics").decode()
    assert ": 1 target</h1>" in one and ": 2 targets</h1>" in two
    page = landing.render(Snapshot(up=False, stats=PollStats(polls=1)), (), ReloadStatus(), "/metrics").decode()
    assert "1 poll, 0 failed" in page
