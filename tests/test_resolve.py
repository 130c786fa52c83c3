"""Naming every lock in every database it applies to: configured keys first, families, presets."""

from __future__ import annotations

from exporter import keys
from exporter.config import parse_config
from exporter.resolve import SOURCE_CONFIG, SOURCE_PRESET, find_collisions, resolve_locks, resolve_on_server
from tests.conftest import OTHER_DB


def test_configured_locks_win_over_presets_and_presets_sharing_a_key_share_a_lock() -> None:
    config = parse_config({"presets": ["prisma", "grafana", "golang-migrate"],
                           "locks": [{"name": "ours", "key": 72707369}, {"name": "tenants", "key": {"namespace": 7}}]}, "t")
    locks = resolve_locks(config, "app", {}, ("app", "other"))
    by = {(lock.config.name, lock.database): lock for lock in locks}
    assert ("prisma:migrations", "app") not in by and by[("prisma:migrations", "other")].source == SOURCE_PRESET
    assert by[("ours", "app")].source == SOURCE_CONFIG and by[("tenants", "app")].tag is None
    assert by[("tenants", "app")].display_key == "(7, *)"
    # golang-migrate before v4.15 and Grafana take the very same key: one lock, both names in it.
    assert ("grafana|golang-migrate-v4.14:migrations", "app") in by


def test_string_keys_and_databases_come_from_the_server(sessions) -> None:
    conn = sessions.open()
    config = parse_config({"presets": ["prisma"], "locks": [
        {"name": "h", "key": {"hashtext": "hourly-digest"}}, {"name": "same", "key": {"hashtext": "hourly-digest"},
                                                              "database": OTHER_DB}]}, "t")
    locks = resolve_on_server(conn, config, "postgres")
    expected = conn.execute("SELECT hashtext('hourly-digest')::int8").fetchone()[0]
    assert locks[0].tag == keys.bigint_tag(expected) and locks[1].database == OTHER_DB
    assert {lock.database for lock in locks if lock.source == SOURCE_PRESET} >= {"postgres", OTHER_DB}
    messages, pairs = find_collisions(locks)
    assert messages == [] and pairs == ()  # the same key in two databases is two locks
