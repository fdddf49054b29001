"""How well acoustic features alone separate RAVDESS emotions, as recorded and through a telephone line.

Two tables (``--table``):

``probe`` (default): per-clip features + standardisation + logistic regression (C in 0.001/0.01/0.1
picked by 4-fold actor-grouped CV on RAVDESS train as recorded, actors 01-16, and kept for all four
settings; dev = actors 17-20, folded to MELD's 7 labels),
for eGeMAPS functionals, Whisper encoder states (tiny.en blocks 2/3/4, base blocks 2/4/6, mean+std
pooled over the real length) and their combinations (the Whisper layers for the combinations are
the best single ones by train CV, never by dev). Each in four settings: with and without
telephone-channel augmentation of train (``--aug-copies`` K simulated copies per clip beside the
recording, default 1; copy j drawn with seed run seed + 1000 j, see :func:`aug_conditions`) and with
and without past-only speaker normalisation; each scored on dev as
recorded and on the telephone-band copy of dev (``tracker.audio.channel``, fixed seed). Seeds
change the channel draws of the augmentation and the speakers' clip order; a setting without
either is the same for every seed. Features go through ``ModalityFeatures`` (the training and
service code) and are cached on disk, so a second run takes minutes.

``warmup``: the training job's encoder warm-up (`Trainer.warm_up_encoders`: the acoustic encoders
and their auxiliary linear classifiers, trained without the LLM) on eGeMAPS LLDs, functionals and
both, as in BENCHMARKS.md's earlier table.

    python bench/audio_encoders.py --seeds 0 1 2 --json encoders.json
    python bench/audio_encoders.py --only whisper_tiny.en_l2_meanstd whisper_base_l4_meanstd egemaps_functionals --aug-copies 3
    python bench/audio_encoders.py --table warmup --epochs 20 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import grid_search  # noqa: E402  (bench/ is not a package)

from tracker.audio.channel import COPY_KEY, TELEPHONE_DEV_SEED, TelephoneChannel  # noqa: E402
from tracker.audio.modalities import ModalityFeatures  # noqa: E402
from tracker.audio.pcm import read_audio  # noqa: E402
from tracker.audio.speaker_norm import SpeakerNormalizer, in_speaker_time_order  # noqa: E402
from tracker.config import load_dataclass  # noqa: E402
from tracker.data.ravdess import read_ravdess  # noqa: E402
from tracker.labels import MELD7  # noqa: E402
from tracker.metrics import classification_report  # noqa: E402
from tracker.model.adapter import collate_modalities  # noqa: E402
from tracker.model.backbone import load_backbone  # noqa: E402
from tracker.model.recognizer import EmotionRecognizer  # noqa: E402
from tracker.training.config import TrainConfig  # noqa: E402
from tracker.training.examples import load_examples  # noqa: E402
from tracker.training.trainer import Trainer  # noqa: E402

EGEMAPS = "egemaps_functionals"
TINY = [f"whisper_tiny.en_l{k}_meanstd" for k in (2, 3, 4)]
BASE = [f"whisper_base_l{k}_meanstd" for k in (2, 4, 6)]
C_GRID = [{"C": c} for c in (0.001, 0.01, 0.1)]
SETTINGS = [("plain", False, False), ("aug", True, False), ("norm", False, True), ("aug+norm", True, True)]
AUG_KEY = "aug"  # the channel key of a training copy (clip id, AUG_KEY); dev copies use COPY_KEY
AUG_SEED_STRIDE = 1000  # copy j of run seed s is drawn with seed s + AUG_SEED_STRIDE * j


def aug_conditions(seed: int, copies: int = 1) -> list[tuple[int, str]]:
    """The FeatureBank conditions of `copies` telephone copies of each training clip for run seed `seed`.

    Copy 0 is (seed, AUG_KEY), the single copy of the earlier figures; copy j is drawn with seed
    seed + AUG_SEED_STRIDE * j, so each copy gets its own gain, noise and codec draws and the copies of
    run seeds 0..AUG_SEED_STRIDE-1 never coincide (hence the seed range when copies > 1).
    """
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
        raise ValueError(f"aug copies: expected an integer >= 1, got {copies!r}")
    if copies > 1 and not 0 <= seed < AUG_SEED_STRIDE:
        raise ValueError(f"seed: with {copies} aug copies expected 0 <= seed < {AUG_SEED_STRIDE}, got {seed!r}")
    return [(seed + AUG_SEED_STRIDE * j, AUG_KEY) for j in range(copies)]


@dataclass
class Clip:
    clip_id: str
    speaker: str
    label: int
    path: str


def clips(split: str) -> list[Clip]:
    out = []
    for conv in read_ravdess(split, to_meld=True):
        u = conv.utterances[0]
        out.append(Clip(u.utterance_id, u.speaker, MELD7.index(u.label), u.audio_path))
    return out


class FeatureBank:
    """Features of clips per source and condition (recorded, or through the channel with a seed), cached."""

    def __init__(self, sources: list[str], threads: int = 1):
        self.features = {s: ModalityFeatures({"x": s}, threads=threads) for s in sources}
        self.channel = TelephoneChannel()

    def matrix(self, items: list[Clip], condition: tuple[int, str] | None, sources: list[str]) -> dict[str, np.ndarray]:
        """{source: (clips, F)}; condition None = as recorded, (seed, tag) = one telephone copy per clip."""
        rows: dict[str, list[np.ndarray]] = {s: [] for s in sources}
        for c in items:
            x, rate = read_audio(c.path, dtype="float32", target_rate=None)
            if condition is not None:
                x, rate = self.channel(x, rate, condition[0], c.clip_id, condition[1])
            for s in sources:
                rows[s].append(self.features[s].from_signal(x, rate)["x"][0])
        return {s: np.stack(v) for s, v in rows.items()}

    def copies(self, items: list[Clip], seed: int, copies: int, sources: list[str]) -> dict[str, np.ndarray]:
        """{source: (copies * clips, F)}: the `aug_conditions(seed, copies)` telephone copies, copy-major
        (rows j * len(items) .. (j + 1) * len(items) - 1 are copy j)."""
        parts = [self.matrix(items, cond, sources) for cond in aug_conditions(seed, copies)]
        return {s: np.concatenate([p[s] for p in parts]) for s in sources}


def speaker_normalised(X: np.ndarray, items: list[Clip], mean: np.ndarray, std: np.ndarray, seed: int) -> np.ndarray:
    """Each clip normalised with its speaker's earlier clips only (clip order per speaker seeded).

    X may hold several copies of `items`, copy-major ((copies * len(items), F)); each copy is then
    normalised as its own session."""
    n = len(items)
    if X.shape[0] != n:
        if X.shape[0] % n:
            raise ValueError(f"speaker_normalised: {X.shape[0]} rows is not a whole number of copies of {n} clips")
        return np.concatenate([speaker_normalised(X[j:j + n], items, mean, std, seed) for j in range(0, X.shape[0], n)])
    norm = SpeakerNormalizer(mean, std)
    out = np.empty_like(X)
    stats: dict[str, object] = {}
    for i in in_speaker_time_order(range(len(items)), lambda i: items[i].speaker, lambda i: items[i].clip_id, seed):
        st = stats.setdefault(items[i].speaker, norm.new_stats())
        out[i] = norm.step(X[i:i + 1], st)[0]
    return out


def probe(Xtr, ytr, groups, C=None):
    cv = None
    if C is None:
        best, cv, _ = grid_search(lambda p: probe_model(p["C"]), C_GRID, Xtr, ytr, groups, n_splits=4)
        C = best["C"]
    return probe_model(C).fit(Xtr, ytr), C, cv


def probe_model(C: float):
    """The probe, unfitted: standardisation + logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000, tol=1e-3))


