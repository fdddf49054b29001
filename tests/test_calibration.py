"""Calibration: ECE, temperature fitting, the temperature applied on every path, and `tracker calibrate|eval`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from tracker.config import ConfigError
from tracker.metrics import calibration_report
from tracker.model.incremental import IncrementalLabeler
from tracker.model.inputs import Turn, UtteranceInput
from tracker.model.kv_cache import KVCacheStore
from tracker.model.prompt import PromptConfig
from tracker.model.recognizer import EmotionRecognizer, RecognizerConfig
from tracker.training.calibrate import fit_temperature, rescale


def test_ece_matches_a_hand_computed_case():
    # 4 utterances at confidence 0.9 (bin 13 of 15), 3 right: |0.75 - 0.9| x 4/6;
    # 2 at confidence 0.6 (bin 9), both right: |1.0 - 0.6| x 2/6
    probs = np.array([[0.9, 0.1]] * 4 + [[0.6, 0.4]] * 2)
    gold = [0, 0, 0, 1, 0, 0]
    rep = calibration_report(probs, gold, bins=15)
    assert rep.ece == pytest.approx(0.15 * 4 / 6 + 0.4 * 2 / 6)
    assert rep.counts[13] == 4 and rep.counts[9] == 2 and sum(rep.counts) == 6
    assert rep.accuracy[13] == pytest.approx(0.75)


def test_fitted_temperature_recovers_the_one_that_generated_the_labels():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(4000, 7))
    true_t = 2.5  # labels drawn from softmax(logits / 2.5): softmax(logits) is overconfident
    p_true = np.exp(logits / true_t)
    p_true /= p_true.sum(1, keepdims=True)
    gold = np.array([rng.choice(7, p=row) for row in p_true])
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    fit = fit_temperature(probs, gold)
    assert fit.temperature == pytest.approx(true_t, rel=0.08)
    assert fit.nll_after < fit.nll_before
    assert fit.after.ece < 0.03 < fit.before.ece
    # a second fit on the calibrated probabilities changes (almost) nothing, and the absolute T composes
    again = fit_temperature(rescale(probs, fit.factor), gold, current=fit.temperature)
    assert again.factor == pytest.approx(1.0, abs=0.01)
    assert again.temperature == pytest.approx(fit.temperature, rel=0.01)
    assert (rescale(probs, fit.factor).argmax(1) == probs.argmax(1)).all()  # labels never change


def test_temperature_must_be_positive():
    with pytest.raises(ConfigError, match="temperature"):
        RecognizerConfig(backbone="tiny", temperature=0)


def _items() -> list[UtteranceInput]:
    turns = [Turn("A", "I can't believe you did that!"), Turn("B", "Sorry, it was an accident.")]
    return [UtteranceInput("Oh great, just great.", "A", tuple(turns[:1]), {}),
            UtteranceInput("Please calm down.", "B", tuple(turns), {})]


def test_temperature_applies_on_the_batch_and_incremental_paths_and_survives_save(tiny_backbone, tmp_path):
    prompt = PromptConfig(layout="context_first", context_turns=4, context_min_turns=2,
                          max_context_line_tokens=12, max_context_tokens=64)
    torch.manual_seed(0)
    rec = EmotionRecognizer(tiny_backbone, RecognizerConfig(backbone="tiny", prompt=prompt))
    items = _items()
    plain = rec.predict_proba(items)
    rec.config.temperature = 3.0
    hot = rec.predict_proba(items)
    np.testing.assert_allclose(hot, rescale(plain, 3.0), atol=1e-6)
    assert hot.max() < plain.max()  # a higher temperature flattens the distribution
    inc = IncrementalLabeler(rec, KVCacheStore(64)).predict_proba([("c", it) for it in items])
    np.testing.assert_allclose(inc, hot, atol=1e-5)
    rec.save_pretrained(tmp_path / "ckpt")
    again = EmotionRecognizer.from_pretrained(tmp_path / "ckpt", backbone=tiny_backbone)
    assert again.config.temperature == 3.0
    np.testing.assert_allclose(again.predict_proba(items), hot, atol=1e-6)


def test_calibrate_and_eval_commands_write_the_temperature_ece_and_plots(tiny_backbone, tmp_path):
    from tests.conftest import save_tiny_checkpoint

    ckpt = save_tiny_checkpoint(tiny_backbone, tmp_path / "ckpt")
    rows, labels = [], ["neutral", "joy", "anger", "sadness"]
    for c in range(12):
        for u in range(3):
            rows.append({"conversation_id": f"c{c}", "utterance_id": f"c{c}-{u}", "speaker": "AB"[u % 2],
                         "text": f"utterance {u} of call {c}, it was {labels[(c + u) % 4]}", "label": labels[(c * 3 + u) % 4]})
    data = tmp_path / "dev.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = subprocess.run([sys.executable, "-m", "tracker_cli", "calibrate", "--checkpoint", str(ckpt), "--data", str(data),
                          "--plot", str(tmp_path / "rel.png"), "--json", str(tmp_path / "fit.json")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    fit = json.loads((tmp_path / "fit.json").read_text())
    stored = json.loads((ckpt / "config.json").read_text())["recognizer"]["temperature"]
    assert stored == pytest.approx(fit["temperature"]) and stored != 1.0
    assert fit["nll_after"] <= fit["nll_before"]
    assert (tmp_path / "rel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = subprocess.run([sys.executable, "-m", "tracker_cli", "eval", "--checkpoint", str(ckpt), "--data", str(data),
                          "--plots", str(tmp_path / "plots"), "--json", str(tmp_path / "eval.json")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ECE" in out.stdout
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["temperature"] == pytest.approx(stored)
    calib = report["reports"][str(data)]["calibration"]
    assert sum(calib["counts"]) == len(rows) and 0 <= calib["ece"] <= 1
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert len(pngs) == 2 and pngs[0].startswith("confusion-") and pngs[1].startswith("reliability-")
    assert all((tmp_path / "plots" / n).read_bytes()[:4] == b"\x89PNG" for n in pngs)
