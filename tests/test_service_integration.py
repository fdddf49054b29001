"""The live service end to end: real Ray Serve, a real Redis server, a websockets client.

A two-speaker conversation voiced with espeak-ng (stereo, one speaker per channel) is streamed with
its transcripts; the model is a tiny random backbone with a real adapter checkpoint, so labels are
arbitrary but everything else (segmentation, matching, ordering, storage) is the production path.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid

import numpy as np
import pytest
import redis
import websockets

from tests.conftest import SUPPORT_CALL, save_tiny_checkpoint, start_test_service
from tracker.audio.synth import have_espeak, voice_conversation

pytestmark = [pytest.mark.service, pytest.mark.timeout(600)]

TURNS = SUPPORT_CALL


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_backbone):
    ckpt = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_tiny_checkpoint(tiny_backbone, ckpt, seed=0)
    svc = start_test_service(ckpt)
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def voiced():
    if not have_espeak():
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    return voice_conversation(TURNS)


def run(coro):
    return asyncio.run(coro)


async def collect(ws, until: str = "stopped", timeout: float = 120) -> list[dict]:
    out = []
    async def loop():
        async for raw in ws:
            msg = json.loads(raw)
            out.append(msg)
            if msg.get("type") == until:
                return
    try:
        await asyncio.wait_for(loop(), timeout)
    except websockets.ConnectionClosed:
        pass
    return out


def test_voiced_two_speaker_call_yields_one_final_result_per_utterance_in_order_and_in_redis(service, voiced):
    from clients.stream_client import Recording, stream_recording

    cid = f"it-{uuid.uuid4().hex[:8]}"
    rec = Recording(voiced.samples, voiced.sample_rate, voiced.speakers,
                    [{k: u[k] for k in ("speaker", "text", "start_ms", "end_ms")} for u in voiced.utterances])
    out = run(stream_recording(service.ws_url, cid, rec, speed=4.0, headers=service.auth_headers))
    assert out.errors == []
    assert out.started["speakers"] == ["Alice", "Bob"]
    finals = [r for r in out.results if r["is_final"]]
    assert len(finals) == len(TURNS), [(r["speaker"], r["text"]) for r in finals]
    # each spoken utterance: exactly one result, right speaker, overlapping span, its transcript text
    for truth in voiced.utterances:
        mine = [r for r in finals if r["speaker"] == truth["speaker"]
                and min(r["end_ms"], truth["end_ms"]) > max(r["start_ms"], truth["start_ms"])]
        assert len(mine) == 1, (truth, mine)
        assert mine[0]["text"] == truth["text"]
        assert mine[0]["modalities"] == ["text", "audio"]
        assert abs(sum(mine[0]["probabilities"].values()) - 1) < 1e-4
    seqs = [r["seq"] for r in finals]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert [r["end_ms"] for r in finals] == sorted(r["end_ms"] for r in finals)
    assert out.stopped == {"type": "stopped", "conversation_id": cid, "results": len(TURNS)}

    # Redis holds the same utterances (read through REST and straight from the server)
    import httpx

    conv = httpx.get(f"{service.http_url}/v1/conversations/{cid}", timeout=30, headers=service.auth_headers).json()
    stored = [(u["utterance_id"], u["label"], u["seq"]) for u in conv["utterances"]]
    assert stored == [(r["utterance_id"], r["label"], r["seq"]) for r in finals]
    listed = httpx.get(f"{service.http_url}/v1/conversations", timeout=30, headers=service.auth_headers).json()["conversations"]
    assert cid in [c["conversation_id"] for c in listed]
    raw = redis.Redis.from_url(service.args["redis_url"])
    stream_keys = [k for k in raw.scan_iter(match=f"*{cid}*stream*")]
    assert len(stream_keys) == 1 and raw.xlen(stream_keys[0]) == len(TURNS)


def test_replicas_run_at_the_priority_of_the_process_that_started_the_service(service):
    """Ray starts workers at nice 15 unless told otherwise: any other work on the host would then take the
    cores from the replicas first (tracker/ray_env.py). Every Serve replica runs at the test's own niceness."""
    import psutil

    me = psutil.Process()
    replicas = [p for p in me.children(recursive=True) if "ServeReplica:" in " ".join(p.cmdline())]
    assert {p.cmdline()[0].split(":")[-1] for p in replicas} >= {"Ingress", "FeatureExtractor", "EmotionModel", "ContextAggregator"}
    assert {p.nice() for p in replicas} == {me.nice()}


