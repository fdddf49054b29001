"""bench/operating_point.py (the alarm threshold, fast, no data), the K telephone training copies of
bench/audio_encoders.py / bench/callcenter.py (fast, toy clips) and bench/callcenter.py's human set (RAVDESS dev)."""

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


# ------------------------------------------------------------------- K telephone copies per training clip
ae = _load("audio_encoders")


def test_aug_conditions_keep_the_single_copy_and_give_each_copy_its_own_seed():
    assert ae.aug_conditions(0) == ae.aug_conditions(0, 1) == [(0, "aug")]  # the earlier figures' copy
    conds = ae.aug_conditions(2, 3)
    assert conds[0] == (2, "aug") and len({seed for seed, _ in conds}) == 3 and {k for _, k in conds} == {"aug"}
    every = [c for s in (0, 1, 2) for c in ae.aug_conditions(s, 5)]  # run seeds never share a copy
    assert len(set(every)) == 15
    with pytest.raises(ValueError, match="aug copies"):
        ae.aug_conditions(0, 0)
    with pytest.raises(ValueError, match="seed"):
        ae.aug_conditions(ae.AUG_SEED_STRIDE, 2)


def _toy_clip(tmp_path: Path, name: str = "toy", seconds: float = 0.5, rate: int = 16000) -> "ae.Clip":
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    x = (0.3 * np.sin(2 * np.pi * 180 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)  # a hummed vowel
    path = tmp_path / f"{name}.wav"
    sf.write(path, x, rate)
    return ae.Clip(name, "actor_00", 0, str(path))


def test_k_copies_of_one_clip_are_distinct_telephone_audio(tmp_path):
    from tracker.audio.channel import TelephoneChannel, channel_rng
    from tracker.audio.pcm import read_audio

    clip = _toy_clip(tmp_path)
    x, rate = read_audio(clip.path, dtype="float32", target_rate=None)
    channel = TelephoneChannel()
    conds = ae.aug_conditions(0, 3)
    copies = [channel(x, rate, seed, clip.clip_id, key)[0] for seed, key in conds]
    assert all(c.shape == copies[0].shape and c.dtype == np.float32 for c in copies)  # 8 kHz, same length
    assert all(not np.allclose(copies[i], copies[j]) for i in range(3) for j in range(i + 1, 3))
    draws = [channel.draw(channel_rng(seed, clip.clip_id, key)) for seed, key in conds]
    assert len({(d["gain_db"], d["snr_db"]) for d in draws}) == 3  # each copy its own gain and noise level
    np.testing.assert_array_equal(copies[0], channel(x, rate, 0, clip.clip_id, "aug")[0])  # copy 0 = the single copy
    np.testing.assert_array_equal(copies[1], channel(x, rate, *conds[1][:1], clip.clip_id, "aug")[0])  # reproducible


class _Fingerprint:
    """A stand-in feature source: (1, 2) [sum of samples, sample rate], so rows can be traced to their audio."""

    def from_signal(self, x: np.ndarray, rate: int) -> dict[str, np.ndarray]:
        return {"x": np.array([[float(np.sum(x, dtype=np.float64)), float(rate)]])}


def test_feature_bank_stacks_k_copies_copy_major(tmp_path):
    items = [_toy_clip(tmp_path, f"clip{i}", seconds=0.3 + 0.1 * i) for i in range(2)]
    bank = ae.FeatureBank([])
    bank.features = {"fp": _Fingerprint()}
    X = bank.copies(items, 1, 3, ["fp"])["fp"]  # (3 * 2, 2)
    assert X.shape == (6, 2) and (X[:, 1] == 8000).all()
    for j, cond in enumerate(ae.aug_conditions(1, 3)):
        np.testing.assert_array_equal(X[j * 2:(j + 1) * 2], bank.matrix(items, cond, ["fp"])["fp"])
    assert len(set(X[:, 0].tolist())) == 6  # every copy of every clip differs
    np.testing.assert_array_equal(bank.copies(items, 1, 1, ["fp"])["fp"], bank.matrix(items, (1, "aug"), ["fp"])["fp"])


def test_speaker_normalised_treats_each_copy_as_its_own_session():
    items = [ae.Clip(f"c{i}", f"actor_{i % 2}", 0, "") for i in range(6)]
    rng = np.random.default_rng(0)
    X = rng.normal(size=(3 * 6, 4))
    mean, std = np.zeros(4), np.ones(4)
    stacked = ae.speaker_normalised(X, items, mean, std, 0)
    for j in range(3):
        np.testing.assert_allclose(stacked[j * 6:(j + 1) * 6], ae.speaker_normalised(X[j * 6:(j + 1) * 6], items, mean, std, 0))
    with pytest.raises(ValueError, match="whole number of copies"):
        ae.speaker_normalised(X[:7], items, mean, std, 0)


def test_probe_marks_the_rows_of_k_copies():
    cc = _load("callcenter")
    y = np.tile(np.arange(5), 4)  # 5 clips, as recorded + 3 copies
    p = cc.Probe(None, 0.01, np.zeros(1), np.ones(1), np.zeros((20, 1)), y, y, False, copies=3)
    assert p.is_copy.tolist() == [False] * 5 + [True] * 15


# ------------------------------------------------------------- C chosen by calm-vs-upset separation (fast)
def test_roc_auc_counts_ordered_pairs_and_half_ties():
    assert op.roc_auc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert op.roc_auc([0.1], [0.9]) == 0.0
    assert op.roc_auc([0.5, 0.9], [0.5, 0.1]) == (0.5 + 1 + 1 + 1) / 4  # one tied pair counts one half
    rng = np.random.default_rng(0)
    u, c = rng.random(30), rng.random(20)
    from sklearn.metrics import roc_auc_score

    assert op.roc_auc(u, c) == pytest.approx(roc_auc_score(np.r_[np.ones(30), np.zeros(20)], np.r_[u, c]))
    with pytest.raises(ValueError, match="upset and calm"):
        op.roc_auc([], [0.1])


def test_pick_c_by_separation_takes_the_best_auc_and_ties_to_the_smallest_c():
    assert op.pick_c_by_separation({0.001: 0.90, 0.01: 0.95, 0.1: 0.93}) == 0.01
    assert op.pick_c_by_separation({0.1: 0.95, 0.01: 0.95, 0.001: 0.90}) == 0.01  # tie: stronger regularisation
    assert op.pick_c_by_separation({0.1: 0.95, 0.001: 0.95 - 1e-12}) == 0.001  # within 1e-9 is a tie
    with pytest.raises(ValueError, match="no C"):
        op.pick_c_by_separation({})
    with pytest.raises(ValueError, match="non-finite"):
        op.pick_c_by_separation({0.1: float("nan")})


def test_separation_cv_scores_each_c_on_the_telephone_rows_and_returns_the_chosen_oof():
    cc = _load("callcenter")
    rng = np.random.default_rng(0)
    n = 8 * 7 * 2  # 8 actors x 7 labels x 2 clips, as recorded, then one "telephone" copy
    y = np.tile(np.repeat(np.arange(7), 2), 8)
    groups = np.repeat([f"actor_{i}" for i in range(8)], 14)
    upset = np.isin(y, cc.NEGATIVE_IDX).astype(float)
    rec = rng.normal(size=(n, 6)) + 2.0 * upset[:, None] * np.array([1, 0, 0, 0, 0, 0])
    tel = rec + rng.normal(scale=3.0, size=rec.shape)  # a noisy copy: separation must be read on these rows
    X, yy, gg = np.concatenate([rec, tel]), np.tile(y, 2), np.tile(groups, 2)
    is_copy = np.arange(2 * n) >= n
    C, report, oof = cc.separation_cv(X, yy, gg, is_copy, grid=[0.001, 0.1, 10.0])
    assert set(report) == {0.001, 0.1, 10.0} and oof.shape == (2 * n, 7)
    assert C == op.pick_c_by_separation({c: r["auc"] for c, r in report.items()})
    score = op.negative_mass(oof, range(7), cc.NEGATIVE_IDX)
    calm, up = cc.human_masks(yy)
    assert report[C]["auc"] == pytest.approx(op.roc_auc(score[up & is_copy], score[calm & is_copy]))
    assert report[C]["auc_recorded"] > report[C]["auc"]  # the clean rows separate better than the noisy copies
    folds = cc.cv_folds(X, yy, gg)  # actor-grouped: no actor on both sides of a fold
    assert len(folds) == 4 and all(not set(gg[tr]) & set(gg[va]) for tr, va in folds)


def test_wilson_interval_matches_the_textbook_values():
    callcenter = _load("callcenter")
    lo, hi = callcenter.wilson(3, 48)  # 6.25%: the dev calm-clip figure of BENCHMARKS.md
    assert 2.1 < lo < 2.2 and 16.7 < hi < 16.9
    lo, hi = callcenter.wilson(0, 20)
    assert lo == pytest.approx(0.0, abs=1e-9) and 16.0 < hi < 16.2
    assert callcenter.wilson(0, 0) == (0.0, 100.0)
