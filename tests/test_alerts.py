"""The escalation rule server-side: the Python reference, the Redis script, events stored per conversation."""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest

from tracker.alerts import AlertEngine, EscalationConfig, EscalationRule, SyncAlertEngine, alert_id
from tracker.config import ConfigError, load_dataclass
from tracker.context import ConversationStore, StoreConfig
from tracker.context.schema import alert_outbox_key
from tracker.context.store import AsyncConversationStore
from tracker.labels import MELD7


@pytest.fixture()
def store(redis_server):
    with ConversationStore(redis_server.url, StoreConfig(key_prefix=f"t{uuid.uuid4().hex[:8]}"), MELD7) as s:
        yield s


def commit(store: ConversationStore, cid: str, i: int, speaker: str, label: str) -> dict:
    """Append a final as the service does and return the committed record (with its seq)."""
    rec = {"utterance_id": f"u{i}", "speaker": speaker, "start_ms": 1000 * i, "end_ms": 1000 * i + 900,
           "text": f"utterance {i}", "label": label, "is_final": True}
    store.append(cid, rec)
    stored = store.get_final(cid, f"u{i}")
    return {**stored, "conversation_id": cid}


# -- the rule --------------------------------------------------------------------------------------


def test_the_rule_raises_at_3_of_4_negative_and_clears_only_at_1_of_4():
    rule = EscalationRule(EscalationConfig(), MELD7)
    labels = ["anger", "anger", "anger", "neutral", "neutral", "neutral", "sadness"]
    assert rule.replay(labels) == [(2, "raised"), (5, "cleared")]  # 3/4 and 2/4 keep it up: no flicker


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="raise_at"):
        EscalationConfig(window=4, raise_at=5)
    with pytest.raises(ConfigError, match="clear_at"):
        EscalationConfig(raise_at=2, clear_at=2)
    with pytest.raises(ConfigError, match="negative: 'furious' is not a label of meld7"):
        EscalationRule(EscalationConfig(negative=["furious"]), MELD7)
    with pytest.raises(ConfigError, match="alerts.window: expected int"):
        load_dataclass(EscalationConfig, {"window": "four"}, prefix="alerts")


def test_speakers_are_matched_by_name_or_pattern_case_insensitively():
    c = EscalationConfig(speakers=["Customer", "caller-*"])
    assert c.watches("customer") and c.watches("Caller-7")
    assert not c.watches("Agent")
    assert EscalationConfig().watches("anyone")


# -- in Redis --------------------------------------------------------------------------------------


def test_the_redis_script_agrees_with_the_python_rule_on_random_calls(store):
    rng = random.Random(7)
    for trial, config in enumerate([EscalationConfig(), EscalationConfig(window=6, raise_at=4, clear_at=2),
                                    EscalationConfig(window=1, raise_at=1, clear_at=0),
                                    EscalationConfig(negative=["anger", "disgust"])]):
        engine = SyncAlertEngine(store, config)
        rule = EscalationRule(config, MELD7)
        cid = f"random-{trial}"
        labels = {"A": [], "B": []}
        got = {"A": [], "B": []}
        for i in range(80):
            speaker = rng.choice("AB")
            label = rng.choice(MELD7.labels)
            labels[speaker].append(label)
            for ev in engine.on_final_committed(commit(store, cid, i, speaker, label)):
                got[speaker].append((len(labels[speaker]) - 1, ev.kind))
        for speaker in "AB":
            assert got[speaker] == rule.replay(labels[speaker]), (trial, speaker)


def test_events_are_stored_in_the_conversation_stream_with_a_stable_id(store):
    engine = SyncAlertEngine(store, EscalationConfig())
    cid = "call-1"
    events = []
    for i, (speaker, label) in enumerate([("Customer", "anger"), ("Agent", "neutral"), ("Customer", "anger"),
                                          ("Customer", "disgust"), ("Customer", "joy"), ("Customer", "neutral"),
                                          ("Customer", "neutral")]):
        events += engine.on_final_committed(commit(store, cid, i, speaker, label))
    assert [(e.kind, e.speaker, e.utterance_id) for e in events] == [("raised", "Customer", "u3"),
                                                                     ("cleared", "Customer", "u6")]
    raised = events[0]
    assert raised.labels == ("anger", "anger", "disgust") and raised.negative == 3 and raised.window == 4
    assert raised.seq == 4 and raised.tenant == "default" and raised.conversation_id == cid
    assert raised.alert_id == alert_id("default", cid, "Customer", "u3", "raised")
    assert events[1].labels == ("disgust", "joy", "neutral", "neutral") and events[1].negative == 1
    stored = engine.events(cid)
    assert [e.to_dict() for e in stored] == [e.to_dict() for e in events]  # what was returned is what is kept
    assert engine.events(cid, after=stored[0].entry_id) == stored[1:]
    key = store.config.key_prefix + ":default:conv:call-1:alerts"
    assert store.redis.xlen(key) == 2
    assert engine.state(cid, ["Customer", "Agent"])["Customer"]["raised"] is False


