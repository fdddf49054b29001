"""A tiny model that labels known sentences as the test wants: ANGRY ones `anger`, CALM ones `neutral`.

Trained in seconds on the tiny random backbone (text only, no context), so a service test controls
the labels without mocking anything. Used by the dashboard and the alert/metrics service tests.
"""

from __future__ import annotations

import json
from pathlib import Path

ANGRY = [
    "This is absolutely unacceptable and I am furious!",
    "I have been waiting for an hour, this is outrageous!",
    "Stop wasting my time, you people are useless!",
    "I am sick and tired of your lies!",
    "Give me my money back right now, I am livid!",
    "This is the worst service I have ever had, I am so angry!",
]
CALM = [
    "Thank you, that sounds fine.",
    "Could you please check my account balance?",
    "Sure, let me look that up for you.",
    "The order number is one two three four.",
    "Okay, I understand, have a nice day.",
    "Yes, the address is still the same.",
]


def train_anger_neutral(tmp: Path, backbone, speakers: list[str], name: str = "dash") -> Path:
    """Train the tiny adapter until every (sentence, speaker) gets its label; returns the checkpoint folder."""
    import torch

    from tracker.config import load_dataclass
    from tracker.model.inputs import UtteranceInput
    from tracker.model.recognizer import EmotionRecognizer
    from tracker.training.config import TrainConfig
    from tracker.training.trainer import Trainer

    rows = []
    for i, (text, label) in enumerate([(t, "anger") for t in ANGRY] + [(t, "neutral") for t in CALM]):
        for speaker in speakers:
            rows.append({"conversation_id": f"c{i}-{speaker}", "utterance_id": f"u{i}-{speaker}",
                         "speaker": speaker, "text": text, "label": label})
    data = tmp / "calls.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    steps = 150
    cfg = load_dataclass(TrainConfig, {
        "name": name, "output_dir": str(tmp),
        "model": {"backbone": "tiny", "dtype": "fp32", "head": "linear", "prompt": {"context_turns": 0},
                  "adapter": {"d_model": 32, "n_pseudo_tokens": 4}},
        "train": [{"spec": str(data), "repeat": 4}],
        "dev": [{"spec": str(data)}],
        "epochs": 100, "max_steps": steps, "eval_every_steps": steps,  # one evaluation, at the end
        "batch_size": 8, "lr": 0.01, "warmup_ratio": 0.0, "class_weighting": "none",
        "autocast_bf16": False, "checkpoint_minutes": 60,
    })
    torch.manual_seed(0)
    trainer = Trainer(cfg, recognizer=EmotionRecognizer(backbone, cfg.model), progress=False)
    trainer.fit(resume=False)
    best = tmp / name / "best"
    model = EmotionRecognizer.from_pretrained(best, backbone=backbone)
    items = [(t, s, lab) for t, lab in [(t, "anger") for t in ANGRY] + [(t, "neutral") for t in CALM] for s in speakers]
    preds = model.predict([UtteranceInput(t, s) for t, s, _ in items])
    wrong = [(t, s, lab, p.label) for (t, s, lab), p in zip(items, preds) if p.label != lab]
    assert not wrong, f"the tiny model did not learn its sentences: {wrong}"
    return best
