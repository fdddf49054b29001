"""MELD (Friends dialogues): ``meld/{train,dev}_sent_emo.csv`` -> conversations with MELD7 labels.

A dialogue is the rows sharing ``Dialogue_ID``, ordered by ``Utterance_ID`` (which has gaps: MELD
dropped some rows). Ids: conversation ``meld-dev-12``, utterance ``meld-dev-12-3`` (the source
Utterance_ID, not the position). The test split is held out and deliberately absent.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from tracker.data.paths import DatasetError, csv_rows, split_file
from tracker.data.records import Conversation, Utterance, build_conversation
from tracker.labels import MELD7, SENTIMENT3

SPLITS = ("train", "dev")
COLUMNS = ("Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID", "StartTime", "EndTime")

# --- mojibake -----------------------------------------------------------------------------------
# MELD's original CSVs were UTF-8 decoded as Windows-1252 and re-encoded, so "’" shows up as "â€™",
# "…" as "â€¦", "é" as "Ã©". Such a run of characters re-encodes (cp1252) to the original UTF-8
# bytes. Each cp1252 byte >= 0x80 maps to one character; the five bytes cp1252 leaves undefined
# survive as the C1 control with the same code (what Python's "latin-1" fallback produces).

_CP1252_BYTE: dict[str, int] = {}
for _b in range(0x80, 0x100):
    try:
        _CP1252_BYTE[bytes([_b]).decode("cp1252")] = _b
    except UnicodeDecodeError:
        _CP1252_BYTE[chr(_b)] = _b
_HIGH_RUN = re.compile("[" + "".join(re.escape(c) for c in _CP1252_BYTE) + "]{2,}")
MOJIBAKE_MARKERS = ("â€", "Ã", "Â", "ï»¿")


def fix_mojibake(text: str) -> str:
    """Repair UTF-8-read-as-cp1252 runs (``'donâ€™t'`` -> ``'don’t'``), leaving the rest alone.

    Only runs when a marker is present, and repairs run by run so that correct characters next
    to broken ones (``'Nestlé'``, a real ``’``) are kept; a run that is not valid UTF-8 once
    re-encoded is left as it was. Repeats (at most 3 times) for doubly broken text.
    """

    def repair(match: re.Match[str]) -> str:
        run = match.group(0)
        try:
            return bytes(_CP1252_BYTE[c] for c in run).decode("utf-8")
        except UnicodeDecodeError:
            return run

    for _ in range(3):
        if not any(m in text for m in MOJIBAKE_MARKERS):
            break
        fixed = _HIGH_RUN.sub(repair, text)
        if fixed == text:
            break
        text = fixed
    return text


def has_mojibake(text: str) -> bool:
    return any(m in text for m in MOJIBAKE_MARKERS)


# --- reader -------------------------------------------------------------------------------------


def parse_timestamp(value: str) -> float | None:
    """``'00:20:57,256'`` (also ``'0:19:07,229'`` or ``'00:00:03.795'``) -> seconds; ``None`` if blank."""
    value = value.strip()
    if not value:
        return None
    match = re.fullmatch(r"(\d+):(\d{1,2}):(\d{1,2})[,.](\d{1,3})", value)
    if not match:
        raise ValueError(f"not a timestamp: {value!r}")
    h, m, s, frac = match.groups()
    return int(h) * 3600 + int(m) * 60 + int(s) + int(frac.ljust(3, "0")) / 1000


def meld_path(split: str, root: Path | None = None) -> Path:
    return split_file("meld", split, SPLITS, f"meld/{split}_sent_emo.csv", root)


def read_meld(split: str, root: Path | None = None) -> list[Conversation]:
    """The MELD ``split`` as conversations ordered by Dialogue_ID, utterances by Utterance_ID.

    ``extra`` keeps ``sentiment``, ``dialogue_id``, ``source_utterance_id``, ``sr_no`` (not unique
    in train), ``season``, ``episode`` and the episode times ``episode_start_s``/``episode_end_s``.
    """
    path = meld_path(split, root)
    by_dialogue: dict[int, list[Utterance]] = defaultdict(list)
    seen: dict[tuple[int, int], int] = {}
    with csv_rows(path, COLUMNS) as reader:
        for row in reader:
            where = f"{path}:{reader.line_num}"
            try:
                dialogue, utt_no = int(row["Dialogue_ID"]), int(row["Utterance_ID"])
            except ValueError:
                raise DatasetError(f"{where}: Dialogue_ID/Utterance_ID must be integers") from None
            if (dialogue, utt_no) in seen:
                raise DatasetError(f"{where}: duplicate Dialogue_ID {dialogue} Utterance_ID {utt_no} "
                                   f"(first on line {seen[dialogue, utt_no]})")
            seen[dialogue, utt_no] = reader.line_num
            label = row["Emotion"].strip().lower()
            if label not in MELD7.labels:
                raise DatasetError(f"{where}: emotion {row['Emotion']!r} is not a MELD7 label")
            sentiment = row["Sentiment"].strip().lower()
            if sentiment not in SENTIMENT3.labels:
                raise DatasetError(f"{where}: sentiment {row['Sentiment']!r} is not one of {SENTIMENT3.labels}")
            try:
                start_s, end_s = parse_timestamp(row["StartTime"]), parse_timestamp(row["EndTime"])
            except ValueError as exc:
                raise DatasetError(f"{where}: {exc}") from None
            conv_id = f"meld-{split}-{dialogue}"
            by_dialogue[dialogue].append(
                Utterance(
                    conversation_id=conv_id,
                    utterance_id=f"{conv_id}-{utt_no}",
                    index=utt_no,
                    speaker=fix_mojibake(row["Speaker"].strip()),
                    text=fix_mojibake(row["Utterance"]),
                    label=label,
                    extra={
                        "sentiment": sentiment,
                        "dialogue_id": dialogue,
                        "source_utterance_id": utt_no,
                        "sr_no": row.get("Sr No.", ""),
                        "season": row.get("Season", ""),
                        "episode": row.get("Episode", ""),
                        "episode_start_s": start_s,
                        "episode_end_s": end_s,
                    },
                )
            )
    return [
        build_conversation(f"meld-{split}-{d}", sorted(by_dialogue[d], key=lambda u: u.index))
        for d in sorted(by_dialogue)
    ]