def acc(model, X, y) -> float:
    return float((model.predict(X) == y).mean() * 100)


def probe_table(args) -> dict:
    train, dev = clips("train"), clips("dev")
    ytr, ydev = np.array([c.label for c in train]), np.array([c.label for c in dev])
    groups = np.array([c.speaker for c in train])
    sources = args.only or [EGEMAPS] + TINY + BASE
    bank = FeatureBank(sources, threads=args.threads)
    t0 = time.time()
    F = {"train": bank.matrix(train, None, sources), "dev": bank.matrix(dev, None, sources),
         "dev_tel": bank.matrix(dev, (TELEPHONE_DEV_SEED, COPY_KEY), sources)}
    print(f"features as recorded and of the telephone-band dev copy: {time.time() - t0:.0f} s", flush=True)

    cv_cache: dict[str, float] = {}

    def cv_score(src):
        if src not in cv_cache:
            cv_cache[src] = probe(F["train"][src], ytr, groups)[2]
        return cv_cache[src]

    K = args.aug_copies
    if args.only:  # one row: these sources together, all augmented
        augmented, rows = list(sources), [list(sources)]
    else:
        best_tiny = max(TINY, key=cv_score)
        best_base = max(BASE, key=cv_score)
        augmented = [EGEMAPS, best_tiny, best_base]  # augmentation copies only for these (time)
        rows = [[s] for s in sources] + [[best_tiny, best_base], [best_base, EGEMAPS], [best_tiny, best_base, EGEMAPS]]
    for s in args.seeds:
        F[f"aug{s}"] = bank.copies(train, s, K, augmented)  # (K * clips, F) per source
    print(f"features with {K} augmentation cop{'y' if K == 1 else 'ies'} per clip: {time.time() - t0:.0f} s", flush=True)
    results = {}
    head = " | ".join(f"{name} rec | {name} tel" for name, _, _ in SETTINGS)
    print(f"\n| features | dims | {head} |")
    print("|---|---:|" + "---:|" * (2 * len(SETTINGS)))
    for row in rows:
        name = " + ".join(r.replace("whisper_", "").replace("_meanstd", "") for r in row)
        cat = {k: np.concatenate([F[k][r] for r in row], axis=1) for k in F if all(r in F[k] for r in row)}
        cells, res = [], {}
        C = probe(cat["train"], ytr, groups)[1]  # C by actor-grouped CV on train as recorded, kept for every setting
        for setting, aug, norm in SETTINGS:
            if aug and not all(r in augmented for r in row):
                cells += ["-", "-"]
                continue
            rec, tel = [], []
            for s in args.seeds:
                Xtr, yt, gt = cat["train"], ytr, groups
                items = train
                if aug:
                    Xtr = np.concatenate([Xtr, cat[f"aug{s}"]])
                    yt, gt = np.tile(ytr, 1 + K), np.tile(groups, 1 + K)
                mean, std = Xtr.mean(0), Xtr.std(0)
                Xd, Xt = cat["dev"], cat["dev_tel"]
                if norm:
                    parts = [speaker_normalised(cat["train"], items, mean, std, s)]
                    if aug:
                        parts.append(speaker_normalised(cat[f"aug{s}"], items, mean, std, s))
                    Xtr = np.concatenate(parts)
                    Xd = speaker_normalised(Xd, dev, mean, std, s)
                    Xt = speaker_normalised(Xt, dev, mean, std, s)
                model, _, _ = probe(Xtr, yt, gt, C)
                rec.append(acc(model, Xd, ydev))
                tel.append(acc(model, Xt, ydev))
            res[setting] = {"C": C, "recorded": rec, "telephone": tel}
            cells += [f"{np.mean(rec):.2f} ± {np.std(rec):.2f}", f"{np.mean(tel):.2f} ± {np.std(tel):.2f}"]
        results[name] = {"sources": row, "dims": int(cat["train"].shape[1]), **res}
        print(f"| {name} | {cat['train'].shape[1]} | " + " | ".join(cells) + " |", flush=True)
    if args.only:
        print(f"\ntotal {time.time() - t0:.0f} s")
    else:
        print(f"\nbest single layers by train CV (weighted F1): {best_tiny}, {best_base}; "
              + ", ".join(f"{k} {v:.3f}" for k, v in cv_cache.items()) + f"; total {time.time() - t0:.0f} s")
    return results


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


