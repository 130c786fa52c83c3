"""Where a connection string goes wrong, said without a character of it: the parameter and the
character position, never a fragment (a fragment may be the password). Pure.

libpq stays the judge of whether a dsn parses and of every value it reads (dsn.py asks psycopg's
conninfo_to_dict); this module only places a refusal, and what dsn.py calls (explain, port_problem)
never raises: what it fails to place is said without a place. libpq's messages cannot be mapped
instead: they quote the very fragment that must not be shown, they give no position (but for one URI
case), they change between libpq releases (18 refuses a space in a URI, 15 does not) and they are
translated under LC_MESSAGES. So this walks the two shapes as libpq's conninfo_parse and
conninfo_uri_parse_options do (fe-connect.c), as the libpq psycopg loaded does, as far as needed to
find the first thing they refuse. It also places the one value libpq takes unread but refuses at
every connect: a port that is not a number.

A word that libpq does not read as a parameter (a name without "=", an unknown name) may be a piece
of a password with a space or "&" in it: it is named, or a known name suggested for it, only when no
secret parameter comes before it (and, in a URI, no "@" after it, which a password with "/" in it
would leave there). Positions are indexes in the dsn; Refused.say maps them to the text the user
wrote (config.py's ${VAR} expansion).
"""

from __future__ import annotations

import functools
import string
from collections.abc import Callable
from dataclasses import dataclass

from psycopg import pq

from .configvalues import did_you_mean

URI_PREFIXES = ("postgresql://", "postgres://")  # as libpq's uri_prefix_length: case matters
_SPACE = " \t\n\r\v\f"  # C's isspace in the C locale
_MAX_PORT = 65535
# The names a URI's parts stand for (libpq stores them under these keywords).
_USER, _PASSWORD, _HOST, _PORT, _DBNAME = "user", "password", "host", "port", "dbname"


class Refused(Exception):
    """What libpq refuses in a dsn, located, without any of its text."""

    def __init__(self, what: str, at: int | None = None, name: str = "") -> None:
        super().__init__(what)
        self.what = what
        self.at = at  # index in the dsn, None when it could not be placed
        self.name = name  # the parameter, shown when libpq knows the name

    def say(self, origin: Callable[[int], int] | None = None) -> str:
        """'parameter "port" at character 23: ...', the index mapped by origin to the user's text."""
        place = []
        if self.name in keywords():
            place.append(f'parameter "{self.name}"')
        if self.at is not None:
            place.append(f"at character {(origin(self.at) if origin else self.at) + 1}")
        return f"{' '.join(place)}: {self.what}" if place else self.what

    def __str__(self) -> str:
        return self.say()


@dataclass(frozen=True)
class Param:
    """One parameter as libpq would store it: its keyword, its value, and where the value starts."""

    name: str
    value: str
    at: int  # index of the value's first character in the dsn


@functools.cache
def keywords() -> frozenset[str]:
    """The parameter names this libpq knows (PQconndefaults: no server is asked)."""
    return frozenset(option.keyword.decode() for option in pq.Conninfo.get_defaults())


@functools.cache
def secret_keywords() -> frozenset[str]:
    """The parameters whose values libpq hides ("*": password, sslpassword, oauth_client_secret) or
    shows only when debugging ("D": scram_client_key, ...): taken as secrets, to be safe."""
    return frozenset(option.keyword.decode() for option in pq.Conninfo.get_defaults() if option.dispchar)


# libpq 18 refuses a space inside a URI's part and ignores one around it; older ones keep both.
_URI_SPACE_REFUSED = pq.version() >= 180000


def text_problem(dsn: str) -> Refused | None:
    """What no libpq can be given: a character UTF-8 cannot encode (a lone surrogate, from YAML's
    "\\ud800" or an environment variable's undecodable bytes), or a NUL, where libpq would silently stop
    reading."""
    for index, char in enumerate(dsn):
        if char == "\0":
            return Refused("a NUL character (libpq would ignore everything after it)", index)
        if "\ud800" <= char <= "\udfff":
            return Refused("a character that is not valid Unicode (it cannot be sent as UTF-8)", index)
    return None


def explain(dsn: str) -> Refused:
    """Why libpq refuses dsn, located when the walk finds it; never a fragment of it, never raises."""
    try:
        params(dsn)
    except Refused as refused:
        return refused
    except Exception:  # noqa: BLE001 - a walk that fails only loses the place: the refusal stands
        pass
    return Refused("libpq refuses it (the place could not be found)")


