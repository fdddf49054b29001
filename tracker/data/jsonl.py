"""Users' own conversations as JSONL: one utterance per line (format in docs/data-format.md).

``validate_jsonl`` reports every problem at once, each naming its line and field, so that a bad
file is fixed in one go rather than one error per run; ``read_jsonl`` refuses a file with any.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from tracker.data.records import Conversation, Utterance, build_conversation
from tracker.labels import LabelSet, get_label_set

FIELDS = ("conversation_id", "utterance_id", "speaker", "text", "audio", "label", "index", "extra")
AUDIO_FIELDS = ("path", "start", "end")
MAX_ERRORS_SHOWN = 20

LabelSpec = LabelSet | str | Iterable[str] | None


@dataclass(frozen=True)
class ValidationError:
    """One problem in a JSONL file: 1-based ``line`` (None: the whole file) and dotted ``field``."""

    line: int | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = ", ".join(
            part for part in (
                f"line {self.line}" if self.line is not None else "",
                f"field '{self.field}'" if self.field else "",
            ) if part
        )
        return f"{where}: {self.message}" if where else self.message


class JsonlFormatError(ValueError):
    """A JSONL file failed validation; ``errors`` holds all of them, the message the first 20."""

    def __init__(self, path: str | Path, errors: list[ValidationError]) -> None:
        self.path = Path(path)
        self.errors = list(errors)
        lines = [str(e) for e in errors[:MAX_ERRORS_SHOWN]]
        if len(errors) > MAX_ERRORS_SHOWN:
            lines.append(f"... and {len(errors) - MAX_ERRORS_SHOWN} more")
        super().__init__(f"{path}: {len(errors)} error(s):\n  " + "\n  ".join(lines))


@dataclass
class _Row:
    """A line that passed the per-line checks (cross-line checks may still fail)."""

    line: int
    obj: dict[str, Any]
    audio_path: str | None = None
    errors: list[ValidationError] = field(default_factory=list)


def _label_names(label_set: LabelSpec) -> tuple[str, tuple[str, ...]] | None:
    if label_set is None:
        return None
    if isinstance(label_set, LabelSet):
        return label_set.name, label_set.labels
    if isinstance(label_set, str):
        ls = get_label_set(label_set)
        return ls.name, ls.labels
    labels = tuple(label_set)
    return "given", labels


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed (not standard JSON)")


def _check_line(line: int, obj: dict[str, Any], base: Path, labels: tuple[str, tuple[str, ...]] | None,
                check_files: bool) -> _Row:
    row = _Row(line=line, obj=obj)

    def err(name: str | None, message: str) -> None:
        row.errors.append(ValidationError(line, name, message))

    for key in obj:
        if key not in FIELDS:
            err(key, f"unknown field (known: {', '.join(FIELDS)})")
    for key in ("conversation_id", "utterance_id", "speaker"):
        if key not in obj:
            err(key, "required field is missing")
        elif not isinstance(obj[key], str) or not obj[key].strip():
            err(key, f"must be a non-empty string, got {_show(obj[key])}")

    audio = obj.get("audio")
    if audio is not None:
        if not isinstance(audio, dict):
            err("audio", f"must be an object {{path, start, end}}, got {_show(audio)}")
        else:
            for key in audio:
                if key not in AUDIO_FIELDS:
                    err(f"audio.{key}", f"unknown field (known: {', '.join(AUDIO_FIELDS)})")
            path = audio.get("path")
            if "path" not in audio:
                err("audio.path", "required field is missing")
            elif not isinstance(path, str) or not path.strip():
                err("audio.path", f"must be a non-empty string, got {_show(path)}")
            else:
                full = Path(path) if os.path.isabs(path) else base / path
                row.audio_path = os.path.normpath(full)
                if check_files and not os.path.isfile(row.audio_path):
                    err("audio.path", f"file not found: {row.audio_path}")
            start, end = audio.get("start"), audio.get("end")
            start_ok = end_ok = True
            if start is not None and not (_is_number(start) and start >= 0):
                err("audio.start", f"must be a number >= 0, got {_show(start)}")
                start_ok = False
            if end is not None and not (_is_number(end) and end > 0):
                err("audio.end", f"must be a number > 0, got {_show(end)}")
                end_ok = False
            if start is not None and end is not None and start_ok and end_ok and end <= start:
                err("audio.end", f"must be greater than audio.start ({_show(start)}), got {_show(end)}")

    if "text" not in obj:
        err("text", "required field is missing")
    elif not isinstance(obj["text"], str):
        err("text", f"must be a string, got {_show(obj['text'])}")
    elif not obj["text"].strip() and audio is None:
        err("text", "must not be empty unless 'audio' is given")

    label = obj.get("label")
    if label is not None:
        if not isinstance(label, str):
            err("label", f"must be a string or null, got {_show(label)}")
        elif labels is not None and label not in labels[1]:
            err("label", f"{_show(label)} is not in label set '{labels[0]}' ({', '.join(labels[1])})")

    index = obj.get("index")
    if index is not None and not (isinstance(index, int) and not isinstance(index, bool) and index >= 0):
        err("index", f"must be an integer >= 0, got {_show(index)}")

    extra = obj.get("extra")
    if extra is not None and not isinstance(extra, dict):
        err("extra", f"must be an object, got {_show(extra)}")
    return row


def _parse(path: Path, label_set: LabelSpec, check_files: bool) -> tuple[list[_Row], list[ValidationError]]:
    labels = _label_names(label_set)
    base = path.parent.absolute()
    rows: list[_Row] = []
    errors: list[ValidationError] = []
    first_id_line: dict[str, int] = {}
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                errors.append(ValidationError(line_no, None, f"not valid UTF-8 ({exc.reason} at byte {exc.start})"))
                continue
            if not text.strip():
                continue
            try:
                obj = json.loads(text.rstrip(), parse_constant=_reject_constant)
            except (ValueError, RecursionError) as exc:
                reason = f"{exc.msg} (column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else str(exc)
                errors.append(ValidationError(line_no, None, f"invalid JSON: {reason}"))
                continue
            if not isinstance(obj, dict):
                kind = {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(obj), "number")
                errors.append(ValidationError(line_no, None, f"expected a JSON object, got {kind}"))
                continue
            row = _check_line(line_no, obj, base, labels, check_files)
            uid = obj.get("utterance_id")
            if isinstance(uid, str) and uid.strip():
                if uid in first_id_line:
                    row.errors.append(ValidationError(
                        line_no, "utterance_id", f"duplicate {_show(uid)} (first used on line {first_id_line[uid]})"))
                else:
                    first_id_line[uid] = line_no
            errors.extend(row.errors)
            rows.append(row)
    errors.extend(_check_indices(rows))
    if not rows and not errors:
        errors.append(ValidationError(None, None, "the file holds no utterances"))
    errors.sort(key=lambda e: (e.line is not None, e.line or 0))
    return rows, errors


def _check_indices(rows: list[_Row]) -> list[ValidationError]:
    """Within a conversation ``index`` must be given on every line or none, without repeats."""
    errors: list[ValidationError] = []
    by_conv: dict[str, list[_Row]] = defaultdict(list)
    for row in rows:
        if isinstance(row.obj.get("conversation_id"), str):
            by_conv[row.obj["conversation_id"]].append(row)
    for conv_id, conv_rows in by_conv.items():
        with_index = [r for r in conv_rows if r.obj.get("index") is not None]
        if not with_index:
            continue
        indexed = {id(r) for r in with_index}
        for r in conv_rows:
            if id(r) not in indexed:
                errors.append(ValidationError(
                    r.line, "index", f"missing, but conversation {_show(conv_id)} gives it on line {with_index[0].line}; "
                    f"give it on every line of a conversation or on none"))
        first: dict[Any, int] = {}
        for r in with_index:
            idx = r.obj["index"]
            if isinstance(idx, int) and idx in first:
                errors.append(ValidationError(
                    r.line, "index", f"duplicate index {idx} in conversation {_show(conv_id)} (first on line {first[idx]})"))
            else:
                first.setdefault(idx, r.line)
    return errors


def validate_jsonl(path: str | Path, label_set: LabelSpec = None, check_files: bool = True) -> list[ValidationError]:
    """Every problem in the JSONL file at ``path`` (empty list: the file is valid), by line.

    ``label_set`` (a LabelSet, its name or a list of labels) restricts ``label``; ``check_files``
    also requires each ``audio.path`` to exist.
    """
    return _parse(Path(path), label_set, check_files)[1]


def read_jsonl(path: str | Path, label_set: LabelSpec = None, check_files: bool = True) -> list[Conversation]:
    """The conversations of a valid JSONL file, in order of first appearance.

    Utterances are ordered by ``index`` when given, else by file order; audio paths become
    absolute. Raises `JsonlFormatError` listing the errors if the file is not valid.
    """
    path = Path(path)
    rows, errors = _parse(path, label_set, check_files)
    if errors:
        raise JsonlFormatError(path, errors)
    grouped: dict[str, list[_Row]] = defaultdict(list)
    for row in rows:
        grouped[row.obj["conversation_id"]].append(row)
    conversations = []
    for conv_id, conv_rows in grouped.items():
        if conv_rows[0].obj.get("index") is not None:
            conv_rows = sorted(conv_rows, key=lambda r: r.obj["index"])
        utterances = []
        for row in conv_rows:
            obj = row.obj
            audio = obj.get("audio") or {}
            utterances.append(Utterance(
                conversation_id=conv_id,
                utterance_id=obj["utterance_id"],
                index=0,
                speaker=obj["speaker"],
                text=obj["text"],
                label=obj.get("label"),
                audio_path=row.audio_path,
                start_s=float(audio["start"]) if audio.get("start") is not None else None,
                end_s=float(audio["end"]) if audio.get("end") is not None else None,
                extra=dict(obj.get("extra") or {}),
            ))
        conversations.append(build_conversation(conv_id, utterances))
    return conversations


def write_jsonl(conversations: Iterable[Conversation], path: str | Path) -> Path:
    """Write conversations in the JSONL format (order = file order, so no ``index`` is written).

    Audio paths under the output folder are written relative to it (the file and its audio can
    be moved together); others stay absolute.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = Path(os.path.normpath(path.parent.absolute()))
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for conversation in conversations:
            for utt in conversation.utterances:
                if utt.conversation_id != conversation.conversation_id:
                    raise ValueError(f"utterance {utt.utterance_id!r} belongs to {utt.conversation_id!r}, "
                                     f"not {conversation.conversation_id!r}")
                obj: dict[str, Any] = {
                    "conversation_id": utt.conversation_id,
                    "utterance_id": utt.utterance_id,
                    "speaker": utt.speaker,
                    "text": utt.text,
                }
                if utt.audio_path is not None:
                    audio_abs = Path(os.path.normpath(Path(utt.audio_path).absolute()))
                    try:
                        shown = audio_abs.relative_to(base).as_posix()
                    except ValueError:
                        shown = str(audio_abs)
                    audio: dict[str, Any] = {"path": shown}
                    if utt.start_s is not None:
                        audio["start"] = utt.start_s
                    if utt.end_s is not None:
                        audio["end"] = utt.end_s
                    obj["audio"] = audio
                if utt.label is not None:
                    obj["label"] = utt.label
                if utt.extra:
                    obj["extra"] = utt.extra
                f.write(json.dumps(obj, ensure_ascii=False) + "\n")
    return path
