"""openSMILE eGeMAPS features: shapes on real speech, short audio, NaN guard, the on-disk cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tracker.audio.features import FeatureExtractor, FeatureExtractorConfig, default_cache_dir
from tracker.audio.pcm import AudioFormatError
from tracker.config import ConfigError, load_dataclass


@pytest.fixture(scope="module")
def ravdess_file(ravdess_dir: Path) -> Path:
    root = ravdess_dir / "ravdess_16k"
    files = sorted(root.glob("Actor_01/*.flac")) or sorted(root.rglob("*.flac")) or sorted(root.rglob("*.wav"))
    if not files:
        from tests.conftest import require_data

        require_data("ravdess_16k/Actor_01", dataset="ravdess")
    return files[0]


@pytest.fixture()
def extractor(tmp_path: Path) -> FeatureExtractor:
    return FeatureExtractor(FeatureExtractorConfig(cache_dir=str(tmp_path / "features")))


def test_lld_shape_on_real_speech_is_25_per_10ms(ravdess_file: Path, extractor: FeatureExtractor):
    info = sf.info(str(ravdess_file))
    feats = extractor.process_file(ravdess_file)
    expected = info.duration * 100  # one frame every 10 ms
    assert feats.dtype == np.float32 and feats.ndim == 2 and feats.shape[1] == 25
    assert abs(feats.shape[0] - expected) <= 6, (feats.shape, info.duration)
    assert np.isfinite(feats).all()
    assert feats.std(axis=0).max() > 0  # not a constant placeholder
    assert len(extractor.feature_names) == 25 and extractor.feature_names[0].startswith("Loudness")


def test_signal_and_file_agree_and_span_is_shorter(ravdess_file: Path, extractor: FeatureExtractor):
    samples, rate = sf.read(str(ravdess_file), dtype="float32")
    from_signal = extractor.process_signal(samples, rate)
    from_file = extractor.process_file(ravdess_file)
    np.testing.assert_allclose(from_signal, from_file, rtol=1e-5, atol=1e-5)
    span = extractor.process_file(ravdess_file, start=0.5, end=1.5)
    assert abs(span.shape[0] - 100) <= 6, span.shape


def test_int16_and_other_rates_are_accepted(extractor: FeatureExtractor):
    t = np.arange(8000 * 2) / 8000
    tone = 0.3 * np.sin(2 * np.pi * 220 * t)
    feats = extractor.process_signal((tone * 32767).astype(np.int16), 8000)  # resampled to 16 kHz
    assert feats.shape[1] == 25 and abs(feats.shape[0] - 200) <= 6


def test_cache_hit_returns_identical_array_without_recomputing(ravdess_file: Path, extractor: FeatureExtractor):
    first = extractor.process_file(ravdess_file)
    assert extractor.compute_calls == 1 and extractor.cache_hits == 0
    files = list(Path(extractor.config.cache_dir).rglob("*.npy"))
    assert len(files) == 1 and not list(Path(extractor.config.cache_dir).rglob("*.tmp"))

    second = extractor.process_file(ravdess_file)
    assert extractor.compute_calls == 1 and extractor.cache_hits == 1
    np.testing.assert_array_equal(first, second)

    # a fresh extractor (e.g. another process) reads the same entry
    other = FeatureExtractor(FeatureExtractorConfig(cache_dir=extractor.config.cache_dir))
    np.testing.assert_array_equal(other.process_file(ravdess_file), first)
    assert other.compute_calls == 0 and other.cache_hits == 1

    # a different span of the same file is a different entry
    extractor.process_file(ravdess_file, start=0.0, end=1.0)
    assert extractor.compute_calls == 2


def test_signal_cache_keys_on_content(extractor: FeatureExtractor):
    rng = np.random.default_rng(0)
    a = (rng.standard_normal(16000) * 0.1).astype(np.float32)
    extractor.process_signal(a, 16000)
    extractor.process_signal(a.copy(), 16000)
    assert extractor.compute_calls == 1
    b = a.copy()
    b[100] += 0.01
    extractor.process_signal(b, 16000)
    assert extractor.compute_calls == 2


def test_different_settings_give_different_cache_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    base = FeatureExtractor(FeatureExtractorConfig(cache_dir=str(tmp_path)))
    keys = {
        base.cache_key("abc"),
        FeatureExtractor(FeatureExtractorConfig(level="functionals", cache_dir=str(tmp_path))).cache_key("abc"),
        FeatureExtractor(FeatureExtractorConfig(feature_set="eGeMAPSv01b", cache_dir=str(tmp_path))).cache_key("abc"),
        FeatureExtractor(FeatureExtractorConfig(sample_rate=8000, cache_dir=str(tmp_path))).cache_key("abc"),
        base.cache_key("abd"),
    }
    import opensmile

    monkeypatch.setattr(opensmile, "__version__", "0.0-test")
    keys.add(base.cache_key("abc"))
    assert len(keys) == 6


def test_functionals_flag_gives_88(extractor: FeatureExtractor, tmp_path: Path):
    fx = FeatureExtractor(FeatureExtractorConfig(level="functionals", cache_dir=str(tmp_path)))
    rng = np.random.default_rng(1)
    out = fx.process_signal((rng.standard_normal(16000) * 0.1).astype(np.float32), 16000)
    assert out.shape == (1, 88) and out.dtype == np.float32 and np.isfinite(out).all()


@pytest.mark.parametrize("n_samples", [1, 160, 800, 1599])
def test_very_short_audio_still_gives_finite_frames(extractor: FeatureExtractor, n_samples: int):
    rng = np.random.default_rng(n_samples)
    out = extractor.process_signal((rng.standard_normal(n_samples) * 0.1).astype(np.float32), 16000)
    assert out.shape[0] >= 1 and out.shape[1] == 25 and np.isfinite(out).all()


def test_nans_from_opensmile_are_replaced(tmp_path: Path):
    import pandas as pd

    class FakeSmile:
        feature_names = [f"f{i}" for i in range(25)]

        def process_signal(self, signal, sr):
            arr = np.ones((3, 25))
            arr[1, 4] = np.nan
            arr[2, 0] = np.inf
            return pd.DataFrame(arr)

    fx = FeatureExtractor(FeatureExtractorConfig(use_cache=False))
    fx._smile = FakeSmile()
    out = fx.process_signal(np.zeros(16000, dtype=np.float32), 16000)
    assert np.isfinite(out).all() and out[1, 4] == 0.0 and out[0, 0] == 1.0


def test_bad_inputs_raise_clear_errors(extractor: FeatureExtractor):
    with pytest.raises(AudioFormatError, match="empty"):
        extractor.process_signal(np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(AudioFormatError, match="NaN"):
        extractor.process_signal(np.full(1600, np.nan, dtype=np.float32), 16000)
    with pytest.raises(AudioFormatError, match="dtype"):
        extractor.process_signal(np.zeros(1600, dtype=np.int32), 16000)
    with pytest.raises(AudioFormatError, match="sample rate"):
        extractor.process_signal(np.zeros(1600, dtype=np.float32), 10)
    with pytest.raises(FileNotFoundError):
        extractor.process_file("/nonexistent/file.wav")


def test_corrupt_cache_entry_is_recomputed(extractor: FeatureExtractor):
    x = np.random.default_rng(2).standard_normal(16000).astype(np.float32) * 0.1
    good = extractor.process_signal(x, 16000)
    (path,) = Path(extractor.config.cache_dir).rglob("*.npy")
    path.write_bytes(b"not an npy file")
    again = extractor.process_signal(x, 16000)
    np.testing.assert_array_equal(good, again)
    assert extractor.compute_calls == 2


def test_config_validation_and_default_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(ConfigError, match="^feature_set:"):
        FeatureExtractorConfig(feature_set="MFCC")
    with pytest.raises(ConfigError, match="^level:"):
        load_dataclass(FeatureExtractorConfig, {"level": "frames"})
    with pytest.raises(ConfigError, match="^sample_rate:"):
        load_dataclass(FeatureExtractorConfig, {"sample_rate": 100})
    monkeypatch.setenv("TRACKER_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c" / "features"
    assert FeatureExtractor().cache_dir == tmp_path / "c" / "features"


def test_modality_features_compute_each_named_source_for_file_and_signal(ravdess_file: Path, tmp_path: Path):
    from tracker.audio.modalities import ModalityFeatures

    base = FeatureExtractorConfig(cache_dir=str(tmp_path / "features"))
    mf = ModalityFeatures({"audio": "egemaps_lld", "audio_functionals": "egemaps_functionals", "again": "egemaps_lld"}, base=base)
    out = mf.from_file(ravdess_file)
    assert set(out) == {"audio", "audio_functionals", "again"}
    assert out["audio"].shape[1] == 25 and out["audio"].shape[0] > 100
    assert out["audio_functionals"].shape == (1, 88)
    np.testing.assert_array_equal(out["audio"], out["again"])  # one extraction per source, shared
    signal, rate = sf.read(ravdess_file, dtype="float32")
    live = mf.from_signal(signal, rate)
    np.testing.assert_allclose(live["audio_functionals"], out["audio_functionals"], rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="unknown source 'mfcc'"):
        ModalityFeatures({"x": "mfcc"})
