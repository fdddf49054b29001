"""The WebSocket streaming protocol: message validation, error codes and close codes.

See docs/protocol.md for the prose. Everything here is pure (no I/O) so that it can be tested and
fuzzed on its own; the ingress turns a :class:`ProtocolError` into an ``error`` message and, for
fatal ones, a close with the error's code.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass, field
from typing import Any

# Close codes (RFC 6455 plus the 4000-4999 private range).
CLOSE_NORMAL = 1000
CLOSE_POLICY = 1008
CLOSE_INTERNAL = 1011
CLOSE_OVERLOADED = 1013

# Error codes: sent in `error` messages; fatal ones are also the close code.
BAD_JSON = 4000  # not valid UTF-8 JSON, or not a JSON object
UNKNOWN_TYPE = 4001  # "type" missing or not one of the client message types
INVALID_FIELD = 4002  # a field is missing, of the wrong type or out of range
NOT_STARTED = 4003  # audio or events before `start` (fatal)
UNSUPPORTED_AUDIO = 4004  # sample rate, encoding or channel count not supported (fatal)
FRAME_TOO_LARGE = 4005  # a binary frame above the limit (fatal)
AFTER_STOP = 4006  # anything after `stop` (fatal)
ALREADY_STARTED = 4007  # a second `start` on one connection
BAD_AUDIO = 4008  # a binary frame that is not whole PCM16 samples for the declared channels (fatal)
UNKNOWN_CONVERSATION = 4009  # resume of a conversation the server does not know (fatal)
PROCESSING_FAILED = 4010  # one utterance could not be labelled (the stream goes on)
LIMIT_EXCEEDED = 4029  # a rate or size limit of the service (fatal)
UNAUTHORIZED = 4401  # no API key, a malformed one, or one that is unknown or revoked (fatal)

FATAL = {NOT_STARTED, UNSUPPORTED_AUDIO, FRAME_TOO_LARGE, AFTER_STOP, BAD_AUDIO, UNKNOWN_CONVERSATION, LIMIT_EXCEEDED,
         UNAUTHORIZED}

CLIENT_TYPES = ("start", "transcript", "utterance", "keepalive", "finalize", "stop")
SUPPORTED_RATES = (8000, 16000, 32000, 48000)
DEFAULT_SAMPLE_RATE = 16000  # a `start` without sample_rate
ENCODING = "linear16"  # PCM16 little-endian, channels interleaved
SAMPLE_BYTES = 2
FRAME_MS = 100  # what the bundled clients send per binary frame (any whole number of samples is accepted)
SUBPROTOCOL = "tracker.v1"
MAX_CHANNELS = 8
MAX_TEXT_CHARS = 4000
MAX_ID_CHARS = 128
MAX_TIME_MS = 24 * 3600 * 1000  # one day of audio


class ProtocolError(Exception):
    """A client message that breaks the protocol; `code` is the documented error code."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def fatal(self) -> bool:
        return self.code in FATAL

    def to_message(self) -> dict[str, Any]:
        return {"type": "error", "code": self.code, "message": self.message, "fatal": self.fatal}


@dataclass
class Start:
    conversation_id: str
    sample_rate: int = 16000
    encoding: str = "linear16"
    channels: int = 1
    speakers: list[str] = field(default_factory=lambda: ["Speaker"])
    resume: bool = False
    offset_ms: int = 0  # stream time of the first sample of this connection
    resume_after_seq: int = 0  # on resume: the last seq the client has; stored results after it are re-sent


@dataclass
class Transcript:
    speaker: str
    text: str
    start_ms: int
    end_ms: int


@dataclass
class UtteranceEvent:
    speaker: str
    text: str
    utterance_id: str | None = None
    start_ms: int | None = None
    end_ms: int | None = None
    audio: bytes | None = None  # PCM16 mono at the stream's sample rate


@dataclass
class Control:
    type: str  # keepalive, finalize, stop


def _require(obj: dict, name: str, kinds: tuple[type, ...], what: str) -> Any:
    if name not in obj:
        raise ProtocolError(INVALID_FIELD, f"field '{name}' is required ({what})")
    value = obj[name]
    if isinstance(value, bool) and bool not in kinds:
        raise ProtocolError(INVALID_FIELD, f"field '{name}' must be {what}, got a boolean")
    if not isinstance(value, kinds):
        raise ProtocolError(INVALID_FIELD, f"field '{name}' must be {what}, got {type(value).__name__}")
    return value


