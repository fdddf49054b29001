"""Speaker normalisation in the live service: each speaker's running statistics in Redis.

A served model whose modalities have ``speaker_norm: true`` was trained on features normalised
against the speaker's *past* utterances (``tracker.audio.speaker_norm``, past-only). Live, the past
is the conversation so far: per (conversation, speaker, modality) a ``SpeakerStats`` kept in the
HASH ``P:conv:C:spk:S:norm`` (docs/redis.md):

- ``<modality>``: JSON of ``SpeakerStats.to_dict()`` (float32 vectors, base64) after the last utterance added;
- ``prev:<modality>``: the same before it;
- ``last``: the id of the last utterance added; ``n``: how many were added.

Per utterance (:meth:`SpeakerNormOps.normalize`): read the hash, normalise with the stats (the
past), add the utterance, and write the new stats with the script ``norm_commit``, which stores
them only if ``last`` is still what was read (else it reads again) and does nothing when the
utterance is already ``last``. A retry of the same utterance (a replica died after the write) finds
``last`` = its id and normalises with ``prev:`` — the same past as the first attempt — without
adding it twice: the same features come out and the bytes in Redis stay as they are.

Written like ``ops.Ops``: a generator op, run by either store (``await store.run(op)``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
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
            h = decode_hash(raw)
            last = h.get("last", "")
            retry = last == uid  # added already: normalise with the past it had then, add nothing
            out, triples = dict(features), []
            for name in names:
                norm = normalizers[name]
                stats = _stats(h.get(f"prev:{name}" if retry else name), norm, f"{key} {name}")
                before = json.dumps(stats.to_dict(), separators=(",", ":"))
                out[name] = norm.step(np.asarray(features[name]), stats)  # (frames, F): past-only, then add
                triples += [name, json.dumps(stats.to_dict(), separators=(",", ":")), before]
            if retry:
                return out
            reply = yield Eval("norm_commit", (key,), (uid, last, self.config.ttl_seconds, *triples))
            if int(reply) >= 0:
                return out
        raise RuntimeError(f"speaker normalisation of {cid}/{spk}: the state kept changing under {MAX_ATTEMPTS} attempts")


__all__ = ["SpeakerNormOps", "normalizers_from_checkpoint"]
