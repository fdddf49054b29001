"""openSMILE eGeMAPS features for the adapter's "audio" modality, with an on-disk cache.

The adapter takes per-utterance frame features as (frames, 25) float32 arrays: the 25 eGeMAPSv02
low-level descriptors every 10 ms. Functionals (88 per utterance, shape (1, 88)) are available via
``level="functionals"``. Extraction is cheap for one utterance but adds up over a corpus, so results
are cached as ``.npy`` files keyed by the audio content and the extractor settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tracker.audio.pcm import AudioFormatError, check_sample_rate, int16_to_float32, read_audio, resample, to_mono
from tracker.config import ConfigError

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the stored layout or post-processing changes
MIN_SECONDS = 0.1  # shorter signals are zero-padded to this: openSMILE gives only NaN below ~60 ms
N_LLD = {"eGeMAPSv02": 25, "eGeMAPSv01b": 25, "eGeMAPSv01a": 25, "GeMAPSv01b": 18, "GeMAPSv01a": 18,
         "ComParE_2016": 65, "emobase": 26}
N_FUNCTIONALS = {"eGeMAPSv02": 88, "eGeMAPSv01b": 88, "eGeMAPSv01a": 88, "GeMAPSv01b": 62,
                 "GeMAPSv01a": 62, "ComParE_2016": 6373, "emobase": 988}
_LEVELS = {"lld": "LowLevelDescriptors", "functionals": "Functionals"}


@dataclass
class FeatureExtractorConfig:
    """Which openSMILE features to compute, at which rate, and where to cache them."""

    feature_set: str = "eGeMAPSv02"  # an opensmile.FeatureSet name
    level: Literal["lld", "functionals"] = "lld"  # lld: (frames, 25) every 10 ms; functionals: (1, 88)
    sample_rate: int = 16000  # audio is resampled to this before extraction
    cache_dir: str | None = None  # None: <tracker cache dir>/features
    use_cache: bool = True

    def __post_init__(self) -> None:
        if self.feature_set not in N_LLD:
            raise ConfigError(f"feature_set: unknown openSMILE feature set {self.feature_set!r} (known: {', '.join(N_LLD)})")
        if self.level not in _LEVELS:
            raise ConfigError(f"level: expected 'lld' or 'functionals', got {self.level!r}")
        if isinstance(self.sample_rate, bool) or not isinstance(self.sample_rate, int) or not 8000 <= self.sample_rate <= 48000:
            raise ConfigError(f"sample_rate: expected an integer in 8000..48000 Hz, got {self.sample_rate!r}")

    @property
    def n_features(self) -> int:
        return (N_LLD if self.level == "lld" else N_FUNCTIONALS)[self.feature_set]


def default_cache_dir() -> Path:
    """$TRACKER_CACHE_DIR/features, else the XDG cache (~/.cache/tracker/features)."""
    from tracker.cache import cache_dir

    return cache_dir() / "features"


class CachedExtractor:
    """Per-clip features of numpy signals or files, cached on disk by audio content and :meth:`settings`.

    Subclasses give ``config`` (with ``cache_dir`` and ``use_cache``), :attr:`n_features`,
    :meth:`settings` and :meth:`_compute`; ``compute_calls`` counts real extractions (cache misses).
    """

    config: Any

    def __init__(self) -> None:
        self.compute_calls = 0
        self.cache_hits = 0
        self._lock = threading.Lock()  # extractors (openSMILE, CTranslate2) are not shared between threads

    @property
    def n_features(self) -> int:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """Everything besides the audio that determines the output: part of the cache key."""
        raise NotImplementedError

    def _compute(self, x: np.ndarray, sample_rate: int) -> np.ndarray:
        """float32 mono samples at `sample_rate` -> float32 (frames, n_features)."""
        raise NotImplementedError

    @property
    def cache_dir(self) -> Path:
        return Path(self.config.cache_dir).expanduser() if self.config.cache_dir else default_cache_dir()

    def process_signal(self, signal: np.ndarray, sample_rate: int) -> np.ndarray:
        """Features of a 1-D (or (n, ch), averaged) float or int16 signal as float32 (frames, F)."""
        x = as_float_mono(signal)
        sample_rate = check_sample_rate(sample_rate)
        h = hashlib.sha256()
        h.update(f"signal:{sample_rate}:{x.dtype.str}:{x.shape}".encode())
        h.update(np.ascontiguousarray(x).tobytes())
        return self._cached(h.hexdigest(), lambda: self._checked(x, sample_rate))

    def process_file(self, path: str | Path, start: float | None = None, end: float | None = None) -> np.ndarray:
        """Features of an audio file, or of its [start, end) span in seconds."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"audio file not found: {path}")
        key = f"file:{file_sha256(path)}:{start!r}:{end!r}"

        def compute() -> np.ndarray:
            samples, rate = read_audio(path, dtype="float32", target_rate=None, start=start, end=end)
            return self._checked(samples, rate)

        return self._cached(hashlib.sha256(key.encode()).hexdigest(), compute)

    def cache_key(self, content_hash: str) -> str:
        """sha256 over the content hash and :meth:`settings`."""
        blob = json.dumps({"content": content_hash, **self.settings()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def cache_path(self, content_hash: str) -> Path:
        key = self.cache_key(content_hash)
        return self.cache_dir / key[:2] / f"{key}.npy"

    def _checked(self, x: np.ndarray, sample_rate: int) -> np.ndarray:
        x = as_float_mono(x)
        if x.size == 0:
            raise AudioFormatError("cannot extract features from empty audio (0 samples)")
        out = self._compute(x, sample_rate)
        if out.ndim != 2 or out.shape[0] < 1 or out.shape[1] != self.n_features:
            raise RuntimeError(f"{type(self).__name__} computed shape {out.shape}, expected (>=1, {self.n_features})")
        return np.ascontiguousarray(out, dtype=np.float32)

    def _cached(self, content_hash: str, compute: Any) -> np.ndarray:
        if not self.config.use_cache:
            return compute()
        path = self.cache_path(content_hash)
        hit = _load(path, self.n_features)
        if hit is not None:
            self.cache_hits += 1
            return hit
        out = compute()
        try:
            _atomic_save(path, out)
        except OSError as exc:  # a read-only or full cache must not break extraction
            log.warning("could not write feature cache %s: %s", path, exc)
        return out


class FeatureExtractor(CachedExtractor):
    """openSMILE eGeMAPS (LLDs or functionals) on numpy signals or files."""

    def __init__(self, config: FeatureExtractorConfig | None = None):
        super().__init__()
        self.config = config or FeatureExtractorConfig()
        self._smile: Any = None

    @property
    def n_features(self) -> int:
        return self.config.n_features

    @property
    def feature_names(self) -> list[str]:
        return list(self._get_smile().feature_names)

    def settings(self) -> dict[str, Any]:
        import opensmile

        return {"feature_set": self.config.feature_set, "level": self.config.level,
                "sample_rate": self.config.sample_rate, "opensmile": opensmile.__version__,
                "min_seconds": MIN_SECONDS, "cache_version": CACHE_VERSION}

    def _get_smile(self) -> Any:
        if self._smile is None:
            import opensmile

            self._smile = opensmile.Smile(
                feature_set=getattr(opensmile.FeatureSet, self.config.feature_set),
                feature_level=getattr(opensmile.FeatureLevel, _LEVELS[self.config.level]),
            )
        return self._smile

    def _compute(self, x: np.ndarray, sample_rate: int) -> np.ndarray:
        if sample_rate != self.config.sample_rate:
            x = resample(x, sample_rate, self.config.sample_rate)
        min_len = int(round(MIN_SECONDS * self.config.sample_rate))
        if x.shape[0] < min_len:
            x = np.pad(x, (0, min_len - x.shape[0]))
        with self._lock:
            smile = self._get_smile()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "Segment too short": handled below
                frame = smile.process_signal(x, self.config.sample_rate)
            self.compute_calls += 1
        return np.nan_to_num(frame.to_numpy(dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)


def as_float_mono(signal: np.ndarray, what: str = "signal") -> np.ndarray:
    """float or int16 samples, (n,) or (n, channels), as finite float32 mono; AudioFormatError naming `what` otherwise."""
    x = np.asarray(signal)
    if x.ndim not in (1, 2):
        raise AudioFormatError(f"{what}: expected shape (n,) or (n, channels), got {x.shape}")
    if x.dtype == np.int16:
        x = int16_to_float32(x)
    elif not np.issubdtype(x.dtype, np.floating):
        raise AudioFormatError(f"{what}: expected float or int16 samples, got dtype {x.dtype}")
    x = to_mono(x).astype(np.float32, copy=False)
    if not np.all(np.isfinite(x)):
        raise AudioFormatError(f"{what} contains NaN or infinity")
    return x


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _load(path: Path, n_features: int) -> np.ndarray | None:
    """A cached array, or None when missing or unusable (a corrupt entry is recomputed)."""
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, EOFError) as exc:
        log.warning("ignoring unreadable feature cache entry %s: %s", path, exc)
        return None
    if arr.dtype != np.float32 or arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] != n_features:
        log.warning("ignoring feature cache entry %s with shape %s dtype %s", path, arr.shape, arr.dtype)
        return None
    return arr


def _atomic_save(path: Path, arr: np.ndarray) -> None:
    """Write to a temp file in the same directory, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem[:16]}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, arr, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


_default: FeatureExtractor | None = None
_default_lock = threading.Lock()


def extract_lld(signal: np.ndarray, sample_rate: int) -> np.ndarray:
    """(frames, 25) eGeMAPSv02 LLDs with the default (cached) extractor: the adapter's "audio" input."""
    global _default
    with _default_lock:
        if _default is None:
            _default = FeatureExtractor()
    return _default.process_signal(signal, sample_rate)