def _text(obj: dict, name: str, required: bool = True, max_chars: int = MAX_TEXT_CHARS, allow_empty: bool = True) -> str | None:
    if not required and obj.get(name) is None:
        return None
    value = _require(obj, name, (str,), "a string")
    if len(value) > max_chars:
        raise ProtocolError(INVALID_FIELD, f"field '{name}' is longer than {max_chars} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON "\\ud800" escape: not text we can store
        raise ProtocolError(INVALID_FIELD, f"field '{name}' is not valid Unicode (lone surrogate)") from None
    if not allow_empty and not value.strip():
        raise ProtocolError(INVALID_FIELD, f"field '{name}' must not be empty")
    return value


def _time(obj: dict, name: str, required: bool = True) -> int | None:
    if not required and obj.get(name) is None:
        return None
    value = _require(obj, name, (int, float), "a number of milliseconds")
    if not math.isfinite(value) or value < 0 or value > MAX_TIME_MS:
        raise ProtocolError(INVALID_FIELD, f"field '{name}' must lie in [0, {MAX_TIME_MS}] ms, got {value!r}")
    return int(round(value))


def parse_text_message(raw: str | bytes) -> dict[str, Any]:
    """Decode one text frame into a JSON object, or raise BAD_JSON / UNKNOWN_TYPE."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(BAD_JSON, "message is not valid UTF-8") from None
    try:
        obj = json.loads(raw, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(f"{c} is not allowed")))
    except (json.JSONDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(BAD_JSON, f"message is not valid JSON: {str(exc)[:120]}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(BAD_JSON, f"message must be a JSON object, got {type(obj).__name__}")
    kind = obj.get("type")
    if not isinstance(kind, str) or kind not in CLIENT_TYPES:
        shown = kind if isinstance(kind, str) and len(kind) < 40 else type(kind).__name__
        raise ProtocolError(UNKNOWN_TYPE, f"unknown message type {shown!r} (expected one of {', '.join(CLIENT_TYPES)})")
    return obj


def parse_start(obj: dict[str, Any]) -> Start:
    cid = _text(obj, "conversation_id", max_chars=MAX_ID_CHARS, allow_empty=False)
    if any(ord(ch) < 32 for ch in cid):
        raise ProtocolError(INVALID_FIELD, "field 'conversation_id' must not contain control characters")
    rate = obj.get("sample_rate", 16000)
    if isinstance(rate, bool) or not isinstance(rate, int):
        raise ProtocolError(INVALID_FIELD, f"field 'sample_rate' must be an integer, got {type(rate).__name__}")
    if rate not in SUPPORTED_RATES:
        raise ProtocolError(UNSUPPORTED_AUDIO, f"sample_rate {rate} is not supported (use {', '.join(map(str, SUPPORTED_RATES))})")
    encoding = obj.get("encoding", "linear16")
    if encoding != "linear16":
        raise ProtocolError(UNSUPPORTED_AUDIO, f"encoding {str(encoding)[:40]!r} is not supported (use linear16: PCM16 little-endian)")
    channels = obj.get("channels", 1)
    if isinstance(channels, bool) or not isinstance(channels, int) or not 1 <= channels <= MAX_CHANNELS:
        raise ProtocolError(UNSUPPORTED_AUDIO, f"channels must be an integer in 1..{MAX_CHANNELS}, got {channels!r}"[:200])
    speakers = obj.get("speakers")
    if speakers is None:
        speakers = [f"Speaker {i + 1}" for i in range(channels)]
    if not isinstance(speakers, list) or len(speakers) != channels:
        raise ProtocolError(INVALID_FIELD, f"field 'speakers' must be a list of {channels} names, one per channel")
    for s in speakers:
        if not isinstance(s, str) or not s.strip() or len(s) > MAX_ID_CHARS or not _encodable(s):
            raise ProtocolError(INVALID_FIELD, "field 'speakers' must hold non-empty names of at most 128 characters")
    if len(set(speakers)) != len(speakers):
        raise ProtocolError(INVALID_FIELD, "field 'speakers' must not repeat a name")
    resume = obj.get("resume", False)
    if not isinstance(resume, bool):
        raise ProtocolError(INVALID_FIELD, "field 'resume' must be a boolean")
    ints = {}
    for name in ("offset_ms", "resume_after_seq"):
        value = obj.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TIME_MS:
            raise ProtocolError(INVALID_FIELD, f"field '{name}' must be an integer >= 0")
        ints[name] = value
    return Start(conversation_id=cid, sample_rate=rate, encoding=encoding, channels=channels, speakers=list(speakers),
                 resume=resume, **ints)


def _encodable(value: str) -> bool:
    try:
        value.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def parse_transcript(obj: dict[str, Any], speakers: list[str], max_chars: int = MAX_TEXT_CHARS) -> Transcript:
    speaker = _text(obj, "speaker", max_chars=MAX_ID_CHARS)
    if speaker not in speakers:
        raise ProtocolError(INVALID_FIELD, f"field 'speaker': {speaker[:40]!r} is not one of this stream's speakers")
    text = _text(obj, "text", max_chars=max_chars)
    start, end = _time(obj, "start_ms"), _time(obj, "end_ms")
    if end <= start:
        raise ProtocolError(INVALID_FIELD, f"field 'end_ms' must be after start_ms ({start}), got {end}")
    return Transcript(speaker=speaker, text=text, start_ms=start, end_ms=end)


def parse_utterance(obj: dict[str, Any], speakers: list[str], max_audio_bytes: int,
                    max_chars: int = MAX_TEXT_CHARS) -> UtteranceEvent:
    speaker = _text(obj, "speaker", max_chars=MAX_ID_CHARS)
    if speaker not in speakers:
        raise ProtocolError(INVALID_FIELD, f"field 'speaker': {speaker[:40]!r} is not one of this stream's speakers")
    text = _text(obj, "text", required=False, max_chars=max_chars) or ""
    uid = _text(obj, "utterance_id", required=False, max_chars=MAX_ID_CHARS, allow_empty=False)
    start, end = _time(obj, "start_ms", required=False), _time(obj, "end_ms", required=False)
    if start is not None and end is not None and end <= start:
        raise ProtocolError(INVALID_FIELD, f"field 'end_ms' must be after start_ms ({start}), got {end}")
    audio = None
    if obj.get("audio") is not None:
        b64 = _require(obj, "audio", (str,), "base64 PCM16 mono audio")
        if len(b64) > max_audio_bytes * 4 // 3 + 8:
            raise ProtocolError(INVALID_FIELD, f"field 'audio' exceeds the limit of {max_audio_bytes} bytes")
        try:
            audio = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError(INVALID_FIELD, "field 'audio' is not valid base64") from None
        if len(audio) % 2:
            raise ProtocolError(INVALID_FIELD, "field 'audio' must hold whole PCM16 samples (an even byte count)")
    if not text.strip() and not audio:
        raise ProtocolError(INVALID_FIELD, "an utterance needs 'text' or 'audio'")
    return UtteranceEvent(speaker=speaker, text=text, utterance_id=uid, start_ms=start, end_ms=end, audio=audio)


# -- builders: every client (and the server) makes its messages here, not by hand ------------------

def frame_bytes(sample_rate: int, channels: int = 1, ms: int = FRAME_MS) -> int:
    """Bytes of `ms` of interleaved PCM16 audio."""
    return sample_rate * ms // 1000 * channels * SAMPLE_BYTES


def start_message(conversation_id: str, speakers: list[str], *, sample_rate: int = DEFAULT_SAMPLE_RATE,
                  resume: bool = False, offset_ms: int = 0, resume_after_seq: int = 0) -> dict[str, Any]:
    """A `start`: one speaker per channel."""
    msg: dict[str, Any] = {"type": "start", "conversation_id": conversation_id, "sample_rate": sample_rate,
                           "encoding": ENCODING, "channels": len(speakers), "speakers": list(speakers)}
    if resume:
        msg.update({"resume": True, "offset_ms": int(offset_ms), "resume_after_seq": int(resume_after_seq)})
    return msg


def transcript_message(speaker: str, text: str, start_ms: int, end_ms: int) -> dict[str, Any]:
    return {"type": "transcript", "speaker": speaker, "text": text, "start_ms": int(start_ms), "end_ms": int(end_ms)}


def utterance_message(speaker: str, text: str = "", *, utterance_id: str | None = None, audio: bytes | None = None,
                      start_ms: int | None = None, end_ms: int | None = None) -> dict[str, Any]:
    """An `utterance` event; `audio` is PCM16 mono at the stream's rate (sent base64)."""
    msg: dict[str, Any] = {"type": "utterance", "speaker": speaker, "text": text}
    if utterance_id is not None:
        msg["utterance_id"] = utterance_id
    if audio:
        msg["audio"] = base64.b64encode(audio).decode("ascii")
    if start_ms is not None:
        msg["start_ms"] = int(start_ms)
    if end_ms is not None:
        msg["end_ms"] = int(end_ms)
    return msg


def control_message(kind: str) -> dict[str, Any]:
    """`keepalive`, `finalize` or `stop`."""
    if kind not in ("keepalive", "finalize", "stop"):
        raise ValueError(f"not a control message: {kind!r}")
    return {"type": kind}


def stop_message() -> dict[str, Any]:
    return control_message("stop")


def result_message(record: dict[str, Any]) -> dict[str, Any]:
    """The server's `utterance` result for a stored record."""
    keys = ("conversation_id", "utterance_id", "speaker", "start_ms", "end_ms", "text", "label", "probabilities",
            "score", "seq", "is_final", "modalities")
    msg = {"type": "utterance", **{k: record.get(k) for k in keys}}
    msg["text_source"] = record.get("text_source")  # "client", "asr" (speech recognition), None: no text
    if record.get("asr_confidence") is not None:
        msg["asr_confidence"] = record["asr_confidence"]
    if record.get("refined"):  # a final label from conversation-level refinement: what it revised
        msg.update({"interim_label": record.get("interim_label"), "revised": bool(record.get("revised"))})
    return msg


ALERT_FIELDS = ("alert_id", "kind", "tenant", "conversation_id", "speaker", "utterance_id", "seq", "negative", "window",
                "labels", "at_ms", "entry_id")


def alert_message(event: dict[str, Any]) -> dict[str, Any]:
    """The server's `alert` message for an escalation alert raised or cleared (tracker.alerts.AlertEvent.to_dict)."""
    return {"type": "alert", **{k: event.get(k) for k in ALERT_FIELDS}}


def alert_messages(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The `alert` messages a stored final caused (its ``alerts``, set by the service's commit), in order."""
    return [alert_message(e) for e in record.get("alerts") or ()]
