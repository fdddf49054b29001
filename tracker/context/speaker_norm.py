"""Speaker normalisation in the live service: each speaker's running statistics in Redis.

A served model whose modalities have ``speaker_norm: true`` was trained on features normalised
against the speaker's *past* utterances (``tracker.audio.speaker_norm``, past-only). Live, the past
is the conversation so far: per (conversation, speaker, modality) a ``SpeakerStats`` kept in the
HASH ``P:conv:C:spk:S:norm`` (docs/redis.md):

- ``<modality>``: JSON of ``SpeakerStats.to_dict()`` (float32 vectors, base64) after the last utterance added;
- ``prev:<modality>``: the same before it;
- ``last``: the id of the last utterance added; ``n``: how many were added.

Per utterance: read the hash, normalise with the stats (the past), add the utterance, and write the
new stats with the script step ``norm_commit``, which stores them only if ``last`` is still what
was read and does nothing when the utterance is already ``last``. The live pipeline folds both
into its two round trips: the hash is read in ``begin``'s pipeline (:func:`normalize_with_state`
turns it into the normalised features and a :class:`NormWrite`), and the write runs inside the
commit's script with the append (``tracker.context.ops.Ops.commit``); only when another
utterance of the same speaker went first meanwhile (two connections on one conversation) does
:meth:`SpeakerNormOps.normalize`, a read-then-write loop, add the utterance to the newer state. A retry of the same utterance (a replica died after the write) finds
``last`` = its id and normalises with ``prev:`` — the same past as the first attempt — without
adding it twice: the same features come out and the bytes in Redis stay as they are.

Written like ``ops.Ops``: a generator op, run by either store (``await store.run(op)``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from tracker.audio.speaker_norm import SpeakerNormalizer, SpeakerStats

from .ops import Eval, Op, _one, Call
from .schema import Keys, StoreConfig, check_id, decode_hash

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 20  # concurrent writers of one speaker's state (several replicas) each retry a few times at most


def normalizers_from_checkpoint(path: str | Path) -> dict[str, SpeakerNormalizer]:
    """{modality: SpeakerNormalizer} of a checkpoint's ``speaker_norm`` modalities, read without torch
    (config.json and the adapter's ``norm_mean_<m>`` / ``norm_std_<m>`` tensors), as
    ``EmotionRecognizer.speaker_normalizers()`` builds them."""
    from safetensors import safe_open

    path = Path(path)
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    names = [m["name"] for m in config["recognizer"].get("adapter", {}).get("modalities", []) if m.get("speaker_norm")]
    if not names:
        return {}
    out = {}
    with safe_open(str(path / "model.safetensors"), framework="numpy") as f:
        for name in names:
            mean, std = f.get_tensor(f"adapter.norm_mean_{name}"), f.get_tensor(f"adapter.norm_std_{name}")
            out[name] = SpeakerNormalizer(mean.astype(np.float64), std.astype(np.float64))
    return out


def _stats(raw: str | None, norm: SpeakerNormalizer, where: str) -> SpeakerStats:
    if not raw:
        return norm.new_stats()
    try:
        stats = SpeakerStats.from_dict(json.loads(raw))
    except ValueError as exc:  # JSON or state malformed: start afresh rather than fail the utterance
        log.warning("%s: %s; starting from no past", where, exc)
        return norm.new_stats()
    if stats.dim != norm.dim:
        log.warning("%s: stored stats have %d features, the model %d; starting from no past", where, stats.dim, norm.dim)
        return norm.new_stats()
    return stats


@dataclass(frozen=True)
class NormWrite:
    """The speaker-norm update an utterance's commit carries into its script (``norm_commit``)."""

    last: str  # the hash's ``last`` as read: the script writes only if it is unchanged
    triples: tuple[str, ...]  # (modality, stats after, stats before) per normalised modality
    raw: Mapping[str, np.ndarray]  # the features before normalisation, to add them again on a conflict

    def args(self, utterance_id: str, ttl_seconds: int) -> tuple[Any, ...]:
        return (utterance_id, self.last, ttl_seconds, *self.triples)


def normalize_with_state(state: Mapping[str, str], utterance_id: str, features: Mapping[str, np.ndarray],
                         normalizers: Mapping[str, SpeakerNormalizer],
                         where: str = "speaker norm") -> tuple[dict[str, np.ndarray], NormWrite | None]:
    """`features` normalised by the speaker's past (`state`: the norm hash as read), and the write
    that adds this utterance to it (None when `state` shows it added already: a retry, which is
    normalised with the past it had then, ``prev:``)."""
    names = [n for n in normalizers if n in features]
    if not names:
        return dict(features), None
    last = state.get("last", "")
    retry = last == utterance_id
    out, triples = dict(features), []
    for name in names:
        norm = normalizers[name]
        stats = _stats(state.get(f"prev:{name}" if retry else name), norm, f"{where} {name}")
        before = json.dumps(stats.to_dict(), separators=(",", ":"))
        out[name] = norm.step(np.asarray(features[name]), stats)  # (frames, F): past-only, then add
        triples += [name, json.dumps(stats.to_dict(), separators=(",", ":")), before]
    return out, (None if retry else NormWrite(last, tuple(triples), dict(features)))


class SpeakerNormOps:
    """Speaker normalisation state of one (key prefix, tenant)."""

    def __init__(self, config: StoreConfig, tenant: str) -> None:
        self.config = config
        self.tenant = check_id(tenant, "tenant")
        self.keys = Keys(config.key_prefix, tenant)

    def state(self, conversation_id: str, speaker: str) -> Op[dict[str, Any]]:
        """``{"last", "n", "stats": {modality: SpeakerStats}}`` as stored (for tests and inspection)."""
        cid, spk = check_id(conversation_id, "conversation_id"), check_id(speaker, "speaker")
        (raw,) = yield _one(Call("hgetall", (self.keys.speaker_norm(cid, spk),)))
        h = decode_hash(raw)
        stats = {k: SpeakerStats.from_dict(json.loads(v)) for k, v in h.items() if k not in ("last", "n") and not k.startswith("prev:")}
        return {"last": h.get("last"), "n": int(h.get("n", 0)), "stats": stats}

    def normalize(self, conversation_id: str, speaker: str, utterance_id: str, features: Mapping[str, np.ndarray],
                  normalizers: Mapping[str, SpeakerNormalizer]) -> Op[dict[str, np.ndarray]]:
        """`features` with every normalised modality mapped by the speaker's past; the utterance joins the past once."""
        cid, spk = check_id(conversation_id, "conversation_id"), check_id(speaker, "speaker")
        uid = check_id(utterance_id, "utterance_id")
        names = [n for n in normalizers if n in features]
        if not names:
            return dict(features)
        key = self.keys.speaker_norm(cid, spk)
        for _ in range(MAX_ATTEMPTS):
            (raw,) = yield _one(Call("hgetall", (key,)))
            out, write = normalize_with_state(decode_hash(raw), uid, features, normalizers, key)
            if write is None:  # added already: normalised with the past it had then, nothing to add
                return out
            reply = yield Eval("norm_commit", (key,), write.args(uid, self.config.ttl_seconds))
            if int(reply) >= 0:
                return out
        raise RuntimeError(f"speaker normalisation of {cid}/{spk}: the state kept changing under {MAX_ATTEMPTS} attempts")


async def add_after_conflict(store, conversation_id: str, record: Mapping[str, Any], norm: NormWrite,
                             normalizers: Mapping[str, SpeakerNormalizer]) -> None:
    """Add a committed utterance to its speaker's state after the commit's write found another
    utterance first (two connections on one conversation): read again, add, write (`normalize`)."""
    ops = SpeakerNormOps(store.config, store.tenant)
    await store.run(ops.normalize(conversation_id, record["speaker"], record["utterance_id"], norm.raw, normalizers))


__all__ = ["add_after_conflict", "NormWrite", "SpeakerNormOps", "normalize_with_state", "normalizers_from_checkpoint"]
