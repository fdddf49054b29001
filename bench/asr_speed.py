"""Speech recognition and Whisper encoder cost on this machine: word error rate, real-time factor, encoder ms.

1. The bundled demo call (tracker/assets/demo: 10 utterances, 30 s of espeak-ng speech, two
   voices) transcribed utterance by utterance with `SpeechRecognizer` (tiny.en and base, int8 on CPU,
   beam 5), with 1 and 2 CTranslate2 threads, batched (all utterances in one `transcribe` call,
   rows of 8) and not (one call per utterance); word error rate against conversation.json; real-time
   factor = compute seconds / audio seconds (median of `--repeats`). Also on the telephone-band copy
   of the call (8 kHz, `tracker.audio.channel`, fixed seed) and, for reference, faster-whisper's own
   `WhisperModel.transcribe` (its default decoding, one utterance at a time).
2. Encoder cost per utterance: CTranslate2 `encode` of the utterance's real length (what the acoustic
   modality runs) vs the padded 30 s window (what recognition runs), per model, int8, 1 thread.

    python bench/asr_speed.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from tracker.audio.asr import AsrConfig, SpeechRecognizer, word_error_rate
from tracker.audio.channel import TELEPHONE_DEV_SEED, TelephoneChannel
from tracker.audio.whisper_features import MAX_FRAMES, log_mel
from tracker.audio.whisper_models import ensure_whisper_model

DEMO = Path(__file__).resolve().parents[1] / "tracker" / "assets" / "demo"


def demo_call(telephone: bool = False) -> tuple[list[tuple[np.ndarray, int]], list[str]]:
    doc = json.loads((DEMO / "conversation.json").read_text())
    audio, sr = sf.read(str(DEMO / "conversation.flac"), dtype="float32")
    channel = TelephoneChannel()
    utts = []
    for u in doc["utterances"]:
        x = audio[u["start_ms"] * sr // 1000:u["end_ms"] * sr // 1000, u["channel"]]
        utts.append(channel(x, sr, TELEPHONE_DEV_SEED, "demo", u["utterance_id"]) if telephone else (x, sr))
    return utts, [u["text"] for u in doc["utterances"]]


def timed(fn, repeats: int):
    out, times = None, []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def recognition(args) -> None:
    utts, refs = demo_call()
    tel, _ = demo_call(telephone=True)
    seconds = sum(len(x) / r for x, r in utts)
    print(f"demo call: {len(utts)} utterances, {seconds:.1f} s of speech\n")
    print("| model | threads | calls | WER recorded | WER telephone 8 kHz | compute s | real-time factor |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for model in args.models:
        for threads in (1, 2):
            rec = SpeechRecognizer(AsrConfig(model=model, threads=threads))
            rec.transcribe(utts[:1])  # warm-up
            for batched in (True, False):
                def run(data=utts):
                    return rec.transcribe(data) if batched else [rec.transcribe_one(x, r) for x, r in data]

                out, dt = timed(run, args.repeats)
                wer = word_error_rate(refs, [t.text for t in out])
                wer_tel = word_error_rate(refs, [t.text for t in run(tel)]) if batched else float("nan")
                tel_cell = f"{100 * wer_tel:.1f}%" if batched else "same as batched"
                print(f"| {model} | {threads} | {'batched (rows of 8)' if batched else 'one per utterance'} | "
                      f"{100 * wer:.1f}% | {tel_cell} | {dt:.2f} | {dt / seconds:.3f} |", flush=True)
        fw = rec.whisper  # faster-whisper's own loop, same model, 2 threads

        def reference():
            return [" ".join(s.text for s in fw.transcribe(x, language="en", beam_size=5, vad_filter=False,
                                                           condition_on_previous_text=False)[0]) for x, _ in utts]

        texts, dt = timed(reference, 1)
        print(f"| {model} (faster-whisper `transcribe`) | 2 | one per utterance | {100 * word_error_rate(refs, texts):.1f}% | "
              f"- | {dt:.2f} | {dt / seconds:.3f} |", flush=True)


def encoder_cost(args) -> None:
    import ctranslate2

    utts, _ = demo_call()
    mels = [log_mel(x) for x, _ in utts]
    mels = [m[:, : m.shape[1] // 2 * 2] for m in mels]
    print("\n| model | mean utterance | encode, real length (ms) | encode, 30 s window (ms) | window / real |")
    print("|---|---:|---:|---:|---:|")
    for model in args.models:
        m = ctranslate2.models.Whisper(str(ensure_whisper_model(model)), compute_type="int8", intra_threads=1)

        def encode(mel):
            return m.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(mel[None], dtype=np.float32)))

        real, window = [], []
        for mel in mels:
            encode(mel)
            real.append(timed(lambda: encode(mel), args.repeats)[1])
            padded = np.pad(mel, ((0, 0), (0, MAX_FRAMES - mel.shape[1])))
            window.append(timed(lambda: encode(padded), args.repeats)[1])
        dur = np.mean([mel.shape[1] / 100 for mel in mels])
        print(f"| {model} | {dur:.1f} s | {1000 * np.mean(real):.1f} | {1000 * np.mean(window):.1f} | "
              f"{np.mean(window) / np.mean(real):.1f}x |", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny.en", "base"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip", nargs="*", default=[], choices=["recognition", "encoder"])
    args = ap.parse_args()
    if "recognition" not in args.skip:
        recognition(args)
    if "encoder" not in args.skip:
        encoder_cost(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
