"""The three worker deployments: FeatureExtractor, EmotionModel and ContextAggregator.

Each wraps a library object (tracker.audio, tracker.model, tracker.context) and adds only what
serving needs: threads for blocking work, batching, and Redis connection handling.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve

from services import metrics
from services.config import AppConfig, load_app_config
from tracker.stream.batching import Batcher

log = logging.getLogger(__name__)


@serve.deployment
class FeatureExtractor:
    """PCM16 utterance audio -> the acoustic modalities the served model reads, e.g.
    {"audio": eGeMAPSv02 LLDs (frames, 25), "audio_functionals": (1, 88)}; with speech recognition on
    (`asr`), also the transcript of segments that came without one, batched across conversations."""

    def __init__(self, args: dict[str, Any]):
        from tracker.audio.hearing import Hearing, resolve_asr

        self.config = load_app_config(args)
        speech = self.config.speech
        on, why = resolve_asr(self.config.asr, speech.model)
        if not on and self.config.asr == "auto":
            log.info("speech recognition off: %s", why)
        self.hearing = Hearing(served_modalities(self.config), self.config.features, speech.asr_config() if on else None)
        self.features = self.hearing.features
        self._hearer = Batcher(self._hear_batch, speech.max_batch_size, speech.batch_wait_timeout_s)

    def info(self) -> dict[str, Any]:
        return self.hearing.info()

    async def extract(self, pcm: bytes, sample_rate: int) -> dict[str, np.ndarray] | None:
        from tracker.audio.pcm import pcm16_to_numpy

        if self.features is None:
            return None
        samples = pcm16_to_numpy(pcm)
        with metrics.timed("tracker_features_seconds"):
            return await asyncio.to_thread(self.hearing.features_of, samples, sample_rate)

    async def listen(self, pcm: bytes, sample_rate: int) -> dict[str, Any]:
        """One utterance's features and transcript (tracker.audio.hearing.Hearing.hear), batched across calls."""
        from tracker.audio.hearing import HearRequest

        return await self._hearer.submit(HearRequest(pcm, sample_rate, transcribe=self.hearing.asr))

    async def _hear_batch(self, requests: list) -> list[dict[str, Any]]:
        # one recognizer batch: the features and transcripts of every utterance in it
        t0 = time.perf_counter()
        out = await asyncio.to_thread(self.hearing.hear, requests)
        transcribed = sum(1 for r in requests if r.transcribe)
        for _ in range(transcribed):  # the batch's seconds shared by the utterances it transcribed
            metrics.observe("tracker_asr_seconds", (time.perf_counter() - t0) / transcribed)
        return out


def checkpoint_path(config: AppConfig) -> Path:
    """The served checkpoint's directory; ``default`` is resolved here, and `build_app` does it once
    and hands the deployments the path."""
    from tracker.model.default import default_checkpoint

    return default_checkpoint() if config.model.checkpoint == "default" else Path(config.model.checkpoint)


def served_modalities(config: AppConfig) -> dict[str, str]:
    """{modality name: feature source} of the checkpoint the config serves (read from its config.json)."""
    from tracker.model.checkpoint import read_config

    adapter = read_config(checkpoint_path(config))["recognizer"].get("adapter", {})
    return {m["name"]: m.get("source", "egemaps_lld") for m in adapter.get("modalities", [])}


def load_serving_recognizer(config: AppConfig):
    """The recognizer the config names: the shipped default or a checkpoint, on the configured device."""
    import torch

    from tracker.model.backbone import load_backbone
    from tracker.model.checkpoint import read_config
    from tracker.model.recognizer import EmotionRecognizer

    m = config.model
    if m.num_threads:
        torch.set_num_threads(m.num_threads)
    path = checkpoint_path(config)
    backbone = load_backbone(m.backbone or read_config(path)["backbone"], dtype=m.dtype, device=m.device)
    return EmotionRecognizer.from_pretrained(path, backbone=backbone)