def test_applying_the_same_final_twice_or_an_older_one_changes_nothing(store):
    engine = SyncAlertEngine(store, EscalationConfig(window=2, raise_at=2, clear_at=0))
    cid = "retry"
    first = commit(store, cid, 0, "C", "anger")
    second = commit(store, cid, 1, "C", "anger")
    assert engine.on_final_committed(first) == []
    [ev] = engine.on_final_committed(second)
    assert ev.kind == "raised"
    assert engine.on_final_committed(second) == []  # a retried commit
    assert engine.on_final_committed(first) == []  # a replay of an older one
    assert len(engine.events(cid)) == 1
    assert engine.state(cid, ["C"])["C"] == {"raised": True, "since_utterance_id": "u1",
                                             "since_ms": ev.at_ms, "labels": ["anger", "anger"]}


def test_only_watched_speakers_and_finals_count_and_a_record_without_seq_is_refused(store):
    engine = SyncAlertEngine(store, EscalationConfig(window=1, raise_at=1, clear_at=0, speakers=["Customer"]))
    assert engine.on_final_committed(commit(store, "w", 0, "Agent", "anger")) == []
    assert engine.on_final_committed({**commit(store, "w", 1, "Customer", "anger"), "is_final": False}) == []
    assert [e.kind for e in engine.on_final_committed(commit(store, "w", 2, "Customer", "anger"))] == ["raised"]
    with pytest.raises(ValueError, match="no seq"):
        engine.on_final_committed({"conversation_id": "w", "utterance_id": "x", "speaker": "Customer",
                                   "label": "anger", "is_final": True})


def test_tenants_keep_separate_alert_state_and_the_outbox_gets_events_only_when_asked(redis_server):
    prefix = f"t{uuid.uuid4().hex[:8]}"

    async def go():
        async with AsyncConversationStore(redis_server.url, StoreConfig(key_prefix=prefix), MELD7) as store:
            config = EscalationConfig(window=1, raise_at=1, clear_at=0)
            a = AlertEngine(store, config, outbox=True)
            b = AlertEngine(store, config).with_tenant("b")
            for engine in (a, b):
                s = engine.store
                await s.append("same-id", {"utterance_id": "u0", "speaker": "C", "start_ms": 0, "end_ms": 1,
                                           "text": "x", "label": "anger", "is_final": True})
                rec = {**await s.get_final("same-id", "u0"), "conversation_id": "same-id"}
                [ev] = await engine.on_final_committed(rec)
                assert ev.tenant == engine.tenant
            assert [e.tenant for e in await a.events("same-id")] == ["default"]
            assert [e.tenant for e in await b.events("same-id")] == ["b"]
            outbox = await store.redis.xrange(alert_outbox_key(prefix))
            assert len(outbox) == 1 and outbox[0][1][b"tenant"] == b"default"

    asyncio.run(go())


def test_deleting_a_conversation_removes_its_alerts_and_rule_state(store):
    engine = SyncAlertEngine(store, EscalationConfig(window=1, raise_at=1, clear_at=0))
    engine.on_final_committed(commit(store, "gone", 0, "C", "anger"))
    store.append("kept", {"utterance_id": "u0", "speaker": "C", "start_ms": 0, "end_ms": 1, "text": "x",
                          "label": "joy", "is_final": True})
    assert store.delete_conversation("gone") is True
    assert store.delete_conversation("gone") is False
    assert engine.events("gone") == [] and engine.state("gone", ["C"]) == {}
    leftover = [k.decode() for k in store.redis.scan_iter(f"{store.config.key_prefix}:*")]
    assert leftover and not any(":gone:" in k for k in leftover), leftover
    assert [c["conversation_id"] for c in store.list_conversations()] == ["kept"]
    # the id can be used again from scratch
    assert engine.on_final_committed(commit(store, "gone", 0, "C", "anger"))[0].kind == "raised"


# -- committing and stepping in one round trip -----------------------------------------------------


def _record(i: int, speaker: str, label: str, **extra) -> dict:
    return {"utterance_id": f"u{i}", "speaker": speaker, "start_ms": 1000 * i, "end_ms": 1000 * i + 900,
            "text": f"utterance {i}", "label": label, "is_final": True, **extra}


