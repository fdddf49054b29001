"""How well the adapter's acoustic encoders alone separate RAVDESS emotions (no LLM).

Runs the training job's encoder warm-up (`Trainer.warm_up_encoders`: the acoustic encoders and
their auxiliary linear classifiers, trained without the LLM) on RAVDESS train (actors 01-16) and
scores the auxiliary classifiers on RAVDESS dev (actors 17-20), labels folded into MELD's 7, for
three inputs: eGeMAPS LLD sequences, eGeMAPS functionals, and both (the two classifiers' logits summed).
The number of epochs is fixed in advance (the default model's `encoder_warmup_epochs`); dev is
only scored, never used to choose. Compare with bench/baselines.py's eGeMAPS + LR/SVM rows.

    python bench/audio_encoders.py --epochs 20 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from tracker.config import load_dataclass
from tracker.metrics import classification_report
from tracker.model.adapter import collate_modalities
from tracker.model.backbone import load_backbone
from tracker.model.recognizer import EmotionRecognizer
from tracker.training.config import TrainConfig
from tracker.training.examples import load_examples
from tracker.training.trainer import Trainer

LLD = {"name": "audio", "feature_dim": 25, "lstm_hidden": 64, "frame_pooling": 4, "source": "egemaps_lld"}
FUN = {"name": "audio_functionals", "feature_dim": 88, "lstm_hidden": 64, "source": "egemaps_functionals"}
VARIANTS = {"lld": [LLD], "functionals": [FUN], "lld+functionals": [LLD, FUN]}


def run(variant: str, epochs: int, seed: int, backbone) -> tuple[float, float, float]:
    cfg = load_dataclass(TrainConfig, {
        "name": "probe", "seed": seed, "encoder_warmup_epochs": epochs, "batch_size": 16,
        "model": {"backbone": "tiny", "dtype": "fp32", "label_set": "meld7",
                  "adapter": {"d_model": 256, "aux_classes": 7, "modalities": VARIANTS[variant]}},
        "train": [{"spec": "ravdess:train", "label_set": "meld7"}], "dev": []})
    torch.manual_seed(seed)
    rec = EmotionRecognizer(backbone, cfg.model)  # the LLM is not used: only the encoders train here
    trainer = Trainer(cfg, recognizer=rec, progress=False)
    trainer.prepare()
    t0 = time.time()
    trainer.warm_up_encoders()
    seconds = time.time() - t0
    dev = load_examples("ravdess:dev", rec.label_set, 0, "meld7", modalities=rec.config.adapter.modalities)
    rec.eval()
    with torch.no_grad():
        mods = collate_modalities([ex.item.features for ex in dev], rec.modality_names)
        logits = sum(lg for lg, _ in rec.adapter.aux_logits(mods).values())  # both: the two classifiers' logits summed
    pred = logits.argmax(-1).numpy()
    gold = np.array([ex.label for ex in dev])
    rep = classification_report(gold, pred, list(rec.label_set.labels))
    return rep.accuracy, rep.weighted_f1, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    torch.set_num_threads(1)
    backbone = load_backbone("tiny", dtype="fp32")
    print(f"| acoustic input | dev accuracy (mean ± sd over {len(args.seeds)} seeds) | dev weighted F1 | s per run |")
    print("|---|---:|---:|---:|")
    for variant in VARIANTS:
        rows = np.array([run(variant, args.epochs, s, backbone) for s in args.seeds])
        acc, f1, sec = rows[:, 0] * 100, rows[:, 1] * 100, rows[:, 2]
        print(f"| {variant} | {acc.mean():.2f} ± {acc.std():.2f} | {f1.mean():.2f} ± {f1.std():.2f} | {sec.mean():.0f} |", flush=True)


if __name__ == "__main__":
    main()
