"""RAVDESS (acted emotional speech, actors 01-20 here): ``ravdess_16k/labels.csv`` -> conversations.

Every clip is a one-utterance conversation ``ravdess-03-01-05-02-01-01-17`` (the file stem) whose
text is the fixed sentence, speaker the actor (``actor_17``), label the ravdess8 emotion and
``audio_path`` the absolute FLAC path. The words carry no emotion: only the voice does.

Splits are speaker-independent, by actor:

- dev: actors 17 (male), 18 (female), 19 (male), 20 (female);
- train: actors 01-16 (8 male, 8 female);
- actors 21-24 are held out and absent from the shared data.

The two byte-identical Actor_07 clips (``03-01-03-01-02-{01,02}-07``) are both in train.
"""

from __future__ import annotations

from pathlib import Path

from tracker.data.paths import DatasetError, csv_rows, data_dir, require_file
from tracker.data.records import Conversation, Utterance
from tracker.labels import RAVDESS8, RAVDESS_TO_MELD

SPLITS = ("train", "dev")
ALL_ACTORS: tuple[str, ...] = tuple(f"actor_{i:02d}" for i in range(1, 21))
DEV_ACTORS: tuple[str, ...] = ("actor_17", "actor_18", "actor_19", "actor_20")
TRAIN_ACTORS: tuple[str, ...] = tuple(a for a in ALL_ACTORS if a not in DEV_ACTORS)
HELD_OUT_ACTORS: tuple[str, ...] = tuple(f"actor_{i:02d}" for i in range(21, 25))
COLUMNS = ("path", "speaker", "gender", "emotion", "intensity", "statement_text")


def ravdess_split(split: str) -> tuple[str, ...]:
    """The actor ids (``actor_01`` ...) of ``split`` ("train" or "dev"); fixed, no randomness."""
    if split == "test":
        raise DatasetError("ravdess:test (actors 21-24) is held out and absent from the shared data; use ravdess:dev")
    if split not in SPLITS:
        raise DatasetError(f"unknown RAVDESS split {split!r} (known: {', '.join(SPLITS)})")
    overlap = set(TRAIN_ACTORS) & set(DEV_ACTORS)
    assert not overlap, f"actors on both sides of the RAVDESS split: {sorted(overlap)}"
    return TRAIN_ACTORS if split == "train" else DEV_ACTORS


def read_ravdess(split: str | None = None, root: Path | None = None, to_meld: bool = False) -> list[Conversation]:
    """Clips of ``split`` (``None``: every clip in labels.csv), in labels.csv order.

    With ``to_meld`` labels are folded into MELD7 via `RAVDESS_TO_MELD` (calm -> neutral, ...);
    the original emotion is always in ``extra["ravdess_emotion"]``.
    """
    actors = set(ravdess_split(split)) if split is not None else None
    folder = (root or data_dir()) / "ravdess_16k"
    path = require_file(folder / "labels.csv")
    conversations: list[Conversation] = []
    with csv_rows(path, COLUMNS) as reader:
        for row in reader:
            where = f"{path}:{reader.line_num}"
            speaker = row["speaker"].strip()
            if actors is not None and speaker not in actors:
                continue
            emotion = row["emotion"].strip().lower()
            if emotion not in RAVDESS8.labels:
                raise DatasetError(f"{where}: emotion {row['emotion']!r} is not a ravdess8 label")
            rel = Path(row["path"].strip())
            if rel.parent.name.lower() != speaker:
                raise DatasetError(f"{where}: path {rel} is not in the folder of speaker {speaker!r}")
            conv_id = f"ravdess-{rel.stem}"
            utt = Utterance(
                conversation_id=conv_id,
                utterance_id=conv_id,
                index=0,
                speaker=speaker,
                text=row["statement_text"].strip(),
                label=RAVDESS_TO_MELD[emotion] if to_meld else emotion,
                audio_path=str((folder / rel).resolve()),
                extra={
                    "ravdess_emotion": emotion,
                    "gender": row["gender"].strip(),
                    "intensity": row["intensity"].strip(),
                    "statement_id": row.get("statement_id", ""),
                    "repetition": row.get("repetition", ""),
                    "duration_s": float(row["duration_s"]) if row.get("duration_s") else None,
                },
            )
            conversations.append(Conversation(conversation_id=conv_id, utterances=[utt]))
    return conversations
