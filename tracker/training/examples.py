"""Labelled examples for training and evaluation: recognizer inputs with past-only context and audio features."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping

import numpy as np
from tracker.progress import progress_bar

from tracker.audio.channel import COPY_KEY
from tracker.data import load_dataset
from tracker.data.records import Conversation, iter_examples
from tracker.labels import LabelSet
from tracker.types import UtteranceInput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AudioRef:
    """Where an example's audio is: a file and an optional [start, end) span in seconds."""

    path: str
    start: float | None = None
    end: float | None = None


@dataclass
class Example:
    utterance_id: str
    item: UtteranceInput
    label: int  # index into the recognizer's label set
    audio: AudioRef | None = None  # kept so that augmented features can be recomputed
    speaker_key: str = ""  # whose past normalises this example's features: "<source>:<speaker>"
    group: str = ""  # the conversation: a speaker's conversations happen one after another
    copy: int = 0  # which repeated copy of the utterance (DataSource.repeat) this is


def clip_features(features, ref: AudioRef, channel=None, seed: int = 0, keys: tuple = ()) -> dict[str, np.ndarray]:
    """Modality features of a clip as recorded, or through the telephone channel with (seed, keys)."""
    if channel is None:
        return features.from_file(ref.path, ref.start, ref.end)
    from tracker.audio.channel import TelephoneChannel
    from tracker.audio.pcm import read_audio

    x, rate = read_audio(ref.path, dtype="float32", target_rate=None, start=ref.start, end=ref.end)
    y, rate = TelephoneChannel(channel)(x, rate, seed, *keys)
    return features.from_signal(y, rate)


def speaker_normalize(examples: list[Example], normalizers: Mapping[str, object], seed: object = 0) -> None:
    """Normalise each example's features in place with its speaker's earlier examples only.

    `normalizers`: {modality: tracker.audio.speaker_norm.SpeakerNormalizer}. A speaker's
    conversations are taken in a seeded order (:func:`in_speaker_time_order`), utterances within a
    conversation in their own order; each example is normalised with the statistics of what came
    before it, then added to them.
    """
    if not normalizers:
        return
    from tracker.audio.speaker_norm import in_speaker_time_order

    stats: dict[tuple[str, str], object] = {}
    for ex in in_speaker_time_order(examples, lambda e: e.speaker_key, lambda e: e.group, seed):
        feats = dict(ex.item.features)
        for name, norm in normalizers.items():
            if name in feats:
                st = stats.setdefault((ex.speaker_key, name), norm.new_stats())
                feats[name] = norm.step(feats[name], st)
        ex.item.features = feats


def examples_from_conversations(
    conversations: list[Conversation],
    label_set: LabelSet,
    context_turns: int,
    features=None,
    source: str = "",
    context_min_turns: int | None = None,
    channel=None,
) -> list[Example]:
    """One example per labelled utterance; acoustic features (cached on disk) when `features` is given.

    `features` is a :class:`tracker.audio.modalities.ModalityFeatures` naming the modalities to compute;
    with `channel` (a ``ChannelAugment``) the audio goes through the telephone channel first, with the
    channel's seed and (utterance id, ``COPY_KEY``) as keys: a fixed telephone-band copy of the data, the
    same one bench/audio_encoders.py scores (``channel: {seed: 20261204}`` = ``TELEPHONE_DEV_SEED``).
    """
    out: list[Example] = []
    pairs = list(iter_examples(conversations, k=context_turns, min_k=context_min_turns))
    with_audio = features is not None and bool(features.names) and any(u.audio_path for u, _ in pairs)
    for utt, context in progress_bar(pairs, desc=f"features {source}", disable=not with_audio, leave=False):
        if utt.label is None:
            continue
        if utt.label not in label_set.labels:
            raise ValueError(f"{source}: utterance {utt.utterance_id} has label {utt.label!r}, not in {label_set.name}")
        ref = AudioRef(utt.audio_path, utt.start_s, utt.end_s) if utt.audio_path else None
        feats = {}
        if with_audio and ref is not None:
            feats = clip_features(features, ref, channel, getattr(channel, "seed", 0), (utt.utterance_id, COPY_KEY))
        item = UtteranceInput(text=utt.text, speaker=utt.speaker, context=tuple(context), features=feats)
        out.append(Example(utt.utterance_id, item, label_set.index(utt.label), ref, f"{source}:{utt.speaker}",
                           utt.conversation_id))
    return out


def load_examples(spec: str, label_set: LabelSet, context_turns: int, read_as: str = "", limit: int = 0,
                  audio: bool = True, modalities=None, context_min_turns: int | None = None, channel=None,
                  speaker_norm: Mapping[str, object] | None = None, seed: int = 0) -> list[Example]:
    """Examples of a dataset spec; `modalities` (ModalityConfig list) says which acoustic features to compute.

    `channel` puts the audio through the telephone channel (a fixed copy, see examples_from_conversations);
    `speaker_norm` ({modality: SpeakerNormalizer}, e.g. ``EmotionRecognizer.speaker_normalizers()``)
    normalises the features per speaker, past-only, in a `seed`-ed order of each speaker's conversations.
    """
    conversations = load_dataset(spec, label_set=read_as or None)
    if limit:
        conversations = conversations[:limit]
    features = None
    if audio and modalities and any(u.audio_path for c in conversations for u in c):
        from tracker.audio.modalities import ModalityFeatures

        features = ModalityFeatures(modalities)
    out = examples_from_conversations(conversations, label_set, context_turns, features, spec, context_min_turns, channel)
    speaker_normalize(out, speaker_norm or {}, seed)
    return out


def feature_statistics(examples: list, modality: str = "audio") -> tuple[np.ndarray, np.ndarray] | None:
    """Per-feature mean and std over all frames of a modality (None if no example has it).

    `examples`: Examples, or the {modality: frames} mappings themselves.
    """
    dicts = [ex.item.features if isinstance(ex, Example) else ex for ex in examples]
    frames = [d[modality] for d in dicts if modality in d]
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
