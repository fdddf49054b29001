"""scripts/ship_model.py's model card: every dev set, the telephone band, calibration and the run's history."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tracker.config import load_dataclass
from tracker.model.recognizer import EmotionRecognizer, RecognizerConfig

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ship_model.py"


def _load():
    spec = importlib.util.spec_from_file_location("ship_model", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _report(acc: float, labels: list[str]) -> dict:
    return {"n": 10, "accuracy": acc, "weighted_f1": acc - 0.01, "macro_f1": acc - 0.1, "ece": 0.031,
            "per_class": {lab: {"precision": 0.5, "recall": 0.4, "f1": 0.444, "support": 2} for lab in labels}}


def test_model_card_reports_telephone_band_calibration_loss_and_selected_step(tiny_backbone):
    ship = _load()
    cfg = load_dataclass(RecognizerConfig, {
        "label_set": "meld7", "temperature": 1.7, "dtype": "fp32",
        "adapter": {"d_model": 16, "n_pseudo_tokens": 2,
                    "modalities": [{"name": "whisper_tiny", "feature_dim": 768, "source": "whisper_tiny.en_l2_meanstd",
                                    "speaker_norm": True}]}})
    rec = EmotionRecognizer(tiny_backbone, cfg)
    labels = list(rec.label_set.labels)
    reports = {"meld:dev": _report(0.62, labels), "ravdess:dev": _report(0.71, labels),
               "ravdess:dev+telephone": _report(0.63, labels)}
    history = [{"step": 500, "epoch": 0.3, "meld:dev/weighted_f1": 0.5, "ravdess:dev/weighted_f1": 0.6, "ravdess:dev/accuracy": 0.61},
               {"step": 1000, "epoch": 0.6, "meld:dev/weighted_f1": 0.61, "ravdess:dev/weighted_f1": 0.7, "ravdess:dev/accuracy": 0.71}]
    run = {"loss": "focal", "focal_gamma": 2.0, "select_on": "mean", "select_sets": ["meld:dev", "ravdess:dev"],
           "train": [{"spec": "meld:train"}, {"spec": "ravdess:train", "repeat": 4, "channel": {"probability": 0.5, "codec": "random"}}]}
    calib = {"nll_before": 1.2, "nll_after": 1.1, "data": {"meld:dev": {"ece_before": 0.09, "ece_after": 0.03}}}
    card = ship.model_card(rec, reports, history, 1000, "abc123", run, calib)
    assert "| RAVDESS dev, telephone band (8 kHz, 300-3400 Hz, companded) | 10 | 63.00 | 62.00 | 53.00 | 3.10 |" in card
    assert "temperature 1.700" in card and "| meld:dev | 9.00 | 3.00 |" in card
    assert "focal loss (gamma 2.0)" in card and "50% of the RAVDESS clips" in card
    assert "speaker-normalised" in card and "OpenAI Whisper weights (acoustic features): MIT" in card
    assert "after 1000 optimiser steps" in card
    assert "| 1000 | 0.60 | 61.00 | 70.00 | 71.00 |" in card


def test_model_card_names_warm_start_window_previous_model_held_out_calibration_and_callcenter(tiny_backbone):
    ship = _load()
    cfg = load_dataclass(RecognizerConfig, {
        "label_set": "meld7", "temperature": 0.88, "dtype": "fp32",
        "prompt": {"layout": "context_first", "context_turns": 8, "context_min_turns": 4, "max_context_line_tokens": 48,
                   "max_context_tokens": 400},
        "adapter": {"d_model": 16, "n_pseudo_tokens": 2,
                    "modalities": [{"name": "audio_functionals", "feature_dim": 88, "source": "egemaps_functionals"}]}})
    rec = EmotionRecognizer(tiny_backbone, cfg)
    labels = list(rec.label_set.labels)
    reports = {"meld:dev": _report(0.60, labels), "ravdess:dev": _report(0.78, labels)}
    history = [{"step": 500, "epoch": 0.3, "meld:dev/weighted_f1": 0.5}, {"step": 900, "epoch": 0.5, "meld:dev/weighted_f1": 0.4}]
    run = {"init_from": "tracker/assets/model", "epochs": 3, "batch_size": 8}
    previous = {"meld:dev": {"n": 10, "accuracy": 0.61, "weighted_f1": 0.59, "macro_f1": 0.42},
                "ravdess:dev": {"n": 10, "accuracy": 0.54, "weighted_f1": 0.55, "macro_f1": 0.53}, "weights_sha1": "9947011ab8"}
    calib_eval = {"temperature_before": 1.0, "temperature_after": 0.88,
                  "data": {"meld:dev": {"n": 10, "ece_before": 0.06, "ece_after": 0.029, "ece_after_2fold": 0.034},
                           "ravdess:dev": {"n": 10, "ece_before": 0.1, "ece_after": 0.12}}}
    callcenter = {"description": "80 lines.", "rows": [{"name": "shipped recognizer, audio only", "false_alarms": 12.5,
                                                        "hits": 70.0, "calm_labels": "neutral 35, anger 5"},
                                           {"name": "acoustic path: probe", "shipped": False, "false_alarms": 90.0,
                                            "hits": 60.0, "calm_labels": "anger 36"}]}
    card = ship.model_card(rec, reports, history, 500, "abc123", run, None, trained_at="df77dd2",
                           calibration_eval=calib_eval, callcenter=callcenter, reliability=True, previous=previous)
    assert "training code at commit df77dd2, card written at abc123" in card
    assert "the checkpoint of step 500 of 900, batches of 8 utterances, 3 epochs" in card
    assert "`context_first` layout, the last 4-8 turns" in card and "`init_from: tracker/assets/model`" in card
    assert "| MELD dev, previous | 61.00 | 59.00 | 42.00 |" in card and "| MELD dev, this one | 60.00 | 59.00 | 50.00 |" in card
    assert "weights sha1 9947011ab8" in card
    assert "| meld:dev | 10 | 6.00 | 2.90 | 3.40 |" in card and "| ravdess:dev | 10 | 10.00 | 12.00 | - |" in card
    assert "reliability-meld-dev.png" in card and "openSMILE" in card and "OpenAI Whisper" not in card
    assert "| shipped recognizer, audio only | 12.5% | 70.0% | neutral 35, anger 5 |" in card and "probe" not in card


def test_model_card_says_which_targets_are_met(tiny_backbone):
    ship = _load()
    rec = EmotionRecognizer(tiny_backbone, load_dataclass(RecognizerConfig, {
        "label_set": "meld7", "dtype": "fp32", "adapter": {"d_model": 16, "n_pseudo_tokens": 2}}))
    labels = list(rec.label_set.labels)
    reports = {"meld:dev": _report(0.60, labels), "ravdess:dev": _report(0.78, labels)}
    card = ship.model_card(rec, reports, [], None, "abc", targets=["meld:dev/weighted_f1>=0.61", "ravdess:dev/accuracy>=0.70",
                                                                   "meld:dev/ece<=0.05"])
    assert "| meld:dev weighted f1 | >= 61 | 59.00 | **no** |" in card
    assert "| ravdess:dev accuracy | >= 70 | 78.00 | yes |" in card and "| meld:dev ece | <= 5 | 3.10 | yes |" in card
    with pytest.raises(SystemExit, match="expected SPEC/METRIC"):
        ship.model_card(rec, reports, [], None, "abc", targets=["meld:test/accuracy>=0.5"])
