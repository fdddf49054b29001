"""False alarms and hits on a synthetic call-center set: calm agent lines vs upset customer lines, 8 kHz.

The 40 calm agent lines and 40 upset customer lines of bench/data/callcenter_lines.json are voiced
with espeak-ng (four voices, deterministic for a given espeak-ng version): agents at 150 words/min
and pitch 45, customers at 185 words/min and pitch 70 (espeak has no emotions; a faster, higher
voice is the only agitation it can give), then put through the telephone channel
(`tracker.audio.channel`, 8 kHz, band-pass, G.711, noise; a fixed seed per line). A line labelled
anger, disgust, fear or sadness counts as negative: a calm line labelled negative is a false alarm,
an upset line labelled negative a hit.

Two recognizers:
- the acoustic path alone: the probe of bench/audio_encoders.py (standardisation + logistic
  regression, C by actor-grouped CV) trained on RAVDESS train as recorded plus ``--aug-copies`` K
  telephone-channel copies per clip (default 1: seed 0; copy j drawn with seed 1000 j,
  `audio_encoders.aug_conditions`), on the `--sources` features (default: Whisper tiny.en block 2 + base
  block 4 + eGeMAPS functionals, the best of bench/audio_encoders.py), optionally with past-only
  speaker normalisation per voice and role;
- the full shipped recognizer (tracker/assets/model: Gemma-3-270M + the adapter reading the text and its
  acoustic modalities), with the text and the 8 kHz audio, and with the audio alone (empty text); and
  the adapter's acoustic encoders without the LLM (their auxiliary classifiers, logits summed);
  `--recognizer-norm` adds these again with the checkpoint's speaker normalisation per voice and role.

``--human`` asks the same question of human speech: RAVDESS dev (actors 17-20, never trained on by the
probe), calm = the neutral and calm clips (48), upset = the angry, fearful, sad and disgust clips (128:
MELD7's negative labels after folding), as recorded and through the telephone-band dev copy of
bench/audio_encoders.py (`TelephoneChannel`, `TELEPHONE_DEV_SEED`, features from its cache). Rows: the
probe (same training as above) without and with past-only speaker normalisation per actor (all 240 dev
clips as the actor's stream, in the seeded order of `speaker_normalised`, seed 0; and in file-name order,
which in RAVDESS sorts by emotion code and so puts neutral and calm first); the shipped model's audio-only
path (empty text) and its acoustic encoders alone, without and with its speaker normalisation (seeded
order); and an operating point: alarm when the probe's summed probability of the negative labels is >= tau,
tau the smallest that alarms at most ``--target-fa`` of the calm clips of RAVDESS train in out-of-fold
probabilities (the 4 actor-grouped folds of the C search), never dev: on the recordings and telephone
copies pooled, and on the telephone copies alone; the same taus then on the espeak lines. A last print
gives the ceiling: the tau chosen *on* dev for the target and the hits it leaves (not an operating point).
``--nested`` adds an estimate on 16 human speakers that nothing was chosen on: nested actor-grouped CV on
RAVDESS train, C (by separation) and tau picked on the other actors only (`nested_train_cv`).

``--select-c separation`` chooses the probe's C (same grid, same 4 actor-grouped train folds) by the ROC AUC of
P(negative) for the calm vs upset rows of the train telephone copies in out-of-fold probabilities, instead of by
7-label weighted F1 (`separation_cv`; ties to the smaller C); tau then as above, from the same out-of-fold
probabilities. Nothing is chosen on dev.

    python bench/callcenter.py [--sources ...] [--norm] [--skip-recognizer] [--skip-acoustic] [--recognizer-norm] [--json F]
    python bench/callcenter.py --human [--sources ...] [--target-fa 0.10] [--aug-copies K] [--select-c f1|separation] [--nested] [--skip-recognizer] [--skip-acoustic] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from audio_encoders import C_GRID, EGEMAPS, Clip, FeatureBank, acc, clips, probe, probe_model, speaker_normalised  # noqa: E402
from baselines import SEED  # noqa: E402
from operating_point import alarm_share, negative_mass, pick_c_by_separation, pick_tau, roc_auc  # noqa: E402

from tracker.audio.channel import COPY_KEY, TELEPHONE_DEV_SEED, TelephoneChannel  # noqa: E402
from tracker.audio.modalities import ModalityFeatures  # noqa: E402
from tracker.audio.speaker_norm import in_speaker_time_order  # noqa: E402
from tracker.audio.synth import RATE, clean_text, voice  # noqa: E402
from tracker.labels import MELD7  # noqa: E402

LINES = Path(__file__).resolve().parent / "data" / "callcenter_lines.json"
VOICES = ("en-us+m3", "en-us+f3", "en-gb+m2", "en-gb+f4")
CALM = {"speed_wpm": 150, "pitch": 45}
UPSET = {"speed_wpm": 185, "pitch": 70}
NEGATIVE = set(MELD7.negative)


def voiced_lines() -> list[dict]:
    """Each line voiced and put through the telephone channel: {role, text, voice, audio (8 kHz float32), rate}."""
    doc = json.loads(LINES.read_text())
    channel = TelephoneChannel()
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for role, lines, style, offset in (("agent", doc["calm_agent"], CALM, 0), ("customer", doc["upset_customer"], UPSET, 2)):
            for i, text in enumerate(lines):
                v = VOICES[(i + offset) % len(VOICES)]
                x = voice(clean_text(text), v, Path(tmp), **style)
                y, rate = channel(x, RATE, TELEPHONE_DEV_SEED, "callcenter", role, i)
                out.append({"role": role, "text": text, "voice": v, "audio": y, "rate": rate, "index": i})
    return out


def rates(pred_labels: list[str], lines: list[dict]) -> tuple[float, float]:
    neg = np.array([p in NEGATIVE for p in pred_labels])
    calm = np.array([ln["role"] == "agent" for ln in lines])
    return float(neg[calm].mean() * 100), float(neg[~calm].mean() * 100)


@dataclass
class Probe:
    """The acoustic probe of the espeak rows and what its speaker normalisation and operating point need."""

    model: object
    C: float
    mean: np.ndarray  # (F,) global statistics of the training rows before speaker normalisation
    std: np.ndarray
    X: np.ndarray  # ((1 + K) * clips, F) RAVDESS train as recorded, then its K telephone copies (speaker-normalised if norm)
    y: np.ndarray  # ((1 + K) * clips,) MELD7 label indices
    groups: np.ndarray  # ((1 + K) * clips,) actors
    norm: bool
    copies: int = 1  # K
    oof: np.ndarray | None = None  # (N, 7) out-of-fold probabilities at C on the 4 train folds, if the C search made them
    selection: dict | None = None  # --select-c separation: {C: {"auc", "weighted_f1"}} per C of the grid

    @property
    def is_copy(self) -> np.ndarray:
        """((1 + K) * clips,) True on the rows of the telephone copies."""
        return np.arange(len(self.y)) >= len(self.y) // (1 + self.copies)


def cv_folds(X: np.ndarray, y: np.ndarray, groups: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The 4 actor-grouped train folds of the probe's C search (`baselines.grid_search`) and of `cv_taus`."""
    from sklearn.model_selection import StratifiedGroupKFold

    return list(StratifiedGroupKFold(n_splits=4, shuffle=True, random_state=SEED).split(X, y, groups))


