"""How much MELD the shipped model's frozen states hold: refit the label head on them, per layer.

The adapter and the LLM stay as shipped; only the readout changes. For MELD train and dev, the
normed answer-position states after decoder layers `--layers` (`EmotionRecognizer.layer_states`, one
forward per batch; cached under ~/.cache/tracker/readout/) are read, and:

* ``shipped head``: the checkpoint's own head on its layer (must reproduce `tracker eval`);
* ``refit``: standardisation + logistic regression on the states of one layer or several
  concatenated, with and without balanced class weights; C chosen by 4-fold dialogue-grouped CV on
  train (weighted F1); dev only for the figure;
* ``refit, C chosen on dev``: the best of the grid on dev itself, a ceiling (not a result);
* ``shipped head + per-class bias``: biases added to the shipped logits, fitted by coordinate ascent
  on one half of dev's dialogues and scored on the other, both ways, pooled (5 random halvings;
  objective: the mean of weighted and macro F1).

The train states come from a model trained on those same utterances (train accuracy is higher than
dev's), so a refit head learns on states that are easier than dev's; the dev-chosen ceiling bounds
what any linear readout of these states could give.

    python bench/head_readout.py [--checkpoint DIR] [--layers 6 9 12 15 18] [--json F]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from tracker.model.backbone import cache_dir
from tracker.model.default import default_checkpoint
from tracker.model.recognizer import EmotionRecognizer
from tracker.training.evaluate import spec_examples

C_GRID = (0.001, 0.01, 0.1)
SEED = 0


def scores(gold: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    """(weighted F1, macro F1) in percent."""
    from sklearn.metrics import f1_score

    return (100 * f1_score(gold, pred, average="weighted", zero_division=0),
            100 * f1_score(gold, pred, average="macro", zero_division=0))


def states(rec: EmotionRecognizer, spec: str, layers: list[int], cache: Path, batch_size: int = 8) -> dict[str, np.ndarray]:
    """{"X": (N, len(layers), H), "logits": (N, L) of the shipped head, "gold": (N,), "group": (N,) dialogues}."""
    if cache.exists():
        with np.load(cache) as z:
            return {k: z[k] for k in z.files}
    examples = spec_examples(rec, spec)
    items = [e.item for e in examples]
    encoded = [rec.encode(it) for it in items]
    order = sorted(range(len(items)), key=lambda i: len(encoded[i].input_ids))
    head_at = layers.index(rec.cached_layers)
    X = np.zeros((len(items), len(layers), rec.backbone.hidden_size), dtype=np.float32)
    logits = np.zeros((len(items), len(rec.label_set)), dtype=np.float32)
    t0 = time.time()
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = rec.collate([items[i] for i in idx], [encoded[i] for i in idx])
        h = rec.layer_states(batch, layers)  # (B, len(layers), H)
        X[idx] = h.float().numpy()
        with torch.inference_mode():
            logits[idx] = rec.label_logits(h[:, head_at]).float().numpy()
        if start // batch_size % 100 == 0:
            print(f"  {spec}: {start}/{len(items)} utterances, {time.time() - t0:.0f} s", flush=True)
    out = {"X": X, "logits": logits, "gold": np.array([e.label for e in examples]),
           "group": np.array([e.group for e in examples])}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    return out


def refit(train: dict, dev: dict, cols: list[int], class_weight: str | None) -> dict:
    """Logistic regression on the states of `cols` (layer positions): C by grouped CV on train, and the dev ceiling."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    Xtr, Xdv = train["X"][:, cols].reshape(len(train["gold"]), -1), dev["X"][:, cols].reshape(len(dev["gold"]), -1)
    ytr, ydv = train["gold"], dev["gold"]

    def model(C: float):
        return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000, class_weight=class_weight))

    cv, on_dev = {}, {}
    for C in C_GRID:
        f1s = []
        for tr, va in GroupKFold(n_splits=4).split(Xtr, ytr, train["group"]):
            f1s.append(scores(ytr[va], model(C).fit(Xtr[tr], ytr[tr]).predict(Xtr[va]))[0])
        cv[C] = float(np.mean(f1s))
        on_dev[C] = scores(ydv, model(C).fit(Xtr, ytr).predict(Xdv))
    C = max(C_GRID, key=lambda c: (cv[c], -c))
    best_dev = max(C_GRID, key=lambda c: sum(on_dev[c]))
    return {"C": C, "train_cv_weighted_f1": cv[C], "dev": on_dev[C], "dev_ceiling_C": best_dev, "dev_ceiling": on_dev[best_dev]}


