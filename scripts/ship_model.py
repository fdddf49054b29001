#!/usr/bin/env python
"""Copy a trained checkpoint into the package as the default model and write its model card.

Evaluates it on MELD dev and RAVDESS dev (folded to MELD's 7 labels) with the same code as
`tracker eval`, and writes tracker/assets/model/{config.json, model.safetensors, eval.json, README.md}.

Usage: python scripts/ship_model.py --checkpoint runs/default/best [--run-dir runs/default]
           [--calibration calibrate.json] [--calibration-eval calibration_eval.json] [--reliability PNG]
           [--callcenter callcenter.json] [--trained-at COMMIT]
       python scripts/ship_model.py --card-only [...]   # rewrite README.md from the shipped eval.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from datetime import date
from pathlib import Path

from tracker.model.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from tracker.model.default import SHIPPED
from tracker.model.recognizer import EmotionRecognizer
from tracker.metrics import calibration_report
from tracker.training.evaluate import evaluate, spec_examples

DEV = ["meld:dev", "ravdess:dev", "ravdess:dev+telephone"]  # RAVDESS read as meld7; +telephone: the telephone-band copy
RELIABILITY_PNG = "reliability-meld-dev.png"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="the checkpoint to ship (not with --card-only)")
    ap.add_argument("--run-dir", default=None, help="the training run (for its history and config)")
    ap.add_argument("--calibration", default=None, help="the JSON of `tracker calibrate --json` (ECE before/after in the card)")
    ap.add_argument("--calibration-eval", default=None,
                    help="the JSON of bench/calibration_eval.py (ECE before/after on every dev set, 2-fold on the fit set)")
    ap.add_argument("--reliability", default=None, help="the reliability diagram of `tracker calibrate --plot` (copied in)")
    ap.add_argument("--callcenter", default=None, help="the JSON of bench/callcenter.py --json (false alarms and hits)")
    ap.add_argument("--trained-at", default="", help="the commit the training run ran (default: unknown)")
    ap.add_argument("--previous-eval", default=None,
                    help="`tracker eval --json` of the replaced adapter on more dev sets (added to its comparison rows)")
    ap.add_argument("--target", action="append", default=[], metavar="SPEC/METRIC>=X",
                    help="a target set for this model, e.g. meld:dev/weighted_f1>=0.61 or meld:dev/ece<=0.05 (card: met or not)")
    ap.add_argument("--card-only", action="store_true",
                    help="keep the shipped weights and eval.json, only rewrite README.md (and copy the JSONs in)")
    args = ap.parse_args()
    if args.card_only:
        src = SHIPPED
        saved = json.loads((SHIPPED / "eval.json").read_text())
        rec = EmotionRecognizer.from_pretrained(src)
        reports = saved["reports"]
    else:
        if not args.checkpoint:
            ap.error("--checkpoint is required (or --card-only)")
        src = Path(args.checkpoint)
        rec = EmotionRecognizer.from_pretrained(src)
        reports = {}
        for spec in DEV:
            examples = spec_examples(rec, spec)
            report, probs = evaluate(rec, examples, batch_size=8)
            reports[spec] = report.to_dict()
            reports[spec]["ece"] = calibration_report(probs, [ex.label for ex in examples]).ece  # 15 bins, at the stored temperature
            reports[spec]["mean_confidence"] = float(probs.max(1).mean())  # above the accuracy = overconfident
            print(f"== {spec} (ECE {100 * reports[spec]['ece']:.2f}%)\n{report.to_text()}\n")
        SHIPPED.mkdir(parents=True, exist_ok=True)
        if (SHIPPED / "eval.json").exists():  # the adapter being replaced, for the card's comparison
            old = json.loads((SHIPPED / "eval.json").read_text())
            saved = {"previous": {k: {m: v[m] for m in ("n", "accuracy", "weighted_f1", "macro_f1") if m in v}
                                  for k, v in old["reports"].items()}}
            if (SHIPPED / WEIGHTS_NAME).exists():
                import hashlib

                saved["previous"]["weights_sha1"] = hashlib.sha1((SHIPPED / WEIGHTS_NAME).read_bytes()).hexdigest()[:10]
        else:
            saved = {}
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            shutil.copyfile(src / name, SHIPPED / name)
    history, steps, run_config = [], None, {}
    if args.run_dir and (Path(args.run_dir) / "config.yaml").exists():
        import yaml

        run_config = yaml.safe_load((Path(args.run_dir) / "config.yaml").read_text()) or {}
    if args.run_dir and (Path(args.run_dir) / "last" / "trainer_state.json").exists():
        state = json.loads((Path(args.run_dir) / "last" / "trainer_state.json").read_text())
        history = state.get("history", [])
        scored = [h for h in history if "meld:dev/weighted_f1" in h]
        if run_config.get("select_on") == "mean":
            sets = run_config.get("select_sets") or sorted({k.rsplit("/", 1)[0] for k in scored[0] if k.endswith("/weighted_f1")})
            key = lambda h: sum(h.get(f"{s}/weighted_f1", 0.0) for s in sets) / len(sets)
        else:
            key = lambda h: h["meld:dev/weighted_f1"]
        steps = max(scored, key=key)["step"] if scored else None  # the best one
    if args.card_only and not history:
        history, steps = saved.get("history", []), saved.get("step")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    extras = {}
    for name, path in (("calibration", args.calibration), ("calibration_eval", args.calibration_eval), ("callcenter", args.callcenter)):
        if path:
            extras[name] = json.loads(Path(path).read_text())
            (SHIPPED / f"{name}.json").write_text(json.dumps(extras[name], indent=2) + "\n")
        elif args.card_only and (SHIPPED / f"{name}.json").exists():  # shipped earlier
            extras[name] = json.loads((SHIPPED / f"{name}.json").read_text())
    if args.reliability:
        shutil.copyfile(args.reliability, SHIPPED / RELIABILITY_PNG)
    previous = saved.get("previous")
    if args.previous_eval and previous is not None:
        for spec, r in json.loads(Path(args.previous_eval).read_text())["reports"].items():
            previous[spec] = {m: r[m] for m in ("n", "accuracy", "weighted_f1", "macro_f1")}
    (SHIPPED / "eval.json").write_text(json.dumps({"reports": reports, "history": history, "step": steps, "previous": previous,
                                                   "targets": args.target or saved.get("targets", [])}, indent=2))
    (SHIPPED / "README.md").write_text(model_card(
        rec, reports, history, steps, commit, run_config, extras.get("calibration"), trained_at=args.trained_at,
        calibration_eval=extras.get("calibration_eval"), callcenter=extras.get("callcenter"),
        reliability=(SHIPPED / RELIABILITY_PNG).exists(), previous=previous,
        targets=args.target or saved.get("targets", [])))
    print(f"shipped {src} -> {SHIPPED}")
    return 0


def model_card(rec: EmotionRecognizer, reports: dict, history: list, steps: int | None, commit: str,
               run_config: dict | None = None, calibration: dict | None = None, *, trained_at: str = "",
               calibration_eval: dict | None = None, callcenter: dict | None = None, reliability: bool = False,
               previous: dict | None = None, targets: list[str] | None = None) -> str:
    a = rec.config.adapter
    p = rec.config.prompt
    run_config = run_config or {}
    repeats = {src.get("spec"): src.get("repeat", 1) for src in run_config.get("train", [])}
    rav_times = {1: "once", 2: "twice"}.get(repeats.get("ravdess:train", 1), f"{repeats.get('ravdess:train', 1)} times")
    channel = next((src.get("channel") for src in run_config.get("train", []) if src.get("channel")), None)
    sets = run_config.get("select_sets") or ["meld:dev", "ravdess:dev"]
    selection = (f"highest mean weighted F1 over {', '.join(sets)}" if run_config.get("select_on") == "mean"
                 else "best MELD dev weighted F1")
    modalities = ", ".join(f"{m.name} ({m.source}, {m.feature_dim} features"
                           + (", speaker-normalised (past-only)" if getattr(m, "speaker_norm", False) else "") + ")"
                           for m in a.modalities)
    uses_whisper = any(str(m.source).startswith("whisper") for m in a.modalities)
    uses_egemaps = any(str(m.source).startswith("egemaps") for m in a.modalities)
    loss = run_config.get("loss", "ce")
    loss_text = {"ce": "cross-entropy", "focal": f"focal loss (gamma {run_config.get('focal_gamma', 2.0)})",
                 "logit_adjusted": f"logit-adjusted cross-entropy (tau {run_config.get('logit_adjust_tau', 1.0)})"}.get(loss, loss)
    weighting = run_config.get("class_weighting", "inverse_sqrt")
    last_step = history[-1]["step"] if history else None
    if steps is None:
        trained = "after ? optimiser steps"
    elif last_step is not None and steps != last_step:
        trained = f"the checkpoint of step {steps} of {last_step}"
    else:
        trained = f"after {steps} optimiser steps"
    epochs = f", {run_config['epochs']:g} epochs" if run_config.get("epochs") else ""
    code = (f"training code at commit {trained_at}, card written at {commit}" if trained_at
            else f"card written at commit {commit}")
    context = (f"`{p.layout}` layout, the last {p.context_min_turns}-{p.context_turns} turns: the window slides in blocks, "
               f"so a live call's prefix can be cached" if p.layout == "context_first" and p.context_min_turns
               else f"`{p.layout}` layout, up to {p.context_turns} turns")
    aux = ""
    if run_config.get("init_from"):
        aux += (f"\n- Warm start: `init_from: {run_config['init_from']}` (the adapter shipped before this one; tensors "
                f"new to this architecture, such as the Whisper encoders, start fresh).")
    if run_config.get("aux_loss_weight") or run_config.get("encoder_warmup_epochs"):
        aux += (f"\n- Acoustic training: the encoders and their auxiliary classifiers were first trained alone for "
                f"{run_config.get('encoder_warmup_epochs', 0)} epochs (no LLM), then an auxiliary loss (weight "
                f"{run_config.get('aux_loss_weight', 0)}) stayed on during the main training.")
    if channel:
        codec = {"random": "mu-law or A-law", "mulaw": "mu-law", "alaw": "A-law", "none": "no"}.get(channel.get("codec", "random"), channel.get("codec"))
        gain, snr = channel.get("gain_db", [-6, 6]), channel.get("snr_db", [5, 20])
        aux += (f"\n- Telephone robustness: {100 * float(channel.get('probability', 1.0)):.0f}% of the RAVDESS clips of an "
                f"epoch go through a simulated telephone channel ({channel.get('rate', 8000) / 1000:g} kHz, "
                f"{channel.get('low_hz', 300):g}-{channel.get('high_hz', 3400):g} Hz band, {codec} "
                f"companding, gain {gain[0]:g}..{gain[1]:g} dB, noise at {snr[0]:g}-{snr[1]:g} dB SNR; one of "
                f"{channel.get('variants', 4)} seeded variants per epoch; tracker/audio/channel.py).")
    meld, rav = reports["meld:dev"], reports["ravdess:dev"]
    tel = reports.get("ravdess:dev+telephone")

    def row(name: str, r: dict) -> str:
        return (f"| {name} | {r['n']} | {100 * r['accuracy']:.2f} | {100 * r['weighted_f1']:.2f} | {100 * r['macro_f1']:.2f} "
                f"| {100 * r.get('ece', float('nan')):.2f} |")

    def per_class(r: dict) -> str:
        return "\n".join(f"| {lab} | {100 * c['precision']:.1f} | {100 * c['recall']:.1f} | {100 * c['f1']:.1f} | {c['support']} |"
                         for lab, c in r["per_class"].items())

    calib = f"The probabilities are divided by temperature {rec.config.temperature:.3f} (stored in config.json)."
    if calibration:
        calib += (f" It was fitted by `tracker calibrate` (NLL on {', '.join(calibration['data'])}; NLL "
                  f"{calibration['nll_before']:.4f} -> {calibration['nll_after']:.4f}); expected calibration error, 15 bins:\n\n"
                  "| dev set | ECE before | ECE after |\n|---|---:|---:|\n"
                  + "\n".join(f"| {k} | {100 * v['ece_before']:.2f} | {100 * v['ece_after']:.2f} |" for k, v in calibration["data"].items()))
    if calibration_eval:
        rows_ce = []
        for k, v in calibration_eval["data"].items():
            two = f"{100 * v['ece_after_2fold']:.2f}" if "ece_after_2fold" in v else "-"
            rows_ce.append(f"| {k} | {v['n']} | {100 * v['ece_before']:.2f} | {100 * v['ece_after']:.2f} | {two} |")
        calib += ("\n\nThe same temperature on every dev set (`bench/calibration_eval.py`; 2-fold = the temperature fitted on "
                  "one half of the fit set's dialogues and ECE taken on the other half, both ways, pooled: a figure free "
                  f"of fitting and scoring on the same utterances):\n\n| dev set | utterances | ECE at T {calibration_eval['temperature_before']:.3f} "
                  f"| ECE at T {calibration_eval['temperature_after']:.3f} | 2-fold ECE |\n|---|---:|---:|---:|---:|\n" + "\n".join(rows_ce))
    if reliability:
        calib += f"\n\nReliability diagram before and after: `{RELIABILITY_PNG}`."
    metric_keys = [k for k in (history[0] if history else {}) if k.endswith("/weighted_f1") or k.endswith("/accuracy")]
    head = " | ".join(k.replace("/weighted_f1", " W-F1").replace("/accuracy", " acc") for k in metric_keys)
    rows = "\n".join(f"| {h['step']} | {h['epoch']:.2f} | " + " | ".join(f"{100 * h.get(k, 0):.2f}" for k in metric_keys) + " |"
                     for h in history)
    licences = "MELD GPL-3.0; RAVDESS CC BY-NC-SA 4.0 (non-commercial, attribution, share-alike). Gemma-3-270M: the Gemma Terms of Use."
    if uses_whisper:
        licences += " OpenAI Whisper weights (acoustic features): MIT."
    if uses_egemaps:
        licences += (" The eGeMAPS features are computed with openSMILE (the `opensmile` package: audEERING's research licence, "
                     "non-commercial; commercial use needs a licence from audEERING).")
    tel_text = ""
    if tel:
        tel_text = ("\n\nThe telephone-band row is one fixed copy of RAVDESS dev through `tracker.audio.channel` (8 kHz, "
                    "300-3400 Hz, mu-law or A-law, gain -6..6 dB, white or pink noise at 5-20 dB SNR; seed "
                    "`TELEPHONE_DEV_SEED`, as `tracker eval --data ravdess:dev+telephone` and the training run report it).")
    prev = ""
    if previous and "meld:dev" in previous:
        def prow(name: str, r: dict | None) -> str:
            return (f"| {name} | {100 * r['accuracy']:.2f} | {100 * r['weighted_f1']:.2f} | {100 * r['macro_f1']:.2f} |"
                    if r else f"| {name} | - | - | - |")
        prev = ("\n\nAgainst the adapter this one replaced (same evaluation code"
                + (f", weights sha1 {previous['weights_sha1']}" if previous.get("weights_sha1") else "") + "):\n\n"
                "| | accuracy | weighted F1 | macro F1 |\n|---|---:|---:|---:|\n"
                + "\n".join([prow("MELD dev, previous", previous.get("meld:dev")), prow("MELD dev, this one", meld),
                              prow("RAVDESS dev, previous", previous.get("ravdess:dev")), prow("RAVDESS dev, this one", rav)]
                             + ([prow("RAVDESS dev telephone band, previous", previous.get("ravdess:dev+telephone")),
                                 prow("RAVDESS dev telephone band, this one", tel)]
                                if tel and previous.get("ravdess:dev+telephone") else [])))
    tel_classes = (f"\n\nRAVDESS dev, telephone band, per class (folded):\n\n| label | precision | recall | F1 | support |\n"
                   f"|---|---|---|---|---|\n{per_class(tel)}" if tel else "")
    cc = ""
    if callcenter:
        cc_rows = "\n".join(f"| {r['name']} | {r['false_alarms']:.1f}% | {r['hits']:.1f}% | {r['calm_labels']} |"
                            for r in callcenter["rows"] if r.get("shipped", True))
        cc = ("\n\n## Call-center set (bench/callcenter.py)\n\n"
              f"{callcenter.get('description', '')} The voices are synthetic (espeak-ng has no emotions; the upset "
              "customers' voices are only faster and higher), so the rows without text show how the acoustic path treats "
              "voices unlike its training data rather than how it hears real agitation.\n\n"
              "| recognizer | calm lines labelled negative (false alarms) | upset lines labelled negative (hits) | labels of the calm lines |\n"
              f"|---|---:|---:|---|\n{cc_rows}")
    target_rows = []
    for t in targets or []:
        import re

        m = re.fullmatch(r"\s*([^/]+)/(\w+)\s*(>=|<=)\s*([0-9.]+)\s*", t)
        if not m or m.group(1) not in reports:
            raise SystemExit(f"--target {t!r}: expected SPEC/METRIC>=X or <=X with SPEC one of {', '.join(reports)}")
        spec, metric, op, want = m.group(1), m.group(2), m.group(3), float(m.group(4))
        if metric not in reports[spec]:
            raise SystemExit(f"--target {t!r}: {spec} has no figure {metric!r}")
        got = float(reports[spec][metric])
        met = got >= want if op == ">=" else got <= want
        target_rows.append(f"| {spec} {metric.replace('_', ' ')} | {op} {100 * want:g} | {100 * got:.2f} | "
                           f"{'yes' if met else '**no**'} |")
    targets_text = ("\n\nTargets set for this model (percent):\n\n| figure | target | this model | met |\n|---|---:|---:|---|\n"
                    + "\n".join(target_rows)) if target_rows else ""
    limits = []
    names = {"meld:dev": "MELD dev", "ravdess:dev": "RAVDESS dev", "ravdess:dev+telephone": "its telephone-band copy"}
    over = [(names.get(k, k), r) for k, r in reports.items() if r.get("mean_confidence", 0) - r["accuracy"] > 0.05]
    if over:
        limits.append("Overconfident on " + " and ".join(f"{n} (mean top-label confidence {100 * r['mean_confidence']:.1f}% "
                                                        f"against {100 * r['accuracy']:.1f}% accuracy)" for n, r in over)
                      + f": the temperature is fitted on {', '.join((calibration or {}).get('data', {})) or 'dev'} and is one "
                      "for every input, so read the confidences of audio-only (acted) utterances with care.")
    if any(getattr(m, "speaker_norm", False) for m in a.modalities):
        limits.append("The speaker-normalised modalities expect each utterance's features mapped against the same speaker's "
                      "earlier utterances (`EmotionRecognizer.speaker_normalizers()`, past-only); a runtime that keeps no "
                      "per-speaker statistics gives every utterance the identity map of a speaker's first utterance.")
    limitations = "".join(f"\n\n{x}" for x in limits)
    return f"""# Model card: the default tracker adapter