def port_problem(dsn: str, port: str | None) -> Refused | None:
    """The port libpq read from dsn (conninfo_to_dict's), when it would refuse it at every connect,
    placed when the walk reads the same value; None when it is a port or absent. Never raises."""
    if port is None or _is_ports(port):
        return None
    return Refused(f"expected a port number (1 to {_MAX_PORT}) or a comma-separated list of them",
                   _where_port(dsn, port), _PORT)


def _is_ports(value: str) -> bool:
    for item in value.split(","):
        text = item.strip(_SPACE)  # an empty item is the default port
        digits = text[1:] if text.startswith("+") else text  # libpq reads it with strtol
        if text and not (digits.isascii() and digits.isdigit() and 1 <= int(digits) <= _MAX_PORT):
            return False
    return True


def _where_port(dsn: str, value: str) -> int | None:
    try:
        ports = [param for param in params(dsn) if param.name == _PORT]
    except Exception:  # noqa: BLE001 - the walk places the port or says nothing: libpq read the dsn
        return None
    # libpq keeps the last one given; a walk that read another value has lost its way.
    return ports[-1].at if ports and ports[-1].value == value else None


def params(dsn: str) -> list[Param]:
    """Each parameter dsn gives, in order, as libpq reads it; Refused at the first thing libpq refuses."""
    for prefix in URI_PREFIXES:
        if dsn.startswith(prefix):
            return _uri(dsn, len(prefix))
    return _key_values(dsn)


def _unknown(name: str, index: int, word_is_safe: bool) -> Refused:
    """An unknown name; a known one suggested only when the name cannot be a piece of a secret."""
    if not name:
        return Refused('expected a parameter name before "="', index)
    hint = did_you_mean(name, keywords()) if word_is_safe else ""
    return Refused(f"not a libpq parameter name{hint}", index)


def _key_values(text: str) -> list[Param]:
    """'host=db port=5432': libpq's conninfo_parse."""
    found: list[Param] = []
    i, end = 0, len(text)
    word_is_safe = True  # until a secret's value: a word after it may be the rest of it (one with a space)
    while i < end:
        if text[i] in _SPACE:
            i += 1
            continue
        name_at = i
        while i < end and text[i] != "=" and text[i] not in _SPACE:
            i += 1
        name = text[name_at:i]
        while i < end and text[i] in _SPACE:
            i += 1
        if i == end or text[i] != "=":
            if name in keywords() and word_is_safe:
                raise Refused('expected "=" and a value after the name', name_at, name)
            raise Refused('expected key=value (a parameter name followed by "=")', name_at)
        i += 1
        while i < end and text[i] in _SPACE:
            i += 1
        value_at = i
        value, i = _quoted(text, i, name) if i < end and text[i] == "'" else _bare(text, i)
        if name not in keywords():
            raise _unknown(name, name_at, word_is_safe)
        found.append(Param(name, value, value_at))
        word_is_safe = word_is_safe and name not in secret_keywords()
    return found


def _bare(text: str, i: int) -> tuple[str, int]:
    """An unquoted value from i: up to a space; a backslash takes the next character as it is."""
    chars = []
    while i < len(text):
        if text[i] in _SPACE:
            return "".join(chars), i + 1
        if text[i] == "\\":
            i += 1
            if i == len(text):
                break
        chars.append(text[i])
        i += 1
    return "".join(chars), i


def _quoted(text: str, i: int, name: str) -> tuple[str, int]:
    """A value in single quotes from the quote at i: up to the closing quote; backslash escapes."""
    opening, chars = i, []
    i += 1
    while i < len(text):
        if text[i] == "\\":
            i += 1
            if i < len(text):
                chars.append(text[i])
                i += 1
            continue
        if text[i] == "'":
            return "".join(chars), i + 1
        chars.append(text[i])
        i += 1
    raise Refused("the value's opening quote (') is never closed", opening, name)


def _uri(text: str, start: int) -> list[Param]:
    """'postgresql://user:password@host:port,host2/dbname?key=value': libpq's
    conninfo_uri_parse_options. Its parts are percent-decoded as libpq stores them."""
    found: list[Param] = []
    p = _user_info(text, start, found)
    hosts, ports, p = _netlocs(text, p)
    for name, spans in ((_HOST, hosts), (_PORT, ports)):
        # libpq joins the list with commas, then decodes it whole, and stores it when not empty.
        chars: list[tuple[str, int]] = []
        for number, (s, e) in enumerate(spans):
            chars += [(",", s)] * (number > 0) + [(text[i], i) for i in range(s, e)]
        if chars:
            found.append(Param(name, _decode_chars(chars, name), chars[0][1]))
    terminator = text[p] if p < len(text) else ""
    if terminator == "/":
        p += 1
        dbname_end = text.find("?", p)
        dbname_end = len(text) if dbname_end < 0 else dbname_end
        if p < dbname_end:
            found.append(Param(_DBNAME, _decode(text, p, dbname_end, _DBNAME), p))
        p, terminator = dbname_end, text[dbname_end:dbname_end + 1]
    if terminator:
        found.extend(_query(text, p + 1, found))
    return found


