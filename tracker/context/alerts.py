"""Alert events in Redis: the escalation rule applied per final (one script) and the reads.

Written like `ops.Ops`: generators that yield Redis steps, run by either store
(``store.run(op)`` / ``await store.run(op)``). Keys (docs/redis.md): ``P:conv:C:alerts`` (STREAM of
events), ``P:conv:C:spk:S:alert`` (HASH, the rule's state for a speaker) and, when webhooks are on,
``{prefix}:_alerts:outbox`` (STREAM of every tenant's events awaiting delivery).
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from .ops import _ENTRY_ID, Batch, Call, Eval, Op, _one, commit_eval, committed_record, split_commit_reply
from .schema import Keys, StoreConfig, alert_outbox_key, as_str, check_id, decode_entries, decode_hash

ALERTS_MAXLEN = 10_000  # per conversation (approximate trimming)
OUTBOX_MAXLEN = 100_000  # all tenants; a dispatcher that is down this long loses the oldest


class AlertOps:
    """The alert operations of one (key prefix, tenant)."""

    def __init__(self, config: StoreConfig, tenant: str) -> None:
        self.config = config
        self.tenant = check_id(tenant, "tenant")
        self.keys = Keys(config.key_prefix, tenant)
        self.outbox = alert_outbox_key(config.key_prefix)

    def step(self, conversation_id: str, speaker: str, utterance_id: str, seq: int, label: str, negative: bool,
             window: int, raise_at: int, clear_at: int, outbox: bool = False) -> Op[dict[str, Any] | None]:
        """Apply one final to the speaker's rule state; the event's fields if the alert changed, else None.

        Idempotent and ordered by `seq`: a final whose seq is not above the last one applied for the
        speaker changes nothing (a retried commit, a replayed stream).
        """
        cid = check_id(conversation_id, "conversation_id")
        check_id(speaker, "speaker")
        check_id(utterance_id, "utterance_id")
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise ValueError(f"seq must be an int >= 0 (the committed record's), got {seq!r}")
        keys = (self.keys.alert_state(cid, speaker), self.keys.alerts(cid), self.outbox)
        args = (seq, utterance_id, label, "1" if negative else "0", window, raise_at, clear_at, self.config.ttl_seconds,
                ALERTS_MAXLEN, "1" if outbox else "0", OUTBOX_MAXLEN, self.tenant, cid, speaker)
        reply = yield Eval("alert_step", keys, args)
        if int(reply[0]) == 0:
            return None
        _, _, kind, alert_id, entry_id, at_ms, n, labels = (as_str(x) for x in reply)
        return {"alert_id": alert_id, "kind": kind, "tenant": self.tenant, "conversation_id": cid, "speaker": speaker,
                "utterance_id": utterance_id, "seq": str(seq), "negative": n, "window": str(window), "labels": labels,
                "at_ms": at_ms, "entry_id": entry_id}

    def append_step(self, append: Eval, record: Mapping[str, Any], negative: bool | None, window: int, raise_at: int,
                    clear_at: int, outbox: bool = False, norm: tuple[str, tuple[Any, ...]] | None = None,
                    ) -> Op[tuple[bool, dict[str, Any], dict[str, Any] | None, int]]:
        """Store a record and, for a final of a watched speaker, step its alert: one script, one round trip.

        `append` is `Ops.append_eval(conversation_id, record)`; `negative` is None when the rule does
        not look at this record (an interim, an unwatched speaker). `norm` (`Ops.norm_args`) adds the
        utterance to its speaker's normalisation state in the same script.
        Returns ``(stored_now, the stored record, event fields or None, norm result)``: the record with
        its ``seq`` and ``entry_id`` (`tracker.context.ops.committed_record`); for a duplicate (a
        retried commit) the record stored first and the event the first commit caused, if any, so a
        retry sends the same result and events; the norm result as `split_commit_reply` gives it.
        """
        if append.name != "append":
            raise ValueError(f"append_step needs the append script's run, got {append.name!r}")
        record_seq = record.get("seq")
        if record_seq is not None and (isinstance(record_seq, bool) or not isinstance(record_seq, int) or record_seq < 0):
            raise ValueError(f"seq must be an int >= 0, got {record_seq!r}")
        cid = check_id(record["conversation_id"], "conversation_id")
        speaker = check_id(record["speaker"], "speaker")
        uid = check_id(record["utterance_id"], "utterance_id")
        alert = None
        if negative is not None:
            alert = ((self.keys.alert_state(cid, speaker), self.keys.alerts(cid), self.outbox),
                     (uid, record["label"], "1" if negative else "0", window, raise_at, clear_at, self.config.ttl_seconds,
                      ALERTS_MAXLEN, "1" if outbox else "0", OUTBOX_MAXLEN, self.tenant, cid, speaker,
                      "" if record_seq is None else str(record_seq)))
        reply = yield commit_eval(append, norm, alert)
        head, norm_result, tail = split_commit_reply(reply)
        stored = bool(int(head[0]))
        out = committed_record(cid, record, head)
        if len(tail) < 2 or int(tail[0]) == 0:
            return stored, out, None, norm_result
        _, _, kind, alert_id, alert_entry, at_ms, n, labels = tail
        return stored, out, {
            "alert_id": as_str(alert_id), "kind": as_str(kind), "tenant": self.tenant, "conversation_id": cid,
            "speaker": speaker, "utterance_id": uid, "seq": str(out.get("seq")), "negative": as_str(n),
            "window": str(window), "labels": as_str(labels), "at_ms": as_str(at_ms), "entry_id": as_str(alert_entry)}, norm_result

    def events(self, conversation_id: str, after: str = "0-0", count: int = 1000) -> Op[list[dict[str, str]]]:
        """The conversation's alert events after stream id `after`, oldest first, each with its ``entry_id``."""
        cid = check_id(conversation_id, "conversation_id")
        start = "-" if after in ("", "0", "0-0") else "(" + after
        (raw,) = yield _one(Call("xrange", (self.keys.alerts(cid),), {"min": start, "max": "+", "count": count}))
        out = []
        for entry_id, fields in raw or ():
            f = decode_hash(fields)
            f["entry_id"] = as_str(entry_id)
            out.append(f)
        return out

    def read_since(self, conversation_id: str, after: str = "0-0", alerts_after: str = "0-0",
                   block_ms: int | None = None, count: int = 100) -> Op[tuple[list[dict], list[dict[str, str]]]]:
        """``(records, alert events)`` stored after the two stream ids, from one XREAD of both streams
        (a watcher's feed: it waits up to `block_ms` for either). Events carry ``entry_id``."""
        cid = check_id(conversation_id, "conversation_id")
        for name, value in (("after", after), ("alerts_after", alerts_after)):
            if not isinstance(value, str) or not _ENTRY_ID.match(value or "0-0"):
                raise ValueError(f"{name} must be a stream id like '1700000000000-0', got {value!r}")
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        stream, alerts = self.keys.stream(cid), self.keys.alerts(cid)
        (raw,) = yield _one(Call("xread", ({stream: after or "0-0", alerts: alerts_after or "0-0"},),
                                 {"count": count, "block": block_ms}))
        items = raw.items() if isinstance(raw, Mapping) else (raw or ())
        records: list[dict] = []
        events: list[dict[str, str]] = []
        for key, entries in items:
            if entries and isinstance(entries[0], list) and entries[0] and isinstance(entries[0][0], (list, tuple)):
                entries = entries[0]  # RESP3 on some redis-py versions
            if as_str(key) == stream:
                records += decode_entries(entries)
            else:
                for entry_id, fields in entries:
                    f = decode_hash(fields)
                    f.update(tenant=self.tenant, conversation_id=cid, entry_id=as_str(entry_id))
                    events.append(f)
        return records, events

    def state(self, conversation_id: str, speakers: list[str]) -> Op[dict[str, dict[str, Any]]]:
        """Per speaker: whether the alert is up, since which utterance, and the window's labels."""
        cid = check_id(conversation_id, "conversation_id")
        if not speakers:
            return {}
        raw = yield Batch(tuple(Call("hgetall", (self.keys.alert_state(cid, s),)) for s in speakers))
        out = {}
        for s, h in zip(speakers, raw):
            f = decode_hash(h)
            if f:
                out[s] = {"raised": f.get("raised") == "1", "since_utterance_id": f.get("since_utterance_id"),
                          "since_ms": int(f["since_ms"]) if "since_ms" in f else None,
                          "labels": json.loads(f.get("labels") or "[]")}
        return out


__all__ = ["ALERTS_MAXLEN", "OUTBOX_MAXLEN", "AlertOps"]
