"""Streaming utterance segmentation of PCM16 mono audio with webrtcvad.

The classic ring-buffer scheme: webrtcvad labels each 10/20/30 ms frame speech or not; an utterance
starts when more than ``start_ratio`` of the last ``padding_ms`` of frames are speech and ends when
more than ``end_ratio`` of them are not. Segment boundaries are trimmed to the first and last speech
frame, so a segment spans the speech itself rather than the hysteresis window around it. Times come
from sample counts since the stream start, never from the wall clock, so replaying a file gives the
same segments however it is chunked.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Iterable

from tracker.audio.pcm import SAMPLE_WIDTH, AudioFormatError, check_pcm16
from tracker.config import ConfigError

VAD_RATES = (8000, 16000, 32000, 48000)  # the only rates webrtcvad accepts
VAD_FRAME_MS = (10, 20, 30)


@dataclass
class VadConfig:
    """Segmentation settings; invalid values raise ConfigError naming the field."""

    aggressiveness: int = 2  # webrtcvad mode 0 (permissive) .. 3 (strict about what is speech)
    frame_ms: int = 30  # 10, 20 or 30: the frame webrtcvad classifies
    padding_ms: int = 300  # length of the ring buffer the trigger ratios look at
    start_ratio: float = 0.6  # fraction of speech frames in the window that starts an utterance
    end_ratio: float = 0.9  # fraction of non-speech frames in the window that ends it
    min_utterance_ms: int = 250  # shorter segments (clicks, coughs) are dropped
    max_utterance_ms: int = 15000  # longer speech is force-split into pieces of at most this

    def __post_init__(self) -> None:
        for name in ("aggressiveness", "frame_ms", "padding_ms", "min_utterance_ms", "max_utterance_ms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name}: expected int, got {type(value).__name__} {value!r}")
        if not 0 <= self.aggressiveness <= 3:
            raise ConfigError(f"aggressiveness: must be 0, 1, 2 or 3, got {self.aggressiveness}")
        if self.frame_ms not in VAD_FRAME_MS:
            raise ConfigError(f"frame_ms: webrtcvad accepts 10, 20 or 30 ms frames, got {self.frame_ms}")
        if self.padding_ms < self.frame_ms:
            raise ConfigError(f"padding_ms: must be >= frame_ms ({self.frame_ms}), got {self.padding_ms}")
        for name in ("start_ratio", "end_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
                raise ConfigError(f"{name}: must lie in (0, 1], got {value!r}")
        if self.min_utterance_ms < 0:
            raise ConfigError(f"min_utterance_ms: must be >= 0, got {self.min_utterance_ms}")
        if self.max_utterance_ms < max(self.frame_ms, self.min_utterance_ms + 1):
            raise ConfigError(
                f"max_utterance_ms: must exceed min_utterance_ms ({self.min_utterance_ms}) and be >= "
                f"frame_ms ({self.frame_ms}), got {self.max_utterance_ms}"
            )

    @property
    def window_frames(self) -> int:
        return self.padding_ms // self.frame_ms


@dataclass(frozen=True)
class Segment:
    """One utterance: [start_ms, end_ms) since the stream start, and its PCM16 mono bytes."""

    start_ms: int
    end_ms: int
    pcm: bytes
    sample_rate: int
    forced_split: bool = False  # ended because it reached max_utterance_ms, not by silence

    @property
    def duration_ms(self) -> int:
        return self.end_ms - self.start_ms


class StreamingSegmenter:
    """Feed PCM16 mono chunks of any size with :meth:`push`; finish with :meth:`flush`."""

    def __init__(self, config: VadConfig | None = None, sample_rate: int = 16000):
        import webrtcvad

        if isinstance(sample_rate, bool) or sample_rate not in VAD_RATES:
            raise AudioFormatError(
                f"sample rate {sample_rate!r} Hz is not supported by webrtcvad: use one of "
                f"{', '.join(map(str, VAD_RATES))} (resample with tracker.audio.pcm.resample)"
            )
        self.config = config or VadConfig()
        self.sample_rate = int(sample_rate)
        self._vad = webrtcvad.Vad(self.config.aggressiveness)
        self._frame_bytes = self.sample_rate * self.config.frame_ms // 1000 * SAMPLE_WIDTH
        self._pending = bytearray()  # a partial frame (or half a sample) waiting for more data
        self._index = 0  # index of the next frame to classify
        # each entry: (frame index, frame bytes, is_speech)
        self._window: collections.deque[tuple[int, bytes, bool]] = collections.deque(maxlen=self.config.window_frames)
        self._voiced: list[tuple[int, bytes, bool]] | None = None  # frames of the open utterance
        self._closed = False

    @property
    def in_speech(self) -> bool:
        """Whether an utterance is open (started but not yet ended)."""
        return self._voiced is not None

    @property
    def position_ms(self) -> float:
        """Stream time consumed so far, including a buffered partial frame."""
        samples = self._index * self._frame_bytes // SAMPLE_WIDTH + len(self._pending) // SAMPLE_WIDTH
        return samples * 1000 / self.sample_rate

    def push(self, pcm16: bytes | bytearray | memoryview) -> list[Segment]:
        """Add audio; return the utterances that ended within it."""
        if self._closed:
            raise RuntimeError("StreamingSegmenter.push after flush(): create a new segmenter per stream")
        self._pending += pcm16
        out: list[Segment] = []
        n = len(self._pending) // self._frame_bytes
        for i in range(n):
            frame = bytes(self._pending[i * self._frame_bytes:(i + 1) * self._frame_bytes])
            seg = self._step(frame)
            if seg is not None:
                out.append(seg)
        del self._pending[: n * self._frame_bytes]
        return out

    def flush(self) -> list[Segment]:
        """End of stream: close an open utterance. A trailing partial frame is dropped."""
        if self._closed:
            return []
        self._closed = True
        if len(self._pending) % SAMPLE_WIDTH:
            check_pcm16(self._pending)  # raises: the stream ended mid-sample
        self._pending.clear()
        if self._voiced is None:
            return []
        seg = self._close(forced=False)
        return [seg] if seg is not None else []

    # -- internals -----------------------------------------------------------------------------
    def _step(self, frame: bytes) -> Segment | None:
        item = (self._index, frame, self._vad.is_speech(frame, self.sample_rate))
        self._index += 1
        cfg = self.config
        self._window.append(item)
        maxlen = self._window.maxlen or 1
        if self._voiced is None:
            n_speech = sum(1 for _, _, s in self._window if s)
            if n_speech > cfg.start_ratio * maxlen or (cfg.start_ratio >= 1.0 and n_speech == maxlen):
                first = next(k for k, (_, _, s) in enumerate(self._window) if s)
                self._voiced = list(self._window)[first:]
                self._window.clear()
            return None
        self._voiced.append(item)
        n_silent = sum(1 for _, _, s in self._window if not s)
        if n_silent > cfg.end_ratio * maxlen or (cfg.end_ratio >= 1.0 and n_silent == maxlen):
            return self._close(forced=False)
        if (len(self._voiced) + 1) * cfg.frame_ms > cfg.max_utterance_ms:  # one more frame would exceed it
            return self._close(forced=True)
        return None

    def _close(self, forced: bool) -> Segment | None:
        frames = self._voiced or []
        self._voiced = None
        self._window.clear()
        if forced:
            # speech goes on: keep an utterance open so the rest is not lost to re-triggering
            self._voiced = []
        else:
            while frames and not frames[-1][2]:
                frames.pop()
        while frames and not frames[0][2]:  # only after a forced split can it start unvoiced
            frames.pop(0)
        if not frames:
            return None
        start_ms = frames[0][0] * self.config.frame_ms
        end_ms = (frames[-1][0] + 1) * self.config.frame_ms
        if end_ms - start_ms < self.config.min_utterance_ms:
            return None
        return Segment(start_ms, end_ms, b"".join(f for _, f, _ in frames), self.sample_rate, forced)


def segment_pcm16(pcm16: bytes, sample_rate: int = 16000, config: VadConfig | None = None,
                  chunk_bytes: int | None = None) -> list[Segment]:
    """All utterances of a complete PCM16 mono recording (optionally fed in chunks)."""
    seg = StreamingSegmenter(config, sample_rate)
    check_pcm16(pcm16)
    chunks: Iterable[bytes] = [pcm16] if not chunk_bytes else (
        pcm16[i:i + chunk_bytes] for i in range(0, len(pcm16), chunk_bytes))
    out = [s for chunk in chunks for s in seg.push(chunk)]
    return out + seg.flush()
