"""Receptive fields, the live refinement state and the refiner module (tiny random backbone)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tracker.model.windows import WindowSpec

SPECS = [(1, 1), (2, 1), (2, 2), (3, 1), (4, 2), (6, 2), (6, 3), (8, 4), (9, 3)]


@pytest.mark.parametrize("w,s", SPECS)
def test_every_utterance_in_exactly_t_windows(w, s):
    spec = WindowSpec(w, s)
    for n in range(1, 51):
        windows = spec.windows(n)
        count = np.zeros(n, dtype=int)
        for k, win in enumerate(windows):
            assert win.index == k
            assert 0 <= win.lo < win.hi <= n and win.hi - win.lo <= w
            for i in win.members:
                count[i] += 1
                assert 0 <= win.position(i) < w
        assert (count == spec.t).all(), (w, s, n, count)
        for i in range(n):
            holding = [win.index for win in windows if i in win.members]
            assert holding == spec.windows_of(i)
        # live: a window closes when its last nominal member arrives; the rest close at the end
        closed = [k for i in range(n) for k in spec.closing_after(i)]
        assert closed == sorted(closed) and len(set(closed)) == len(closed)
        for k in closed:
            assert windows[k].hi == windows[k].start + w  # only full-length windows close before the end
        for i in range(n):
            last = max(spec.windows_of(i))
            if i + spec.final_delay(i) < n:
                assert last in spec.closing_after(i + spec.final_delay(i))
            assert w - s <= spec.final_delay(i) <= w - 1


def test_first_and_last_utterances_are_covered_by_clipped_windows():
    spec = WindowSpec(6, 2)
    wins = spec.windows(5)
    assert [(x.lo, x.hi) for x in wins] == [(0, 2), (0, 4), (0, 5), (2, 5), (4, 5)]
    assert [x.position(0) for x in wins[:3]] == [4, 2, 0]


def test_bad_window_spec_is_rejected():
    with pytest.raises(ValueError, match="multiple of the stride"):
        WindowSpec(5, 2)
    with pytest.raises(ValueError):
        WindowSpec(0, 1)


# -- the refiner on a tiny random backbone ----------------------------------------------------------


@pytest.fixture(scope="module")
def refiner(tiny_backbone):
    from tracker.model.refine import Refiner, RefinerConfig

    torch.manual_seed(0)
    return Refiner(tiny_backbone, RefinerConfig(backbone="tiny", window=4, stride=2, head_layer=1))


def _probs(n: int, L: int = 7, seed: int = 0) -> np.ndarray:
    p = np.random.default_rng(seed).random((n, L)) + 0.05
    return p / p.sum(1, keepdims=True)


def test_window_prompt_lists_references_then_one_slot_per_utterance(refiner):
    from tracker.model.refine import WindowItem

    probs = np.array([0.6, 0.2, 0.1, 0.05, 0.05, 0.0, 0.0])
    enc = refiner.prompt.encode([WindowItem("Ann", "Hello there.", probs), WindowItem("Bob", "Go away!", probs[::-1])])
    text = refiner.backbone.tokenizer.decode(enc.input_ids)
    # valence 0.2*0.8 + 0.1*0.2 - 0.05*0.7 - 0.05*0.7; arousal 0.6*0.3 + 0.2*0.6 + 0.1*0.8 + 0.05*0.9 + 0.05*0.2
    assert refiner.prompt.reference(probs) == "first guess: neutral 60%, joy 20%, surprise 10%; valence +0.11, arousal 0.44"
    assert refiner.prompt.reference(probs[::-1]).startswith("first guess: fear 60%, disgust 20%, sadness 10%;")
    assert len(enc.slots) == 2 and enc.slots[0] < enc.slots[1] == len(enc.input_ids) - 2
    assert text.index("Go away") < text.index("Ann's emotion:")  # every slot sees the whole window
    with pytest.raises(ValueError, match="base_probs"):
        refiner.prompt.encode([WindowItem("Ann", "x", [0.5, 0.5])])


def test_one_forward_per_window_scores_every_member(refiner, monkeypatch):
    from tracker.model.refine import WindowItem

    calls = []
    base_model = refiner.llm.base_model
    handle = base_model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape), with_kwargs=True)
    try:
        p = _probs(5)
        out = refiner.judge([[WindowItem("A", f"u{i}", p[i]) for i in range(n)] for n in (1, 3, 4)])
    finally:
        handle.remove()
    assert len(calls) == 1 and calls[0][0] == 3  # one batched forward: one row per window
    assert [o.shape for o in out] == [(1, 7), (3, 7), (4, 7)]
    alone = refiner.judge([[WindowItem("A", f"u{i}", p[i]) for i in range(3)]])[0]
    np.testing.assert_allclose(alone, out[1], atol=1e-4)  # right padding changes nothing


def test_combine_is_a_distribution_and_uses_the_judgements(refiner):
    from tracker.model.refine import Judgement

    base = _probs(1)[0]
    assert np.allclose(refiner.combine([], base), base)
    strong = np.full(7, -5.0)
    strong[3] = 5.0
    out = refiner.combine([Judgement(strong, 1, 0), Judgement(strong, 3, 1)], base)
    assert out.shape == (7,) and abs(out.sum() - 1) < 1e-6
    assert out[3] > base[3]  # the judgements pulled the distribution towards class 3


def test_save_and_load_round_trip(refiner, tmp_path, tiny_backbone):
    from tracker.model.checkpoint import CheckpointError
    from tracker.model.refine import Refiner, refine_conversation

    with torch.no_grad():
        refiner.attention.position.weight.add_(0.3)
    refiner.save_pretrained(tmp_path / "r")
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["config.json", "model.safetensors"]
    loaded = Refiner.from_pretrained(tmp_path / "r", backbone=tiny_backbone)
    assert loaded.spec == refiner.spec and loaded.config == refiner.config
    base = _probs(7, seed=3)
    a = refine_conversation(refiner, ["A", "B"] * 3 + ["A"], [f"line {i}" for i in range(7)], base)
    b = refine_conversation(loaded, ["A", "B"] * 3 + ["A"], [f"line {i}" for i in range(7)], base)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert a.shape == (7, 7) and np.allclose(a.sum(1), 1)
    from tracker.model.recognizer import EmotionRecognizer

    with pytest.raises(CheckpointError, match="tracker.refiner"):
        EmotionRecognizer.from_pretrained(tmp_path / "r", backbone=tiny_backbone)


# -- live bookkeeping ---------------------------------------------------------------------------------


@pytest.mark.parametrize("w,s", [(2, 1), (4, 2), (6, 2), (3, 3)])
def test_live_refinement_finalizes_each_utterance_once_with_t_judgements(w, s):
    from tracker.model.live_refine import LiveRefinement

    for n in (1, 2, 5, 11):
        live = LiveRefinement(WindowSpec(w, s))
        finals: dict[int, int] = {}  # utterance -> number of utterances that had arrived when it became final
        for i in range(n):
            for win in live.add(f"u{i}", "A", "x", [1.0] + [0.0] * 6, {}):
                assert win.hi == i + 1  # a window closes with its last member
                for u in live.add_judgements(win, np.zeros((len(win.members), 7))):
                    assert u.index not in finals
                    u.final = True
                    finals[u.index] = i + 1
        for win in live.end():
            for u in live.add_judgements(win, np.zeros((len(win.members), 7))):
                u.final = True
                finals[u.index] = n
        assert sorted(finals) == list(range(n)) and live.pending() == []
        assert all(len(u.judgements) == w // s for u in live.utts)
        for i, at in finals.items():
            assert at == min(n, i + 1 + WindowSpec(w, s).final_delay(i))  # final once its t windows closed, or at the end


def test_live_refinement_resumes_without_refinalizing():
    from tracker.model.live_refine import LiveRefinement

    labels = ["neutral", "joy"]
    stored = []
    for i in range(4):
        stored.append({"utterance_id": f"u{i}", "speaker": "A", "text": f"t{i}", "is_final": False, "refine": True,
                       "probabilities": {"neutral": 0.7, "joy": 0.3}})
    for i in range(3):
        stored.append({"utterance_id": f"u{i}", "speaker": "A", "text": f"t{i}", "is_final": True, "refined": True})
    live = LiveRefinement(WindowSpec(4, 2))
    new = []
    for win in live.restore(stored, labels):
        new += [u.index for u in live.add_judgements(win, np.zeros((len(win.members), 2)))]
    assert [u.utterance_id for u in live.utts] == ["u0", "u1", "u2", "u3"]
    assert [u.final for u in live.utts] == [True, True, True, False] and live.utts[3].base_probs == [0.7, 0.3]
    for i in range(4, 8):
        for win in live.add(f"u{i}", "A", "x", [0.5, 0.5], {}):
            new += [u.index for u in live.add_judgements(win, np.zeros((len(win.members), 2)))]
    for win in live.end():
        new += [u.index for u in live.add_judgements(win, np.zeros((len(win.members), 2)))]
    assert sorted(new) == [3, 4, 5, 6, 7]  # the finalized ones never again; each new one has its 2 windows
    assert all(len(live.utts[i].judgements) == 2 for i in range(4, 8))


# -- offline training on cached features ------------------------------------------------------------


def test_cached_features_match_the_live_forward_and_training_runs(tiny_backbone, tmp_path):
    from tracker.data.records import Utterance, build_conversation
    from tracker.model.adapter import AdapterConfig
    from tracker.model.recognizer import EmotionRecognizer, RecognizerConfig
    from tracker.model.refine import Refiner, RefinerConfig, WindowItem
    from tracker.training import refine as R

    torch.manual_seed(0)
    rec = EmotionRecognizer(tiny_backbone, RecognizerConfig(backbone="tiny", dtype="fp32",
                                                            adapter=AdapterConfig(d_model=16, n_pseudo_tokens=2)))
    labels = rec.label_set.labels
    convs = [build_conversation(f"c{c}", [Utterance(f"c{c}", f"c{c}u{i}", i, "AB"[i % 2], f"line {i} of {c}",
                                                    label=labels[(c + i) % 3]) for i in range(2 + c)]) for c in range(5)]
    base = R.base_probabilities(rec, convs, tmp_path / "base.npz")
    assert base["base"].shape == (20, 7) and base["conv"].tolist() == [c for c in range(5) for _ in range(2 + c)]
    ref = Refiner(tiny_backbone, RefinerConfig(backbone="tiny", window=4, stride=2, head_layer=1))
    slots = R.slot_states(ref, convs, base["base"], tmp_path / "slots.npz")
    assert slots["hidden"].shape == (20, 2, 64) and int(slots["windows"]) == sum(len(ref.spec.windows(len(c))) for c in convs)
    # utterance 2 of the last conversation, in its second window ([2, 6)), at position 0
    c = convs[4]
    items = [WindowItem(u.speaker, u.text, base["base"][14 + i]) for i, u in enumerate(c)]
    live = ref.slot_hidden([items[2:6]])[0][0].numpy()
    np.testing.assert_allclose(slots["hidden"][16, 1].astype(np.float32), live, atol=2e-2)
    assert slots["position"][16].tolist() == [2, 0] and slots["order"][16].tolist() == [0, 1]
    again = R.slot_states(ref, convs, base["base"], tmp_path / "slots.npz")  # from the cache
    assert np.array_equal(again["hidden"], slots["hidden"])
    fit = R.fit(ref, (slots, base), (slots, base), steps=30, lr=1e-2)
    assert fit.best_step % 10 == 0 and 0 <= fit.dev_wf1 <= 1 and len(fit.history) == 3
    probs = R.predict(ref, (slots, base))
    assert probs.shape == (20, 7) and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_base_probabilities_use_the_served_block_window_and_the_cache_follows_the_config(tiny_backbone, tmp_path):
    """The refiner learns from the base probabilities the service produces: context_first's block-sliding window."""
    import dataclasses

    from tracker.context_window import window_turns
    from tracker.data.records import Utterance, build_conversation
    from tracker.model.adapter import AdapterConfig
    from tracker.model.recognizer import EmotionRecognizer, RecognizerConfig
    from tracker.model.prompt import PromptConfig
    from tracker.training import refine as R
    from tracker.types import Turn, UtteranceInput

    torch.manual_seed(0)
    prompt = PromptConfig(layout="context_first", context_turns=4, context_min_turns=2, max_context_line_tokens=16,
                          max_context_tokens=200)
    rec = EmotionRecognizer(tiny_backbone, RecognizerConfig(backbone="tiny", dtype="fp32", prompt=prompt,
                                                            adapter=AdapterConfig(d_model=16, n_pseudo_tokens=2)))
    labels = rec.label_set.labels
    conv = build_conversation("c", [Utterance("c", f"u{i}", i, "AB"[i % 2], f"line {i}", label=labels[i % 3]) for i in range(9)])
    base = R.base_probabilities(rec, [conv], tmp_path / "base.npz")
    turns = [Turn(u.speaker, u.text) for u in conv]
    served = [UtteranceInput(u.text, u.speaker, tuple(window_turns(turns[:i], i, 4, 2))) for i, u in enumerate(conv)]
    assert [len(it.context) for it in served] == [0, 1, 2, 3, 4, 2, 3, 4, 2]  # the block window, not always the last 4
    np.testing.assert_allclose(base["base"], rec.predict_proba(served), atol=1e-5)
    ckpt = rec.save_pretrained(tmp_path / "a")
    tag, ctag = R._checkpoint_tag(ckpt), R._cache_tag(ckpt)
    rec.config = dataclasses.replace(rec.config, temperature=0.8)
    again = rec.save_pretrained(tmp_path / "b")
    assert R._checkpoint_tag(again) == tag and R._cache_tag(again) != ctag  # same weights, new probabilities
