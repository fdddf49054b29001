"""bench/baselines.py: the majority baseline and the grouped CV grid search (fast, no models)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

_spec = importlib.util.spec_from_file_location("bench_baselines", Path(__file__).resolve().parents[1] / "bench" / "baselines.py")
baselines = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = baselines  # dataclasses look their module up there
_spec.loader.exec_module(baselines)


def test_majority_class_breaks_ties_by_lowest_id():
    assert baselines.majority_class(np.array([2, 2, 1, 1, 0]), 3) == 1
    assert baselines.majority_class(np.array([3]), 5) == 3


def test_majority_on_meld_dev_is_the_neutral_share(meld_dir, ravdess_dir):
    rows = {r.dataset: r for r in baselines.run_majority()}
    meld = rows["meld"]
    assert meld.params == {"class": "neutral"}
    assert meld.n == 1109
    assert abs(meld.accuracy - 470 / 1109) < 1e-9  # 470 of MELD dev's 1,109 utterances are neutral
    assert rows["ravdess->meld7"].params == {"class": "neutral"}
    assert rows["ravdess8"].n == rows["ravdess->meld7"].n == 240


def test_grid_search_picks_the_better_setting():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 40)
    X = (y[:, None] + rng.normal(0, 0.5, (80, 2))).astype(float)
    groups = np.arange(80) % 8
    grid = [{"C": 1e-6}, {"C": 1.0}]
    best, score, scores = baselines.grid_search(lambda p: LogisticRegression(C=p["C"]), grid, X, y, groups, n_splits=4)
    assert best == {"C": 1.0} and score > 0.8 and len(scores) == 2