def test_retried_utterance_is_stored_once(service):
    import httpx

    cid = f"retry-{uuid.uuid4().hex[:8]}"
    audio = base64.b64encode((np.sin(np.arange(8000) / 8) * 8000).astype("<i2").tobytes()).decode()

    async def session(resume: bool, after: int = 0) -> list[dict]:
        async with websockets.connect(service.ws_url, additional_headers=service.auth_headers) as ws:
            await ws.send(json.dumps({"type": "start", "conversation_id": cid, "sample_rate": 16000, "channels": 1,
                                      "speakers": ["Ann"], "resume": resume, "resume_after_seq": after}))
            ev = {"type": "utterance", "utterance_id": "u-1", "speaker": "Ann", "text": "I want a refund now.",
                  "start_ms": 0, "end_ms": 500, "audio": audio}
            await ws.send(json.dumps(ev))
            await ws.send(json.dumps(ev))  # the retry, on the same connection
            await ws.send(json.dumps({"type": "stop"}))
            return await collect(ws)

    first = run(session(False))
    seq = [m for m in first if m["type"] == "utterance"][0]["seq"]
    second = run(session(True, after=seq))  # and again after reconnecting (the client has seq already)
    results = [m for m in first + second if m["type"] == "utterance"]
    assert len(results) == 4 and len({(r["utterance_id"], r["seq"], r["label"]) for r in results}) == 1
    third = run(session(True))  # a client that says it has nothing gets the stored result re-sent first
    assert [m["type"] for m in third][:2] == ["started", "utterance"] and third[1]["seq"] == seq
    assert second[0]["type"] == "started" and second[0]["final_utterance_ids"] == ["u-1"]
    conv = httpx.get(f"{service.http_url}/v1/conversations/{cid}", timeout=30, headers=service.auth_headers).json()
    assert [u["utterance_id"] for u in conv["utterances"]] == ["u-1"]


def test_text_only_and_audio_only_utterances(service):
    cid = f"modal-{uuid.uuid4().hex[:8]}"
    audio = base64.b64encode((np.sin(np.arange(8000) / 5) * 6000).astype("<i2").tobytes()).decode()

    async def go():
        async with websockets.connect(service.ws_url, additional_headers=service.auth_headers) as ws:
            await ws.send(json.dumps({"type": "start", "conversation_id": cid, "channels": 1, "speakers": ["Ann"]}))
            await ws.send(json.dumps({"type": "utterance", "speaker": "Ann", "text": "Hello there.", "utterance_id": "t"}))
            await ws.send(json.dumps({"type": "utterance", "speaker": "Ann", "audio": audio, "utterance_id": "a"}))
            await ws.send(json.dumps({"type": "stop"}))
            return await collect(ws)

    msgs = run(go())
    res = {m["utterance_id"]: m for m in msgs if m["type"] == "utterance"}
    assert res["t"]["modalities"] == ["text"] and res["a"]["modalities"] == ["audio"]


# ---------------------------------------------------------------------------------------- bad input


async def expect(service, messages: list, want_code: int, fatal: bool, start: bool = True) -> tuple[list[dict], int | None]:
    async with websockets.connect(service.ws_url, max_size=2**24, additional_headers=service.auth_headers) as ws:
        if start:
            await ws.send(json.dumps({"type": "start", "conversation_id": f"bad-{uuid.uuid4().hex[:6]}", "channels": 1,
                                      "speakers": ["A"]}))
        for m in messages:
            await ws.send(m)
        if not fatal:
            await ws.send(json.dumps({"type": "stop"}))
        msgs = await collect(ws, until="__never__", timeout=30)
        return msgs, ws.close_code


@pytest.mark.parametrize(
    "name, messages, code, fatal, start",
    [
        ("malformed JSON", ["{not json"], 4000, False, True),
        ("invalid UTF-8", [b"\xff\xfe{}".decode("latin-1")], 4000, False, True),
        ("not an object", ["[1, 2]"], 4000, False, True),
        ("unknown type", [json.dumps({"type": "dance"})], 4001, False, True),
        ("invalid field", [json.dumps({"type": "transcript", "speaker": "A", "text": "x", "start_ms": 5, "end_ms": 1})], 4002, False, True),
        ("unknown speaker", [json.dumps({"type": "utterance", "speaker": "Z", "text": "x"})], 4002, False, True),
        ("second start", [json.dumps({"type": "start", "conversation_id": "again"})], 4007, False, True),
        ("audio before start", [b"\x00\x00" * 160], 4003, True, False),
        ("transcript before start", [json.dumps({"type": "transcript", "speaker": "A", "text": "x", "start_ms": 0, "end_ms": 9})], 4003, True, False),
        ("oversized frame", [b"\x00\x00" * 140000], 4005, True, True),
        ("odd byte count", [b"\x00\x00\x00"], 4008, True, True),
    ],
)
def test_bad_input_gets_its_documented_error(service, name, messages, code, fatal, start):
    msgs, close_code = run(expect(service, messages, code, fatal, start))
    errors = [m for m in msgs if m["type"] == "error"]
    assert [e["code"] for e in errors] == [code], (name, msgs)
    assert errors[0]["fatal"] is fatal
    if fatal:
        assert close_code == code
    else:
        assert msgs[-1]["type"] == "stopped"


