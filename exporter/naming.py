"""Every lock the exporter names, in every database it applies to, with its pg_locks triple: the
configured locks (string keys as the server resolved them), the configured key families, and the
presets' locks and families. Pure: resolve.py asks the server what only it knows."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

from . import keys, presets
from .config import Config, LockConfig
from .snapshot import KeyCollision

SOURCE_CONFIG = "config"
SOURCE_PRESET = "preset"


@dataclass(frozen=True)
class ResolvedLock:
    """A named lock with its database and pg_locks triple known."""

    config: LockConfig
    index: int
    database: str
    tag: keys.LockTag | None  # None for a key family
    source: str = SOURCE_CONFIG

    @property
    def key(self) -> tuple[str, str]:
        """What identifies the lock over time: its name in its database."""
        return (self.config.name, self.database)

    @functools.cached_property  # asked for every key of every poll
    def family(self) -> keys.FamilySpec | None:
        return self.config.key if keys.is_family(self.config.key) else None

    @functools.cached_property
    def display_key(self) -> str:
        """'4242', '42,7', or a family's key set: '(42, *)'."""
        family = self.family
        if family is not None:
            return family.describe()
        assert self.tag is not None
        return keys.key_label(self.tag.objsubid, keys.tag_key64(self.tag))


def preset_string_keys(chosen: Iterable[presets.Chosen]) -> set[keys.StringKey]:
    """The string keys the chosen presets need the server to hash (pg_partman's hashtext names);
    they do not depend on the database."""
    wanted: set[keys.StringKey] = set()
    for preset in presets.expand(chosen):
        key = preset.key("")
        if isinstance(key, keys.HashtextKey):
            wanted.add(key)
        elif isinstance(key, presets.HashtextNamespace):
            wanted.add(keys.HashtextKey(key.text))
    return wanted


def _preset_key(
    key: presets.PresetKey, string_tags: dict[keys.StringKey, keys.LockTag]
) -> tuple[keys.KeySpec, keys.LockTag | None] | None:
    """A preset's key as a lock's (key, pg_locks triple; None for a family), or None when the server
    was not asked its hash (resolve_locks without a server)."""
    if isinstance(key, keys.HashtextKey):
        tag = string_tags.get(key)
        return None if tag is None else (key, tag)
    if isinstance(key, presets.HashtextNamespace):
        tag = string_tags.get(keys.HashtextKey(key.text))
        # hashtext() is an int4, sign-extended to the bigint the tag was made from.
        return None if tag is None else (keys.NamespaceFamily(keys.signed64(keys.tag_key64(tag))), None)
    if isinstance(key, keys.NamespaceFamily):
        return key, None
    return key, keys.literal_tag(key)


def resolve_locks(
    config: Config,
    default_database: str,
    string_tags: dict[keys.StringKey, keys.LockTag],
    databases: tuple[str, ...] = (),
) -> tuple[ResolvedLock, ...]:
    """Configured locks first, in config order, then preset locks and families for each of databases.

    A preset lock on a (database, key) a configured lock already names is left out, and a preset
    family whose namespace a configured family covers: the config's name wins. Two presets on one
    (database, key) share one lock, both names in it.
    """
    resolved: list[ResolvedLock] = []
    for lock in config.locks:
        if keys.is_family(lock.key):
            tag = None
        else:
            tag = keys.literal_tag(lock.key) if keys.is_literal(lock.key) else string_tags[lock.key]  # type: ignore[index]
        resolved.append(ResolvedLock(lock, len(resolved), lock.database or default_database, tag))
    taken = {(r.database, r.tag) for r in resolved if r.tag} | {(r.database, r.config.name) for r in resolved}
    families = [(r.database, r.family) for r in resolved if r.family is not None]
    preset_slots: dict[tuple[str, keys.LockTag], int] = {}
    chosen = presets.expand(config.presets)
    for database in databases:
        for preset in chosen:
            found = _preset_key(preset.key(database), string_tags)
            if found is None or (database, preset.name) in taken:
                continue
            key, tag = found
            if tag is None:
                family = key
                if any(d == database and f.overlaps(family) for d, f in families):  # type: ignore[arg-type]
                    continue
                families.append((database, family))  # type: ignore[arg-type]
                resolved.append(ResolvedLock(LockConfig(preset.name, key, database), len(resolved), database, None, SOURCE_PRESET))
                continue
            if (database, tag) in taken:
                continue
            slot = preset_slots.get((database, tag))
            if slot is not None:
                merged = resolved[slot]
                name = f"{merged.config.name}|{preset.name}"
                resolved[slot] = ResolvedLock(LockConfig(name, key, database), slot, database, tag, SOURCE_PRESET)
                continue
            preset_slots[(database, tag)] = len(resolved)
            resolved.append(ResolvedLock(LockConfig(preset.name, key, database), len(resolved), database, tag, SOURCE_PRESET))
    return tuple(resolved)


def find_collisions(locks: tuple[ResolvedLock, ...]) -> tuple[list[str], tuple[KeyCollision, ...]]:
    """Configured names that share one (database, key): messages for the log and pairs for the metric."""
    first: dict[tuple[str, keys.LockTag], ResolvedLock] = {}
    messages: list[str] = []
    pairs: list[KeyCollision] = []
    for lock in locks:
        if lock.source != SOURCE_CONFIG or lock.tag is None:
            continue
        slot = (lock.database, lock.tag)
        other = first.setdefault(slot, lock)
        if other is lock:
            continue
        messages.append(
            f"locks[{lock.index}].key: {lock.config.name!r} and {other.config.name!r} "
            f"(locks[{other.index}]) name the same lock {lock.config.key.describe()} = "
            f"{keys.decode_tag(lock.tag).describe()} in database {lock.database!r}"
        )
        pairs.append(KeyCollision(lock.config.name, other.config.name, lock.database))
        pairs.append(KeyCollision(other.config.name, lock.config.name, lock.database))
    return messages, tuple(pairs)
