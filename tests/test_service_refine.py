"""Conversation-level refinement in the live service: interim then final labels, on the wire and in Redis.

Real Ray Serve and Redis; a tiny random backbone with a real adapter checkpoint and a real refiner
checkpoint (w=2, s=1, so t=2: utterance i's final closes with utterance i+1, the last one at stop).
"""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
import redis
import websockets

from tests.conftest import start_test_service, save_tiny_checkpoint

pytestmark = [pytest.mark.service, pytest.mark.timeout(600)]

LINES = [("Ann", "Hello, I am calling about my bill."), ("Bob", "Sure, what is wrong with it?"),
         ("Ann", "You charged me twice this month!"), ("Bob", "I am sorry, let me fix that."),
         ("Ann", "Thank you, that is a relief.")]


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_backbone):
    import torch

    from tracker.model.refine import Refiner, RefinerConfig

    root = tmp_path_factory.mktemp("refine")
    save_tiny_checkpoint(tiny_backbone, root / "model", seed=0)
    refiner = Refiner(tiny_backbone, RefinerConfig(backbone="tiny", window=2, stride=1, head_layer=1))
    with torch.no_grad():  # a head that disagrees with the random base now and then, so revisions happen
        refiner.head.weight.normal_(0, 2.0)
    refiner.save_pretrained(root / "refiner")
    svc = start_test_service(root / "model", extra_args={"refine": {"checkpoint": str(root / "refiner"), "window": 2, "stride": 1}})
    yield svc
    svc.stop()


async def converse(url: str, cid: str, lines, resume: bool = False, ids=None, headers=None) -> list[dict]:
    async with websockets.connect(url, additional_headers=headers or {}) as ws:
        await ws.send(json.dumps({"type": "start", "conversation_id": cid, "channels": 2, "speakers": ["Ann", "Bob"],
                                  "resume": resume}))
        for i, (speaker, text) in enumerate(lines):
            uid = ids[i] if ids else f"u{i}"
            await ws.send(json.dumps({"type": "utterance", "utterance_id": uid, "speaker": speaker, "text": text,
                                      "start_ms": 1000 * int(uid[1:]), "end_ms": 1000 * int(uid[1:]) + 800}))
        await ws.send(json.dumps({"type": "stop"}))
        out = []
        async for raw in ws:
            msg = json.loads(raw)
            out.append(msg)
            if msg["type"] == "stopped":
                break
        return out


def stream_entries(service, cid: str) -> list[dict]:
    raw = redis.Redis.from_url(service.args["redis_url"])
    (key,) = list(raw.scan_iter(match=f"*{cid}*stream*"))
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in raw.xrange(key)]


def test_interim_precedes_final_and_final_is_stored_once(service):
    import httpx

    cid = f"refine-{uuid.uuid4().hex[:8]}"
    msgs = asyncio.run(converse(service.ws_url, cid, LINES, headers=service.auth_headers))
    assert [m for m in msgs if m["type"] == "error"] == []
    wire = [("F" if m["is_final"] else "I") + m["utterance_id"][1:] for m in msgs if m["type"] == "utterance"]
    # t = 2 windows of 2: utterance i is final once utterance i+1 has arrived; the last one at stop
    assert wire == ["I0", "I1", "F0", "I2", "F1", "I3", "F2", "I4", "F3", "F4"]
    assert msgs[-1] == {"type": "stopped", "conversation_id": cid, "results": len(LINES)}
    finals = [m for m in msgs if m["type"] == "utterance" and m["is_final"]]
    interims = {m["utterance_id"]: m for m in msgs if m["type"] == "utterance" and not m["is_final"]}
    for f in finals:
        assert abs(sum(f["probabilities"].values()) - 1) < 1e-5
        assert f["interim_label"] == interims[f["utterance_id"]]["label"]
        assert f["revised"] == (f["label"] != f["interim_label"])
        assert f["seq"] > interims[f["utterance_id"]]["seq"]
    # Redis: one interim and one final entry per utterance, in wire order
    entries = stream_entries(service, cid)
    assert [("F" if e["is_final"] == "1" else "I") + e["utterance_id"][1:] for e in entries] == wire
    # REST shows the finals, with what they revised
    conv = httpx.get(f"{service.http_url}/v1/conversations/{cid}", timeout=30, headers=service.auth_headers).json()
    assert [(u["utterance_id"], u["label"]) for u in conv["utterances"]] == [(f["utterance_id"], f["label"]) for f in finals]
    assert all(u["refined"] and u["judgements"] == 2 for u in conv["utterances"])

    # a reconnecting client retries the last two utterances and adds one: nothing is stored twice
    more = asyncio.run(converse(service.ws_url, cid, LINES[3:] + [("Bob", "Anything else today?")], resume=True,
                                ids=["u3", "u4", "u5"], headers=service.auth_headers))
    res = [m for m in more if m["type"] == "utterance"]
    retried = [m for m in res if m["utterance_id"] in ("u3", "u4")]
    assert {(m["utterance_id"], m["seq"], m["label"]) for m in retried} == {
        (f["utterance_id"], f["seq"], f["label"]) for f in finals[3:]}  # answered from storage
    assert [("F" if m["is_final"] else "I") + m["utterance_id"][1:] for m in res if m["utterance_id"] == "u5"] == ["I5", "F5"]
    entries = stream_entries(service, cid)
    keys = [(e["utterance_id"], e["is_final"]) for e in entries]
    assert len(keys) == len(set(keys)) == 12  # 6 utterances x (interim, final), each stored once


def test_stream_client_waiting_for_finals_gets_one_per_utterance(service):
    from tracker.audio.synth import have_espeak, voice_conversation
    from clients.stream_client import Recording, stream_recording

    if not have_espeak():
        pytest.skip("espeak-ng is not installed")
    voiced = voice_conversation([("Alice", "Good morning, how can I help?"), ("Bob", "My line is down again."),
                                 ("Alice", "Let me check that for you.")])
    rec = Recording(voiced.samples, voiced.sample_rate, voiced.speakers,
                    [{k: u[k] for k in ("speaker", "text", "start_ms", "end_ms")} for u in voiced.utterances])
    seen = []
    out = asyncio.run(stream_recording(service.ws_url, f"refine-voiced-{uuid.uuid4().hex[:6]}", rec, speed=4.0,
                                       on_message=seen.append, headers=service.auth_headers))
    assert out.errors == [] and out.duplicates == 0
    assert len(out.results) == 3 and all(r["is_final"] for r in out.results)
    interims = [m for m in seen if m.get("type") == "utterance" and not m["is_final"]]
    assert sorted(m["utterance_id"] for m in interims) == sorted(r["utterance_id"] for r in out.results)
