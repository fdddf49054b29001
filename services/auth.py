"""API keys and tenants: creation, hashing at rest, lookup and revocation.

A key is ``trk_<key_id>_<secret>``: ``key_id`` (8 hex characters) is public and names the key in
``tracker keys list|revoke``; the secret is 32 random bytes (URL-safe base64). Only the SHA-256 of
the whole key is kept, in Redis (``{prefix}:_auth:key:<sha256>``) or in the serve config
(``auth.keys``). A lookup hashes the presented key and fetches that one record, so the time it
takes says nothing about stored keys; keys listed in the config are compared with
:func:`hmac.compare_digest`. Every key belongs to one tenant, and a tenant's conversations live in
its own Redis namespace (``{prefix}:{tenant}:...``), so nothing a key can name is another tenant's.

Redis keys (prefix ``tracker`` by default; tenant names cannot start with ``_``, so they never clash):

- ``{prefix}:_auth:key:<sha256>`` hash: ``key_id``, ``tenant``, ``name``, ``created_at``, ``revoked_at``
- ``{prefix}:_auth:ids`` hash: ``key_id`` -> ``sha256`` (for list and revoke)
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from tracker.config import ConfigError

KEY_RE = re.compile(r"^trk_([0-9a-f]{8})_([A-Za-z0-9_-]{43})$")
TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
from tracker.stream.protocol import SUBPROTOCOL  # noqa: E402  offered by browser clients next to "bearer.<key>"
BEARER_PROTOCOL_PREFIX = "bearer."


class AuthError(Exception):
    """The request carries no key, a malformed key, or a key that is unknown or revoked."""


def check_tenant(tenant: str) -> str:
    if not isinstance(tenant, str) or not TENANT_RE.match(tenant):
        raise ValueError(f"tenant {tenant!r}: use 1-64 letters, digits, '_', '.', '-', starting with a letter or digit")
    return tenant


def generate_key() -> str:
    """A new random API key (256 bits of secret)."""
    return f"trk_{secrets.token_hex(4)}_{secrets.token_urlsafe(32)}"


def hash_key(key: str) -> str:
    """What is stored: the hex SHA-256 of the key (the key has 256 random bits, so no salt is needed)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_id_of(key: str) -> str | None:
    m = KEY_RE.match(key)
    return m.group(1) if m else None


@dataclass
class ConfigKey:
    """A key listed in the serve config: only its SHA-256 (``tracker keys create --no-store`` prints one)."""

    sha256: str
    tenant: str
    name: str = ""

    def __post_init__(self) -> None:
        if not SHA256_RE.match(self.sha256):
            raise ConfigError(f"sha256: expected 64 lowercase hex characters, got {self.sha256[:70]!r}")
        try:
            check_tenant(self.tenant)
        except ValueError as exc:
            raise ConfigError(f"tenant: {exc}") from None


@dataclass
class AuthConfig:
    """``enabled: false`` turns authentication off (everything is tenant ``default``): never on a network."""

    enabled: bool = True
    keys: list[ConfigKey] = field(default_factory=list)


@dataclass(frozen=True)
class Principal:
    """Who a request is: the key's id and its tenant."""

    key_id: str
    tenant: str
    name: str = ""


ANONYMOUS = Principal(key_id="-", tenant="default", name="auth disabled")


def key_from_request(headers: Mapping[str, str], query: Mapping[str, str], subprotocols: Iterable[str] = ()) -> str | None:
    """The key a request presents: ``Authorization: Bearer``, ``X-API-Key``, a ``bearer.<key>``
    WebSocket subprotocol, or a ``token`` query parameter, in that order."""
    auth = headers.get("authorization") or ""
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    if headers.get("x-api-key"):
        return headers["x-api-key"].strip()
    for proto in subprotocols:
        if proto.startswith(BEARER_PROTOCOL_PREFIX):
            return proto[len(BEARER_PROTOCOL_PREFIX):]
    token = query.get("token")
    return token.strip() if token else None


