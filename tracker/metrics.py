"""The field's standard classification figures: accuracy, weighted F1, per-class P/R/F1, confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np


@dataclass
class ClassificationReport:
    labels: list[str]
    n: int
    accuracy: float
    weighted_f1: float
    macro_f1: float
    per_class: dict[str, dict[str, float]]  # label -> precision, recall, f1, support
    confusion: list[list[int]]  # rows = gold, columns = predicted

    def to_dict(self) -> dict:
        return {
            "n": self.n,
            "accuracy": self.accuracy,
            "weighted_f1": self.weighted_f1,
            "macro_f1": self.macro_f1,
            "labels": self.labels,
            "per_class": self.per_class,
            "confusion": self.confusion,
        }

    def to_text(self) -> str:
        width = max(9, max(len(lab) for lab in self.labels) + 1)
        lines = [
            f"utterances {self.n}   accuracy {100 * self.accuracy:.2f}   weighted F1 {100 * self.weighted_f1:.2f}"
            f"   macro F1 {100 * self.macro_f1:.2f}",
            "",
            f"{'':{width}s} precision  recall     f1  support",
        ]
        for lab in self.labels:
            c = self.per_class[lab]
            lines.append(
                f"{lab:{width}s} {100 * c['precision']:9.2f} {100 * c['recall']:7.2f} {100 * c['f1']:6.2f} {int(c['support']):8d}"
            )
        lines += ["", "confusion (rows gold, columns predicted)", f"{'':{width}s}" + "".join(f"{lab[:7]:>8s}" for lab in self.labels)]
        for lab, row in zip(self.labels, self.confusion):
            lines.append(f"{lab:{width}s}" + "".join(f"{v:8d}" for v in row))
        return "\n".join(lines)


def classification_report(gold: Sequence[int], pred: Sequence[int], labels: Sequence[str]) -> ClassificationReport:
    """Metrics for integer class ids against `labels` (weighted F1 weights each class by its gold support)."""
    gold = np.asarray(gold, dtype=np.int64)
    pred = np.asarray(pred, dtype=np.int64)
    if gold.shape != pred.shape:
        raise ValueError(f"gold and predicted differ in length: {gold.shape} vs {pred.shape}")
    k = len(labels)
    if gold.size and (gold.min() < 0 or gold.max() >= k or pred.min() < 0 or pred.max() >= k):
        raise ValueError(f"class ids must lie in [0, {k})")
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (gold, pred), 1)
    tp = np.diag(confusion).astype(float)
    support = confusion.sum(1).astype(float)
    predicted = confusion.sum(0).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(k), where=denom > 0)
    n = int(gold.size)
    return ClassificationReport(
        labels=list(labels),
        n=n,
        accuracy=float(tp.sum() / n) if n else 0.0,
        weighted_f1=float((f1 * support).sum() / support.sum()) if n else 0.0,
        macro_f1=float(f1[support > 0].mean()) if (support > 0).any() else 0.0,
        per_class={
            lab: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, lab in enumerate(labels)
        },
        confusion=confusion.tolist(),
    )


def save_confusion_png(report: ClassificationReport, path: str | Path, title: str = "") -> Path:
    """A row-normalised confusion-matrix heat map with counts, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(report.confusion, dtype=float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    k = len(report.labels)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * k, 0.8 + 0.8 * k))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), report.labels, rotation=45, ha="right")
    ax.set_yticks(range(k), report.labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
    ax.set_title(title or f"acc {100 * report.accuracy:.1f}  W-F1 {100 * report.weighted_f1:.1f}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@dataclass
class CalibrationReport:
    """Expected calibration error and the reliability curve of top-label confidences."""

    ece: float  # sum over bins of (bin share) x |accuracy - mean confidence|
    bins: int
    confidence: list[float]  # mean top-label confidence per bin (NaN where empty)
    accuracy: list[float]  # accuracy per bin (NaN where empty)
    counts: list[int]  # utterances per bin

    def to_dict(self) -> dict:
        return {"ece": self.ece, "bins": self.bins, "confidence": self.confidence, "accuracy": self.accuracy,
                "counts": self.counts}


def calibration_report(probs: np.ndarray, gold: Sequence[int], bins: int = 15) -> CalibrationReport:
    """ECE over `bins` equal-width confidence bins (Guo et al. 2017) of the top label's probability."""
    probs = np.asarray(probs, dtype=np.float64)  # (N, L)
    gold = np.asarray(gold, dtype=np.int64)  # (N,)
    if probs.ndim != 2 or probs.shape[0] != gold.shape[0]:
        raise ValueError(f"probabilities (N, L) and gold (N,) differ: {probs.shape} vs {gold.shape}")
    conf = probs.max(1)
    correct = (probs.argmax(1) == gold).astype(np.float64)
    which = np.minimum((conf * bins).astype(np.int64), bins - 1)  # bin i holds (i/bins, (i+1)/bins]; 1.0 in the last
    counts = np.bincount(which, minlength=bins)
    conf_sum = np.bincount(which, weights=conf, minlength=bins)
    acc_sum = np.bincount(which, weights=correct, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = conf_sum / counts
        mean_acc = acc_sum / counts
    n = max(1, int(gold.size))
    ece = float(np.nansum(counts / n * np.abs(mean_acc - mean_conf)))
    return CalibrationReport(ece=ece, bins=bins, confidence=mean_conf.tolist(), accuracy=mean_acc.tolist(),
                             counts=counts.astype(int).tolist())


def save_reliability_png(reports: dict[str, CalibrationReport], path: str | Path, title: str = "") -> Path:
    """A reliability diagram: per-bin accuracy against mean confidence, one curve per named report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    for name, rep in reports.items():
        conf, acc = np.asarray(rep.confidence), np.asarray(rep.accuracy)
        keep = np.asarray(rep.counts) > 0
        ax.plot(conf[keep], acc[keep], marker="o", label=f"{name} (ECE {100 * rep.ece:.1f}%)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence of the top label")
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title or "reliability")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