def separation_cv(X: np.ndarray, y: np.ndarray, groups: np.ndarray, is_copy: np.ndarray,
                  grid: list[float] | None = None) -> tuple[float, dict[float, dict], np.ndarray]:
    """C chosen by how well the probe separates calm from upset telephone speech in train CV, not by 7-label F1.

    For each C of `grid` (default: the probe's grid, `audio_encoders.C_GRID`), out-of-fold probabilities on the
    folds of `cv_folds`; the criterion is the ROC AUC of P(negative) (summed probability of anger, disgust, fear,
    sadness) for the calm (neutral) vs upset (negative-label) rows among the telephone copies (`is_copy`), pooled
    over the folds. The highest AUC wins, ties to the smallest C (`pick_c_by_separation`). Returns (C, {C: {auc,
    weighted_f1 (mean over folds, as grid_search), telephone_auc_recorded (the same AUC on the recordings)}},
    (N, 7) the out-of-fold probabilities at the chosen C)."""
    from sklearn.metrics import f1_score

    grid = grid or [g["C"] for g in C_GRID]
    classes = np.unique(y)
    calm, upset = human_masks(y)
    is_copy = np.asarray(is_copy, dtype=bool)
    report, oof = {}, {}
    folds = cv_folds(X, y, groups)
    for C in grid:
        proba, f1s = np.zeros((len(y), len(classes))), []
        for tr, va in folds:
            model = probe_model(C).fit(X[tr], y[tr])
            proba[va] = model.predict_proba(X[va])  # columns: model.classes_ == classes (every label in every fold)
            f1s.append(f1_score(y[va], classes[proba[va].argmax(1)], average="weighted", zero_division=0))
        score = negative_mass(proba, classes, NEGATIVE_IDX)
        report[C] = {"auc": roc_auc(score[upset & is_copy], score[calm & is_copy]),
                     "auc_recorded": roc_auc(score[upset & ~is_copy], score[calm & ~is_copy]) if (~is_copy).any() else None,
                     "weighted_f1": float(np.mean(f1s))}
        oof[C] = proba
    C = pick_c_by_separation({c: r["auc"] for c, r in report.items()})
    return C, report, oof[C]


