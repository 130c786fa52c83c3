"""Key encoding, checked against what a real server writes into pg_locks."""

from __future__ import annotations

import psycopg
import pytest
from hypothesis import given, strategies as st

from exporter import keys
from exporter.resolve import resolve_string_keys
from exporter.keys import INT4_MAX, INT4_MIN, INT64_MAX, INT64_MIN, LockTag


@given(st.integers(min_value=INT64_MIN, max_value=INT64_MAX))
def test_bigint_round_trips_over_whole_int64(value: int) -> None:
    tag = keys.bigint_tag(value)
    assert 0 <= tag.classid <= 0xFFFFFFFF and 0 <= tag.objid <= 0xFFFFFFFF
    assert keys.decode_tag(tag) == keys.BigintKey(value)


@given(st.integers(INT4_MIN, INT4_MAX), st.integers(INT4_MIN, INT4_MAX))
def test_int4_pair_round_trips_over_whole_range(first: int, second: int) -> None:
    tag = keys.int4_pair_tag(first, second)
    assert tag.objsubid == 2
    assert keys.decode_tag(tag) == keys.Int4PairKey(first, second)


def test_known_encodings() -> None:
    assert keys.bigint_tag(4242) == LockTag(0, 4242, 1)
    assert keys.bigint_tag(-1) == LockTag(0xFFFFFFFF, 0xFFFFFFFF, 1)
    assert keys.bigint_tag(INT64_MIN) == LockTag(0x80000000, 0, 1)
    assert keys.bigint_tag(INT64_MAX) == LockTag(0x7FFFFFFF, 0xFFFFFFFF, 1)
    assert keys.int4_pair_tag(-1, -2) == LockTag(0xFFFFFFFF, 0xFFFFFFFE, 2)


@pytest.mark.parametrize("bad", [INT64_MIN - 1, INT64_MAX + 1])
def test_bigint_outside_int64_is_refused(bad: int) -> None:
    with pytest.raises(ValueError, match="outside bigint"):
        keys.bigint_tag(bad)


def test_int4_outside_range_is_refused() -> None:
    with pytest.raises(ValueError, match="outside int4"):
        keys.int4_pair_tag(INT4_MAX + 1, 0)


def _server_tag(conn: psycopg.Connection, call: str, args: list[int]) -> LockTag:
    conn.execute(f"SELECT {call}", args)
    row = conn.execute(
        "SELECT classid::int8, objid::int8, objsubid FROM pg_locks "
        "WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
    ).fetchone()
    conn.execute("SELECT pg_advisory_unlock_all()")
    assert row is not None
    return LockTag(*row)


BIGINTS = [0, 1, -1, 4242, -4242, 2**31, -(2**31), 2**32, -(2**32) - 1, INT64_MIN, INT64_MAX]
PAIRS = [(42, 7), (-1, -1), (-42, 7), (42, -7), (INT4_MIN, INT4_MAX), (INT4_MAX, INT4_MIN), (0, -1)]


@pytest.mark.parametrize("value", BIGINTS)
def test_bigint_tag_matches_pg_locks(sessions, value: int) -> None:
    conn = sessions.open()
    assert _server_tag(conn, "pg_advisory_lock(%s::int8)", [value]) == keys.bigint_tag(value)


@pytest.mark.parametrize("pair", PAIRS)
def test_int4_pair_tag_matches_pg_locks(sessions, pair: tuple[int, int]) -> None:
    conn = sessions.open()
    assert _server_tag(conn, "pg_advisory_lock(%s::int4, %s::int4)", list(pair)) == keys.int4_pair_tag(*pair)


TEXTS = ["hourly-digest", "billing", "", "ünïcödé", "a'quote", "x" * 300]


def test_string_keys_resolve_to_what_the_server_locks(sessions) -> None:
    conn = sessions.open()
    specs = [keys.HashtextKey(t) for t in TEXTS if t] + [keys.HashtextExtendedKey(t) for t in TEXTS if t]
    resolved = resolve_string_keys(conn, specs)
    negatives = 0
    for spec in specs:
        call = "pg_advisory_lock(hashtext(%s))" if isinstance(spec, keys.HashtextKey) else "pg_advisory_lock(hashtextextended(%s, 0))"
        tag = _server_tag(conn, call, [spec.text])  # type: ignore[list-item]
        assert resolved[spec] == tag, spec
        negatives += keys.decode_tag(tag).value < 0  # type: ignore[union-attr]
    # hashtext values are negative about half the time: the sign extension path is exercised.
    assert negatives > 0
