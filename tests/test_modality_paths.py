"""Training, replay and the service compute identical acoustic features for the same clip (eGeMAPS and Whisper),
and the training job's telephone-channel augmentation and speaker normalisation run from a TrainConfig."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import soundfile as sf

from tests.test_whisper import rand_model, speechlike  # noqa: F401  (fixture)
from tests.whisper_fixtures import D_MODEL
from tracker.data.records import Conversation, Utterance

MODALITIES = [{"name": "audio", "feature_dim": 25, "lstm_hidden": 8, "source": "egemaps_lld"},
              {"name": "whisper", "feature_dim": 2 * D_MODEL, "lstm_hidden": 8, "source": "whisper_rand_l2_meanstd"}]


def clip_file(path, seconds=1.5, seed=0):
    sf.write(str(path), (speechlike(seconds, seed=seed) * 32767).astype(np.int16), 16000, subtype="PCM_16")
    return path


def test_training_replay_and_service_compute_identical_features(rand_model, tiny_backbone, tmp_path, monkeypatch):  # noqa: F811
    from clients.replay import replay_in_process
    from services.deployments import FeatureExtractor as FeatureDeployment
    from tracker.audio.modalities import ModalityFeatures
    from tracker.audio.pcm import numpy_to_pcm16, read_audio
    from tracker.config import load_dataclass
    from tracker.labels import MELD7
    from tracker.model.recognizer import EmotionRecognizer, RecognizerConfig
    from tracker.training.examples import examples_from_conversations

    wav = clip_file(tmp_path / "clip.wav")
    conv = Conversation("c1", [Utterance("c1", "u1", 0, "Agent", "Thank you for calling.", "neutral", str(wav))])
    config = load_dataclass(RecognizerConfig, {"backbone": "tiny", "dtype": "fp32",
                                               "adapter": {"d_model": 16, "n_pseudo_tokens": 2, "modalities": MODALITIES}})
    rec = EmotionRecognizer(tiny_backbone, config)
    checkpoint = rec.save_pretrained(tmp_path / "ckpt")

    def fresh_cache(name):  # each path computes for itself: nothing is read from another's cache
        monkeypatch.setenv("TRACKER_CACHE_DIR", str(tmp_path / name))

    fresh_cache("train-cache")
    train = examples_from_conversations([conv], MELD7, 0, ModalityFeatures(config.adapter.modalities), "test")[0].item.features

    fresh_cache("replay-cache")
    seen = []
    original = rec.predict
    monkeypatch.setattr(rec, "predict", lambda items, batch_size=8: seen.extend(items) or original(items, batch_size))
    replay_in_process(rec, [conv], features=ModalityFeatures(rec.config.adapter.modalities))
    replay = seen[0].features

    fresh_cache("service-cache")
    deployment = FeatureDeployment.func_or_class({"model": {"checkpoint": str(checkpoint)}, "asr": "off"})
    samples, rate = read_audio(wav, dtype="int16", target_rate=None)
    service = asyncio.run(deployment.extract(numpy_to_pcm16(samples), rate))

    assert set(train) == set(replay) == set(service) == {"audio", "whisper"}
    assert train["whisper"].shape == (1, 2 * D_MODEL) and train["audio"].shape[1] == 25
    for name in train:
        np.testing.assert_array_equal(train[name], replay[name])
        np.testing.assert_array_equal(train[name], service[name])


def test_train_config_runs_channel_augmentation_and_speaker_normalisation(rand_model, tiny_backbone, tmp_path):  # noqa: F811
    from tracker.config import load_dataclass
    from tracker.model.recognizer import EmotionRecognizer
    from tracker.training.config import TrainConfig
    from tracker.training.trainer import Trainer

    rows = []
    for spk in ("A", "B"):
        for i in range(4):
            wav = clip_file(tmp_path / f"{spk}{i}.wav", 1.0 + 0.1 * i, seed=10 * ord(spk) + i)
            rows.append({"conversation_id": f"{spk}{i}", "utterance_id": f"{spk}{i}-0", "speaker": spk,
                         "text": "Kids are talking by the door", "label": ["neutral", "anger"][i % 2], "audio": {"path": str(wav)}})
    data = tmp_path / "clips.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_dataclass(TrainConfig, {
        "name": "aug", "output_dir": str(tmp_path / "runs"), "seed": 3, "batch_size": 4, "max_steps": 2, "epochs": 1,
        "encoder_warmup_epochs": 2, "autocast_bf16": False,
        "model": {"backbone": "tiny", "dtype": "fp32", "adapter": {"d_model": 16, "n_pseudo_tokens": 2, "aux_classes": 7,
                  "modalities": [{**MODALITIES[1], "speaker_norm": True}]}},
        "train": [{"spec": str(data), "repeat": 2, "channel": {"probability": 0.5, "seed": 1, "variants": 2}}],
        "dev": [{"spec": str(data)}, {"spec": str(data), "channel": {"seed": 99}}]})
    assert [d.name for d in cfg.dev] == [str(data), f"{data}+telephone"]

    def run():
        trainer = Trainer(cfg, recognizer=EmotionRecognizer(tiny_backbone, cfg.model), progress=False)
        trainer.prepare()
        return trainer

    t = run()
    assert len(t.train_examples) == 16 and len({id(ex) for ex in t.train_examples}) == 16  # repeats are separate copies
    recorded = [ex.item.features["whisper"].copy() for ex in t.train_examples]
    t.set_epoch_features(1)
    epoch1 = [ex.item.features["whisper"].copy() for ex in t.train_examples]
    assert any(not np.array_equal(a, b) for a, b in zip(recorded, epoch1))  # a different channel variant
    t.set_epoch_features(2)  # variants: 2, so epoch 2 repeats epoch 0
    np.testing.assert_array_equal(np.stack([ex.item.features["whisper"] for ex in t.train_examples]), np.stack(recorded))
    again = run()  # a new run (or a resumed one) sees exactly the same features
    again.set_epoch_features(1)
    np.testing.assert_array_equal(np.stack([ex.item.features["whisper"] for ex in again.train_examples]), np.stack(epoch1))
    # speaker normalisation: each (speaker, copy)'s first clip is left as it came, later ones are mapped
    normalizers, t._normalizers, t._features_epoch = t._normalizers, {}, None
    t.set_epoch_features(0)
    before = [ex.item.features["whisper"].copy() for ex in t.train_examples]
    t._normalizers, t._features_epoch = normalizers, None
    t.set_epoch_features(0)
    unchanged = [np.array_equal(ex.item.features["whisper"], b) for ex, b in zip(t.train_examples, before)]
    assert sum(unchanged) == 4  # 2 speakers x 2 copies
    tel, rec_dev = t.dev_sets[f"{data}+telephone"], t.dev_sets[str(data)]
    assert not np.array_equal(tel[1].item.features["whisper"], rec_dev[1].item.features["whisper"])
    result = Trainer(cfg, recognizer=EmotionRecognizer(tiny_backbone, cfg.model), progress=False).fit()
    assert set(result["dev"]) == {str(data), f"{data}+telephone"}


def test_eval_spec_with_telephone_suffix_is_the_training_dev_copy(rand_model, tiny_backbone, tmp_path):  # noqa: F811
    """`tracker eval --data X+telephone` reads the same telephone-band copy the training run reports."""
    from tracker.config import load_dataclass
    from tracker.model.recognizer import EmotionRecognizer
    from tracker.training.config import TELEPHONE_DEV_SEED, TrainConfig
    from tracker.training.evaluate import spec_examples
    from tracker.training.trainer import Trainer

    rows = [{"conversation_id": f"c{i}", "utterance_id": f"c{i}-0", "speaker": "A", "text": "hello there",
             "label": "neutral", "audio": {"path": str(clip_file(tmp_path / f"c{i}.wav", 1.0 + 0.2 * i, seed=i))}}
            for i in range(3)]
    data = tmp_path / "clips.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_dataclass(TrainConfig, {
        "name": "tel", "output_dir": str(tmp_path / "runs"), "autocast_bf16": False,
        "model": {"backbone": "tiny", "dtype": "fp32", "adapter": {"d_model": 16, "n_pseudo_tokens": 2,
                  "modalities": [MODALITIES[1]]}},
        "train": [{"spec": str(data)}], "dev": [{"spec": str(data), "channel": {"seed": TELEPHONE_DEV_SEED}}]})
    rec = EmotionRecognizer(tiny_backbone, cfg.model)
    trainer = Trainer(cfg, recognizer=rec, progress=False)
    trainer.prepare()
    trained = trainer.dev_sets[f"{data}+telephone"]
    tel = spec_examples(rec, f"{data}+telephone")
    plain = spec_examples(rec, str(data))
    assert [ex.utterance_id for ex in tel] == [ex.utterance_id for ex in trained] == ["c0-0", "c1-0", "c2-0"]
    for a, b, c in zip(tel, trained, plain):
        np.testing.assert_array_equal(a.item.features["whisper"], b.item.features["whisper"])
        assert not np.array_equal(a.item.features["whisper"], c.item.features["whisper"])