def warmup_table(args) -> None:
    torch.set_num_threads(1)
    backbone = load_backbone("tiny", dtype="fp32")
    print(f"| acoustic input | dev accuracy (mean ± sd over {len(args.seeds)} seeds) | dev weighted F1 | s per run |")
    print("|---|---:|---:|---:|")
    for variant in VARIANTS:
        rows = np.array([run(variant, args.epochs, s, backbone) for s in args.seeds])
        acc, f1, sec = rows[:, 0] * 100, rows[:, 1] * 100, rows[:, 2]
        print(f"| {variant} | {acc.mean():.2f} ± {acc.std():.2f} | {f1.mean():.2f} ± {f1.std():.2f} | {sec.mean():.0f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", choices=["probe", "warmup"], default="probe")
    ap.add_argument("--epochs", type=int, default=20, help="warm-up epochs (--table warmup)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1, help="CTranslate2 threads for the Whisper encoders")
    ap.add_argument("--aug-copies", type=int, default=1,
                    help="telephone copies per train clip in the aug settings (copy j: seed + 1000 j; default 1)")
    ap.add_argument("--only", nargs="+", default=None, metavar="SOURCE",
                    help="one row: these sources together (no layer choice by train CV), augmented")
    ap.add_argument("--json", help="write the probe results here")
    args = ap.parse_args()
    if args.table == "warmup":
        warmup_table(args)
        return
    results = probe_table(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
