"""Advisory lock keys and how pg_locks shows them.

pg_advisory_lock(bigint) appears as classid = high 32 bits, objid = low 32 bits, objsubid = 1;
pg_advisory_lock(int4, int4) as classid, objid = the two ints, objsubid = 2. Both columns are
unsigned oids, so negative halves appear as values >= 2**31.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeGuard, Union

import psycopg

from . import queries

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
INT4_MIN = -(2**31)
INT4_MAX = 2**31 - 1
_U32 = 0xFFFFFFFF

OBJSUBID_BIGINT = 1
OBJSUBID_INT4_PAIR = 2


@dataclass(frozen=True, order=True)
class LockTag:
    """The (classid, objid, objsubid) triple of an advisory row in pg_locks."""

    classid: int
    objid: int
    objsubid: int


@dataclass(frozen=True)
class BigintKey:
    """pg_advisory_lock(bigint)."""

    value: int

    def describe(self) -> str:
        return str(self.value)


@dataclass(frozen=True)
class Int4PairKey:
    """pg_advisory_lock(int4, int4)."""

    first: int
    second: int

    def describe(self) -> str:
        return f"({self.first}, {self.second})"


@dataclass(frozen=True)
class HashtextKey:
    """pg_advisory_lock(hashtext(text)): an int4 widened to bigint, resolved on the server."""

    text: str

    def describe(self) -> str:
        return f"hashtext({self.text!r})"


@dataclass(frozen=True)
class HashtextExtendedKey:
    """pg_advisory_lock(hashtextextended(text, 0)): a bigint, resolved on the server."""

    text: str

    def describe(self) -> str:
        return f"hashtextextended({self.text!r}, 0)"


LiteralKey = Union[BigintKey, Int4PairKey]
StringKey = Union[HashtextKey, HashtextExtendedKey]
KeySpec = Union[BigintKey, Int4PairKey, HashtextKey, HashtextExtendedKey]


def bigint_tag(value: int) -> LockTag:
    """The pg_locks triple of pg_advisory_lock(value)."""
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"{value} is outside bigint")
    unsigned = value & 0xFFFFFFFFFFFFFFFF
    return LockTag(unsigned >> 32, unsigned & _U32, OBJSUBID_BIGINT)


def int4_pair_tag(first: int, second: int) -> LockTag:
    """The pg_locks triple of pg_advisory_lock(first, second)."""
    for half in (first, second):
        if not INT4_MIN <= half <= INT4_MAX:
            raise ValueError(f"{half} is outside int4")
    return LockTag(first & _U32, second & _U32, OBJSUBID_INT4_PAIR)


def _signed32(value: int) -> int:
    return value - 2**32 if value > INT4_MAX else value


def decode_tag(tag: LockTag) -> LiteralKey:
    """The key a pg_locks triple stands for: the inverse of bigint_tag / int4_pair_tag."""
    if tag.objsubid == OBJSUBID_BIGINT:
        unsigned = (tag.classid << 32) | tag.objid
        return BigintKey(unsigned - 2**64 if unsigned > INT64_MAX else unsigned)
    if tag.objsubid == OBJSUBID_INT4_PAIR:
        return Int4PairKey(_signed32(tag.classid), _signed32(tag.objid))
    raise ValueError(f"objsubid {tag.objsubid} is not an advisory lock form")


def literal_tag(key: LiteralKey) -> LockTag:
    """The pg_locks triple of a key known without asking the server."""
    if isinstance(key, BigintKey):
        return bigint_tag(key.value)
    return int4_pair_tag(key.first, key.second)


def is_literal(key: KeySpec) -> TypeGuard[LiteralKey]:
    return isinstance(key, (BigintKey, Int4PairKey))


def resolve_string_keys(conn: psycopg.Connection, keys: Iterable[StringKey]) -> dict[StringKey, LockTag]:
    """Ask the monitored server what its hash functions make of each string key.

    hashtext() is internal and has changed between majors, so it is never computed here.
    hashtext() returns int4; passed to pg_advisory_lock(bigint) it is sign-extended, which the
    server's own int4 -> int8 cast in the query does for us.
    """
    wanted = sorted(set(keys), key=lambda k: (type(k).__name__, k.text))
    if not wanted:
        return {}
    texts = [k.text for k in wanted]
    with conn.cursor() as cur:
        cur.execute(queries.RESOLVE_STRING_KEYS, {"texts": texts})
        hashes = {text: (ht, hte) for text, ht, hte in cur.fetchall()}
    return {
        k: bigint_tag(hashes[k.text][0] if isinstance(k, HashtextKey) else hashes[k.text][1])
        for k in wanted
    }