SELECT_C = {"f1": "7-label weighted F1 (audio_encoders.probe)",
            "separation": "ROC AUC of P(negative), calm vs upset train telephone copies"}


def fit_probe(sources: list[str], norm: bool, bank: FeatureBank | None = None, copies: int = 1,
              select_c: str = "f1") -> Probe:
    """The probe on RAVDESS train as recorded + `copies` telephone copies per clip (run seed 0: copy j drawn with
    seed 1000 j), C by actor-grouped CV (`select_c`: on 7-label weighted F1, or on the calm-vs-upset separation
    of the telephone copies, `separation_cv`); each copy is speaker-normalised as its own session if `norm`."""
    if select_c not in SELECT_C:
        raise ValueError(f"select_c: expected one of {sorted(SELECT_C)}, got {select_c!r}")
    train = clips("train")
    y = np.array([c.label for c in train])
    groups = np.array([c.speaker for c in train])
    bank = bank or FeatureBank(sources)
    rec, aug = bank.matrix(train, None, sources), bank.copies(train, 0, copies, sources)
    X = np.concatenate([np.concatenate([rec[s] for s in sources], 1), np.concatenate([aug[s] for s in sources], 1)])
    mean, std = X.mean(0), X.std(0)
    if norm:
        n = len(train)
        X = np.concatenate([speaker_normalised(X[:n], train, mean, std, 0), speaker_normalised(X[n:], train, mean, std, 0)])
    yy, gg = np.tile(y, 1 + copies), np.tile(groups, 1 + copies)
    what = f"acoustic probe{' (speaker-normalised)' if norm else ''}, {copies} telephone cop{'y' if copies == 1 else 'ies'} per clip"
    if select_c == "separation":
        is_copy = np.arange(len(yy)) >= len(train)
        C, report, oof = separation_cv(X, yy, gg, is_copy)
        model = probe_model(C).fit(X, yy)
        print(f"{what}: C={C} by train-CV calm-vs-upset AUC on the telephone copies; per C: "
              + "; ".join(f"C={c}: AUC tel {r['auc']:.4f} (rec {r['auc_recorded']:.4f}), weighted F1 {r['weighted_f1']:.3f}"
                          for c, r in report.items()), flush=True)
        return Probe(model, C, mean, std, X, yy, gg, norm, copies, oof=oof, selection=report)
    model, C, cv = probe(X, yy, gg)
    print(f"{what}: C={C} (train CV weighted F1 {cv:.3f})", flush=True)
    return Probe(model, C, mean, std, X, yy, gg, norm, copies)


def line_features(lines: list[dict], sources: list[str]) -> np.ndarray:
    """(lines, F) the probe's features of the voiced lines, sources concatenated in order."""
    feats = {s: ModalityFeatures({"x": s}) for s in sources}
    return np.stack([np.concatenate([feats[s].from_signal(ln["audio"], ln["rate"])["x"][0] for s in sources]) for ln in lines])


def probe_lines(p: Probe, lines: list[dict], Xc: np.ndarray) -> np.ndarray:
    """The probe's input for the lines: as computed, or speaker-normalised per voice and role in line order."""
    if not p.norm:
        return Xc
    who = [Clip(f"{ln['role']}-{ln['index']}", f"{ln['role']}:{ln['voice']}", 0, "") for ln in lines]
    return _in_line_order(Xc, who, p.mean, p.std)


def acoustic_path(lines: list[dict], sources: list[str], norm: bool, copies: int = 1, select_c: str = "f1") -> list[str]:
    p = fit_probe(sources, norm, copies=copies, select_c=select_c)
    return [MELD7.labels[int(k)] for k in p.model.predict(probe_lines(p, lines, line_features(lines, sources)))]


def _in_line_order(X: np.ndarray, who, mean, std) -> np.ndarray:
    """Speaker normalisation of the call-center lines in the order they appear (a speaker's past = earlier lines)."""
    from tracker.audio.speaker_norm import SpeakerNormalizer

    norm, stats, out = SpeakerNormalizer(mean, std), {}, np.empty_like(X)
    for i, c in enumerate(who):
        out[i] = norm.step(X[i:i + 1], stats.setdefault(c.speaker, norm.new_stats()))[0]
    return out


