"""The work behind a live session: one protocol, an in-process implementation, one round trip each way.

A :class:`~tracker.stream.session.StreamSession` labels each utterance through a :class:`Pipeline`:

1. ``begin(conversation, utterance)``: the utterance's stored final, if it has one (a retry is
   answered with it and labels nothing), and its window of past turns, in ONE Redis round trip
   (``tracker.context.ops.Ops.begin``), run in parallel with
2. ``features(pcm, sample_rate)``: the acoustic inputs of the utterance's audio;
3. ``label(conversation, utterance)``: the model's distribution (per-conversation prefix caches);
4. ``commit(conversation, record)``: store the result once, the append script assigning ``seq``, and
   get the stored record back, in ONE round trip (``Ops.commit``).

:func:`label_utterance` runs those steps; :class:`LocalPipeline` implements them in this process over
the recognizer, the async store and the feature extractor (``tracker replay``, tests, benches);
``services.ingress.ServePipeline`` implements them with Ray Serve handles. The window policy is
bound when the pipeline is built, not passed per call.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence

import numpy as np

from tracker.stream import protocol as P
from tracker.stream.batching import Batcher
from tracker.types import Turn, UtteranceInput

if TYPE_CHECKING:  # torch behind these: imported by whoever builds a LocalPipeline
    from tracker.alerts import AlertEngine
    from tracker.audio.modalities import ModalityFeatures
    from tracker.context.speaker_norm import NormWrite
    from tracker.context.store import AsyncConversationStore


@dataclass(frozen=True)
class Begun:
    """What `begin` found for an utterance about to be labelled."""

    final: dict[str, Any] | None  # its stored final record (a retried utterance), else None
    index: int = 0  # its position in the conversation (finals stored before it)
    context: tuple[Turn, ...] = ()  # its window of past turns, oldest first
    speaker_state: dict[str, str] | None = None  # the speaker's normalisation hash, when asked for


class Pipeline(Protocol):
    """What a StreamSession (and its RefineStage) needs from the rest of the tracker."""

    refine_info: dict[str, Any] | None  # set when conversation-level refinement is on (tracker.stream.refine)

    normalizers: dict[str, Any]  # {modality: tracker.audio.speaker_norm.SpeakerNormalizer} of speaker_norm models, else {}

    async def begin(self, conversation_id: str, utterance_id: str, speaker: str | None = None) -> Begun:
        """The stored final or the context window (and `speaker`'s normalisation state when given)."""

    async def features(self, pcm: bytes | None, sample_rate: int) -> Mapping[str, np.ndarray] | None: ...

    async def label(self, conversation_id: str, utterance: UtteranceInput) -> dict[str, Any]:
        """``{"label", "probabilities", "score"}`` of one utterance (its context inside)."""

    async def commit(self, conversation_id: str, record: dict[str, Any], norm: "NormWrite | None" = None) -> dict[str, Any]:
        """Store a result once per (utterance_id, is_final); the stored record (with ``seq``). `norm`
        adds the utterance to its speaker's normalisation state in the same script."""

    async def label_utterance(self, conversation_id: str, job: dict[str, Any]) -> dict[str, Any]:
        """All of the above for one utterance (see :func:`label_utterance`); the stored record."""

    async def conversation_known(self, conversation_id: str) -> bool: ...

    async def admit_conversation(self, conversation_id: str) -> None:
        """Raise ProtocolError(LIMIT_EXCEEDED) to refuse a new conversation."""

    async def stored_finals(self, conversation_id: str) -> list[dict[str, Any]]: ...

    async def stored_records(self, conversation_id: str) -> list[dict[str, Any]]: ...

    async def end_conversation(self, conversation_id: str) -> None:
        """`stop`: mark it ended and drop its model cache."""

    async def judge_windows(self, windows: list[list[dict[str, Any]]]) -> list[list[list[float]]]: ...

    async def combine_judgements(self, judgements: list[dict[str, Any]], base_probs: list[float]) -> dict[str, Any]: ...

    # optional, speech recognition (tracker.stream.session): ``asr: bool`` and
    # ``async def listen(pcm, sample_rate) -> {"transcript": {...} | None, "audio_features": {...} | None}``
    # (tracker.audio.hearing.Hearing.hear)


def build_record(conversation_id: str, job: Mapping[str, Any], pred: Mapping[str, Any],
                 features: Mapping[str, np.ndarray] | None) -> dict[str, Any]:
    """The record stored for a labelled utterance (``seq`` is assigned by the store)."""
    record = {
        "conversation_id": conversation_id, "utterance_id": job["utterance_id"], "speaker": job["speaker"],
        "start_ms": job.get("start_ms"), "end_ms": job.get("end_ms"), "text": job["text"],
        "label": pred["label"], "probabilities": pred["probabilities"], "score": pred["score"],
        "is_final": bool(job.get("is_final", True)),
        "modalities": (["text"] if job["text"].strip() else []) + (["audio"] if features is not None else []),
        "created_at": time.time(),
        **{k: job[k] for k in ("text_source", "asr_confidence") if job.get(k) is not None},  # client | asr
    }
    if not record["is_final"]:
        record["refine"] = True  # an interim label awaiting refinement: counts as context (tracker.context.ops)
    return record


async def label_utterance(pipeline: Pipeline, conversation_id: str, job: Mapping[str, Any]) -> dict[str, Any]:
    """Label and store one utterance: ``begin`` and ``features`` in parallel, then ``label``, then ``commit``.

    `job` has ``utterance_id, speaker, text, start_ms, end_ms, pcm, sample_rate, is_final`` and may
    have ``audio_features`` (computed with its transcript), ``text_source`` and ``asr_confidence``. A
    retried utterance (``begin`` finds its final) is answered with the stored record; nothing is labelled
    again. A pipeline with ``normalizers`` (a speaker_norm model) normalises the features by the
    speaker's past, read by ``begin``, and ``commit`` adds the utterance to that past in its script:
    still one round trip each way (tracker.context.speaker_norm).
    """
    async def features():
        if "audio_features" in job:  # computed with the transcript (speech recognition: Pipeline.listen)
            return job["audio_features"]
        return await pipeline.features(job.get("pcm"), job["sample_rate"])

    normalizers = getattr(pipeline, "normalizers", None)
    begun, feats = await asyncio.gather(
        pipeline.begin(conversation_id, job["utterance_id"], job["speaker"] if normalizers else None), features())
    if begun.final is not None:
        return begun.final
    norm = None
    if feats and normalizers and begun.speaker_state is not None:  # past-only per (conversation, speaker)
        from tracker.context.speaker_norm import normalize_with_state

        feats, norm = normalize_with_state(begun.speaker_state, job["utterance_id"], feats, normalizers,
                                           f"{conversation_id}/{job['speaker']}")
    utterance = UtteranceInput(job["text"], job["speaker"], begun.context, dict(feats or {}))
    pred = await pipeline.label(conversation_id, utterance)
    return await pipeline.commit(conversation_id, build_record(conversation_id, job, pred, feats), norm)


class ModelLabeler:
    """The recognizer behind a pipeline: batched labelling with per-conversation prefix caches.

    Used in-process by :class:`LocalPipeline` and by the EmotionModel deployment, so both label the
    same way. ``incremental`` applies to context_first models only (tracker.model.incremental).
    """

    def __init__(self, recognizer, incremental: bool = True, kv_cache_bytes: int = 1 << 30,
                 cache_idle_s: float = 0.0):
        self.recognizer = recognizer
        self.labeler = None
        self.cache_idle_s = cache_idle_s  # a conversation's cache unused this long is dropped (0 = never)
        if incremental and recognizer.config.prompt.layout == "context_first":
            from tracker.model.incremental import IncrementalLabeler

            self.labeler = IncrementalLabeler(recognizer, max_cache_bytes=kv_cache_bytes)

    @property
    def label_count(self) -> int:
        return len(self.recognizer.label_set)

    def label(self, items: Sequence[tuple[str | None, UtteranceInput]]) -> list[dict[str, Any]]:
        """``{"label", "probabilities", "score"}`` per (conversation key or None, utterance); one forward."""
        keys = [k for k, _ in items]
        cached = [i for i, k in enumerate(keys) if k and self.labeler is not None]
        taken = set(cached)
        rest = [i for i in range(len(items)) if i not in taken]
        probs = np.zeros((len(items), self.label_count))
        if cached:  # one forward over the new tokens of every conversation in the batch
            probs[cached] = self.labeler.predict_proba([(keys[i], items[i][1]) for i in cached])
        if rest:
            probs[rest] = self.recognizer.predict_proba([items[i][1] for i in rest], batch_size=len(rest))
        if self.labeler is not None and self.cache_idle_s > 0:
            self.labeler.cache.expire_idle(self.cache_idle_s)
        preds = self.recognizer.to_predictions(probs)
        return [{"label": p.label, "probabilities": p.probabilities, "score": p.score} for p in preds]

    def forget(self, key: str) -> None:
        """Drop a conversation's prefix cache (it ended)."""
        if self.labeler is not None:
            self.labeler.forget(key)

    def cache_info(self) -> dict[str, Any] | None:
        if self.labeler is None:
            return None
        cache = self.labeler.cache
        return {"conversations": len(cache), "bytes": cache.nbytes, "max_bytes": cache.max_bytes, **cache.stats.to_dict()}


class LocalPipeline:
    """The pipeline in this process: recognizer, async store and feature extractor, no Ray.

    `features` None = text only. `refiner` (a tracker.model.refine.Refiner) turns on conversation-level
    refinement (interim, then final labels), as ``refine.checkpoint`` does in the service. `alerts`
    (a tracker.alerts.AlertEngine over the same store) applies the escalation rule in each commit's
    script, as the service does (without one the rule is off); the stored record carries the
    ``alerts`` it caused.
    """

    def __init__(self, recognizer, store: "AsyncConversationStore", features: "ModalityFeatures | None" = None, *,
                 incremental: bool = True, max_batch_size: int = 8, max_conversations: int = 10_000,
                 refiner=None, labeler: ModelLabeler | None = None, alerts: "AlertEngine | None" = None,
                 hearing=None):
        """`hearing` (a tracker.audio.hearing.Hearing with a recognizer) turns on speech recognition of
        segments without a transcript, as ``asr: on`` does in the service."""
        self.recognizer = recognizer
        if alerts is None:  # the same one-script commit, with the rule off
            from tracker.alerts import AlertEngine, EscalationConfig

            alerts = AlertEngine(store, EscalationConfig(enabled=False))
        self.alerts = alerts
        self.store = store
        self.extractor = features if features is not None and features.names else None
        self.labeler = labeler or ModelLabeler(recognizer, incremental=incremental)
        self._batcher = Batcher(self._label_batch, max_batch_size, wait_s=0.005)
        prompt = recognizer.config.prompt
        self.max_turns, self.min_turns = int(prompt.context_turns), prompt.context_min_turns  # bound once
        self.max_conversations = max_conversations
        self.refiner = refiner
        self.refine_info = refine_info(refiner) if refiner is not None else None
        self.hearing = hearing
        self.asr = bool(hearing is not None and hearing.asr)
        self.normalizers = recognizer.speaker_normalizers()  # {modality: SpeakerNormalizer} (speaker_norm: true)

    async def listen(self, pcm: bytes, sample_rate: int) -> dict[str, Any]:
        from tracker.audio.hearing import HearRequest

        out = (await asyncio.to_thread(self.hearing.hear, [HearRequest(pcm, sample_rate)]))[0]
        if self.extractor is None:  # a text-only pipeline: no acoustic inputs
            out["audio_features"] = None
        elif self.hearing.features is not self.extractor:  # this pipeline's features
            from tracker.audio.pcm import pcm16_to_numpy

            out["audio_features"] = await asyncio.to_thread(self.extractor.from_signal, pcm16_to_numpy(pcm), sample_rate)
        return out

    def _key(self, conversation_id: str) -> str:
        return f"{self.store.tenant}/{conversation_id}"  # the prefix-cache key, per tenant

    async def begin(self, conversation_id: str, utterance_id: str, speaker: str | None = None) -> Begun:
        final, index, turns, state = await self.store.begin(conversation_id, utterance_id, self.max_turns,
                                                            self.min_turns, speaker)
        return Begun(final, index, tuple(turns), state)

    async def features(self, pcm: bytes | None, sample_rate: int) -> Mapping[str, np.ndarray] | None:
        if not pcm or self.extractor is None:
            return None
        from tracker.audio.pcm import pcm16_to_numpy

        return await asyncio.to_thread(self.extractor.from_signal, pcm16_to_numpy(pcm), sample_rate)

    async def label(self, conversation_id: str, utterance: UtteranceInput) -> dict[str, Any]:
        return await self._batcher.submit((self._key(conversation_id), utterance))

    async def _label_batch(self, items: list[tuple[str, UtteranceInput]]) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.labeler.label, items)

    async def commit(self, conversation_id: str, record: dict[str, Any], norm: "NormWrite | None" = None) -> dict[str, Any]:
        from tracker.context.speaker_norm import add_after_conflict

        done = await self.alerts.append(conversation_id, record, norm)  # append, norm write, rule step: one script
        if done.norm_conflict:
            await add_after_conflict(self.store, conversation_id, record, norm, self.normalizers)
        return {**done.record, "alerts": [e.to_dict() for e in done.events]}

    async def label_utterance(self, conversation_id: str, job: dict[str, Any]) -> dict[str, Any]:
        return await label_utterance(self, conversation_id, job)

    async def conversation_known(self, conversation_id: str) -> bool:
        return await self.store.exists(conversation_id)

    async def admit_conversation(self, conversation_id: str) -> None:
        known, n = await self.store.admission(conversation_id)  # one round trip
        if not known and n >= self.max_conversations:
            raise P.ProtocolError(P.LIMIT_EXCEEDED, f"this tenant has {n} conversations, the limit is {self.max_conversations}")

    async def stored_finals(self, conversation_id: str) -> list[dict[str, Any]]:
        return await self.store.history(conversation_id, finals_only=True)

    async def stored_records(self, conversation_id: str) -> list[dict[str, Any]]:
        return await self.store.history(conversation_id, finals_only=False)

    async def end_conversation(self, conversation_id: str) -> None:
        await self.store.end_conversation(conversation_id)
        self.labeler.forget(self._key(conversation_id))

    async def judge_windows(self, windows: list[list[dict[str, Any]]]) -> list[list[list[float]]]:
        return await asyncio.to_thread(judge_windows, self.refiner, windows)

    async def combine_judgements(self, judgements: list[dict[str, Any]], base_probs: list[float]) -> dict[str, Any]:
        return combine_judgements(self.refiner, judgements, base_probs)