@serve.deployment
class EmotionModel:
    """Adapter + frozen LLM behind a tracker.stream.batching.Batcher: concurrent utterances share one
    forward pass, and everything that arrived while a forward ran goes into the next.

    Each conversation's calls carry ``conversation_id`` so that services.routing sends them to the
    replica that holds its prefix cache (tracker.stream.pipeline.ModelLabeler).
    """

    def __init__(self, args: dict[str, Any]):
        from tracker.stream.pipeline import ModelLabeler
        from tracker.types import UtteranceInput

        self.config = load_app_config(args)
        m = self.config.model
        self.recognizer = load_serving_recognizer(self.config)
        self._batcher = Batcher(self._label_batch, m.max_batch_size, m.batch_wait_timeout_s)
        self.in_flight = 0  # utterances this replica accepted and has not answered (waiting for a batch or in one)
        self.model = ModelLabeler(self.recognizer, incremental=m.incremental, kv_cache_bytes=m.kv_cache_mb << 20,
                                  cache_idle_s=m.kv_cache_idle_s)
        self.labeler = self.model.labeler  # incremental labelling with per-conversation prefix caches (context_first)
        self._cache_metric = metrics.CacheCounter("kv_prefix")
        self.recognizer.predict_proba([UtteranceInput("Hello.", "A")])  # warm-up: the first forward allocates

    def info(self, conversation_id: str | None = None) -> dict[str, Any]:
        """What the replica serves and its counters (`conversation_id` routes the call to that one's replica)."""
        rec = self.recognizer
        return {"backbone": rec.backbone.name, "label_set": list(rec.label_set.labels),
                "label_set_full": rec.label_set.to_dict(),
                "context_turns": rec.config.prompt.context_turns,
                "context_min_turns": rec.config.prompt.context_min_turns, "modalities": rec.modality_names,
                "speaker_norm": [m.name for m in rec.config.adapter.modalities if m.speaker_norm],
                "batches": self._batcher.batches, "items": self._batcher.items, "in_flight": self.in_flight,
                "incremental": self.labeler is not None, "kv_cache": self.model.cache_info(), "pid": os.getpid()}

    def speaker_normalizers(self) -> dict[str, Any]:
        """{modality: tracker.audio.speaker_norm.SpeakerNormalizer} of the served model (numpy only):
        the ingress normalises features with them, against the state `ContextAggregator.begin` read."""
        return self.recognizer.speaker_normalizers()

    def set_batching(self, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        """Retune this replica's batching while it serves (a new replica starts with the configured values)."""
        if max_batch_size < 1 or batch_wait_timeout_s < 0:
            raise ValueError("max_batch_size must be >= 1 and batch_wait_timeout_s >= 0")
        self._batcher.max_batch_size = max_batch_size
        self._batcher.wait_s = batch_wait_timeout_s

    def forget(self, conversation_id: str) -> None:
        """Drop an ended conversation's prefix cache (a later utterance would rebuild it)."""
        self.model.forget(conversation_id)

    async def label(self, utterance, conversation_id: str | None = None) -> dict[str, Any]:
        """Label one utterance (a tracker.types.UtteranceInput, its context inside); concurrent calls
        are batched into one forward. `conversation_id` keys its prefix cache (and its routing)."""
        self.in_flight += 1
        metrics.set_gauge("tracker_queue_depth", self.in_flight, stage="model")
        try:
            return await self._batcher.submit((conversation_id, utterance))
        finally:
            self.in_flight -= 1
            metrics.set_gauge("tracker_queue_depth", self.in_flight, stage="model")

    async def _label_batch(self, items: list[tuple[str | None, Any]]) -> list[dict[str, Any]]:
        metrics.observe("tracker_model_batch_size", len(items))
        with metrics.timed("tracker_model_seconds", stage="label"):
            out = await asyncio.to_thread(self.model.label, items)
        if self.labeler is not None:
            st = self.labeler.cache.stats
            self._cache_metric.update(st.hits, st.misses + st.rebuilds)
        return out


@serve.deployment
class ContextAggregator:
    """Dialogue history in Redis: past context for the model, idempotent storage of results.

    Every call names the tenant whose namespace it touches (the ingress passes the API key's
    tenant); a store per tenant shares one Redis connection pool.
    """

    def __init__(self, args: dict[str, Any], redis_url: str, label_set: dict[str, Any],
                 window: tuple[int, int | None] = (0, None)):
        from tracker.alerts import AlertEngine
        from tracker.context.store import AsyncConversationStore
        from tracker.labels import LabelSet

        self.config = load_app_config(args)
        self.max_turns, self.min_turns = int(window[0]), window[1]  # the served model's window policy, bound once
        self.store = AsyncConversationStore(redis_url, self.config.store, LabelSet.from_dict(label_set))
        self._stores = {self.store.tenant: self.store}
        # the escalation rule, applied in the same script as each append; events queued for webhooks if any
        self.alerts = AlertEngine(self.store, self.config.alerts, outbox=bool(self.config.webhooks.endpoints))
        self._engines = {self.store.tenant: self.alerts}
        self._normalizers = None  # {modality: SpeakerNormalizer} of the served checkpoint, read on first use

    def _for(self, tenant: str):
        if tenant not in self._stores:
            self._stores[tenant] = self.store.with_tenant(tenant)
        return self._stores[tenant]

    def _engine(self, tenant: str):
        if tenant not in self._engines:
            self._engines[tenant] = self.alerts.with_tenant(tenant)
        return self._engines[tenant]

    async def begin(self, conversation_id: str, utterance_id: str, speaker: str | None = None, tenant: str = "default"):
        """The utterance's stored final (a retry) or its context window, and `speaker`'s normalisation
        state when given: one Redis round trip (a tracker.stream.pipeline.Begun)."""
        from tracker.stream.pipeline import Begun

        final, index, turns, state = await self._for(tenant).begin(conversation_id, utterance_id, self.max_turns,
                                                                   self.min_turns, speaker)
        return Begun(final, index, tuple(turns), state)

    async def commit(self, conversation_id: str, record: dict[str, Any], norm=None, tenant: str = "default") -> dict[str, Any]:
        """Store a result once, apply the escalation rule to it and write the speaker-norm update
        `norm` (a tracker.context.speaker_norm.NormWrite) if given: one script, one Redis round trip.

        The append script assigns ``seq``. Returns the stored record (for a retried utterance id the
        one stored first) with ``alerts``: the alert events it caused, as dicts (also on a retry).
        """
        record = dict(record)
        record.setdefault("created_at", time.time())
        done = await self._engine(tenant).append(conversation_id, record, norm)
        if done.norm_conflict:  # another utterance of the speaker went first: add this one to the newer state
            from tracker.context.speaker_norm import add_after_conflict, normalizers_from_checkpoint

            if self._normalizers is None:
                self._normalizers = normalizers_from_checkpoint(checkpoint_path(self.config))
            await add_after_conflict(self._for(tenant), conversation_id, record, norm, self._normalizers)
        if done.stored:
            metrics.inc("tracker_utterances_labelled", final=str(bool(record.get("is_final", True))).lower())
            for e in done.events:
                metrics.inc("tracker_alerts", kind=e.kind)
        return {**done.record, "alerts": [e.to_dict() for e in done.events]}

    async def record(self, conversation_id: str, record: dict[str, Any], tenant: str = "default") -> dict[str, Any]:
        """`commit` under its former name."""
        return await self.commit(conversation_id, record, tenant=tenant)

    async def watch_since(self, conversation_id: str, after: str, alerts_after: str, block_ms: int = 1000,
                          count: int = 100, tenant: str = "default") -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Stored records and alert events after the two stream ids (one XREAD of both; waits up to `block_ms`)."""
        records, events = await self._engine(tenant).read_since(conversation_id, after, alerts_after, block_ms, count)
        return records, [e.to_dict() for e in events]

    async def alert_state(self, conversation_id: str, speakers: list[str], tenant: str = "default") -> dict[str, Any]:
        """Which speakers have an alert up now."""
        return await self._engine(tenant).state(conversation_id, speakers)
    async def known(self, conversation_id: str, tenant: str = "default") -> bool:
        return await self._for(tenant).exists(conversation_id)

    async def count_conversations(self, tenant: str = "default") -> int:
        return await self._for(tenant).count_conversations()

    async def admission(self, conversation_id: str, tenant: str = "default") -> tuple[bool, int]:
        """(the conversation exists, the tenant's conversation count): one Redis round trip."""
        return await self._for(tenant).admission(conversation_id)

    async def finals(self, conversation_id: str, tenant: str = "default") -> list[dict[str, Any]]:
        return await self._for(tenant).history(conversation_id, finals_only=True)

    async def records(self, conversation_id: str, tenant: str = "default") -> list[dict[str, Any]]:
        """Every stored record, interim and final, oldest first (a refining session resuming)."""
        return await self._for(tenant).history(conversation_id, finals_only=False)

    async def list_conversations(self, limit: int = 50, tenant: str = "default") -> list[dict[str, Any]]:
        return await self._for(tenant).list_conversations(limit=limit)

    async def get_conversation(self, conversation_id: str, tenant: str = "default") -> dict[str, Any] | None:
        return await self._for(tenant).get_conversation(conversation_id)

    async def end_conversation(self, conversation_id: str, tenant: str = "default") -> None:
        await self._for(tenant).end_conversation(conversation_id)

    async def delete_conversation(self, conversation_id: str, tenant: str = "default") -> bool:
        """Delete everything stored of the conversation (stream, state, alerts); False if it was unknown."""
        return await self._for(tenant).delete_conversation(conversation_id)

    async def read_since(self, conversation_id: str, after: str, block_ms: int = 1000, count: int = 100,
                         tenant: str = "default") -> list[dict[str, Any]]:
        """Stored entries after stream id `after` (waits up to `block_ms` for new ones): the dashboard feed."""
        return await self._for(tenant).read_since(conversation_id, after, block_ms=block_ms, count=count)

    async def ping(self) -> bool:
        return await self.store.ping()

    def redis_retries(self) -> int:
        """Redis calls retried after a transient error (Redis down or restarting), all tenants."""
        return sum(s.retries for s in self._stores.values())


@serve.deployment
class AlertDispatcher:
    """Delivers alert events from the Redis outbox to the configured webhooks (tracker.alerts.webhooks).

    Deployed only when ``webhooks.endpoints`` is set; one replica per cluster is enough (more are
    safe: each is a consumer of the outbox's group). The loop starts with the replica and stops
    when Serve shuts it down: the event in hand is finished or, if cut short, redelivered later.
    """

    def __init__(self, args: dict[str, Any], redis_url: str):
        from tracker.alerts import WebhookDispatcher

        self.config = load_app_config(args)
        self.dispatcher = WebhookDispatcher(redis_url, self.config.webhooks, key_prefix=self.config.store.key_prefix)
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._reported = dict(self.dispatcher.stats)
        try:  # Serve runs the constructor on the replica's event loop: start delivering now
            self._ensure_running()
        except RuntimeError:  # no running loop here: check_health starts it
            pass

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            if self._task is not None and not self._task.cancelled() and self._task.exception() is not None:
                log.error("webhook dispatcher stopped: %r; restarting it", self._task.exception())
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while not self._stop.is_set():
            await self._run_some()

    async def _run_some(self) -> None:
        try:
            await self.dispatcher.process_once(block_ms=500)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Redis unavailable, or a bug: wait, try again
            log.warning("webhook dispatcher: %s: %s; retrying", type(exc).__name__, exc)
            self.dispatcher._group_ready = False
            await asyncio.sleep(1.0)
        self._report()

    def _report(self) -> None:
        for stat, outcome in (("delivered", "delivered"), ("retries", "retried"), ("dead_lettered", "dead_lettered")):
            n = self.dispatcher.stats[stat] - self._reported.get(stat, 0)
            if n > 0:
                metrics.inc("tracker_webhook_deliveries", n, outcome=outcome)
        self._reported = dict(self.dispatcher.stats)

    async def check_health(self) -> None:
        """Serve calls this every few seconds: it (re)starts the delivery loop in the replica's event loop."""
        self._ensure_running()

    async def status(self) -> dict[str, Any]:
        self._ensure_running()
        return {"running": self._task is not None and not self._task.done(), **self.dispatcher.stats,
                "dead_letters": len(await self.dispatcher.dead_letters(1000))}

    async def __del__(self):
        """Serve is stopping this replica: stop taking new events, let the one in hand finish briefly."""
        self._stop.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=5)
            except (asyncio.TimeoutError, asyncio.CancelledError, Exception):
                self._task.cancel()
        await self.dispatcher.aclose()
