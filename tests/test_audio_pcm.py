"""PCM helpers: byte/array conversion, channel splitting, resampling, file reading and their errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tracker.audio.pcm import (
    AudioFormatError,
    check_pcm16,
    numpy_to_pcm16,
    pcm16_to_numpy,
    read_audio,
    resample,
    split_channels,
)


def test_pcm16_roundtrip_and_float_scaling():
    x = np.array([0, 1, -1, 32767, -32768], dtype=np.int16)
    data = numpy_to_pcm16(x)
    assert data == x.astype("<i2").tobytes() and len(data) == 10
    np.testing.assert_array_equal(pcm16_to_numpy(data), x)
    f = pcm16_to_numpy(data, dtype="float32")
    assert f.dtype == np.float32 and f[3] == pytest.approx(32767 / 32768) and f[4] == -1.0
    # floats outside [-1, 1] clip instead of wrapping around
    np.testing.assert_array_equal(pcm16_to_numpy(numpy_to_pcm16(np.array([2.0, -2.0, 0.5]))), [32767, -32768, 16384])


def test_split_interleaved_channels():
    left, right = np.arange(5, dtype=np.int16), -np.arange(5, dtype=np.int16)
    interleaved = numpy_to_pcm16(np.stack([left, right], axis=1))
    a, b = split_channels(interleaved, 2)
    np.testing.assert_array_equal(pcm16_to_numpy(a), left)
    np.testing.assert_array_equal(pcm16_to_numpy(b), right)
    assert pcm16_to_numpy(interleaved, channels=2).shape == (5, 2)


def test_format_errors_are_specific():
    with pytest.raises(AudioFormatError, match="odd byte count"):
        pcm16_to_numpy(b"\x00\x01\x02")
    with pytest.raises(AudioFormatError, match="multiple of the frame size"):
        split_channels(b"\x00" * 6, 2)
    with pytest.raises(AudioFormatError, match="sample width 3"):
        check_pcm16(b"\x00" * 6, sample_width=3)
    with pytest.raises(AudioFormatError, match="channels"):
        split_channels(b"\x00" * 4, 0)
    with pytest.raises(AudioFormatError, match="unsupported sample rate"):
        resample(np.zeros(10, dtype=np.float32), 100, 16000)
    with pytest.raises(AudioFormatError, match="NaN"):
        numpy_to_pcm16(np.array([np.nan]))
    with pytest.raises(AudioFormatError, match="dtype"):
        numpy_to_pcm16(np.zeros(3, dtype=np.int32))


def test_resample_keeps_duration_and_pitch():
    t = np.arange(44100) / 44100
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    y = resample(tone, 44100, 16000)
    assert y.dtype == np.float32 and y.shape == (16000,)
    spectrum = np.abs(np.fft.rfft(y))
    assert abs(np.argmax(spectrum) - 440) <= 1  # 1 s at 16 kHz: bin k = k Hz
    yi = resample((tone * 32767).astype(np.int16), 44100, 16000)
    assert yi.dtype == np.int16 and yi.shape == (16000,)
    assert resample(tone, 16000, 16000) is tone


def test_read_audio_resamples_mixes_and_slices(tmp_path: Path):
    t = np.arange(48000) / 48000
    stereo = np.stack([0.5 * np.sin(2 * np.pi * 300 * t), np.zeros_like(t)], axis=1)
    path = tmp_path / "s.wav"
    sf.write(path, stereo, 48000, subtype="PCM_16")
    mono, rate = read_audio(path)
    assert rate == 16000 and mono.shape == (16000,) and mono.dtype == np.float32
    assert np.abs(mono).max() == pytest.approx(0.25, abs=0.01)  # averaged with a silent channel
    both, _ = read_audio(path, mono=False, dtype="int16", target_rate=None)
    assert both.shape == (48000, 2) and both.dtype == np.int16
    part, _ = read_audio(path, start=0.25, end=0.75)
    assert part.shape == (8000,)
    flac = tmp_path / "s.flac"
    sf.write(flac, stereo, 48000, format="FLAC", subtype="PCM_16")
    np.testing.assert_allclose(read_audio(flac)[0], mono, atol=1e-4)


def test_read_audio_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        read_audio(tmp_path / "missing.wav")
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF not really")
    with pytest.raises(AudioFormatError, match="not a readable audio file"):
        read_audio(junk)
    ok = tmp_path / "ok.wav"
    sf.write(ok, np.zeros(1600), 16000)
    with pytest.raises(AudioFormatError, match="outside the file"):
        read_audio(ok, start=5.0)
    with pytest.raises(AudioFormatError, match="must be after"):
        read_audio(ok, start=0.05, end=0.01)
