"""Speech recognition and speaker normalisation in the real service (Ray Serve, a real Redis, websockets).

An 8 kHz two-channel call voiced with espeak-ng is streamed without transcripts: every final result
carries recognized text (packaged Whisper tiny.en) with `text_source: "asr"`; streamed with its
transcripts, the client's text wins. The served checkpoint (tiny random backbone) normalises its
acoustic modality per speaker, so each speaker's statistics are in Redis, one utterance each.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
import redis

from tests.conftest import start_test_service
from tests.test_speech_session import RATE, TURNS
from tracker.audio.asr import word_error_rate

pytestmark = [pytest.mark.service, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def call8k():
    from tracker.audio.pcm import resample
    from tracker.audio.synth import have_espeak, voice_conversation

    if not have_espeak():
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    voiced = voice_conversation(TURNS, gap_ms=800)
    spans = [{k: u[k] for k in ("speaker", "text", "start_ms", "end_ms")} for u in voiced.utterances]
    return resample(voiced.samples, voiced.sample_rate, RATE), voiced.speakers, spans


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_backbone):
    import torch

    from tracker.audio.hearing import asr_available
    from tracker.model.adapter import AdapterConfig, ModalityConfig
    from tracker.model.recognizer import EmotionRecognizer, RecognizerConfig

    ok, why = asr_available("tiny.en")
    if not ok:
        pytest.skip(why)
    torch.manual_seed(0)
    mods = [ModalityConfig("audio_functionals", 88, source="egemaps_functionals", speaker_norm=True)]
    config = RecognizerConfig(backbone="tiny", dtype="fp32", adapter=AdapterConfig(d_model=32, n_pseudo_tokens=4, modalities=mods))
    ckpt = EmotionRecognizer(tiny_backbone, config).save_pretrained(tmp_path_factory.mktemp("ckpt") / "tiny-norm")
    svc = start_test_service(ckpt, {"asr": "on", "speech": {"model": "tiny.en", "threads": 1, "beam_size": 5}})
    yield svc
    svc.stop()


def _stream(service, samples, speakers, transcripts):
    from clients.stream_client import Recording, stream_recording

    cid = f"asr-{uuid.uuid4().hex[:8]}"
    out = asyncio.run(stream_recording(service.ws_url, cid, Recording(samples, RATE, speakers, transcripts), speed=4.0,
                                       headers=service.auth_headers))
    assert out.errors == []
    return cid, [r for r in out.results if r["is_final"]]


def _match(spans, finals):
    for truth in spans:
        mine = [r for r in finals if r["speaker"] == truth["speaker"]
                and min(r["end_ms"], truth["end_ms"]) > max(r["start_ms"], truth["start_ms"])]
        assert len(mine) == 1, (truth, mine)
        yield truth, mine[0]


def test_call_without_transcripts_gets_recognized_text_and_speaker_norm_state(service, call8k):
    from ray import serve

    samples, speakers, spans = call8k
    cid, finals = _stream(service, samples, speakers, [])
    assert len(finals) == len(TURNS)
    for truth, r in _match(spans, finals):
        assert r["text_source"] == "asr" and 0 < r["asr_confidence"] <= 1
        assert word_error_rate(truth["text"], r["text"]) <= 0.5, (truth["text"], r["text"])
        assert r["modalities"] == ["text", "audio"]
    # stored as sent (REST reads Redis)
    import httpx

    conv = httpx.get(f"{service.http_url}/v1/conversations/{cid}", timeout=30, headers=service.auth_headers).json()
    assert [(u["text"], u["text_source"], u["asr_confidence"]) for u in conv["utterances"]] == \
        [(r["text"], "asr", r["asr_confidence"]) for r in finals]
    # each speaker's normalisation statistics: one utterance each time it spoke, none counted twice
    raw = redis.Redis.from_url(service.args["redis_url"])
    for speaker in speakers:
        keys = list(raw.scan_iter(match=f"*{cid}:spk:{speaker}:norm"))
        assert len(keys) == 1
        h = {k.decode(): v.decode() for k, v in raw.hgetall(keys[0]).items()}
        spoken = sum(1 for s, _ in TURNS if s == speaker)
        assert int(h["n"]) == spoken and json.loads(h["audio_functionals"])["utterances"] == spoken
    # a retried utterance changes no byte in Redis: `begin` answers it with its stored final, and the
    # state it reads says it was added already; a retried commit (a duplicate) writes nothing either
    import numpy as np

    from tracker.context.speaker_norm import NormWrite, normalize_with_state

    context = serve.get_deployment_handle("ContextAggregator", app_name="tracker")
    model = serve.get_deployment_handle("EmotionModel", app_name="tracker")
    key = next(raw.scan_iter(match=f"*{cid}:spk:{speakers[0]}:norm"))
    before = raw.hgetall(key)
    last = before[b"last"].decode()
    begun = context.begin.remote(cid, last, speakers[0], tenant="default").result()
    assert begun.final is not None and begun.final["utterance_id"] == last
    assert begun.speaker_state == {k.decode(): v.decode() for k, v in before.items()}
    feats = {"audio_functionals": np.ones((1, 88), dtype=np.float32)}
    normalizers = model.speaker_normalizers.remote().result()
    out, write = normalize_with_state(begun.speaker_state, last, feats, normalizers)
    assert write is None and out["audio_functionals"].shape == (1, 88)
    record = {k: begun.final[k] for k in ("utterance_id", "speaker", "start_ms", "end_ms", "text", "label", "probabilities",
                                          "score", "is_final")}
    stale = NormWrite("another-utterance", ("audio_functionals", "{}", "{}"), feats)
    again = context.commit.remote(cid, record, stale, tenant="default").result()
    assert again["seq"] == begun.final["seq"] and raw.hgetall(key) == before
    # the cost of recognition in the service (FeatureExtractor's own clock)
    info = serve.get_deployment_handle("FeatureExtractor", app_name="tracker").info.remote().result()
    assert info["asr"] and info["recognized"] >= len(TURNS) and info["asr_model"] == "tiny.en"
    print(f"\nASR in the service: {info['asr_seconds'] / info['recognized']:.2f} s per utterance "
          f"({info['recognized']} utterances in {info['asr_batches']} batches); "
          f"features {info['features_seconds'] / max(1, info['featurized']):.3f} s per utterance")


def test_client_transcripts_win_in_the_service(service, call8k):
    samples, speakers, spans = call8k
    _, finals = _stream(service, samples, speakers, spans)
    assert len(finals) == len(TURNS)
    for truth, r in _match(spans, finals):
        assert r["text"] == truth["text"] and r["text_source"] == "client" and "asr_confidence" not in r


def test_two_calls_at_once_share_recognizer_batches(service, call8k):
    """Segments of concurrent conversations reach the FeatureExtractor together and are recognized in shared calls."""
    from ray import serve

    from clients.stream_client import Recording, stream_recording

    samples, speakers, spans = call8k
    handle = serve.get_deployment_handle("FeatureExtractor", app_name="tracker")
    before = handle.info.remote().result()

    async def both():
        return await asyncio.gather(*(stream_recording(service.ws_url, f"pair-{i}-{uuid.uuid4().hex[:6]}",
                                                       Recording(samples, RATE, speakers, []), speed=4.0,
                                                       headers=service.auth_headers) for i in range(2)))

    outs = asyncio.run(both())
    for out in outs:
        assert out.errors == []
        finals = [r for r in out.results if r["is_final"]]
        assert len(finals) == len(TURNS) and all(r["text_source"] == "asr" for r in finals)
    after = handle.info.remote().result()
    n = after["recognized"] - before["recognized"]
    calls = after["asr_batches"] - before["asr_batches"]
    assert n == 2 * len(TURNS) and calls <= n
    print(f"\ntwo calls at once: {n} utterances recognized in {calls} recognizer calls, "
          f"{(after['asr_seconds'] - before['asr_seconds']) / n:.2f} s per utterance")
