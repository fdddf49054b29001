"""The escalation rule: when a speaker has stayed negative long enough to alert a supervisor.

Per watched speaker, over that speaker's final labels in order: the alert is **raised** when at
least `raise_at` of the last `window` labels are negative, and once raised it is **cleared** only
when at most `clear_at` of the last `window` are (hysteresis, so it does not flicker). With the
defaults (4, 3, 1): anger x3 raises it; then neutral (3 of 4 negative) and neutral (2 of 4) keep
it; a third neutral (1 of 4) clears it.

`EscalationRule` is the reference in Python (pure, no I/O); the service applies the same rule
atomically in Redis (`tracker.context.scripts.ALERT_STEP`, driven by `tracker.alerts.AlertEngine`),
and a test checks the two agree on random label sequences.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Mapping

from tracker.config import ConfigError
from tracker.labels import LabelSet

AlertKind = Literal["raised", "cleared"]


@dataclass
class EscalationConfig:
    """Which speakers are watched, which labels count as negative, and the raise/clear thresholds."""

    enabled: bool = field(default=True, metadata={"help": "compute alerts at all"})
    window: int = field(default=4, metadata={"help": "how many of the speaker's latest final labels are looked at"})
    raise_at: int = field(default=3, metadata={"help": "raise when at least this many of the window are negative"})
    clear_at: int = field(default=1, metadata={"help": "once raised, clear when at most this many are negative"})
    negative: list[str] = field(default_factory=list, metadata={
        "help": "labels that count as negative; empty = the label set's own (meld7: anger, sadness, disgust, fear)"})
    speakers: list[str] = field(default_factory=list, metadata={
        "help": "speakers watched, by name or shell pattern ('Customer', 'caller-*'), case-insensitive; empty = all"})

    def __post_init__(self) -> None:
        if not 1 <= self.window <= 100:
            raise ConfigError(f"window: must be in 1..100, got {self.window!r}")
        if not 1 <= self.raise_at <= self.window:
            raise ConfigError(f"raise_at: must be in 1..window ({self.window}), got {self.raise_at!r}")
        if not 0 <= self.clear_at < self.raise_at:
            raise ConfigError(f"clear_at: must be in 0..raise_at-1 ({self.raise_at - 1}), got {self.clear_at!r}")
        for name in ("negative", "speakers"):
            values = getattr(self, name)
            if any(not isinstance(v, str) or not v for v in values):
                raise ConfigError(f"{name}: must be a list of non-empty strings, got {values!r}")

    def negative_labels(self, label_set: LabelSet) -> frozenset[str]:
        """The negative labels, checked against `label_set` (a ConfigError names the unknown one)."""
        chosen = self.negative or list(label_set.negative)
        unknown = [x for x in chosen if x not in label_set.labels]
        if unknown:
            raise ConfigError(f"negative: {unknown[0]!r} is not a label of {label_set.name} ({', '.join(label_set.labels)})")
        if not chosen:
            raise ConfigError(f"negative: label set {label_set.name} names no negative labels; list them")
        return frozenset(chosen)

    def watches(self, speaker: str) -> bool:
        if not self.speakers:
            return True
        s = speaker.casefold()
        return any(fnmatch.fnmatchcase(s, pattern.casefold()) for pattern in self.speakers)

    def as_rule(self) -> dict[str, Any]:
        """The rule as the dashboard reads it: ``{k, m, clear}`` plus the speakers watched."""
        return {"k": self.raise_at, "m": self.window, "clear": self.clear_at, "speakers": list(self.speakers)}


@dataclass(frozen=True)
class SpeakerAlertState:
    """One speaker's place in the rule: the window of (label, negative) and whether the alert is up."""

    labels: tuple[str, ...] = ()
    negative: tuple[bool, ...] = ()
    raised: bool = False

    @property
    def n_negative(self) -> int:
        return sum(self.negative)


class EscalationRule:
    """The rule for one label set; `step` is the whole of it."""

    def __init__(self, config: EscalationConfig, label_set: LabelSet) -> None:
        self.config = config
        self.label_set = label_set
        self.negative = config.negative_labels(label_set)

    def is_negative(self, label: str) -> bool:
        return label in self.negative

    def step(self, state: SpeakerAlertState, label: str) -> tuple[SpeakerAlertState, AlertKind | None]:
        """Add the speaker's next final label; returns the new state and "raised", "cleared" or None."""
        c = self.config
        labels = (state.labels + (label,))[-c.window:]
        negative = (state.negative + (self.is_negative(label),))[-c.window:]
        n = sum(negative)
        kind: AlertKind | None = None
        raised = state.raised
        if not raised and n >= c.raise_at:
            raised, kind = True, "raised"
        elif raised and n <= c.clear_at:
            raised, kind = False, "cleared"
        return SpeakerAlertState(labels, negative, raised), kind

    def replay(self, labels: Iterable[str]) -> list[tuple[int, AlertKind]]:
        """(position, kind) of every change over one speaker's labels in order."""
        state, out = SpeakerAlertState(), []
        for i, label in enumerate(labels):
            state, kind = self.step(state, label)
            if kind:
                out.append((i, kind))
        return out


@dataclass(frozen=True)
class AlertEvent:
    """An alert raised or cleared for one speaker of one conversation, as stored and as sent.

    ``alert_id`` is the same however often the final that caused it is applied (SHA-1 of tenant,
    conversation, speaker, utterance and kind), so webhooks use it as the idempotency key.
    """

    alert_id: str
    kind: AlertKind
    tenant: str
    conversation_id: str
    speaker: str
    utterance_id: str
    seq: int
    negative: int  # negative labels in the window when it changed
    window: int
    labels: tuple[str, ...]  # the window's labels, oldest first
    at_ms: int  # Redis server time
    entry_id: str = ""  # in the conversation's alerts stream

    def to_dict(self) -> dict[str, Any]:
        return {"alert_id": self.alert_id, "kind": self.kind, "tenant": self.tenant,
                "conversation_id": self.conversation_id, "speaker": self.speaker, "utterance_id": self.utterance_id,
                "seq": self.seq, "negative": self.negative, "window": self.window, "labels": list(self.labels),
                "at_ms": self.at_ms, "entry_id": self.entry_id}

    def to_message(self) -> dict[str, Any]:
        """The event as a protocol message (``type: alert``) for /v1/watch and the stream."""
        return {"type": "alert", **self.to_dict()}

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any], tenant: str = "", conversation_id: str = "") -> "AlertEvent":
        """From a stream entry's decoded fields (the alerts stream or the outbox)."""
        import json

        return cls(alert_id=fields["alert_id"], kind=fields["kind"], tenant=fields.get("tenant", tenant),
                   conversation_id=fields.get("conversation_id", conversation_id), speaker=fields["speaker"],
                   utterance_id=fields["utterance_id"], seq=int(fields["seq"]), negative=int(fields["negative"]),
                   window=int(fields["window"]), labels=tuple(json.loads(fields["labels"])), at_ms=int(fields["at_ms"]),
                   entry_id=fields.get("entry_id", ""))


def alert_id(tenant: str, conversation_id: str, speaker: str, utterance_id: str, kind: str) -> str:
    """The id the Redis script gives an event (redis.sha1hex of the same string)."""
    import hashlib

    return hashlib.sha1("\x1f".join((tenant, conversation_id, speaker, utterance_id, kind)).encode()).hexdigest()


__all__ = ["AlertEvent", "AlertKind", "EscalationConfig", "EscalationRule", "SpeakerAlertState", "alert_id"]
