"""A simulated telephone channel: what a call center's 8 kHz line does to a voice.

Steps, in the order a call goes through them: a level change (gain), line noise at a given
signal-to-noise ratio, resampling to 8 kHz, the 300-3400 Hz band-pass of the telephone band, and
G.711 companding (8-bit mu-law or A-law, encoded and decoded). Every random choice (gain, SNR,
noise colour, codec) comes from a ``numpy.random.Generator``; :func:`channel_rng` derives one from a
seed and any keys (epoch, clip id...), so an augmented copy is a pure function of (seed, keys, audio).

Used as training-time augmentation of audio data (``DataSource.channel`` in a TrainConfig) and to
build the telephone-band copy of RAVDESS dev (:data:`TELEPHONE_DEV_SEED`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from tracker.audio.pcm import check_sample_rate, resample
from tracker.config import ConfigError

TELEPHONE_RATE = 8000
TELEPHONE_DEV_SEED = 20261204  # the fixed seed of the telephone-band copy of a dev set
COPY_KEY = "dev"  # a fixed copy's clip is drawn with keys (clip id, COPY_KEY): the same in training, eval and benches
MU = 255.0
A = 87.6


@dataclass
class ChannelConfig:
    """Ranges the channel draws from; a range [a, a] fixes the value."""

    rate: int = TELEPHONE_RATE
    low_hz: float = 300.0
    high_hz: float = 3400.0
    codec: Literal["mulaw", "alaw", "random", "none"] = "random"  # random: mu-law or A-law, half each
    gain_db: list[float] = field(default_factory=lambda: [-6.0, 6.0])
    snr_db: list[float] = field(default_factory=lambda: [5.0, 20.0])
    noise: Literal["white", "pink", "random"] = "random"

    def __post_init__(self) -> None:
        if isinstance(self.rate, bool) or not isinstance(self.rate, int) or not 4000 <= self.rate <= 48000:
            raise ConfigError(f"rate: expected an integer sample rate in 4000..48000 Hz, got {self.rate!r}")
        if not 0 < self.low_hz < self.high_hz < self.rate / 2:
            raise ConfigError(f"low_hz/high_hz: need 0 < low_hz < high_hz < rate/2 ({self.rate / 2:g}), "
                              f"got {self.low_hz!r}, {self.high_hz!r}")
        if self.codec not in ("mulaw", "alaw", "random", "none"):
            raise ConfigError(f"codec: expected mulaw, alaw, random or none, got {self.codec!r}")
        if self.noise not in ("white", "pink", "random"):
            raise ConfigError(f"noise: expected white, pink or random, got {self.noise!r}")
        for name in ("gain_db", "snr_db"):
            value = getattr(self, name)
            if (not isinstance(value, (list, tuple)) or len(value) != 2
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value) or value[0] > value[1]):
                raise ConfigError(f"{name}: expected a range [low, high] with low <= high, got {value!r}")


def channel_rng(seed: int, *keys: object) -> np.random.Generator:
    """A generator that depends only on the seed and the keys (strings, ints), never on call order."""
    digest = hashlib.sha256(repr((int(seed),) + tuple(str(k) for k in keys)).encode()).digest()
    return np.random.default_rng(np.frombuffer(digest[:16], dtype=np.uint32))


def mulaw(x: np.ndarray) -> np.ndarray:
    """8-bit mu-law (G.711, mu = 255) encode and decode of samples in [-1, 1]."""
    y = np.sign(x) * np.log1p(MU * np.abs(x)) / np.log1p(MU)
    q = np.round((y + 1) / 2 * 255) / 255 * 2 - 1  # 256 levels
    return (np.sign(q) * np.expm1(np.abs(q) * np.log1p(MU)) / MU).astype(np.float32)


def alaw(x: np.ndarray) -> np.ndarray:
    """8-bit A-law (G.711, A = 87.6) encode and decode of samples in [-1, 1]."""
    ax = np.abs(x)
    small = ax < 1 / A
    y = np.where(small, A * ax / (1 + np.log(A)), (1 + np.log(np.maximum(A * ax, 1e-12))) / (1 + np.log(A)))
    y = np.sign(x) * y
    q = np.round((y + 1) / 2 * 255) / 255 * 2 - 1
    aq = np.abs(q)
    out = np.where(aq < 1 / (1 + np.log(A)), aq * (1 + np.log(A)) / A, np.exp(aq * (1 + np.log(A)) - 1) / A)
    return (np.sign(q) * out).astype(np.float32)


def _noise(n: int, colour: str, rng: np.random.Generator) -> np.ndarray:
    white = rng.standard_normal(n)
    if colour == "white":
        return white
    spectrum = np.fft.rfft(white)
    f = np.arange(spectrum.shape[0], dtype=np.float64)
    f[0] = 1.0
    return np.fft.irfft(spectrum / np.sqrt(f), n=n)  # 1/f power: pink


class TelephoneChannel:
    """Puts audio through a simulated telephone line; see the module docstring."""

    def __init__(self, config: ChannelConfig | None = None):
        from scipy.signal import butter

        self.config = config or ChannelConfig()
        c = self.config
        self._sos = butter(4, [c.low_hz, c.high_hz], btype="bandpass", fs=c.rate, output="sos")

    def draw(self, rng: np.random.Generator) -> dict:
        """The random settings of one pass: gain, SNR, noise colour and codec."""
        c = self.config
        return {"gain_db": float(rng.uniform(*c.gain_db)), "snr_db": float(rng.uniform(*c.snr_db)),
                "noise": c.noise if c.noise != "random" else ("white", "pink")[int(rng.integers(2))],
                "codec": c.codec if c.codec != "random" else ("mulaw", "alaw")[int(rng.integers(2))]}

    def apply(self, x: np.ndarray, sample_rate: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """float32 mono samples -> (telephone-band float32 samples at ``config.rate``, ``config.rate``)."""
        from scipy.signal import sosfilt

        sample_rate = check_sample_rate(sample_rate)
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 1:
            raise ValueError(f"channel: expected mono samples (n,), got shape {x.shape}")
        s = self.draw(rng)
        noise = _noise(x.shape[0], s["noise"], rng)
        power = float(np.mean(x ** 2))
        if power > 0:
            noise *= np.sqrt(power / (10 ** (s["snr_db"] / 10)) / max(float(np.mean(noise ** 2)), 1e-20))
            x = x + noise
        x = x * 10 ** (s["gain_db"] / 20)
        y = resample(x.astype(np.float32), sample_rate, self.config.rate)
        y = sosfilt(self._sos, y).astype(np.float32)
        y = np.clip(y, -1.0, 1.0)
        if s["codec"] == "mulaw":
            y = mulaw(y)
        elif s["codec"] == "alaw":
            y = alaw(y)
        return y.astype(np.float32), self.config.rate

    def __call__(self, x: np.ndarray, sample_rate: int, seed: int, *keys: object) -> tuple[np.ndarray, int]:
        return self.apply(x, sample_rate, channel_rng(seed, *keys))