def full_recognizer(lines: list[dict], norm: bool = False) -> tuple[list[str], list[str]]:
    """Labels with text + audio and with the audio alone. `norm`: the checkpoint's speaker-normalised modalities
    are normalised against the same voice's earlier lines of its role (past-only, in line order), as the
    service does per speaker of a call; without it every line is its speaker's first (the identity map)."""
    from tracker.model.default import default_checkpoint
    from tracker.types import UtteranceInput
    from tracker.model.recognizer import EmotionRecognizer

    rec = EmotionRecognizer.from_pretrained(default_checkpoint())
    feats = ModalityFeatures(rec.config.adapter.modalities)
    audio = [feats.from_signal(ln["audio"], ln["rate"]) for ln in lines]
    if norm:
        normalizers, stats = rec.speaker_normalizers(), {}
        for ln, a in zip(lines, audio):  # lines are in order: a voice's earlier lines are its past
            for name, normalizer in normalizers.items():
                if name in a:
                    a[name] = normalizer.step(a[name], stats.setdefault((ln["role"], ln["voice"], name), normalizer.new_stats()))
    speaker = {"agent": "Agent", "customer": "Customer"}
    with_text = rec.predict([UtteranceInput(ln["text"], speaker[ln["role"]], (), a) for ln, a in zip(lines, audio)])
    audio_only = rec.predict([UtteranceInput("", speaker[ln["role"]], (), a) for ln, a in zip(lines, audio)])
    encoders = encoders_alone(rec, [UtteranceInput("", speaker[ln["role"]], (), a) for ln, a in zip(lines, audio)])
    return [p.label for p in with_text], [p.label for p in audio_only], encoders


def encoders_alone(rec, items: list) -> list[str] | None:
    """The adapter's acoustic encoders without the LLM: their auxiliary classifiers' logits summed over modalities."""
    import torch

    if rec.adapter.aux_heads is None:
        return None
    rec.adapter.eval()
    with torch.no_grad():
        batch = rec.collate(items)
        logits = sum(lg.float() for lg, _ in rec.adapter.aux_logits(batch.modalities).values())  # (B, L)
    return [rec.label_set.labels[int(k)] for k in logits.argmax(1)]


# ---------------------------------------------------------------------------------------- the human set
CALM_LABEL = MELD7.index("neutral")  # RAVDESS neutral and calm both fold into it
NEGATIVE_IDX = [MELD7.index(k) for k in MELD7.negative]


