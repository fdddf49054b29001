"""The store's operations written once, without I/O, for both the sync and the asyncio client.

Each operation is a generator that yields a `Batch` of Redis calls (sent as one pipeline) or an
`Eval` of a named script, receives the results, and returns the decoded value. The sync store
drives it with blocking calls and the async store with awaits; neither contains any logic.
Validation happens before the first yield, so bad input never reaches Redis.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generator, Mapping, Sequence, TypeVar, Union

from tracker.context_window import window_length
from tracker.labels import LabelSet
from tracker.types import Turn

if TYPE_CHECKING:
    from .speaker_norm import NormWrite

from .schema import (
    EncodedRecord,
    Keys,
    StoreConfig,
    as_str,
    check_id,
    decode_entries,
    decode_entry,
    decode_hash,
    decode_meta,
    decode_speaker_state,
    encode_record,
    idempotency_field,
)


T = TypeVar("T")
_PAGE = 500
_ENTRY_ID = re.compile(r"^(\$|\d+(-\d+)?)$")


@dataclass(frozen=True)
class Call:
    """One redis-py client method call, e.g. ``Call("xrange", (key,), {"count": 10})``."""

    name: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Batch:
    """Calls sent together in one non-transactional pipeline; the op receives their results."""

    calls: tuple[Call, ...]


@dataclass(frozen=True)
class Eval:
    """A run of script `name` (see `scripts.SCRIPTS`); the op receives its reply."""

    name: str
    keys: tuple[str, ...]
    args: tuple[Any, ...]


Step = Union[Batch, Eval]
Op = Generator[Step, Any, T]


def _one(call: Call) -> Batch:
    return Batch((call,))


def committed_record(conversation_id: str, record: Mapping[str, Any], reply: Sequence[Any]) -> dict:
    """The stored record from the append script's reply (`Ops.append_eval`): `record` with the ``seq``
    the script assigned and its ``entry_id``, or, for a duplicate, the copy stored first."""
    stored, entry_id = bool(int(reply[0])), as_str(reply[1])
    if not stored and len(reply) > 2 and reply[2]:
        return {**decode_entry(entry_id, reply[2]), "conversation_id": conversation_id}
    out = dict(record)
    if stored and len(reply) > 2 and as_str(reply[2]):
        out["seq"] = int(as_str(reply[2]))
    out["entry_id"] = entry_id
    return out


def commit_eval(append: Eval, norm: tuple[str, tuple[Any, ...]] | None = None,
                alert: tuple[tuple[str, ...], tuple[Any, ...]] | None = None) -> Eval:
    """One script run storing a record: the append (`Ops.append_eval`) alone, or, with the
    speaker-norm write ``(key, args)`` and/or the alert step ``(keys, args)``, the ``commit`` script
    (tracker.context.scripts.COMMIT) that runs them together. Its reply: `split_commit_reply`."""
    if norm is None and alert is None:
        return append
    keys = (*append.keys, *(alert[0] if alert else ()), *((norm[0],) if norm else ()))
    nargs = norm[1] if norm else ()
    args = (len(append.args), "1" if alert else "0", len(nargs), *append.args, *nargs, *(alert[1] if alert else ()))
    return Eval("commit", keys, args)


def split_commit_reply(reply: Sequence[Any]) -> tuple[Sequence[Any], int, Sequence[Any]]:
    """``(the append's reply, norm result, the alert step's tail)`` of a `commit_eval` run: norm is
    1 written, 0 nothing written, -1 another utterance of the speaker went first; the tail is
    ``[changed, raised, kind, ...]`` or empty."""
    if len(reply) <= 3:  # the plain append script
        return reply, 0, ()
    return reply[:3], int(reply[3]), reply[4:]


class Ops:
    """The operations of a `ConversationStore` for one key prefix and tenant."""

    def __init__(self, config: StoreConfig, label_set: LabelSet, tenant: str) -> None:
        self.config = config
        self.label_set = label_set
        self.tenant = check_id(tenant, "tenant")
        self.keys = Keys(config.key_prefix, tenant)

    # -- writes ------------------------------------------------------------------------------

    def append(self, conversation_id: str, record: Mapping[str, Any]) -> Op[tuple[bool, str]]:
        reply = yield self.append_eval(conversation_id, record)
        return bool(int(reply[0])), as_str(reply[1])

    def append_eval(self, conversation_id: str, record: Mapping[str, Any]) -> Eval:
        """The append script's run for `record` (validated and encoded here; raises ValueError).

        Its reply is ``[1, entry_id, seq]`` when stored now, ``[0, entry_id, fields of the first copy]``
        for a duplicate (see `committed_record`); `tracker.context.alerts.AlertOps.append_step` folds it
        into one script with the alert step.
        """
        cid = check_id(conversation_id, "conversation_id")
        enc = encode_record(record, self.label_set)
        return Eval("append", tuple(self.keys.append_keys(cid, enc.speaker)), self._append_args(cid, enc))

    def _append_args(self, cid: str, enc: EncodedRecord) -> tuple[Any, ...]:
        c = self.config
        return (
            idempotency_field(enc.utterance_id, enc.is_final),
            "1" if enc.is_final else "0",
            c.stream_maxlen,
            c.ttl_seconds,
            c.recent_labels,
            repr(float(c.trend_alpha)),
            enc.speaker,
            enc.label,
            enc.score,
            cid,
            self.label_set.name,
            "1" if enc.has_seq else "0",
            *enc.fields,
        )

    def commit(self, conversation_id: str, record: Mapping[str, Any]) -> Op[dict]:
        """Store `record` once per (utterance_id, is_final) and return what is stored, in one script run.

        The script assigns ``seq`` (unless the record carries one); a duplicate returns the record
        stored first (or `record` itself if that one was trimmed away by MAXLEN). With the escalation
        rule or speaker normalisation, `tracker.alerts.AlertEngine.append` runs them in the same script.
        """
        cid = check_id(conversation_id, "conversation_id")
        reply = yield self.append_eval(cid, record)
        return committed_record(cid, record, reply)

    def norm_args(self, cid: str, record: Mapping[str, Any], norm: "NormWrite | None") -> tuple[str, tuple[Any, ...]] | None:
        """``(key, args)`` of the speaker-norm write a commit carries, or None."""
        if norm is None:
            return None
        speaker, uid = check_id(record["speaker"], "speaker"), check_id(record["utterance_id"], "utterance_id")
        return self.keys.speaker_norm(cid, speaker), norm.args(uid, self.config.ttl_seconds)

    def end_conversation(self, conversation_id: str) -> Op[bool]:
        cid = check_id(conversation_id, "conversation_id")
        reply = yield Eval("end", (self.keys.meta(cid), self.keys.conversations), (cid,))
        return bool(int(reply))

    def delete_conversation(self, conversation_id: str) -> Op[bool]:
        """Delete everything stored of the conversation (stream, meta, ids, seq, speakers' state, alerts)
        in one script; True if there was anything. Speakers are listed first and re-checked inside it."""
        cid = check_id(conversation_id, "conversation_id")
        for _ in range(10):
            (members,) = yield _one(Call("smembers", (self.keys.speakers(cid),)))
            speakers = sorted(as_str(m) for m in members or ())
            keys = (self.keys.speakers(cid), self.keys.conversations, *self.keys.conversation_keys(cid, speakers))
            reply = int((yield Eval("delete", keys, (cid, len(speakers)))))
            if reply >= 0:
                return bool(reply)
        raise RuntimeError(f"conversation {cid!r}: speakers kept changing while it was being deleted")

    def next_seq(self, conversation_id: str) -> Op[int]:
        cid = check_id(conversation_id, "conversation_id")
        reply = yield Eval("next_seq", (self.keys.seq(cid),), (self.config.ttl_seconds,))
        return int(reply)

    # -- reads -------------------------------------------------------------------------------

    def exists(self, conversation_id: str) -> Op[bool]:
        cid = check_id(conversation_id, "conversation_id")
        (n,) = yield _one(Call("exists", (self.keys.meta(cid),)))
        return bool(n)

    def history(self, conversation_id: str, finals_only: bool = True, count: int | None = None) -> Op[list[dict]]:
        """Records oldest first; ``count`` keeps the first `count` (use `context` for the last)."""
        cid = check_id(conversation_id, "conversation_id")
        if count is not None and count <= 0:
            return []
        key, start, out = self.keys.stream(cid), "-", []
        while True:
            (raw,) = yield _one(Call("xrange", (key,), {"min": start, "max": "+", "count": _PAGE}))
            entries = decode_entries(raw)
            for rec in entries:
                if finals_only and not rec["is_final"]:
                    continue
                out.append(rec)
                if count is not None and len(out) >= count:
                    return out
            if len(entries) < _PAGE:
                return out
            start = "(" + entries[-1]["entry_id"]

    def get_final(self, conversation_id: str, utterance_id: str) -> Op[dict | None]:
        """The stored final record of an utterance, or None (looked up through the idempotency hash)."""
        cid = check_id(conversation_id, "conversation_id")
        uid = check_id(utterance_id, "utterance_id")
        (entry_id,) = yield _one(Call("hget", (self.keys.ids(cid), idempotency_field(uid, True))))
        if entry_id is None:
            return None
        eid = as_str(entry_id)
        (raw,) = yield _one(Call("xrange", (self.keys.stream(cid),), {"min": eid, "max": eid, "count": 1}))
        entries = decode_entries(raw)
        return entries[0] if entries else None  # None if trimmed away by MAXLEN

    def ping(self) -> Op[bool]:
        (ok,) = yield _one(Call("ping"))
        return bool(ok)

    def context(self, conversation_id: str, k: int) -> Op[list[Turn]]:
        """The last `k` utterances as prompt context, oldest first.

        An utterance counts once, where it entered the conversation: with refinement on, its interim
        record (marked ``refine``; the refined final, stored later, is skipped), otherwise its final
        record. Other partial records (not marked) never count: their text may still change.
        """
        cid = check_id(conversation_id, "conversation_id")
        if k <= 0:
            return []
        return (yield from self._turns(cid, k, None, _page(k)))

    def _turns(self, cid: str, k: int, first_page: list[dict] | None, page: int) -> Op[list[Turn]]:
        """`context`'s walk back through the stream, `page` entries a read; `first_page` = the first
        read already made (newest first)."""
        key, end, newest_first, seen = self.keys.stream(cid), "+", [], set()
        entries = first_page
        while True:
            if entries is None:
                (raw,) = yield _one(Call("xrevrange", (key,), {"max": end, "min": "-", "count": page}))
                entries = decode_entries(raw)
            for rec in entries:
                if rec.get("refined") if rec["is_final"] else not rec.get("refine"):
                    continue
                if rec["utterance_id"] not in seen:
                    seen.add(rec["utterance_id"])
                    newest_first.append(Turn(speaker=rec["speaker"], text=rec["text"]))
                    if len(newest_first) == k:
                        return newest_first[::-1]
            if len(entries) < page:
                return newest_first[::-1]
            end = "(" + entries[-1]["entry_id"]
            entries = None

    def context_window(self, conversation_id: str, max_turns: int, min_turns: int | None = None) -> Op[tuple[int, list[Turn]]]:
        """``(index, context)`` for the conversation's next utterance: its position (the number of
        finals stored) and its window of past turns (tracker.context_window), oldest first."""
        cid = check_id(conversation_id, "conversation_id")
        (n,) = yield _one(Call("hget", (self.keys.meta(cid), "n_final")))
        index = int(as_str(n)) if n is not None else 0
        turns = yield from self.context(cid, window_length(index, max_turns, min_turns))
        return index, turns

    def begin(self, conversation_id: str, utterance_id: str, max_turns: int, min_turns: int | None = None,
              speaker: str | None = None) -> Op[tuple[dict | None, int, list[Turn], dict[str, str] | None]]:
        """``(stored final or None, index, context, speaker-norm state)`` of an utterance about to be
        labelled, in one pipeline.

        One batch reads the utterance's idempotency field, the conversation's final count, the
        newest page of its stream (enough for a window of `max_turns` turns) and, when `speaker` is
        given, that speaker's normalisation hash (tracker.context.speaker_norm; else None); only an
        unusual conversation (a retried utterance whose final is older than that page, or a page of
        mostly partial records) costs another round trip.
        """
        cid = check_id(conversation_id, "conversation_id")
        uid = check_id(utterance_id, "utterance_id")
        window_length(0, max_turns, min_turns)  # validates the policy before anything is sent
        page = _page(max_turns)
        calls = [
            Call("hget", (self.keys.ids(cid), idempotency_field(uid, True))),
            Call("hget", (self.keys.meta(cid), "n_final")),
            Call("xrevrange", (self.keys.stream(cid),), {"max": "+", "min": "-", "count": page}),
        ]
        if speaker is not None:
            calls.append(Call("hgetall", (self.keys.speaker_norm(cid, check_id(speaker, "speaker")),)))
        entry_id, n, raw, *norm = yield Batch(tuple(calls))
        state = decode_hash(norm[0]) if norm else None
        entries = decode_entries(raw)
        if entry_id is not None:  # a retried utterance: its stored final, from the page if it is there
            eid = as_str(entry_id)
            found = [e for e in entries if e["entry_id"] == eid]
            if not found:
                (raw,) = yield _one(Call("xrange", (self.keys.stream(cid),), {"min": eid, "max": eid, "count": 1}))
                found = decode_entries(raw)
            if found:
                return {**found[0], "conversation_id": cid}, 0, [], state
        index = int(as_str(n)) if n is not None else 0
        k = window_length(index, max_turns, min_turns)
        turns = (yield from self._turns(cid, k, entries, page)) if k > 0 else []
        return None, index, turns, state

    def read_since(
        self, conversation_id: str, last_entry_id: str = "0-0", block_ms: int | None = None, count: int = 100
    ) -> Op[list[dict]]:
        """Entries (partials too) after `last_entry_id`, for a dashboard catching up (XREAD)."""
        cid = check_id(conversation_id, "conversation_id")
        last = as_str(last_entry_id) if last_entry_id else "0-0"
        if not isinstance(last, str) or not _ENTRY_ID.match(last):
            raise ValueError(f"last_entry_id must be a stream id like '1700000000000-0' (or '$'), got {last_entry_id!r}")
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        (raw,) = yield _one(Call("xread", ({self.keys.stream(cid): last},), {"count": count, "block": block_ms}))
        if not raw:
            return []
        if isinstance(raw, Mapping):  # RESP3
            return [r for entries in raw.values() for r in decode_entries(entries[0] if _nested(entries) else entries)]
        return [r for _, entries in raw for r in decode_entries(entries)]

    def admission(self, conversation_id: str) -> Op[tuple[bool, int]]:
        """``(the conversation exists, how many this tenant has)`` in one pipeline: what a start needs
        to admit a conversation under the tenant's limit."""
        cid = check_id(conversation_id, "conversation_id")
        n_exists, n = yield Batch((Call("exists", (self.keys.meta(cid),)), Call("zcard", (self.keys.conversations,))))
        return bool(n_exists), int(n)

    def count_conversations(self) -> Op[int]:
        """How many conversations this tenant has in its index (live and recent, not yet expired)."""
        (n,) = yield _one(Call("zcard", (self.keys.conversations,)))
        return int(n)

    def list_conversations(self, limit: int = 50) -> Op[list[dict]]:
        """This tenant's conversations, most recently updated first."""
        if limit <= 0:
            return []
        (pairs,) = yield _one(Call("zrevrange", (self.keys.conversations, 0, limit - 1)))
        ids = [as_str(m) for m in pairs]
        if not ids:
            return []
        calls = []
        for cid in ids:
            calls += [Call("hgetall", (self.keys.meta(cid),)), Call("smembers", (self.keys.speakers(cid),))]
        results = yield Batch(tuple(calls))
        out = []
        for i, cid in enumerate(ids):
            meta, speakers = results[2 * i], results[2 * i + 1]
            if meta:  # an expired conversation not yet pruned from the index
                out.append(decode_meta(cid, meta, speakers))
        return out

    def speaker_state(self, conversation_id: str, speaker: str) -> Op[dict]:
        cid = check_id(conversation_id, "conversation_id")
        check_id(speaker, "speaker")
        counts, recent, state = yield Batch(self._speaker_calls(cid, speaker))
        return decode_speaker_state(counts, recent, state, self.label_set)

    def get_conversation(self, conversation_id: str, finals_only: bool = True) -> Op[dict | None]:
        """Meta + utterances + per-speaker state, or None if the conversation is unknown."""
        cid = check_id(conversation_id, "conversation_id")
        meta, speakers = yield Batch(
            (Call("hgetall", (self.keys.meta(cid),)), Call("smembers", (self.keys.speakers(cid),)))
        )
        if not meta:
            return None
        out = decode_meta(cid, meta, speakers)
        out["utterances"] = yield from self.history(cid, finals_only=finals_only)
        states: dict[str, dict] = {}
        if out["speakers"]:
            calls = tuple(c for s in out["speakers"] for c in self._speaker_calls(cid, s))
            results = yield Batch(calls)
            for i, s in enumerate(out["speakers"]):
                states[s] = decode_speaker_state(*results[3 * i : 3 * i + 3], self.label_set)
        out["speaker_state"] = states
        return out

    def _speaker_calls(self, cid: str, speaker: str) -> tuple[Call, ...]:
        return (
            Call("hgetall", (self.keys.speaker(cid, speaker, "counts"),)),
            Call("lrange", (self.keys.speaker(cid, speaker, "recent"), 0, -1)),
            Call("hgetall", (self.keys.speaker(cid, speaker, "state"),)),
        )


def _page(k: int) -> int:
    """Stream entries read per page to find `k` context turns (partials and refined finals are skipped)."""
    return max(2 * k, 16)


def _nested(entries: Any) -> bool:
    """RESP3 XREAD wraps each stream's entry list in one more list on some redis-py versions."""
    return bool(entries) and isinstance(entries[0], list) and bool(entries[0]) and isinstance(entries[0][0], (list, tuple))
