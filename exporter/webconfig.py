"""--web.config.file: TLS and basic auth, in the exporter-toolkit format Prometheus users know.

    tls_server_config:
      cert_file: server.crt
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert   # or VerifyClientCertIfGiven, NoClientCert
      client_ca_file: ca.crt
      min_version: TLS12
    basic_auth_users:
      prometheus: $2y$10$...                          # bcrypt hashes
"""

from __future__ import annotations

import base64
import enum
import hashlib
import os
import ssl
import threading
from dataclasses import dataclass, field
from typing import Any

import bcrypt

from .config import ConfigError, load_yaml_text, unknown_fields

_TOP_FIELDS = ("tls_server_config", "basic_auth_users", "http_server_config")
_TLS_FIELDS = ("cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version", "max_version")
CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}


class AuthBusy(Exception):
    """A password check is already running: this request is answered 429, not queued for long."""


# How long a request may wait for the one bcrypt check at a time before it is answered 429.
CHECK_QUEUE_SECONDS = 0.25

# bcrypt reads at most 72 bytes of a password: bcrypt 5 raises ValueError beyond that, and older
# versions ignored the rest, so a longer password matched on its first 72 bytes. A longer password
# is simply a wrong one (401, as exporter-toolkit answers every failed check), before any bcrypt.
BCRYPT_MAX_PASSWORD_BYTES = 72


def bcrypt_cost(hashed: bytes) -> int:
    """The cost (log2 rounds) a bcrypt hash was made with: $2b$10$... -> 10."""
    return int(hashed.split(b"$")[2])


@dataclass
class BasicAuth:
    """Checks user:password against bcrypt hashes; a good pair is remembered (as a digest), so
    bcrypt's deliberate slowness is paid once per client, not once per scrape.

    An unknown user's password is checked against a dummy hash of the highest cost among the
    configured ones, so the time of a refusal does not tell users apart. Beyond the remembered
    pairs, one bcrypt check runs at a time: a flood of bad logins costs at most one core of bcrypt,
    and the requests that cannot get a turn soon are answered 429, so polls and authorised scrapes
    keep their pace on a sidecar that shares the database's node.
    """

    users: dict[str, bytes]
    _good: set[bytes] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _one_check: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(1))
    dummy_hash: bytes = b""
    bcrypt_checks: int = 0  # how many bcrypt checks ran (the remembered pairs need none)

    def __post_init__(self) -> None:
        cost = max((bcrypt_cost(hashed) for hashed in self.users.values()), default=10)
        self.dummy_hash = bcrypt.hashpw(b"not a password", bcrypt.gensalt(rounds=cost))

    def check(self, user: str, password: str) -> bool:
        """Whether user:password is good; AuthBusy when no bcrypt turn came within CHECK_QUEUE_SECONDS."""
        secret = password.encode()
        if len(secret) > BCRYPT_MAX_PASSWORD_BYTES:
            return False  # the same answer for every user, so it tells none apart
        digest = hashlib.sha256(f"{user}\0{password}".encode()).digest()
        with self._lock:
            if digest in self._good:
                return True
        hashed = self.users.get(user)
        if not self._one_check.acquire(timeout=CHECK_QUEUE_SECONDS):
            raise AuthBusy("a password check is already running")
        try:
            self.bcrypt_checks += 1
            ok = bcrypt.checkpw(secret, hashed or self.dummy_hash) and hashed is not None
        finally:
            self._one_check.release()
        if ok:
            with self._lock:
                self._good.add(digest)
        return ok


@dataclass(frozen=True)
class WebConfig:
    tls: ssl.SSLContext | None = None
    auth: BasicAuth | None = None


def parse_basic_auth(header: str) -> tuple[str, str] | None:
    """'Basic dXNlcjpwdw==' -> ('user', 'pw'); None for another scheme or undecodable credentials.

    The password may hold ':' (only the first one ends the user name, RFC 7617).
    """
    if not header.startswith("Basic "):
        return None
    try:
        decoded = base64.b64decode(header[6:], validate=True).decode()
    except ValueError:  # not base64 (binascii.Error), not ASCII, or not UTF-8 (UnicodeDecodeError)
        return None
    user, _, password = decoded.partition(":")
    return user, password


