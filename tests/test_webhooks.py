"""Webhook delivery of alert events to real local HTTP receivers: signed, idempotent, retried, dead-lettered."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import free_port
from tracker.alerts import (AlertEngine, EscalationConfig, WebhookConfig, WebhookDispatcher, WebhookEndpoint,
                            verify_signature)
from tracker.config import ConfigError
from tracker.context import StoreConfig
from tracker.context.schema import alert_outbox_key
from tracker.context.store import AsyncConversationStore
from tracker.labels import MELD7

SECRET = "s3cret-for-tests"


class Receiver:
    """A real HTTP server on 127.0.0.1 that records every request and answers from a script of statuses."""

    def __init__(self, statuses: list[int] | None = None, then: int = 200) -> None:
        self.statuses, self.then = list(statuses or []), then
        self.requests: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.requests.append({"headers": dict(self.headers), "body": body, "at": time.monotonic()})
                status = receiver.statuses.pop(0) if receiver.statuses else receiver.then
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def receivers():
    made: list[Receiver] = []

    def make(*args, **kwargs) -> Receiver:
        made.append(Receiver(*args, **kwargs))
        return made[-1]

    yield make
    for r in made:
        r.close()


def config(*urls: str, **kw) -> WebhookConfig:
    kw = {"max_attempts": 4, "backoff_s": 0.2, "backoff_max_s": 1.0, "timeout_s": 2.0, **kw}
    return WebhookConfig(endpoints=[WebhookEndpoint(url=u, secret=SECRET) for u in urls], **kw)


async def raise_and_clear(redis_url: str, prefix: str, cid: str = "call-7", tenant: str = "default"):
    """Commit anger, anger (raised), joy, joy (cleared) for a customer; the engine queues both events."""
    async with AsyncConversationStore(redis_url, StoreConfig(key_prefix=prefix), MELD7, tenant=tenant) as store:
        engine = AlertEngine(store, EscalationConfig(window=2, raise_at=2, clear_at=0), outbox=True)
        events = []
        for i, label in enumerate(["anger", "anger", "joy", "joy"]):
            await store.append(cid, {"utterance_id": f"u{i}", "speaker": "Customer", "start_ms": i * 1000,
                                     "end_ms": i * 1000 + 500, "text": "...", "label": label, "is_final": True})
            events += await engine.on_final_committed({**await store.get_final(cid, f"u{i}"), "conversation_id": cid})
        return events


async def drain(dispatcher: WebhookDispatcher, rounds: int = 3) -> None:
    for _ in range(rounds):
        await dispatcher.process_once(block_ms=50)


def test_each_alert_raised_and_cleared_is_posted_once_signed_with_its_idempotency_key(redis_server, receivers):
    prefix = f"w{uuid.uuid4().hex[:6]}"
    hook = receivers()

    async def go():
        events = await raise_and_clear(redis_server.url, prefix)
        d = WebhookDispatcher(redis_server.url, config(hook.url), key_prefix=prefix)
        try:
            await drain(d)
            assert await d.redis.xlen(alert_outbox_key(prefix)) == 0  # acknowledged and removed
            assert await d.dead_letters() == []
        finally:
            await d.aclose()
        return events

    events = asyncio.run(go())
    assert [e.kind for e in events] == ["raised", "cleared"]
    assert len(hook.requests) == 2
    for req, event in zip(sorted(hook.requests, key=lambda r: json.loads(r["body"])["alert"]["seq"]), events):
        h, body = req["headers"], req["body"]
        assert verify_signature(SECRET, h, body)
        assert not verify_signature("another secret", h, body)
        assert not verify_signature(SECRET, h, body + b" ")
        assert h["Idempotency-Key"] == event.alert_id and h["X-Tracker-Event"] == f"alert.{event.kind}"
        payload = json.loads(body)
        assert payload == {"type": f"alert.{event.kind}", "id": event.alert_id, "alert": event.to_dict()}
        assert payload["alert"]["speaker"] == "Customer" and payload["alert"]["conversation_id"] == "call-7"


def test_a_receiver_that_fails_twice_gets_the_same_request_a_third_time_after_backing_off(redis_server, receivers):
    prefix = f"w{uuid.uuid4().hex[:6]}"
    flaky = receivers([500, 503])
    steady = receivers()

    async def go():
        await raise_and_clear(redis_server.url, prefix)
        cfg = config(flaky.url, steady.url, backoff_s=0.3)
        cfg.endpoints[0].kinds = ["raised"]  # the flaky receiver takes one event: its three attempts are in order
        d = WebhookDispatcher(redis_server.url, cfg, key_prefix=prefix)
        try:
            await d.process_once(block_ms=50)  # takes both events; the flaky endpoint's retries happen inside
            assert await d.dead_letters() == []
            return dict(d.stats)
        finally:
            await d.aclose()

    stats = asyncio.run(go())
    assert len(steady.requests) == 2
    retried = flaky.requests  # 500, 503, then 200
    assert len(retried) == 3 and len({r["headers"]["Idempotency-Key"] for r in retried}) == 1
    assert [r["headers"]["X-Tracker-Attempt"] for r in retried] == ["1", "2", "3"]
    assert len({r["body"] for r in retried}) == 1  # the same bytes each time
    gaps = [b["at"] - a["at"] for a, b in zip(retried, retried[1:])]
    assert gaps[0] >= 0.3 * 0.8 and gaps[1] >= 0.6 * 0.8  # exponential backoff (with jitter)
    assert all(verify_signature(SECRET, r["headers"], r["body"]) for r in retried)
    assert stats["retries"] == 2 and stats["delivered"] == 3 and stats["dead_lettered"] == 0


def test_deliveries_that_keep_failing_or_are_refused_go_to_the_dead_letter_list(redis_server, receivers):
    prefix = f"w{uuid.uuid4().hex[:6]}"
    down = receivers(then=500)
    refusing = receivers(then=400)
    nobody = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens: connection refused

    async def go():
        events = await raise_and_clear(redis_server.url, prefix)
        d = WebhookDispatcher(redis_server.url, config(down.url, refusing.url, nobody, max_attempts=3, backoff_s=0.05),
                              key_prefix=prefix)
        try:
            await drain(d)
            assert await d.redis.xlen(alert_outbox_key(prefix)) == 0
            return events, await d.dead_letters()
        finally:
            await d.aclose()

    events, dead = asyncio.run(go())
    assert len(dead) == 6  # 2 events x 3 endpoints
    by_url = {}
    for rec in dead:
        by_url.setdefault(rec["url"], []).append(rec)
    assert {r["attempts"] for r in by_url[down.url]} == {3} and {r["last_status"] for r in by_url[down.url]} == {500}
    assert {r["attempts"] for r in by_url[refusing.url]} == {1}  # a 400 is final: no retry
    assert {r["attempts"] for r in by_url[nobody]} == {3} and all("Connect" in r["last_error"] for r in by_url[nobody])
    assert {r["idempotency_key"] for r in by_url[down.url]} == {e.alert_id for e in events}
    assert len(down.requests) == 6 and len(refusing.requests) == 2


def test_events_taken_by_a_dispatcher_that_died_are_delivered_by_another(redis_server, receivers):
    prefix = f"w{uuid.uuid4().hex[:6]}"
    hook = receivers()

    async def go():
        await raise_and_clear(redis_server.url, prefix)
        dead = WebhookDispatcher(redis_server.url, config(hook.url), key_prefix=prefix, consumer="crashed")
        await dead._ensure_group()
        taken = await dead.redis.xreadgroup("webhooks", "crashed", {alert_outbox_key(prefix): ">"}, count=10)
        assert len(taken[0][1]) == 2  # read, never acknowledged: the process "died" here
        await dead.aclose()
        assert len(hook.requests) == 0
        other = WebhookDispatcher(redis_server.url, config(hook.url), key_prefix=prefix, consumer="other",
                                  claim_idle_s=0.2)
        try:
            assert await other.process_once(block_ms=50) == 0  # not idle long enough yet: still the first's
            await asyncio.sleep(0.3)
            assert await other.process_once(block_ms=50) == 2
            assert await other.redis.xpending(alert_outbox_key(prefix), "webhooks") == {
                "pending": 0, "min": None, "max": None, "consumers": []}
        finally:
            await other.aclose()

    asyncio.run(go())
    assert len(hook.requests) == 2


def test_endpoints_filter_by_tenant_and_kind(redis_server, receivers):
    prefix = f"w{uuid.uuid4().hex[:6]}"
    only_b_raised = receivers()
    cfg = WebhookConfig(endpoints=[WebhookEndpoint(url=only_b_raised.url, secret=SECRET, tenants=["b"], kinds=["raised"])],
                        backoff_s=0.05)

    async def go():
        await raise_and_clear(redis_server.url, prefix, tenant="a")
        await raise_and_clear(redis_server.url, prefix, tenant="b")
        d = WebhookDispatcher(redis_server.url, cfg, key_prefix=prefix)
        try:
            await drain(d)
        finally:
            await d.aclose()

    asyncio.run(go())
    assert [json.loads(r["body"])["alert"]["tenant"] for r in only_b_raised.requests] == ["b"]
    assert json.loads(only_b_raised.requests[0]["body"])["type"] == "alert.raised"


def test_webhook_config_errors_name_the_field(monkeypatch):
    with pytest.raises(ConfigError, match="url"):
        WebhookEndpoint(url="ftp://x", secret="s")
    with pytest.raises(ConfigError, match="secret_env"):
        WebhookEndpoint(url="http://127.0.0.1:1/h")
    with pytest.raises(ConfigError, match="endpoints\\[0\\].kinds"):
        WebhookConfig.from_dict({"endpoints": [{"url": "http://127.0.0.1:1/h", "secret": "s", "kinds": ["opened"]}]})
    ep = WebhookEndpoint(url="http://127.0.0.1:1/h", secret_env="TRACKER_TEST_HOOK_SECRET")
    monkeypatch.delenv("TRACKER_TEST_HOOK_SECRET", raising=False)
    with pytest.raises(ConfigError, match="TRACKER_TEST_HOOK_SECRET is not set"):
        WebhookDispatcher("redis://127.0.0.1:1/0", WebhookConfig(endpoints=[ep]))
