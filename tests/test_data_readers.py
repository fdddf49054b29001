"""The dataset readers against the real shared data (MELD, EmoryNLP, RAVDESS)."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pytest

from tracker.data import (
    DatasetError,
    count_utterances,
    data_dir,
    dataset_label_set,
    fix_mojibake,
    iter_examples,
    load_dataset,
    ravdess_split,
    to_inputs,
)
from tracker.data.emorynlp import parse_speakers
from tracker.data.meld import has_mojibake
from tracker.data.ravdess import DEV_ACTORS, TRAIN_ACTORS
from tracker.labels import EMORYNLP7, MELD7, RAVDESS8
from tracker.model.inputs import Turn


@pytest.fixture(scope="module")
def shared(data_dir) -> Path:
    return data_dir


@pytest.fixture(scope="module")
def meld_dev(shared):
    return load_dataset("meld:dev")


@pytest.fixture(scope="module")
def meld_train(shared):
    return load_dataset("meld:train")


# --- specs and paths ----------------------------------------------------------------------------


def test_data_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("TRACKER_DATA_DIR", str(tmp_path))
    assert data_dir() == tmp_path.resolve()


def test_data_dir_default_is_beside_the_checkout(monkeypatch):
    monkeypatch.delenv("TRACKER_DATA_DIR", raising=False)
    repo = Path(__file__).resolve().parents[1]
    expected = (repo.parent / "shared" / "data").resolve()
    if expected.is_dir():
        assert data_dir() == expected


@pytest.mark.parametrize("spec", ["meld:test", "emorynlp:test", "ravdess:test"])
def test_test_splits_are_held_out(spec):
    with pytest.raises(DatasetError, match="held out"):
        load_dataset(spec)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("iemocap:train", "unknown dataset 'iemocap:train'.*meld:dev.*jsonl"),
        ("meld", "needs a split: meld:train or meld:dev"),
        ("meld:validation", "unknown split 'validation' for meld \\(known: train, dev\\)"),
    ],
)
def test_bad_specs_are_explained(spec, match):
    with pytest.raises(DatasetError, match=match):
        load_dataset(spec)


def test_missing_jsonl_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_dataset(str(tmp_path / "nope.jsonl"))


def test_missing_data_dir_names_env_var(tmp_path):
    with pytest.raises(FileNotFoundError, match="TRACKER_DATA_DIR"):
        load_dataset("meld:dev", root=tmp_path)


def test_label_sets_per_dataset():
    assert dataset_label_set("meld:dev") is MELD7
    assert dataset_label_set("emorynlp:train") is EMORYNLP7
    assert dataset_label_set("ravdess:dev") is RAVDESS8


# --- past-only context --------------------------------------------------------------------------


def test_to_inputs_context_is_past_only_and_truncated(meld_dev):
    conv = max(meld_dev, key=len)
    pairs = list(to_inputs(conv))
    assert [u for u, _ in pairs] == conv.utterances
    for i, (utt, context) in enumerate(pairs):
        assert context == [Turn(u.speaker, u.text) for u in conv.utterances[:i]]
    last3 = list(to_inputs(conv, k=3))
    assert last3[0][1] == [] and last3[1][1] == [conv.utterances[0].turn()]
    assert last3[-1][1] == [u.turn() for u in conv.utterances[-4:-1]]
    assert all(ctx == [] for _, ctx in to_inputs(conv, k=0))


def test_iter_examples_never_crosses_dialogues(meld_dev):
    examples = list(iter_examples(meld_dev))
    assert len(examples) == 1109
    by_id = {u.utterance_id: u for conv in meld_dev for u in conv}
    texts_by_conv: dict[str, list[Turn]] = {}
    for utt, context in examples:
        seen = texts_by_conv.setdefault(utt.conversation_id, [])
        assert context == seen  # exactly the earlier utterances of the same dialogue
        seen.append(utt.turn())
        assert by_id[utt.utterance_id] is utt
    # the first utterance of every dialogue has no context
    assert all(ctx == [] for utt, ctx in examples if utt.index == 0)


# --- MELD ---------------------------------------------------------------------------------------


def test_meld_counts_match_readme(meld_train, meld_dev):
    assert (count_utterances(meld_dev), len(meld_dev)) == (1109, 114)
    assert (count_utterances(meld_train), len(meld_train)) == (9989, 1038)


def test_meld_ids_order_and_labels(meld_dev):
    conv = meld_dev[12]
    assert conv.conversation_id == "meld-dev-12"
    assert conv.utterances[3].utterance_id == "meld-dev-12-3"
    for conv in meld_dev:
        source_ids = [u.extra["source_utterance_id"] for u in conv]
        assert source_ids == sorted(source_ids) and len(set(source_ids)) == len(source_ids)
        assert [u.index for u in conv] == list(range(len(conv)))
        assert all(u.utterance_id == f"{conv.conversation_id}-{u.extra['source_utterance_id']}" for u in conv)
    labels = Counter(u.label for conv in meld_dev for u in conv)
    assert set(labels) == set(MELD7.labels)
    assert labels["neutral"] == 470
    assert {u.extra["sentiment"] for conv in meld_dev for u in conv} == {"neutral", "positive", "negative"}


def test_meld_gaps_in_utterance_ids_are_renumbered(meld_dev):
    # Dialogue 49 of dev skips Utterance_IDs 4 and 5 in the source.
    conv = next(c for c in meld_dev if c.conversation_id == "meld-dev-49")
    assert [u.extra["source_utterance_id"] for u in conv][:6] == [0, 1, 2, 3, 6, 7]
    assert [u.index for u in conv][:6] == [0, 1, 2, 3, 4, 5]


def test_meld_first_dialogue_content(meld_dev):
    first = meld_dev[0].utterances[0]
    assert (first.speaker, first.label) == ("Phoebe", "sadness")
    assert first.text == "Oh my God, he’s lost it. He’s totally lost it."
    assert first.extra["episode_start_s"] == pytest.approx(20 * 60 + 57.256)
    assert first.audio_path is None and first.start_s is None


def test_meld_text_has_no_mojibake_left(meld_train, meld_dev):
    for convs in (meld_train, meld_dev):
        assert not any(has_mojibake(u.text) or has_mojibake(u.speaker) for c in convs for u in c)


@pytest.mark.parametrize(
    ("broken", "fixed"),
    [
        ("donâ€™t", "don’t"),
        ("Iâ€™m â€œfineâ€\x9d â€¦", "I’m “fine” …"),
        ("cafÃ©", "café"),
        ("Ã¢â‚¬â„¢", "’"),  # broken twice
        ("Nestlé don’t â€™", "Nestlé don’t ’"),  # correct characters next to broken ones survive
        ("plain ascii", "plain ascii"),
        ("Ã", "Ã"),  # a lone marker that is not a repairable run is left alone
    ],
)
def test_fix_mojibake(broken, fixed):
    assert fix_mojibake(broken) == fixed


# --- EmoryNLP -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "speakers"),
    [
        ("['Monica Geller']", ["Monica Geller"]),
        ("['Chandler Bing', 'Joey Tribbiani', 'Ross Geller']", ["Chandler Bing", "Joey Tribbiani", "Ross Geller"]),
        ('["Phoebe\'s Assistant"]', ["Phoebe's Assistant"]),
        ("Monica", ["Monica"]),
    ],
)
def test_parse_speakers(raw, speakers):
    assert parse_speakers(raw) == speakers


@pytest.mark.parametrize("raw", ["[__import__('os').getcwd()]", "[]", "[1, 2]", "['a'", ""])
def test_parse_speakers_rejects_non_literals(raw):
    with pytest.raises(ValueError):
        parse_speakers(raw)


def test_emorynlp_reader(shared):
    dev = load_dataset("emorynlp:dev")
    train = load_dataset("emorynlp:train")
    assert (count_utterances(dev), len(dev)) == (954, 89)
    assert (count_utterances(train), len(train)) == (7551, 659)
    assert {u.label for c in dev for u in c} == set(EMORYNLP7.labels)
    first = dev[0]
    assert first.conversation_id == "emorynlp-dev-s1e15-c1"
    assert (first.utterances[0].speaker, first.utterances[0].text, first.utterances[0].label) == (
        "Rachel Green", "Coffee.", "neutral")
    multi = [u for c in dev for u in c if len(u.extra["speakers"]) > 1]
    assert len(multi) == 4
    assert "Chandler Bing & Joey Tribbiani & Phoebe Buffay" in {u.speaker for u in multi}
    assert all(u.speaker == " & ".join(u.extra["speakers"]) for u in multi)
    for conv in dev:
        ids = [u.extra["source_utterance_id"] for u in conv]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        assert len({(u.extra["season"], u.extra["episode"], u.extra["scene_id"]) for u in conv}) == 1


# --- RAVDESS ------------------------------------------------------------------------------------


def test_ravdess_split_is_speaker_independent_and_complete(shared):
    train, dev = load_dataset("ravdess:train"), load_dataset("ravdess:dev")
    train_actors = {c.utterances[0].speaker for c in train}
    dev_actors = {c.utterances[0].speaker for c in dev}
    assert not train_actors & dev_actors
    assert dev_actors == set(ravdess_split("dev")) == set(DEV_ACTORS)
    assert train_actors == set(ravdess_split("train")) == set(TRAIN_ACTORS)
    assert (len(train), len(dev)) == (960, 240)
    assert len(train) + len(dev) == 1200
    paths = [c.utterances[0].audio_path for c in train + dev]
    assert len(set(paths)) == 1200


def test_ravdess_dev_actors_are_gender_balanced(shared):
    dev = load_dataset("ravdess:dev")
    genders = {c.utterances[0].speaker: c.utterances[0].extra["gender"] for c in dev}
    assert Counter(genders.values()) == {"male": 2, "female": 2}
    train = load_dataset("ravdess:train")
    genders = {c.utterances[0].speaker: c.utterances[0].extra["gender"] for c in train}
    assert Counter(genders.values()) == {"male": 8, "female": 8}


def test_ravdess_records(shared):
    dev = load_dataset("ravdess:dev")
    utt = dev[0].utterances[0]
    assert Path(utt.audio_path).is_absolute() and Path(utt.audio_path).is_file()
    assert utt.text in ("Kids are talking by the door", "Dogs are sitting by the door")
    assert utt.conversation_id == utt.utterance_id == f"ravdess-{Path(utt.audio_path).stem}"
    assert {c.utterances[0].label for c in dev} == set(RAVDESS8.labels)
    folded = load_dataset("ravdess:dev", label_set="meld7")
    assert {c.utterances[0].label for c in folded} <= set(MELD7.labels)
    calm = [c.utterances[0] for c in folded if c.utterances[0].extra["ravdess_emotion"] == "calm"]
    assert calm and all(u.label == "neutral" for u in calm)


def test_ravdess_identical_actor07_clips_stay_on_one_side(shared):
    names = ("03-01-03-01-02-01-07", "03-01-03-01-02-02-07")
    folder = shared / "ravdess_16k" / "Actor_07"
    digests = {hashlib.sha256((folder / f"{n}.flac").read_bytes()).hexdigest() for n in names}
    assert len(digests) == 1, "README says these two clips are byte-identical"
    train_ids = {c.conversation_id for c in load_dataset("ravdess:train")}
    dev_ids = {c.conversation_id for c in load_dataset("ravdess:dev")}
    assert all(f"ravdess-{n}" in train_ids for n in names)
    assert not any(f"ravdess-{n}" in dev_ids for n in names)


def test_context_holds_the_last_k_turns_for_every_position():
    from tracker.data.records import Conversation, Utterance, to_inputs

    conv = Conversation("c", [Utterance("c", f"u{i}", i, "A", f"t{i}") for i in range(6)])
    for k in (1, 2, 3, 5):
        for i, (utt, ctx) in enumerate(to_inputs(conv, k)):
            assert [t.text for t in ctx] == [f"t{j}" for j in range(max(0, i - k), i)], (k, i)