# -- conversation-level refinement over a tracker.model.refine.Refiner (in-process and in RefinerModel)

def refine_info(refiner) -> dict[str, Any]:
    s = refiner.spec
    return {"window": s.size, "stride": s.stride, "t": s.t, "labels": list(refiner.label_set.labels)}


def judge_windows(refiner, windows: list[list[dict[str, Any]]]) -> list[list[list[float]]]:
    """Logits (members, L) per window; each window is a list of {speaker, text, base_probs}."""
    from tracker.model.refine import WindowItem

    items = [[WindowItem(str(it["speaker"]), str(it["text"]), [float(p) for p in it["base_probs"]]) for it in w]
             for w in windows]
    return [logits.tolist() for logits in refiner.judge(items)]


def combine_judgements(refiner, judgements: list[dict[str, Any]], base_probs: list[float]) -> dict[str, Any]:
    """Merge an utterance's window judgements with its base distribution into the final label."""
    from tracker.model.refine import Judgement

    js = [Judgement(np.asarray(j["logits"], dtype=np.float64), int(j["position"]), int(j["order"])) for j in judgements]
    probs = refiner.combine(js, base_probs)
    ls = refiner.label_set
    return {"label": ls.labels[int(probs.argmax())], "probabilities": dict(zip(ls.labels, map(float, probs))),
            "score": float(probs @ np.asarray(ls.values))}
