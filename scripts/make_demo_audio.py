#!/usr/bin/env python
"""Generate the demo conversation shipped in tracker/assets/demo/.

Takes one real MELD dev dialogue, voices each utterance with espeak-ng (one voice per speaker),
and lays the turns out on a stereo 16 kHz PCM16 timeline (channel 0 = speaker A, the first to
speak; channel 1 = speaker B) with a fixed silence between turns. Writes ``conversation.flac`` and
``conversation.json`` (texts, MELD gold labels and the exact sample spans of each utterance).

The dialogue is chosen deterministically: the lowest Dialogue_ID in dev_sent_emo.csv with exactly
two speakers, each speaking at least twice, 6-10 utterances, at least three distinct emotions and
at least one negative emotion (anger, disgust, fear, sadness).

Usage: python scripts/make_demo_audio.py [--meld-csv PATH] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import soundfile as sf

from tracker.audio.pcm import float_to_int16, read_audio

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CSV = REPO.parent / "shared" / "data" / "meld" / "dev_sent_emo.csv"
DEFAULT_OUT = REPO / "tracker" / "assets" / "demo"
RATE = 16000
VOICES = ("en-us+m3", "en-us+f3")  # speaker A, speaker B
SPEED_WPM = 160
GAP_MS = 600  # silence between turns
LEAD_MS = 500  # silence before the first and after the last turn
NEGATIVE = {"anger", "disgust", "fear", "sadness"}
TRIM_DBFS = -45.0  # espeak's own leading/trailing silence is cut at this level (10 ms windows)
PEAK = 0.7  # each voiced clip is normalised to this peak


def choose_dialogue(rows: list[dict[str, str]]) -> tuple[int, list[dict[str, str]]]:
    dialogues: dict[int, list[dict[str, str]]] = {}
    for row in rows:
        dialogues.setdefault(int(row["Dialogue_ID"]), []).append(row)
    for did in sorted(dialogues):
        utts = sorted(dialogues[did], key=lambda r: int(r["Utterance_ID"]))
        speakers = Counter(r["Speaker"] for r in utts)
        emotions = {r["Emotion"] for r in utts}
        if (len(speakers) == 2 and min(speakers.values()) >= 2 and 6 <= len(utts) <= 10
                and len(emotions) >= 3 and emotions & NEGATIVE):
            return did, utts
    raise SystemExit("no MELD dev dialogue matches the selection rule")


def clean_text(text: str) -> str:
    """MELD text has curly quotes and stray mojibake; espeak reads plain ASCII more reliably."""
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
    text = text.replace("\u2026", "...").replace("\u2014", " - ").replace("\u2013", " - ")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return " ".join(text.split())


def voice(text: str, voice_name: str, workdir: Path) -> np.ndarray:
    """espeak-ng to a WAV, read back as float32 16 kHz mono, silence trimmed, peak-normalised."""
    txt, wav = workdir / "utt.txt", workdir / "utt.wav"
    txt.write_text(text, encoding="utf-8")  # -f: text starting with '-' is not taken as an option
    subprocess.run(["espeak-ng", "-v", voice_name, "-s", str(SPEED_WPM), "-w", str(wav), "-f", str(txt)],
                   check=True, capture_output=True)
    samples, _ = read_audio(wav, dtype="float32", target_rate=RATE, mono=True)
    samples = trim_silence(samples)
    peak = float(np.max(np.abs(samples))) if samples.size else 0.0
    if peak <= 0:
        raise SystemExit(f"espeak-ng produced silence for {text!r}")
    return samples * (PEAK / peak)


def trim_silence(x: np.ndarray, win: int = RATE // 100) -> np.ndarray:
    n = len(x) // win
    rms = np.sqrt(np.mean(x[: n * win].reshape(n, win).astype(np.float64) ** 2, axis=1) + 1e-20)
    loud = np.flatnonzero(20 * np.log10(rms) > TRIM_DBFS)
    if loud.size == 0:
        return x
    return x[loud[0] * win:(loud[-1] + 1) * win]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--meld-csv", type=Path, default=DEFAULT_CSV)
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng not found: apt-get install -y espeak-ng")
    with open(args.meld_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    did, utts = choose_dialogue(rows)
    speakers = list(dict.fromkeys(r["Speaker"] for r in utts))  # order of first appearance
    print(f"chose MELD dev dialogue {did}: {len(utts)} utterances, speakers {speakers}")

    clips = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in utts:
            ch = speakers.index(r["Speaker"])
            text = clean_text(r["Utterance"])
            clips.append((r, ch, text, voice(text, VOICES[ch], Path(tmp))))

    gap, lead = RATE * GAP_MS // 1000, RATE * LEAD_MS // 1000
    total = lead + sum(len(c[3]) for c in clips) + gap * (len(clips) - 1) + lead
    audio = np.zeros((total, 2), dtype=np.float32)
    pos, meta = lead, []
    for r, ch, text, samples in clips:
        audio[pos:pos + len(samples), ch] = samples
        meta.append({"utterance_id": int(r["Utterance_ID"]), "speaker": r["Speaker"], "channel": ch,
                     "text": text, "label": r["Emotion"], "sentiment": r["Sentiment"],
                     "start_ms": round(pos * 1000 / RATE), "end_ms": round((pos + len(samples)) * 1000 / RATE)})
        print(f"  [{meta[-1]['start_ms']:>6}-{meta[-1]['end_ms']:>6} ms] ch{ch} {r['Speaker']:<8} "
              f"{r['Emotion']:<8} {text}")
        pos += len(samples) + gap

    args.out_dir.mkdir(parents=True, exist_ok=True)
    flac = args.out_dir / "conversation.flac"
    sf.write(flac, float_to_int16(audio), RATE, format="FLAC", subtype="PCM_16")
    espeak_version = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout
    espeak_version = espeak_version.split("Data at:")[0].strip().rstrip(":").strip() or "espeak-ng"
    doc = {
        "source": f"MELD dev dialogue {did}",
        "licence": "Text and emotion labels from MELD (Poria et al., 2019; https://github.com/declare-lab/MELD), "
                   "released under GPL-3.0; the audio is synthetic (espeak-ng), not the original recordings.",
        "generator": f"scripts/make_demo_audio.py ({espeak_version}; voices {', '.join(VOICES)}, {SPEED_WPM} wpm)",
        "sample_rate": RATE,
        "channels": speakers,
        "duration_ms": round(total * 1000 / RATE),
        "utterances": meta,
    }
    (args.out_dir / "conversation.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {flac} ({flac.stat().st_size / 1024:.0f} KiB, {total / RATE:.1f} s) and conversation.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