def fit_bias(logits: np.ndarray, gold: np.ndarray, rounds: int = 3) -> np.ndarray:
    """Per-class biases maximising the mean of weighted and macro F1 (coordinate ascent on a grid)."""
    b = np.zeros(logits.shape[1])
    grid = np.linspace(-3, 3, 61)
    for _ in range(rounds):
        for c in range(len(b)):
            best_score, best_bias = -1.0, 0.0
            for g in grid:
                trial = b.copy()
                trial[c] = g
                s = sum(scores(gold, (logits + trial).argmax(1))) / 2
                if s > best_score:
                    best_score, best_bias = s, g
            b[c] = best_bias
    return b


def bias_two_fold(dev: dict, repeats: int = 5) -> tuple[float, float]:
    """Shipped logits + biases fitted on one half of dev's dialogues, scored on the other; mean over `repeats` halvings."""
    groups = np.unique(dev["group"])
    out = []
    for r in range(repeats):
        half = set(np.random.default_rng(SEED + r).permutation(groups)[: len(groups) // 2])
        a = np.array([g in half for g in dev["group"]])
        pred = np.zeros_like(dev["gold"])
        for fit_on, score_on in ((a, ~a), (~a, a)):
            pred[score_on] = (dev["logits"][score_on] + fit_bias(dev["logits"][fit_on], dev["gold"][fit_on])).argmax(1)
        out.append(scores(dev["gold"], pred))
    return tuple(np.mean(out, axis=0))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="an adapter checkpoint (default: the shipped model)")
    ap.add_argument("--layers", type=int, nargs="+", default=[6, 9, 12, 15, 18])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    ckpt = Path(args.checkpoint) if args.checkpoint else default_checkpoint()
    rec = EmotionRecognizer.from_pretrained(ckpt)
    rec.eval()
    layers = sorted(set(args.layers) | {rec.cached_layers})
    tag = hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()[:12]
    cache = cache_dir() / "readout"
    train = states(rec, "meld:train", layers, cache / f"{tag}-meld-train-{'-'.join(map(str, layers))}.npz")
    dev = states(rec, "meld:dev", layers, cache / f"{tag}-meld-dev-{'-'.join(map(str, layers))}.npz")
    rows = [{"readout": f"shipped head (layer {rec.cached_layers})", "dev": scores(dev["gold"], dev["logits"].argmax(1)),
             "train": scores(train["gold"], train["logits"].argmax(1))}]
    head = layers.index(rec.cached_layers)
    sets = [[k] for k in layers] + [[layers[max(0, head - 1)], rec.cached_layers, layers[min(len(layers) - 1, head + 1)]], layers]
    for ks in sets:
        for cw in (None, "balanced"):
            r = refit(train, dev, [layers.index(k) for k in ks], cw)
            rows.append({"readout": f"refit on layer{'s' if len(ks) > 1 else ''} {'+'.join(map(str, ks))}"
                                    f"{', balanced weights' if cw else ''}", **r})
            print(f"  {rows[-1]['readout']}: C={r['C']} dev W-F1 {r['dev'][0]:.2f} macro {r['dev'][1]:.2f} "
                  f"(ceiling, C={r['dev_ceiling_C']} chosen on dev: {r['dev_ceiling'][0]:.2f} / {r['dev_ceiling'][1]:.2f})", flush=True)
    rows.append({"readout": "shipped head + per-class bias (2-fold on dev, 5 halvings)", "dev": bias_two_fold(dev)})
    print(f"\ncheckpoint {ckpt} (weights {tag}); MELD train {len(train['gold'])}, dev {len(dev['gold'])} utterances\n")
    print("| readout | C (train CV) | MELD dev W-F1 | MELD dev macro-F1 | ceiling: C chosen on dev, W-F1 / macro-F1 |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        ceiling = f"{r['dev_ceiling'][0]:.2f} / {r['dev_ceiling'][1]:.2f} (C={r['dev_ceiling_C']})" if "dev_ceiling" in r else "-"
        print(f"| {r['readout']} | {r.get('C', '-')} | {r['dev'][0]:.2f} | {r['dev'][1]:.2f} | {ceiling} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint": str(ckpt), "layers": layers, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
