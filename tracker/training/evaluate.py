"""Evaluate a recognizer on labelled examples."""

from __future__ import annotations

import numpy as np

from tracker.metrics import ClassificationReport, classification_report
from tracker.model.recognizer import EmotionRecognizer
from tracker.training.examples import Example


def predict_examples(recognizer: EmotionRecognizer, examples: list[Example], batch_size: int = 8) -> np.ndarray:
    """Class probabilities (N, L) for the examples, in their order."""
    return recognizer.predict_proba([ex.item for ex in examples], batch_size=batch_size)


def evaluate(recognizer: EmotionRecognizer, examples: list[Example], batch_size: int = 8) -> tuple[ClassificationReport, np.ndarray]:
    probs = predict_examples(recognizer, examples, batch_size)
    gold = [ex.label for ex in examples]
    return classification_report(gold, probs.argmax(1), recognizer.label_set.labels), probs
