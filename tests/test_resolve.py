"""Naming every lock in every database it applies to: configured keys first, families, presets."""

from __future__ import annotations

from exporter import keys
from exporter.config import parse_config
from exporter.naming import SOURCE_CONFIG, SOURCE_PRESET, find_collisions, resolve_locks
from exporter.resolve import resolve_on_server
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


def test_presets_all_on_200_databases_resolve_once_per_database_with_families() -> None:
    from exporter import presets
    from exporter.naming import preset_string_keys

    config = parse_config({"presets": "all"}, "t")
    wanted = preset_string_keys(config.presets)
    assert {k.text for k in wanted} == {text for _, text in (*presets.PG_PARTMAN_KEYS, *presets.PG_PARTMAN_FAMILIES)}
    tags = {k: keys.bigint_tag(-5 - i) for i, k in enumerate(sorted(wanted, key=lambda k: k.text))}  # as a server would hash
    databases = tuple(f"db{i}" for i in range(200))
    locks = resolve_locks(config, "db0", tags, databases)
    families = [lock for lock in locks if lock.family is not None]
    assert len(locks) == 200 * len(presets.expand(["all"])) and len(families) == 200 * 3
    assert {lock.family for lock in families} >= {keys.NamespaceFamily(presets.PG_REPACK_NAMESPACE)}
    # Without the server's hashes (no connection), pg_partman's locks are left out, nothing fails.
    assert len(resolve_locks(config, "db0", {}, ("db0",))) == len(presets.expand(["all"])) - 10
