"""Key names, record encoding and validation shared by the sync and async stores.

Everything that decides what bytes end up in Redis lives here (and in `scripts`), so the two
stores cannot drift apart. See docs/redis.md for the schema.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from tracker.config import ConfigError
from tracker.labels import LabelSet

# Stream fields written for every record, in this order; anything else goes to ``extra`` (JSON).
CORE_FIELDS: tuple[str, ...] = (
    "utterance_id",
    "speaker",
    "start_ms",
    "end_ms",
    "text",
    "label",
    "probabilities",
    "score",
    "is_final",
    "seq",
)
REQUIRED_FIELDS: tuple[str, ...] = ("utterance_id", "speaker", "start_ms", "end_ms", "text", "label", "is_final")
RESERVED_FIELDS: frozenset[str] = frozenset({"entry_id", "extra"})


@dataclass
class StoreConfig:
    """Where and how long the dialogue history is kept.

    ``ttl_seconds`` is refreshed on every append, so a conversation expires a week after its last
    utterance; ``stream_maxlen`` bounds memory for very long sessions (approximate trimming);
    ``recent_labels`` is the per-speaker window the dashboard shows; ``trend_alpha`` weighs the
    newest score in the per-speaker valence EMA.
    """

    key_prefix: str = "tracker"
    ttl_seconds: int = 7 * 24 * 3600
    stream_maxlen: int = 10_000
    recent_labels: int = 20
    trend_alpha: float = 0.3
    retry_seconds: float = 15.0  # keep retrying a call while Redis is unreachable (a restart) this long

    def __post_init__(self) -> None:
        if self.retry_seconds < 0:
            raise ConfigError(f"retry_seconds: must be >= 0, got {self.retry_seconds!r}")
        if not self.key_prefix or any(c.isspace() for c in self.key_prefix):
            raise ConfigError(f"key_prefix: must be non-empty without whitespace, got {self.key_prefix!r}")
        for name in ("ttl_seconds", "stream_maxlen", "recent_labels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)!r}")
        if not 0.0 < self.trend_alpha <= 1.0:
            raise ConfigError(f"trend_alpha: must be in (0, 1], got {self.trend_alpha!r}")


def escape(part: str) -> str:
    """Make an id safe as one key segment: ``%``, ``:``, ``{`` and ``}`` are percent-encoded.

    Injective, so conversation ``a:b`` and conversation ``a`` with speaker ``b`` never share a key,
    and ordinary ids stay readable in ``redis-cli``.
    """
    return part.replace("%", "%25").replace(":", "%3A").replace("{", "%7B").replace("}", "%7D")


@dataclass(frozen=True)
class Keys:
    """Key names for one (prefix, tenant): ``{prefix}:{tenant}:...``."""

    prefix: str
    tenant: str

    @property
    def base(self) -> str:
        return f"{self.prefix}:{escape(self.tenant)}"

    @property
    def conversations(self) -> str:
        """ZSET of conversation ids scored by updated_at (ms)."""
        return f"{self.base}:conversations"

    def conv(self, conversation_id: str, what: str) -> str:
        return f"{self.base}:conv:{escape(conversation_id)}:{what}"

    def stream(self, cid: str) -> str:
        return self.conv(cid, "stream")

    def meta(self, cid: str) -> str:
        return self.conv(cid, "meta")

    def ids(self, cid: str) -> str:
        return self.conv(cid, "ids")

    def speakers(self, cid: str) -> str:
        return self.conv(cid, "speakers")

    def seq(self, cid: str) -> str:
        return self.conv(cid, "seq")

    def speaker(self, cid: str, speaker: str, what: str) -> str:
        return f"{self.base}:conv:{escape(cid)}:spk:{escape(speaker)}:{what}"

    def alerts(self, cid: str) -> str:
        """STREAM of the conversation's alert events (raised / cleared), oldest first."""
        return self.conv(cid, "alerts")

    def alert_state(self, cid: str, speaker: str) -> str:
        """HASH: the escalation rule's state for one speaker (its window of labels, raised or not)."""
        return self.speaker(cid, speaker, "alert")

    def speaker_norm(self, cid: str, speaker: str) -> str:
        """HASH: the speaker's normalisation statistics per modality (tracker.context.speaker_norm)."""
        return self.speaker(cid, speaker, "norm")

    def conversation_keys(self, cid: str, speakers: Iterable[str]) -> list[str]:
        """Every key that holds something of conversation `cid` (for deleting it), the index excepted."""
        out = [self.meta(cid), self.stream(cid), self.ids(cid), self.seq(cid), self.alerts(cid)]
        for s in speakers:
            out += [self.speaker(cid, s, what) for what in ("counts", "recent", "state", "alert", "norm")]
        return out

    def append_keys(self, cid: str, speaker: str) -> list[str]:
        """KEYS of the append script, in the order the script expects."""
        return [
            self.ids(cid),
            self.stream(cid),
            self.meta(cid),
            self.speakers(cid),
            self.conversations,
            self.speaker(cid, speaker, "counts"),
            self.speaker(cid, speaker, "recent"),
            self.speaker(cid, speaker, "state"),
            self.seq(cid),
        ]