An MSE-Adapter ({rec.num_trainable_parameters():,} trainable parameters) on the frozen Gemma-3-270M
(`{rec.backbone.name}`, hidden size {rec.backbone.hidden_size}), trained with
`tracker train --config configs/train/default.yaml` ({code}; shipped {date.today()}:
{trained}, batches of {run_config.get("batch_size", 8)} utterances{epochs}). It labels an utterance with one of
MELD's 7 emotions ({", ".join(rec.label_set.labels)}) from its text, its past dialogue context
({context}) and, when there is audio, its acoustic features.

- Adapter: d={a.d_model}, {a.n_pseudo_tokens} pseudo tokens, `{a.expansion}` expansion, text as its own modality:
  {a.text_as_modality}; acoustic modalities: {modalities}; label head: `{rec.config.head}` on layer
  {rec.config.head_layer or "last"}.
- Data: MELD train (9,989 utterances, text and context, no audio) with RAVDESS train (actors 01-16,
  960 clips, audio with its neutral statement as text, counted {rav_times}), RAVDESS folded into MELD's
  labels (calm -> neutral, happy -> joy, sad -> sadness, angry -> anger, fearful -> fear,
  disgust -> disgust, surprised -> surprise); the missing modality masked. Loss: {loss_text} with
  `{weighting}` class weights.{aux}
