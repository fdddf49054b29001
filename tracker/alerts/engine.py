"""`AlertEngine`: the escalation rule applied to each committed final, with its events kept in Redis.

The service stores each result with ``await engine.append(conversation_id, record)``: the append
script and the rule's step run as one script (one round trip, atomic), and the events it returns
go to the stream and the watchers; a speaker-normalisation write (`norm`) rides in the same script.
``on_final_committed(record)`` applies the rule to a record stored before (it needs the ``seq``
the store gave it). Each call is one script run in Redis: the rule's state per speaker and the event
stream are updated atomically, and applying the same final twice (a retry) changes nothing. With
``outbox=True`` every event is also queued for webhook delivery (`tracker.alerts.webhooks`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Union

from tracker.context.alerts import AlertOps
from tracker.context.store import AsyncConversationStore, ConversationStore
from tracker.labels import LabelSet

from .rule import AlertEvent, EscalationConfig, EscalationRule

if TYPE_CHECKING:
    from tracker.context.speaker_norm import NormWrite

Store = Union[AsyncConversationStore, ConversationStore]


@dataclass(frozen=True)
class Committed:
    """What `AlertEngine.append` did: stored now (False for a duplicate), the stored record (for a
    duplicate the copy stored first, with its ``seq`` and ``entry_id``), the alert events it caused."""

    stored: bool
    record: dict[str, Any]
    events: list[AlertEvent]
    norm_conflict: bool = False  # the speaker-norm write found another utterance first (add it again)

    @property
    def seq(self) -> int | None:
        return self.record.get("seq")

    @property
    def entry_id(self) -> str:
        return str(self.record.get("entry_id", ""))


class AlertEngine:
    """The rule for one tenant's store (`with_tenant` for another); async methods for the async store.

    `SyncAlertEngine` has the same methods, blocking, for a `ConversationStore`.
    """

    def __init__(self, store: Store, config: EscalationConfig | None = None, label_set: LabelSet | None = None, *,
                 outbox: bool = False) -> None:
        self.store = store
        self.config = config or EscalationConfig()
        self.rule = EscalationRule(self.config, label_set or store.label_set)
        self.outbox = outbox
        self._ops = AlertOps(store.config, store.tenant)

    @property
    def tenant(self) -> str:
        return self.store.tenant

    def with_tenant(self, tenant: str) -> "AlertEngine":
        return type(self)(self.store.with_tenant(tenant), self.config, self.rule.label_set, outbox=self.outbox)

    def _step_op(self, record: Mapping[str, Any]):
        """The Redis operation for `record`, or None when the rule does not look at it."""
        if not self.config.enabled or not record.get("is_final", True) or not self.config.watches(str(record["speaker"])):
            return None
        label = record["label"]
        if label not in self.rule.label_set.labels:
            raise ValueError(f"label {label!r} is not in label set {self.rule.label_set.name!r}")
        if record.get("seq") is None:
            raise ValueError("on_final_committed needs the committed record: it has no seq")
        c = self.config
        return self._ops.step(record["conversation_id"], record["speaker"], record["utterance_id"], int(record["seq"]),
                              label, self.rule.is_negative(label), c.window, c.raise_at, c.clear_at, self.outbox)

    def _append_op(self, conversation_id: str, record: Mapping[str, Any], norm: "NormWrite | None" = None):
        """The one-script op storing `record`, stepping the rule when it looks at it, and writing the
        speaker-norm update `norm` when given."""
        rec = {**record, "conversation_id": conversation_id}
        append = self.store._ops.append_eval(conversation_id, rec)  # validates the record (ValueError)
        c = self.config
        looks = c.enabled and bool(rec.get("is_final", True)) and c.watches(str(rec["speaker"]))
        if looks and rec["label"] not in self.rule.label_set.labels:
            raise ValueError(f"label {rec['label']!r} is not in label set {self.rule.label_set.name!r}")
        negative = self.rule.is_negative(rec["label"]) if looks else None
        return self._ops.append_step(append, rec, negative, c.window, c.raise_at, c.clear_at, self.outbox,
                                     self.store._ops.norm_args(conversation_id, rec, norm))

    @staticmethod
    def _committed(reply) -> "Committed":
        stored, record, fields, norm_result = reply
        return Committed(stored, record, [AlertEvent.from_fields(fields)] if fields else [], norm_result < 0)

    async def append(self, conversation_id: str, record: Mapping[str, Any], norm: "NormWrite | None" = None) -> "Committed":
        """Store `record` (like `store.append`) and apply the rule to it, in one Redis round trip.

        Without a ``seq`` in the record the store assigns the next one. A duplicate (the same
        utterance id and finality again) stores nothing and returns the events the first one caused.
        `norm` (tracker.context.speaker_norm.normalize_with_state) is written in the same script.
        """
        return self._committed(await self.store.run(self._append_op(conversation_id, record, norm)))

    def _event(self, fields: dict[str, Any] | None) -> list[AlertEvent]:
        return [AlertEvent.from_fields(fields)] if fields else []

    async def on_final_committed(self, record: Mapping[str, Any]) -> list[AlertEvent]:
        """Apply one committed final (``conversation_id``, ``utterance_id``, ``speaker``, ``label``, ``seq``);
        the alert events it caused (none, or one raised or cleared)."""
        op = self._step_op(record)
        return self._event(await self.store.run(op)) if op is not None else []

    async def events(self, conversation_id: str, after: str = "0-0", count: int = 1000) -> list[AlertEvent]:
        """The conversation's stored events after `after` (a stream id), oldest first."""
        raw = await self.store.run(self._ops.events(conversation_id, after, count))
        return [AlertEvent.from_fields(f, self.tenant, conversation_id) for f in raw]

    async def read_since(self, conversation_id: str, after: str = "0-0", alerts_after: str = "0-0",
                         block_ms: int | None = None, count: int = 100) -> tuple[list[dict], list[AlertEvent]]:
        """Records and alert events stored after the two stream ids (one XREAD; waits up to `block_ms`)."""
        records, raw = await self.store.run(self._ops.read_since(conversation_id, after, alerts_after, block_ms, count))
        return records, [AlertEvent.from_fields(f) for f in raw]

    async def state(self, conversation_id: str, speakers: list[str]) -> dict[str, dict[str, Any]]:
        """Which speakers have an alert up now (and since which utterance)."""
        return await self.store.run(self._ops.state(conversation_id, speakers))