def alert_outbox_key(prefix: str) -> str:
    """STREAM of alert events of every tenant waiting for webhook delivery (read by a consumer group)."""
    return f"{prefix}:_alerts:outbox"


def alert_dead_letter_key(prefix: str) -> str:
    """LIST of webhook deliveries that failed for good (JSON, newest first)."""
    return f"{prefix}:_alerts:dead"


# -- validation / encoding ---------------------------------------------------------------------


def check_id(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a str, got {type(value).__name__} {value!r}")
    if not value:
        raise ValueError(f"{what} must not be empty")
    return value


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be an int, got {type(value).__name__} {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{what} must be a whole number, got {value!r}")
        value = int(value)
    return value


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return value


def idempotency_field(utterance_id: str, is_final: bool) -> str:
    """The ids-hash field for (utterance_id, is_final); the fixed suffix keeps it injective."""
    return f"{utterance_id}|{'f' if is_final else 'p'}"


@dataclass(frozen=True)
class EncodedRecord:
    """A validated record ready for the append script."""

    utterance_id: str
    speaker: str
    label: str
    score: str
    is_final: bool
    has_seq: bool
    fields: list[str]  # flat field/value list for XADD (``seq`` omitted when the script assigns it)


def encode_record(record: Mapping[str, Any], label_set: LabelSet) -> EncodedRecord:
    """Validate `record` fully and encode it as UTF-8 strings; raises ValueError, touches nothing."""
    if not isinstance(record, Mapping):
        raise ValueError(f"record must be a mapping, got {type(record).__name__}")
    missing = [f for f in REQUIRED_FIELDS if f not in record]
    if missing:
        raise ValueError(f"record is missing required field(s): {', '.join(missing)}")
    for key in record:
        if not isinstance(key, str):
            raise ValueError(f"record field names must be str, got {type(key).__name__} {key!r}")
    reserved = sorted(RESERVED_FIELDS & set(record))
    if reserved:
        raise ValueError(f"record field(s) {', '.join(reserved)} are reserved")

    utterance_id = check_id(record["utterance_id"], "utterance_id")
    speaker = check_id(record["speaker"], "speaker")
    text = record["text"]
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    is_final = record["is_final"]
    if not isinstance(is_final, bool):
        raise ValueError(f"is_final must be a bool, got {type(is_final).__name__} {is_final!r}")
    start_ms = _int(record["start_ms"], "start_ms")
    end_ms = _int(record["end_ms"], "end_ms")
    if start_ms < 0 or end_ms < start_ms:
        raise ValueError(f"need 0 <= start_ms <= end_ms, got start_ms={start_ms} end_ms={end_ms}")
    label = record["label"]
    if not isinstance(label, str) or label not in label_set.labels:
        raise ValueError(f"label {label!r} is not in label set {label_set.name!r} ({', '.join(label_set.labels)})")

    probs = record.get("probabilities") or {}
    if not isinstance(probs, Mapping):
        raise ValueError(f"probabilities must be a mapping label -> float, got {type(probs).__name__}")
    unknown = [k for k in probs if k not in label_set.labels]
    if unknown:
        raise ValueError(f"probabilities has label(s) {unknown!r} not in label set {label_set.name!r}")
    clean: dict[str, float] = {}
    for name in label_set.labels:  # label-set order, so equal dicts encode to equal bytes
        if name in probs:
            p = _finite(probs[name], f"probabilities[{name!r}]")
            if p < 0.0:
                raise ValueError(f"probabilities[{name!r}] must be >= 0, got {p!r}")
            clean[name] = p

    if record.get("score") is None:
        score = float(label_set.values[label_set.index(label)])
    else:
        score = _finite(record["score"], "score")

    seq = record.get("seq")
    if seq is not None:
        seq = _int(seq, "seq")

    extra = {k: v for k, v in record.items() if k not in CORE_FIELDS}
    try:
        extra_json = json.dumps(extra, separators=(",", ":"), ensure_ascii=False, allow_nan=False) if extra else None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"extra fields must be JSON-serializable without NaN/inf: {exc}") from None

    fields = [
        "utterance_id", utterance_id,
        "speaker", speaker,
        "start_ms", str(start_ms),
        "end_ms", str(end_ms),
        "text", text,
        "label", label,
        "probabilities", json.dumps(clean, separators=(",", ":"), allow_nan=False),
        "score", repr(score),
        "is_final", "1" if is_final else "0",
    ]  # fmt: skip
    if seq is not None:
        fields += ["seq", str(seq)]
    if extra_json is not None:
        fields += ["extra", extra_json]
    return EncodedRecord(
        utterance_id=utterance_id,
        speaker=speaker,
        label=label,
        score=repr(score),
        is_final=is_final,
        has_seq=seq is not None,
        fields=fields,
    )


# -- decoding -----------------------------------------------------------------------------------


def as_str(value: Any) -> Any:
    """bytes -> str (clients may or may not use decode_responses)."""
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else value


def decode_hash(raw: Mapping[Any, Any] | Iterable[Any] | None) -> dict[str, str]:
    if not raw:
        return {}
    if isinstance(raw, Mapping):
        return {as_str(k): as_str(v) for k, v in raw.items()}
    items = list(raw)
    return {as_str(items[i]): as_str(items[i + 1]) for i in range(0, len(items), 2)}


def decode_entry(entry_id: Any, fields: Mapping[Any, Any] | Iterable[Any]) -> dict[str, Any]:
    """One stream entry back to the record that was appended, plus its ``entry_id``."""
    f = decode_hash(fields)
    out: dict[str, Any] = {
        "entry_id": as_str(entry_id),
        "utterance_id": f.get("utterance_id", ""),
        "speaker": f.get("speaker", ""),
        "start_ms": int(f.get("start_ms", 0)),
        "end_ms": int(f.get("end_ms", 0)),
        "text": f.get("text", ""),
        "label": f.get("label", ""),
        "probabilities": json.loads(f.get("probabilities") or "{}"),
        "score": float(f.get("score", "0")),
        "is_final": f.get("is_final") == "1",
        "seq": int(f["seq"]) if "seq" in f else None,
    }
    if "extra" in f:
        for key, value in json.loads(f["extra"]).items():
            out.setdefault(key, value)
    return out


def decode_entries(raw: Iterable[Any] | None) -> list[dict[str, Any]]:
    return [decode_entry(entry[0], entry[1]) for entry in raw or ()]


def decode_meta(conversation_id: str, raw: Mapping[Any, Any] | None, speakers: Iterable[Any]) -> dict[str, Any]:
    m = decode_hash(raw)
    return {
        "conversation_id": conversation_id,
        "created_at": int(m.get("created_at", 0)),
        "updated_at": int(m.get("updated_at", 0)),
        "status": m.get("status", "live"),
        "n_final": int(m.get("n_final", 0)),
        "n_entries": int(m.get("n_entries", 0)),
        "label_set": m.get("label_set", ""),
        "last_entry_id": m.get("last_entry_id", ""),
        "speakers": sorted(as_str(s) for s in speakers or ()),
    }


def decode_speaker_state(
    counts: Mapping[Any, Any] | None,
    recent_newest_first: Iterable[Any] | None,
    state: Mapping[Any, Any] | None,
    label_set: LabelSet,
) -> dict[str, Any]:
    """Per-speaker rolling state; ``recent`` is oldest first, ``counts`` has every label."""
    c = {k: int(v) for k, v in decode_hash(counts).items()}
    recent = [as_str(x) for x in (recent_newest_first or ())][::-1]
    s = decode_hash(state)
    negative = set(label_set.negative)
    return {
        "counts": {label: c.get(label, 0) for label in label_set.labels},
        "recent": recent,
        "trend": float(s["trend"]) if "trend" in s else None,
        "n_final": int(s.get("n_final", 0)),
        "last_label": s.get("last_label"),
        "negative_share": (sum(1 for x in recent if x in negative) / len(recent)) if recent else None,
    }
