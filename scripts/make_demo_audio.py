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
from collections import Counter
from pathlib import Path

import soundfile as sf

from tracker.audio.synth import RATE, voice_conversation

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CSV = REPO.parent / "shared" / "data" / "meld" / "dev_sent_emo.csv"
DEFAULT_OUT = REPO / "tracker" / "assets" / "demo"
VOICES = ("en-us+m3", "en-us+f3")  # speaker A, speaker B
SPEED_WPM = 160
GAP_MS = 600  # silence between turns
LEAD_MS = 500  # silence before the first and after the last turn
NEGATIVE = {"anger", "disgust", "fear", "sadness"}


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

    conv = voice_conversation([(r["Speaker"], r["Utterance"]) for r in utts], gap_ms=GAP_MS, lead_ms=LEAD_MS, voices=VOICES)
    meta = []
    for r, span in zip(utts, conv.utterances):
        meta.append({"utterance_id": int(r["Utterance_ID"]), **{k: span[k] for k in ("speaker", "channel", "text")},
                     "label": r["Emotion"], "sentiment": r["Sentiment"], "start_ms": span["start_ms"], "end_ms": span["end_ms"]})
        print(f"  [{span['start_ms']:>6}-{span['end_ms']:>6} ms] ch{span['channel']} {r['Speaker']:<8} "
              f"{r['Emotion']:<8} {span['text']}")
    total = conv.samples.shape[0]

    args.out_dir.mkdir(parents=True, exist_ok=True)
    flac = args.out_dir / "conversation.flac"
    sf.write(flac, conv.samples, RATE, format="FLAC", subtype="PCM_16")
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
