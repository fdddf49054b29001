"""The answer loss of the main training loop, with the three usual remedies for rare classes.

- ``ce``: cross-entropy, optionally class-weighted (``TrainConfig.class_weighting``);
- ``focal``: (1 - p_y)^gamma x CE (Lin et al. 2017): easy, mostly frequent-class examples count less;
- ``logit_adjusted``: CE on logits + tau x log(prior) (Menon et al. 2021). At inference the plain
  logits are used, so the learned scores are the prior-free ones and rare classes win more often.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class AnswerLoss:
    """loss(logits (B, L), labels (B,)) -> scalar, built once from the training labels."""

    def __init__(self, kind: str, n_classes: int, train_labels: list[int], weights: torch.Tensor | None = None,
                 focal_gamma: float = 2.0, logit_adjust_tau: float = 1.0):
        self.kind = kind
        self.weights = weights  # (L,) or None
        self.gamma = focal_gamma
        counts = np.bincount(np.asarray(train_labels, dtype=np.int64), minlength=n_classes).astype(np.float64)
        prior = (counts + 1.0) / (counts.sum() + n_classes)  # add-one: a class absent from train stays finite
        self.log_prior = torch.tensor(np.log(prior), dtype=torch.float32)  # (L,)
        self.tau = logit_adjust_tau

    def to(self, device: torch.device | str) -> "AnswerLoss":
        self.weights = None if self.weights is None else self.weights.to(device)
        self.log_prior = self.log_prior.to(device)
        return self

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = logits.float()  # (B, L)
        if self.kind == "logit_adjusted":
            return F.cross_entropy(logits + self.tau * self.log_prior, labels, weight=self.weights)
        if self.kind == "focal":
            logp = F.log_softmax(logits, dim=-1).gather(1, labels[:, None])[:, 0]  # (B,)
            per = -((1.0 - logp.exp()) ** self.gamma) * logp
            if self.weights is None:
                return per.mean()
            w = self.weights[labels]
            return (w * per).sum() / w.sum()
        return F.cross_entropy(logits, labels, weight=self.weights)
