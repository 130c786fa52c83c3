"""One schema for config.yaml (config.schema.json): the chart's schema is generated from it and
never drifts, and it agrees with the exporter's own checks on every config of the suite, valid or
refused, wherever a schema can say the rule at all."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from exporter import config, configkeys, configvalues, keys, presets
from exporter.config import ConfigError, parse_fleet
from tests import test_bad_input, test_config, test_families, test_poller, test_probe
from tests.test_poolers import LOCKS as POOLER_LOCKS

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "config.schema.json").read_text())
VALIDATOR = jsonschema.Draft7Validator(SCHEMA)

# Rules no JSON Schema can say: they need the whole file, the environment, the disk or libpq.
NOT_EXPRESSIBLE = ("duplicate name", "name the same lock", "overlaps family", "environment variable",
                   "cannot read", "is above high", "at character", "duplicate key", "not valid YAML",
                   "not UTF-8", "larger than", "the file is empty", "must be at least", "must be at most",
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
    # A target's presets once had a list of their own in the schema, six tools and ecto behind the top level's.
    {"targets": {"a": {"dsn": "host=a", "presets": ["pg_repack", {"ecto": "MyApp.Repo"}], "max_tracked_holds": 0}}},
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


# One source of truth in practice: every field, enum and bound the exporter's checks know is in the
# schema, and every one the schema knows is in the checks; a field added to one and not the other
# fails here (docs/development.md: Adding a config field).
DEFS = SCHEMA["definitions"]
KEY_MAPPING = next(form for form in DEFS["key"]["oneOf"] if form["type"] == "object")
INT4 = (keys.INT4_MIN, keys.INT4_MAX)
INT64 = (keys.INT64_MIN, keys.INT64_MAX)


def bounds(schema: dict) -> tuple[int, int]:
    return schema["minimum"], schema["maximum"]


SAME = {
    "top-level fields": (set(SCHEMA["properties"]), {*config._TOP_FIELDS, "targets"}),
    "fields refused at the top with targets": (
        {field for rule in SCHEMA["then"]["not"]["anyOf"] for field in rule["required"]}, set(config.TARGET_ONLY_FIELDS)),
    "a target's fields": (list(DEFS["target"]["properties"]), list(config._TARGET_FIELDS)),
    "a target's fields are the top level's": (
        list(DEFS["target"]["properties"].values()), [{"$ref": f"#/properties/{f}"} for f in config._TARGET_FIELDS]),
    "target names": (list(SCHEMA["properties"]["targets"]["patternProperties"]), [f"^{config._TARGET_NAME.pattern}$"]),
    "a lock's fields": (set(DEFS["lock"]["properties"]), set(config._LOCK_FIELDS)),
    "a lock's required fields": (DEFS["lock"]["required"], ["name", "key"]),
    "a probe's fields": (set(DEFS["lock"]["properties"]["probe"]["properties"]), set(config._PROBE_FIELDS)),
    "probe expectations": (DEFS["lock"]["properties"]["probe"]["properties"]["expect"]["enum"], list(config._EXPECTATIONS)),
    "a pooler's fields": (set(DEFS["pooler"]["properties"]), set(config._POOLER_FIELDS)),
    "pooler types": (DEFS["pooler"]["properties"]["type"]["enum"], list(config.POOLER_TYPES)),
    "pool modes": (DEFS["pooler"]["properties"]["pool_mode"]["enum"], list(config.POOL_MODES)),
    "key mapping forms": (set(KEY_MAPPING["properties"]), set(configkeys.MAPPING_KEY_FORMS)),
    "with_advisory_lock's fields": (
        set(KEY_MAPPING["properties"]["with_advisory_lock"]["oneOf"][1]["properties"]),
        set(configkeys.WITH_ADVISORY_LOCK_FIELDS)),
    "bigint keys": (bounds(DEFS["key"]["oneOf"][0]), INT64),
    "two-int4 keys": (bounds(DEFS["key"]["oneOf"][1]["items"]), INT4),
    "namespace families": (bounds(KEY_MAPPING["properties"]["namespace"]), INT4),
    "range families": (bounds(KEY_MAPPING["properties"]["range"]["items"]), INT64),
    "presets": (SCHEMA["properties"]["presets"]["oneOf"][1]["items"]["oneOf"][0]["enum"], [*presets.PRESETS, presets.ALL]),
    "presets with a parameter": (
        set(SCHEMA["properties"]["presets"]["oneOf"][1]["items"]["oneOf"][1]["properties"]), set(presets.PARAMETERISED)),
    "Ecto repo modules": (
        SCHEMA["properties"]["presets"]["oneOf"][1]["items"]["oneOf"][1]["properties"]["ecto"]["pattern"],
        f"^{config._ELIXIR_MODULE.pattern}$"),
    "durations": (
        {DEFS["duration"]["pattern"]} | {DEFS["lock"]["properties"][f]["pattern"] for f in ("max_hold",)}
        | {DEFS["lock"]["properties"]["probe"]["properties"]["interval"]["pattern"]},
        {DEFS["duration"]["pattern"]}),
}


@pytest.mark.parametrize("what", SAME)
def test_the_schema_and_the_checks_know_the_same_fields_enums_and_bounds(what: str) -> None:
    in_schema, in_code = SAME[what]
    assert in_schema == in_code, f"{what}: config.schema.json says {in_schema}, exporter/config*.py {in_code}"


# Values a scalar field might be given: each scalar's checker and its schema take the same ones.
SAMPLES = ["5s", "100ms", "1m30s", "1.5s", "2d", "0s", "600h", "1" + "0" * 400 + "s", "1e400s", "inf", "nan", "soon", "5",
           "", "auto", 0, 5, -1, 10_000_000, 10_000_001,
           0.5, 1.5, True, False, None, [], {}, [1], {"a": 1}]


@pytest.mark.parametrize("field", config.SCALARS)
def test_each_scalar_takes_the_same_values_as_its_schema(field: str) -> None:
    check, _ = config.SCALARS[field]
    schema = jsonschema.Draft7Validator({**SCHEMA["properties"][field], "definitions": DEFS})
    for value in SAMPLES:
        errors: list[str] = []
        taken = check(value, field, errors) is not None and not errors
        if any("must be at least" in error or "must be at most" in error for error in errors):
            continue  # a duration's bounds: the schema's pattern cannot compare durations
        assert taken == schema.is_valid(value), f"{field}: {value!r}: the checks {'take' if taken else 'refuse'} it " \
            f"({errors}), the schema {'takes' if schema.is_valid(value) else 'refuses'} it"


def test_a_count_is_the_schemas_count() -> None:
    assert all(bounds(SCHEMA["properties"][field]) == (0, configvalues.MAX_COUNT)
               for field, (check, _) in config.SCALARS.items() if check is configvalues.count)
