"""The recognizer on a tiny random backbone: frozen LLM, one-pass label scoring, save/load and its errors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from tracker.labels import MELD7, MSA7, SENTIMENT3, RAVDESS8
from tracker.model import checkpoint as ckpt
from tracker.model.adapter import AdapterConfig
from tracker.model.backbone import load_backbone
from tracker.model.inputs import Turn, UtteranceInput
from tracker.model.prompt import PromptBuilder
from tracker.model.recognizer import EmotionRecognizer, RecognizerConfig

ITEMS = [
    UtteranceInput("Oh my God, he is lost it. He is totally lost it.", "Phoebe", (), {"audio": np.random.RandomState(0).randn(40, 25)}),
    UtteranceInput("What?", "Monica", (Turn("Phoebe", "Oh my God, he is lost it."),)),
    UtteranceInput("Could this be any more awkward?", "Chandler", (Turn("Phoebe", "Hi."), Turn("Monica", "What?"))),
]


@pytest.fixture()
def recognizer(tiny_backbone):
    torch.manual_seed(0)
    return EmotionRecognizer(tiny_backbone, RecognizerConfig(backbone="tiny"))


def test_one_forward_gives_a_distribution_over_the_label_set(recognizer):
    preds = recognizer.predict(ITEMS)
    assert len(preds) == 3
    for p in preds:
        assert list(p.probabilities) == list(MELD7.labels)
        assert abs(sum(p.probabilities.values()) - 1.0) < 1e-6
        assert p.label == max(p.probabilities, key=p.probabilities.get)


def test_gradients_reach_only_adapter_parameters_and_llm_is_bit_identical(recognizer):
    before = {k: v.clone() for k, v in recognizer.llm.state_dict().items()}
    adapter_before = {k: v.clone() for k, v in recognizer.adapter.state_dict().items()}
    trainable = [p for p in recognizer.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in recognizer.adapter.parameters()}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    recognizer.train()
    batch = recognizer.collate(ITEMS)
    loss = torch.nn.functional.cross_entropy(recognizer(batch), torch.tensor([3, 2, 0]))
    loss.backward()
    assert all(p.grad is None for p in recognizer.llm.parameters())
    assert all(p.grad is not None for name, p in recognizer.adapter.named_parameters() if "visual" not in name)
    opt.step()
    for k, v in recognizer.llm.state_dict().items():
        assert torch.equal(v, before[k]), k
    changed = [k for k, v in recognizer.adapter.state_dict().items() if not torch.equal(v, adapter_before[k])]
    assert changed, "the adapter did not train"


def test_without_pseudo_tokens_logits_equal_the_bare_llm(tiny_backbone):
    config = RecognizerConfig(backbone="tiny", adapter=AdapterConfig(n_pseudo_tokens=0))
    rec = EmotionRecognizer(tiny_backbone, config)
    batch = rec.collate(ITEMS)
    with torch.no_grad():
        ours = rec(batch)  # (B, L)
        bare = tiny_backbone.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    rows = torch.arange(len(ITEMS))
    expected = bare[rows, batch.answer_index][:, rec.label_token_ids]
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_pseudo_tokens_change_the_answer_and_batching_matches_single_rows(recognizer):
    recognizer.eval()
    together = recognizer.predict_proba(ITEMS, batch_size=3)
    alone = np.concatenate([recognizer.predict_proba([it], batch_size=1) for it in ITEMS])
    np.testing.assert_allclose(together, alone, atol=1e-5)  # padding and masks are right


def test_prompt_layout_and_past_only_context(tiny_backbone):
    builder = PromptBuilder(tiny_backbone.tokenizer, MELD7, n_pseudo=4)
    enc = builder.encode("What?", "Monica", [Turn("A", "one"), Turn("B", "two"), Turn("A", "three"), Turn("B", "four")])
    text = tiny_backbone.tokenizer.decode(enc.input_ids)
    assert text.startswith("<bos><Multimodal>")
    assert enc.input_ids[enc.pseudo_start : enc.pseudo_start + 4] == [builder.pad_token_id] * 4
    assert "A: one" not in text and "B: two\nA: three\nB: four\n" in text  # k = 3 most recent turns
    assert text.rstrip().endswith("Answer:")
    assert enc.answer_index == len(enc.input_ids) - 1
    assert "neutral, joy, surprise, anger, sadness, disgust, fear" in text


@pytest.mark.parametrize("label_set", [RAVDESS8, SENTIMENT3, MSA7])
def test_other_label_sets_get_distinct_first_tokens(tiny_backbone, label_set):
    builder = PromptBuilder(tiny_backbone.tokenizer, label_set)
    assert len(set(builder.label_token_ids)) == len(label_set)


def test_msa_mode_score_lies_in_minus3_plus3(tiny_backbone):
    rec = EmotionRecognizer(tiny_backbone, RecognizerConfig(backbone="tiny", label_set="msa7"))
    for p in rec.predict(ITEMS):
        assert -3.0 <= p.score <= 3.0
        assert p.score == pytest.approx(sum(float(k) * v for k, v in p.probabilities.items()))


def test_save_load_round_trip_gives_identical_distributions(recognizer, tiny_backbone, tmp_path):
    recognizer.eval()
    with torch.no_grad():
        for p in recognizer.adapter.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # not the init state
    recognizer.adapter.set_feature_normalisation("audio", torch.full((25,), 0.5), torch.full((25,), 2.0))
    recognizer.save_pretrained(tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["backbone"] == "tiny" and cfg["llm_hidden_size"] == 64 and cfg["label_set"]["labels"] == list(MELD7.labels)
    loaded = EmotionRecognizer.from_pretrained(tmp_path / "ck", backbone=tiny_backbone)
    np.testing.assert_array_equal(recognizer.predict_proba(ITEMS), loaded.predict_proba(ITEMS))


def test_load_errors_say_which_and_why(recognizer, tiny_backbone, tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        EmotionRecognizer.from_pretrained(tmp_path / "nope", backbone=tiny_backbone)
    good = tmp_path / "good"
    recognizer.save_pretrained(good)

    wide = load_backbone("tiny", dtype="fp32")
    wide_model = dataclasses.replace(wide)
    from tracker.model.tiny import build_tiny_backbone

    model, tok = build_tiny_backbone(hidden_size=32)
    other = dataclasses.replace(wide_model, name="tiny-32", model=model, tokenizer=tok)
    with pytest.raises(ckpt.CheckpointError, match="hidden size 64.*hidden size 32"):
        EmotionRecognizer.from_pretrained(good, backbone=other)

    missing = tmp_path / "missing"
    recognizer.save_pretrained(missing)
    (missing / "model.safetensors").unlink()
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors is missing"):
        EmotionRecognizer.from_pretrained(missing, backbone=tiny_backbone)

    noconf = tmp_path / "noconf"
    recognizer.save_pretrained(noconf)
    (noconf / "config.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match="config.json is missing"):
        EmotionRecognizer.from_pretrained(noconf, backbone=tiny_backbone)

    corrupt = tmp_path / "corrupt"
    recognizer.save_pretrained(corrupt)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="corrupt or truncated"):
        EmotionRecognizer.from_pretrained(corrupt, backbone=tiny_backbone)

    garbage = tmp_path / "garbage"
    recognizer.save_pretrained(garbage)
    (garbage / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ckpt.CheckpointError, match="corrupt or truncated"):
        EmotionRecognizer.from_pretrained(garbage, backbone=tiny_backbone)

    badjson = tmp_path / "badjson"
    recognizer.save_pretrained(badjson)
    (badjson / "config.json").write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match="not valid JSON"):
        EmotionRecognizer.from_pretrained(badjson, backbone=tiny_backbone)

    shape = tmp_path / "shape"
    small = EmotionRecognizer(tiny_backbone, RecognizerConfig(backbone="tiny", adapter=AdapterConfig(d_model=16)))
    small.save_pretrained(shape)
    conf = json.loads((shape / "config.json").read_text())
    conf["recognizer"]["adapter"]["d_model"] = 256
    (shape / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ckpt.CheckpointError, match="has shape .* the model expects"):
        EmotionRecognizer.from_pretrained(shape, backbone=tiny_backbone)


def test_wrong_feature_width_is_a_clear_error(recognizer):
    bad = UtteranceInput("hi", "A", (), {"audio": np.zeros((10, 24))})
    with pytest.raises(ValueError, match="expected \\(frames, 25\\)"):
        recognizer.predict([bad])
    with pytest.raises(ValueError, match="not one this adapter was built for"):
        recognizer.predict([UtteranceInput("hi", "A", (), {"video": np.zeros((10, 24))})])


def test_linear_head_on_a_middle_layer_starts_as_lm_head_scoring_and_trains(tiny_backbone, tmp_path):
    torch.manual_seed(0)
    lm = EmotionRecognizer(tiny_backbone, RecognizerConfig(backbone="tiny", head_layer=2))
    torch.manual_seed(0)
    lin = EmotionRecognizer(tiny_backbone, RecognizerConfig(backbone="tiny", head="linear", head_layer=2))
    lin.adapter.load_state_dict(lm.adapter.state_dict())
    batch = lm.collate(ITEMS)
    with torch.no_grad():
        torch.testing.assert_close(lin(batch), lm(batch), rtol=1e-5, atol=1e-5)
        # head_layer = number of layers reads the same state as the last layer
        last = EmotionRecognizer(tiny_backbone, RecognizerConfig(backbone="tiny"))
        last.adapter.load_state_dict(lm.adapter.state_dict())
        torch.testing.assert_close(last(batch), lm(batch), rtol=1e-4, atol=1e-4)
        one = EmotionRecognizer(tiny_backbone, RecognizerConfig(backbone="tiny", head_layer=1))
        one.adapter.load_state_dict(lm.adapter.state_dict())
        assert not torch.allclose(one(batch), lm(batch))
    assert {n for n, p in lin.named_parameters() if p.requires_grad} >= {"label_head.weight", "label_head.bias"}
    lin.save_pretrained(tmp_path / "lin")
    again = EmotionRecognizer.from_pretrained(tmp_path / "lin", backbone=tiny_backbone)
    np.testing.assert_array_equal(lin.predict_proba(ITEMS), again.predict_proba(ITEMS))


def test_linear_head_init_scale_zero_starts_uniform(tiny_backbone):
    rec = EmotionRecognizer(tiny_backbone, RecognizerConfig(backbone="tiny", head="linear", head_init_scale=0.0))
    probs = rec.predict_proba(ITEMS)
    np.testing.assert_allclose(probs, np.full_like(probs, 1 / 7), atol=1e-6)


def test_layer_states_are_what_the_head_reads_at_each_layer(tiny_backbone):
    torch.manual_seed(0)
    n = tiny_backbone.num_layers
    rec = EmotionRecognizer(tiny_backbone, RecognizerConfig(backbone="tiny", head="linear", head_layer=1))
    rec.eval()
    batch = rec.collate(ITEMS)
    states = rec.layer_states(batch, [n, 1])  # (B, 2, H), in the order asked
    assert states.shape == (len(ITEMS), 2, rec.backbone.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(states[:, 1], rec.answer_hidden(batch))  # head_layer 1
        rec.config.head_layer = 0  # the last layer: the LLM's own final-normed output
        torch.testing.assert_close(states[:, 0], rec.answer_hidden(batch))
    assert not torch.allclose(states[:, 0], states[:, 1])
    with pytest.raises(ValueError, match="layers"):
        rec.layer_states(batch, [n + 1])
