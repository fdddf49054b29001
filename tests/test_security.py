"""Keys, tenants, limits and hostile input against the real service (Ray Serve, Redis, a tiny model).

Each test makes its own tenants and keys with the key registry (`KeyStore`, what `tracker keys`
uses), so tests share one service without seeing each other's conversations.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid

import httpx
import pytest
import redis
import websockets

from tracker.stream import protocol as P
from services.auth import KeyStore, generate_key
from tracker.stream.session import SessionLimits
from tests.conftest import start_test_service, save_tiny_checkpoint
from tests.fuzzgen import fatal_case, hostile_text

pytestmark = [pytest.mark.service, pytest.mark.timeout(600)]

LIMITS = {"max_messages_per_second": 50.0, "message_burst": 1500, "max_streams_per_key": 12, "max_watches_per_key": 12,
          "max_conversations_per_tenant": 5, "max_text_frame_chars": 700_000, "max_utterance_audio_bytes": 400_000,
          "max_utterance_chars": 2000}


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_backbone):
    ckpt = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_tiny_checkpoint(tiny_backbone, ckpt, seed=0)
    svc = start_test_service(ckpt, limits=LIMITS)
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def keys(service):
    store = KeyStore(service.redis_url)
    yield store
    store.redis.close()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def run(coro):
    return asyncio.run(coro)


async def drain(ws, until: str | None = None, timeout: float = 60) -> list[dict]:
    """Messages until `until` arrives or the server closes."""
    out: list[dict] = []

    async def loop():
        async for raw in ws:
            msg = json.loads(raw)
            out.append(msg)
            if until and msg.get("type") == until:
                return

    try:
        await asyncio.wait_for(loop(), timeout)
    except websockets.ConnectionClosed:
        pass
    return out


async def converse(url: str, headers: dict, cid: str, texts: list[str], resume: bool = False, speaker: str = "A",
                   prefix: str = "u") -> list[dict]:
    """A well-formed text-only conversation: start, one `utterance` per text, stop; every message back
    (on `resume`, the stored results the server re-sends first come back too)."""
    async with websockets.connect(url, additional_headers=headers) as ws:
        await ws.send(json.dumps({"type": "start", "conversation_id": cid, "speakers": [speaker], "resume": resume}))
        for i, text in enumerate(texts):
            await ws.send(json.dumps({"type": "utterance", "speaker": speaker, "text": text, "utterance_id": f"{prefix}{i}",
                                      "start_ms": 1000 * i, "end_ms": 1000 * i + 800}))
        await ws.send(json.dumps({"type": "stop"}))
        return await drain(ws, until="stopped")


def stream_len(service, tenant: str, cid: str) -> int:
    raw = redis.Redis.from_url(service.redis_url)
    try:
        return raw.xlen(f"tracker:{tenant}:conv:{cid}:stream")
    finally:
        raw.close()


# ------------------------------------------------------------------------------------ authentication


def test_every_data_route_needs_a_valid_key_and_health_is_public(service, keys):
    key, rec = keys.create("auth-t", name="test")
    revoked, rrec = keys.create("auth-t", name="to revoke")
    assert keys.revoke(rrec["key_id"])
    base = service.http_url
    refused = {"none": {}, "malformed": bearer("not-a-key"), "unknown": bearer(generate_key()),
               "revoked": bearer(revoked), "basic": {"Authorization": "Basic dXNlcjpwdw=="}}
    for path in ("/v1/conversations", "/v1/conversations/x", "/v1/conversations/x/export", "/v1/dashboard/config"):
        for why, headers in refused.items():
            r = httpx.get(base + path, headers=headers, timeout=30)
            assert r.status_code == 401, (path, why, r.text)
            assert r.json()["detail"]["code"] == P.UNAUTHORIZED and r.headers["www-authenticate"] == "Bearer"
        assert "revoked" in httpx.get(base + path, headers=refused["revoked"], timeout=30).json()["detail"]["message"]
        for good in (bearer(key), {"X-API-Key": key}):
            assert httpx.get(base + path + ("" if path != "/v1/conversations/x" else ""), headers=good, timeout=30).status_code in (200, 404)
        assert httpx.get(base + path, params={"token": key}, timeout=30).status_code in (200, 404)
    assert httpx.get(base + "/healthz", timeout=30).json()["status"] == "ok"  # public
    assert httpx.get(base + "/", timeout=30).status_code == 200  # the dashboard page itself is public, its data is not

    async def ws_refused(path: str, headers: dict) -> tuple[list[dict], int | None]:
        async with websockets.connect(f"ws://{service.host}:{service.port}{path}", additional_headers=headers) as ws:
            if path == "/v1/stream":
                try:
                    await ws.send(json.dumps({"type": "start", "conversation_id": "nope"}))
                except websockets.ConnectionClosed:
                    pass
            return await drain(ws, timeout=30), ws.close_code

    for path in ("/v1/stream", "/v1/watch?conversation_id=x"):
        for why, headers in refused.items():
            msgs, code = run(ws_refused(path, headers))
            assert code == P.UNAUTHORIZED, (path, why, msgs)
            assert [(m["type"], m["code"], m["fatal"]) for m in msgs] == [("error", P.UNAUTHORIZED, True)], (path, why)

    async def ws_accepted() -> list[str]:
        url = f"ws://{service.host}:{service.port}/v1/stream"
        chosen = []
        for kwargs in ({"additional_headers": {"X-API-Key": key}}, {"subprotocols": ["tracker.v1", f"bearer.{key}"]}):
            async with websockets.connect(url, **kwargs) as ws:
                await ws.send(json.dumps({"type": "start", "conversation_id": f"ok-{uuid.uuid4().hex[:6]}"}))
                assert json.loads(await ws.recv())["type"] == "started"
                chosen.append(ws.subprotocol)
        async with websockets.connect(f"{url}?token={key}") as ws:
            await ws.send(json.dumps({"type": "start", "conversation_id": f"ok-{uuid.uuid4().hex[:6]}"}))
            assert json.loads(await ws.recv())["type"] == "started"
        return chosen

    assert run(ws_accepted()) == [None, "tracker.v1"]  # a browser's subprotocol offer is answered with tracker.v1


def test_tenant_b_cannot_list_read_stream_into_or_watch_tenant_a_conversations(service, keys):
    key_a, _ = keys.create("tenant-a")
    key_b, _ = keys.create("tenant-b")
    cid = f"secret-{uuid.uuid4().hex[:8]}"
    url, base = service.ws_url, service.http_url
    a = run(converse(url, bearer(key_a), cid, ["My account number is 1234.", "Please call me back."]))
    assert [m["utterance_id"] for m in a if m["type"] == "utterance"] == ["u0", "u1"]
    seq = max(m["seq"] for m in a if m["type"] == "utterance")
    a_conv = httpx.get(f"{base}/v1/conversations/{cid}", headers=bearer(key_a), timeout=30).json()

    # list and read
    listed = httpx.get(f"{base}/v1/conversations", headers=bearer(key_b), timeout=30).json()["conversations"]
    assert cid not in [c["conversation_id"] for c in listed]
    assert cid in [c["conversation_id"] for c in httpx.get(f"{base}/v1/conversations", headers=bearer(key_a), timeout=30).json()["conversations"]]
    for headers, params in ((bearer(key_b), {}), ({"X-API-Key": key_b}, {}), ({}, {"token": key_b})):
        r = httpx.get(f"{base}/v1/conversations/{cid}", headers=headers, params=params, timeout=30)
        assert r.status_code == 404 and "My account" not in r.text

    # resume A's conversation with B's key: unknown to B
    async def resume_as_b():
        async with websockets.connect(url, additional_headers=bearer(key_b)) as ws:
            await ws.send(json.dumps({"type": "start", "conversation_id": cid, "speakers": ["A"], "resume": True,
                                      "resume_after_seq": seq}))
            return await drain(ws, timeout=30), ws.close_code

    msgs, code = run(resume_as_b())
    assert code == P.UNKNOWN_CONVERSATION and [m["code"] for m in msgs] == [P.UNKNOWN_CONVERSATION]
    assert not any(m.get("type") == "utterance" for m in msgs)

    # watch A's conversation with B's key (subprotocol, as the dashboard does) while A adds an utterance
    async def watch_as_b_while_a_talks() -> tuple[list[dict], list[dict]]:
        got: list[dict] = []
        async with websockets.connect(f"ws://{service.host}:{service.port}/v1/watch?conversation_id={cid}",
                                      subprotocols=["tracker.v1", f"bearer.{key_b}"]) as ws:
            async def reader():
                async for raw in ws:
                    got.append(json.loads(raw))
            task = asyncio.create_task(reader())
            more = await converse(url, bearer(key_a), cid, ["Secret third line."], resume=True, prefix="late")
            await asyncio.sleep(2.5)  # more than one blocking read of the watch loop
            task.cancel()
        return got, more

    got, more = run(watch_as_b_while_a_talks())
    assert got == [] and [m["utterance_id"] for m in more if m["type"] == "utterance"] == ["u0", "u1", "late0"]

    # stream "into" A's conversation id with B's key: it becomes B's own conversation, A's is untouched
    b = run(converse(url, bearer(key_b), cid, ["Injected line."], prefix="evil"))
    assert [m["utterance_id"] for m in b if m["type"] == "utterance"] == ["evil0"]
    b_conv = httpx.get(f"{base}/v1/conversations/{cid}", headers=bearer(key_b), timeout=30).json()
    assert [u["text"] for u in b_conv["utterances"]] == ["Injected line."]
    a_after = httpx.get(f"{base}/v1/conversations/{cid}", headers=bearer(key_a), timeout=30).json()
    assert [u["utterance_id"] for u in a_after["utterances"]] == ["u0", "u1", "late0"]
    assert a_after["utterances"][:2] == a_conv["utterances"]
    assert stream_len(service, "tenant-a", cid) == 3 and stream_len(service, "tenant-b", cid) == 1

    # and A's watch sees exactly A's three, never B's
    async def watch_as_a():
        async with websockets.connect(f"ws://{service.host}:{service.port}/v1/watch?conversation_id={cid}",
                                      additional_headers=bearer(key_a)) as ws:
            return [json.loads(await asyncio.wait_for(ws.recv(), 30)) for _ in range(3)]

    assert [m["utterance_id"] for m in run(watch_as_a())] == ["u0", "u1", "late0"]


# ------------------------------------------------------------------------------------ limits


def test_limits_answer_with_their_documented_codes_and_the_service_carries_on(service, keys):
    key, _ = keys.create("limits-t")
    url = service.ws_url
    lim = SessionLimits(**LIMITS)

    async def script(messages: list, headers=None) -> tuple[list[dict], int | None]:
        async with websockets.connect(url, additional_headers=headers or bearer(key), max_size=2**24) as ws:
            await ws.send(json.dumps({"type": "start", "conversation_id": f"lim-{uuid.uuid4().hex[:6]}", "speakers": ["A"]}))
            try:
                for m in messages:
                    await ws.send(m)
            except websockets.ConnectionClosed:
                pass
            return await drain(ws, until="stopped", timeout=60), ws.close_code

    # a text frame above the limit: fatal 4005
    msgs, code = run(script(['{"type":"keepalive","pad":"' + "x" * lim.max_text_frame_chars + '"}']))
    assert code == P.FRAME_TOO_LARGE and [m.get("code") for m in msgs if m["type"] == "error"] == [P.FRAME_TOO_LARGE]
    # an utterance longer than the limit: 4002, and the stream goes on
    msgs, code = run(script([json.dumps({"type": "utterance", "speaker": "A", "text": "y" * (lim.max_utterance_chars + 1)}),
                             json.dumps({"type": "utterance", "speaker": "A", "text": "short", "utterance_id": "s"}),
                             json.dumps({"type": "stop"})]))
    assert [m["code"] for m in msgs if m["type"] == "error"] == [P.INVALID_FIELD] and msgs[-1]["type"] == "stopped"
    assert [m["utterance_id"] for m in msgs if m["type"] == "utterance"] == ["s"]
    # message rate: a flood of keepalives is cut at the burst (plus what the rate refilled meanwhile)
    msgs, code = run(script([json.dumps({"type": "keepalive"})] * (3 * lim.message_burst)))
    errors = [m for m in msgs if m["type"] == "error"]
    assert code == P.LIMIT_EXCEEDED and [e["code"] for e in errors] == [P.LIMIT_EXCEEDED] and "per second" in errors[0]["message"]

    # open streams per key: the 13th is refused with 4029; closing one frees a slot; another key is not affected
    async def streams():
        opened = [await websockets.connect(url, additional_headers=bearer(key)) for _ in range(lim.max_streams_per_key)]
        for ws in opened:
            await ws.send(json.dumps({"type": "start", "conversation_id": f"open-{uuid.uuid4().hex[:6]}"}))
            assert json.loads(await ws.recv())["type"] == "started"
        async with websockets.connect(url, additional_headers=bearer(key)) as extra:
            refused = await drain(extra, timeout=30), extra.close_code
        other_key, _ = keys.create("limits-t")
        async with websockets.connect(url, additional_headers=bearer(other_key)) as ws:
            await ws.send(json.dumps({"type": "start", "conversation_id": f"other-{uuid.uuid4().hex[:6]}"}))
            other = json.loads(await ws.recv())["type"]
        await opened[0].close()
        await asyncio.sleep(1.0)  # the server frees the slot when it sees the close
        async with websockets.connect(url, additional_headers=bearer(key)) as ws:
            await ws.send(json.dumps({"type": "start", "conversation_id": f"again-{uuid.uuid4().hex[:6]}"}))
            again = json.loads(await ws.recv())["type"]
        for ws in opened[1:]:
            await ws.close()
        return refused, other, again

    (msgs, code), other, again = run(streams())
    assert code == P.LIMIT_EXCEEDED and [m["code"] for m in msgs] == [P.LIMIT_EXCEEDED] and "open stream" in msgs[0]["message"]
    assert other == "started" and again == "started"

    # conversations per tenant: the 6th new one is refused; an existing one still goes on
    ckey, _ = keys.create("conv-limit-t")
    cids = [f"c{i}-{uuid.uuid4().hex[:6]}" for i in range(lim.max_conversations_per_tenant)]
    for c in cids:
        assert run(converse(url, bearer(ckey), c, ["hello"]))[-1]["type"] == "stopped"

    async def sixth():
        async with websockets.connect(url, additional_headers=bearer(ckey)) as ws:
            await ws.send(json.dumps({"type": "start", "conversation_id": "one-too-many", "speakers": ["A"]}))
            return await drain(ws, timeout=30), ws.close_code

    msgs, code = run(sixth())
    assert code == P.LIMIT_EXCEEDED and [m["code"] for m in msgs] == [P.LIMIT_EXCEEDED] and "conversations" in msgs[0]["message"]
    more = run(converse(url, bearer(ckey), cids[0], ["still here"], resume=True, prefix="r"))
    assert [m["utterance_id"] for m in more if m["type"] == "utterance"] == ["u0", "r0"]  # the stored one re-sent, then the new
    health = httpx.get(f"{service.http_url}/healthz", timeout=30).json()
    assert health["status"] == "ok" and health["limit_refused"] >= 3


# ------------------------------------------------------------------------------------ fuzz


N_FUZZ_CONNECTIONS = 20
FUZZ_PER_CONNECTION = 510
N_FATAL = 160
N_BAD_UTF8 = 10
GOOD_UTTERANCES = 30


def test_fuzz_ten_thousand_hostile_messages_each_get_their_documented_error_while_a_call_goes_on(service, keys):
    key, _ = keys.create("fuzz-t")
    headers = bearer(key)
    url = service.ws_url
    lim = SessionLimits(**LIMITS)
    rng = random.Random(8)
    speakers = ["Agent", "Caller"]
    scripts = [[hostile_text(rng, speakers, lim) for _ in range(FUZZ_PER_CONNECTION)] for _ in range(N_FUZZ_CONNECTIONS)]
    fatal = [fatal_case(rng, lim) for _ in range(N_FATAL)]
    sem = asyncio.Semaphore(6)  # + the well-formed call: well under max_streams_per_key (slots free on the server's side a bit later)

    async def hostile_connection(script: list[tuple[str, int]]) -> tuple[list[int], list[int], dict]:
        async with sem, websockets.connect(url, additional_headers=headers, max_size=2**24) as ws:
            await ws.send(json.dumps({"type": "start", "conversation_id": f"fz-{uuid.uuid4().hex[:8]}", "channels": 2,
                                      "speakers": speakers}))
            reader = asyncio.create_task(drain(ws, until="stopped", timeout=240))  # read while sending
            for i, (msg, _) in enumerate(script):
                await ws.send(msg)
                if i % 50 == 0:
                    await ws.send(b"\x00\x00\x00\x00" * 160)  # well-formed silence in between: no answer
            await ws.send(json.dumps({"type": "stop"}))
            msgs = await reader
        codes = [m["code"] for m in msgs if m["type"] == "error"]
        assert all(not m["fatal"] for m in msgs if m["type"] == "error")
        return codes, [c for _, c in script], msgs[-1]

    async def fatal_connection(messages: list, want: int) -> tuple[list[dict], int | None, int]:
        async with sem, websockets.connect(url, additional_headers=headers, max_size=2**24) as ws:
            try:
                for m in messages:
                    await ws.send(m)
            except websockets.ConnectionClosed:
                pass
            return await drain(ws, timeout=60), ws.close_code, want

    async def bad_utf8_connection(i: int) -> int | None:
        async with sem, websockets.connect(url, additional_headers=headers) as ws:
            await ws.send(json.dumps({"type": "start", "conversation_id": f"fz-utf8-{i}"}))
            await ws.send(rng.choice([b"\xff\xfe{}", b'{"type":"keepalive"}\xc3', b"\xed\xa0\x80", b"\x80"]), text=True)
            await drain(ws, timeout=30)
            return ws.close_code

    async def good_call(cid: str) -> tuple[list[dict], float]:
        t0 = time.perf_counter()
        async with websockets.connect(url, additional_headers=headers) as ws:
            await ws.send(json.dumps({"type": "start", "conversation_id": cid, "channels": 2, "speakers": speakers}))
            reader = asyncio.create_task(drain(ws, until="stopped", timeout=300))
            for i in range(GOOD_UTTERANCES):
                await ws.send(json.dumps({"type": "utterance", "utterance_id": f"g{i}", "speaker": speakers[i % 2],
                                          "text": f"This is line {i} of a normal call.", "start_ms": 1000 * i,
                                          "end_ms": 1000 * i + 900}))
                await asyncio.sleep(0.05)
            await ws.send(json.dumps({"type": "stop"}))
            return await reader, time.perf_counter() - t0

    async def everything():
        cid = f"fz-good-{uuid.uuid4().hex[:8]}"
        good = asyncio.create_task(good_call(cid))
        results = await asyncio.gather(*(hostile_connection(s) for s in scripts),
                                       *(fatal_connection(m, c) for m, c in fatal),
                                       *(bad_utf8_connection(i) for i in range(N_BAD_UTF8)))
        return cid, await good, results

    t0 = time.perf_counter()
    cid, (good_msgs, _), results = run(everything())
    elapsed = time.perf_counter() - t0
    hostile = results[:N_FUZZ_CONNECTIONS]
    fatal_res = results[N_FUZZ_CONNECTIONS:N_FUZZ_CONNECTIONS + N_FATAL]
    utf8 = results[N_FUZZ_CONNECTIONS + N_FATAL:]

    n_answered = 0
    for got, want, last in hostile:
        assert got == want  # one error per hostile message, in order, each with its documented code
        assert last == {"type": "stopped", "conversation_id": last["conversation_id"], "results": 0}
        n_answered += len(got)
    assert n_answered == N_FUZZ_CONNECTIONS * FUZZ_PER_CONNECTION >= 10_000
    assert {c for _, want, _ in hostile for c in want} == {P.BAD_JSON, P.UNKNOWN_TYPE, P.INVALID_FIELD, P.ALREADY_STARTED}
    for msgs, close_code, want in fatal_res:
        errors = [m for m in msgs if m["type"] == "error"]
        assert [(e["code"], e["fatal"]) for e in errors] == [(want, True)] and close_code == want, (want, msgs, close_code)
    assert {w for _, _, w in fatal_res} == {P.NOT_STARTED, P.FRAME_TOO_LARGE, P.BAD_AUDIO, P.AFTER_STOP,
                                            P.UNSUPPORTED_AUDIO, P.UNKNOWN_CONVERSATION}
    assert utf8 == [1007] * N_BAD_UTF8  # the WebSocket layer refuses a text frame that is not UTF-8

    # the well-formed call alongside: every utterance exactly once, in order, stored once
    finals = [m for m in good_msgs if m["type"] == "utterance"]
    assert [m["utterance_id"] for m in finals] == [f"g{i}" for i in range(GOOD_UTTERANCES)]
    assert not [m for m in good_msgs if m["type"] == "error"] and good_msgs[-1]["results"] == GOOD_UTTERANCES
    assert [m["seq"] for m in finals] == sorted(m["seq"] for m in finals)
    conv = httpx.get(f"{service.http_url}/v1/conversations/{cid}", headers=headers, timeout=30).json()
    assert [u["utterance_id"] for u in conv["utterances"]] == [f"g{i}" for i in range(GOOD_UTTERANCES)]
    assert stream_len(service, "fuzz-t", cid) == GOOD_UTTERANCES
    # nothing of the hostile traffic was stored: the good call is the tenant's only conversation
    listed = httpx.get(f"{service.http_url}/v1/conversations", headers=headers, timeout=30).json()["conversations"]
    assert [c["conversation_id"] for c in listed] == [cid]
    assert httpx.get(f"{service.http_url}/healthz", timeout=30).json()["status"] == "ok"
    print(f"fuzz: {n_answered} hostile messages + {N_FATAL} fatal scripts + {N_BAD_UTF8} invalid UTF-8 frames in {elapsed:.1f} s")
