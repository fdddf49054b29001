"""Whisper from packages: assembly with checksums, the encoder-feature route against the full encoder, the
batched recognizer, word error rate. Fast tests use a small random Whisper installed as fake packages;
tests marked slow use the real packaged weights (base, tiny.en) and the bundled demo call."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.whisper_fixtures import D_MODEL, LAYERS, install_fake_packages
from tracker.audio import whisper_models as wm
from tracker.audio.pcm import AudioFormatError, resample
from tracker.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "tracker" / "assets" / "demo"


@pytest.fixture()
def rand_model(tmp_path, monkeypatch):
    """The random Whisper as packages `fakewhisper_part1/2`, registered as the packaged model `rand`."""
    spec = install_fake_packages(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(wm.PACKAGED, "rand", spec)
    monkeypatch.setenv("TRACKER_CACHE_DIR", str(tmp_path / "cache"))
    return spec


def ct2_encode(folder: Path, mel: np.ndarray, compute_type: str = "float32") -> np.ndarray:
    import ctranslate2

    model = ctranslate2.models.Whisper(str(folder), compute_type=compute_type, intra_threads=1)
    return np.asarray(model.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(mel[None], dtype=np.float32))))[0]


def speechlike(seconds: float, rate: int = 16000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    x = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / rate) / k for k in range(1, 8)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return (0.2 * x / np.abs(x).max() + 0.005 * rng.standard_normal(t.shape)).astype(np.float32)


# -- assembly --------------------------------------------------------------------------------------

def test_packaged_model_assembles_once_from_its_parts_with_checksums(rand_model, tmp_path):
    folder = wm.ensure_whisper_model("rand")
    assert folder == tmp_path / "cache" / "whisper" / "rand-v1"
    original = (tmp_path / "random-model" / "model.bin").read_bytes()
    assert (folder / "model.bin").read_bytes() == original  # the two parts, concatenated in order
    meta = json.loads((folder / "assembled.json").read_text())
    assert meta["model_sha256"] == rand_model.model_sha256 and meta["packages"] == ["fakewhisper-part1", "fakewhisper-part2"]
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        assert (folder / name).is_file()
    stamp = (folder / "model.bin").stat().st_mtime_ns
    assert wm.ensure_whisper_model("rand") == folder and (folder / "model.bin").stat().st_mtime_ns == stamp  # not redone
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".rand-v1.") and p.is_dir()]  # no staging left
    assert ct2_encode(folder, np.zeros((80, 100), np.float32)).shape == (50, D_MODEL)  # CTranslate2 loads it


def test_a_corrupt_part_is_refused_with_a_clear_error_and_nothing_is_cached(rand_model, tmp_path):
    part2 = tmp_path / "site" / "fakewhisper_part2" / "data" / "model.bin.part2"
    blob = bytearray(part2.read_bytes())
    blob[1000] ^= 0xFF  # one flipped byte, same size
    part2.write_bytes(bytes(blob))
    with pytest.raises(wm.WhisperModelError, match=r"model\.bin\.part2 \(package fakewhisper-part2\) fails its checksum.*"
                                                   r"pip install --force-reinstall fakewhisper-part2"):
        wm.ensure_whisper_model("rand")
    assert not (tmp_path / "cache" / "whisper" / "rand-v1").exists()
    part2.write_bytes(bytes(blob[:-10]))  # truncated
    with pytest.raises(wm.WhisperModelError, match="corrupt or truncated"):
        wm.ensure_whisper_model("rand")


def test_missing_package_and_incomplete_folder_have_clear_errors(rand_model, tmp_path, monkeypatch):
    monkeypatch.setitem(wm.PACKAGED, "gone", wm.PackagedWhisper(
        "gone", (wm.PackagedFile("no_such_whisper_pkg", "x", "0" * 64, 0),), (), "0" * 64, 64, 1, False))
    with pytest.raises(wm.WhisperModelError, match="pip install no-such-whisper-pkg"):
        wm.ensure_whisper_model("gone")
    with pytest.raises(wm.WhisperModelError, match="not a packaged model"):
        wm.ensure_whisper_model(str(tmp_path / "nowhere"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model.bin").write_bytes(b"x")
    with pytest.raises(wm.WhisperModelError, match="lacks config.json, tokenizer.json"):
        wm.ensure_whisper_model(str(tmp_path / "half"))
    assert wm.ensure_whisper_model(str(tmp_path / "random-model")) == tmp_path / "random-model"  # any folder by path


def test_model_bin_reads_and_writes_back_byte_for_byte(rand_model, tmp_path):
    src = tmp_path / "random-model" / "model.bin"
    model = wm.read_ct2_model(src)
    assert model.spec == "WhisperSpec" and model.encoder_layers() == LAYERS and model.decoder_layers() == LAYERS
    wm.write_ct2_model(model, tmp_path / "copy.bin")
    assert (tmp_path / "copy.bin").read_bytes() == src.read_bytes()
    (tmp_path / "cut.bin").write_bytes(src.read_bytes()[:5000])
    with pytest.raises(wm.WhisperModelError, match="truncated"):
        wm.read_ct2_model(tmp_path / "cut.bin")


# -- encoder features ------------------------------------------------------------------------------

TOLERANCE = 1e-4  # max |difference| relative to max |state|: fp32 CTranslate2 vs fp32 torch


def test_encoder_cut_after_each_block_matches_the_full_encoder_and_the_torch_reference(rand_model):
    from tracker.audio.whisper_features import log_mel, reference_encoder_states

    full = wm.ensure_whisper_model("rand")
    mel = log_mel(speechlike(2.0))[:, :200]  # (80, 200): 2 s, not padded to 30 s
    reference = reference_encoder_states(full, mel)
    assert len(reference) == LAYERS and reference[-1].shape == (100, D_MODEL)
    out = ct2_encode(full, mel)
    assert np.abs(out - reference[-1]).max() <= TOLERANCE * np.abs(out).max()  # the torch mapping is right
    assert wm.ensure_encoder_model("rand", LAYERS) == full
    for layer in range(1, LAYERS):
        cut = wm.ensure_encoder_model("rand", layer)
        assert wm.read_ct2_model(cut / "model.bin").encoder_layers() == layer
        states = ct2_encode(cut, mel)
        assert np.abs(states - reference[layer - 1]).max() <= TOLERANCE * np.abs(states).max(), layer
        assert np.abs(states - out).max() > 10 * TOLERANCE * np.abs(out).max()  # a different layer indeed
    with pytest.raises(wm.WhisperModelError, match="layer must be in 1..3"):
        wm.ensure_encoder_model("rand", 4)


def test_whisper_features_pool_the_real_length_cache_and_accept_8khz_and_long_clips(rand_model, tmp_path):
    from tracker.audio.whisper_features import WhisperEncoderFeatures, WhisperFeatureConfig, pool

    fx = WhisperEncoderFeatures(WhisperFeatureConfig(model="rand", layer=2, compute_type="float32", cache_dir=str(tmp_path / "f")))
    x = speechlike(3.0)
    states = fx.states(x, 16000)
    assert states.shape == (150, D_MODEL)  # 3 s = 300 mel frames = 150 encoder frames, not 1,500
    out = fx.process_signal(x, 16000)
    assert out.shape == (1, 2 * D_MODEL) and out.dtype == np.float32
    np.testing.assert_allclose(out, pool(states, "meanstd"), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[0, :D_MODEL], states.mean(0), rtol=1e-5, atol=1e-6)
    assert fx.compute_calls == 2 and np.array_equal(fx.process_signal(x.copy(), 16000), out) and fx.cache_hits == 1
    x8 = resample(x, 16000, 8000)
    assert fx.states(x8, 8000).shape == (150, D_MODEL)  # resampled to 16 kHz first
    assert fx.states(speechlike(35.0), 16000).shape == (1750, D_MODEL)  # a 30 s piece and a 5 s piece
    mean = WhisperEncoderFeatures(WhisperFeatureConfig(model="rand", layer=2, pooling="mean", use_cache=False))
    assert mean.process_signal(x, 16000).shape == (1, D_MODEL)
    with pytest.raises(ConfigError, match="has 3 encoder blocks"):
        WhisperEncoderFeatures(WhisperFeatureConfig(model="rand", layer=5))


def test_feature_sources_are_parsed_and_validated(rand_model):
    from tracker.audio.modalities import parse_source
    from tracker.model.adapter import ModalityConfig

    assert parse_source("whisper_base_l4_meanstd").feature_dim == 1024
    assert parse_source("whisper_tiny.en_l3_mean").feature_dim == 384
    assert parse_source("egemaps_functionals").feature_dim == 88
    for bad, msg in [("whisper_base_l7_meanstd", "blocks 1..6"), ("whisper_large_l2_mean", "unknown Whisper model"),
                     ("whisper_base_l2_max", "unknown source"), ("mfcc", "unknown source")]:
        with pytest.raises(ConfigError, match=msg):
            parse_source(bad)
    with pytest.raises(ConfigError, match=r"modalities.w.feature_dim: source whisper_rand_l2_meanstd gives 128"):
        ModalityConfig("w", 1024, source="whisper_rand_l2_meanstd")
    assert ModalityConfig("w", 2 * D_MODEL, source="whisper_rand_l2_meanstd", speaker_norm=True).speaker_norm


# -- speech recognition ----------------------------------------------------------------------------

def test_batched_recognition_equals_one_by_one_at_any_rate(rand_model):
    from tracker.audio.asr import AsrConfig, SpeechRecognizer

    rec = SpeechRecognizer(AsrConfig(model="rand", compute_type="float32", beam_size=1, max_new_tokens=6, threads=1, max_batch_size=2))
    x = speechlike(2.0, seed=1)
    batch = [(x, 16000), (resample(x, 16000, 8000), 8000), ((speechlike(1.0, seed=2) * 32767).astype(np.int16), 16000)]
    together = rec.transcribe(batch)
    alone = [rec.transcribe_one(s, r) for s, r in batch]
    assert [(t.text, t.tokens) for t in together] == [(a.text, a.tokens) for a in alone]
    assert [t.avg_logprob for t in together] == pytest.approx([a.avg_logprob for a in alone], abs=1e-3)
    assert rec.batches == 2 + 3  # two passes (rows of 2) for the batch, one per single utterance
    for t in together:
        assert 0.0 <= t.confidence <= 1.0 and 0.0 <= t.no_speech_prob <= 1.0 and t.language == "en" and t.tokens <= 6
        if t.text:
            assert t.confidence == pytest.approx(np.exp(min(0.0, t.avg_logprob)) * (1 - t.no_speech_prob))
    long = rec.transcribe([(speechlike(40.0), 16000)])[0]  # 30 s + 10 s: two windows, texts joined
    assert long.tokens <= 12


def test_recognizer_rejects_bad_audio_and_bad_config(rand_model):
    from tracker.audio.asr import AsrConfig, SpeechRecognizer
    from tracker.config import load_dataclass

    rec = SpeechRecognizer(AsrConfig(model="rand", compute_type="float32", beam_size=1, max_new_tokens=4, threads=1))
    with pytest.raises(AudioFormatError, match="empty"):
        rec.transcribe([(np.zeros(0, np.float32), 16000)])
    with pytest.raises(AudioFormatError, match="NaN"):
        rec.transcribe([(np.full(800, np.nan, np.float32), 16000)])
    with pytest.raises(AudioFormatError, match="sample rate"):
        rec.transcribe([(np.zeros(800, np.float32), 12)])
    with pytest.raises(ConfigError, match="compute_type"):
        load_dataclass(AsrConfig, {"compute_type": "int3"})
    with pytest.raises(ConfigError, match="beam_size"):
        load_dataclass(AsrConfig, {"beam_size": 0})
    assert AsrConfig().resolved_compute_type("cpu") == "int8" and AsrConfig().resolved_compute_type("cuda") == "float16"


def test_word_error_rate():
    from tracker.audio.asr import normalize_words, word_error_rate

    assert word_error_rate("Oh shoot!", "oh, shoot.") == 0.0
    assert word_error_rate("a b c d", "a x c") == pytest.approx(0.5)  # one substitution, one deletion
    assert word_error_rate("a b", "a b c d") == pytest.approx(1.0)  # two insertions over two words
    assert word_error_rate(["I don't", "know"], "i don\u2019t know") == 0.0
    assert word_error_rate("", "") == 0.0 and word_error_rate("", "x") == 1.0
    assert normalize_words("What?! They took mine-to give") == ["what", "they", "took", "mine", "to", "give"]


# -- the real packaged models (slow) ---------------------------------------------------------------

def demo_utterances(rate: int = 16000) -> tuple[list[tuple[np.ndarray, int]], list[str]]:
    doc = json.loads((DEMO / "conversation.json").read_text())
    audio, sr = sf.read(str(DEMO / "conversation.flac"), dtype="float32")
    utts = []
    for u in doc["utterances"]:
        x = audio[u["start_ms"] * sr // 1000:u["end_ms"] * sr // 1000, u["channel"]]
        utts.append((resample(x, sr, rate) if rate != sr else x, rate))
    return utts, [u["text"] for u in doc["utterances"]]


@pytest.mark.slow
def test_real_packages_assemble_with_their_checksums():
    for name in ("tiny.en", "base"):
        folder = wm.ensure_whisper_model(name)
        meta = json.loads((folder / "assembled.json").read_text())
        assert meta["model_sha256"] == wm.PACKAGED[name].model_sha256
        assert wm.sha256_file(folder / "model.bin") == wm.PACKAGED[name].model_sha256


@pytest.mark.slow
def test_real_encoder_features_match_the_full_ctranslate2_encoder():
    from tracker.audio.whisper_features import WhisperEncoderFeatures, WhisperFeatureConfig, log_mel, reference_encoder_states

    x, _ = demo_utterances()[0][1]
    mel = log_mel(x)
    mel = mel[:, : mel.shape[1] // 2 * 2]
    full = wm.ensure_whisper_model("base")
    reference = reference_encoder_states(full, mel)
    out = ct2_encode(full, mel)
    assert np.abs(out - reference[-1]).max() <= TOLERANCE * np.abs(out).max()
    cut = ct2_encode(wm.ensure_encoder_model("base", 4), mel)
    assert np.abs(cut - reference[3]).max() <= TOLERANCE * np.abs(cut).max()
    # the shipped compute type (int8) against float32: pooled features agree closely
    f32 = WhisperEncoderFeatures(WhisperFeatureConfig(model="base", layer=4, compute_type="float32", use_cache=False))
    i8 = WhisperEncoderFeatures(WhisperFeatureConfig(model="base", layer=4, use_cache=False))
    a, b = f32.process_signal(x, 16000)[0], i8.process_signal(x, 16000)[0]
    assert np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) > 0.995


@pytest.mark.slow
def test_demo_call_is_transcribed_with_low_word_error_rate():
    from tracker.audio.asr import AsrConfig, SpeechRecognizer, word_error_rate

    utts, refs = demo_utterances()
    rec = SpeechRecognizer(AsrConfig())  # tiny.en, beam 5, int8 on CPU
    out = rec.transcribe(utts)
    wer = word_error_rate(refs, [t.text for t in out])
    assert wer <= 0.15, (wer, [t.text for t in out])
    assert all(t.text and 0 < t.confidence <= 1 and t.language == "en" for t in out)
