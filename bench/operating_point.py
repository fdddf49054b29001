"""An alarm threshold on the probability of the negative labels, picked on one set and reported on another.

A recognizer that labels each clip by its most probable label raises an alarm when that label is
negative. An operating point instead alarms when the *summed* probability of the negative labels
reaches a threshold tau; :func:`pick_tau` chooses the smallest tau that keeps the share of calm
clips alarmed at or below a target on the set it is given (in bench/callcenter.py: out-of-fold
probabilities of actor-grouped CV on RAVDESS train, never dev). numpy and sklearn only, so tests need no data.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def negative_mass(proba: np.ndarray, classes: Sequence[int], negative: Sequence[int]) -> np.ndarray:
    """(N,) summed probability of the negative labels; `proba` (N, K) has one column per entry of `classes`."""
    proba = np.asarray(proba, dtype=np.float64)
    if proba.ndim != 2 or proba.shape[1] != len(classes):
        raise ValueError(f"proba: expected (N, {len(classes)}) for classes {list(classes)}, got shape {proba.shape}")
    cols = [i for i, k in enumerate(classes) if k in set(negative)]
    return proba[:, cols].sum(axis=1)


def alarm_share(scores: np.ndarray, tau: float) -> float:
    """Share of `scores` at or above tau (the alarm rule: score >= tau)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        raise ValueError("alarm_share: no scores")
    return float((scores >= tau).mean())


def pick_tau(calm_scores: np.ndarray, target: float) -> float:
    """The smallest tau with ``alarm_share(calm_scores, tau) <= target``.

    With k = floor(target * n) alarms allowed and the scores sorted high to low, any tau above the
    (k+1)-th score alarms at most k calm clips and tau at or below it alarms at least k+1, so the
    answer is the next float above that score (ties fall on the quiet side).
    """
    s = np.sort(np.asarray(calm_scores, dtype=np.float64).reshape(-1))[::-1]
    if s.size == 0:
        raise ValueError("pick_tau: no calm scores")
    if not 0.0 <= target < 1.0:
        raise ValueError(f"pick_tau: target must be in [0, 1), got {target!r}")
    k = int(np.floor(target * s.size + 1e-9))  # 1e-9: 0.29 * 100 is 28.999...; k < n since target < 1
    return float(np.nextafter(s[k], np.inf))


def roc_auc(upset_scores: np.ndarray, calm_scores: np.ndarray) -> float:
    """ROC AUC of a score that should be higher on upset clips than on calm ones (sklearn's, a tie counting
    one half): the share of (upset, calm) pairs the score orders correctly."""
    from sklearn.metrics import roc_auc_score

    u = np.asarray(upset_scores, dtype=np.float64).reshape(-1)
    c = np.asarray(calm_scores, dtype=np.float64).reshape(-1)
    if u.size == 0 or c.size == 0:
        raise ValueError(f"roc_auc: need upset and calm scores, got {u.size} upset and {c.size} calm")
    return float(roc_auc_score(np.r_[np.ones(u.size), np.zeros(c.size)], np.r_[u, c]))


def pick_c_by_separation(aucs: dict[float, float]) -> float:
    """The C with the highest AUC in `aucs` ({C: AUC}); AUCs within 1e-9 of the best count as a tie, which goes
    to the smallest C (the strongest regularisation: the simpler model when the data cannot tell them apart)."""
    if not aucs:
        raise ValueError("pick_c_by_separation: no C to choose from")
    if any(not np.isfinite(a) for a in aucs.values()):
        raise ValueError(f"pick_c_by_separation: non-finite AUC in {aucs!r}")
    best = max(aucs.values())
    return float(min(c for c, a in aucs.items() if a >= best - 1e-9))
