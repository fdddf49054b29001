#!/usr/bin/env python
"""Expected calibration error (15 bins) of a checkpoint before and after a temperature, per dev set.

`tracker calibrate` fits the temperature on a dev set and reports ECE on that same set, which flatters
it a little. This script also gives a held-out figure for the fit set: its dialogues are split in two
halves (alternately, in their order), the temperature is fitted on one half and ECE taken on the
other, both ways, pooled (the same 2-fold scheme as bench/refine_eval.py). Other dev sets are scored
at the temperature of the calibration JSON, which never saw them.

    python bench/calibration_eval.py --checkpoint <uncalibrated ckpt> --calibration calibration.json \\
        --data meld:dev --data ravdess:dev --data ravdess:dev+telephone --fit-on meld:dev
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from tracker.metrics import calibration_report
from tracker.model.recognizer import EmotionRecognizer
from tracker.training.calibrate import fit_temperature, rescale
from tracker.training.evaluate import predict_examples, spec_examples


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="the checkpoint as trained (its stored temperature is 'before')")
    ap.add_argument("--calibration", required=True, help="`tracker calibrate --json` output (its temperature is 'after')")
    ap.add_argument("--data", action="append", required=True)
    ap.add_argument("--fit-on", default="meld:dev", help="the set the temperature was fitted on (gets the 2-fold figure)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rec = EmotionRecognizer.from_pretrained(args.checkpoint)
    t0 = rec.config.temperature
    t1 = float(json.loads(Path(args.calibration).read_text())["temperature"])
    factor = t1 / t0
    out = {"checkpoint": args.checkpoint, "temperature_before": t0, "temperature_after": t1, "data": {}}
    print("| dev set | utterances | ECE before (T %.3f) | ECE after (T %.3f) | 2-fold ECE after (fit on one half of the dialogues) |" % (t0, t1))
    print("|---|---:|---:|---:|---:|")
    for spec in args.data:
        examples = spec_examples(rec, spec)
        probs = predict_examples(rec, examples, args.batch_size)  # (N, L) at the stored temperature
        gold = np.array([ex.label for ex in examples])
        row = {"n": len(gold), "ece_before": calibration_report(probs, gold).ece,
               "ece_after": calibration_report(rescale(probs, factor), gold).ece}
        if spec == args.fit_on:
            groups = sorted({ex.group for ex in examples}, key=[ex.group for ex in examples].index)
            half = {g: i % 2 for i, g in enumerate(groups)}
            fold = np.array([half[ex.group] for ex in examples])
            pooled, temps = np.zeros_like(probs), []
            for f in (0, 1):
                fit = fit_temperature(probs[fold == f], gold[fold == f], current=t0)
                temps.append(fit.temperature)
                pooled[fold != f] = rescale(probs[fold != f], fit.factor)
            row["ece_after_2fold"] = calibration_report(pooled, gold).ece
            row["temperatures_2fold"] = temps
        out["data"][spec] = row
        twofold = (f"{100 * row['ece_after_2fold']:.2f} (T {row['temperatures_2fold'][0]:.3f} / {row['temperatures_2fold'][1]:.3f})"
                   if "ece_after_2fold" in row else "-")
        print(f"| {spec} | {row['n']} | {100 * row['ece_before']:.2f} | {100 * row['ece_after']:.2f} | {twofold} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
