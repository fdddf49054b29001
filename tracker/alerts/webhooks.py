"""Webhooks: every alert raised or cleared is POSTed as JSON to the configured URLs.

Delivery is at least once and survives restarts: `AlertEngine(outbox=True)` queues each event in
the Redis stream ``{prefix}:_alerts:outbox`` in the same script that stores it, and
`WebhookDispatcher` reads that stream through a consumer group, POSTs each event to every endpoint
that wants it, retries failures with exponential backoff (network errors, timeouts, 408, 425, 429
and 5xx; other 4xx are final), and only then acknowledges the entry. An endpoint that still fails
after `max_attempts` gets the delivery recorded in the dead-letter list ``{prefix}:_alerts:dead``.
Entries a crashed dispatcher had taken are claimed by another after `claim_idle_s`.

Each request carries (docs/alerts.md):

- ``Idempotency-Key``: the event's ``alert_id``, the same on every attempt and every redelivery;
- ``X-Tracker-Timestamp``: Unix seconds when this attempt was signed;
- ``X-Tracker-Signature``: ``sha256=`` + hex HMAC-SHA256 of ``"<timestamp>.<body>"`` under the
  endpoint's secret (`verify_signature` checks one);
- ``X-Tracker-Event`` (``alert.raised`` / ``alert.cleared``) and ``X-Tracker-Attempt`` (1, 2, ...).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import random
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import urlparse

import redis.asyncio

from tracker.config import ConfigError, load_dataclass
from tracker.context.schema import alert_dead_letter_key, alert_outbox_key, as_str, decode_hash

from .rule import AlertEvent

log = logging.getLogger(__name__)

GROUP = "webhooks"
SIGNATURE_HEADER = "X-Tracker-Signature"
TIMESTAMP_HEADER = "X-Tracker-Timestamp"
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504}) | frozenset(range(505, 600))


@dataclass
class WebhookEndpoint:
    """One receiver of alert events."""

    url: str = field(metadata={"help": "http(s) URL that receives a JSON POST per event"})
    secret_env: str = field(default="", metadata={"help": "environment variable holding the signing secret"})
    secret: str = field(default="", metadata={"help": "the signing secret itself (prefer secret_env)"})
    tenants: list[str] = field(default_factory=list, metadata={"help": "only these tenants' events; empty = all"})
    kinds: list[str] = field(default_factory=lambda: ["raised", "cleared"], metadata={"help": "raised and/or cleared"})

    def __post_init__(self) -> None:
        parsed = urlparse(self.url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ConfigError(f"url: must be an http:// or https:// URL, got {self.url!r}")
        if not self.secret and not self.secret_env:
            raise ConfigError("secret_env: every endpoint needs a signing secret (secret_env names the variable)")
        bad = [k for k in self.kinds if k not in ("raised", "cleared")]
        if bad or not self.kinds:
            raise ConfigError(f"kinds: must be a non-empty list of 'raised' and 'cleared', got {self.kinds!r}")

    def signing_secret(self) -> bytes:
        if self.secret:
            return self.secret.encode()
        value = os.environ.get(self.secret_env, "")
        if not value:
            raise ConfigError(f"secret_env: environment variable {self.secret_env} is not set (endpoint {self.url})")
        return value.encode()

    def wants(self, event: AlertEvent) -> bool:
        return event.kind in self.kinds and (not self.tenants or event.tenant in self.tenants)


@dataclass
class WebhookConfig:
    """Where alert events go and how hard the dispatcher tries."""

    endpoints: list[WebhookEndpoint] = field(default_factory=list, metadata={"help": "the receivers"})
    timeout_s: float = field(default=5.0, metadata={"help": "per request"})
    max_attempts: int = field(default=6, metadata={"help": "attempts per endpoint before the dead-letter list"})
    backoff_s: float = field(default=1.0, metadata={"help": "delay before the first retry; doubles, with jitter"})
    backoff_max_s: float = field(default=60.0, metadata={"help": "longest delay between attempts"})
    concurrency: int = field(default=16, metadata={"help": "events delivered at once"})
    dead_letter_max: int = field(default=10_000, metadata={"help": "dead letters kept (newest)"})

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ConfigError(f"timeout_s: must be > 0, got {self.timeout_s!r}")
        if self.max_attempts < 1:
            raise ConfigError(f"max_attempts: must be >= 1, got {self.max_attempts!r}")
        if self.backoff_s < 0 or self.backoff_max_s < self.backoff_s:
            raise ConfigError("backoff_s: must be >= 0 and <= backoff_max_s")
        if self.concurrency < 1 or self.dead_letter_max < 1:
            raise ConfigError("concurrency and dead_letter_max: must be >= 1")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "WebhookConfig":
        return load_dataclass(cls, data or {})

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt `attempt` (1-based): exponential with +-20% jitter."""
        base = min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1))
        if retry_after is not None:
            base = min(self.backoff_max_s, max(base, retry_after))
        return base * random.uniform(0.8, 1.2)

    @property
    def longest_delivery_s(self) -> float:
        """An upper bound on one event's delivery with every retry (for claiming a dead dispatcher's entries)."""
        waits = sum(min(self.backoff_max_s, self.backoff_s * 2 ** i) * 1.2 for i in range(self.max_attempts - 1))
        return self.max_attempts * self.timeout_s + waits


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The signature header's value: ``sha256=<hex HMAC-SHA256(secret, b"<timestamp>." + body)>``."""
    digest = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify_signature(secret: bytes | str, headers: Mapping[str, str], body: bytes, tolerance_s: float = 300,
                     now: float | None = None) -> bool:
    """What a receiver does: recompute the HMAC (constant-time compare) and refuse stale timestamps."""
    secret = secret.encode() if isinstance(secret, str) else secret
    lower = {k.lower(): v for k, v in headers.items()}
    try:
        timestamp = int(lower[TIMESTAMP_HEADER.lower()])
        given = lower[SIGNATURE_HEADER.lower()]
    except (KeyError, ValueError):
        return False
    if abs((now if now is not None else time.time()) - timestamp) > tolerance_s:
        return False
    return hmac.compare_digest(given, sign(secret, timestamp, body))


