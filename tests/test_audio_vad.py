"""webrtcvad streaming segmentation: accuracy on the shipped demo, chunking, config and rate errors."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tracker.audio.pcm import AudioFormatError, numpy_to_pcm16, read_audio, split_channels
from tracker.audio.vad import Segment, StreamingSegmenter, VadConfig, segment_pcm16
from tracker.config import ConfigError, load_dataclass

DEMO = Path(__file__).resolve().parents[1] / "tracker" / "assets" / "demo"
TOLERANCE_MS = 300


@pytest.fixture(scope="module")
def demo() -> tuple[dict, list[bytes]]:
    meta = json.loads((DEMO / "conversation.json").read_text(encoding="utf-8"))
    samples, rate = sf.read(str(DEMO / "conversation.flac"), dtype="int16", always_2d=True)
    assert rate == meta["sample_rate"] == 16000 and samples.shape[1] == len(meta["channels"]) == 2
    return meta, split_channels(numpy_to_pcm16(samples), channels=2)


def spans(segments: list[Segment]) -> list[tuple[int, int]]:
    return [(s.start_ms, s.end_ms) for s in segments]


def test_demo_asset_is_consistent(demo):
    meta, channels = demo
    assert meta["source"].startswith("MELD dev dialogue") and "GPL-3.0" in meta["licence"]
    utts = meta["utterances"]
    assert 6 <= len(utts) <= 10 and {u["channel"] for u in utts} == {0, 1}
    for prev, cur in zip(utts, utts[1:]):
        assert cur["start_ms"] >= prev["end_ms"] + 500  # turns never overlap
    assert (DEMO / "conversation.flac").stat().st_size < 1_000_000


@pytest.mark.parametrize("channel", [0, 1])
def test_demo_one_segment_per_utterance(demo, channel: int):
    meta, channels = demo
    truth = [(u["start_ms"], u["end_ms"]) for u in meta["utterances"] if u["channel"] == channel]
    found = spans(segment_pcm16(channels[channel], 16000))
    assert len(found) == len(truth), (found, truth)
    for (s, e), (ts, te) in zip(found, truth):
        assert abs(s - ts) <= TOLERANCE_MS and abs(e - te) <= TOLERANCE_MS, ((s, e), (ts, te))


def test_demo_with_background_noise(demo):
    """Digital silence is easy; low-level noise (about -50 dBFS) must not merge or invent utterances."""
    meta, channels = demo
    x = np.frombuffer(channels[0], dtype="<i2").astype(np.float64)
    noisy = x + np.random.default_rng(0).normal(0, 100, x.shape)
    found = spans(segment_pcm16(numpy_to_pcm16(np.clip(noisy, -32768, 32767).astype(np.int16)), 16000))
    truth = [(u["start_ms"], u["end_ms"]) for u in meta["utterances"] if u["channel"] == 0]
    assert len(found) == len(truth), (found, truth)
    assert all(abs(s - ts) <= TOLERANCE_MS and abs(e - te) <= TOLERANCE_MS for (s, e), (ts, te) in zip(found, truth))


def test_segment_audio_matches_its_span(demo):
    meta, channels = demo
    for seg in segment_pcm16(channels[1], 16000):
        assert len(seg.pcm) == (seg.end_ms - seg.start_ms) * 16 * 2
        first = seg.start_ms * 16 * 2
        assert seg.pcm == channels[1][first:first + len(seg.pcm)]


def test_chunk_size_does_not_change_segments(demo):
    _, channels = demo
    pcm = channels[1]
    whole = segment_pcm16(pcm, 16000)
    rng = np.random.default_rng(0)
    seg = StreamingSegmenter(VadConfig(), 16000)
    out: list[Segment] = []
    pos = 0
    while pos < len(pcm):  # odd-sized chunks, many ending mid-sample
        n = int(rng.integers(1, 2000)) | 1
        out += seg.push(pcm[pos:pos + n])
        pos += n
    out += seg.flush()
    assert out == whole
    assert segment_pcm16(pcm, 16000, chunk_bytes=1) == whole


def test_segments_are_emitted_while_streaming(demo):
    """An utterance is reported soon after it ends, not only at flush()."""
    meta, channels = demo
    seg = StreamingSegmenter(VadConfig(), 16000)
    first_end = next(u["end_ms"] for u in meta["utterances"] if u["channel"] == 0)
    emitted_at = None
    step = 16 * 2 * 20  # 20 ms chunks
    for pos in range(0, len(channels[0]), step):
        if seg.push(channels[0][pos:pos + step]):
            emitted_at = (pos + step) / 32
            break
    assert emitted_at is not None and emitted_at - first_end < 1000


def test_min_and_max_utterance(demo):
    meta, channels = demo
    long_utt = max(meta["utterances"], key=lambda u: u["end_ms"] - u["start_ms"])
    pcm = channels[long_utt["channel"]]
    cfg = VadConfig(max_utterance_ms=2000)
    pieces = [s for s in segment_pcm16(pcm, 16000, cfg)
              if s.start_ms < long_utt["end_ms"] + 300 and s.end_ms > long_utt["start_ms"] - 300]
    assert len(pieces) >= 3 and all(p.duration_ms <= 2000 for p in pieces)
    assert any(p.forced_split for p in pieces)
    # min_utterance_ms above every utterance length drops them all
    assert segment_pcm16(pcm, 16000, VadConfig(min_utterance_ms=14000, max_utterance_ms=15000)) == []


def test_silence_and_empty_stream_give_nothing():
    assert segment_pcm16(b"\x00\x00" * 16000, 16000) == []
    seg = StreamingSegmenter()
    assert seg.push(b"") == [] and seg.flush() == []
    with pytest.raises(RuntimeError, match="after flush"):
        seg.push(b"\x00\x00")


def test_open_utterance_is_closed_by_flush(demo):
    meta, channels = demo
    u = meta["utterances"][0]
    cut = (u["start_ms"] + u["end_ms"]) // 2 * 32  # stop mid-utterance
    seg = StreamingSegmenter()
    assert seg.push(channels[u["channel"]][:cut]) == [] and seg.in_speech
    (last,) = seg.flush()
    assert abs(last.start_ms - u["start_ms"]) <= TOLERANCE_MS and last.end_ms <= cut / 32


def test_other_vad_rates(demo):
    meta, channels = demo
    x = np.frombuffer(channels[1], dtype="<i2")
    from tracker.audio.pcm import resample

    pcm8k = numpy_to_pcm16(resample(x, 16000, 8000))
    truth = [(u["start_ms"], u["end_ms"]) for u in meta["utterances"] if u["channel"] == 1]
    found = spans(segment_pcm16(pcm8k, 8000))
    assert len(found) == len(truth)


@pytest.mark.parametrize("rate", [44100, 22050, 16001, 0])
def test_unsupported_sample_rate(rate: int):
    with pytest.raises(AudioFormatError, match="not supported by webrtcvad"):
        StreamingSegmenter(VadConfig(), rate)


def test_stream_ending_mid_sample_is_an_error():
    seg = StreamingSegmenter()
    seg.push(b"\x00" * 961)
    with pytest.raises(AudioFormatError, match="odd byte count"):
        seg.flush()


@pytest.mark.parametrize(
    "field, value",
    [("aggressiveness", 4), ("aggressiveness", -1), ("frame_ms", 25), ("padding_ms", 5), ("start_ratio", 0.0),
     ("end_ratio", 1.5), ("min_utterance_ms", -1), ("max_utterance_ms", 100), ("aggressiveness", "2")],
)
def test_bad_config_names_the_field(field: str, value):
    with pytest.raises(ConfigError, match=f"^{field}:"):
        load_dataclass(VadConfig, {field: value})


def test_config_loads_from_mapping():
    cfg = load_dataclass(VadConfig, {"aggressiveness": 3, "frame_ms": 20, "start_ratio": 1})
    assert cfg.aggressiveness == 3 and cfg.frame_ms == 20 and cfg.start_ratio == 1.0 and cfg.window_frames == 15


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_espeak_utterance_in_silence(tmp_path: Path):
    wav = tmp_path / "u.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "160", "-w", str(wav), "The meeting starts at noon."],
                   check=True, capture_output=True)
    speech, _ = read_audio(wav, dtype="int16", target_rate=16000)
    pad = np.zeros(16000, dtype=np.int16)
    segs = segment_pcm16(numpy_to_pcm16(np.concatenate([pad, speech, pad])), 16000)
    assert len(segs) == 1
    assert abs(segs[0].start_ms - 1000) <= TOLERANCE_MS
    assert abs(segs[0].end_ms - (1000 + len(speech) / 16)) <= TOLERANCE_MS
