"""`tracker replay`: run recorded dialogues through the tracker, in-process or through a running service.

In-process, each conversation's utterances are labelled in order with the same past-only context
the live service uses (the model's context window), either offline in batches (as `tracker eval`) or,
with ``live``, through the live path in this process (StreamSession over
tracker.stream.pipeline.LocalPipeline, context in Redis); through a service, each conversation is sent as
`utterance` events over the streaming protocol and the service keeps the context in Redis. Either
way the predictions are written as JSONL, and a metrics report follows when the data has labels.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from tracker.data import labels_read_as, load_dataset
from tracker.data.records import Conversation
from tracker.stream import protocol as P
from tracker.metrics import CalibrationReport, ClassificationReport, calibration_report, classification_report


def replay_in_process(recognizer, conversations: list[Conversation], batch_size: int = 8, features=None) -> list[dict[str, Any]]:
    """Label every utterance with its past context; one prediction record per utterance, in order.

    `features` (a tracker.audio.modalities.ModalityFeatures) computes the acoustic inputs; None = text only.
    Modalities the model normalises per speaker (``speaker_norm``) are normalised as the service does:
    against the speaker's earlier utterances in the same conversation only.
    """
    from tracker.data.records import iter_examples
    from tracker.types import UtteranceInput

    prompt = recognizer.config.prompt
    pairs = list(iter_examples(conversations, k=prompt.context_turns, min_k=prompt.context_min_turns))
    items = []
    normalizers = recognizer.speaker_normalizers()
    stats: dict[tuple[str, str, str], Any] = {}  # (conversation, speaker, modality) -> SpeakerStats, in utterance order
    for utt, ctx in pairs:
        feats = features.from_file(utt.audio_path, utt.start_s, utt.end_s) if features is not None and utt.audio_path else {}
        for name, norm in normalizers.items():
            if name in feats:
                st = stats.setdefault((utt.conversation_id, utt.speaker, name), norm.new_stats())
                feats[name] = norm.step(feats[name], st)
        items.append(UtteranceInput(utt.text, utt.speaker, tuple(ctx), feats))
    preds = recognizer.predict(items, batch_size=batch_size)
    return [_record(utt, p.label, p.probabilities) for (utt, _), p in zip(pairs, preds)]


def replay_live_in_process(recognizer, conversations: list[Conversation], features=None, concurrency: int = 4,
                           redis_url: str | None = None) -> list[dict[str, Any]]:
    """Like `replay_through_service`, without a service: each conversation is sent as `utterance`
    events into a StreamSession over the in-process pipeline (tracker.stream.pipeline.LocalPipeline),
    which keeps the context in Redis (`redis_url`, else a private embedded Redis for this run)."""
    from tracker.context.redis_server import EmbeddedRedis
    from tracker.context.store import AsyncConversationStore
    from tracker.stream import protocol as P
    from tracker.stream.pipeline import LocalPipeline
    from tracker.stream.session import StreamSession

    run_id = f"replay-{uuid.uuid4().hex[:6]}"
    server = None if redis_url else EmbeddedRedis()
    if server is not None:
        server.start()
        redis_url = server.url

    async def go() -> list[dict[str, dict]]:
        store = AsyncConversationStore(redis_url, label_set=recognizer.label_set)
        pipeline = LocalPipeline(recognizer, store, features)
        sem = asyncio.Semaphore(concurrency)

        async def one(conv: Conversation) -> dict[str, dict]:
            results: dict[str, dict] = {}

            async def send(msg: dict[str, Any]) -> None:
                if msg.get("type") == "utterance" and msg.get("is_final"):
                    results[msg["utterance_id"]] = msg
                elif msg.get("type") == "error":
                    raise RuntimeError(f"error {msg['code']}: {msg['message']}")

            async with sem:
                session = StreamSession(pipeline, send)
                speakers = list(dict.fromkeys(u.speaker for u in conv.utterances))
                await session.on_text(json.dumps(P.start_message(f"{run_id}-{conv.conversation_id}", speakers)))
                for utt in conv.utterances:
                    await session.on_text(json.dumps(_utterance_event(utt, P.DEFAULT_SAMPLE_RATE)))
                await session.on_text(json.dumps(P.stop_message()))
                await session.close()
            return results

        try:
            return await asyncio.gather(*(one(c) for c in conversations))
        finally:
            await store.aclose()

    try:
        per_conv = asyncio.run(go())
    finally:
        if server is not None:
            server.stop()
    return _collect(conversations, per_conv)


def _utterance_event(utt, sample_rate: int) -> dict[str, Any]:
    from tracker.stream import protocol as P

    audio = None
    if utt.audio_path:
        from tracker.audio.pcm import numpy_to_pcm16, read_audio

        samples, _ = read_audio(utt.audio_path, dtype="float32", target_rate=sample_rate, start=utt.start_s, end=utt.end_s)
        audio = numpy_to_pcm16(samples)
    return P.utterance_message(utt.speaker, utt.text, utterance_id=utt.utterance_id, audio=audio)


def _collect(conversations: list[Conversation], per_conv: list[dict[str, dict]]) -> list[dict[str, Any]]:
    out = []
    for conv, res in zip(conversations, per_conv):
        for utt in conv.utterances:
            r = res.get(utt.utterance_id)
            if r is None:
                raise RuntimeError(f"no result for {utt.utterance_id}")
            out.append(_record(utt, r["label"], r["probabilities"]))
    return out


def _record(utt, label: str, probabilities: dict[str, float]) -> dict[str, Any]:
    return {"conversation_id": utt.conversation_id, "utterance_id": utt.utterance_id, "speaker": utt.speaker,
            "text": utt.text, "gold": utt.label, "label": label, "probabilities": probabilities}


async def _replay_conversation(url: str, conv: Conversation, run_id: str, speed: float,
                               sample_rate: int = P.DEFAULT_SAMPLE_RATE,
                               headers: dict[str, str] | None = None) -> dict[str, dict]:
    import websockets

    speakers = list(dict.fromkeys(u.speaker for u in conv.utterances))
    results: dict[str, dict] = {}
    async with websockets.connect(url, max_size=2**24, additional_headers=headers) as ws:
        await ws.send(json.dumps(P.start_message(f"{run_id}-{conv.conversation_id}", speakers, sample_rate=sample_rate)))

        async def reader() -> None:
            async for raw in ws:
                msg = json.loads(raw)
                if msg.get("type") == "utterance" and msg.get("is_final"):
                    results[msg["utterance_id"]] = msg
                elif msg.get("type") == "error":
                    raise RuntimeError(f"service error {msg['code']}: {msg['message']}")
                elif msg.get("type") == "stopped":
                    return

        task = asyncio.create_task(reader())
        for utt in conv.utterances:
            await ws.send(json.dumps(_utterance_event(utt, sample_rate)))
            if speed > 0:
                await asyncio.sleep(1.0 / speed)  # a turn a second at speed 1
        await ws.send(json.dumps(P.stop_message()))
        await asyncio.wait_for(task, timeout=600)
    return results


def replay_through_service(url: str, conversations: list[Conversation], speed: float = 0.0, concurrency: int = 4,
                           headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Send each conversation to a running service; conversations run `concurrency` at a time."""
    run_id = f"replay-{uuid.uuid4().hex[:6]}"

    async def go() -> list[dict[str, dict]]:
        sem = asyncio.Semaphore(concurrency)

        async def one(conv: Conversation) -> dict[str, dict]:
            async with sem:
                return await _replay_conversation(url, conv, run_id, speed, headers=headers)

        return await asyncio.gather(*(one(c) for c in conversations))

    return _collect(conversations, asyncio.run(go()))


