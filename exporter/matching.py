"""Which named lock each key belongs to: a configured key first, then a family, else nobody. Pure."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from . import keys
from .naming import ResolvedLock


class KeyMatcher:
    """Which resolved lock a (database, objsubid, key) belongs to.

    Keys are (classid << 32) | objid as signed bigints, as the poll returns them.
    """

    def __init__(self, locks: Iterable[ResolvedLock]) -> None:
        # database -> objsubid -> key -> lock indices (two configured names may resolve to one lock)
        self._named: dict[str, dict[int, dict[int, tuple[int, ...]]]] = {}
        # database -> namespace (as the unsigned classid) -> family index
        self._namespaces: dict[str, dict[int, int]] = {}
        # database -> [(low, high, family index)]
        self._ranges: dict[str, list[tuple[int, int, int]]] = {}
        for lock in locks:
            family = lock.family
            if isinstance(family, keys.NamespaceFamily):
                self._namespaces.setdefault(lock.database, {})[family.namespace & 0xFFFFFFFF] = lock.index
            elif isinstance(family, keys.RangeFamily):
                self._ranges.setdefault(lock.database, []).append((family.low, family.high, lock.index))
            elif lock.tag is not None:
                key = keys.signed64(keys.tag_key64(lock.tag))
                by_key = self._named.setdefault(lock.database, {}).setdefault(lock.tag.objsubid, {})
                by_key[key] = (*by_key.get(key, ()), lock.index)

    def named(self, database: str, objsubid: int) -> dict[int, tuple[int, ...]]:
        return self._named.get(database, {}).get(objsubid, {})

    def family(self, database: str, objsubid: int, key: int) -> int | None:
        """The family a key not named on its own belongs to, if any."""
        if objsubid == keys.OBJSUBID_INT4_PAIR:
            namespaces = self._namespaces.get(database)
            return namespaces.get((key >> 32) & 0xFFFFFFFF) if namespaces else None
        for low, high, index in self._ranges.get(database, ()):
            if low <= key <= high:
                return index
        return None

    def has_families(self, database: str) -> bool:
        return database in self._namespaces or database in self._ranges

    def partition(self, database: str, objsubid: int, row_keys: Sequence[int]) -> dict[int | None, Sequence[int]]:
        """A row's keys by the lock they belong to: a configured key first, then a family; None:
        nobody named it. Set operations first, so keys nobody names cost next to nothing."""
        named = self.named(database, objsubid)
        with_families = self.has_families(database)
        hits = named.keys() & row_keys if named else ()
        if not hits and not with_families:
            return {None: row_keys}
        by_lock: dict[int | None, list[int]] = {}
        for key in hits:
            for index in named[key]:
                by_lock.setdefault(index, []).append(key)
        rest = [key for key in row_keys if key not in hits] if hits else row_keys
        if not with_families:
            if rest:
                by_lock[None] = list(rest)
            return by_lock
        family = self.family
        for key in rest:
            index = family(database, objsubid, key)
            group = by_lock.get(index)
            if group is None:
                by_lock[index] = [key]
            else:
                group.append(key)
        return by_lock
