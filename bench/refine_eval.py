"""Conversation-level refinement on MELD dev: weighted F1 with and without it, delay, extra LLM forwards.

Reads the features `tracker train-refiner` cached (base probabilities and window slot states of the
same base checkpoint) and, for each (w, s):

* ``base``: the base adapter alone (the same checkpoint);
* ``refined (dev-selected)``: the refiner as `train-refiner` ships it (training step chosen on dev);
* ``refined (2-fold)``: an estimate free of that selection: dev dialogues are split in two halves,
  the step is chosen on one half and the figure taken on the other, both ways, pooled;
* the delay of the final label in utterances (live: until its last window closes, or the call ends)
  and in seconds of call time on the demo call (tracker/assets/demo), and window forwards per utterance.

``--measure N`` also times N base forwards and N window forwards of the real LLM in this run
(batch 1, the shipped bf16 backbone) for the cost ratio. ``--end-to-end DIR`` refines MELD dev with
a saved refiner through `refine_conversation` (the library path, not the cache) and reports its W-F1.

    python bench/refine_eval.py --window 2 --stride 2 --window 4 --stride 2 --window 6 --stride 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from tracker.metrics import classification_report
from tracker.model.backbone import cache_dir
from tracker.model.default import default_checkpoint
from tracker.model.windows import WindowSpec
from tracker.training import refine as R

DEMO = Path(__file__).resolve().parents[1] / "tracker" / "assets" / "demo" / "conversation.json"


def load_cached(cache: Path, tag: str, key: str, w: int, s: int, layer: int) -> tuple[dict, dict]:
    with np.load(cache / f"base-{tag}-{key}.npz") as z:
        base = {k: z[k] for k in z.files}
    with np.load(cache / f"slots-{tag}-{key}-w{w}s{s}-L{layer}.npz") as z:
        slots = {k: z[k] for k in z.files}
    return slots, base


def delays(spec: WindowSpec, lengths: list[int]) -> np.ndarray:
    """Per utterance: utterances that arrive after it before its final (clipped at the conversation's end)."""
    return np.array([min(spec.final_delay(i), n - 1 - i) for n in lengths for i in range(n)])


def bootstrap_delta(gold: np.ndarray, base: np.ndarray, refined: np.ndarray, conv: np.ndarray, labels: list[str],
                    n: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% interval of W-F1(refined) - W-F1(base), resampling dev dialogues (paired)."""
    rng = np.random.default_rng(seed)
    ids = np.unique(conv)
    rows = {c: np.flatnonzero(conv == c) for c in ids}
    deltas = []
    for _ in range(n):
        idx = np.concatenate([rows[c] for c in rng.choice(ids, size=len(ids))])
        g = gold[idx].tolist()
        deltas.append(classification_report(g, refined[idx].tolist(), labels).weighted_f1
                      - classification_report(g, base[idx].tolist(), labels).weighted_f1)
    return float(np.percentile(deltas, 2.5)), float(np.percentile(deltas, 97.5))


def demo_delay_s(spec: WindowSpec) -> tuple[float, float]:
    """Mean and max call time (s) from an utterance's end to its final on the demo call (compute excluded)."""
    utts = json.loads(DEMO.read_text())["utterances"]
    ends = sorted(u["end_ms"] for u in utts)
    n = len(ends)
    d = [(ends[min(i + spec.final_delay(i), n - 1)] - ends[i]) / 1000 for i in range(n)]
    return float(np.mean(d)), float(np.max(d))


def measure_forwards(n: int, spec: WindowSpec, layer: int) -> tuple[float, float]:
    """Seconds per base forward and per window forward (batch 1) on real MELD dev dialogues."""
    import torch

    from tracker.data import load_dataset
    from tracker.data.records import to_inputs
    from tracker.model.recognizer import EmotionRecognizer
    from tracker.model.refine import Refiner, RefinerConfig, WindowItem

    rec = EmotionRecognizer.from_pretrained(default_checkpoint())
    ref = Refiner(rec.backbone, RefinerConfig(backbone=rec.backbone.name, window=spec.size, stride=spec.stride, head_layer=layer))
    convs = [c for c in load_dataset("meld:dev") if len(c) >= spec.size]
    items, windows = [], []
    for c in convs:
        pairs = list(to_inputs(c, rec.config.prompt.context_turns))
        items += [u.to_input(ctx) for u, ctx in pairs]
        probs = np.full(7, 1 / 7)
        windows += [[WindowItem(u.speaker, u.text, probs) for u in c.utterances[k : k + spec.size]]
                    for k in range(0, len(c) - spec.size + 1, spec.stride)]
    items, windows = items[:n], windows[:n]
    rec.predict_proba(items[:2], batch_size=1)
    ref.judge(windows[:1])
    with torch.inference_mode():
        t0 = time.perf_counter()
        rec.predict_proba(items, batch_size=1)
        t1 = time.perf_counter()
        for w in windows:
            ref.judge([w])
        t2 = time.perf_counter()
    return (t1 - t0) / len(items), (t2 - t1) / len(windows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--window", type=int, action="append", required=True)
    ap.add_argument("--stride", type=int, action="append", required=True)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--train-dialogues", type=int, default=200)
    ap.add_argument("--head-layer", type=int, default=12)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--aux", type=float, default=0.0)
    ap.add_argument("--seeds", type=int, default=5, help="training seeds (figures are means over them)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--measure", type=int, default=0, help="time N base and N window forwards of the real LLM")
    ap.add_argument("--end-to-end", default=None, help="a saved refiner directory to run on MELD dev end to end")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from tracker.model.refine import Refiner, RefinerConfig
    from tracker.labels import MELD7

    checkpoint = Path(args.checkpoint or default_checkpoint())
    tag = R._cache_tag(checkpoint)  # names the features `tracker train-refiner` cached
    cache = Path(args.cache) if args.cache else cache_dir() / "refiner-features"
    train_key, dev_key = R._key("meld:train", args.train_dialogues, 0), R._key("meld:dev", 0, 0)
    dev_convs = R.sample_conversations("meld:dev", 0)
    lengths = [len(c) for c in dev_convs]
    labels = list(MELD7.labels)
    rows = []
    for w, s in zip(args.window, args.stride):
        spec = WindowSpec(w, s)
        train = load_cached(cache, tag, train_key, w, s, args.head_layer)
        dev = load_cached(cache, tag, dev_key, w, s, args.head_layer)
        hidden = train[0]["hidden"].shape[-1]

        def fresh(seed: int) -> R.CachedRefiner:  # head + RFAttention alone: the LLM's states are cached
            return R.CachedRefiner(RefinerConfig(window=w, stride=s, head_layer=args.head_layer), MELD7, hidden, seed=seed)

        gold = dev[1]["labels"]
        base_pred = dev[1]["base"].argmax(1)
        base_rep = classification_report(gold.tolist(), base_pred.tolist(), labels)
        conv = dev[1]["conv"]
        sel_f1, sel_acc, two_f1, two_acc, cis = [], [], [], [], []
        for seed in range(args.seeds):
            sel = R.fit(fresh(seed), train, dev, steps=args.steps, lr=args.lr, aux=args.aux, seed=seed)
            pooled = np.zeros((len(gold), len(labels)))
            for fold in (0, 1):
                pick = conv % 2 == fold
                r = fresh(seed)
                R.fit(r, train, R.subset(dev, pick), steps=args.steps, lr=args.lr, aux=args.aux, seed=seed)
                pooled[~pick] = R.predict(r, R.subset(dev, ~pick))
            two = classification_report(gold.tolist(), pooled.argmax(1).tolist(), labels)
            sel_f1.append(sel.dev_wf1), sel_acc.append(sel.dev_acc), two_f1.append(two.weighted_f1), two_acc.append(two.accuracy)
            cis.append(bootstrap_delta(gold, base_pred, pooled.argmax(1), conv, labels, n=args.bootstrap))
        lo, hi = cis[0]
        d = delays(spec, lengths)
        demo_mean, demo_max = demo_delay_s(spec)
        row = {"window": w, "stride": s, "t": spec.t, "seeds": args.seeds, "base_wf1": base_rep.weighted_f1,
               "base_acc": base_rep.accuracy, "refined_wf1": float(np.mean(sel_f1)), "refined_acc": float(np.mean(sel_acc)),
               "twofold_wf1": float(np.mean(two_f1)), "twofold_wf1_std": float(np.std(two_f1)),
               "twofold_wf1_per_seed": two_f1, "twofold_acc": float(np.mean(two_acc)), "twofold_delta_ci95_seed0": [lo, hi],
               "twofold_delta_ci95_per_seed": [list(ci) for ci in cis],
               "delay_utts_mean": float(d.mean()), "delay_utts_max": int(d.max()),
               "demo_delay_s_mean": demo_mean, "demo_delay_s_max": demo_max,
               "windows_per_utt": float(dev[0]["windows"]) / len(gold),
               "window_s": float(dev[0]["seconds"]) / float(dev[0]["windows"])}
        rows.append(row)
        print(f"w={w} s={s} t={spec.t}: MELD dev W-F1 base {100 * row['base_wf1']:.2f} | refined "
              f"{100 * row['refined_wf1']:.2f} (dev-selected) {100 * row['twofold_wf1']:.2f} +- {100 * row['twofold_wf1_std']:.2f} "
              f"(2-fold, mean +- sd of {args.seeds} seeds; seed 0 delta 95% CI [{100 * lo:+.2f}, {100 * hi:+.2f}]; "
              f"intervals excluding 0: {sum(a > 0 or b < 0 for a, b in cis)} of {len(cis)} seeds) | acc "
              f"{100 * row['base_acc']:.2f} -> {100 * row['refined_acc']:.2f} / {100 * row['twofold_acc']:.2f} | delay "
              f"{row['delay_utts_mean']:.2f} utt (max {row['delay_utts_max']}), demo call {demo_mean:.1f} s (max {demo_max:.1f}) "
              f"| {row['windows_per_utt']:.3f} window forwards/utt", flush=True)
    out = {"rows": rows, "dev_utterances": int(sum(lengths))}
    if args.measure:
        for w, s in zip(args.window, args.stride):
            spec = WindowSpec(w, s)
            base_s, win_s = measure_forwards(args.measure, spec, args.head_layer)
            out.setdefault("forwards", []).append({"window": w, "stride": s, "base_s": base_s, "window_s": win_s})
            per_utt = win_s * next(r["windows_per_utt"] for r in rows if r["window"] == w and r["stride"] == s)
            print(f"w={w} s={s}: base forward {1000 * base_s:.0f} ms, window forward {1000 * win_s:.0f} ms "
                  f"({win_s / base_s:.2f}x); refinement adds {1000 * per_utt:.0f} ms of LLM time per utterance "
                  f"({per_utt / base_s:.2f}x the base forward)", flush=True)
    if args.end_to_end:
        from tracker.model.recognizer import EmotionRecognizer
        from tracker.model.refine import refine_conversation

        rec = EmotionRecognizer.from_pretrained(checkpoint)
        ref = Refiner.from_pretrained(args.end_to_end, backbone=rec.backbone)
        base = load_cached(cache, tag, dev_key, ref.spec.size, ref.spec.stride, args.head_layer)[1]
        probs, off = [], 0
        t0 = time.perf_counter()
        for c in dev_convs:
            probs.append(refine_conversation(ref, [u.speaker for u in c], [u.text for u in c], base["base"][off : off + len(c)].astype(np.float64)))
            off += len(c)
        rep = classification_report(base["labels"].tolist(), np.concatenate(probs).argmax(1).tolist(), labels)
        out["end_to_end"] = {"refiner": args.end_to_end, "wf1": rep.weighted_f1, "acc": rep.accuracy,
                             "seconds": time.perf_counter() - t0}
        print(f"end to end ({args.end_to_end}): MELD dev W-F1 {100 * rep.weighted_f1:.2f}, acc {100 * rep.accuracy:.2f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