def test_wrong_sample_rate_and_audio_after_stop(service):
    async def wrong_rate():
        async with websockets.connect(service.ws_url, additional_headers=service.auth_headers) as ws:
            await ws.send(json.dumps({"type": "start", "conversation_id": "r", "sample_rate": 44100}))
            return await collect(ws, until="__never__", timeout=30), ws.close_code

    msgs, code = run(wrong_rate())
    assert code == 4004 and msgs[0]["code"] == 4004 and "44100" in msgs[0]["message"]

    async def after_stop():
        async with websockets.connect(service.ws_url, additional_headers=service.auth_headers) as ws:
            await ws.send(json.dumps({"type": "start", "conversation_id": f"as-{uuid.uuid4().hex[:6]}"}))
            await ws.send(json.dumps({"type": "stop"}))
            await ws.send(b"\x00\x00" * 160)
            return await collect(ws, until="__never__", timeout=30), ws.close_code

    msgs, code = run(after_stop())
    assert [m["type"] for m in msgs] == ["started", "stopped", "error"]
    assert msgs[-1]["code"] == 4006 and code == 4006


def test_other_connections_keep_working_during_bad_input(service):
    async def good():
        async with websockets.connect(service.ws_url, additional_headers=service.auth_headers) as ws:
            await ws.send(json.dumps({"type": "start", "conversation_id": f"ok-{uuid.uuid4().hex[:6]}", "speakers": ["A"]}))
            for i in range(3):
                await ws.send(json.dumps({"type": "utterance", "speaker": "A", "text": f"line {i}", "utterance_id": str(i)}))
                await asyncio.sleep(0.05)
            await ws.send(json.dumps({"type": "stop"}))
            return await collect(ws)

    async def bad():
        for payload in ["{", json.dumps({"type": 7}), json.dumps([])]:
            await expect(service, [payload], 0, False)
        await expect(service, [b"\x00" * 300000], 4005, True)

    async def both():
        return await asyncio.gather(good(), bad())

    good_msgs, _ = run(both())
    assert [m["utterance_id"] for m in good_msgs if m["type"] == "utterance"] == ["0", "1", "2"]
    import httpx

    assert httpx.get(f"{service.http_url}/healthz", timeout=30, headers=service.auth_headers).json()["status"] == "ok"


def test_client_reconnect_mid_conversation_gives_exactly_one_final_result_per_utterance(service, voiced):
    import httpx

    from clients.stream_client import Recording, stream_resumable

    cid = f"cut-{uuid.uuid4().hex[:8]}"
    rec = Recording(voiced.samples, voiced.sample_rate, voiced.speakers,
                    [{k: u[k] for k in ("speaker", "text", "start_ms", "end_ms")} for u in voiced.utterances])
    # the network drops twice: once mid-utterance, once in a gap between turns
    mid = (voiced.utterances[1]["start_ms"] + voiced.utterances[1]["end_ms"]) // 2
    gap = voiced.utterances[3]["end_ms"] + 300
    out = run(stream_resumable(service.ws_url, cid, rec, speed=4.0, cut_at_ms=[mid, gap], headers=service.auth_headers))
    assert out.reconnects == 2 and out.duplicates == 0 and out.errors == []
    assert len(out.results) == len(TURNS)
    for truth in voiced.utterances:
        mine = [r for r in out.results if r["speaker"] == truth["speaker"]
                and min(r["end_ms"], truth["end_ms"]) > max(r["start_ms"], truth["start_ms"])]
        assert len(mine) == 1, (truth, mine)
    conv = httpx.get(f"{service.http_url}/v1/conversations/{cid}", timeout=30, headers=service.auth_headers).json()
    assert sorted(u["utterance_id"] for u in conv["utterances"]) == sorted(r["utterance_id"] for r in out.results)
