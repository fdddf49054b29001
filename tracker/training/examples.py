"""Labelled examples for training and evaluation: recognizer inputs with past-only context and audio features."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from tracker.progress import progress_bar

from tracker.data import load_dataset
from tracker.data.records import Conversation, iter_examples
from tracker.labels import LabelSet
from tracker.model.inputs import UtteranceInput

log = logging.getLogger(__name__)


@dataclass
class Example:
    utterance_id: str
    item: UtteranceInput
    label: int  # index into the recognizer's label set


def examples_from_conversations(
    conversations: list[Conversation],
    label_set: LabelSet,
    context_turns: int,
    features=None,
    source: str = "",
    context_min_turns: int | None = None,
) -> list[Example]:
    """One example per labelled utterance; acoustic features (cached on disk) when `features` is given.

    `features` is a :class:`tracker.audio.modalities.ModalityFeatures` naming the modalities to compute.
    """
    out: list[Example] = []
    pairs = list(iter_examples(conversations, k=context_turns, min_k=context_min_turns))
    with_audio = features is not None and bool(features.names) and any(u.audio_path for u, _ in pairs)
    for utt, context in progress_bar(pairs, desc=f"features {source}", disable=not with_audio, leave=False):
        if utt.label is None:
            continue
        if utt.label not in label_set.labels:
            raise ValueError(f"{source}: utterance {utt.utterance_id} has label {utt.label!r}, not in {label_set.name}")
        feats = features.from_file(utt.audio_path, utt.start_s, utt.end_s) if with_audio and utt.audio_path else {}
        item = UtteranceInput(text=utt.text, speaker=utt.speaker, context=tuple(context), features=feats)
        out.append(Example(utt.utterance_id, item, label_set.index(utt.label)))
    return out


def load_examples(spec: str, label_set: LabelSet, context_turns: int, read_as: str = "", limit: int = 0,
                  audio: bool = True, modalities=None, context_min_turns: int | None = None) -> list[Example]:
    """Examples of a dataset spec; `modalities` (ModalityConfig list) says which acoustic features to compute."""
    conversations = load_dataset(spec, label_set=read_as or None)
    if limit:
        conversations = conversations[:limit]
    features = None
    if audio and modalities and any(u.audio_path for c in conversations for u in c):
        from tracker.audio.modalities import ModalityFeatures

        features = ModalityFeatures(modalities)
    return examples_from_conversations(conversations, label_set, context_turns, features, spec, context_min_turns)


def feature_statistics(examples: list[Example], modality: str = "audio") -> tuple[np.ndarray, np.ndarray] | None:
    """Per-feature mean and std over all frames of a modality (None if no example has it)."""
    frames = [ex.item.features[modality] for ex in examples if modality in ex.item.features]
    if not frames:
        return None
    stacked = np.concatenate(frames, axis=0).astype(np.float64)
    return stacked.mean(0), stacked.std(0)


def class_weights(labels: list[int], n_classes: int, scheme: str) -> np.ndarray:
    """Loss weights per class, normalised so the average weight over the training examples is 1."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes).astype(float)
    if scheme == "none":
        return np.ones(n_classes)
    power = 0.5 if scheme == "inverse_sqrt" else 1.0
    w = np.where(counts > 0, 1.0 / np.maximum(counts, 1.0) ** power, 0.0)
    mean_w = (w[labels]).mean() if len(labels) else 1.0
    return w / mean_w