- Selection: the checkpoint with the {selection} among the evaluations.
- Licences: {licences}

## Dev figures (command: `python scripts/ship_model.py --checkpoint <run>/best --run-dir <run> --calibration <calibrate.json>`, same code as `tracker eval`)

| dev set | utterances | accuracy | weighted F1 | macro F1 | ECE (15 bins) |
|---|---|---|---|---|---|
{row("MELD dev", meld)}
{row("RAVDESS dev (actors 17-20, folded to 7 labels)", rav)}
{row("RAVDESS dev, telephone band (8 kHz, 300-3400 Hz, companded)", tel) if tel else ""}{tel_text}{prev}{targets_text}

MELD dev per class:

| label | precision | recall | F1 | support |
|---|---|---|---|---|
{per_class(meld)}

RAVDESS dev per class (folded):

| label | precision | recall | F1 | support |
|---|---|---|---|---|
{per_class(rav)}{tel_classes}

## Calibration

{calib}

Baselines on the same splits are in BENCHMARKS.md (MiniLM + logistic regression: MELD dev weighted
F1 52.04; eGeMAPS + SVM: RAVDESS dev accuracy 50.00 folded to 7 labels).{cc}

## How these figures were made

```bash
tracker train --config configs/train/default.yaml                 # <run> = ~/.cache/tracker/runs/<name>
cp -r <run>/best <ckpt>                                           # calibrate rewrites its checkpoint in place
tracker calibrate --checkpoint <ckpt> --data meld:dev --json calibration.json --plot reliability-meld-dev.png
python bench/calibration_eval.py --checkpoint <run>/best --calibration calibration.json --fit-on meld:dev \\
    --data meld:dev --data ravdess:dev --data ravdess:dev+telephone --json calibration_eval.json
python scripts/ship_model.py --checkpoint <ckpt> --run-dir <run> --calibration calibration.json \\
    --calibration-eval calibration_eval.json --reliability reliability-meld-dev.png --trained-at <commit>
python bench/callcenter.py --recognizer-norm --json callcenter.json   # with this model shipped
python scripts/ship_model.py --card-only --run-dir <run> --trained-at <commit> --callcenter callcenter.json \\
    --previous-eval <previous adapter's tracker eval --json> --target meld:dev/weighted_f1>=0.61 ...
```

The JSONs are kept beside the weights (calibration.json, calibration_eval.json, callcenter.json, eval.json).

## Evaluation history of the training run

| step | epoch | {head} |
|---|---|{"---|" * len(metric_keys)}
{rows}

## Limitations

Trained on TV-show dialogue (MELD) and acted read speech (RAVDESS); call-center speech differs in
vocabulary, acoustics and emotion base rates (BENCHMARKS.md, call-center set). Fear and disgust are
rare in MELD and recognised poorly. See the dev figures above before relying on any single label.{limitations}
"""


if __name__ == "__main__":
    raise SystemExit(main())
