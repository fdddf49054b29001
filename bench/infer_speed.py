"""Inference speed of the recognizer on real MELD dev utterances: batch 1 and 8, fp32 against bf16.

Usage: python bench/infer_speed.py [--backbone gemma3-270m] [--n 48] [--checkpoint DIR]
Prints utterances/s and ms/utterance for each (dtype, batch) and the bf16/fp32 speed ratio.
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

import torch

from tracker.model.backbone import load_backbone
from tracker.types import Turn, UtteranceInput
from tracker.model.recognizer import EmotionRecognizer, RecognizerConfig


def meld_dev_items(n: int, context_turns: int = 3) -> list[UtteranceInput]:
    data = Path(os.environ.get("TRACKER_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    rows = list(csv.DictReader(open(data / "meld" / "dev_sent_emo.csv", encoding="utf-8")))
    rows.sort(key=lambda r: (int(r["Dialogue_ID"]), int(r["Utterance_ID"])))
    items, history = [], {}
    for r in rows:
        past = history.setdefault(r["Dialogue_ID"], [])
        items.append(UtteranceInput(r["Utterance"], r["Speaker"], tuple(past[-context_turns:])))
        past.append(Turn(r["Speaker"], r["Utterance"]))
        if len(items) == n:
            break
    return items


def time_predict(rec: EmotionRecognizer, items: list[UtteranceInput], batch_size: int) -> float:
    rec.predict_proba(items[: batch_size * 2], batch_size=batch_size)  # warm-up
    start = time.perf_counter()
    rec.predict_proba(items, batch_size=batch_size)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--backbone", default="gemma3-270m")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--n", type=int, default=48)
    args = ap.parse_args()
    items = meld_dev_items(args.n)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {len(items)} MELD dev utterances, backbone {args.backbone}")
    results = {}
    for dtype in ("fp32", "bf16"):
        backbone = load_backbone(args.backbone, dtype=dtype)
        if args.checkpoint:
            rec = EmotionRecognizer.from_pretrained(args.checkpoint, backbone=backbone)
        else:
            torch.manual_seed(0)
            rec = EmotionRecognizer(backbone, RecognizerConfig(backbone=args.backbone))
        for bs in (1, 8):
            secs = time_predict(rec, items, bs)
            results[(dtype, bs)] = secs
            print(f"{dtype:5s} batch {bs}: {len(items) / secs:7.2f} utt/s  {1000 * secs / len(items):8.1f} ms/utt")
        del rec, backbone
    for bs in (1, 8):
        print(f"bf16 vs fp32 speed-up at batch {bs}: {results[('fp32', bs)] / results[('bf16', bs)]:.2f}x")
    print(f"batch 8 vs batch 1 speed-up (bf16): {results[('bf16', 1)] / results[('bf16', 8)]:.2f}x")


if __name__ == "__main__":
    main()
