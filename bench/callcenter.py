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
  regression, C by actor-grouped CV) trained on RAVDESS train as recorded plus one telephone-channel
  copy per clip (seed 0), on the `--sources` features (default: Whisper tiny.en block 2 + base
  block 4 + eGeMAPS functionals, the best of bench/audio_encoders.py), optionally with past-only
  speaker normalisation per voice and role;
- the full shipped recognizer (tracker/assets/model: Gemma-3-270M + the adapter reading the text and its
  acoustic modalities), with the text and the 8 kHz audio, and with the audio alone (empty text); and
  the adapter's acoustic encoders without the LLM (their auxiliary classifiers, logits summed);
  `--recognizer-norm` adds these again with the checkpoint's speaker normalisation per voice and role.

    python bench/callcenter.py [--sources ...] [--norm] [--skip-recognizer] [--skip-acoustic] [--recognizer-norm] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from audio_encoders import EGEMAPS, FeatureBank, clips, probe, speaker_normalised  # noqa: E402

from tracker.audio.channel import TELEPHONE_DEV_SEED, TelephoneChannel  # noqa: E402
from tracker.audio.modalities import ModalityFeatures  # noqa: E402
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


def acoustic_path(lines: list[dict], sources: list[str], norm: bool) -> list[str]:
    train = clips("train")
    y = np.array([c.label for c in train])
    groups = np.array([c.speaker for c in train])
    bank = FeatureBank(sources)
    rec, aug = bank.matrix(train, None, sources), bank.matrix(train, (0, "aug"), sources)
    X = np.concatenate([np.concatenate([rec[s] for s in sources], 1), np.concatenate([aug[s] for s in sources], 1)])
    feats = {s: ModalityFeatures({"x": s}) for s in sources}
    Xc = np.stack([np.concatenate([feats[s].from_signal(ln["audio"], ln["rate"])["x"][0] for s in sources]) for ln in lines])
    mean, std = X.mean(0), X.std(0)
    if norm:
        half = len(train)
        X = np.concatenate([speaker_normalised(X[:half], train, mean, std, 0), speaker_normalised(X[half:], train, mean, std, 0)])
        from audio_encoders import Clip

        who = [Clip(f"{ln['role']}-{ln['index']}", f"{ln['role']}:{ln['voice']}", 0, "") for ln in lines]
        Xc = _in_line_order(Xc, who, mean, std)
    model, C, cv = probe(X, np.concatenate([y, y]), np.concatenate([groups, groups]))
    print(f"acoustic probe: C={C} (train CV weighted F1 {cv:.3f})", flush=True)
    return [MELD7.labels[int(k)] for k in model.predict(Xc)]


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sources", nargs="+", default=["whisper_tiny.en_l2_meanstd", "whisper_base_l4_meanstd", EGEMAPS])
    ap.add_argument("--norm", action="store_true", help="past-only speaker normalisation (per voice and role)")
    ap.add_argument("--skip-recognizer", action="store_true")
    ap.add_argument("--skip-acoustic", action="store_true")
    ap.add_argument("--recognizer-norm", action="store_true",
                    help="also run the shipped recognizer with past-only speaker normalisation per voice and role")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args()
    lines = voiced_lines()
    print(f"{len(lines)} lines voiced at 8 kHz ({sum(len(ln['audio']) / ln['rate'] for ln in lines):.0f} s)\n", flush=True)
    rows = []
    if not args.skip_acoustic:
        rows.append((f"acoustic path: probe on {' + '.join(args.sources)}{' + speaker norm' if args.norm else ''}",
                     acoustic_path(lines, args.sources, args.norm)))
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
