"""A StreamSession over an in-process pipeline that commits through the AlertEngine (real Redis):
alert messages follow the result that caused them, a retried utterance repeats them, and the
session's observer (the service's metrics hooks) sees queueing, finals and errors."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest

from tracker.alerts import AlertEngine, EscalationConfig
from tracker.context import StoreConfig
from tracker.context.store import AsyncConversationStore
from tracker.labels import MELD7
from tracker.stream import protocol as P
from tracker.stream.session import StreamSession


class EnginePipeline:
    """Labels `anger` when the text ends with '!', else `neutral`; stores through `AlertEngine.append`."""

    def __init__(self, engine: AlertEngine) -> None:
        self.engine = engine
        self.refine_info = None

    async def label_utterance(self, conversation_id: str, job: dict[str, Any]) -> dict[str, Any]:
        label = "anger" if job["text"].rstrip().endswith("!") else "neutral"
        record = {"conversation_id": conversation_id, "utterance_id": job["utterance_id"], "speaker": job["speaker"],
                  "start_ms": job["start_ms"], "end_ms": job["end_ms"], "text": job["text"], "label": label,
                  "probabilities": {label: 1.0}, "score": -0.7 if label == "anger" else 0.0, "is_final": True}
        done = await self.engine.append(conversation_id, record)  # a retry: the record stored first
        return {**done.record, "alerts": [e.to_dict() for e in done.events]}

    async def conversation_known(self, conversation_id: str) -> bool:
        return await self.engine.store.exists(conversation_id)

    async def admit_conversation(self, conversation_id: str) -> None:
        return None  # no tenant limits here

    async def end_conversation(self, conversation_id: str) -> None:
        await self.engine.store.end_conversation(conversation_id)

    async def stored_finals(self, conversation_id: str) -> list[dict[str, Any]]:
        return await self.engine.store.history(conversation_id)


class Observer:
    def __init__(self) -> None:
        self.depth, self.max_depth, self.latencies, self.errors = 0, 0, [], []

    def queued(self, delta: int) -> None:
        self.depth += delta
        self.max_depth = max(self.max_depth, self.depth)

    def final_sent(self, record: dict[str, Any], seconds: float) -> None:
        self.latencies.append((record["utterance_id"], seconds))

    def error_sent(self, code: int) -> None:
        self.errors.append(code)


def test_alert_messages_follow_their_result_and_a_retry_repeats_them_and_the_observer_sees_it_all(redis_server):
    turns = [("Customer", "No!"), ("Agent", "Sorry!"), ("Customer", "Never!"), ("Customer", "Stop it!"),
             ("Customer", "ok"), ("Customer", "fine"), ("Customer", "thanks")]

    async def go():
        prefix = f"t{uuid.uuid4().hex[:8]}"
        async with AsyncConversationStore(redis_server.url, StoreConfig(key_prefix=prefix), MELD7) as store:
            engine = AlertEngine(store, EscalationConfig(speakers=["Customer"]))
            sent: list[dict] = []

            async def send(msg: dict) -> None:
                sent.append(msg)

            observer = Observer()
            session = StreamSession(EnginePipeline(engine), send, observer=observer)
            await session.on_text(json.dumps({"type": "start", "conversation_id": "c1", "channels": 2,
                                              "speakers": ["Customer", "Agent"]}))
            for i, (speaker, text) in enumerate(turns):
                await session.on_text(json.dumps({"type": "utterance", "utterance_id": f"u{i}", "speaker": speaker,
                                                  "text": text, "start_ms": 1000 * i, "end_ms": 1000 * i + 500}))
            await session.on_text(json.dumps({"type": "utterance", "utterance_id": "u3", "speaker": "Customer",
                                              "text": "Stop it!", "start_ms": 3000, "end_ms": 3500}))  # a retry
            await session.on_text(json.dumps({"type": "hello"}))  # 4001, not fatal
            await session.on_text(json.dumps({"type": "stop"}))
            return sent, observer, await engine.events("c1")

    sent, observer, stored = asyncio.run(go())
    flow = [(m["type"], m.get("utterance_id"), m.get("kind")) for m in sent if m["type"] in ("utterance", "alert")]
    assert flow == [
        ("utterance", "u0", None), ("utterance", "u1", None), ("utterance", "u2", None),
        ("utterance", "u3", None), ("alert", "u3", "raised"),  # 3 of the Customer's 3 (the Agent is not watched)
        ("utterance", "u4", None), ("utterance", "u5", None),
        ("utterance", "u6", None), ("alert", "u6", "cleared"),  # 1 of the last 4
        ("utterance", "u3", None), ("alert", "u3", "raised"),  # the retry: the stored result and its event again
    ]
    alerts = [m for m in sent if m["type"] == "alert"]
    assert alerts[0] == alerts[2] == P.alert_message(stored[0].to_dict())
    assert alerts[1] == P.alert_message(stored[1].to_dict()) and len(stored) == 2
    assert set(alerts[0]) == {"type", *P.ALERT_FIELDS}
    assert [u for u, _ in observer.latencies] == [f"u{i}" for i in range(len(turns))] + ["u3"]
    assert all(0 <= s < 30 for _, s in observer.latencies)
    assert observer.depth == 0 and observer.max_depth >= 1
    assert observer.errors == [P.UNKNOWN_TYPE]
    assert sent[-1]["type"] == "stopped"


def test_the_metrics_exposition_is_summed_over_rays_labels():
    from services.metrics import parse_exposition

    text = "\n".join([
        '# TYPE ray_tracker_utterances_labelled_total counter',
        'ray_tracker_utterances_labelled_total{Component="core_worker",WorkerId="a",final="true"} 3.0',
        'ray_tracker_utterances_labelled_total{Component="core_worker",WorkerId="b",final="true"} 2.0',
        'ray_tracker_utterances_labelled_total{Component="core_worker",WorkerId="b",final="false"} 1.0',
        'ray_tracker_final_latency_seconds_bucket{WorkerId="a",le="0.5"} 4.0',
        'ray_tracker_final_latency_seconds_bucket{WorkerId="a",le="+Inf"} 5.0',
        'ray_tracker_final_latency_seconds_count{WorkerId="a"} 5.0',
        'ray_tracker_errors_total{WorkerId="a",code="4001"} 1.0',
        'ray_other_metric{x="1"} 7',
    ])
    assert parse_exposition(text) == {
        "tracker_utterances_labelled_total{final=true}": 5.0, "tracker_utterances_labelled_total{final=false}": 1.0,
        "tracker_final_latency_seconds_bucket{le=0.5}": 4.0, "tracker_final_latency_seconds_bucket{le=+Inf}": 5.0,
        "tracker_final_latency_seconds_count": 5.0, "tracker_errors_total{code=4001}": 1.0}


def test_metrics_hooks_are_no_ops_outside_ray():
    from services import metrics

    metrics.inc("tracker_errors", code=4001)
    metrics.observe("tracker_model_seconds", 0.1, stage="label")
    with metrics.timed("tracker_asr_seconds"):
        pass
    m = metrics.SessionMetrics()
    m.queued(1), m.queued(-1), m.final_sent({}, 0.2), m.error_sent(4002)
    assert m.waiting == 0
