"""PCM helpers: read WAV/FLAC, PCM16 bytes <-> numpy, resampling and channel splitting.

Everything downstream (VAD, openSMILE features) works on 16 kHz mono; these helpers get audio
there and fail with an :class:`AudioFormatError` that says what was wrong with the input rather
than letting a shape or dtype error surface three calls later.
"""

from __future__ import annotations

from math import gcd
from pathlib import Path
from typing import Literal

import numpy as np

TARGET_RATE = 16000
SAMPLE_WIDTH = 2  # bytes per PCM16 sample
MIN_RATE = 4000
MAX_RATE = 384000

SampleDType = Literal["float32", "int16"]


class AudioFormatError(ValueError):
    """Audio data or a file is not in a format these helpers accept."""


def check_sample_rate(rate: int, what: str = "sample rate") -> int:
    """A plausible integer sample rate, else an AudioFormatError naming it."""
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)):
        raise AudioFormatError(f"{what}: expected an integer number of Hz, got {type(rate).__name__} {rate!r}")
    if not MIN_RATE <= int(rate) <= MAX_RATE:
        raise AudioFormatError(f"{what}: unsupported sample rate {rate} Hz (expected {MIN_RATE}..{MAX_RATE} Hz)")
    return int(rate)


def _check_channels(channels: int) -> int:
    if isinstance(channels, bool) or not isinstance(channels, (int, np.integer)) or channels < 1:
        raise AudioFormatError(f"channels: expected a positive integer, got {channels!r}")
    return int(channels)


def check_pcm16(data: bytes | bytearray | memoryview, channels: int = 1, sample_width: int = SAMPLE_WIDTH) -> None:
    """Raise AudioFormatError unless `data` is whole PCM16 frames of `channels` interleaved samples."""
    if sample_width != SAMPLE_WIDTH:
        raise AudioFormatError(
            f"sample width {sample_width} bytes is not supported: expected 16-bit PCM (sample width 2)"
        )
    channels = _check_channels(channels)
    frame = SAMPLE_WIDTH * channels
    if len(data) % frame:
        kind = "odd byte count" if len(data) % SAMPLE_WIDTH else "byte count not a multiple of the frame size"
        raise AudioFormatError(
            f"PCM16 data of {len(data)} bytes: {kind} (each frame is {frame} bytes = "
            f"{channels} channel(s) x 2 bytes); the stream was cut mid-sample"
        )


def pcm16_to_numpy(
    data: bytes | bytearray | memoryview,
    channels: int = 1,
    dtype: SampleDType = "int16",
    sample_width: int = SAMPLE_WIDTH,
) -> np.ndarray:
    """Little-endian PCM16 bytes to samples: (n,) for mono, (n, channels) otherwise.

    ``dtype="float32"`` scales to [-1, 1).
    """
    check_pcm16(data, channels, sample_width)
    samples = np.frombuffer(bytes(data), dtype="<i2").astype(np.int16, copy=False)
    if channels > 1:
        samples = samples.reshape(-1, channels)
    if dtype == "int16":
        return samples.copy()
    if dtype == "float32":
        return int16_to_float32(samples)
    raise AudioFormatError(f"dtype: expected 'int16' or 'float32', got {dtype!r}")


def int16_to_float32(samples: np.ndarray) -> np.ndarray:
    return (np.asarray(samples, dtype=np.int16).astype(np.float32)) / 32768.0


