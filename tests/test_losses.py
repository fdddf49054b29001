"""The answer losses for rare classes: each reduces to plain cross-entropy where it should, and differs where it should."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tracker.config import ConfigError, load_dataclass
from tracker.training.config import TrainConfig
from tracker.training.losses import AnswerLoss

LABELS = [0] * 80 + [1] * 15 + [2] * 5  # a skewed train set


def _batch():
    torch.manual_seed(0)
    return torch.randn(16, 3) * 2, torch.randint(0, 3, (16,))


def test_focal_with_gamma_zero_is_cross_entropy_weighted_or_not():
    logits, labels = _batch()
    w = torch.tensor([0.5, 1.0, 3.0])
    assert AnswerLoss("focal", 3, LABELS, focal_gamma=0.0)(logits, labels).item() == pytest.approx(
        F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert AnswerLoss("focal", 3, LABELS, w, focal_gamma=0.0)(logits, labels).item() == pytest.approx(
        F.cross_entropy(logits, labels, weight=w).item(), rel=1e-5)


def test_focal_down_weights_easy_examples():
    easy = torch.tensor([[6.0, 0.0, 0.0]])
    hard = torch.tensor([[0.0, 0.5, 0.0]])
    y = torch.tensor([0])
    focal = AnswerLoss("focal", 3, LABELS, focal_gamma=2.0)
    assert focal(easy, y) / F.cross_entropy(easy, y) < 0.01
    assert focal(hard, y) / F.cross_entropy(hard, y) > 0.3


def test_logit_adjustment_adds_tau_log_prior():
    logits, labels = _batch()
    loss = AnswerLoss("logit_adjusted", 3, LABELS, logit_adjust_tau=1.0)
    prior = torch.tensor([81 / 103, 16 / 103, 6 / 103])  # add-one counts
    assert loss(logits, labels).item() == pytest.approx(F.cross_entropy(logits + prior.log(), labels).item(), rel=1e-5)
    # the adjusted loss asks for larger rare-class margins: its gradient pushes a rare gold class harder
    x = torch.zeros(1, 3, requires_grad=True)
    loss(x, torch.tensor([2])).backward()
    g_adj = x.grad[0, 2].item()
    x.grad = None
    F.cross_entropy(x, torch.tensor([2])).backward()
    assert g_adj < x.grad[0, 2].item() < 0


def test_loss_config_is_validated_by_name():
    with pytest.raises(ConfigError, match="loss"):
        load_dataclass(TrainConfig, {"loss": "hinge"})
    with pytest.raises(ConfigError, match="focal_gamma"):
        load_dataclass(TrainConfig, {"loss": "focal", "focal_gamma": -1})