class Decision(enum.Enum):
    """What basic auth says of a request."""

    OK = "ok"
    UNAUTHORIZED = "401"  # no, unknown or wrong credentials
    BUSY = "429"  # no bcrypt turn soon enough (AuthBusy): try again in a second


def authorize(auth: BasicAuth | None, header: str) -> Decision:
    """The Authorization header against the configured users (every request passes without any)."""
    if auth is None:
        return Decision.OK
    credentials = parse_basic_auth(header)
    if credentials is None or not credentials[0]:
        return Decision.UNAUTHORIZED
    try:
        return Decision.OK if auth.check(*credentials) else Decision.UNAUTHORIZED
    except AuthBusy:
        return Decision.BUSY


def _tls(data: Any, base: str, errors: list[str]) -> ssl.SSLContext | None:
    if not isinstance(data, dict):
        errors.append("tls_server_config: expected a mapping")
        return None
    errors.extend(unknown_fields(data, _TLS_FIELDS, "tls_server_config"))
    paths = {}
    for name in ("cert_file", "key_file", "client_ca_file"):
        value = data.get(name)
        if value is None:
            continue
        path = os.path.join(base, value) if isinstance(value, str) else ""
        if not isinstance(value, str) or not os.access(path, os.R_OK):
            errors.append(f"tls_server_config.{name}: cannot read {value!r}")
        else:
            paths[name] = path
    for name in ("cert_file", "key_file"):
        if name not in data:
            errors.append(f"tls_server_config.{name}: required")
    auth_type = data.get("client_auth_type", "NoClientCert")
    if auth_type not in CLIENT_AUTH:
        errors.append(f"tls_server_config.client_auth_type: {auth_type!r} is not one of {', '.join(CLIENT_AUTH)}")
    elif auth_type != "NoClientCert" and "client_ca_file" not in data:
        errors.append(f"tls_server_config.client_ca_file: required with client_auth_type {auth_type}")
    versions = {}
    for name in ("min_version", "max_version"):
        if name in data:
            if data[name] not in TLS_VERSIONS:
                errors.append(f"tls_server_config.{name}: {data[name]!r} is not one of {', '.join(TLS_VERSIONS)}")
            else:
                versions[name] = TLS_VERSIONS[data[name]]
    if errors:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = versions.get("min_version", ssl.TLSVersion.TLSv1_2)
    if "max_version" in versions:
        context.maximum_version = versions["max_version"]
    try:
        context.load_cert_chain(paths["cert_file"], paths["key_file"])
    except (ssl.SSLError, OSError) as exc:
        errors.append(f"tls_server_config.cert_file: cannot load the certificate and key: {exc}")
        return None
    context.verify_mode = CLIENT_AUTH[auth_type]
    if "client_ca_file" in paths:
        try:
            context.load_verify_locations(paths["client_ca_file"])
        except (ssl.SSLError, OSError) as exc:
            errors.append(f"tls_server_config.client_ca_file: cannot load: {exc}")
            return None
    return context


def _users(data: Any, errors: list[str]) -> BasicAuth | None:
    if not isinstance(data, dict) or not data:
        errors.append("basic_auth_users: expected a mapping of user names to bcrypt hashes")
        return None
    users = {}
    for user, hashed in data.items():
        if not isinstance(hashed, str) or not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            errors.append(f"basic_auth_users.{user}: expected a bcrypt hash ($2y$...)")
            continue
        # bcrypt the library knows $2a$ and $2b$; $2y$ (htpasswd's) is the same algorithm.
        users[str(user)] = ("$2b$" + hashed[4:]).encode()
    return BasicAuth(users) if not errors else None


def load_web_config(path: str) -> WebConfig:
    """Read and check a web config file; ConfigError lists every problem."""
    try:
        with open(path, "rb") as handle:
            data = load_yaml_text(handle.read(), path)
    except OSError as exc:
        raise ConfigError(path, [f"cannot read: {exc.strerror or exc}"]) from None
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(path, ["expected a mapping at the top level"])
    errors = unknown_fields(data, _TOP_FIELDS, "")
    base = os.path.dirname(os.path.abspath(path))
    tls = _tls(data["tls_server_config"], base, errors) if "tls_server_config" in data else None
    auth = _users(data["basic_auth_users"], errors) if "basic_auth_users" in data else None
    if errors:
        raise ConfigError(path, errors)
    return WebConfig(tls=tls, auth=auth)

