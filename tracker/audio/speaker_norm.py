"""Speaker normalisation of acoustic features against the speaker's own past, with a small serializable state.

A voice's pitch, timbre and channel shift every acoustic feature; what signals emotion is how an
utterance departs from *this* speaker's usual. :class:`SpeakerNormalizer` maps each utterance's
features from the speaker's running distribution onto the global (training) one::

    w   = n / (n + prior)                         n = the speaker's past utterances
    m   = w * mean_speaker + (1 - w) * mean_global
    v   = w * var_speaker  + (1 - w) * var_global
    x'  = mean_global + std_global * (x - m) / sqrt(v)

The statistics are over the frames of the speaker's *earlier* utterances only (past-only: an
utterance never sees itself or anything later), so with no past (``n = 0``) the map is the
identity: the first utterances fall back to the global statistics, and the speaker's own take over
as they accumulate. Feed utterances in time order: ``normalize`` then ``update``.

:class:`SpeakerStats` is the per-speaker state (utterance and frame counts, the frame mean and the
sum of squared deviations, float32): ``to_dict`` / ``from_dict`` give a JSON-safe form of
``8 * F + 30`` bytes or so (base64), e.g. about 11 KB for a 1,024-wide Whisper meanstd feature.
"""

from __future__ import annotations

import base64
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable, Mapping, TypeVar

import numpy as np

DEFAULT_PRIOR = 4.0  # in utterances: after 4 past utterances the speaker's own statistics weigh half

T = TypeVar("T")


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype="<f4").tobytes()).decode()


def _unb64(s: str, n: int, what: str) -> np.ndarray:
    raw = base64.b64decode(s.encode(), validate=True)
    if len(raw) != 4 * n:
        raise ValueError(f"speaker stats: {what} has {len(raw) // 4} values, expected {n}")
    return np.frombuffer(raw, dtype="<f4").astype(np.float64)


@dataclass
class SpeakerStats:
    """Running statistics of one speaker's past frames (Chan's parallel update of mean and M2)."""

    dim: int
    utterances: int = 0
    frames: int = 0
    mean: np.ndarray = field(default=None)  # (dim,) float64
    m2: np.ndarray = field(default=None)  # (dim,) sum of squared deviations from the mean

    def __post_init__(self) -> None:
        if self.mean is None:
            self.mean = np.zeros(self.dim)
        if self.m2 is None:
            self.m2 = np.zeros(self.dim)

    def update(self, features: np.ndarray) -> None:
        x = np.asarray(features, dtype=np.float64).reshape(-1, self.dim)  # (frames, dim)
        n_b = x.shape[0]
        if n_b == 0:
            return
        mean_b = x.mean(axis=0)
        m2_b = ((x - mean_b) ** 2).sum(axis=0)
        n = self.frames + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta ** 2 * (self.frames * n_b / n)
        self.frames = n
        self.utterances += 1

    @property
    def var(self) -> np.ndarray:
        return self.m2 / max(self.frames, 1)

    def to_dict(self) -> dict[str, Any]:
        return {"dim": self.dim, "utterances": self.utterances, "frames": self.frames,
                "mean": _b64(self.mean), "m2": _b64(self.m2)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SpeakerStats":
        try:
            dim, utts, frames = int(d["dim"]), int(d["utterances"]), int(d["frames"])
            if dim < 1 or utts < 0 or frames < 0:
                raise ValueError("negative count")
            return cls(dim, utts, frames, _unb64(d["mean"], dim, "mean"), _unb64(d["m2"], dim, "m2"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"speaker stats: malformed state ({exc})") from None


class SpeakerNormalizer:
    """Past-only speaker normalisation of one modality's features; see the module docstring."""

    def __init__(self, global_mean: np.ndarray, global_std: np.ndarray, prior: float = DEFAULT_PRIOR):
        self.global_mean = np.asarray(global_mean, dtype=np.float64).reshape(-1)
        self.global_std = np.maximum(np.asarray(global_std, dtype=np.float64).reshape(-1), 1e-6)
        if self.global_mean.shape != self.global_std.shape:
            raise ValueError(f"global mean {self.global_mean.shape} and std {self.global_std.shape} differ in shape")
        if prior <= 0:
            raise ValueError(f"prior: must be > 0, got {prior}")
        self.prior = float(prior)

    @property
    def dim(self) -> int:
        return self.global_mean.shape[0]

    def new_stats(self) -> SpeakerStats:
        return SpeakerStats(self.dim)

    def normalize(self, features: np.ndarray, stats: SpeakerStats | None) -> np.ndarray:
        """(frames, dim) features mapped with the speaker's past statistics (identity when there is no past)."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"speaker normalisation: expected (frames, {self.dim}) features, got shape {x.shape}")
        if stats is None or stats.utterances == 0:
            return np.asarray(features, dtype=np.float32)
        w = stats.utterances / (stats.utterances + self.prior)
        mean = w * stats.mean + (1 - w) * self.global_mean
        std = np.sqrt(w * stats.var + (1 - w) * self.global_std ** 2)
        return (self.global_mean + self.global_std * (x - mean) / np.maximum(std, 1e-6)).astype(np.float32)

    def step(self, features: np.ndarray, stats: SpeakerStats) -> np.ndarray:
        """Normalise with the past, then add this utterance to the past: the order a live call runs in."""
        out = self.normalize(features, stats)
        stats.update(features)
        return out


def in_speaker_time_order(items: Iterable[T], speaker: Callable[[T], Hashable], group: Callable[[T], Hashable],
                          seed: int) -> list[T]:
    """Items ordered per speaker as if one speaker's groups (conversations) happened one after another.

    Groups keep their internal order; a speaker's groups come in a seeded random order (a dataset's
    file order may sort clips by emotion, which must not decide whose past a clip sees).
    """
    items = list(items)
    by_speaker: dict[Hashable, dict[Hashable, list[T]]] = {}
    for it in items:
        by_speaker.setdefault(speaker(it), {}).setdefault(group(it), []).append(it)
    out: list[T] = []
    for spk, groups in by_speaker.items():
        keys = list(groups)
        random.Random(f"{seed}:{spk}").shuffle(keys)
        for k in keys:
            out += groups[k]
    return out
