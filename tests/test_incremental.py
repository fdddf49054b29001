"""Incremental context: the block-sliding window, the context_first prompt, prefix KV caches.

Every label path is compared with full recomputation of the same prompts (tiny random backbone,
fp32), across a conversation long enough for the window to slide several times.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tracker.config import ConfigError
from tracker.data.records import Utterance, build_conversation, to_inputs
from tracker.model.context_window import window_length, window_start, window_turns
from tracker.model.incremental import IncrementalLabeler
from tracker.model.inputs import Turn, UtteranceInput
from tracker.model.kv_cache import KVCacheStore
from tracker.model.prompt import PromptConfig
from tracker.model.recognizer import EmotionRecognizer, RecognizerConfig

M, m = 5, 2  # the window slides from 5 past turns back to 2, i.e. every 4 utterances
TEXTS = ["Oh my God, he is lost it.", "What?", "Could this be any more awkward?", "How you doing?",
         "No way! Are you serious? That is so great!", "Well, I guess that is fine, thank you very much."]
SPEAKERS = ["Monica", "Ross", "Joey"]


def conversation(n: int, seed: int = 0) -> list[UtteranceInput]:
    """n utterances, each with its window of past turns; some with audio, lengths varying."""
    rng = np.random.RandomState(seed)
    turns = [Turn(SPEAKERS[(i + seed) % 3], TEXTS[(i + seed) % len(TEXTS)] + " yes" * (i % 4)) for i in range(n)]
    items = []
    for i, t in enumerate(turns):
        feats = {"audio": rng.randn(8 + i, 25)} if i % 3 else {}
        items.append(UtteranceInput(t.text, t.speaker, tuple(window_turns(turns[:i], i, M, m)), feats))
    return items


def context_first(head_layer: int = 0, **prompt) -> RecognizerConfig:
    prompt = {"layout": "context_first", "context_turns": M, "context_min_turns": m,
              "max_context_line_tokens": 12, "max_context_tokens": 96, **prompt}
    return RecognizerConfig(backbone="tiny", head="linear" if head_layer else "lm_head", head_layer=head_layer,
                            prompt=PromptConfig(**prompt))


@pytest.fixture(scope="module")
def recognizers(tiny_backbone):
    out = {}
    for layer in (0, 1):
        torch.manual_seed(0)
        out[layer] = EmotionRecognizer(tiny_backbone, context_first(layer))
    return out


# ---------------------------------------------------------------------- the window
def test_window_slides_in_blocks_between_min_and_max_turns():
    assert [window_start(i, 3) for i in range(7)] == [0, 0, 0, 0, 1, 2, 3]  # m = M: always the last M
    starts = [window_start(i, M, m) for i in range(20)]
    assert starts == [0] * 6 + [4] * 4 + [8] * 4 + [12] * 4 + [16] * 2
    lengths = [window_length(i, M, m) for i in range(20)]
    assert lengths[:6] == [0, 1, 2, 3, 4, 5] and all(m <= n <= M for n in lengths[m:])
    assert window_turns(list(range(9)), 9, M, m) == [4, 5, 6, 7, 8]
    assert window_turns(list(range(3, 9)), 9, M, m) == [4, 5, 6, 7, 8]  # a tail is enough when it covers the window
    with pytest.raises(ValueError, match="needs its last 5 turns"):
        window_turns([7, 8], 9, M, m)
    with pytest.raises(ValueError, match="min_turns"):
        window_start(3, 2, 3)


def test_training_contexts_follow_the_same_window():
    utts = [Utterance("c", f"u{i}", 0, "A", f"text {i}") for i in range(12)]
    pairs = list(to_inputs(build_conversation("c", utts), k=M, min_k=m))
    for i, (utt, ctx) in enumerate(pairs):
        a = window_start(i, M, m)
        assert [t.text for t in ctx] == [f"text {j}" for j in range(a, i)]
    last3 = list(to_inputs(build_conversation("c", utts), k=3))
    assert [t.text for t in last3[7][1]] == ["text 4", "text 5", "text 6"]  # unchanged default


# ---------------------------------------------------------------------- the prompt
def test_context_first_prompt_has_a_prefix_that_grows_by_appending_lines(tiny_backbone):
    torch.manual_seed(0)
    rec = EmotionRecognizer(tiny_backbone, context_first())
    items = conversation(10)
    enc = [rec.encode(it) for it in items]
    tok = tiny_backbone.tokenizer
    assert enc[0].prefix_len == 1 and enc[0].input_ids[0] == tok.bos_token_id  # no context: <bos> only
    text = tok.decode(enc[3].input_ids)
    assert text.index("Conversation so far:") < text.index("<Multimodal>") < text.index("Current utterance:")
    assert tok.decode(enc[3].input_ids[enc[3].prefix_len:]).startswith("<Multimodal>")
    for i in range(1, 10):
        prev, cur = enc[i - 1], enc[i]
        slid = window_start(i, M, m) != window_start(i - 1, M, m)
        extends = cur.input_ids[: prev.prefix_len] == prev.input_ids[: prev.prefix_len]
        assert extends != slid, i  # within a block the old prefix is a prefix of the new one
    long_turn = Turn("Joey", "word " * 200)
    capped = rec.prompt.context_line(long_turn)
    assert len(capped) == 12 and tok.decode(capped).endswith("\n")


def test_context_first_config_errors_name_the_field(tiny_backbone):
    with pytest.raises(ConfigError, match="max_context_line_tokens"):
        PromptConfig(layout="context_first", context_turns=3)
    with pytest.raises(ConfigError, match="layout"):
        PromptConfig(layout="sideways")
    with pytest.raises(ConfigError, match="context_min_turns"):
        PromptConfig(context_turns=3, context_min_turns=4)
    with pytest.raises(ConfigError, match="max_context_tokens: layout context_first needs at least"):
        EmotionRecognizer(tiny_backbone, context_first(max_context_tokens=20))


# ---------------------------------------------------------------------- incremental == full
@pytest.mark.parametrize("head_layer", [0, 1])
def test_incremental_labels_equal_full_recomputation_across_slides(recognizers, head_layer):
    rec = recognizers[head_layer]
    items = conversation(22)
    full = rec.predict_proba(items, batch_size=1)
    labeler = IncrementalLabeler(rec)
    inc = np.concatenate([labeler.predict_proba([("call-1", it)]) for it in items])
    np.testing.assert_allclose(inc, full, atol=1e-5)
    assert (inc.argmax(1) == full.argmax(1)).all()
    slides = sum(window_start(i, M, m) != window_start(i - 1, M, m) for i in range(1, 22))
    stats = labeler.cache.stats
    assert slides == 4 and stats.rebuilds == slides and stats.misses == 1 and stats.hits == 22 - 1 - slides
    entry = labeler.cache.get("call-1")  # holds <bos> + the header + the lines of the last context only
    last = rec.encode(items[-1])
    assert entry.token_ids == tuple(last.input_ids[: last.prefix_len])
    assert len(entry.keys) == rec.cached_layers == (head_layer or tiny_backbone_layers(rec))


def tiny_backbone_layers(rec) -> int:
    return rec.backbone.num_layers


def test_batched_ragged_conversations_equal_one_at_a_time(recognizers):
    rec = recognizers[1]
    convs = {f"c{s}": conversation(14, seed=s) for s in range(3)}
    alone = {key: rec.predict_proba(items, batch_size=4) for key, items in convs.items()}
    labeler = IncrementalLabeler(rec)
    got = {key: np.zeros_like(v) for key, v in alone.items()}
    offsets = {"c0": 0, "c1": 3, "c2": 7}  # conversations at different points: ragged caches and suffixes
    for step in range(14 + 7):
        requests = [(key, convs[key][step - off]) for key, off in offsets.items() if 0 <= step - off < 14]
        probs = labeler.predict_proba(requests)
        for (key, item), row in zip(requests, probs):
            got[key][convs[key].index(item)] = row
    for key in convs:
        np.testing.assert_allclose(got[key], alone[key], atol=1e-5)
    # a rebuilt prefix among suffix-only rows goes to its own forward instead of padding them all
    assert IncrementalLabeler._groups([80, 82, 200, 79]) == [[0, 1, 3], [2]]
    assert IncrementalLabeler._groups([80, 90, 85]) == [[0, 1, 2]]


def test_utterances_of_one_conversation_in_one_call_are_labelled_in_order(recognizers):
    rec = recognizers[0]
    items = conversation(9)
    labeler = IncrementalLabeler(rec)
    probs = labeler.predict_proba([("a", it) for it in items] + [("b", items[0])])
    np.testing.assert_allclose(probs[:9], rec.predict_proba(items), atol=1e-5)
    np.testing.assert_allclose(probs[9], probs[0], atol=1e-6)


def test_eviction_and_rebuild_give_the_same_labels(recognizers):
    rec = recognizers[1]
    a, b = conversation(12, seed=1), conversation(12, seed=2)
    probe = IncrementalLabeler(rec)
    probe.predict_proba([("x", a[5])])
    one_entry = probe.entry_nbytes("x")
    assert one_entry > 0
    labeler = IncrementalLabeler(rec, cache=KVCacheStore(max_bytes=int(one_entry * 1.6)))  # room for one
    got_a, got_b = [], []
    for i in range(12):  # interleaved: each conversation evicts the other
        got_a.append(labeler.predict_proba([("a", a[i])])[0])
        got_b.append(labeler.predict_proba([("b", b[i])])[0])
    stats = labeler.cache.stats
    assert stats.evictions >= 5 and stats.misses >= 8  # evicted conversations were rebuilt from their history
    assert labeler.cache.nbytes <= labeler.cache.max_bytes
    np.testing.assert_allclose(np.array(got_a), rec.predict_proba(a), atol=1e-5)
    np.testing.assert_allclose(np.array(got_b), rec.predict_proba(b), atol=1e-5)


def test_commit_false_leaves_the_cache_as_it_was(recognizers):
    rec = recognizers[0]
    items = conversation(6)
    labeler = IncrementalLabeler(rec)
    labeler.predict_proba([("a", it) for it in items[:4]])
    before = labeler.cache.get("a")
    again = [labeler.predict_proba([("a", items[4])], commit=False) for _ in range(2)]
    assert labeler.cache.get("a") is before
    np.testing.assert_allclose(again[0], again[1], atol=1e-7)
    np.testing.assert_allclose(labeler.predict_proba([("a", items[4])]), again[0], atol=1e-7)


def test_eager_attention_masks_match_too():
    from tracker.model.backbone import load_backbone

    backbone = load_backbone("tiny", dtype="fp32", seed=0)
    backbone.model.set_attn_implementation("eager")
    torch.manual_seed(0)
    rec = EmotionRecognizer(backbone, context_first(1))
    items = conversation(10)
    labeler = IncrementalLabeler(rec)
    assert labeler.attn_implementation == "eager"
    got = np.concatenate([labeler.predict_proba([("a", it), ("b", items[max(0, i - 4)])])[:1] for i, it in enumerate(items)])
    np.testing.assert_allclose(got, rec.predict_proba(items), atol=1e-5)


# ---------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_gemma_incremental_equals_full_across_the_sliding_attention_window(meld_dir):
    """Gemma-3 mixes sliding-window (512) and global layers: prompts here are longer than 512 tokens."""
    from tracker.data import load_dataset
    from tracker.model.backbone import load_backbone
    from tracker.model.default import default_checkpoint

    backbone = load_backbone("gemma3-270m", dtype="fp32")
    shipped = EmotionRecognizer.from_pretrained(default_checkpoint(), backbone=backbone)
    import dataclasses

    prompt = dataclasses.replace(shipped.config.prompt, layout="context_first", context_turns=30, context_min_turns=20,
                                 max_context_line_tokens=48, max_context_tokens=1500)
    rec = EmotionRecognizer(backbone, dataclasses.replace(shipped.config, prompt=prompt))
    rec.load_trainable_state_dict(shipped.trainable_state_dict())
    # MELD dev turns, each said twice so that 30 of them exceed the 512-token sliding window
    turns = [Turn(u.speaker, f"{u.text} {u.text}") for c in load_dataset("meld:dev")[:6] for u in c][:45]
    items = [UtteranceInput(t.text, t.speaker, tuple(window_turns(turns[:i], i, 30, 20))) for i, t in enumerate(turns)]
    assert max(len(rec.encode(it).input_ids) for it in items) > 700
    full = rec.predict_proba(items, batch_size=4)
    labeler = IncrementalLabeler(rec)
    inc = np.zeros_like(full)
    for i in range(len(items)):  # two conversations at different offsets share each forward
        requests = [("a", items[i])] + ([("b", items[i - 9])] if i >= 9 else [])
        probs = labeler.predict_proba(requests)
        inc[i] = probs[0]
        if i >= 9:
            np.testing.assert_allclose(probs[1], full[i - 9], atol=2e-4)
    np.testing.assert_allclose(inc, full, atol=2e-4)
    assert labeler.cache.stats.rebuilds >= 2


# ---------------------------------------------------------------------- the service's context
def test_store_gives_the_same_window_from_redis_history():
    """What the ingress fetches for utterance i equals the training context (partials are not turns)."""
    import uuid

    from tracker.context import ConversationStore, EmbeddedRedis, StoreConfig
    from tracker.labels import MELD7

    def record(i: int, final: bool = True) -> dict:
        return {"utterance_id": f"u{i}", "speaker": SPEAKERS[i % 3], "start_ms": 0, "end_ms": 1, "text": f"turn {i}",
                "label": "joy", "probabilities": {"joy": 1.0}, "score": 0.8, "is_final": final}

    with EmbeddedRedis() as server, ConversationStore(server.url, StoreConfig(key_prefix=f"t{uuid.uuid4().hex[:8]}"), MELD7) as store:
        turns = []
        for i in range(13):
            index, ctx = store.context_window("call", M, m)
            assert index == i
            assert ctx == window_turns(turns, i, M, m)
            store.append("call", record(i + 100, final=False))  # a partial in between changes nothing
            store.append("call", record(i))
            turns.append(Turn(SPEAKERS[i % 3], f"turn {i}"))
        assert store.context_window("call", 3) == (13, turns[-3:])  # m = M: the last M


def test_emotion_model_deployment_labels_context_first_models_incrementally(recognizers, tmp_path):
    """The deployment class itself (called directly, no Serve): cached and uncached requests agree."""
    from services.deployments import EmotionModel

    recognizers[1].save_pretrained(tmp_path / "ckpt")
    model = EmotionModel.func_or_class({"model": {"checkpoint": str(tmp_path / "ckpt"), "dtype": "fp32"}})
    assert model.labeler is not None and model.info()["context_min_turns"] == m
    items = conversation(12)  # UtteranceInputs with their Turn contexts, as the pipeline sends them
    cached = [model.model.label([("call", it)])[0] for it in items]
    plain = model.model.label([(None, it) for it in items])
    for a, b in zip(cached, plain):
        assert a["label"] == b["label"]
        assert max(abs(a["probabilities"][k] - b["probabilities"][k]) for k in a["probabilities"]) < 1e-5
    info = model.info()["kv_cache"]
    assert info["conversations"] == 1 and info["hits"] == 12 - 1 - 2 and info["rebuilds"] == 2


def test_context_first_batches_train_the_adapter_through_per_row_pseudo_slots(tiny_backbone):
    torch.manual_seed(0)
    rec = EmotionRecognizer(tiny_backbone, context_first(1))
    items = conversation(6)
    batch = rec.collate(items)
    assert isinstance(batch.pseudo_start, torch.Tensor) and len(set(batch.pseudo_start.tolist())) > 1
    rec.train()
    loss = torch.nn.functional.cross_entropy(rec(batch), torch.tensor([0, 1, 2, 3, 4, 5]))
    loss.backward()
    grads = [p.grad for n, p in rec.adapter.named_parameters() if "visual" not in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in rec.llm.parameters())


@pytest.mark.parametrize("head_layer", [0, 1])
def test_training_with_the_prefix_outside_autograd_gives_the_same_logits_and_gradients(recognizers, head_layer):
    rec = recognizers[head_layer]
    items = conversation(9, seed=2)[1:]  # ragged prefixes: 1 to 5 past turns, some with audio
    rec.eval()  # no dropout, so both paths see the same adapter; autograd works all the same
    full = rec(rec.collate(items))
    params = [p for p in rec.parameters() if p.requires_grad]
    g_full = torch.autograd.grad(full.square().sum(), params, allow_unused=True)
    split = IncrementalLabeler(rec).train_logits(items)
    g_split = torch.autograd.grad(split.square().sum(), params, allow_unused=True)
    torch.testing.assert_close(split, full, atol=1e-5, rtol=1e-4)
    compared = 0
    for a, b in zip(g_full, g_split):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-3)
            compared += int(a.abs().sum() > 0)
    assert compared > 5  # the adapter's tensors got real gradients through the suffix
