"""Train a refiner from the features `tracker train-refiner` cached and ship it in tracker/assets/refiner.

No LLM is loaded: the head and the RFAttention module train on the cached slot states of the shipped
base adapter (the step with the best MELD dev weighted F1 is kept). The figures for the model card
come from bench/refine_eval.py (its JSON, --bench).

    python scripts/ship_refiner.py --window 4 --stride 2 --bench bench5.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.refine_eval import load_cached  # noqa: E402
from tracker.labels import LabelSet  # noqa: E402
from tracker.model import checkpoint as ckpt  # noqa: E402
from tracker.model.backbone import cache_dir  # noqa: E402
from tracker.model.default import default_checkpoint  # noqa: E402
from tracker.model.refine import RefinerConfig  # noqa: E402
from tracker.training import refine as R  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--stride", type=int, default=2)
    ap.add_argument("--train-dialogues", type=int, default=200)
    ap.add_argument("--head-layer", type=int, default=12)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bench", required=True, help="bench/refine_eval.py --json output with this (w, s)")
    ap.add_argument("--out", default=str(ROOT / "tracker" / "assets" / "refiner"))
    args = ap.parse_args()

    base_ckpt = default_checkpoint()
    data = ckpt.read_config(base_ckpt)
    label_set = LabelSet.from_dict(data["label_set"])
    tag, ctag = R._checkpoint_tag(base_ckpt), R._cache_tag(base_ckpt)
    cache = cache_dir() / "refiner-features"
    train = load_cached(cache, ctag, R._key("meld:train", args.train_dialogues, 0), args.window, args.stride, args.head_layer)
    dev = load_cached(cache, ctag, R._key("meld:dev", 0, 0), args.window, args.stride, args.head_layer)
    config = RefinerConfig(backbone=data["backbone"], label_set=label_set.name, window=args.window, stride=args.stride,
                           head_layer=args.head_layer)
    model = R.CachedRefiner(config, label_set, int(train[0]["hidden"].shape[-1]), seed=args.seed)
    fit = R.fit(model, train, dev, steps=args.steps, seed=args.seed)
    bench = json.loads(Path(args.bench).read_text())
    row = next(r for r in bench["rows"] if r["window"] == args.window and r["stride"] == args.stride)
    training = {"base_checkpoint_sha1": tag, "train": f"meld:train, {args.train_dialogues} random dialogues (seed 0), "
                f"{len(train[1]['labels'])} utterances", "best_step": fit.best_step, "dev_weighted_f1": fit.dev_wf1,
                "dev_accuracy": fit.dev_acc, "base_dev_weighted_f1": fit.base_wf1, "base_dev_accuracy": fit.base_acc}
    out = Path(args.out)
    R.write_refiner(model, out, extra={"training": training})
    (out / "eval.json").write_text(json.dumps({"shipped": training, "bench": row}, indent=2) + "\n")
    print(f"shipped {out}: MELD dev W-F1 {100 * fit.base_wf1:.2f} -> {100 * fit.dev_wf1:.2f} (dev-selected step "
          f"{fit.best_step}); 2-fold estimate {100 * row['twofold_wf1']:.2f} +- {100 * row['twofold_wf1_std']:.2f}")


if __name__ == "__main__":
    main()
