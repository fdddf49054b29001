"""StreamSession through both pipelines: in-process (tracker.stream.pipeline.LocalPipeline) and Ray Serve.

The same tests run against a LocalPipeline (tiny random model, the feature extractor, an embedded
Redis) and against the service's ServePipeline (the deployments' handles; marked ``service``). A
session is driven with decoded client messages, as the ingress drives it, and what it sends back
and what Redis holds are checked.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid

import numpy as np
import pytest
import redis

from tests.conftest import save_tiny_checkpoint, start_test_service
from tracker.audio.synth import have_espeak, voice_conversation
from tracker.stream import protocol as P
from tracker.stream.session import StreamSession

TURNS = [
    ("Alice", "Good morning, thank you for calling. How can I help you today?"),
    ("Bob", "My internet has been down for three days and nobody called me back."),
    ("Alice", "I am very sorry to hear that. Let me check your line right now."),
    ("Bob", "Fine. Thank you."),
]


class Counting(redis.asyncio.Redis):
    """An async client that counts round trips: each command or pipeline sent is one."""

    trips = 0

    async def execute_command(self, *args, **options):
        Counting.trips += 1
        return await super().execute_command(*args, **options)

    def pipeline(self, transaction=True, shard_hint=None):
        pipe = super().pipeline(transaction, shard_hint)
        run = pipe.execute

        async def execute(raise_on_error=True):
            Counting.trips += 1
            return await run(raise_on_error)

        pipe.execute = execute
        return pipe


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_backbone):
    return save_tiny_checkpoint(tiny_backbone, tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="module")
def ray_service(checkpoint):
    svc = start_test_service(checkpoint)
    yield svc
    svc.stop()


class Harness:
    """Builds a fresh pipeline inside the running event loop (Ray handles and Redis clients bind to it)."""

    def __init__(self, kind: str, request):
        self.kind = kind
        self.request = request

    async def pipeline(self):
        if self.kind == "local":
            return await self._local()
        return await self._ray()

    async def _local(self):
        from tracker.audio.modalities import ModalityFeatures
        from tracker.context.store import AsyncConversationStore
        from tracker.model.recognizer import EmotionRecognizer
        from tracker.stream.pipeline import LocalPipeline

        ckpt = self.request.getfixturevalue("checkpoint")
        backbone = self.request.getfixturevalue("tiny_backbone")
        url = self.request.getfixturevalue("redis_url")
        rec = EmotionRecognizer.from_pretrained(ckpt, backbone=backbone)
        self.redis_url = url
        store = AsyncConversationStore(Counting.from_url(url), label_set=rec.label_set)
        return LocalPipeline(rec, store, ModalityFeatures(rec.config.adapter.modalities))

    async def _ray(self):
        from ray import serve

        from services.ingress import ServePipeline

        svc = self.request.getfixturevalue("ray_service")
        self.redis_url = svc.args["redis_url"]
        h = {name: serve.get_deployment_handle(name, app_name="tracker")
             for name in ("FeatureExtractor", "EmotionModel", "ContextAggregator")}
        return ServePipeline(h["FeatureExtractor"], h["EmotionModel"], h["ContextAggregator"])


@pytest.fixture(params=["local", pytest.param("ray", marks=[pytest.mark.service, pytest.mark.timeout(600)])])
def harness(request):
    return Harness(request.param, request)


async def drive(pipeline, messages: list, wait_s: float = 0.0) -> list[dict]:
    """Feed messages (str: text frame, bytes: audio) to a fresh session; everything it sent."""
    out: list[dict] = []

    async def send(msg: dict) -> None:
        out.append(msg)

    session = StreamSession(pipeline, send)
    for m in messages:
        if isinstance(m, bytes):
            await session.on_binary(m)
        else:
            await session.on_text(m)
        if wait_s:
            await asyncio.sleep(wait_s)
    await session.close()
    return out


def start(cid: str, speakers: list[str], **kw) -> str:
    return json.dumps({"type": "start", "conversation_id": cid, "sample_rate": 16000, "channels": len(speakers),
                       "speakers": speakers, **kw})


def stored(redis_url: str, cid: str) -> list[dict]:
    from tracker.context.store import ConversationStore

    with ConversationStore(redis_url) as store:
        return store.history(cid, finals_only=False)


def test_voiced_call_one_final_per_utterance_in_order(harness):
    if not have_espeak():
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    voiced = voice_conversation(TURNS)
    cid = f"s-{uuid.uuid4().hex[:8]}"
    frames = [voiced.samples[i:i + 1600].astype("<i2").tobytes() for i in range(0, len(voiced.samples), 1600)]
    transcripts = [json.dumps({"type": "transcript", **{k: u[k] for k in ("speaker", "text", "start_ms", "end_ms")}})
                   for u in voiced.utterances]

    async def go():
        p = await harness.pipeline()
        msgs = [start(cid, voiced.speakers)]
        sent = 0
        for i, f in enumerate(frames):  # each transcript once the audio has played past its end
            msgs.append(f)
            now_ms = (i + 1) * 100
            while sent < len(transcripts) and voiced.utterances[sent]["end_ms"] <= now_ms:
                msgs.append(transcripts[sent])
                sent += 1
        return await drive(p, msgs + transcripts[sent:] + [json.dumps({"type": "stop"})])

    out = asyncio.run(go())
    assert [m["type"] for m in out if m["type"] == "error"] == []
    finals = [m for m in out if m["type"] == "utterance" and m["is_final"]]
    assert [(r["speaker"], r["text"]) for r in finals] == [(s, t) for s, t in TURNS]
    assert all(r["modalities"] == ["text", "audio"] for r in finals)
    assert [r["seq"] for r in finals] == list(range(1, len(TURNS) + 1))  # assigned by the append script
    assert out[-1] == {"type": "stopped", "conversation_id": cid, "results": len(TURNS)}
    assert [(r["utterance_id"], r["label"], r["seq"]) for r in stored(harness.redis_url, cid)] == \
        [(r["utterance_id"], r["label"], r["seq"]) for r in finals]


def test_retried_utterance_is_stored_once_and_resent_on_resume(harness):
    cid = f"r-{uuid.uuid4().hex[:8]}"
    audio = base64.b64encode((np.sin(np.arange(8000) / 8) * 8000).astype("<i2").tobytes()).decode()
    ev = json.dumps({"type": "utterance", "utterance_id": "u-1", "speaker": "Ann", "text": "I want a refund now.",
                     "start_ms": 0, "end_ms": 500, "audio": audio})
    stop = json.dumps({"type": "stop"})

    async def go():
        first = await drive(await harness.pipeline(), [start(cid, ["Ann"]), ev, ev, stop])
        again = await drive(await harness.pipeline(), [start(cid, ["Ann"], resume=True), ev, stop])
        return first, again

    first, again = asyncio.run(go())
    results = [m for m in first + again if m["type"] == "utterance"]
    assert len(results) == 4 and len({(r["utterance_id"], r["seq"], r["label"]) for r in results}) == 1
    assert again[0]["final_utterance_ids"] == ["u-1"] and again[1]["type"] == "utterance"
    assert [r["utterance_id"] for r in stored(harness.redis_url, cid)] == ["u-1"]


def test_text_only_audio_only_and_context(harness):
    cid = f"m-{uuid.uuid4().hex[:8]}"
    audio = base64.b64encode((np.sin(np.arange(8000) / 5) * 6000).astype("<i2").tobytes()).decode()
    msgs = [start(cid, ["Ann", "Ben"]),
            json.dumps({"type": "utterance", "speaker": "Ann", "text": "Hello there.", "utterance_id": "t"}),
            json.dumps({"type": "utterance", "speaker": "Ben", "audio": audio, "utterance_id": "a"}),
            json.dumps({"type": "utterance", "speaker": "Ann", "text": "Are you there?", "utterance_id": "c"}),
            json.dumps({"type": "stop"})]

    async def go():
        p = await harness.pipeline()
        out = await drive(p, msgs)
        return out, await p.begin(cid, "next")

    out, begun = asyncio.run(go())
    res = {m["utterance_id"]: m for m in out if m["type"] == "utterance"}
    assert res["t"]["modalities"] == ["text"] and res["a"]["modalities"] == ["audio"]
    assert begun.final is None and begun.index == 3
    assert [(t.speaker, t.text) for t in begun.context][-1] == ("Ann", "Are you there?")


def test_bad_input_answered_and_the_stream_goes_on(harness):
    cid = f"b-{uuid.uuid4().hex[:8]}"
    msgs = [start(cid, ["A"]), "{not json", json.dumps({"type": "utterance", "speaker": "Z", "text": "x"}),
            json.dumps({"type": "utterance", "speaker": "A", "text": "fine", "utterance_id": "1"}),
            json.dumps({"type": "stop"})]
    out = asyncio.run(_drive_fresh(harness, msgs))
    assert [m.get("code") for m in out if m["type"] == "error"] == [P.BAD_JSON, P.INVALID_FIELD]
    assert [m["utterance_id"] for m in out if m["type"] == "utterance"] == ["1"] and out[-1]["type"] == "stopped"


async def _drive_fresh(harness, msgs):
    return await drive(await harness.pipeline(), msgs)


def test_local_pipeline_two_redis_round_trips_per_utterance(request):
    """begin (one pipeline) + commit (one script run): what the live path costs Redis per utterance."""
    h = Harness("local", request)
    cid = f"rt-{uuid.uuid4().hex[:8]}"

    async def go():
        p = await h.pipeline()
        await p.commit(cid, {"utterance_id": "warm", "speaker": "A", "start_ms": 0, "end_ms": 1, "text": "hi",
                             "label": "neutral", "is_final": True})  # loads the script
        trips = []
        for i in range(6):
            before = Counting.trips
            rec = await p.label_utterance(cid, {"utterance_id": f"u{i}", "speaker": "A", "text": f"line {i}",
                                                "start_ms": i * 1000, "end_ms": i * 1000 + 500, "pcm": None,
                                                "sample_rate": 16000})
            trips.append(Counting.trips - before)
            assert rec["seq"] == i + 2
        again = await p.label_utterance(cid, {"utterance_id": "u3", "speaker": "A", "text": "other", "start_ms": 0,
                                              "end_ms": 1, "pcm": None, "sample_rate": 16000})
        return trips, again

    trips, again = asyncio.run(go())
    assert trips == [2] * 6
    assert again["text"] == "line 3" and again["seq"] == 5  # a retry: the stored final, nothing labelled


def test_live_replay_in_process_gives_the_offline_labels(checkpoint, tiny_backbone, redis_url):
    """`tracker replay --live` (session + LocalPipeline + Redis) labels as the offline replay does."""
    from clients.replay import replay_in_process, replay_live_in_process
    from tracker.data.records import Conversation, Utterance
    from tracker.model.recognizer import EmotionRecognizer

    rec = EmotionRecognizer.from_pretrained(checkpoint, backbone=tiny_backbone)
    convs = [Conversation(f"c{c}", [Utterance(f"c{c}", f"c{c}-u{i}", i, "AB"[i % 2], f"line {i} of call {c}")
                                    for i in range(7)]) for c in range(3)]
    offline = replay_in_process(rec, convs)
    live = replay_live_in_process(rec, convs, redis_url=redis_url)
    assert [r["utterance_id"] for r in live] == [r["utterance_id"] for r in offline]
    assert [r["label"] for r in live] == [r["label"] for r in offline]
    for a, b in zip(live, offline):
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-4)


def test_kv_cache_dropped_on_stop_and_when_idle():
    import torch

    from tracker.model.kv_cache import KVCacheStore, PrefixEntry

    def entry():
        return PrefixEntry((1, 2), [torch.zeros(1, 2, 4)], [torch.zeros(1, 2, 4)])

    cache = KVCacheStore(1 << 20)
    cache.put("a", entry())
    cache.put("b", entry())
    cache.pop("a")
    assert "a" not in cache and cache.stats.forgotten == 1
    assert cache.expire_idle(3600) == 0 and "b" in cache
    assert cache.expire_idle(0) == 1 and len(cache) == 0 and cache.nbytes == 0 and cache.stats.expired == 1


def test_rendezvous_routing_is_stable_and_moves_only_the_lost_replicas_conversations():
    from services.routing import rendezvous_order

    keys = [f"default/call-{i}" for i in range(2000)]
    two = {k: rendezvous_order(k, ["r1", "r2"])[0] for k in keys}
    assert two == {k: rendezvous_order(k, ["r2", "r1"])[0] for k in keys}  # order of the candidates is irrelevant
    share = sum(v == "r1" for v in two.values()) / len(keys)
    assert 0.45 < share < 0.55
    three = {k: rendezvous_order(k, ["r1", "r2", "r3"])[0] for k in keys}
    assert all(three[k] == two[k] for k in keys if three[k] != "r3")  # a new replica only takes conversations
    assert {k: rendezvous_order(k, ["r1"])[0] for k in keys if two[k] == "r1"} == {k: "r1" for k in keys if two[k] == "r1"}


def test_affinity_router_ranks_the_home_replica_first_and_falls_back():
    from types import SimpleNamespace

    from ray.serve.request_router import PendingRequest

    from services.routing import ConversationAffinityRouter, rendezvous_order

    replicas = [SimpleNamespace(replica_id=SimpleNamespace(unique_id=u)) for u in ("r1", "r2", "r3")]
    choose = ConversationAffinityRouter.choose_replicas

    def ranks(kwargs, candidates=replicas):
        async def go():
            req = PendingRequest(args=[], kwargs=kwargs, metadata=None)  # its future needs a running loop
            return req, await choose(None, candidates, req)

        req, out = asyncio.run(go())
        assert req.routing_context.should_backoff  # every replica full: back off, never spin
        return [[r.replica_id.unique_id for r in rank] for rank in out]

    home = rendezvous_order("default/c1", ["r1", "r2", "r3"])
    assert ranks({"conversation_id": "default/c1"}) == [home[:1], home[1:]]
    gone = [r for r in replicas if r.replica_id.unique_id != home[0]]  # the home replica died
    assert ranks({"conversation_id": "default/c1"}, gone)[0] == [home[1]]
    plain = ranks({})  # no conversation: two random replicas
    assert len(plain) == 1 and len(plain[0]) == 2


def test_speaker_norm_model_still_two_round_trips_and_past_only(tiny_backbone, redis_url):
    """A speaker_norm model: `begin` reads the speaker's state in its pipeline and `commit` writes it in
    its script, so an utterance still costs 2 Redis round trips; the model sees each speaker's features
    normalised by that speaker's earlier utterances only; a commit that finds another utterance of the
    speaker first (a second connection) still adds its own, once."""
    import numpy as np

    from tracker.audio.speaker_norm import SpeakerStats
    from tracker.context.store import AsyncConversationStore
    from tracker.model.adapter import AdapterConfig, ModalityConfig
    from tracker.model.recognizer import EmotionRecognizer, RecognizerConfig
    from tracker.stream.pipeline import LocalPipeline, label_utterance

    mods = [ModalityConfig("audio_functionals", 88, source="egemaps_functionals", speaker_norm=True)]
    rec = EmotionRecognizer(tiny_backbone, RecognizerConfig(backbone="tiny", dtype="fp32", adapter=AdapterConfig(
        d_model=32, n_pseudo_tokens=4, modalities=mods)))
    norm = rec.speaker_normalizers()["audio_functionals"]
    rng = np.random.default_rng(0)
    feats = [rng.normal(size=(1, 88)).astype(np.float32) for _ in range(6)]
    speakers = ["A", "B", "A", "A", "B", "A"]
    cid = f"sn-{uuid.uuid4().hex[:8]}"

    async def go():
        store = AsyncConversationStore(Counting.from_url(redis_url), label_set=rec.label_set)
        p = LocalPipeline(rec, store)
        seen = []
        label = p.label

        async def spy(conversation_id, utterance):
            seen.append(utterance.features["audio_functionals"])
            return await label(conversation_id, utterance)

        p.label = spy
        await p.commit(cid, {"utterance_id": "warm", "speaker": "Z", "start_ms": 0, "end_ms": 1, "text": "hi",
                             "label": "neutral", "is_final": True})  # loads the script
        trips = []
        for i, (spk, f) in enumerate(zip(speakers, feats)):
            before = Counting.trips
            await p.label_utterance(cid, {"utterance_id": f"u{i}", "speaker": spk, "text": f"line {i}", "start_ms": i,
                                          "end_ms": i + 1, "sample_rate": 16000, "audio_features": {"audio_functionals": f}})
            trips.append(Counting.trips - before)
        # two connections on one conversation: u7 reads A's state, u6 commits meanwhile, then u7 commits
        other = LocalPipeline(rec, store, labeler=p.labeler)
        begun = await p.begin(cid, "u7", "A")
        await other.label_utterance(cid, {"utterance_id": "u6", "speaker": "A", "text": "six", "start_ms": 6,
                                          "end_ms": 7, "sample_rate": 16000, "audio_features": {"audio_functionals": feats[0]}})
        from tracker.context.speaker_norm import SpeakerNormOps, normalize_with_state

        _, write = normalize_with_state(begun.speaker_state, "u7", {"audio_functionals": feats[1]}, p.normalizers)
        await p.commit(cid, {"utterance_id": "u7", "speaker": "A", "start_ms": 7, "end_ms": 8, "text": "seven",
                             "label": "neutral", "is_final": True}, write)
        state = await store.run(SpeakerNormOps(store.config, store.tenant).state(cid, "A"))
        await store.aclose()
        return trips, seen, state

    trips, seen, state = asyncio.run(go())
    assert trips[1:] == [2] * (len(speakers) - 1) and trips[0] <= 4  # the first also loads the commit script
    past: dict[str, SpeakerStats] = {}
    for spk, f, got in zip(speakers, feats, seen):
        expected = norm.normalize(f, past.get(spk))  # the speaker's earlier utterances only
        assert np.allclose(got, expected, atol=1e-5)
        past.setdefault(spk, norm.new_stats()).update(f)
    assert any(not np.allclose(g, f) for g, f in zip(seen[2:], feats[2:]))  # a past changed what the model saw
    assert state["n"] == speakers.count("A") + 2 and state["last"] == "u7"  # u6 and u7 both added, once each


def test_local_pipeline_admits_known_conversations_and_refuses_past_the_limit_in_one_round_trip(request):
    h = Harness("local", request)
    ids = [f"adm-{uuid.uuid4().hex[:8]}" for _ in range(3)]

    async def go():
        p = await h.pipeline()
        p.max_conversations = (await p.store.count_conversations()) + 2  # room for two more in this Redis
        for cid in ids[:2]:
            await p.admit_conversation(cid)
            await p.commit(cid, {"utterance_id": "u0", "speaker": "A", "start_ms": 0, "end_ms": 1, "text": "hi",
                                 "label": "neutral", "is_final": True})
        before = Counting.trips
        await p.admit_conversation(ids[0])  # known: admitted though the tenant is at its limit
        trips = Counting.trips - before
        with pytest.raises(P.ProtocolError) as refused:
            await p.admit_conversation(ids[2])
        return trips, refused.value

    trips, refused = asyncio.run(go())
    assert trips == 1 and refused.code == P.LIMIT_EXCEEDED and "conversations" in str(refused)