def test_append_stores_the_final_and_steps_the_rule_in_one_round_trip_and_a_retry_returns_the_same_event(store):
    engine = SyncAlertEngine(store, EscalationConfig(speakers=["Customer"]))
    steps = []
    run_step = store._step
    store._step = lambda step: steps.append(step) or run_step(step)  # count what goes to Redis
    labels = ["anger", "anger", "neutral", "anger", "neutral", "neutral", "neutral"]
    got = []
    for i, label in enumerate(labels):
        c = engine.append("c1", _record(i, "Customer", label))
        assert c.stored and c.seq == i + 1
        got += [(e.kind, e.utterance_id, e.seq) for e in c.events]
    assert len(steps) == len(labels) and all(s.name == "commit" for s in steps)  # one script per final
    assert got == [("raised", "u3", 4), ("cleared", "u5", 6)]
    assert [r["label"] for r in store.history("c1")] == labels and [r["seq"] for r in store.history("c1")] == [1, 2, 3, 4, 5, 6, 7]
    stored = engine.events("c1")
    assert [(e.kind, e.utterance_id) for e in stored] == [("raised", "u3"), ("cleared", "u5")]

    again = engine.append("c1", _record(3, "Customer", "anger"))  # the reply of the first commit was lost
    assert not again.stored and again.seq == 4
    assert [e.to_dict() for e in again.events] == [stored[0].to_dict()]
    assert not engine.append("c1", _record(2, "Customer", "neutral")).events  # a duplicate that caused nothing
    assert [(e.kind, e.utterance_id) for e in engine.events("c1")] == [("raised", "u3"), ("cleared", "u5")]
    assert len(store.history("c1")) == len(labels)


def test_append_of_an_interim_or_an_unwatched_speaker_is_a_plain_append_and_bad_records_touch_nothing(store):
    engine = SyncAlertEngine(store, EscalationConfig(speakers=["Customer"], window=2, raise_at=1, clear_at=0))
    agent = engine.append("c2", _record(0, "Agent", "anger"))
    interim = engine.append("c2", _record(1, "Customer", "anger", is_final=False, refine=True))
    assert agent.stored and interim.stored and not agent.events and not interim.events
    assert engine.state("c2", ["Agent", "Customer"]) == {}
    given = engine.append("c2", _record(2, "Customer", "anger", seq=41))  # a record that brings its seq keeps it
    assert given.seq == 41 and [(e.kind, e.seq) for e in given.events] == [("raised", 41)]
    before = store.redis.dbsize()
    with pytest.raises(ValueError):
        engine.append("c2", _record(3, "Customer", "furious"))
    with pytest.raises(ValueError):
        engine.append("c2", {**_record(4, "Customer", "anger"), "start_ms": "soon"})
    assert store.redis.dbsize() == before


def test_async_append_with_the_outbox_queues_the_event_for_webhooks(redis_server):
    async def go():
        prefix = f"t{uuid.uuid4().hex[:8]}"
        async with AsyncConversationStore(redis_server.url, StoreConfig(key_prefix=prefix), MELD7, tenant="acme") as s:
            engine = AlertEngine(s, EscalationConfig(window=1, raise_at=1, clear_at=0), outbox=True)
            c = await engine.append("c3", _record(0, "Customer", "fear"))
            outbox = await s.redis.xrange(alert_outbox_key(prefix))
            return c, outbox
    c, outbox = asyncio.run(go())
    assert [e.kind for e in c.events] == ["raised"] and c.events[0].tenant == "acme"
    assert len(outbox) == 1 and outbox[0][1][b"alert_id"].decode() == c.events[0].alert_id


def test_read_since_gives_records_and_alert_events_from_one_read_and_resumes_after_either(store):
    engine = SyncAlertEngine(store, EscalationConfig(window=2, raise_at=2, clear_at=0))
    for i, label in enumerate(["anger", "fear", "joy", "neutral"]):
        engine.append("c4", _record(i, "Customer", label))
    records, events = engine.read_since("c4")
    assert [r["utterance_id"] for r in records] == ["u0", "u1", "u2", "u3"]
    assert [(e.kind, e.utterance_id, e.conversation_id, e.tenant) for e in events] == [
        ("raised", "u1", "c4", "default"), ("cleared", "u3", "c4", "default")]
    records, events = engine.read_since("c4", records[1]["entry_id"], events[0].entry_id)
    assert [r["utterance_id"] for r in records] == ["u2", "u3"] and [e.kind for e in events] == ["cleared"]
    assert engine.read_since("c4", records[-1]["entry_id"], events[-1].entry_id, block_ms=50) == ([], [])
    with pytest.raises(ValueError, match="alerts_after"):
        engine.read_since("c4", "0-0", "yesterday")
