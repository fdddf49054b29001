"""Embedded speech recognition: Whisper (CTranslate2 / faster-whisper) on a batch of utterances.

A live call delivers utterances already cut by the VAD (at most ``VadConfig.max_utterance_ms``,
15 s), from many conversations at once. :meth:`SpeechRecognizer.transcribe` takes such a batch
(PCM arrays at any sample rate, 8 kHz telephone audio included; resampled to 16 kHz), pads each
utterance to Whisper's 30 s window, and runs the encoder and the decoder once for the whole batch
(rows of ``max_batch_size``); an utterance longer than 30 s becomes several rows whose texts are
joined. No VAD, no temperature fallback, no timestamps: segmentation already happened upstream,
and one decoding pass keeps latency predictable.

Confidence: ``exp(avg_logprob) * (1 - no_speech_prob)``, i.e. the geometric mean of the decoded
tokens' probabilities (``avg_logprob`` is the summed token log-probability over ``tokens + 1``,
faster-whisper's definition) discounted by Whisper's probability that the window holds no speech.
It lies in [0, 1]. Following Whisper, an utterance whose ``no_speech_prob`` exceeds
``no_speech_threshold`` while its ``avg_logprob`` is below ``logprob_threshold`` is taken as no
speech: its text is empty.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from tracker.audio.features import as_float_mono
from tracker.audio.pcm import AudioFormatError, check_sample_rate
from tracker.audio.whisper_features import MAX_FRAMES, WHISPER_RATE, log_mel, to_whisper_input
from tracker.config import ConfigError

COMPUTE_TYPES = ("auto", "int8", "int8_float32", "int8_float16", "int16", "float16", "bfloat16", "float32", "default")


@dataclass
class AsrConfig:
    """Which Whisper to run, where, and how to decode."""

    model: str = "tiny.en"  # a packaged model (tiny.en, base) or a faster-whisper model folder
    device: str = "cpu"  # cpu | cuda | auto
    compute_type: str = "auto"  # auto: int8 on CPU, float16 on GPU
    threads: int = 2  # CTranslate2 intra-op threads on CPU
    beam_size: int = 5  # 1 = greedy (faster; WER on the demo call 17.9% vs 10.7% with 5, tiny.en)
    language: str | None = "en"  # a Whisper language code, or null to detect it per utterance (multilingual models)
    max_batch_size: int = 8  # utterances per decoder pass
    encoder_batch_size: int = 1  # 30 s windows per encoder pass (1 is fastest on CPU; raise it on a GPU)
    max_new_tokens: int = 128  # per 30 s window
    no_speech_threshold: float = 0.6
    logprob_threshold: float = -1.0

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda", "auto"):
            raise ConfigError(f"device: expected cpu, cuda or auto, got {self.device!r}")
        if self.compute_type not in COMPUTE_TYPES:
            raise ConfigError(f"compute_type: expected one of {', '.join(COMPUTE_TYPES)}, got {self.compute_type!r}")
        for name in ("threads", "beam_size", "max_batch_size", "encoder_batch_size", "max_new_tokens"):
            value = getattr(self, name)
            low = 0 if name == "threads" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name}: expected an int >= {low}, got {value!r}")
        if self.max_new_tokens > 440:
            raise ConfigError(f"max_new_tokens: Whisper decodes at most 448 tokens with its prompt, got {self.max_new_tokens}")
        if not 0.0 <= self.no_speech_threshold <= 1.0:
            raise ConfigError(f"no_speech_threshold: must lie in [0, 1], got {self.no_speech_threshold!r}")

    def resolved_compute_type(self, device: str) -> str:
        if self.compute_type != "auto":
            return self.compute_type
        return "float16" if device == "cuda" else "int8"


@dataclass
class Transcript:
    """What the recognizer heard in one utterance."""

    text: str
    confidence: float  # exp(avg_logprob) * (1 - no_speech_prob), in [0, 1]
    language: str
    avg_logprob: float
    no_speech_prob: float
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "confidence": self.confidence, "language": self.language,
                "avg_logprob": self.avg_logprob, "no_speech_prob": self.no_speech_prob, "tokens": self.tokens}


def _as_float(signal: np.ndarray) -> np.ndarray:
    x = as_float_mono(signal, "utterance audio")
    if x.size == 0:
        raise AudioFormatError("utterance audio is empty (0 samples)")
    return x


class SpeechRecognizer:
    """Whisper speech recognition over batches of utterances (thread-safe; one model per instance)."""

    def __init__(self, config: AsrConfig | None = None):
        from faster_whisper import WhisperModel
        from faster_whisper.tokenizer import Tokenizer

        from tracker.audio.whisper_models import ensure_whisper_model

        self.config = config or AsrConfig()
        device = self.config.device
        if device == "auto":
            import ctranslate2

            device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
        self.device = device
        self.compute_type = self.config.resolved_compute_type(device)
        self.path = ensure_whisper_model(self.config.model)
        self.whisper = WhisperModel(str(self.path), device=device, compute_type=self.compute_type,
                                    cpu_threads=self.config.threads)
        self.multilingual = bool(self.whisper.model.is_multilingual)
        language = self.config.language if self.multilingual else "en"
        if self.multilingual and language is not None and language not in self.whisper.supported_languages:
            raise ConfigError(f"language: {language!r} is not a Whisper language code")
        self.language = language
        self.tokenizer = Tokenizer(self.whisper.hf_tokenizer, self.multilingual, task="transcribe", language=language or "en")
        self._lock = threading.Lock()
        self.batches = 0
        self.utterances = 0

    # -- public API ----------------------------------------------------------------------------
    def transcribe(self, utterances: Sequence[tuple[np.ndarray, int]]) -> list[Transcript]:
        """Transcripts of (samples, sample_rate) utterances, in order; one batched pass per `max_batch_size` rows."""
        rows: list[np.ndarray] = []  # (80, 3000) log-mel windows
        owner: list[int] = []  # utterance index of each row
        for i, (samples, rate) in enumerate(utterances):
            x = to_whisper_input(_as_float(samples), check_sample_rate(rate))
            if x.shape[0] < WHISPER_RATE // 10:  # under 0.1 s: padded, as the features pad
                x = np.pad(x, (0, WHISPER_RATE // 10 - x.shape[0]))
            mel = log_mel(x)
            for start in range(0, mel.shape[1], MAX_FRAMES):
                rows.append(_pad_to_window(mel[:, start:start + MAX_FRAMES]))
                owner.append(i)
        decoded: list[dict[str, Any]] = []
        size = self.config.max_batch_size
        for start in range(0, len(rows), size):
            decoded += self._decode(np.stack(rows[start:start + size]))
        self.utterances += len(utterances)
        return [self._merge([d for d, o in zip(decoded, owner) if o == i]) for i in range(len(utterances))]

    def transcribe_one(self, samples: np.ndarray, sample_rate: int) -> Transcript:
        return self.transcribe([(samples, sample_rate)])[0]

    # -- internals -----------------------------------------------------------------------------
    def _decode(self, mel: np.ndarray) -> list[dict[str, Any]]:
        """Encode and decode a (B, 80, 3000) batch: tokens, scores and language per row."""
        import ctranslate2
        from faster_whisper.transcribe import get_suppressed_tokens

        cfg, tok = self.config, self.tokenizer
        with self._lock:
            model = self.whisper.model
            encoded = self._encode(mel)
            prompt = list(tok.sot_sequence) + [tok.no_timestamps]
            languages = [tok.language_code] * mel.shape[0]
            prompts = [list(prompt) for _ in range(mel.shape[0])]
            if self.multilingual and self.language is None:
                detected = model.detect_language(encoded)
                for i, candidates in enumerate(detected):
                    token = candidates[0][0]  # "<|xx|>"
                    languages[i] = token[2:-2]
                    prompts[i][prompt.index(tok.language)] = tok.tokenizer.token_to_id(token)
            results = model.generate(
                encoded, prompts, beam_size=cfg.beam_size, max_length=len(prompt) + cfg.max_new_tokens,
                return_scores=True, return_no_speech_prob=True, suppress_blank=True,
                suppress_tokens=list(get_suppressed_tokens(tok, [-1])))
            self.batches += 1
        out = []
        for result, language in zip(results, languages):
            ids = result.sequences_ids[0]
            avg_logprob = result.scores[0] * len(ids) / (len(ids) + 1)  # faster-whisper's avg_logprob (length_penalty 1)
            out.append({"text": tok.decode(ids).strip(), "avg_logprob": float(avg_logprob), "tokens": len(ids),
                        "no_speech_prob": float(result.no_speech_prob), "language": language})
        return out

    def _encode(self, mel: np.ndarray):
        """Encoder states of a (B, 80, 3000) batch, `encoder_batch_size` rows per pass.

        On CPU one row per pass is the fastest (measured: a pass over 8 rows of 1,500 frames takes
        1.6-2.2x the time of 8 single passes; the attention maps of 8 windows do not fit the caches),
        while the decoder still runs the whole batch at once.
        """
        import ctranslate2

        model, step = self.whisper.model, self.config.encoder_batch_size
        if step >= mel.shape[0]:
            return model.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(mel, dtype=np.float32)))
        parts = [np.asarray(model.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(mel[i:i + step], dtype=np.float32)),
                                         to_cpu=True)) for i in range(0, mel.shape[0], step)]
        return ctranslate2.StorageView.from_array(np.concatenate(parts))

    def _merge(self, parts: list[dict[str, Any]]) -> Transcript:
        cfg = self.config
        kept = [p for p in parts if not (p["no_speech_prob"] > cfg.no_speech_threshold and p["avg_logprob"] < cfg.logprob_threshold)]
        tokens = sum(p["tokens"] for p in parts)
        avg = sum(p["avg_logprob"] * (p["tokens"] + 1) for p in parts) / sum(p["tokens"] + 1 for p in parts)
        no_speech = min(p["no_speech_prob"] for p in parts)
        text = " ".join(p["text"] for p in kept if p["text"])
        confidence = math.exp(min(0.0, avg)) * (1.0 - no_speech) if text else 0.0
        return Transcript(text=text, confidence=float(confidence), language=parts[0]["language"],
                          avg_logprob=float(avg), no_speech_prob=float(no_speech), tokens=tokens)


def _pad_to_window(mel: np.ndarray) -> np.ndarray:
    """(80, n <= 3000) -> (80, 3000), zero-padded as faster-whisper pads a segment's features."""
    return np.pad(mel, ((0, 0), (0, MAX_FRAMES - mel.shape[1]))) if mel.shape[1] < MAX_FRAMES else mel


def word_error_rate(reference: str | Sequence[str], hypothesis: str | Sequence[str]) -> float:
    """Word-level Levenshtein distance / reference words, after :func:`normalize_words` (lists are joined)."""
    ref = normalize_words(" ".join(reference) if not isinstance(reference, str) else reference)
    hyp = normalize_words(" ".join(hypothesis) if not isinstance(hypothesis, str) else hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1] / len(ref)


def normalize_words(text: str) -> list[str]:
    """Lower case, curly quotes straightened, punctuation dropped (apostrophes inside words kept), split on spaces."""
    import re

    text = text.lower().replace("\u2019", "'").replace("\u2018", "'")
    text = re.sub(r"[^a-z0-9' ]+", " ", text.replace("-", " "))
    return [w.strip("'") for w in text.split() if w.strip("'")]