def _user_info(text: str, start: int, found: list[Param]) -> int:
    """user[:password]@ at start, if any, into found; where the host list begins."""
    at = start
    while at < len(text) and text[at] not in "@/":
        at += 1
    if at == len(text) or text[at] != "@":
        return start
    colon = text.find(":", start, at)
    user_end = at if colon < 0 else colon
    if start < user_end:
        found.append(Param(_USER, _decode(text, start, user_end, _USER), start))
    if colon >= 0 and colon + 1 < at:
        found.append(Param(_PASSWORD, _decode(text, colon + 1, at, _PASSWORD), colon + 1))
    return at + 1


def _netlocs(text: str, p: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]], int]:
    """The spans of each host and each port, and where the list ends (at '/', '?' or the end)."""
    hosts: list[tuple[int, int]] = []
    ports: list[tuple[int, int]] = []
    end = len(text)
    while True:
        if p < end and text[p] == "[":
            bracket = p
            close = text.find("]", p + 1)
            if close < 0:
                raise Refused('"[" opens an IPv6 host address that no "]" closes', bracket)
            if close == bracket + 1:
                raise Refused("an empty IPv6 host address ([])", bracket)
            hosts.append((bracket + 1, close))
            p = close + 1
            if p < end and text[p] not in ":/?,":
                raise Refused('expected ":", "/", "?" or "," after the IPv6 host address', p)
        else:
            host_at = p
            while p < end and text[p] not in ":/?,":
                p += 1
            hosts.append((host_at, p))
        port_at = p
        if p < end and text[p] == ":":
            port_at = p = p + 1
            while p < end and text[p] not in "/?,":
                p += 1
        ports.append((port_at, p))  # empty when this host has no port
        if p == end or text[p] != ",":
            return hosts, ports, p
        p += 1


def _query(text: str, p: int, before: list[Param]) -> list[Param]:
    """key=value&key=value from p, after the parameters before: libpq's conninfo_uri_parse_params."""
    found: list[Param] = []
    end = len(text)
    while p < end:
        name_at, equals = p, -1
        # A word after a secret may be the rest of it (a password with "&" in it); one before an "@"
        # may be a piece of a password with "/" in it, which ended the user part early.
        word_is_safe = "@" not in text[p:] and not any(param.name in secret_keywords() for param in before + found)
        while p < end and text[p] != "&":
            if text[p] == "=":
                if equals >= 0:
                    raise Refused('a second "=" in a query parameter (write it %3D)', p,
                                  text[name_at:equals] if word_is_safe else "")
                equals = p
            p += 1
        if equals < 0:
            raise Refused('a query parameter without "=" (expected key=value)', name_at,
                          text[name_at:p] if word_is_safe else "")
        name = _decode(text, name_at, equals, "")
        value = _decode(text, equals + 1, p, name)
        if name == "ssl" and value == "true":  # libpq's JDBC spelling
            name, value = "sslmode", "require"
        if name not in keywords():
            raise _unknown(name, name_at, word_is_safe)
        found.append(Param(name, value, equals + 1))
        p += 1
    return found


def _decode(text: str, start: int, end: int, name: str) -> str:
    """text[start:end] percent-decoded, as libpq's conninfo_uri_decode; Refused where it fails."""
    return _decode_chars([(text[i], i) for i in range(start, end)], name)


def _decode_chars(chars: list[tuple[str, int]], name: str) -> str:
    """Characters, each with its index in the dsn, percent-decoded as libpq does."""
    while _URI_SPACE_REFUSED and chars and chars[0][0] == " ":  # 18 ignores spaces around a part
        chars = chars[1:]
    while _URI_SPACE_REFUSED and chars and chars[-1][0] == " ":
        chars = chars[:-1]
    raw = bytearray()
    i = 0
    while i < len(chars):
        char, index = chars[i]
        if char == "%":
            digits = "".join(c for c, _ in chars[i + 1:i + 3])
            if len(digits) != 2 or not all(c in string.hexdigits for c in digits):
                raise Refused('"%" is not followed by two hexadecimal digits', index, name)
            if int(digits, 16) == 0:
                raise Refused("%00 is not allowed", index, name)
            raw.append(int(digits, 16))
            i += 3
            continue
        if char == " " and _URI_SPACE_REFUSED:  # refused inside a part by libpq 18; older ones take it
            raise Refused("a space (write it %20)", index, name)
        raw += char.encode()
        i += 1
    return raw.decode("utf-8", "replace")
