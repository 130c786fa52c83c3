"""Key encoding, checked against what a real server writes into pg_locks."""

from __future__ import annotations

import psycopg
import pytest
from hypothesis import example, given, strategies as st

from exporter import keys
from exporter.resolve import resolve_string_keys
from exporter.keys import INT4_MAX, INT4_MIN, INT64_MAX, INT64_MIN, LockTag


@given(st.integers(min_value=INT64_MIN, max_value=INT64_MAX))
@example(INT64_MAX)  # the ends of the range, every run (hypothesis only tends to try them)
@example(INT64_MIN)
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
    assert keys.int4_pair_tag(INT4_MAX, INT4_MIN) == LockTag(0x7FFFFFFF, 0x80000000, 2)


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


def test_key_labels_and_the_poll_form() -> None:
    # The poll's key is (classid << 32) | objid, signed or not; an int4 pair is written "first,second".
    assert keys.tag_key64(LockTag(1, 2, 1)) == (1 << 32) | 2
    assert [keys.signed64(v) for v in (0, INT64_MAX, INT64_MAX + 1, 2**64 - 1)] == [0, INT64_MAX, INT64_MIN, -1]
    assert keys.key_label(1, 5) == "5" and keys.key_label(1, 2**64 - 1) == "-1" and keys.key_label(1, -1) == "-1"
    assert keys.key_label(1, (42 << 32) | 7) == str((42 << 32) | 7)
    assert keys.key_label(2, (42 << 32) | 7) == "42,7" and keys.key_label(2, -1) == "-1,-1"
    assert keys.key_label(2, (0xFFFFFFFF << 32) | 3) == "-1,3"
    assert keys.literal_tag(keys.BigintKey(5)) == LockTag(0, 5, 1)
    assert keys.literal_tag(keys.Int4PairKey(1, -2)) == LockTag(1, 0xFFFFFFFE, 2)
    with pytest.raises(ValueError, match="objsubid 3 "):
        keys.decode_tag(LockTag(0, 1, 3))


def test_families_contain_and_overlap_at_their_edges() -> None:
    tenants = keys.NamespaceFamily(-1)
    assert tenants.contains(keys.int4_pair_tag(-1, 5)) and not tenants.contains(keys.int4_pair_tag(1, 5))
    assert not tenants.contains(LockTag(0xFFFFFFFF, 5, 1))  # a bigint is in no namespace
    assert tenants.overlaps(keys.NamespaceFamily(-1)) and not tenants.overlaps(keys.NamespaceFamily(1))
    assert not tenants.overlaps(keys.RangeFamily(-1, 1))
    low = keys.RangeFamily(-3, 3)
    assert [low.contains(keys.bigint_tag(v)) for v in (-4, -3, 3, 4)] == [False, True, True, False]
    assert not low.contains(keys.int4_pair_tag(0, 1))
    assert low.overlaps(keys.RangeFamily(3, 9)) and keys.RangeFamily(3, 9).overlaps(low)
    assert not low.overlaps(keys.RangeFamily(4, 9)) and not low.overlaps(keys.NamespaceFamily(0))
    assert keys.BigintKey(-5).describe() == "-5"
