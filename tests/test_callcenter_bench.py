"""bench/operating_point.py (the alarm threshold, fast, no data) and bench/callcenter.py's human set (RAVDESS dev)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


op = _load("operating_point")


@pytest.mark.parametrize("n, target", [(48, 0.10), (100, 0.29), (10, 0.0), (7, 0.5), (1, 0.1)])
def test_pick_tau_meets_the_target_and_is_the_smallest_that_does(n, target):
    rng = np.random.default_rng(n)
    scores = rng.random(n)
    tau = op.pick_tau(scores, target)
    assert op.alarm_share(scores, tau) <= target
    assert op.alarm_share(scores, np.nextafter(tau, -np.inf)) > target  # one float lower alarms too many
    assert op.alarm_share(scores, tau) == np.floor(target * n + 1e-9) / n  # uses every alarm it is allowed


def test_pick_tau_puts_ties_on_the_quiet_side():
    scores = np.array([0.9, 0.9, 0.9, 0.2, 0.1])  # 20% allowed = 1 alarm, but three clips share the top score
    tau = op.pick_tau(scores, 0.2)
    assert tau > 0.9 and op.alarm_share(scores, tau) == 0.0
    assert op.alarm_share(scores, 0.9) == 0.6


def test_pick_tau_rejects_bad_input():
    with pytest.raises(ValueError, match="no calm scores"):
        op.pick_tau(np.array([]), 0.1)
    with pytest.raises(ValueError, match="target"):
        op.pick_tau(np.array([0.5]), 1.0)


def test_negative_mass_sums_the_negative_columns_in_class_order():
    proba = np.array([[0.5, 0.1, 0.4], [0.2, 0.7, 0.1]])
    np.testing.assert_allclose(op.negative_mass(proba, [4, 0, 3], negative=[3, 4]), [0.9, 0.3])
    with pytest.raises(ValueError, match="expected"):
        op.negative_mass(proba, [0, 1], negative=[1])


def test_human_set_is_dev_actors_calm_and_upset(ravdess_dir):
    callcenter = _load("callcenter")
    dev = callcenter.clips("dev")
    calm, upset = callcenter.human_masks([c.label for c in dev])
    assert {c.speaker for c in dev} == {"actor_17", "actor_18", "actor_19", "actor_20"}
    assert (calm.sum(), upset.sum(), len(dev)) == (48, 128, 240)  # 4 actors x (4 neutral + 8 calm), x 4 x 8 upset
    from tracker.data.ravdess import read_ravdess

    emotion = {c.utterances[0].utterance_id: c.utterances[0].extra["ravdess_emotion"] for c in read_ravdess("dev")}
    assert {emotion[c.clip_id] for c, m in zip(dev, calm) if m} == {"neutral", "calm"}
    assert {emotion[c.clip_id] for c, m in zip(dev, upset) if m} == {"angry", "fearful", "sad", "disgust"}