class SyncAlertEngine(AlertEngine):
    """`AlertEngine` for the blocking `ConversationStore` (replay, tests, tools)."""

    def append(self, conversation_id: str, record: Mapping[str, Any],  # type: ignore[override]
               norm: "NormWrite | None" = None) -> "Committed":
        return self._committed(self.store.run(self._append_op(conversation_id, record, norm)))

    def on_final_committed(self, record: Mapping[str, Any]) -> list[AlertEvent]:  # type: ignore[override]
        op = self._step_op(record)
        return self._event(self.store.run(op)) if op is not None else []

    def events(self, conversation_id: str, after: str = "0-0", count: int = 1000) -> list[AlertEvent]:  # type: ignore[override]
        raw = self.store.run(self._ops.events(conversation_id, after, count))
        return [AlertEvent.from_fields(f, self.tenant, conversation_id) for f in raw]

    def read_since(self, conversation_id: str, after: str = "0-0", alerts_after: str = "0-0",  # type: ignore[override]
                   block_ms: int | None = None, count: int = 100) -> tuple[list[dict], list[AlertEvent]]:
        records, raw = self.store.run(self._ops.read_since(conversation_id, after, alerts_after, block_ms, count))
        return records, [AlertEvent.from_fields(f) for f in raw]

    def state(self, conversation_id: str, speakers: list[str]) -> dict[str, dict[str, Any]]:  # type: ignore[override]
        return self.store.run(self._ops.state(conversation_id, speakers))


__all__ = ["AlertEngine", "Committed", "SyncAlertEngine"]
