"""Label sets: the classes a recognizer scores, in a fixed order, with their valence.

A label set's words are what the LLM is asked to answer with; each word's first token must be
distinct under the backbone's tokenizer (checked when a recognizer is built).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LabelSet:
    """An ordered set of class names plus the words the prompt uses for them.

    `values` gives each class a number: valence in [-1, 1] for emotions (used by the per-speaker
    trend and the dashboard), or the score itself for the MSA regression set.
    """

    name: str
    labels: tuple[str, ...]
    words: tuple[str, ...] = ()
    values: tuple[float, ...] = ()
    negative: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.labels:
            raise ValueError(f"label set {self.name!r}: no labels")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"label set {self.name!r}: duplicate labels {self.labels}")
        if not self.words:
            object.__setattr__(self, "words", self.labels)
        if len(self.words) != len(self.labels):
            raise ValueError(f"label set {self.name!r}: {len(self.words)} words for {len(self.labels)} labels")
        if self.values and len(self.values) != len(self.labels):
            raise ValueError(f"label set {self.name!r}: {len(self.values)} values for {len(self.labels)} labels")
        if not self.values:
            object.__setattr__(self, "values", tuple(0.0 for _ in self.labels))

    def __len__(self) -> int:
        return len(self.labels)

    def index(self, label: str) -> int:
        try:
            return self.labels.index(label)
        except ValueError:
            raise KeyError(f"label {label!r} is not in label set {self.name!r} ({', '.join(self.labels)})") from None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "labels": list(self.labels),
            "words": list(self.words),
            "values": list(self.values),
            "negative": list(self.negative),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "LabelSet":
        return cls(
            name=str(data["name"]),
            labels=tuple(data["labels"]),
            words=tuple(data.get("words") or data["labels"]),
            values=tuple(float(v) for v in data.get("values") or ()),
            negative=tuple(data.get("negative") or ()),
        )


MELD7 = LabelSet(
    name="meld7",
    labels=("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"),
    values=(0.0, 0.8, 0.2, -0.7, -0.7, -0.6, -0.6),
    negative=("anger", "sadness", "disgust", "fear"),
)

RAVDESS8 = LabelSet(
    name="ravdess8",
    labels=("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised"),
    values=(0.0, 0.3, 0.8, -0.7, -0.7, -0.6, -0.6, 0.2),
    negative=("sad", "angry", "fearful", "disgust"),
)

EMORYNLP7 = LabelSet(
    name="emorynlp7",
    labels=("neutral", "joyful", "scared", "mad", "peaceful", "powerful", "sad"),
    values=(0.0, 0.8, -0.6, -0.7, 0.5, 0.5, -0.7),
    negative=("scared", "mad", "sad"),
)

SENTIMENT3 = LabelSet(
    name="sentiment3",
    labels=("negative", "neutral", "positive"),
    values=(-1.0, 0.0, 1.0),
    negative=("negative",),
)

# The paper's MSA mode: a sentiment score in [-3, 3]. The LLM answers with a digit 1..7 (one token in
# every tokenizer we know) and the score is the expectation of (digit - 4) under its distribution.
MSA7 = LabelSet(
    name="msa7",
    labels=("-3", "-2", "-1", "0", "1", "2", "3"),
    words=("1", "2", "3", "4", "5", "6", "7"),
    values=(-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0),
    negative=("-3", "-2"),
)

LABEL_SETS: dict[str, LabelSet] = {s.name: s for s in (MELD7, RAVDESS8, EMORYNLP7, SENTIMENT3, MSA7)}

# RAVDESS's 8 emotions folded into MELD's 7 for the jointly trained default model.
RAVDESS_TO_MELD: dict[str, str] = {
    "neutral": "neutral",
    "calm": "neutral",
    "happy": "joy",
    "sad": "sadness",
    "angry": "anger",
    "fearful": "fear",
    "disgust": "disgust",
    "surprised": "surprise",
}


def get_label_set(name: str) -> LabelSet:
    try:
        return LABEL_SETS[name]
    except KeyError:
        raise KeyError(f"unknown label set {name!r} (known: {', '.join(LABEL_SETS)})") from None
