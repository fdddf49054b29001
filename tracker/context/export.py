"""A stored conversation as a file: JSONL (the project's conversation format) or CSV.

Both list the conversation's final results oldest first (``get_conversation`` output).

- **JSONL**: one line per utterance in the format of docs/data-format.md (``conversation_id``,
  ``utterance_id``, ``speaker``, ``text``, ``label`` = the tracker's label) with everything else the
  service stored under ``extra`` (``seq``, ``start_ms``, ``end_ms``, ``probabilities``, ``score``,
  ``modalities``, ...). ``tracker.data.read_jsonl`` reads it back (audio-only utterances have empty
  text, which that format accepts only with audio), so a reviewed export can become training data.
- **CSV**: ``conversation_id, seq, utterance_id, speaker, start_ms, end_ms, text, label,
  confidence, score, modalities`` and one ``p_<label>`` column per label of the label set.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any, Iterable, Mapping, Sequence

FORMATS = {"jsonl": "application/x-ndjson", "csv": "text/csv; charset=utf-8"}
CSV_COLUMNS = ("conversation_id", "seq", "utterance_id", "speaker", "start_ms", "end_ms", "text", "label",
               "confidence", "score", "modalities", "text_source", "asr_confidence")
_TOP = ("utterance_id", "speaker", "text", "label")
_DROPPED = ("entry_id", "conversation_id", "type")  # the stream position and duplicates of the line's own fields


def to_jsonl(conversation_id: str, utterances: Iterable[Mapping[str, Any]]) -> str:
    lines = []
    for u in utterances:
        extra = {k: v for k, v in u.items() if k not in _TOP and k not in _DROPPED}
        line = {"conversation_id": conversation_id, **{k: u.get(k, "") for k in _TOP}, "extra": extra}
        lines.append(json.dumps(line, ensure_ascii=False, separators=(",", ":"), allow_nan=False))
    return "".join(line + "\n" for line in lines)


def to_csv(conversation_id: str, utterances: Iterable[Mapping[str, Any]], labels: Sequence[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow([*CSV_COLUMNS, *(f"p_{label}" for label in labels)])
    for u in utterances:
        probs = u.get("probabilities") or {}
        writer.writerow([
            conversation_id, u.get("seq", ""), u.get("utterance_id", ""), u.get("speaker", ""), u.get("start_ms", ""),
            u.get("end_ms", ""), u.get("text", ""), u.get("label", ""), _num(probs.get(u.get("label"))),
            _num(u.get("score")), "+".join(u.get("modalities") or ()), u.get("text_source") or "",
            _num(u.get("asr_confidence")), *(_num(probs.get(label)) for label in labels),
        ])
    return out.getvalue()


def _num(x: Any) -> str:
    return "" if x is None else repr(float(x))


def export_conversation(conversation: Mapping[str, Any], fmt: str, labels: Sequence[str]) -> str:
    """`conversation` as returned by ``get_conversation``, in format `fmt` ("jsonl" or "csv")."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    cid, utts = conversation["conversation_id"], conversation.get("utterances") or []
    return to_jsonl(cid, utts) if fmt == "jsonl" else to_csv(cid, utts, labels)


__all__ = ["CSV_COLUMNS", "FORMATS", "export_conversation", "to_csv", "to_jsonl"]
