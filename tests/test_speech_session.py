"""Speech recognition in a live session, speaker-normalisation state in Redis, the serve config's `asr`.

The session tests drive a real StreamSession with a real recognizer (packaged Whisper tiny.en,
marked slow) and eGeMAPS features through an in-process pipeline (tracker.audio.hearing.Hearing);
the call is voiced with espeak-ng, resampled to 8 kHz, one speaker per channel. The speaker
normalisation tests run against a real Redis (the embedded redis-server).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import numpy as np
import pytest
import redis

from tracker.audio.asr import word_error_rate
from tracker.config import ConfigError

TURNS = [
    ("Agent", "Good morning, thank you for calling. How can I help you today?"),
    ("Customer", "My internet has been down for three days and nobody called me back."),
    ("Agent", "I am very sorry to hear that. Let me check your line right now."),
    ("Customer", "This is the third time I am calling about the same problem."),
]
RATE = 8000


# -- the call, the pipeline -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def call8k():
    """The TURNS voiced by espeak-ng, two channels at 8 kHz (telephone rate), with the spoken spans."""
    from tracker.audio.pcm import resample
    from tracker.audio.synth import have_espeak, voice_conversation

    if not have_espeak():
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    voiced = voice_conversation(TURNS, gap_ms=800)
    return resample(voiced.samples, voiced.sample_rate, RATE), voiced.utterances


@pytest.fixture(scope="module")
def hearing():
    from tracker.audio.asr import AsrConfig
    from tracker.audio.hearing import Hearing, asr_available

    ok, why = asr_available("tiny.en")
    if not ok:
        pytest.skip(why)
    return Hearing({"audio_functionals": "egemaps_functionals"}, asr=AsrConfig(model="tiny.en", threads=1, beam_size=1))


class LocalPipeline:
    """A StreamSession pipeline in-process: Hearing for features and transcripts, a fixed label, a list for storage."""

    def __init__(self, hearing, asr: bool = True):
        from tracker.audio.hearing import HearRequest

        self._req = HearRequest
        self.hearing = hearing
        self.asr = asr
        self.listened = 0
        self.jobs: list[dict[str, Any]] = []
        self.gate: asyncio.Event | None = None  # set: labelling waits for it (to let transcripts come late)
        self.at_gate = asyncio.Event()  # the first job reached the gate
        self.heard = 0

    async def listen(self, pcm: bytes, sample_rate: int) -> dict[str, Any]:
        self.listened += 1
        try:
            return (await asyncio.to_thread(self.hearing.hear, [self._req(pcm, sample_rate)]))[0]
        finally:
            self.heard += 1

    async def label_utterance(self, conversation_id: str, job: dict[str, Any]) -> dict[str, Any]:
        if self.gate is not None:
            self.at_gate.set()
            await self.gate.wait()
        feats = job["audio_features"] if "audio_features" in job else (
            self.hearing.features_of(np.frombuffer(job["pcm"], "<i2"), job["sample_rate"]) if job.get("pcm") else None)
        self.jobs.append({**job, "features": feats})
        return {"conversation_id": conversation_id, "utterance_id": job["utterance_id"], "speaker": job["speaker"],
                "start_ms": job["start_ms"], "end_ms": job["end_ms"], "text": job["text"], "label": "neutral",
                "probabilities": {"neutral": 1.0}, "score": 0.0, "seq": len(self.jobs), "is_final": True,
                "modalities": (["text"] if job["text"] else []) + (["audio"] if feats else []),
                **{k: job[k] for k in ("text_source", "asr_confidence") if job.get(k) is not None}}

    async def conversation_known(self, conversation_id: str) -> bool:
        return False

    async def admit_conversation(self, conversation_id: str) -> None:
        pass

    async def end_conversation(self, conversation_id: str) -> None:
        pass

    async def stored_finals(self, conversation_id: str) -> list[dict[str, Any]]:
        return []


async def stream(pipeline, samples: np.ndarray, spans: list[dict], transcripts: str = "none",
                 before_stop=None) -> tuple[list[dict], Any]:
    """Stream `samples` (n, 2) int16 in 100 ms frames; transcripts "none", "timely" (each once the audio
    passed its end) or "late" (all after the audio, while labelling is held at the pipeline's gate)."""
    from tracker.stream.session import StreamSession

    out: list[dict] = []

    async def send(msg: dict) -> None:
        out.append(msg)

    session = StreamSession(pipeline, send)
    await session.on_text(json.dumps({"type": "start", "conversation_id": f"c-{uuid.uuid4().hex[:6]}",
                                      "sample_rate": RATE, "channels": 2, "speakers": ["Agent", "Customer"]}))
    todo = sorted(spans, key=lambda u: u["end_ms"]) if transcripts == "timely" else []
    step = RATE // 10
    for i in range(0, samples.shape[0], step):
        await session.on_binary(samples[i:i + step].astype("<i2").tobytes())
        now_ms = (i + step) * 1000 // RATE
        while todo and todo[0]["end_ms"] <= now_ms:
            t = todo.pop(0)
            await session.on_text(json.dumps({"type": "transcript", **{k: t[k] for k in ("speaker", "text", "start_ms", "end_ms")}}))
        await asyncio.sleep(0)
    if transcripts == "late":  # once the first segment is being labelled and the released ones are recognized
        await asyncio.wait_for(pipeline.at_gate.wait(), 120)
        while pipeline.heard < pipeline.listened:
            await asyncio.sleep(0.05)
        for t in spans:
            await session.on_text(json.dumps({"type": "transcript", **{k: t[k] for k in ("speaker", "text", "start_ms", "end_ms")}}))
        pipeline.gate.set()
    if before_stop is not None:
        await before_stop(session)
    await session.on_text(json.dumps({"type": "stop"}))
    return out, session


def finals(messages: list[dict]) -> list[dict]:
    return [m for m in messages if m.get("type") == "utterance"]


def match(spans: list[dict], results: list[dict]) -> list[tuple[dict, dict]]:
    """Each spoken utterance with the one result that overlaps it on its speaker's channel."""
    pairs = []
    for truth in spans:
        mine = [r for r in results if r["speaker"] == truth["speaker"]
                and min(r["end_ms"], truth["end_ms"]) > max(r["start_ms"], truth["start_ms"])]
        assert len(mine) == 1, (truth, mine)
        pairs.append((truth, mine[0]))
    return pairs


# -- the session with speech recognition ------------------------------------------------------------

@pytest.mark.slow
def test_8khz_two_channel_call_without_transcripts_is_recognized(call8k, hearing):
    samples, spans = call8k
    pipe = LocalPipeline(hearing)
    out, session = asyncio.run(stream(pipe, samples, spans, "none"))
    assert [m for m in out if m["type"] == "error"] == []
    results = finals(out)
    assert len(results) == len(TURNS)
    for truth, r in match(spans, results):
        assert r["text_source"] == "asr" and r["text"].strip()
        assert 0.0 < r["asr_confidence"] <= 1.0
        assert r["modalities"] == ["text", "audio"]
        assert word_error_rate(truth["text"], r["text"]) <= 0.5, (truth["text"], r["text"])
    # one request per recognized segment carried its features too (none extracted again)
    assert pipe.listened == len(TURNS)
    assert all(j["features"] is not None and j["features"]["audio_functionals"].shape == (1, 88) for j in pipe.jobs)
    assert out[-1] == {"type": "stopped", "conversation_id": out[0]["conversation_id"], "results": len(TURNS)}


@pytest.mark.slow
def test_client_transcripts_win_and_asr_is_not_asked(call8k, hearing):
    samples, spans = call8k
    pipe = LocalPipeline(hearing)
    out, _ = asyncio.run(stream(pipe, samples, spans, "timely"))
    results = finals(out)
    assert len(results) == len(TURNS)
    for truth, r in match(spans, results):
        assert r["text"] == truth["text"] and r["text_source"] == "client" and "asr_confidence" not in r
    assert pipe.listened == 0


@pytest.mark.slow
def test_a_late_client_transcript_replaces_recognized_text_until_labelling(call8k, hearing):
    """Transcripts that come after their segments were recognized, but before the segments' turn to be
    labelled, win; the first segment was already being labelled: its transcript is dropped (its result is out)."""
    samples, spans = call8k
    pipe = LocalPipeline(hearing)
    pipe.gate = asyncio.Event()
    out, session = asyncio.run(stream(pipe, samples, spans, "late"))
    results = finals(out)
    assert len(results) == len(TURNS)  # no extra text-only result for a late transcript
    pairs = match(spans, results)
    assert pipe.listened >= len(TURNS) - 1  # the last segment may still be pending when its transcript comes
    first, rest = pairs[0], pairs[1:]
    assert first[1]["text_source"] == "asr"
    assert session.transcripts_dropped == 1
    for truth, r in rest:
        assert r["text"] == truth["text"] and r["text_source"] == "client" and "asr_confidence" not in r


@pytest.mark.slow
def test_asr_off_labels_segments_without_transcript_on_audio_only(call8k, hearing):
    samples, spans = call8k
    pipe = LocalPipeline(hearing, asr=False)
    out, _ = asyncio.run(stream(pipe, samples, spans, "none"))
    results = finals(out)
    assert len(results) == len(TURNS)
    for r in results:
        assert r["text"] == "" and r["text_source"] is None and "asr_confidence" not in r
        assert r["modalities"] == ["audio"]
    assert pipe.listened == 0


@pytest.mark.slow
def test_utterance_events_with_audio_and_no_text_are_recognized(call8k, hearing):
    import base64

    from tracker.stream.session import StreamSession

    samples, spans = call8k
    u = spans[1]
    pcm = samples[u["start_ms"] * RATE // 1000:u["end_ms"] * RATE // 1000, u["channel"]].astype("<i2").tobytes()
    pipe, out = LocalPipeline(hearing), []

    async def go():
        async def send(msg):
            out.append(msg)

        session = StreamSession(pipe, send)
        await session.on_text(json.dumps({"type": "start", "conversation_id": "ev", "sample_rate": RATE, "channels": 2,
                                          "speakers": ["Agent", "Customer"]}))
        audio = base64.b64encode(pcm).decode()
        await session.on_text(json.dumps({"type": "utterance", "utterance_id": "a", "speaker": u["speaker"], "audio": audio}))
        await session.on_text(json.dumps({"type": "utterance", "utterance_id": "b", "speaker": u["speaker"], "audio": audio,
                                          "text": "Client text."}))
        await session.on_text(json.dumps({"type": "stop"}))

    asyncio.run(go())
    a, b = finals(out)
    assert a["text_source"] == "asr" and word_error_rate(u["text"], a["text"]) <= 0.5
    assert b["text"] == "Client text." and b["text_source"] == "client"
    assert pipe.listened == 1


@pytest.mark.slow
def test_hearing_batches_transcripts_and_reports_its_cost(call8k, hearing):
    samples, spans = call8k
    from tracker.audio.hearing import HearRequest

    reqs = []
    for u in spans:
        a, b = u["start_ms"] * RATE // 1000, u["end_ms"] * RATE // 1000
        reqs.append(HearRequest(samples[a:b, u["channel"]].astype("<i2").tobytes(), RATE))
    before = dict(hearing.counts)
    out = hearing.hear(reqs + [HearRequest(reqs[0].pcm, RATE, transcribe=False)])
    assert hearing.counts["asr_batches"] == before["asr_batches"] + 1  # one recognizer call for the batch
    assert [o["transcript"] is not None for o in out] == [True] * len(spans) + [False]
    assert word_error_rate([u["text"] for u in spans], [o["transcript"]["text"] for o in out[:-1]]) <= 0.35
    assert all(o["audio_features"]["audio_functionals"].shape == (1, 88) for o in out)


# -- config -------------------------------------------------------------------------------------------

def test_serve_config_asr_modes_and_speech_settings():
    from services.config import load_app_config
    from tracker.audio.hearing import resolve_asr

    assert load_app_config({}).asr == "auto"
    assert load_app_config({"asr": False}).asr == "off"  # YAML's bare `off`
    assert load_app_config({"asr": True}).asr == "on"
    cfg = load_app_config({"asr": "on", "speech": {"model": "base", "compute_type": "int8", "batch_wait_timeout_s": 0.1}})
    assert cfg.speech.asr_config().model == "base" and cfg.speech.asr_config().compute_type == "int8"
    with pytest.raises(ConfigError, match="asr: expected on, off or auto"):
        load_app_config({"asr": "sometimes"})
    with pytest.raises(ConfigError, match="speech.compute_type"):
        load_app_config({"speech": {"compute_type": "int3"}})
    with pytest.raises(ConfigError, match="speech.batch_wait_timeout_s"):
        load_app_config({"speech": {"batch_wait_timeout_s": -1}})
    assert resolve_asr("off", "tiny.en") == (False, "asr: off")
    assert resolve_asr("on", "/nowhere") == (True, "")  # on insists: the recognizer fails loudly at load
    on, why = resolve_asr("auto", "/nowhere")
    assert not on and "/nowhere" in why


def test_serve_config_files_name_asr():
    from services.config import read_serve_file
    from tests.conftest import REPO

    for name in ("local.yaml", "gpu.yaml"):
        app = read_serve_file(REPO / "configs" / "serve" / name).app
        assert app.asr in ("on", "off", "auto") and app.speech.model in ("tiny.en", "base")


# -- speaker normalisation state in Redis -----------------------------------------------------------

@pytest.fixture
def astore(redis_url):
    """A store with its own key prefix (the ops run the same on the sync and the async store)."""
    from tracker.context import ConversationStore, StoreConfig
    from tracker.labels import MELD7

    with ConversationStore(redis_url, StoreConfig(key_prefix=f"t{uuid.uuid4().hex[:8]}", ttl_seconds=600), MELD7) as s:
        yield s


def _normalizers(dim: int = 6):
    from tracker.audio.speaker_norm import SpeakerNormalizer

    rng = np.random.default_rng(1)
    return {"audio_functionals": SpeakerNormalizer(rng.normal(size=dim), rng.uniform(0.5, 2.0, size=dim))}


def test_speaker_norm_state_in_redis_is_past_only_and_idempotent_on_retry(astore, redis_url):
    from tracker.audio.speaker_norm import SpeakerStats
    from tracker.context.speaker_norm import SpeakerNormOps

    norms = _normalizers()
    ops = SpeakerNormOps(astore.config, astore.tenant)
    rng = np.random.default_rng(0)
    utts = [{"audio_functionals": rng.normal(3.0, 2.0, size=(1, 6)).astype(np.float32), "audio": np.ones((4, 25))}
            for _ in range(5)]
    raw = redis.Redis.from_url(redis_url)
    key = ops.keys.speaker_norm("conv", "Ann")

    def go():
        ref, out = norms["audio_functionals"].new_stats(), []
        for i, f in enumerate(utts):
            got = astore.run(ops.normalize("conv", "Ann", f"u{i}", f, norms))
            expected = norms["audio_functionals"].normalize(f["audio_functionals"], ref)  # the past only
            ref.update(f["audio_functionals"])
            np.testing.assert_allclose(got["audio_functionals"], expected, rtol=1e-5, atol=1e-5)
            assert got["audio"] is f["audio"]  # not normalised: untouched
            out.append(got)
            if i == 2:  # a retry of the utterance just added: same features, same bytes in Redis
                before = raw.hgetall(key)
                again = astore.run(ops.normalize("conv", "Ann", f"u{i}", f, norms))
                np.testing.assert_array_equal(again["audio_functionals"], got["audio_functionals"])
                assert raw.hgetall(key) == before
        return out, ref

    out, ref = go()
    np.testing.assert_array_equal(out[0]["audio_functionals"], utts[0]["audio_functionals"])  # no past: identity
    h = {k.decode(): v.decode() for k, v in raw.hgetall(key).items()}
    assert h["last"] == "u4" and h["n"] == "5"
    stored = SpeakerStats.from_dict(json.loads(h["audio_functionals"]))
    assert stored.utterances == 5 and stored.frames == 5
    np.testing.assert_allclose(stored.mean, ref.mean, rtol=1e-6)
    assert 0 < raw.ttl(key) <= 600
    state = astore.run(ops.state("conv", "Ann"))
    assert state["n"] == 5 and state["stats"]["audio_functionals"].utterances == 5
    # speakers and conversations are kept apart; a malformed stored state starts afresh instead of failing
    raw.hset(ops.keys.speaker_norm("conv", "Bob"), mapping={"audio_functionals": "{not json", "last": "x"})
    got = astore.run(ops.normalize("conv", "Bob", "b0", utts[1], norms))
    np.testing.assert_array_equal(got["audio_functionals"], utts[1]["audio_functionals"])
    assert SpeakerStats.from_dict(json.loads(raw.hget(ops.keys.speaker_norm("conv", "Bob"), "audio_functionals"))).utterances == 1
    # deleting the conversation deletes the state
    astore.append("conv", {"utterance_id": "u0", "speaker": "Ann", "start_ms": 0, "end_ms": 1, "text": "hi",
                           "label": "neutral", "is_final": True})
    astore.delete_conversation("conv")
    assert not raw.exists(key)


def test_speaker_norm_commit_refuses_a_stale_read(astore, redis_url):
    """Two writers of one speaker's state: the second, which read before the first wrote, reads again."""
    from tracker.context.speaker_norm import SpeakerNormOps

    norms = _normalizers()
    ops = SpeakerNormOps(astore.config, astore.tenant)
    f = {"audio_functionals": np.full((1, 6), 2.0, dtype=np.float32)}
    first = ops.normalize("c", "Ann", "u1", f, norms)
    step = next(first)  # u1 has read the (empty) state ...
    astore.run(ops.normalize("c", "Ann", "u0", f, norms))  # ... u0 commits meanwhile
    s = first.send(astore._step(step))  # u1 computes from the stale read and tries to commit: refused, reads again
    while True:
        try:
            s = first.send(astore._step(s))
        except StopIteration:
            break
    state = astore.run(ops.state("c", "Ann"))
    assert state["n"] == 2 and state["last"] == "u1" and state["stats"]["audio_functionals"].utterances == 2


def test_normalizers_from_checkpoint_match_the_recognizer(tmp_path, tiny_backbone):
    import torch

    from tracker.context.speaker_norm import normalizers_from_checkpoint
    from tracker.model.adapter import AdapterConfig, ModalityConfig
    from tracker.model.recognizer import EmotionRecognizer, RecognizerConfig

    mods = [ModalityConfig("audio_functionals", 88, source="egemaps_functionals", speaker_norm=True),
            ModalityConfig("audio", 25, source="egemaps_lld")]
    rec = EmotionRecognizer(tiny_backbone, RecognizerConfig(backbone="tiny", dtype="fp32",
                                                            adapter=AdapterConfig(d_model=32, n_pseudo_tokens=4, modalities=mods)))
    with torch.no_grad():
        rec.adapter.norm_mean_audio_functionals.copy_(torch.linspace(-1, 1, 88))
        rec.adapter.norm_std_audio_functionals.copy_(torch.linspace(0.5, 2, 88))
    path = rec.save_pretrained(tmp_path / "ckpt")
    got, want = normalizers_from_checkpoint(path), rec.speaker_normalizers()
    assert list(got) == list(want) == ["audio_functionals"]
    np.testing.assert_allclose(got["audio_functionals"].global_mean, want["audio_functionals"].global_mean)
    np.testing.assert_allclose(got["audio_functionals"].global_std, want["audio_functionals"].global_std)


def test_replay_in_process_normalises_per_speaker_past_only(tiny_backbone):
    """Replay normalises like the service: per (conversation, speaker), in utterance order."""
    from clients.replay import replay_in_process
    from tracker.data.records import Conversation, Utterance
    from tracker.model.adapter import AdapterConfig, ModalityConfig
    from tracker.model.recognizer import EmotionRecognizer, RecognizerConfig

    mods = [ModalityConfig("audio_functionals", 88, source="egemaps_functionals", speaker_norm=True)]
    rec = EmotionRecognizer(tiny_backbone, RecognizerConfig(backbone="tiny", dtype="fp32",
                                                            adapter=AdapterConfig(d_model=32, n_pseudo_tokens=4, modalities=mods)))
    rng = np.random.default_rng(0)
    clips = {f"/clip{i}.wav": rng.normal(5.0, 3.0, size=(1, 88)).astype(np.float32) for i in range(4)}

    class Features:
        names = ["audio_functionals"]

        def from_file(self, path, start=None, end=None):
            return {"audio_functionals": clips[path]}

    seen = []
    rec.predict = lambda items, batch_size=8: (seen.extend(items), EmotionRecognizer.predict(rec, items, batch_size))[1]
    utts = [Utterance(conversation_id="c", utterance_id=f"u{i}", index=i, speaker="AB"[i % 2], text="hello",
                      label="neutral", audio_path=f"/clip{i}.wav")
            for i in range(4)]
    replay_in_process(rec, [Conversation("c", utts)], features=Features())
    norm = rec.speaker_normalizers()["audio_functionals"]
    st = {"A": norm.new_stats(), "B": norm.new_stats()}
    for utt, item in zip(utts, seen):
        expected = norm.step(clips[utt.audio_path], st[utt.speaker])
        np.testing.assert_allclose(item.features["audio_functionals"], expected, rtol=1e-6)
    np.testing.assert_array_equal(seen[0].features["audio_functionals"], clips["/clip0.wav"])  # first: no past


@pytest.mark.slow
def test_local_pipeline_recognizes_and_keeps_speaker_norm_state(call8k, hearing, redis_url, tiny_backbone):
    """tracker.stream.pipeline.LocalPipeline: the in-process pipeline recognizes like the service and keeps
    each speaker's normalisation statistics in Redis."""
    from tracker.context import AsyncConversationStore, StoreConfig
    from tracker.labels import MELD7
    from tracker.model.adapter import AdapterConfig, ModalityConfig
    from tracker.model.recognizer import EmotionRecognizer, RecognizerConfig
    from tracker.stream.pipeline import LocalPipeline

    mods = [ModalityConfig("audio_functionals", 88, source="egemaps_functionals", speaker_norm=True)]
    rec = EmotionRecognizer(tiny_backbone, RecognizerConfig(backbone="tiny", dtype="fp32",
                                                            adapter=AdapterConfig(d_model=32, n_pseudo_tokens=4, modalities=mods)))
    samples, spans = call8k
    prefix = f"t{uuid.uuid4().hex[:8]}"

    async def go():
        store = AsyncConversationStore(redis_url, StoreConfig(key_prefix=prefix), MELD7)
        pipe = LocalPipeline(rec, store, hearing.features, hearing=hearing)
        assert pipe.asr and set(pipe.normalizers) == {"audio_functionals"}
        out, _ = await stream(pipe, samples, spans, "none")
        await store.aclose()
        return out

    out = asyncio.run(go())
    results = finals(out)
    assert len(results) == len(TURNS)
    for truth, r in match(spans, results):
        assert r["text_source"] == "asr" and word_error_rate(truth["text"], r["text"]) <= 0.5
    raw = redis.Redis.from_url(redis_url)
    cid = out[0]["conversation_id"]
    for speaker in ("Agent", "Customer"):
        h = raw.hgetall(f"{prefix}:default:conv:{cid}:spk:{speaker}:norm")
        assert int(h[b"n"]) == sum(1 for s, _ in TURNS if s == speaker)
