"""Evaluate a recognizer on labelled examples."""

from __future__ import annotations

import numpy as np

from tracker.metrics import ClassificationReport, classification_report
from tracker.model.recognizer import EmotionRecognizer
from tracker.training.examples import Example, load_examples


def predict_examples(recognizer: EmotionRecognizer, examples: list[Example], batch_size: int = 8) -> np.ndarray:
    """Class probabilities (N, L) for the examples, in their order."""
    return recognizer.predict_proba([ex.item for ex in examples], batch_size=batch_size)


def evaluate(recognizer: EmotionRecognizer, examples: list[Example], batch_size: int = 8) -> tuple[ClassificationReport, np.ndarray]:
    probs = predict_examples(recognizer, examples, batch_size)
    gold = [ex.label for ex in examples]
    return classification_report(gold, probs.argmax(1), recognizer.label_set.labels), probs


TELEPHONE = "+telephone"


def spec_examples(recognizer: EmotionRecognizer, spec: str, read_as: str = "", limit: int = 0) -> list[Example]:
    """The labelled examples of a data spec (meld:dev, ravdess:dev, a .jsonl ...) as this recognizer reads them.

    A spec ending in ``+telephone`` (``ravdess:dev+telephone``) is the telephone-band copy of its audio:
    every clip through the telephone channel once, seeded with TELEPHONE_DEV_SEED, as training reports it.
    """
    from tracker.data import labels_read_as
    from tracker.training.config import TELEPHONE_DEV_SEED, ChannelAugment

    channel = None
    if spec.endswith(TELEPHONE):
        spec, channel = spec[: -len(TELEPHONE)], ChannelAugment(seed=TELEPHONE_DEV_SEED)
    cfg = recognizer.config
    return load_examples(spec, recognizer.label_set, cfg.prompt.context_turns,
                         read_as or labels_read_as(spec, recognizer.label_set.name), limit,
                         modalities=cfg.adapter.modalities, context_min_turns=cfg.prompt.context_min_turns,
                         channel=channel, speaker_norm=recognizer.speaker_normalizers())
