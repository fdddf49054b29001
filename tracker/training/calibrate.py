"""Temperature scaling (Guo et al. 2017): one scalar T per checkpoint, fitted on dev after training.

The recognizer's probabilities are softmax(logits / T). T is fitted by minimising the negative
log-likelihood of the dev labels; the argmax (and so every accuracy and F1 figure) does not change,
only how confident the model says it is. Fitting works on the checkpoint's own probabilities:
log p = logits / T0 - const per row, so a further temperature T' on log p gives T = T0 * T'.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tracker.metrics import CalibrationReport, calibration_report

MIN_T, MAX_T = 0.05, 20.0


@dataclass
class TemperatureFit:
    temperature: float  # the new absolute temperature (previous x fitted factor)
    factor: float  # the fitted factor on top of the probabilities' own temperature
    nll_before: float
    nll_after: float
    before: CalibrationReport
    after: CalibrationReport


def rescale(probs: np.ndarray, factor: float) -> np.ndarray:
    """Probabilities (N, L) as they would be with their temperature multiplied by `factor`."""
    logp = np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-300, None)) / factor
    logp -= logp.max(1, keepdims=True)
    p = np.exp(logp)
    return p / p.sum(1, keepdims=True)


def _nll(logp: torch.Tensor, gold: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logp / factor, gold)


def fit_temperature(probs: np.ndarray, gold: np.ndarray, current: float = 1.0, bins: int = 15) -> TemperatureFit:
    """Fit the factor on log-probabilities (N, L) by NLL; returns the new absolute temperature and ECE before/after."""
    probs = np.asarray(probs, dtype=np.float64)
    gold_t = torch.as_tensor(np.asarray(gold, dtype=np.int64))
    if probs.shape[0] == 0:
        raise ValueError("no examples to calibrate on")
    logp = torch.as_tensor(np.log(np.clip(probs, 1e-300, None)))  # (N, L)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = _nll(logp, gold_t, log_t.exp())
        loss.backward()
        return loss

    opt.step(closure)
    factor = float(np.clip(np.exp(log_t.item()), MIN_T / current, MAX_T / current))
    with torch.no_grad():
        before = float(_nll(logp, gold_t, torch.tensor(1.0, dtype=torch.float64)))
        after = float(_nll(logp, gold_t, torch.tensor(factor, dtype=torch.float64)))
    return TemperatureFit(
        temperature=current * factor, factor=factor, nll_before=before, nll_after=after,
        before=calibration_report(probs, gold, bins), after=calibration_report(rescale(probs, factor), gold, bins),
    )
