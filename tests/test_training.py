"""Training on real MELD/RAVDESS with the tiny backbone: loss goes down, checkpoints load, resume is exact."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tracker.config import ConfigError, load_dataclass
from tracker.metrics import classification_report
from tracker.model.recognizer import EmotionRecognizer
from tracker.training.config import TrainConfig
from tracker.training.trainer import Trainer, length_grouped_batches


def tiny_config(tmp_path, **over) -> TrainConfig:
    data = {
        "name": "t",
        "output_dir": str(tmp_path),
        "model": {"backbone": "tiny", "dtype": "fp32", "adapter": {"d_model": 32, "n_pseudo_tokens": 4}},
        "train": [{"spec": "meld:train", "limit": 6}, {"spec": "ravdess:train", "label_set": "meld7", "limit": 6}],
        "dev": [{"spec": "meld:dev", "limit": 3}],
        "epochs": 2,
        "batch_size": 8,
        "lr": 0.003,
        "autocast_bf16": False,
    }
    data.update(over)
    return load_dataclass(TrainConfig, data)


def test_tiny_training_on_real_dialogues_lowers_the_loss_and_writes_a_loadable_checkpoint(tmp_path, tiny_backbone, data_dir):
    cfg = tiny_config(tmp_path, epochs=4)
    torch.manual_seed(0)
    rec = EmotionRecognizer(tiny_backbone, cfg.model)
    losses: list[float] = []
    trainer = Trainer(cfg, recognizer=rec, progress=False,
                      hooks=[lambda ev, info: losses.append(info["loss"]) if ev == "step" else None])
    result = trainer.fit()
    n = len(losses)
    assert n == result["steps"] > 8
    assert np.mean(losses[-n // 4 :]) < np.mean(losses[: n // 4])
    run = tmp_path / "t"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["dev"]["meld:dev"]["n"] == len(trainer.dev_sets["meld:dev"])
    assert (run / "confusion_meld_dev.png").stat().st_size > 1000
    loaded = EmotionRecognizer.from_pretrained(run / "best", backbone=tiny_backbone)
    # the RAVDESS audio statistics were fitted and saved with the weights
    assert not torch.equal(loaded.adapter.norm_mean_audio, torch.zeros(25))
    probs = loaded.predict_proba([ex.item for ex in trainer.dev_sets["meld:dev"]])
    assert probs.shape == (len(trainer.dev_sets["meld:dev"]), 7)


class Killed(Exception):
    pass


def test_resume_continues_from_the_saved_step_and_matches_an_uninterrupted_run(tmp_path, tiny_backbone, data_dir):
    def run(path, resume, kill_at=None):
        cfg = tiny_config(path, epochs=3, max_steps=10, eval_every_steps=4, dev=[])
        torch.manual_seed(0)
        rec = EmotionRecognizer(tiny_backbone, cfg.model)
        steps: list[int] = []

        def hook(ev, info):
            if ev == "step":
                steps.append(info["step"])
            if ev == "checkpoint" and info["global_step"] == kill_at:
                raise Killed  # the process dies right after its checkpoint at this step

        tr = Trainer(cfg, recognizer=rec, progress=False, hooks=[hook])
        try:
            tr.fit(resume=resume)
        except Killed:
            pass
        return rec, steps

    full, full_steps = run(tmp_path / "a", resume=False)
    _, first = run(tmp_path / "b", resume=False, kill_at=8)
    state = json.loads((tmp_path / "b" / "t" / "last" / "trainer_state.json").read_text())
    assert state["global_step"] == 8
    resumed, second = run(tmp_path / "b", resume=True)
    assert full_steps == list(range(1, 11))
    assert first == list(range(1, 9)) and second == [9, 10]
    for (k, a), (_, b) in zip(full.trainable_state_dict().items(), resumed.trainable_state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)


def test_length_grouped_batches_cover_every_row_once_and_are_reproducible():
    lengths = list(np.random.RandomState(0).randint(5, 200, size=203))
    a = length_grouped_batches(lengths, 8, seed=1, epoch=0)
    assert sorted(i for b in a for i in b) == list(range(203))
    assert a == length_grouped_batches(lengths, 8, seed=1, epoch=0)
    assert a != length_grouped_batches(lengths, 8, seed=1, epoch=1)
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in a])
    assert spread < 30  # grouped by length, not random (random would spread ~150)


def test_eval_on_a_fixed_prediction_set_gives_known_values():
    labels = ["a", "b", "c"]
    gold = [0, 0, 0, 1, 1, 2]
    pred = [0, 0, 1, 1, 2, 2]
    r = classification_report(gold, pred, labels)
    assert r.accuracy == pytest.approx(4 / 6)
    # per class: a P=1 R=2/3 F1=0.8; b P=1/2 R=1/2 F1=0.5; c P=1/2 R=1 F1=2/3
    assert r.per_class["a"]["f1"] == pytest.approx(0.8)
    assert r.per_class["b"]["f1"] == pytest.approx(0.5)
    assert r.per_class["c"]["f1"] == pytest.approx(2 / 3)
    assert r.weighted_f1 == pytest.approx((3 * 0.8 + 2 * 0.5 + 1 * 2 / 3) / 6)
    assert r.macro_f1 == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert r.confusion == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert "weighted F1 67.78" in r.to_text()


def test_train_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="lr: must be > 0"):
        tiny_config(tmp_path, lr=0.0)
    with pytest.raises(ConfigError, match=r"train\[0\].repeat"):
        tiny_config(tmp_path, train=[{"spec": "meld:train", "repeat": "x"}])
    with pytest.raises(ConfigError, match="class_weighting"):
        tiny_config(tmp_path, class_weighting="balanced")


def test_init_from_starts_a_new_run_from_a_checkpoints_weights(tmp_path, tiny_backbone, data_dir):
    torch.manual_seed(0)
    src = EmotionRecognizer(tiny_backbone, tiny_config(tmp_path).model)
    with torch.no_grad():
        for p in src.adapter.parameters():
            p.add_(0.1)
    src.save_pretrained(tmp_path / "src")
    cfg = tiny_config(tmp_path, name="warm", init_from=str(tmp_path / "src"), max_steps=1, lr=1e-9, dev=[])
    rec = EmotionRecognizer(tiny_backbone, cfg.model)
    Trainer(cfg, recognizer=rec, progress=False).fit()
    for (k, a), (_, b) in zip(src.trainable_state_dict().items(), rec.trainable_state_dict().items()):
        if "norm_" not in k:  # the feature statistics are refitted on this run's data
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


def _two_acoustic_modalities(aux_classes: int = 7) -> dict:
    return {"d_model": 32, "n_pseudo_tokens": 4, "aux_classes": aux_classes, "modalities": [
        {"name": "audio", "feature_dim": 25, "lstm_hidden": 16, "frame_pooling": 4},
        {"name": "audio_functionals", "feature_dim": 88, "lstm_hidden": 16, "source": "egemaps_functionals"}]}


def test_encoder_warm_up_and_aux_loss_teach_the_acoustic_encoders(tmp_path, tiny_backbone, data_dir):
    model = {"backbone": "tiny", "dtype": "fp32", "adapter": _two_acoustic_modalities()}
    cfg = tiny_config(tmp_path, model=model, train=[{"spec": "ravdess:train", "label_set": "meld7", "limit": 48}],
                      dev=[], encoder_warmup_epochs=12, encoder_warmup_lr=0.01, aux_loss_weight=0.5, max_steps=3)
    torch.manual_seed(0)
    rec = EmotionRecognizer(tiny_backbone, cfg.model)
    events: list[tuple[str, dict]] = []
    trainer = Trainer(cfg, recognizer=rec, progress=False, hooks=[lambda ev, info: events.append((ev, info))])
    trainer.fit()
    warm = [info["loss"] for ev, info in events if ev == "encoder_warmup"]
    assert len(warm) == 12 and warm[-1] < 0.5 * warm[0]
    exs = trainer.train_examples
    assert all(set(ex.item.features) == {"audio", "audio_functionals"} for ex in exs)
    assert exs[0].item.features["audio_functionals"].shape == (1, 88)
    # after warm-up the auxiliary classifiers fit their training clips far above chance (1/7)
    rec.eval()
    batch = rec.collate([ex.item for ex in exs])
    with torch.no_grad():
        aux = rec.adapter.aux_logits(batch.modalities)
    labels = torch.tensor([ex.label for ex in exs])
    for name, (logits, present) in aux.items():
        assert bool(present.all())
        assert (logits.argmax(-1) == labels).float().mean() > 0.6, name
    # the saved checkpoint round-trips the new modality and the auxiliary heads
    rec.save_pretrained(tmp_path / "ck")
    loaded = EmotionRecognizer.from_pretrained(tmp_path / "ck", backbone=tiny_backbone)
    torch.testing.assert_close(loaded.adapter.aux_heads["audio_functionals"].weight, rec.adapter.aux_heads["audio_functionals"].weight)


def test_aux_options_are_validated_naming_the_field(tmp_path):
    with pytest.raises(ConfigError, match="aux_classes"):
        tiny_config(tmp_path, aux_loss_weight=0.5)
    with pytest.raises(ConfigError, match="source"):
        tiny_config(tmp_path, model={"backbone": "tiny", "adapter": {"modalities": [{"name": "a", "feature_dim": 3, "source": "mfcc"}]}})
    with pytest.raises(ConfigError, match="select_on"):
        tiny_config(tmp_path, select_on="best")


def test_init_from_an_older_architecture_keeps_matching_tensors_and_starts_new_ones_fresh(tmp_path, tiny_backbone, data_dir):
    torch.manual_seed(0)
    old = EmotionRecognizer(tiny_backbone, tiny_config(tmp_path).model)  # audio LLDs only, no aux heads
    old.save_pretrained(tmp_path / "old")
    model = {"backbone": "tiny", "dtype": "fp32", "adapter": {**_two_acoustic_modalities(), "modalities": [
        {"name": "audio", "feature_dim": 25, "lstm_hidden": 64},
        {"name": "audio_functionals", "feature_dim": 88, "lstm_hidden": 16, "source": "egemaps_functionals"}]}}
    new = EmotionRecognizer(tiny_backbone, load_dataclass(TrainConfig, {"model": model}).model)
    missing = new.load_trainable_state_dict(old.trainable_state_dict(), strict=False)
    assert "adapter.encoders.audio_functionals.out.weight" in missing and "adapter.aux_heads.audio.weight" in missing
    assert "adapter.encoders.audio.lstm.weight_ih_l0" not in missing
    torch.testing.assert_close(new.adapter.encoders["audio"].lstm.weight_ih_l0, old.adapter.encoders["audio"].lstm.weight_ih_l0)
    with pytest.raises(RuntimeError):
        new.load_trainable_state_dict(old.trainable_state_dict())  # strict by default


def test_the_configured_answer_loss_is_the_one_trained_on(tmp_path, tiny_backbone, data_dir):
    first: dict[str, float] = {}
    for kind in ("ce", "focal", "logit_adjusted"):
        cfg = tiny_config(tmp_path / kind, loss=kind, max_steps=1, epochs=1, dev=[])
        torch.manual_seed(0)
        rec = EmotionRecognizer(tiny_backbone, cfg.model)
        trainer = Trainer(cfg, recognizer=rec, progress=False,
                          hooks=[lambda ev, info, k=kind: first.setdefault(k, info["loss"]) if ev == "step" else None])
        trainer.prepare()
        assert trainer.answer_loss.kind == kind
        trainer.fit()
    # same weights, same first batch: focal (gamma 2) is smaller than CE, logit adjustment differs from it
    assert first["focal"] < first["ce"]
    assert abs(first["logit_adjusted"] - first["ce"]) > 1e-4


def test_selection_averages_only_the_named_dev_sets(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import tracker.training.trainer as trainer_mod

    dev = [{"spec": "meld:dev"}, {"spec": "ravdess:dev", "label_set": "meld7"},
           {"spec": "ravdess:dev", "label_set": "meld7", "channel": {"seed": 1}}]
    with pytest.raises(ConfigError, match="select_sets"):
        tiny_config(tmp_path, dev=dev, select_on="mean", select_sets=["ravdess:test"])
    cfg = tiny_config(tmp_path, dev=dev, select_on="mean", select_sets=["meld:dev", "ravdess:dev"])
    trainer = Trainer.__new__(Trainer)
    trainer.config = cfg
    trainer.recognizer = None
    trainer.dev_sets = {"meld:dev": 0.6, "ravdess:dev": 0.4, "ravdess:dev+telephone": 0.0}
    monkeypatch.setattr(trainer_mod, "evaluate", lambda rec, wf1, batch_size: (SimpleNamespace(weighted_f1=wf1), None))
    score, reports = trainer._evaluate_selection()
    assert score == pytest.approx(0.5) and len(reports) == 3  # the telephone copy is reported, not selected on
    trainer.config = tiny_config(tmp_path, dev=dev, select_on="mean")
    assert trainer._evaluate_selection()[0] == pytest.approx(1.0 / 3)
