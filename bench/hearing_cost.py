"""What one recognized utterance costs the FeatureExtractor: the served model's features vs speech recognition.

`tracker.audio.hearing.Hearing` answers one request per utterance with both the acoustic features
(each source on the utterance's real length) and the transcript (Whisper on the padded 30 s
window). This measures the two parts on the bundled demo call's utterances, as recorded (16 kHz)
and at 8 kHz, single requests and batches of 8 (as the service batches them across calls).

    nice -n 5 python bench/hearing_cost.py --sources egemaps_functionals whisper_base_l4_meanstd whisper_tiny.en_l2_meanstd
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tracker.audio.asr import AsrConfig, word_error_rate  # noqa: E402
from tracker.audio.features import FeatureExtractorConfig  # noqa: E402
from tracker.audio.hearing import Hearing, HearRequest  # noqa: E402
from tracker.audio.pcm import float_to_int16, resample  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "tracker" / "assets" / "demo"


def utterances(rate: int) -> tuple[list[HearRequest], list[str]]:
    meta = json.loads((DEMO / "conversation.json").read_text())
    x, sr = sf.read(DEMO / "conversation.flac", dtype="float32", always_2d=True)
    reqs, texts = [], []
    for u in meta["utterances"]:
        clip = x[u["start_ms"] * sr // 1000:u["end_ms"] * sr // 1000, meta["channels"].index(u["speaker"])]
        if rate != sr:
            clip = resample(clip, sr, rate)
        reqs.append(HearRequest(float_to_int16(clip).tobytes(), rate))
        texts.append(u["text"])
    return reqs, texts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sources", nargs="+", default=["egemaps_functionals", "whisper_base_l4_meanstd", "whisper_tiny.en_l2_meanstd"])
    ap.add_argument("--model", default="tiny.en")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--beam-size", type=int, default=5)
    args = ap.parse_args()
    hearing = Hearing({s: s for s in args.sources}, FeatureExtractorConfig(use_cache=False),  # as the service: no disk cache
                      asr=AsrConfig(model=args.model, threads=args.threads, beam_size=args.beam_size))
    print(f"features: {', '.join(args.sources)}; recognizer: {args.model}, {hearing.recognizer.compute_type}, "
          f"{args.threads} thread(s), beam {args.beam_size}")
    for rate in (16000, 8000):
        reqs, texts = utterances(rate)
        hearing.hear(reqs[:1])  # warm-up: loads and caches nothing that counts below (feature caches are off)
        per_source = {}
        for s in args.sources:
            ex = hearing.features._extractors[s]
            t0 = time.perf_counter()
            for r in reqs:
                ex.process_signal(np.frombuffer(r.pcm, "<i2"), r.sample_rate)
            per_source[s] = (time.perf_counter() - t0) / len(reqs)
        rec = hearing.recognizer
        t0 = time.perf_counter()
        single = [rec.transcribe([(np.frombuffer(r.pcm, "<i2"), r.sample_rate)])[0] for r in reqs]
        t_single = (time.perf_counter() - t0) / len(reqs)
        t0 = time.perf_counter()
        batched = rec.transcribe([(np.frombuffer(r.pcm, "<i2"), r.sample_rate) for r in reqs])
        t_batch = (time.perf_counter() - t0) / len(reqs)
        wer = word_error_rate(texts, [t.text for t in batched])
        print(f"\n{rate} Hz, {len(reqs)} utterances (mean {np.mean([len(r.pcm) / 2 / r.sample_rate for r in reqs]):.2f} s):")
        for s, t in per_source.items():
            print(f"  features {s:<32s} {1000 * t:8.1f} ms / utterance")
        print(f"  features, all sources                   {1000 * sum(per_source.values()):8.1f} ms / utterance")
        print(f"  recognition, one request at a time      {1000 * t_single:8.1f} ms / utterance")
        print(f"  recognition, batched ({rec.config.max_batch_size} per pass)         {1000 * t_batch:8.1f} ms / utterance  (WER {100 * wer:.1f}%)")
        print(f"  mean asr_confidence {np.mean([t.confidence for t in batched]):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
