"""Alerts and metrics of the live service, end to end: real Ray Serve, Redis, HTTP and Prometheus.

A tiny model trained to label known sentences `anger` or `neutral` (tests/labelled_model.py) is
served with the escalation rule watching the Customer only, a webhook endpoint (a local HTTP
receiver that refuses each event's first attempt with 503) and Ray's metrics export port. A call
is streamed over /v1/stream while /v1/watch follows it; the test checks that the alert is raised
and cleared on both, stored in Redis, POSTed signed to the receiver, and counted in the metrics.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import free_port, start_test_service
from tests.labelled_model import ANGRY, CALM, train_anger_neutral

pytestmark = [pytest.mark.service, pytest.mark.timeout(900)]

SPEAKERS = ["Customer", "Agent"]
SECRET = "whsec-test-0123456789"
# (speaker, text, Customer's alert after it): three angry Customer finals raise it (the Agent's are
# not watched); 3 and 2 of the last 4 keep it up; it clears at 1 of 4.
STEPS = [
    ("Agent", CALM[2], False),
    ("Customer", ANGRY[0], False),
    ("Agent", ANGRY[5], False),  # an angry agent: not watched
    ("Customer", ANGRY[1], False),
    ("Customer", ANGRY[2], True),  # raised
    ("Agent", ANGRY[3], True),
    ("Customer", CALM[0], True),
    ("Customer", CALM[1], True),
    ("Customer", CALM[4], False),  # cleared
    ("Agent", CALM[0], False),
]
RAISE_AT, CLEAR_AT = 4, 8


class Receiver:
    """A webhook receiver on loopback: records every POST; the first attempt of each event gets 503."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with outer.lock:
                    key = self.headers.get("Idempotency-Key")
                    first = not any(r["key"] == key for r in outer.requests)
                    outer.requests.append({"key": key, "headers": dict(self.headers.items()), "body": body,
                                           "status": 503 if first else 200})
                self.send_response(503 if first else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/tracker"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def accepted(self) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if r["status"] == 200]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_backbone, receiver):
    ckpt = train_anger_neutral(tmp_path_factory.mktemp("alerts-train"), tiny_backbone, SPEAKERS, name="alerts")
    svc = start_test_service(ckpt, {
        "alerts": {"speakers": ["Customer"]},
        "webhooks": {"endpoints": [{"url": receiver.url, "secret": SECRET}], "backoff_s": 0.2, "backoff_max_s": 1.0},
    }, metrics_port=free_port())
    yield svc
    svc.stop()


def connect(url: str, headers: dict):
    from websockets.sync.client import connect as ws_connect

    return ws_connect(url, open_timeout=30, additional_headers=headers).__enter__()


def stream_call(service, cid: str, steps, watch_messages: list | None = None) -> list[dict]:
    """Stream `steps` as text `utterance` events (each waits for its final); every message received, in order."""
    ws = connect(service.ws_url, service.auth_headers)
    out: list[dict] = []
    ws.send(json.dumps({"type": "start", "conversation_id": cid, "sample_rate": 16000, "channels": 2,
                        "speakers": SPEAKERS}))
    out.append(json.loads(ws.recv(timeout=30)))
    assert out[0]["type"] == "started", out[0]
    clock = 0
    for i, (speaker, text, *_) in enumerate(steps):
        start, clock = clock + 400, clock + 400 + 300 * len(text.split())
        ws.send(json.dumps({"type": "utterance", "utterance_id": f"{cid}-{i}", "speaker": speaker, "text": text,
                            "start_ms": start, "end_ms": clock}))
        while True:
            msg = json.loads(ws.recv(timeout=60))
            out.append(msg)
            if msg["type"] == "utterance" and msg["utterance_id"] == f"{cid}-{i}":
                break
    ws.send(json.dumps({"type": "stop"}))
    while True:
        msg = json.loads(ws.recv(timeout=60))
        out.append(msg)
        if msg["type"] == "stopped":
            break
    ws.close()
    return out


def test_alerts_are_raised_and_cleared_on_the_stream_and_the_watch_stored_in_redis_and_posted_signed(service, receiver):
    import urllib.request

    from tracker.alerts import verify_signature
    from tracker.context.schema import Keys, alert_dead_letter_key, alert_outbox_key
    import redis

    cid = f"alerts-{uuid.uuid4().hex[:8]}"
    # the dashboard's view of the rule is the server's
    req = urllib.request.Request(f"{service.http_url}/v1/dashboard/config", headers=service.auth_headers)
    rule = json.loads(urllib.request.urlopen(req, timeout=30).read())["alert"]
    assert rule == {"k": 3, "m": 4, "clear": 1, "speakers": ["Customer"], "enabled": True,
                    "negative": ["anger", "disgust", "fear", "sadness"]}

    # a watcher follows the call from before it starts
    watched: list[dict] = []
    watch = connect(f"{service.http_url.replace('http', 'ws')}/v1/watch?conversation_id={cid}", service.auth_headers)

    def follow():
        try:
            while True:
                watched.append(json.loads(watch.recv(timeout=120)))
        except Exception:
            pass

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    messages = stream_call(service, cid, STEPS)

    # the stream: each alert right after the result of the final that changed it
    results = [m for m in messages if m["type"] == "utterance"]
    assert [r["label"] for r in results] == [("anger" if t in ANGRY else "neutral") for _, t, _ in STEPS]
    kinds = [(m["type"], m.get("utterance_id"), m.get("kind")) for m in messages if m["type"] in ("utterance", "alert")]
    raised_at = kinds.index(("utterance", f"{cid}-{RAISE_AT}", None))
    cleared_at = kinds.index(("utterance", f"{cid}-{CLEAR_AT}", None))
    assert kinds[raised_at + 1] == ("alert", f"{cid}-{RAISE_AT}", "raised")
    assert kinds[cleared_at + 1] == ("alert", f"{cid}-{CLEAR_AT}", "cleared")
    alerts = [m for m in messages if m["type"] == "alert"]
    assert len(alerts) == 2 and all(a["speaker"] == "Customer" and a["conversation_id"] == cid for a in alerts)
    assert alerts[0]["labels"] == ["anger", "anger", "anger"] and alerts[0]["negative"] == 3
    assert alerts[1]["labels"] == ["anger", "neutral", "neutral", "neutral"] and alerts[1]["negative"] == 1
    assert [m["type"] for m in messages].count("error") == 0

    # /v1/watch: the same events (same ids), after the same results
    deadline = time.time() + 30
    while time.time() < deadline and sum(m["type"] == "alert" for m in watched) < 2:
        time.sleep(0.2)
    watch.close()
    follower.join(timeout=10)
    w_alerts = [m for m in watched if m["type"] == "alert"]
    assert [(a["alert_id"], a["kind"], a["entry_id"]) for a in w_alerts] == [
        (a["alert_id"], a["kind"], a["entry_id"]) for a in alerts]
    w_ids = [m.get("utterance_id") for m in watched if m["type"] == "utterance"]
    assert w_ids == [f"{cid}-{i}" for i in range(len(STEPS))]

    # Redis: the conversation's alert stream holds the two events
    r = redis.Redis.from_url(service.redis_url, decode_responses=True)
    stored = r.xrange(Keys("tracker", "default").alerts(cid))
    assert [(f["kind"], f["utterance_id"], f["alert_id"]) for _, f in stored] == [
        (a["kind"], a["utterance_id"], a["alert_id"]) for a in alerts]

    # the webhook: one accepted, signed POST per event (after one refused attempt each), then an empty outbox
    deadline = time.time() + 60
    while time.time() < deadline and len({q["key"] for q in receiver.accepted()} & {a["alert_id"] for a in alerts}) < 2:
        time.sleep(0.2)
    mine = [q for q in receiver.requests if q["key"] in {a["alert_id"] for a in alerts}]
    accepted = [q for q in mine if q["status"] == 200]
    assert [q["key"] for q in accepted] == [a["alert_id"] for a in alerts]
    assert len(mine) == 4  # each refused once (503), then delivered
    for q, a in zip(accepted, alerts):
        assert verify_signature(SECRET, q["headers"], q["body"])
        assert not verify_signature("another secret", q["headers"], q["body"])
        body = json.loads(q["body"])
        assert body["type"] == f"alert.{a['kind']}" and body["id"] == a["alert_id"]
        assert body["alert"]["conversation_id"] == cid and body["alert"]["tenant"] == "default"
        assert q["headers"]["X-Tracker-Attempt"] == "2"
    deadline = time.time() + 20
    while time.time() < deadline and r.xlen(alert_outbox_key("tracker")):
        time.sleep(0.2)
    assert r.xlen(alert_outbox_key("tracker")) == 0 and r.llen(alert_dead_letter_key("tracker")) == 0


def test_metrics_are_scraped_from_the_ray_metrics_port_with_counts_matching_the_calls(service):
    """After a call (and whatever else this module's service did), the scraped totals equal what
    Redis holds: utterances labelled == utterances stored, alerts raised == raised events stored."""
    import redis

    from services.metrics import scrape
    from tracker.context.schema import Keys

    url = service.metrics_url
    assert url and url.endswith("/metrics")
    cid = f"metrics-{uuid.uuid4().hex[:8]}"
    steps = [("Customer", ANGRY[i % 3], None) for i in range(4)] + [("Agent", CALM[1], None)]
    messages = stream_call(service, cid, steps)
    assert sum(m["type"] == "utterance" for m in messages) == len(steps)
    assert [m["kind"] for m in messages if m["type"] == "alert"] == ["raised"]
    ws = connect(service.ws_url, service.auth_headers)  # one error on the wire: 4001 unknown message type
    ws.send(json.dumps({"type": "hello"}))
    assert json.loads(ws.recv(timeout=30))["code"] == 4001
    ws.close()

    # what this service stored, from Redis: every conversation's finals and raised alerts
    r = redis.Redis.from_url(service.redis_url, decode_responses=True)
    keys = Keys("tracker", "default")
    cids = r.zrange(keys.conversations, 0, -1)
    assert cid in cids
    finals = sum(int(r.hget(keys.meta(c), "n_final") or 0) for c in cids)
    raised = sum(f["kind"] == "raised" for c in cids for _, f in r.xrange(keys.alerts(c)))
    assert finals >= len(steps) and raised >= 1

    want = {
        "tracker_utterances_labelled_total{final=true}": finals,
        "tracker_final_latency_seconds_count": finals,  # each final sent once on its stream
        "tracker_alerts_total{kind=raised}": raised,
        "tracker_errors_total{code=4001}": 1,
    }
    deadline = time.time() + 120  # Ray's agent exports every few seconds
    while True:
        now = scrape(url)
        got = {k: now.get(k, 0.0) for k in want}
        delivered = now.get("tracker_webhook_deliveries_total{outcome=delivered}", 0.0)
        if (got == want and delivered >= raised) or time.time() > deadline:
            break
        time.sleep(2)
    assert got == want, (got, {k: v for k, v in now.items() if "_bucket" not in k})
    assert delivered >= raised  # each raised alert went out as a webhook (the cleared ones too)
    forwards = now.get("tracker_model_seconds_count{stage=label}", 0.0)
    assert 1 <= forwards <= finals  # one per batch
    assert now.get("tracker_model_batch_size_count") == forwards  # (Ray's histogram _sum is from bucket midpoints)
    assert "tracker_queue_depth{stage=model}" in now and "tracker_queue_depth{stage=session}" in now
    # every final's latency fell into a bucket: the +Inf bucket counts them all
    assert now.get("tracker_final_latency_seconds_bucket{le=+Inf}") == finals
