"""One schema for config.yaml (config.schema.json): the chart's schema is generated from it and
never drifts, and it agrees with the exporter's own checks on every config of the suite, valid or
refused, wherever a schema can say the rule at all."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from exporter.config import ConfigError, parse_fleet
from tests import test_bad_input, test_config, test_families, test_poller, test_probe
from tests.test_poolers import LOCKS as POOLER_LOCKS

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "config.schema.json").read_text())
VALIDATOR = jsonschema.Draft7Validator(SCHEMA)

# Rules no JSON Schema can say: they need the whole file, the environment, the disk or libpq.
NOT_EXPRESSIBLE = ("duplicate name", "name the same lock", "overlaps family", "environment variable",
                   "cannot read", "is above high", "not a valid libpq", "duplicate key", "not valid YAML",
                   "not UTF-8", "larger than", "the file is empty", "must be at least",
                   "expected a bigint",  # JSON Schema counts 1.0 an integer; YAML's 1.0 is a float
                   "is above max_poll_interval",  # two durations compared
                   "at most 100%")  # a percentage's value

VALID = [
    yaml.safe_load((ROOT / "config.yaml").read_text()),
    test_config.GOOD,
    {"dsn": "dbname=app", "presets": "all"},
    {"dsn": "dbname=app", "poll_interval": "auto", "max_db_time_share": "1.5%", "min_poll_interval": "200ms",
     "max_poll_interval": "1m", "show_queries": True, "locks": [{"name": "cron", "key": 5, "expect_every": "1h"}]},
    {"dsn": "dbname=app", "presets": ["all", {"ecto": "MyApp.Repo"}, {"ecto": "Billing.Repo"}, "pg_repack"], "locks": [
        {"name": "invoices", "key": {"with_advisory_lock": "invoice-run"}},
        {"name": "invoices-eu", "key": {"with_advisory_lock": {"name": "invoice-run", "prefix": 7}}, "probe": {"expect": "free"}},
        {"name": "repacks", "key": {"namespace": 16185446}}]},
    {"locks": test_poller.LOCKS},
    {"locks": test_families.FAMILIES, "unnamed_max_hold": "1h", "max_unnamed_holder_info": 3, "max_tracked_holds": 5},
    {"locks": test_probe.LOCKS, "probe_interval": "200ms", "max_holder_info": 3, "max_holder_info_per_lock": 1},
    {"locks": POOLER_LOCKS, "poolers": [
        {"name": "pgb", "type": "pgbouncer", "dsn": "host=pgb port=6432 dbname=pgbouncer user=console",
         "password_file": "/etc/hostname"},
        {"name": "proxy", "addresses": ["10.1.2.3", "10.1.2.4"], "pool_mode": "transaction"}]},
    {"poll_interval": "2s", "presets": ["rails"], "targets": {
        "orders": {"dsn": "host=o dbname=orders", "locks": test_poller.LOCKS[:2], "databases": ["orders"]},
        "billing-eu": {"dsn": "host=billing.example dbname=billing", "poll_interval": "1s", "unnamed_max_hold": "5m"}}},
]
REFUSED_TARGETS = [
    ({"dsn": "host=x", "targets": {"a": {"dsn": "host=a"}}}, "dsn: with targets, dsn belongs to each target"),
    ({"locks": [], "targets": {"a": {"dsn": "host=a"}}}, "locks: with targets, locks belongs to each target"),
    ({"targets": {"a": {"dsn": "host=a", "colour": 1}}}, "targets.a.colour: unknown field"),
    ({"targets": {}}, "targets: expected a mapping of target names"),
    ({"targets": {"a b": {}}}, "targets.a b: a target name is letters"),
]


def test_the_charts_schema_is_generated_from_it_and_has_not_drifted() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("sync_schema", ROOT / "helm" / "sync_schema.py")
    sync = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync)  # type: ignore[union-attr]
    written = json.loads((ROOT / "helm" / "pg-advisory-lock-exporter" / "values.schema.json").read_text())
    assert written == sync.synced_values_schema(), "run: python helm/sync_schema.py"


def test_the_schema_is_draft_07_and_the_example_points_at_it() -> None:
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    assert (ROOT / "config.yaml").read_text().startswith("# yaml-language-server: $schema=./config.schema.json\n")


@pytest.mark.parametrize("config", VALID, ids=range(len(VALID)))
def test_every_valid_config_is_valid_to_the_schema_too(config: dict) -> None:
    parse_fleet(config, "t")  # the exporter takes it
    assert not list(VALIDATOR.iter_errors(config)), [e.message for e in VALIDATOR.iter_errors(config)]


def refused_configs() -> list[tuple[object, str]]:
    cases = [(raw, message) for raw, message in [*test_config.CASES, *REFUSED_TARGETS]]
    for content, message in test_bad_input.MALFORMED:
        try:
            data = yaml.safe_load(content.decode("utf-8"))
        except (UnicodeDecodeError, yaml.YAMLError, RecursionError):
            continue
        cases.append((data, message))
    return cases


@pytest.mark.parametrize("raw, message", refused_configs(), ids=[m[:50] for _, m in refused_configs()])
def test_every_refused_config_is_refused_by_the_schema_where_it_can_say_so(raw: object, message: str) -> None:
    if any(reason in message for reason in NOT_EXPRESSIBLE):
        return  # the exporter's own check is the only one (test_config and test_bad_input assert it)
    with pytest.raises(ConfigError) as info:
        parse_fleet(raw, "t")
    assert any(message in detail for detail in info.value.details), info.value.details
    assert list(VALIDATOR.iter_errors(raw)), f"the schema takes a config the exporter refuses: {message}"
