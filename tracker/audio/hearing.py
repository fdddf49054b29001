"""One request per utterance: the acoustic features a model reads and, when asked, what was said.

A live call's segments that arrive without a client transcript need both the served model's
acoustic features (``tracker.audio.modalities``) and a transcript (``tracker.audio.asr``).
:class:`Hearing` answers a *batch* of such requests (the FeatureExtractor deployment gathers them
across conversations by a tracker.stream.batching.Batcher): features item by item (each is one cheap pass over
the utterance's real length), transcripts in one batched recognizer call (the 30 s-window encoder
and the decoder dominate: see docs/speech.md, "Cost in the service").

The two cannot share one encoder pass: the features read an earlier encoder block of an
utterance encoded on its real length, the recognizer the last block of the utterance padded to
Whisper's 30 s window (and possibly another Whisper).

:func:`asr_available` / :func:`resolve_asr` decide the serve config's ``asr: auto``.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from tracker.audio.asr import AsrConfig
from tracker.audio.features import FeatureExtractorConfig
from tracker.audio.pcm import pcm16_to_numpy
from tracker.config import ConfigError

ASR_MODES = ("on", "off", "auto")


def asr_mode(value: str | bool) -> str:
    """The serve config's ``asr`` as on / off / auto (YAML reads a bare on/off as a bool)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value not in ASR_MODES:
        raise ConfigError(f"asr: expected on, off or auto, got {value!r}")
    return value


def asr_available(model: str) -> tuple[bool, str]:
    """(True, "") when `model`'s weights and faster-whisper are here, else (False, why); nothing is loaded."""
    from pathlib import Path

    from tracker.audio import whisper_models as wm

    if importlib.util.find_spec("faster_whisper") is None or importlib.util.find_spec("ctranslate2") is None:
        return False, "faster-whisper (and ctranslate2) are not installed"
    spec = wm.PACKAGED.get(model)
    if spec is None:
        path = Path(model).expanduser()
        if (path / "model.bin").is_file() and (path / "config.json").is_file():
            return True, ""
        return False, f"Whisper model {model!r} is neither packaged ({', '.join(wm.PACKAGED)}) nor a model folder"
    if wm._is_assembled(wm.whisper_cache_root() / f"{spec.name}-{wm.CACHE_VERSION}", spec):
        return True, ""
    missing = [m for m in dict.fromkeys(f.module for f in (*spec.parts, *spec.files)) if importlib.util.find_spec(m) is None]
    if missing:
        return False, f"Whisper {model}: package(s) {', '.join(m.replace('_', '-') for m in missing)} not installed"
    return True, ""


def resolve_asr(mode: str | bool, model: str) -> tuple[bool, str]:
    """Whether speech recognition runs, and why not: ``on`` insists (a missing model is an error at load),
    ``off`` never, ``auto`` when :func:`asr_available`."""
    mode = asr_mode(mode)
    if mode == "off":
        return False, "asr: off"
    if mode == "on":
        return True, ""
    return asr_available(model)


@dataclass
class HearRequest:
    pcm: bytes  # PCM16 mono, little-endian
    sample_rate: int
    transcribe: bool = True


class Hearing:
    """Features of the named modalities and (optionally) transcripts, for batches of utterances.

    `modalities`: {modality name: feature source} of the served model ({} = no acoustic features);
    `asr`: the recognizer's config, or None for no speech recognition.
    """

    def __init__(self, modalities: Mapping[str, str], features: FeatureExtractorConfig | None = None,
                 asr: AsrConfig | None = None, feature_threads: int = 1):
        from tracker.audio.modalities import ModalityFeatures

        self.features = ModalityFeatures(dict(modalities), base=features, threads=feature_threads) if modalities else None
        self.recognizer = None
        if asr is not None:
            from tracker.audio.asr import SpeechRecognizer

            self.recognizer = SpeechRecognizer(asr)
        self.seconds = {"features": 0.0, "asr": 0.0}  # totals, for info() and the docs' figures
        self.counts = {"featurized": 0, "recognized": 0, "asr_batches": 0}  # utterances, recognizer calls

    @property
    def asr(self) -> bool:
        return self.recognizer is not None

    def features_of(self, samples: np.ndarray, sample_rate: int) -> dict[str, np.ndarray] | None:
        if self.features is None:
            return None
        t0 = time.perf_counter()
        out = self.features.from_signal(samples, sample_rate)
        self.seconds["features"] += time.perf_counter() - t0
        self.counts["featurized"] += 1
        return out

    def hear(self, requests: Sequence[HearRequest]) -> list[dict[str, Any]]:
        """Per request: ``{"audio_features": {name: (frames, F)} | None, "transcript": dict | None,
        "asr_seconds": float}`` (asr_seconds: this request's share of the batch's recognition time)."""
        samples = [pcm16_to_numpy(r.pcm) for r in requests]
        out: list[dict[str, Any]] = [{"audio_features": self.features_of(x, r.sample_rate), "transcript": None,
                                      "asr_seconds": 0.0} for x, r in zip(samples, requests)]
        asked = [i for i, r in enumerate(requests) if r.transcribe and samples[i].size]
        if asked and self.recognizer is not None:
            t0 = time.perf_counter()
            heard = self.recognizer.transcribe([(samples[i], requests[i].sample_rate) for i in asked])
            took = time.perf_counter() - t0
            self.seconds["asr"] += took
            self.counts["recognized"] += len(asked)
            self.counts["asr_batches"] += 1
            for i, tr in zip(asked, heard):
                out[i]["transcript"] = tr.to_dict()
                out[i]["asr_seconds"] = took / len(asked)
        return out

    def info(self) -> dict[str, Any]:
        rec = self.recognizer
        return {"asr": rec is not None, "asr_model": rec.config.model if rec else None,
                "asr_compute_type": rec.compute_type if rec else None, "asr_device": rec.device if rec else None,
                "modalities": self.features.names if self.features else [], **{f"{k}_seconds": v for k, v in self.seconds.items()},
                **self.counts}
