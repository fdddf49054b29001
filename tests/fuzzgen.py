"""Deterministic hostile messages for the streaming protocol, each with the error code it must get.

`hostile_text(rng, speakers, limits)` gives one non-fatal bad message for a started stream whose
speakers are `speakers`; `fatal_case(rng, ...)` a short connection script that must end in one
fatal error. Every generator injects exactly one fault, so the expected code is determined by
docs/protocol.md alone.
"""

from __future__ import annotations

import base64
import json
import random
import string
from typing import Any, Callable

from tracker.stream import protocol as P

Msg = str | bytes


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _good_utterance(rng: random.Random, speakers: list[str]) -> dict[str, Any]:
    return {"type": "utterance", "speaker": rng.choice(speakers), "text": "hello there", "utterance_id": f"f{rng.randrange(10**6)}"}


def _good_transcript(rng: random.Random, speakers: list[str]) -> dict[str, Any]:
    start = rng.randrange(0, 10_000)
    return {"type": "transcript", "speaker": rng.choice(speakers), "text": "fine thanks", "start_ms": start, "end_ms": start + 500}


def _garbage(rng: random.Random) -> str:
    alphabet = string.ascii_letters + string.digits + " \t\n:,\"'}]()<>\\/@#$%^&*éß漢😀\u0000"
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 60)))


def _bad_json(rng: random.Random, speakers: list[str], limits) -> tuple[Msg, int]:
    kind = rng.randrange(9)
    if kind == 0:  # a valid message cut short
        whole = _dumps(rng.choice([_good_utterance, _good_transcript])(rng, speakers))
        return whole[: rng.randrange(1, len(whole))], P.BAD_JSON
    if kind == 1:  # noise that never starts an object
        return _garbage(rng).lstrip("{["), P.BAD_JSON
    if kind == 2:  # JSON, but not an object
        return _dumps(rng.choice([[1, 2], "start", 42, None, True, 1.5, [], [{"type": "stop"}]])), P.BAD_JSON
    if kind == 3:  # nesting deep enough to exhaust the parser's recursion
        depth = rng.randrange(1_500, 5_000)  # past the parser's recursion limit (~1000)
        return rng.choice(["[", '{"a":']) * depth, P.BAD_JSON
    if kind == 4:  # NaN / Infinity are not JSON
        return '{"type":"utterance","speaker":"%s","text":"x","start_ms":%s}' % (speakers[0], rng.choice(["NaN", "Infinity", "-Infinity"])), P.BAD_JSON
    if kind == 5:  # an integer longer than Python's int-digits limit
        return '{"type":"transcript","start_ms":' + "9" * rng.randrange(4400, 6_000) + "}", P.BAD_JSON
    if kind == 6:  # a byte-order mark or stray bytes before the object
        return rng.choice(["\ufeff", "x", ")", "\u0000"]) + _dumps({"type": "keepalive"}), P.BAD_JSON
    if kind == 7:
        return "", P.BAD_JSON
    return _dumps({"type": "keepalive"}) + rng.choice(["}", "]", "{", ",", "x"]), P.BAD_JSON


def _unknown_type(rng: random.Random, speakers: list[str], limits) -> tuple[Msg, int]:
    kind = rng.randrange(4)
    if kind == 0:
        obj: dict[str, Any] = {"type": rng.choice(["Start", "STOP", "utterances", "dance", "", " stop", "stop\u0000", "x" * 500])}
    elif kind == 1:
        obj = {"type": rng.choice([1, 2.5, None, True, [], {}, ["stop"]])}
    elif kind == 2:
        obj = {"speaker": speakers[0], "text": "no type"}
    else:
        obj = {"TYPE": "stop"}
    return _dumps(obj), P.UNKNOWN_TYPE