class _KeysBase:
    def __init__(self, prefix: str = "tracker", config_keys: Iterable[ConfigKey] = ()) -> None:
        self.prefix = prefix
        self.config_keys = list(config_keys)

    def _key(self, digest: str) -> str:
        return f"{self.prefix}:_auth:key:{digest}"

    @property
    def _ids(self) -> str:
        return f"{self.prefix}:_auth:ids"

    def _from_config(self, digest: str) -> Principal | None:
        found = None
        for ck in self.config_keys:  # compare all, in constant time each
            if hmac.compare_digest(ck.sha256, digest):
                found = ck
        if found is None:
            return None
        return Principal(key_id=f"cfg-{found.sha256[:8]}", tenant=found.tenant, name=found.name)

    @staticmethod
    def _principal(raw: Mapping[Any, Any], digest: str) -> Principal:
        rec = {_s(k): _s(v) for k, v in raw.items()}
        if rec.get("revoked_at"):
            raise AuthError("this API key was revoked")
        if not hmac.compare_digest(rec.get("sha256", ""), digest):  # defence in depth: the record is the key's
            raise AuthError("unknown API key")
        return Principal(key_id=rec["key_id"], tenant=rec["tenant"], name=rec.get("name", ""))

    @staticmethod
    def _shape(key: str | None) -> str:
        if not key:
            raise AuthError("an API key is required (Authorization: Bearer <key>, X-API-Key, or ?token=)")
        if len(key) > 200 or not KEY_RE.match(key):
            raise AuthError("malformed API key")
        return hash_key(key)


def _s(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, (bytes, bytearray)) else str(v)


class KeyStore(_KeysBase):
    """Blocking key registry (the CLI and tests)."""

    def __init__(self, redis_client_or_url: Any, prefix: str = "tracker", config_keys: Iterable[ConfigKey] = ()) -> None:
        import redis

        super().__init__(prefix, config_keys)
        self.redis = redis.Redis.from_url(redis_client_or_url) if isinstance(redis_client_or_url, str) else redis_client_or_url

    def create(self, tenant: str, name: str = "") -> tuple[str, dict[str, str]]:
        """A new key for `tenant`; returns (the key, shown once; its stored record)."""
        check_tenant(tenant)
        key = generate_key()
        digest = hash_key(key)
        rec = {"key_id": key_id_of(key), "tenant": tenant, "name": name[:200], "created_at": str(int(time.time())),
               "sha256": digest}
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self._key(digest), mapping=rec)
        pipe.hset(self._ids, rec["key_id"], digest)
        pipe.execute()
        return key, rec

    def list(self) -> list[dict[str, str]]:
        ids = {_s(k): _s(v) for k, v in self.redis.hgetall(self._ids).items()}
        out = []
        for key_id, digest in sorted(ids.items()):
            raw = self.redis.hgetall(self._key(digest))
            if raw:
                out.append({_s(k): _s(v) for k, v in raw.items() if _s(k) != "sha256"})
        return sorted(out, key=lambda r: (r["tenant"], r["created_at"], r["key_id"]))

    def revoke(self, key_id: str) -> bool:
        """Mark a key revoked (kept for `list`); False if there is no such key id."""
        digest = self.redis.hget(self._ids, key_id)
        if digest is None:
            return False
        self.redis.hset(self._key(_s(digest)), "revoked_at", str(int(time.time())))
        return True

    def verify(self, key: str) -> bool:
        try:
            self.authenticate(key)
            return True
        except AuthError:
            return False

    def authenticate(self, key: str | None) -> Principal:
        digest = self._shape(key)
        p = self._from_config(digest)
        if p is not None:
            return p
        raw = self.redis.hgetall(self._key(digest))
        if not raw:
            raise AuthError("unknown API key")
        return self._principal(raw, digest)


class AsyncKeyStore(_KeysBase):
    """Key lookups for the ingress (redis.asyncio); one Redis round trip per authentication."""

    def __init__(self, redis_url: str, prefix: str = "tracker", config_keys: Iterable[ConfigKey] = (),
                 retry_seconds: float = 5.0) -> None:
        import redis.asyncio

        super().__init__(prefix, config_keys)
        self.redis = redis.asyncio.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=2)
        self.retry_seconds = retry_seconds

    async def authenticate(self, key: str | None) -> Principal:
        """The key's principal; AuthError if refused; redis errors once Redis stays down `retry_seconds`."""
        import asyncio

        import redis

        digest = self._shape(key)
        p = self._from_config(digest)
        if p is not None:
            return p
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.05
        while True:
            try:
                raw = await self.redis.hgetall(self._key(digest))
                break
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)
        if not raw:
            raise AuthError("unknown API key")
        return self._principal(raw, digest)
