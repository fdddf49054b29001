"""The JSONL conversation format: validation messages name line and field; write/read round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tracker.data import (
    Conversation,
    JsonlFormatError,
    Utterance,
    load_dataset,
    read_jsonl,
    to_inputs,
    validate_jsonl,
    write_jsonl,
)
from tracker.labels import MELD7


def write_lines(path: Path, lines: list) -> Path:
    """Write each item as one line: dicts as JSON, strings verbatim."""
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines), encoding="utf-8")
    return path


def utt(cid: str, uid: str, text: str = "hello", speaker: str = "A", **more) -> dict:
    return {"conversation_id": cid, "utterance_id": uid, "speaker": speaker, "text": text, **more}


def messages(path: Path, **kwargs) -> list[str]:
    return [str(e) for e in validate_jsonl(path, **kwargs)]


@pytest.fixture()
def clip(tmp_path: Path) -> Path:
    (tmp_path / "audio").mkdir()
    path = tmp_path / "audio" / "c1.wav"
    path.write_bytes(b"RIFF")
    return path


def test_valid_file_has_no_errors(tmp_path, clip):
    path = write_lines(tmp_path / "ok.jsonl", [
        utt("c1", "u1", label="joy"),
        "",  # blank lines are ignored
        utt("c1", "u2", text="", audio={"path": "audio/c1.wav", "start": 0, "end": 1.5}),
        utt("c2", "u3", label=None, extra={"source": "call centre"}),
    ])
    assert validate_jsonl(path, label_set=MELD7) == []


def test_reports_every_error_with_line_and_field(tmp_path, clip):
    path = write_lines(tmp_path / "bad.jsonl", [
        utt("c1", "u1"),                                                          # 1 ok
        '{"conversation_id": "c1", "utterance_id": "u2",',                        # 2 invalid JSON
        "[1, 2, 3]",                                                              # 3 not an object
        {"utterance_id": "u4", "speaker": "A", "text": "hi"},                     # 4 missing conversation_id
        utt("c1", "u5", speaker=7),                                               # 5 wrong type
        utt("c1", "u1"),                                                          # 6 duplicate of line 1
        utt("c1", "u7", audio={"path": "audio/c1.wav", "start": -1, "end": 2}),   # 7 negative start
        utt("c1", "u8", audio={"path": "audio/c1.wav", "start": 3, "end": 2}),    # 8 end <= start
        utt("c1", "u9", label="happy"),                                           # 9 not in MELD7
        utt("c1", "u10", text=""),                                                # 10 empty text, no audio
        utt("c1", "u11", lable="joy"),                                            # 11 unknown field
        utt("c1", "u12", audio={"path": "audio/missing.wav"}),                    # 12 file not found
        utt("c1", "u13", audio={"start": 0, "end": 1}),                           # 13 audio.path missing
        utt("c1", "u14", text=None),                                              # 14 text null
    ])
    got = messages(path, label_set=MELD7)
    expected = [
        "line 2: invalid JSON: Expecting property name enclosed in double quotes (column 48)",
        "line 3: expected a JSON object, got array",
        "line 4, field 'conversation_id': required field is missing",
        "line 5, field 'speaker': must be a non-empty string, got 7",
        "line 6, field 'utterance_id': duplicate \"u1\" (first used on line 1)",
        "line 7, field 'audio.start': must be a number >= 0, got -1",
        "line 8, field 'audio.end': must be greater than audio.start (3), got 2",
        "line 9, field 'label': \"happy\" is not in label set 'meld7' "
        "(neutral, joy, surprise, anger, sadness, disgust, fear)",
        "line 10, field 'text': must not be empty unless 'audio' is given",
        "line 11, field 'lable': unknown field (known: conversation_id, utterance_id, speaker, text, audio, "
        "label, index, extra)",
        f"line 12, field 'audio.path': file not found: {tmp_path / 'audio' / 'missing.wav'}",
        "line 13, field 'audio.path': required field is missing",
        "line 14, field 'text': must be a string, got null",
    ]
    assert got == expected


def test_read_raises_with_all_errors_listed(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [utt("c1", f"u{i}", speaker="") for i in range(25)])
    with pytest.raises(JsonlFormatError) as info:
        read_jsonl(path)
    err = info.value
    assert len(err.errors) == 25
    text = str(err)
    assert "25 error(s)" in text
    assert "line 1, field 'speaker': must be a non-empty string, got \"\"" in text
    assert "line 20, field 'speaker'" in text and "line 21, field" not in text
    assert "... and 5 more" in text


def test_label_set_by_name_or_list(tmp_path):
    path = write_lines(tmp_path / "l.jsonl", [utt("c", "u1", label="calm")])
    assert messages(path) == []
    assert messages(path, label_set="ravdess8") == []
    assert messages(path, label_set="meld7")[0].startswith("line 1, field 'label': \"calm\" is not in label set 'meld7'")
    assert messages(path, label_set=["pos", "neg"]) == [
        "line 1, field 'label': \"calm\" is not in label set 'given' (pos, neg)"]


def test_audio_and_number_edge_cases(tmp_path, clip):
    path = write_lines(tmp_path / "a.jsonl", [
        utt("c", "u1", audio="audio/c1.wav"),                                          # 1 not an object
        utt("c", "u2", audio={"path": "audio/c1.wav", "start": True}),                 # 2 bool is not a number
        utt("c", "u3", audio={"path": "audio/c1.wav", "start": "0.5"}),                # 3 string
        utt("c", "u4", audio={"path": "audio/c1.wav", "end": 0}),                      # 4 end must be > 0
        utt("c", "u5", audio={"path": "audio/c1.wav", "end": 1, "stop": 2}),           # 5 unknown audio field
        '{"conversation_id": "c", "utterance_id": "u6", "speaker": "A", "text": "x", '
        '"audio": {"path": "audio/c1.wav", "start": NaN}}',                            # 6 NaN
        utt("c", "u7", audio={"path": str(clip), "start": 0.25, "end": 0.5}),          # 7 absolute path: ok
    ])
    assert messages(path) == [
        "line 1, field 'audio': must be an object {path, start, end}, got \"audio/c1.wav\"",
        "line 2, field 'audio.start': must be a number >= 0, got true",
        "line 3, field 'audio.start': must be a number >= 0, got \"0.5\"",
        "line 4, field 'audio.end': must be a number > 0, got 0",
        "line 5, field 'audio.stop': unknown field (known: path, start, end)",
        "line 6: invalid JSON: NaN is not allowed (not standard JSON)",
    ]
    assert messages(tmp_path / "a.jsonl", check_files=False)[0].startswith("line 1, field 'audio'")


def test_index_rules(tmp_path):
    path = write_lines(tmp_path / "i.jsonl", [
        utt("c", "u1", index=1),
        utt("c", "u2"),                # missing while the conversation uses index
        utt("c", "u3", index=1),       # duplicate index
        utt("d", "u4", index=-2),      # negative
        utt("e", "u5", index=1.5),     # not an integer
    ])
    assert messages(path) == [
        "line 2, field 'index': missing, but conversation \"c\" gives it on line 1; "
        "give it on every line of a conversation or on none",
        "line 3, field 'index': duplicate index 1 in conversation \"c\" (first on line 1)",
        "line 4, field 'index': must be an integer >= 0, got -2",
        "line 5, field 'index': must be an integer >= 0, got 1.5",
    ]


def test_empty_and_non_utf8_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    assert messages(empty) == ["the file holds no utterances"]
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps(utt("c", "u1")).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    assert messages(latin)[0] == "line 2: not valid UTF-8 (invalid continuation byte at byte 13)"


def test_read_orders_by_index_and_resolves_audio(tmp_path, clip):
    path = write_lines(tmp_path / "o.jsonl", [
        utt("c1", "b", text="second", index=5),
        utt("c2", "x", text="", audio={"path": "audio/c1.wav", "start": 0.5, "end": 1.0}),
        utt("c1", "a", text="first", index=2, speaker="B"),
        utt("c2", "y", text="later"),
    ])
    convs = read_jsonl(path)
    assert [c.conversation_id for c in convs] == ["c1", "c2"]
    assert [u.utterance_id for u in convs[0]] == ["a", "b"]
    assert [u.index for u in convs[0]] == [0, 1]
    x = convs[1].utterances[0]
    assert x.audio_path == str(clip) and (x.start_s, x.end_s) == (0.5, 1.0)
    pairs = list(to_inputs(convs[0]))
    assert [[t.text for t in ctx] for _, ctx in pairs] == [[], ["first"]]
    assert load_dataset(str(path))[0].utterances[0].text == "first"


def test_round_trip(tmp_path, clip):
    outside = tmp_path.parent / f"{tmp_path.name}-outside.wav"
    outside.write_bytes(b"RIFF")
    try:
        convs = [
            Conversation("call-1", [
                Utterance("call-1", "call-1-0", 0, "Agent", "Hello, how can I help?", label="neutral",
                          extra={"channel": 1, "tags": ["greeting"]}),
                Utterance("call-1", "call-1-1", 1, "Caller", "", label="anger",
                          audio_path=str(clip), start_s=0.0, end_s=2.25),
                Utterance("call-1", "call-1-2", 2, "Agent", "Naïve “quotes” — ok", label=None),
            ]),
            Conversation("call-2", [
                Utterance("call-2", "call-2-0", 0, "Caller", "bye", audio_path=str(outside)),
            ]),
        ]
        out = write_jsonl(convs, tmp_path / "round.jsonl")
        assert validate_jsonl(out, label_set=MELD7) == []
        lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        # under the output folder: written relative to it
        assert lines[1]["audio"] == {"path": "audio/c1.wav", "start": 0.0, "end": 2.25}
        assert lines[3]["audio"]["path"] == str(outside)  # outside the output folder: stays absolute
        assert "label" not in lines[2] and "extra" not in lines[3]
        assert read_jsonl(out, label_set=MELD7) == convs
    finally:
        outside.unlink()


def test_round_trip_of_real_meld_dialogues(tmp_path, meld_dir):
    convs = load_dataset("meld:dev")[:10]
    out = write_jsonl(convs, tmp_path / "meld.jsonl")
    assert read_jsonl(out, label_set=MELD7) == convs
