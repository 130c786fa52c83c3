"""Advisory lock keys and how pg_locks shows them.

pg_advisory_lock(bigint) appears as classid = high 32 bits, objid = low 32 bits, objsubid = 1;
pg_advisory_lock(int4, int4) as classid, objid = the two ints, objsubid = 2. Both columns are
unsigned oids, so negative halves appear as values >= 2**31.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeGuard, Union


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


@dataclass(frozen=True)
class NamespaceFamily:
    """Every pg_advisory_lock(namespace, x): the int4-pair keys whose first int is namespace."""

    namespace: int

    def describe(self) -> str:
        return f"({self.namespace}, *)"

    def overlaps(self, other: "FamilySpec") -> bool:
        return isinstance(other, NamespaceFamily) and other.namespace == self.namespace

    def contains(self, tag: LockTag) -> bool:
        return tag.objsubid == OBJSUBID_INT4_PAIR and tag.classid == self.namespace & _U32


@dataclass(frozen=True)
class RangeFamily:
    """Every pg_advisory_lock(bigint) with the key in [low, high], inclusive."""

    low: int
    high: int

    def describe(self) -> str:
        return f"[{self.low} .. {self.high}]"

    def overlaps(self, other: "FamilySpec") -> bool:
        return isinstance(other, RangeFamily) and self.low <= other.high and other.low <= self.high

    def contains(self, tag: LockTag) -> bool:
        return tag.objsubid == OBJSUBID_BIGINT and self.low <= signed64((tag.classid << 32) | tag.objid) <= self.high


LiteralKey = Union[BigintKey, Int4PairKey]
StringKey = Union[HashtextKey, HashtextExtendedKey]
FamilySpec = Union[NamespaceFamily, RangeFamily]
KeySpec = Union[BigintKey, Int4PairKey, HashtextKey, HashtextExtendedKey, NamespaceFamily, RangeFamily]


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


def signed64(unsigned: int) -> int:
    """An unsigned 64-bit pattern as the signed bigint it is."""
    return unsigned - 2**64 if unsigned > INT64_MAX else unsigned


def key_label(objsubid: int, key64: int) -> str:
    """The key as every exposition label writes it: '42,7' for an int4 pair, the decimal bigint
    otherwise. key64 is (classid << 32) | objid, as the poll returns it (signed or not)."""
    key64 &= 0xFFFFFFFFFFFFFFFF
    if objsubid == OBJSUBID_INT4_PAIR:
        return f"{_signed32(key64 >> 32)},{_signed32(key64 & _U32)}"
    return str(signed64(key64))


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


def is_family(key: KeySpec) -> TypeGuard[FamilySpec]:
    return isinstance(key, (NamespaceFamily, RangeFamily))


def tag_key64(tag: LockTag) -> int:
    """(classid << 32) | objid: the unsigned 64-bit form the poll returns for every advisory row."""
    return (tag.classid << 32) | tag.objid
