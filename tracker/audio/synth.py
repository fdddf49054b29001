"""Voiced conversations from text with espeak-ng: one voice and one channel per speaker.

Used to make the bundled demo call (scripts/make_demo_audio.py), end-to-end audio tests and the
streaming benchmarks. Needs the `espeak-ng` program (Debian package espeak-ng).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from tracker.audio.pcm import float_to_int16, read_audio

RATE = 16000
VOICES = ("en-us+m3", "en-us+f3", "en-gb+m2", "en-gb+f4")  # one per speaker, in order of first appearance
SPEED_WPM = 160
TRIM_DBFS = -45.0  # espeak's own leading/trailing silence is cut at this level (10 ms windows)
PEAK = 0.7  # each voiced clip is normalised to this peak


def have_espeak() -> bool:
    return shutil.which("espeak-ng") is not None


def clean_text(text: str) -> str:
    """Curly quotes and dashes to ASCII: espeak reads plain ASCII more reliably."""
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
    text = text.replace("\u2026", "...").replace("\u2014", " - ").replace("\u2013", " - ")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return " ".join(text.split())


def trim_silence(x: np.ndarray, win: int = RATE // 100) -> np.ndarray:
    n = len(x) // win
    if n == 0:
        return x
    rms = np.sqrt(np.mean(x[: n * win].reshape(n, win).astype(np.float64) ** 2, axis=1) + 1e-20)
    loud = np.flatnonzero(20 * np.log10(rms) > TRIM_DBFS)
    if loud.size == 0:
        return x
    return x[loud[0] * win:(loud[-1] + 1) * win]


def voice(text: str, voice_name: str, workdir: Path, speed_wpm: int = SPEED_WPM, pitch: int | None = None) -> np.ndarray:
    """espeak-ng to a WAV, read back as float32 16 kHz mono, silence trimmed, peak-normalised.

    `pitch`: espeak-ng's -p (0-99, its default 50) for a higher or lower voice.
    """
    if not have_espeak():
        raise RuntimeError("espeak-ng not found: apt-get install -y espeak-ng")
    txt, wav = workdir / "utt.txt", workdir / "utt.wav"
    txt.write_text(text, encoding="utf-8")  # -f: text starting with '-' is not taken as an option
    cmd = ["espeak-ng", "-v", voice_name, "-s", str(speed_wpm)] + (["-p", str(pitch)] if pitch is not None else [])
    subprocess.run(cmd + ["-w", str(wav), "-f", str(txt)], check=True, capture_output=True)
    samples, _ = read_audio(wav, dtype="float32", target_rate=RATE, mono=True)
    samples = trim_silence(samples)
    peak = float(np.max(np.abs(samples))) if samples.size else 0.0
    if peak <= 0:
        raise RuntimeError(f"espeak-ng produced silence for {text!r}")
    return samples * (PEAK / peak)


@dataclass
class VoicedConversation:
    samples: np.ndarray  # (n, channels) int16, one speaker per channel
    sample_rate: int
    speakers: list[str]  # channel order
    utterances: list[dict]  # speaker, channel, text, start_ms, end_ms (exact spans of the voiced clips)

    @property
    def duration_ms(self) -> int:
        return round(self.samples.shape[0] * 1000 / self.sample_rate)


def voice_conversation(turns: Sequence[tuple[str, str]], gap_ms: int = 600, lead_ms: int = 500,
                       voices: Sequence[str] = VOICES, speed_wpm: int = SPEED_WPM) -> VoicedConversation:
    """Voice (speaker, text) turns one after another on a multi-channel timeline, `gap_ms` apart."""
    speakers = list(dict.fromkeys(s for s, _ in turns))
    if len(speakers) > len(voices):
        raise ValueError(f"{len(speakers)} speakers but only {len(voices)} voices")
    with tempfile.TemporaryDirectory() as tmp:
        clips = [(speakers.index(s), clean_text(t), voice(clean_text(t), voices[speakers.index(s)], Path(tmp), speed_wpm))
                 for s, t in turns]
    gap, lead = RATE * gap_ms // 1000, RATE * lead_ms // 1000
    total = lead + sum(len(c[2]) for c in clips) + gap * max(0, len(clips) - 1) + lead
    audio = np.zeros((total, len(speakers)), dtype=np.float32)
    pos, spans = lead, []
    for ch, text, samples in clips:
        audio[pos:pos + len(samples), ch] = samples
        spans.append({"speaker": speakers[ch], "channel": ch, "text": text,
                      "start_ms": round(pos * 1000 / RATE), "end_ms": round((pos + len(samples)) * 1000 / RATE)})
        pos += len(samples) + gap
    return VoicedConversation(float_to_int16(audio), RATE, speakers, spans)