def report_for(records: list[dict[str, Any]], labels: list[str]) -> ClassificationReport | None:
    scored = [r for r in records if r.get("gold") in labels]
    if not scored:
        return None
    return classification_report([labels.index(r["gold"]) for r in scored], [labels.index(r["label"]) for r in scored], labels)


def calibration_for(records: list[dict[str, Any]], labels: list[str]) -> CalibrationReport:
    """ECE (15 bins) of the replayed probabilities, as `tracker eval` reports it."""
    scored = [r for r in records if r.get("gold") in labels]
    probs = np.array([[r["probabilities"][lab] for lab in labels] for r in scored])
    return calibration_report(probs, [labels.index(r["gold"]) for r in scored])


def run_replay(data: str, checkpoint: str | None, through: str | None, speed: float, out_path: str | None,
               report_path: str | None, limit: int = 0, batch_size: int = 8, api_key: str | None = None,
               live: bool = False) -> int:
    from tracker.model.recognizer import EmotionRecognizer
    from tracker.model.default import default_checkpoint

    ckpt = checkpoint or str(default_checkpoint())
    recognizer = EmotionRecognizer.from_pretrained(ckpt) if not through else None
    if recognizer is not None:
        label_set = recognizer.label_set
    else:
        from tracker.labels import LabelSet
        from tracker.model.checkpoint import read_config

        label_set = LabelSet.from_dict(read_config(ckpt)["label_set"])
    conversations = load_dataset(data, label_set=labels_read_as(data, label_set.name) or None)
    if limit:
        conversations = conversations[:limit]
    if through:
        url = through.rstrip("/")
        url = url if url.endswith("/v1/stream") else url.replace("http://", "ws://").replace("https://", "wss://") + "/v1/stream"
        from clients.local import auth_headers, resolve_api_key

        records = replay_through_service(url, conversations, speed, headers=auth_headers(resolve_api_key(api_key)))
    else:
        from tracker.audio.modalities import ModalityFeatures

        features = ModalityFeatures(recognizer.config.adapter.modalities)
        if live:  # the live path in this process: StreamSession + LocalPipeline + Redis
            records = replay_live_in_process(recognizer, conversations, features)
        else:
            records = replay_in_process(recognizer, conversations, batch_size, features)
    out_path = out_path or f"predictions-{data.replace(':', '_').replace('/', '_')}.jsonl"
    with open(out_path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"{len(records)} predictions written to {out_path}")
    report = report_for(records, list(label_set.labels))
    if report is not None:
        calib = calibration_for(records, list(label_set.labels))
        print(report.to_text())
        print(f"\ncalibration: ECE {100 * calib.ece:.2f}% over {calib.bins} bins")
        if report_path:
            Path(report_path).write_text(json.dumps({**report.to_dict(), "calibration": calib.to_dict()}, indent=2))
    return 0
