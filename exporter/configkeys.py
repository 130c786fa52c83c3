"""A lock's key as config.yaml writes it -> a keys.KeySpec: a bigint, two int4, a string key
({hashtext: ...}), a family ({namespace: ...}, {range: [...]}) or {with_advisory_lock: ...}.

Problems are appended to errors, located ("locks[2].key[1]: ..."); nothing raises. Pure.
"""

from __future__ import annotations

from typing import Any

from . import keys, presets
from .ages import counted
from .configvalues import did_you_mean, int_in, show, unknown_fields

STRING_KEY_FORMS = {"hashtext": keys.HashtextKey, "hashtextextended": keys.HashtextExtendedKey}
MAPPING_KEY_FORMS = (*STRING_KEY_FORMS, "namespace", "range", "with_advisory_lock")
WITH_ADVISORY_LOCK_FIELDS = ("name", "prefix")


def parse_key(value: Any, where: str, errors: list[str]) -> keys.KeySpec | None:
    """A key in any of its config forms, or None after appending the reason to errors."""
    if isinstance(value, list):
        if len(value) != 2:
            errors.append(f"{where}: a two-int4 key is a list of exactly two integers, got {counted(len(value), 'item')}")
            return None
        first = int_in(value[0], keys.INT4_MIN, keys.INT4_MAX, "int4", f"{where}[0]", errors)
        second = int_in(value[1], keys.INT4_MIN, keys.INT4_MAX, "int4", f"{where}[1]", errors)
        return None if first is None or second is None else keys.Int4PairKey(first, second)
    if isinstance(value, dict):
        return _parse_key_mapping(value, where, errors)
    if isinstance(value, int) and not isinstance(value, bool):
        number = int_in(value, keys.INT64_MIN, keys.INT64_MAX, "bigint", where, errors)
        return None if number is None else keys.BigintKey(number)
    errors.append(
        f"{where}: expected a bigint (4242), two int4 ([42, 7]) or a string key "
        f"({{hashtext: name}}), got {show(value)}"
    )
    return None


def _parse_key_mapping(value: dict, where: str, errors: list[str]) -> keys.KeySpec | None:
    if len(value) != 1 or next(iter(value)) not in MAPPING_KEY_FORMS:
        fields = sorted(map(str, value))
        hint = did_you_mean(fields[0], MAPPING_KEY_FORMS) if len(fields) == 1 else ""
        errors.append(
            f"{where}: a key mapping has one field: hashtext or hashtextextended (a string key), "
            f"namespace or range (a key family), with_advisory_lock (the gem's lock name), "
            f"got {', '.join(fields) or 'an empty mapping'}{hint}"
        )
        return None
    form, text = next(iter(value.items()))
    if form == "with_advisory_lock":
        return _parse_with_advisory_lock(text, f"{where}.with_advisory_lock", errors)
    if form == "namespace":
        namespace = int_in(text, keys.INT4_MIN, keys.INT4_MAX, "int4", f"{where}.namespace", errors)
        return None if namespace is None else keys.NamespaceFamily(namespace)
    if form == "range":
        return _parse_range(text, f"{where}.range", errors)
    if not isinstance(text, str) or not text:
        errors.append(f"{where}.{form}: expected a non-empty string, got {show(text)}")
        return None
    return STRING_KEY_FORMS[form](text)


def _parse_with_advisory_lock(value: Any, where: str, errors: list[str]) -> keys.Int4PairKey | None:
    """{with_advisory_lock: NAME} or {with_advisory_lock: {name: NAME, prefix: N}}: the gem's int4 pair."""
    prefix: Any = 0
    if isinstance(value, dict):
        errors.extend(unknown_fields(value, WITH_ADVISORY_LOCK_FIELDS, where))
        prefix = value.get("prefix", 0)
        if isinstance(prefix, bool) or not isinstance(prefix, int):
            errors.append(f"{where}.prefix: expected an integer (WITH_ADVISORY_LOCK_PREFIX), got {show(prefix)}")
            return None
        if "name" not in value:
            errors.append(f"{where}.name: required")
            return None
        value, where = value["name"], f"{where}.name"
    if not isinstance(value, str) or not value:
        errors.append(f"{where}: expected the lock name, a non-empty string, got {show(value)}")
        return None
    return keys.Int4PairKey(*presets.with_advisory_lock(value, prefix))


def _parse_range(value: Any, where: str, errors: list[str]) -> keys.RangeFamily | None:
    if not isinstance(value, list) or len(value) != 2:
        errors.append(f"{where}: expected [low, high], two bigints (inclusive), got {show(value)}")
        return None
    low = int_in(value[0], keys.INT64_MIN, keys.INT64_MAX, "bigint", f"{where}[0]", errors)
    high = int_in(value[1], keys.INT64_MIN, keys.INT64_MAX, "bigint", f"{where}[1]", errors)
    if low is None or high is None:
        return None
    if low > high:
        errors.append(f"{where}: low {low} is above high {high}")
        return None
    return keys.RangeFamily(low, high)