def float_to_int16(samples: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] to int16, clipping (not wrapping) anything outside."""
    x = np.asarray(samples, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise AudioFormatError("samples contain NaN or infinity; cannot convert to PCM16")
    return np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16)


def numpy_to_pcm16(samples: np.ndarray) -> bytes:
    """int16 samples as-is, floats (taken as [-1, 1]) scaled and clipped; (n, ch) is interleaved."""
    x = np.asarray(samples)
    if x.ndim not in (1, 2):
        raise AudioFormatError(f"samples: expected shape (n,) or (n, channels), got {x.shape}")
    if x.dtype == np.int16:
        out = x
    elif np.issubdtype(x.dtype, np.floating):
        out = float_to_int16(x)
    else:
        raise AudioFormatError(f"samples: expected int16 or float samples, got dtype {x.dtype}")
    return np.ascontiguousarray(out, dtype="<i2").tobytes()


def split_channels(data: bytes | bytearray | memoryview, channels: int) -> list[bytes]:
    """Interleaved multi-channel PCM16 to one mono PCM16 byte string per channel."""
    samples = pcm16_to_numpy(data, channels=channels)
    if channels == 1:
        return [samples.astype("<i2").tobytes()]
    return [np.ascontiguousarray(samples[:, c], dtype="<i2").tobytes() for c in range(channels)]


def to_mono(samples: np.ndarray) -> np.ndarray:
    """Average the channels of (n, ch) samples (kept in their dtype); (n,) passes through."""
    x = np.asarray(samples)
    if x.ndim == 1:
        return x
    if x.ndim != 2:
        raise AudioFormatError(f"samples: expected shape (n,) or (n, channels), got {x.shape}")
    if x.shape[1] == 1:
        return x[:, 0]
    mean = x.astype(np.float64).mean(axis=1)
    if x.dtype == np.int16:
        return np.clip(np.round(mean), -32768, 32767).astype(np.int16)
    return mean.astype(x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32)


def resample(samples: np.ndarray, orig_rate: int, target_rate: int = TARGET_RATE) -> np.ndarray:
    """Polyphase resampling along axis 0 (scipy's resample_poly); int16 in gives int16 out."""
    orig_rate = check_sample_rate(orig_rate, "orig_rate")
    target_rate = check_sample_rate(target_rate, "target_rate")
    x = np.asarray(samples)
    if orig_rate == target_rate:
        return x
    try:
        from scipy.signal import resample_poly
    except ImportError as exc:  # pragma: no cover - scipy is installed with scikit-learn
        raise ImportError(
            f"resampling {orig_rate} Hz -> {target_rate} Hz needs scipy (pip install scipy), "
            f"or provide audio already at {target_rate} Hz"
        ) from exc
    g = gcd(orig_rate, target_rate)
    as_float = int16_to_float32(x) if x.dtype == np.int16 else x.astype(np.float32, copy=False)
    y = resample_poly(as_float, target_rate // g, orig_rate // g, axis=0).astype(np.float32)
    return float_to_int16(y) if x.dtype == np.int16 else y


def read_audio(
    path: str | Path,
    *,
    dtype: SampleDType = "float32",
    target_rate: int | None = TARGET_RATE,
    mono: bool = True,
    start: float | None = None,
    end: float | None = None,
) -> tuple[np.ndarray, int]:
    """Read a WAV/FLAC (anything libsndfile reads), optionally a [start, end) span in seconds.

    Returns ``(samples, rate)``: (n,) if `mono` (channels averaged) else (n, channels), resampled to
    `target_rate` unless it is None.
    """
    import soundfile as sf

    path = Path(path)
    if dtype not in ("float32", "int16"):
        raise AudioFormatError(f"dtype: expected 'float32' or 'int16', got {dtype!r}")
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {path}")
    try:
        info = sf.info(str(path))
    except (RuntimeError, sf.LibsndfileError) as exc:
        raise AudioFormatError(f"{path}: not a readable audio file ({exc})") from None
    rate = check_sample_rate(info.samplerate, f"{path}")
    first, last = _span_to_frames(start, end, rate, info.frames, path)
    try:
        data, rate = sf.read(str(path), start=first, stop=last, dtype=dtype, always_2d=True)
    except (RuntimeError, sf.LibsndfileError) as exc:
        raise AudioFormatError(f"{path}: could not decode audio ({exc})") from None
    samples: np.ndarray = to_mono(data) if mono else data
    if target_rate is not None and rate != target_rate:
        samples = resample(samples, rate, target_rate)
        rate = target_rate
    return samples, int(rate)


def _span_to_frames(start: float | None, end: float | None, rate: int, n_frames: int, path: Path) -> tuple[int, int]:
    first = 0 if start is None else int(round(float(start) * rate))
    last = n_frames if end is None else int(round(float(end) * rate))
    if first < 0 or (start is not None and first > n_frames):
        raise AudioFormatError(f"{path}: start={start}s lies outside the file (0..{n_frames / rate:.3f}s)")
    if end is not None and last <= first:
        raise AudioFormatError(f"{path}: end={end}s must be after start={start or 0}s")
    return first, min(last, n_frames)
