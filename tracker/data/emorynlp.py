"""EmoryNLP (Friends scenes): ``emorynlp/emorynlp_{train,dev}_final.csv`` -> conversations.

A conversation is a scene: the rows sharing (Season, Episode, Scene_ID), ordered by Utterance_ID.
Ids: conversation ``emorynlp-dev-s1e15-c6``, utterance ``emorynlp-dev-s1e15-c6-8`` (the source
Utterance_ID). Labels are lowercased into the emorynlp7 set. The test split is held out.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from tracker.data.meld import parse_timestamp
from tracker.data.paths import DatasetError, csv_rows, split_file
from tracker.data.records import Conversation, Utterance, build_conversation
from tracker.labels import EMORYNLP7

SPLITS = ("train", "dev")
COLUMNS = ("Utterance", "Speaker", "Emotion", "Scene_ID", "Utterance_ID", "Season", "Episode")
SPEAKER_JOIN = " & "


def parse_speakers(raw: str) -> list[str]:
    """``"['Monica Geller', 'Phoebe Buffay']"`` -> ``['Monica Geller', 'Phoebe Buffay']``.

    Parsed with `ast.literal_eval` (literals only, never code). A value that is not a list literal
    is taken as one plain name.
    """
    raw = raw.strip()
    if not raw.startswith("["):
        if not raw:
            raise ValueError("empty speaker")
        return [raw]
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        raise ValueError(f"speaker is not a valid list literal: {raw!r}") from None
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(s, str) and s.strip() for s in value):
        raise ValueError(f"speaker must be a non-empty list of names, got {raw!r}")
    return [s.strip() for s in value]


def emorynlp_path(split: str, root: Path | None = None) -> Path:
    return split_file("emorynlp", split, SPLITS, f"emorynlp/emorynlp_{split}_final.csv", root)


def read_emorynlp(split: str, root: Path | None = None) -> list[Conversation]:
    """The EmoryNLP ``split`` as scenes ordered by (season, episode, scene).

    Several speakers (``['Chandler Bing', 'Joey Tribbiani']``) are joined with ``" & "``; the list
    is kept in ``extra["speakers"]`` along with season, episode, scene and episode times.
    """
    path = emorynlp_path(split, root)
    scenes: dict[tuple[int, int, int], list[Utterance]] = defaultdict(list)
    seen: dict[tuple[int, int, int, int], int] = {}
    with csv_rows(path, COLUMNS) as reader:
        for row in reader:
            where = f"{path}:{reader.line_num}"
            try:
                season, episode = int(row["Season"]), int(row["Episode"])
                scene, utt_no = int(row["Scene_ID"]), int(row["Utterance_ID"])
            except ValueError:
                raise DatasetError(f"{where}: Season/Episode/Scene_ID/Utterance_ID must be integers") from None
            key = (season, episode, scene, utt_no)
            if key in seen:
                raise DatasetError(f"{where}: duplicate utterance {key} (first on line {seen[key]})")
            seen[key] = reader.line_num
            try:
                speakers = parse_speakers(row["Speaker"])
            except ValueError as exc:
                raise DatasetError(f"{where}: {exc}") from None
            label = row["Emotion"].strip().lower()
            if label not in EMORYNLP7.labels:
                raise DatasetError(f"{where}: emotion {row['Emotion']!r} is not an emorynlp7 label")
            try:
                start_s = parse_timestamp(row.get("Start_Time") or "")
                end_s = parse_timestamp(row.get("End_Time") or "")
            except ValueError as exc:
                raise DatasetError(f"{where}: {exc}") from None
            conv_id = f"emorynlp-{split}-s{season}e{episode}-c{scene}"
            scenes[season, episode, scene].append(
                Utterance(
                    conversation_id=conv_id,
                    utterance_id=f"{conv_id}-{utt_no}",
                    index=utt_no,
                    speaker=SPEAKER_JOIN.join(speakers),
                    text=row["Utterance"],
                    label=label,
                    extra={
                        "speakers": speakers,
                        "season": season,
                        "episode": episode,
                        "scene_id": scene,
                        "source_utterance_id": utt_no,
                        "episode_start_s": start_s,
                        "episode_end_s": end_s,
                    },
                )
            )
    return [
        build_conversation(utts[0].conversation_id, sorted(utts, key=lambda u: u.index))
        for _, utts in sorted(scenes.items())
    ]