def _invalid_field(rng: random.Random, speakers: list[str], limits) -> tuple[Msg, int]:
    base = rng.choice([_good_utterance, _good_transcript])(rng, speakers)
    is_utt = base["type"] == "utterance"
    kind = rng.randrange(14)
    if kind == 0:  # wrong type for the speaker
        base["speaker"] = rng.choice([7, None, [], {}, True, 1.5])
        if base["speaker"] is None and is_utt:
            base["speaker"] = 0
    elif kind == 1:  # a speaker this stream does not have
        base["speaker"] = rng.choice(["Zed", speakers[0] + " ", speakers[0].lower() + "x", ""])
    elif kind == 2:  # text of the wrong type
        base["text"] = rng.choice([5, [], {}, True, 2.5])
    elif kind == 3:  # huge, negative or non-integer-like times
        val = rng.choice([1e300, 10**30, -5, -1e-9, P.MAX_TIME_MS + 1, "5", [], {}, True])
        base["start_ms"] = val
        if not is_utt:
            base["end_ms"] = 100
    elif kind == 4:  # a number too large for a double: parsed as infinity
        raw = _dumps(base)
        return raw.replace('"type"', '"start_ms":1e999,"type"', 1) if is_utt else raw.replace(
            '"start_ms":', '"start_ms":1e999,"x":', 1), P.INVALID_FIELD
    elif kind == 5:  # end before start
        base["start_ms"], base["end_ms"] = 900, rng.choice([900, 10, 0])
    elif kind == 6:  # text above the limit
        base["text"] = "a" * (limits.max_utterance_chars + rng.randrange(1, 50))
    elif kind == 7:  # a lone surrogate: valid JSON, not storable text
        raw = _dumps(base).replace('"text":"', '"text":"\\ud83d', 1)
        return raw, P.INVALID_FIELD
    elif kind == 8 and is_utt:  # audio that is not base64
        base["audio"] = rng.choice(["***", "AAA", "not base64!", "AQ=="[:3]])
    elif kind == 9 and is_utt:  # audio of an odd byte count
        base["audio"] = base64.b64encode(b"\x01" * (2 * rng.randrange(1, 50) + 1)).decode()
    elif kind == 10 and is_utt:  # audio of the wrong type
        base["audio"] = rng.choice([12, [1, 2], {"pcm": "AA=="}, True])
    elif kind == 11 and is_utt:  # neither text nor audio
        base["text"] = rng.choice(["", "   ", "\n"])
    elif kind == 12 and is_utt:  # an empty or over-long utterance id
        base["utterance_id"] = rng.choice(["", "   ", "u" * (P.MAX_ID_CHARS + 1)])
    elif not is_utt:  # a transcript without a required field
        del base[rng.choice(["speaker", "text", "start_ms", "end_ms"])]
    else:
        del base["speaker"]
    return _dumps(base), P.INVALID_FIELD


def _second_start(rng: random.Random, speakers: list[str], limits) -> tuple[Msg, int]:
    obj = rng.choice([
        {"type": "start", "conversation_id": "again"},
        {"type": "start", "conversation_id": "x", "sample_rate": 44100},  # would be fatal 4004 if it were the first
        {"type": "start"},
        {"type": "start", "conversation_id": 5, "channels": 99},
    ])
    return _dumps(obj), P.ALREADY_STARTED


GENERATORS: list[Callable[[random.Random, list[str], Any], tuple[Msg, int]]] = [
    _bad_json, _bad_json, _unknown_type, _invalid_field, _invalid_field, _invalid_field, _second_start,
]


def hostile_text(rng: random.Random, speakers: list[str], limits) -> tuple[Msg, int]:
    """One non-fatal bad text message for a started stream, and its documented error code."""
    return rng.choice(GENERATORS)(rng, speakers, limits)


def fatal_case(rng: random.Random, limits) -> tuple[list[Msg], int]:
    """A connection script (the messages to send, `start` included where it belongs) ending in one fatal error."""
    cid = f"fz-fatal-{rng.randrange(10**9)}"
    start1 = _dumps({"type": "start", "conversation_id": cid, "channels": 1, "speakers": ["A"]})
    start2 = _dumps({"type": "start", "conversation_id": cid, "channels": 2, "speakers": ["A", "B"]})
    kind = rng.randrange(8)
    if kind == 0:  # audio before start
        return [b"\x00\x00" * rng.randrange(1, 800)], P.NOT_STARTED
    if kind == 1:  # an event before start
        return [_dumps(rng.choice([_good_utterance(rng, ["A"]), _good_transcript(rng, ["A"]), {"type": "stop"},
                                   {"type": "finalize"}, {"type": "keepalive"}]))], P.NOT_STARTED
    if kind == 2:  # a binary frame above the limit
        return [start1, b"\x00" * (limits.max_frame_bytes + 2 * rng.randrange(1, 5000))], P.FRAME_TOO_LARGE
    if kind == 3:  # a truncated frame: not whole samples for the channels
        return ([start1, b"\x01" * (2 * rng.randrange(0, 500) + 1)] if rng.random() < 0.5
                else [start2, b"\x01" * (4 * rng.randrange(0, 500) + 2)]), P.BAD_AUDIO
    if kind == 4:  # a text frame above the limit
        return [start1, '{"type":"keepalive","pad":"' + "p" * (limits.max_text_frame_chars + 10) + '"}'], P.FRAME_TOO_LARGE
    if kind == 5:  # anything after stop
        return [start1, _dumps({"type": "stop"}), rng.choice([b"\x00\x00", _dumps({"type": "keepalive"})])], P.AFTER_STOP
    if kind == 6:  # unsupported audio in the first start
        bad = rng.choice([{"sample_rate": 44100}, {"sample_rate": 10**20}, {"channels": 0}, {"channels": 9},
                          {"encoding": "opus"}, {"channels": 1.5}])
        return [_dumps({"type": "start", "conversation_id": cid, **bad})], P.UNSUPPORTED_AUDIO
    return [_dumps({"type": "start", "conversation_id": cid, "resume": True, "resume_after_seq": 3})], P.UNKNOWN_CONVERSATION