def human_masks(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(calm, upset) masks over MELD7-folded labels: neutral (RAVDESS neutral + calm); a negative label."""
    y = np.asarray(y)
    return y == CALM_LABEL, np.isin(y, NEGATIVE_IDX)


TAU_PICKS = {"pooled": "train-CV calm clips, recordings + telephone copies", "telephone": "train-CV calm telephone copies"}


def cv_taus(p: Probe, target: float) -> dict[str, dict]:
    """tau from out-of-fold probabilities on RAVDESS train (the folds of the probe's C search: 4, actor-grouped):
    per pick of `TAU_PICKS`, the smallest that alarms at most `target` of those calm clips; with the train-CV
    false alarms and hits it gives on the recordings, the telephone copies and both."""
    from sklearn.model_selection import cross_val_predict

    proba = p.oof  # (N, 7), from the separation C search: the same folds and C
    if proba is None:
        proba = cross_val_predict(probe_model(p.C), p.X, p.y, cv=cv_folds(p.X, p.y, p.groups), method="predict_proba")  # (N, 7)
    score = negative_mass(proba, range(len(MELD7.labels)), NEGATIVE_IDX)
    calm, upset = human_masks(p.y)
    copy = p.is_copy
    subsets = {"recorded": ~copy, "telephone": copy, "pooled": np.ones_like(copy)}
    out = {}
    for pick in TAU_PICKS:
        tau = pick_tau(score[calm & subsets[pick]], target)
        out[pick] = {"tau": tau, "target": target, **{
            name: {"false_alarms": alarm_share(score[calm & m], tau) * 100, "hits": alarm_share(score[upset & m], tau) * 100}
            for name, m in subsets.items()}}
    return out


def wilson(k: int, n: int) -> tuple[float, float]:
    """The Wilson 95% interval of a share k/n, in percent (scipy's `binomtest(...).proportion_ci`)."""
    from scipy.stats import binomtest

    if n == 0:
        return 0.0, 100.0
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return float(100 * ci.low), float(100 * ci.high)


def nested_train_cv(sources: list[str], bank: FeatureBank, target: float, copies: int = 1) -> dict:
    """Calm-line false alarms on human speakers that nothing was chosen on: nested actor-grouped CV on RAVDESS train.

    The outer loop holds out the actors of one of the 4 folds of `cv_folds` (actors 01-16). On the other 12 actors
    alone, C is chosen by `separation_cv` (its own 4 inner folds) and tau by `pick_tau` on the inner out-of-fold
    P(negative) of their calm telephone copies (<= `target`); the probe is then fitted on those 12 actors and scores
    the held-out actors' clips, as recorded and through their telephone copies. Dev (actors 17-20) is not read.
    Returns {condition: {rule: {false_alarms, hits, counts, wilson}}} over all 16 held-out actors, with the C and tau
    of each outer fold."""
    train = clips("train")
    y = np.array([c.label for c in train])
    groups = np.array([c.speaker for c in train])
    rec, aug = bank.matrix(train, None, sources), bank.copies(train, 0, copies, sources)
    X = np.concatenate([np.concatenate([rec[s] for s in sources], 1), np.concatenate([aug[s] for s in sources], 1)])
    yy, gg = np.tile(y, 1 + copies), np.tile(groups, 1 + copies)
    is_copy = np.arange(len(yy)) >= len(train)
    calm, upset = human_masks(yy)
    alarm = {"argmax": np.zeros(len(yy), bool), "tau": np.zeros(len(yy), bool)}
    held = np.zeros(len(yy), bool)
    folds = []
    for tr, te in cv_folds(X, yy, gg):
        C, _, oof = separation_cv(X[tr], yy[tr], gg[tr], is_copy[tr])
        inner_mass = negative_mass(oof, range(len(MELD7.labels)), NEGATIVE_IDX)
        tau = pick_tau(inner_mass[calm[tr] & is_copy[tr]], target)
        model = probe_model(C).fit(X[tr], yy[tr])
        proba = model.predict_proba(X[te])  # (rows, 7)
        alarm["argmax"][te] = np.isin(model.classes_[proba.argmax(1)], NEGATIVE_IDX)
        alarm["tau"][te] = negative_mass(proba, model.classes_, NEGATIVE_IDX) >= tau
        held[te] = True
        folds.append({"held_out_actors": sorted({str(g) for g in gg[te]}), "C": C, "tau": tau})
        print(f"  outer fold, held out actors {folds[-1]['held_out_actors']}: C={C}, tau={tau:.4f}", flush=True)
    assert held.all()
    out: dict = {"folds": folds, "target": target}
    for cond, m in {"as recorded": ~is_copy, "telephone": is_copy}.items():
        out[cond] = {}
        for rule, a in alarm.items():
            k_fa, n_fa, k_hit, n_hit = int((a & calm & m).sum()), int((calm & m).sum()), int((a & upset & m).sum()), int((upset & m).sum())
            out[cond][rule] = {"false_alarms": 100 * k_fa / n_fa, "false_alarm_count": f"{k_fa}/{n_fa}",
                               "false_alarms_wilson95": wilson(k_fa, n_fa), "hits": 100 * k_hit / n_hit,
                               "hit_count": f"{k_hit}/{n_hit}"}
    return out


def filename_normalised(X: np.ndarray, items: list[Clip], mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Past-only speaker normalisation with each speaker's clips in file-name order (RAVDESS: by emotion code,
    so neutral and calm come first)."""
    order = sorted(range(len(items)), key=lambda i: Path(items[i].path).name)
    out = np.empty_like(X)
    out[order] = _in_line_order(X[order], [items[i] for i in order], mean, std)
    return out


def shipped_on_clips(rec, F: dict[str, np.ndarray], items: list[Clip], norm: bool) -> tuple[list[str], list[str] | None]:
    """The shipped model's audio-only path (empty text) and its encoders alone, on features precomputed per source
    ({source: (clips, F)}); `norm`: the checkpoint's speaker normalisation per actor, past-only, each actor's clips
    in the seeded order of `speaker_normalised` (seed 0)."""
    from tracker.types import UtteranceInput

    audio = [{m.name: F[m.source][i:i + 1] for m in rec.config.adapter.modalities} for i in range(len(items))]
    if norm:
        normalizers, stats = rec.speaker_normalizers(), {}
        for i in in_speaker_time_order(range(len(items)), lambda i: items[i].speaker, lambda i: items[i].clip_id, 0):
            for name, normalizer in normalizers.items():
                st = stats.setdefault((items[i].speaker, name), normalizer.new_stats())
                audio[i][name] = normalizer.step(audio[i][name], st)
    inputs = [UtteranceInput("", c.speaker, (), a) for c, a in zip(items, audio)]
    return [p.label for p in rec.predict(inputs)], encoders_alone(rec, inputs)


def _counts(labels: list[str]) -> str:
    return ", ".join(f"{k} {labels.count(k)}" for k in sorted(set(labels), key=lambda k: (-labels.count(k), k)))


def human_row(name: str, copy: str, neg: np.ndarray, labels: list[str] | None, calm: np.ndarray, upset: np.ndarray) -> dict:
    """One table row: `neg` (clips,) alarm flags, `labels` the labels given (None for a threshold row)."""
    neg = np.asarray(neg, dtype=bool)
    row = {"name": name, "copy": copy, "false_alarms": float(neg[calm].mean() * 100), "hits": float(neg[upset].mean() * 100),
           "false_alarm_count": int(neg[calm].sum()), "calm": int(calm.sum()),
           "hit_count": int(neg[upset].sum()), "upset": int(upset.sum())}
    if labels is None:
        row["calm_labels"] = row["upset_labels"] = "-"
    else:
        row["calm_labels"] = _counts([lb for lb, m in zip(labels, calm) if m])
        row["upset_labels"] = _counts([lb for lb, m in zip(labels, upset) if m])
    return row


def human_main(args) -> int:
    """The --human tables: RAVDESS dev (actors 17-20) calm vs upset clips, as recorded and telephone band."""
    dev = clips("dev")
    calm, upset = human_masks([c.label for c in dev])
    print(f"RAVDESS dev: {len(dev)} clips of {len({c.speaker for c in dev})} actors; {calm.sum()} calm "
          f"(neutral + calm), {upset.sum()} upset (anger, fear, sadness, disgust)\n", flush=True)
    shipped_sources: list[str] = []
    rec = None
    if not args.skip_recognizer:
        from tracker.model.default import default_checkpoint
        from tracker.model.recognizer import EmotionRecognizer

        rec = EmotionRecognizer.from_pretrained(default_checkpoint())
        shipped_sources = [m.source for m in rec.config.adapter.modalities]
    sources = list(dict.fromkeys(([] if args.skip_acoustic else args.sources) + shipped_sources))
    bank = FeatureBank(sources)
    copies = {"as recorded": bank.matrix(dev, None, sources),
              "telephone": bank.matrix(dev, (TELEPHONE_DEV_SEED, COPY_KEY), sources)}  # bench/audio_encoders.py's dev copy
    rows, espeak_rows, taus, dev_oracle, accuracy, selections = [], [], {}, {}, {}, {}
    if not args.skip_acoustic:
        lines = voiced_lines()
        Xl = line_features(lines, args.sources)
        line_calm = np.array([ln["role"] == "agent" for ln in lines])
        for norm in (False, True):
            p = fit_probe(args.sources, norm, bank, args.aug_copies, args.select_c)
            selections["norm" if norm else "plain"] = {"C": p.C, "per_C": p.selection}
            picks = cv_taus(p, args.target_fa)
            taus["norm" if norm else "plain"] = picks
            for pick, rep in picks.items():
                print(f"  tau = {rep['tau']:.4f} ({TAU_PICKS[pick]} <= {args.target_fa:.0%}): train CV false alarms / hits: "
                      f"recordings {rep['recorded']['false_alarms']:.1f}% / {rep['recorded']['hits']:.1f}%, "
                      f"telephone copies {rep['telephone']['false_alarms']:.1f}% / {rep['telephone']['hits']:.1f}%", flush=True)
            base = "acoustic probe" + (" + speaker norm per actor" if norm else "")
            for copy, F in copies.items():
                X = np.concatenate([F[s] for s in args.sources], 1)
                Xa = speaker_normalised(X, dev, p.mean, p.std, 0) if norm else X
                accuracy[f"{base}, {copy}"] = acc(p.model, Xa, np.array([c.label for c in dev]))
                variants = [("", X)] if not norm else [
                    (" (seeded clip order)", speaker_normalised(X, dev, p.mean, p.std, 0)),
                    (" (file-name order: calm clips first)", filename_normalised(X, dev, p.mean, p.std))]
                for k, (suffix, Xv) in enumerate(variants):
                    proba = p.model.predict_proba(Xv)  # (clips, 7)
                    labels = [MELD7.labels[int(c)] for c in p.model.classes_[proba.argmax(1)]]
                    rows.append(human_row(base + suffix, copy, np.array([lb in NEGATIVE for lb in labels]), labels, calm, upset))
                    if k > 0:
                        continue
                    mass = negative_mass(proba, p.model.classes_, NEGATIVE_IDX)
                    for pick, rep in picks.items():
                        rows.append(human_row(f"{base}{suffix}, alarm at P(negative) >= {rep['tau']:.3f} (tau on {pick} train CV)",
                                              copy, mass >= rep["tau"], None, calm, upset))
                    oracle = pick_tau(mass[calm], args.target_fa)  # chosen ON dev: a ceiling, not an operating point
                    dev_oracle[f"{base}{suffix}, {copy}"] = {"tau": oracle, "false_alarms": alarm_share(mass[calm], oracle) * 100,
                                                             "hits": alarm_share(mass[upset], oracle) * 100}
            proba = p.model.predict_proba(probe_lines(p, lines, Xl))
            labels = [MELD7.labels[int(c)] for c in p.model.classes_[proba.argmax(1)]]
            mass = negative_mass(proba, p.model.classes_, NEGATIVE_IDX)
            name = "acoustic probe" + (" + speaker norm per voice" if norm else "")
            espeak_rows.append(human_row(name, "espeak 8 kHz", np.array([lb in NEGATIVE for lb in labels]), labels, line_calm, ~line_calm))
            for pick, rep in picks.items():
                espeak_rows.append(human_row(f"{name}, alarm at P(negative) >= {rep['tau']:.3f} (tau on {pick} train CV)",
                                             "espeak 8 kHz", mass >= rep["tau"], None, line_calm, ~line_calm))
    nested = None
    if args.nested:
        print(f"\nnested actor-grouped CV on RAVDESS train (actors 01-16; C by separation, tau <= {args.target_fa:.0%} on the "
              "inner folds' calm telephone copies; dev not read):", flush=True)
        nested = nested_train_cv(args.sources, bank, args.target_fa, args.aug_copies)
        for cond in ("as recorded", "telephone"):
            for rule, r in nested[cond].items():
                lo, hi = r["false_alarms_wilson95"]
                what = "argmax label negative" if rule == "argmax" else "P(negative) >= the fold's tau"
                print(f"  {cond}, {what}: false alarms {r['false_alarms']:.1f}% ({r['false_alarm_count']}; Wilson 95% "
                      f"{lo:.1f}-{hi:.1f}%), hits {r['hits']:.1f}% ({r['hit_count']})", flush=True)
    if rec is not None:
        for norm in (False, True):
            suffix = ", speaker-normalised per actor (seeded clip order)" if norm else ""
            for copy, F in copies.items():
                audio_only, encoders = shipped_on_clips(rec, F, dev, norm)
                rows.append(human_row(f"shipped recognizer, audio only (empty text){suffix}", copy,
                                      np.array([lb in NEGATIVE for lb in audio_only]), audio_only, calm, upset))
                if encoders is not None:
                    rows.append(human_row(f"shipped adapter's acoustic encoders alone{suffix}", copy,
                                          np.array([lb in NEGATIVE for lb in encoders]), encoders, calm, upset))
    rows.sort(key=lambda r: not r["name"].startswith("acoustic"))  # stable: probe rows first, each name's copies together
    print("\n| recognizer | RAVDESS dev | calm clips labelled negative (false alarms) | upset clips labelled negative (hits) "
          "| labels given to the calm clips | labels given to the upset clips |")
    print("|---|---|---:|---:|---|---|")
    for r in rows + espeak_rows:
        print(f"| {r['name']} | {r['copy']} | {r['false_alarms']:.1f}% ({r['false_alarm_count']}/{r['calm']}) | "
              f"{r['hits']:.1f}% ({r['hit_count']}/{r['upset']}) | {r['calm_labels']} | {r['upset_labels']} |", flush=True)
    if accuracy:
        print(f"\nthe probe's 7-label accuracy on all {len(dev)} dev clips (argmax; normalised: seeded order): "
              + "; ".join(f"{k} {v:.2f}%" for k, v in accuracy.items()))
    if dev_oracle:
        print(f"\nceiling, tau chosen ON dev (not an operating point): the smallest tau with <= {args.target_fa:.0%} of the "
              "dev calm clips alarmed, and the hits it leaves:")
        for name, r in dev_oracle.items():
            print(f"  {name}: tau {r['tau']:.3f}, false alarms {r['false_alarms']:.1f}%, hits {r['hits']:.1f}%")
    if args.json:
        desc = (f"RAVDESS dev (actors 17-20): {int(calm.sum())} calm clips (neutral + calm) and {int(upset.sum())} upset clips "
                "(angry, fearful, sad, disgust), as recorded and through the telephone channel (seed TELEPHONE_DEV_SEED); "
                "negative = anger, disgust, fear or sadness; espeak rows: the call-center lines.")
        Path(args.json).write_text(json.dumps({"description": desc, "rows": rows, "espeak_rows": espeak_rows,
                                               "taus": taus, "dev_ceiling": dev_oracle, "dev_accuracy": accuracy,
                                               "aug_copies": args.aug_copies, "sources": args.sources,
                                               "select_c": args.select_c, "c_selection": selections, "nested_train_cv": nested}, indent=2) + "\n")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sources", nargs="+", default=["whisper_tiny.en_l2_meanstd", "whisper_base_l4_meanstd", EGEMAPS])
    ap.add_argument("--norm", action="store_true", help="past-only speaker normalisation (per voice and role)")
    ap.add_argument("--skip-recognizer", action="store_true")
    ap.add_argument("--skip-acoustic", action="store_true")
    ap.add_argument("--recognizer-norm", action="store_true",
                    help="also run the shipped recognizer with past-only speaker normalisation per voice and role")
    ap.add_argument("--human", action="store_true",
                    help="the human set instead: RAVDESS dev calm vs upset clips, as recorded and telephone band")
    ap.add_argument("--target-fa", type=float, default=0.10,
                    help="--human: the operating point's false-alarm target on train-CV calm clips")
    ap.add_argument("--aug-copies", type=int, default=1,
                    help="telephone copies per RAVDESS train clip for the probe (copy j: seed 1000 j; default 1)")
    ap.add_argument("--select-c", choices=sorted(SELECT_C), default="f1",
                    help="how train CV picks the probe's C: f1 = 7-label weighted F1 (default); separation = ROC AUC of "
                         "P(negative) for calm vs upset clips on the train telephone copies (same folds and C grid)")
    ap.add_argument("--nested", action="store_true",
                    help="--human: also the nested actor-grouped CV estimate on RAVDESS train (C and tau chosen on the "
                         "other actors only; `nested_train_cv`)")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args()
    if args.human:
        return human_main(args)
    lines = voiced_lines()
    print(f"{len(lines)} lines voiced at 8 kHz ({sum(len(ln['audio']) / ln['rate'] for ln in lines):.0f} s)\n", flush=True)
    rows = []
    if not args.skip_acoustic:
        rows.append((f"acoustic path: probe on {' + '.join(args.sources)}{' + speaker norm' if args.norm else ''}",
                     acoustic_path(lines, args.sources, args.norm, args.aug_copies, args.select_c)))
    if not args.skip_recognizer:
        text_audio, audio_only, encoders = full_recognizer(lines)
        rows += [("shipped recognizer (tracker/assets/model), text + audio", text_audio),
                 ("shipped recognizer, audio only (empty text)", audio_only)]
        if encoders is not None:
            rows.append(("shipped adapter's acoustic encoders alone (auxiliary classifiers, no LLM)", encoders))
        if args.recognizer_norm:
            text_audio, audio_only, encoders = full_recognizer(lines, norm=True)
            rows += [("shipped recognizer, text + audio, speaker-normalised per voice", text_audio),
                     ("shipped recognizer, audio only, speaker-normalised per voice", audio_only)]
            if encoders is not None:
                rows.append(("shipped adapter's acoustic encoders alone, speaker-normalised per voice", encoders))
    print("| recognizer | calm lines labelled negative (false alarms) | upset lines labelled negative (hits) | labels given to calm lines |")
    print("|---|---:|---:|---|")
    out = []
    for name, preds in rows:
        fa, hit = rates(preds, lines)
        calm = [p for p, ln in zip(preds, lines) if ln["role"] == "agent"]
        upset = [p for p, ln in zip(preds, lines) if ln["role"] == "customer"]
        counts = ", ".join(f"{k} {calm.count(k)}" for k in sorted(set(calm), key=calm.count, reverse=True))
        upset_counts = ", ".join(f"{k} {upset.count(k)}" for k in sorted(set(upset), key=upset.count, reverse=True))
        print(f"| {name} | {fa:.1f}% | {hit:.1f}% | {counts} |", flush=True)
        out.append({"name": name, "shipped": name.startswith("shipped"), "false_alarms": fa, "hits": hit,
                    "calm_labels": counts, "upset_labels": upset_counts})
    if args.json:
        n_calm = sum(ln["role"] == "agent" for ln in lines)
        desc = (f"{n_calm} calm agent lines and {len(lines) - n_calm} upset customer lines written for this project, voiced "
                "with espeak-ng and put through the telephone channel (8 kHz); negative = anger, disgust, fear or sadness.")
        Path(args.json).write_text(json.dumps({"description": desc, "rows": out, "sources": args.sources,
                                               "norm": args.norm}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