def event_body(event: AlertEvent) -> bytes:
    """The POST body: the same bytes on every attempt."""
    payload = {"type": f"alert.{event.kind}", "id": event.alert_id, "alert": event.to_dict()}
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass
class Delivery:
    """The outcome of delivering one event to one endpoint."""

    url: str
    alert_id: str
    ok: bool
    attempts: int
    status: int | None = None
    error: str = ""
    dead_lettered: bool = False


class WebhookDispatcher:
    """Delivers the outbox's events to the endpoints; run one or more (each its own consumer) per deployment."""

    def __init__(self, redis_client_or_url: "redis.asyncio.Redis | str", config: WebhookConfig, *,
                 key_prefix: str = "tracker", consumer: str | None = None, claim_idle_s: float | None = None) -> None:
        import httpx

        self.config = config
        self.redis = (redis.asyncio.Redis.from_url(redis_client_or_url) if isinstance(redis_client_or_url, str)
                      else redis_client_or_url)
        self._owns_redis = isinstance(redis_client_or_url, str)
        self.outbox = alert_outbox_key(key_prefix)
        self.dead_key = alert_dead_letter_key(key_prefix)
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.claim_idle_ms = int(1000 * (claim_idle_s if claim_idle_s is not None else config.longest_delivery_s + 30))
        self._secrets = {ep.url: ep.signing_secret() for ep in config.endpoints}  # a missing secret fails here
        self._http = httpx.AsyncClient(timeout=config.timeout_s, follow_redirects=False,
                                       headers={"User-Agent": "tracker-webhooks/1"})
        self._sem = asyncio.Semaphore(config.concurrency)
        self._group_ready = False
        self.stats = {"delivered": 0, "retries": 0, "dead_lettered": 0, "events": 0}

    # -- one event -------------------------------------------------------------------------

    async def deliver(self, event: AlertEvent) -> list[Delivery]:
        """POST `event` to every endpoint that wants it (in parallel), retrying; failures are dead-lettered."""
        endpoints = [ep for ep in self.config.endpoints if ep.wants(event)]
        results = await asyncio.gather(*(self._deliver_to(ep, event) for ep in endpoints))
        self.stats["events"] += 1
        return list(results)

    async def _deliver_to(self, endpoint: WebhookEndpoint, event: AlertEvent) -> Delivery:
        body = event_body(event)
        secret = self._secrets[endpoint.url]
        status, error = None, ""
        for attempt in range(1, self.config.max_attempts + 1):
            timestamp = int(time.time())
            headers = {"Content-Type": "application/json", "Idempotency-Key": event.alert_id,
                       "X-Tracker-Event": f"alert.{event.kind}", "X-Tracker-Attempt": str(attempt),
                       TIMESTAMP_HEADER: str(timestamp), SIGNATURE_HEADER: sign(secret, timestamp, body)}
            retry_after = None
            try:
                resp = await self._http.post(endpoint.url, content=body, headers=headers)
                status, error = resp.status_code, ""
                if 200 <= status < 300:
                    self.stats["delivered"] += 1
                    return Delivery(endpoint.url, event.alert_id, True, attempt, status)
                error = f"HTTP {status}"
                if status not in RETRY_STATUSES:
                    break  # the receiver refuses this request as it is: retrying will not help
                retry_after = _retry_after(resp.headers.get("Retry-After"))
            except Exception as exc:  # connection refused or reset, timeout, bad response
                status, error = None, f"{type(exc).__name__}: {exc}"[:300]
            if attempt < self.config.max_attempts:
                self.stats["retries"] += 1
                await asyncio.sleep(self.config.delay(attempt, retry_after))
        result = Delivery(endpoint.url, event.alert_id, False, attempt, status, error, dead_lettered=True)
        await self._dead_letter(event, result)
        return result

    async def _dead_letter(self, event: AlertEvent, result: Delivery) -> None:
        record = {"alert": event.to_dict(), "url": result.url, "idempotency_key": event.alert_id,
                  "attempts": result.attempts, "last_status": result.status, "last_error": result.error,
                  "failed_at_ms": int(time.time() * 1000)}
        log.warning("webhook %s: alert %s dead-lettered after %d attempt(s): %s", result.url, event.alert_id,
                    result.attempts, result.error)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.lpush(self.dead_key, json.dumps(record, separators=(",", ":")))
            pipe.ltrim(self.dead_key, 0, self.config.dead_letter_max - 1)
            await pipe.execute()
        self.stats["dead_lettered"] += 1

    async def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        """The failed deliveries, newest first."""
        return [json.loads(as_str(x)) for x in await self.redis.lrange(self.dead_key, 0, limit - 1)]

    # -- the outbox ------------------------------------------------------------------------

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:  # from the start of the outbox: events queued before the first dispatcher ran are delivered too
            await self.redis.xgroup_create(self.outbox, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def process_once(self, block_ms: int = 1000, count: int = 64) -> int:
        """Deliver a batch: entries abandoned by a dead dispatcher first, else new ones. Returns how many."""
        await self._ensure_group()
        claimed = await self.redis.xautoclaim(self.outbox, GROUP, self.consumer, self.claim_idle_ms, "0-0", count=count)
        entries = list(claimed[1]) if claimed and len(claimed) > 1 else []
        if not entries:
            reply = await self.redis.xreadgroup(GROUP, self.consumer, {self.outbox: ">"}, count=count,
                                                block=block_ms or None)
            entries = [e for _, stream_entries in (reply or []) for e in stream_entries]
        if entries:
            await asyncio.gather(*(self._process_entry(entry_id, fields) for entry_id, fields in entries))
        return len(entries)

    async def _process_entry(self, entry_id: Any, fields: Any) -> None:
        async with self._sem:
            if fields:  # an entry trimmed from the stream while pending comes back without fields
                try:
                    event = AlertEvent.from_fields(decode_hash(fields))
                except (KeyError, ValueError) as exc:
                    log.error("outbox entry %s is malformed (%s); dropped", as_str(entry_id), exc)
                else:
                    await self.deliver(event)
            await self.redis.xack(self.outbox, GROUP, entry_id)
            await self.redis.xdel(self.outbox, entry_id)

    async def run(self, stop: asyncio.Event | None = None, block_ms: int = 1000) -> None:
        """Deliver until `stop` is set; a Redis outage is waited out."""
        stop = stop or asyncio.Event()
        while not stop.is_set():
            try:
                await self.process_once(block_ms=block_ms)
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
                log.warning("webhook dispatcher: Redis unavailable (%s); retrying", type(exc).__name__)
                self._group_ready = False
                await asyncio.sleep(1.0)

    async def aclose(self) -> None:
        await self._http.aclose()
        if self._owns_redis:
            await self.redis.aclose()


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


__all__ = ["Delivery", "WebhookConfig", "WebhookDispatcher", "WebhookEndpoint", "event_body", "sign",
           "verify_signature"]
