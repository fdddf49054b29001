"""The telephone channel simulation and past-only speaker normalisation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tracker.audio.channel import ChannelConfig, TelephoneChannel, alaw, channel_rng, mulaw
from tracker.audio.speaker_norm import SpeakerNormalizer, SpeakerStats, in_speaker_time_order
from tracker.config import ConfigError, load_dataclass


def chirp(seconds: float = 1.0, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * (100 * t + 3500 * t ** 2))).astype(np.float32)  # 100 Hz .. 7.1 kHz


def band_energy(x: np.ndarray, rate: int, lo: float, hi: float) -> float:
    spec = np.abs(np.fft.rfft(x)) ** 2
    f = np.fft.rfftfreq(len(x), 1 / rate)
    return float(spec[(f >= lo) & (f < hi)].sum())


def test_channel_is_8khz_band_limited_companded_and_seeded():
    ch = TelephoneChannel(ChannelConfig(snr_db=[40.0, 40.0], gain_db=[0.0, 0.0]))
    x = chirp()
    y, rate = ch(x, 16000, 7, "clip-1")
    assert rate == 8000 and y.dtype == np.float32 and abs(len(y) - len(x) // 2) <= 1
    inside = band_energy(y, 8000, 500, 3000)
    assert band_energy(y, 8000, 3800, 4000) < 0.01 * inside and band_energy(y, 8000, 0, 150) < 0.01 * inside
    assert len(np.unique(y)) <= 256  # 8-bit G.711 codes
    y2, _ = ch(x, 16000, 7, "clip-1")
    assert np.array_equal(y, y2)  # same seed and keys: the same copy, whatever was drawn in between
    assert not np.array_equal(y, ch(x, 16000, 7, "clip-2")[0]) and not np.array_equal(y, ch(x, 16000, 8, "clip-1")[0])


def test_channel_noise_is_added_at_the_drawn_snr():
    ch = TelephoneChannel(ChannelConfig(codec="none", gain_db=[0.0, 0.0], snr_db=[10.0, 10.0], noise="white",
                                        low_hz=1.0, high_hz=3999.0, rate=8000))
    x = (0.3 * np.sin(2 * np.pi * 440 * np.arange(8000) / 8000)).astype(np.float32)
    y, _ = ch.apply(x, 8000, channel_rng(0))
    clean, _ = TelephoneChannel(ChannelConfig(codec="none", gain_db=[0.0, 0.0], snr_db=[200.0, 200.0], noise="white",
                                              low_hz=1.0, high_hz=3999.0, rate=8000)).apply(x, 8000, channel_rng(0))
    snr = 10 * np.log10(np.mean(clean ** 2) / np.mean((y - clean) ** 2))
    assert 8.5 < snr < 11.5
    draws = [TelephoneChannel().draw(channel_rng(s)) for s in range(200)]
    assert all(5 <= d["snr_db"] <= 20 and -6 <= d["gain_db"] <= 6 for d in draws)
    assert {d["codec"] for d in draws} == {"mulaw", "alaw"} and {d["noise"] for d in draws} == {"white", "pink"}


def test_companding_round_trips_within_a_quantisation_step():
    x = np.linspace(-1, 1, 2001).astype(np.float32)
    for codec in (mulaw, alaw):
        y = codec(x)
        assert np.all(np.abs(y - x) <= 0.04) and np.abs(y[1000]) < 1e-3  # fine steps near 0, coarse near 1
        assert np.abs(codec(np.float32([0.01]))[0] - 0.01) < 0.001


def test_channel_config_is_validated():
    with pytest.raises(ConfigError, match="snr_db"):
        load_dataclass(ChannelConfig, {"snr_db": [20, 5]})
    with pytest.raises(ConfigError, match="high_hz"):
        load_dataclass(ChannelConfig, {"high_hz": 5000})
    with pytest.raises(ConfigError, match="codec"):
        load_dataclass(ChannelConfig, {"codec": "gsm"})


def test_speaker_normalisation_reads_only_past_utterances():
    rng = np.random.default_rng(0)
    norm = SpeakerNormalizer(np.zeros(4), np.ones(4))
    utts = [rng.normal(3.0, 2.0, size=(rng.integers(1, 5), 4)) for _ in range(8)]

    def run(seq):
        stats = norm.new_stats()
        return [norm.step(u, stats) for u in seq]

    base = run(utts)
    np.testing.assert_array_equal(base[0], utts[0].astype(np.float32))  # no past: global statistics = identity
    for k in range(1, 8):
        changed = list(utts)
        changed[k] = utts[k] + 100.0  # utterance k itself
        for j in range(k + 1, 8):
            changed[j] = rng.normal(size=utts[j].shape) * 50  # and everything after it
        out = run(changed)
        for i in range(k):
            np.testing.assert_array_equal(out[i], base[i])  # earlier outputs cannot see later utterances
        np.testing.assert_allclose(out[k], base[k] + 100.0 * norm.global_std / np.sqrt(
            _blend_var(norm, utts[:k])), rtol=1e-5)  # utterance k is mapped with the statistics of 0..k-1 only


def _blend_var(norm: SpeakerNormalizer, past: list[np.ndarray]) -> np.ndarray:
    frames = np.concatenate(past)
    w = len(past) / (len(past) + norm.prior)
    return w * frames.var(0) + (1 - w) * norm.global_std ** 2


def test_speaker_normalisation_moves_a_shifted_speaker_towards_the_global_distribution():
    rng = np.random.default_rng(1)
    norm = SpeakerNormalizer(np.zeros(3), np.ones(3), prior=1.0)
    stats = norm.new_stats()
    outs = [norm.step(rng.normal(10.0, 0.5, size=(1, 3)), stats) for _ in range(60)]
    late = np.concatenate(outs[30:])
    # raw features sit 10 global sds away; mapped, they land within one (the prior keeps a little shrinkage)
    assert np.abs(late.mean(0)).max() < 1.0 and np.abs(late.std(0) - 1).max() < 0.5
    assert stats.utterances == 60 and stats.frames == 60


def test_speaker_stats_match_batch_statistics_and_serialize():
    rng = np.random.default_rng(2)
    chunks = [rng.normal(size=(n, 5)) for n in (3, 1, 7, 2)]
    st = SpeakerStats(5)
    for c in chunks:
        st.update(c)
    frames = np.concatenate(chunks)
    np.testing.assert_allclose(st.mean, frames.mean(0), rtol=1e-10)
    np.testing.assert_allclose(st.var, frames.var(0), rtol=1e-10)
    d = json.loads(json.dumps(st.to_dict()))  # JSON-safe, as a Redis hash field would hold it
    back = SpeakerStats.from_dict(d)
    assert back.utterances == 4 and back.frames == 13
    np.testing.assert_allclose(back.mean, st.mean, rtol=1e-6)
    np.testing.assert_allclose(back.m2, st.m2, rtol=1e-6)
    for bad in ({**d, "mean": d["mean"][:-8]}, {**d, "utterances": -1}, {"dim": 5}):
        with pytest.raises(ValueError, match="speaker stats: malformed"):
            SpeakerStats.from_dict(bad)


def test_speaker_time_order_is_seeded_and_keeps_conversations_whole():
    items = [(spk, conv, i) for spk in "AB" for conv in range(5) for i in range(3)]
    a = in_speaker_time_order(items, lambda t: t[0], lambda t: (t[0], t[1]), seed=0)
    assert a == in_speaker_time_order(items, lambda t: t[0], lambda t: (t[0], t[1]), seed=0)
    assert a != in_speaker_time_order(items, lambda t: t[0], lambda t: (t[0], t[1]), seed=1)
    assert sorted(a) == sorted(items)
    for spk in "AB":
        convs = [t[1] for t in a if t[0] == spk]
        assert [t[2] for t in a if t[0] == spk] == [0, 1, 2] * 5  # utterances of a conversation stay in order
        assert all(convs[3 * k] == convs[3 * k + 2] for k in range(5))
