"""The HTTP/WebSocket front door: FastAPI inside Ray Serve.

Routes: WebSocket ``/v1/stream`` (docs/protocol.md), WebSocket ``/v1/watch``, ``GET /v1/conversations``,
``GET /v1/conversations/{id}``, ``GET /v1/conversations/{id}/export``, ``DELETE /v1/conversations/{id}``,
``GET /v1/dashboard/config``, ``GET /healthz``; OpenAPI docs at ``/docs`` (Swagger UI) and ``/redoc``.
Every ``/v1`` route needs an API key and sees only the key's tenant (docs/security.md); ``/healthz``,
the dashboard's static files and the API docs are public.
"""

# No `from __future__ import annotations` here: Serve's class-based FastAPI views read the
# annotations as written, and a string "WebSocket" makes the /v1/stream route reject every client.
import asyncio
import logging
import os
from typing import Any

from pathlib import Path

from fastapi import HTTPException, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, Response
from fastapi_offline import FastAPIOffline
from ray import serve
from ray.serve.handle import DeploymentHandle

from tracker.stream import protocol as P
from services import metrics
from services.auth import ANONYMOUS, SUBPROTOCOL, AsyncKeyStore, AuthError, Principal, key_from_request
from services.config import load_app_config
from services.limits import TokenBucket, is_replica_failure
from tracker.stream.pipeline import Begun, label_utterance
from tracker.stream.session import StreamSession
from tracker.types import UtteranceInput
from tracker.context.export import FORMATS as EXPORT_FORMATS
from tracker.context.export import export_conversation

log = logging.getLogger(__name__)

api = FastAPIOffline(  # Swagger UI (/docs) and ReDoc (/redoc) from files in the package, not a CDN
    title="tracker",
    description="Streaming conversation emotion tracker: stream a call in, get each utterance's emotion back.",
    version="0.1.0",
)


DASHBOARD = Path(__file__).resolve().parents[1] / "clients" / "dashboard"


REPLICA_RETRY_S = 180.0  # how long an utterance is retried while a crashed replica is being replaced


class ServePipeline:
    """The Ray implementation of tracker.stream.pipeline.Pipeline for one tenant: handles only.

    Per utterance: ``features`` (FeatureExtractor) in parallel with ``begin`` (ContextAggregator,
    one Redis round trip), then ``label`` (EmotionModel, routed to the conversation's replica), then
    ``commit`` (ContextAggregator, one Redis round trip): 4 Ray calls in 3 rounds, 3 without audio.
    A speaker_norm model adds none: ``begin`` reads the speaker's state, the features are normalised
    here (numpy, `normalizers`), and ``commit`` writes the state in its script.
    """

    def __init__(self, features: DeploymentHandle, model: DeploymentHandle, context: DeploymentHandle,
                 tenant: str = "default", max_conversations: int = 10_000, stats: dict[str, int] | None = None,
                 refiner: DeploymentHandle | None = None, refine_info: dict[str, Any] | None = None,
                 asr: bool = False, normalizers: dict[str, Any] | None = None):
        self._features = features
        self.model = model
        self.context = context
        self.tenant = tenant
        self.max_conversations = max_conversations
        self.stats = stats if stats is not None else {}
        self.refiner = refiner
        self.refine_info = refine_info  # set when conversation-level refinement is on (tracker.stream.refine)
        self.asr = asr  # speech recognition of segments without a client transcript (StreamSession, listen)
        self.normalizers = normalizers or {}  # {modality: SpeakerNormalizer} when the model normalises per speaker

    def _key(self, conversation_id: str) -> str:
        return f"{self.tenant}/{conversation_id}"  # KV-cache key and routing key, per tenant

    async def begin(self, conversation_id: str, utterance_id: str, speaker: str | None = None) -> Begun:
        return await self.context.begin.remote(conversation_id, utterance_id, speaker, tenant=self.tenant)

    async def features(self, pcm: bytes | None, sample_rate: int) -> dict[str, Any] | None:
        return await self._features.extract.remote(pcm, sample_rate) if pcm else None

    async def listen(self, pcm: bytes, sample_rate: int) -> dict[str, Any]:
        """Features and transcript of one utterance in one request (batched across conversations)."""
        return await self._features.listen.remote(pcm, sample_rate)

    async def label(self, conversation_id: str, utterance: UtteranceInput) -> dict[str, Any]:
        return await self.model.label.remote(utterance, conversation_id=self._key(conversation_id))

    async def commit(self, conversation_id: str, record: dict[str, Any], norm=None) -> dict[str, Any]:
        return await self.context.commit.remote(conversation_id, record, norm, tenant=self.tenant)

    async def label_utterance(self, conversation_id: str, job: dict[str, Any]) -> dict[str, Any]:
        """Label and store one utterance; retried while a replica that died mid-request is replaced.

        A retry is safe: a stored final is returned as it is, and storage is idempotent per utterance id.
        """
        deadline = asyncio.get_running_loop().time() + REPLICA_RETRY_S
        delay = 0.2
        while True:
            try:
                return await label_utterance(self, conversation_id, job)
            except Exception as exc:
                if not is_replica_failure(exc) or asyncio.get_running_loop().time() > deadline:
                    raise
                self.stats["replica_retries"] = self.stats.get("replica_retries", 0) + 1
                log.warning("utterance %s: %s; retrying", job["utterance_id"], type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)

    # -- conversation-level refinement (used by tracker.stream.refine.RefineStage)
    async def judge_windows(self, windows: list[list[dict[str, Any]]]) -> list[list[list[float]]]:
        return await self.refiner.judge.remote(windows)

    async def combine_judgements(self, judgements: list[dict[str, Any]], base_probs: list[float]) -> dict[str, Any]:
        return await self.refiner.combine.remote(judgements, base_probs)

    async def stored_records(self, conversation_id: str) -> list[dict[str, Any]]:
        return await self.context.records.remote(conversation_id, tenant=self.tenant)

    async def conversation_known(self, conversation_id: str) -> bool:
        return await self.context.known.remote(conversation_id, tenant=self.tenant)

    async def admit_conversation(self, conversation_id: str) -> None:
        """Refuse a new conversation once the tenant has `max_conversations` (a known one always goes on)."""
        known, n = await self.context.admission.remote(conversation_id, tenant=self.tenant)  # one call
        if not known and n >= self.max_conversations:
            raise P.ProtocolError(P.LIMIT_EXCEEDED, f"this tenant has {n} conversations, the limit is {self.max_conversations}")

    async def stored_finals(self, conversation_id: str) -> list[dict[str, Any]]:
        return await self.context.finals.remote(conversation_id, tenant=self.tenant)

    async def end_conversation(self, conversation_id: str) -> None:
        """`stop`: the conversation is marked ended, and its replica drops its prefix cache."""
        await self.context.end_conversation.remote(conversation_id, tenant=self.tenant)
        try:
            await self.model.forget.remote(conversation_id=self._key(conversation_id))
        except Exception:  # the cache also expires when idle (model.kv_cache_idle_s)
            log.warning("conversation %s ended; its model cache could not be dropped now", conversation_id)


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, features: DeploymentHandle, model: DeploymentHandle, context: DeploymentHandle,
                 args: dict[str, Any], refiner: DeploymentHandle | None = None,
                 webhooks: DeploymentHandle | None = None):
        self.config = load_app_config(args)
        self.webhooks = webhooks  # the AlertDispatcher, when webhooks are configured (it runs on its own)
        self.session_metrics = metrics.SessionMetrics()
        self.features, self.model, self.context = features, model, context
        self.refiner = refiner  # None: refinement off, every label final at once
        self._refine_info: dict[str, Any] | None = None
        self._asr: bool | None = None  # FeatureExtractor runs speech recognition (asked once)
        self._normalizers: dict[str, Any] = {}  # the served model's speaker normalisers (numpy), if any
        self.open_streams = 0
        self.stats: dict[str, int] = {"replica_retries": 0, "auth_refused": 0, "limit_refused": 0}
        self._open: dict[tuple[str, str], int] = {}  # (route, key id) -> open connections on this replica
        self.keys = None
        if self.config.auth.enabled:
            redis_url = args.get("redis_url") or self.config.redis_url or os.environ.get("REDIS_URL", "")
            self.keys = AsyncKeyStore(redis_url, self.config.store.key_prefix, self.config.auth.keys)

    async def _pipeline(self, principal: Principal = ANONYMOUS) -> ServePipeline:
        if self._asr is None:
            if (await self.model.info.remote()).get("speaker_norm"):
                self._normalizers = await self.model.speaker_normalizers.remote()
            self._asr = bool((await self.features.info.remote())["asr"])
        if self.refiner is not None and self._refine_info is None:
            self._refine_info = await self.refiner.info.remote()
        return ServePipeline(self.features, self.model, self.context, principal.tenant,
                             self.config.limits.max_conversations_per_tenant, self.stats, self.refiner, self._refine_info,
                             self._asr, self._normalizers)

    # ------------------------------------------------------------------ authentication
    async def _authenticate(self, key: str | None) -> Principal:
        if self.keys is None:
            return ANONYMOUS
        try:
            return await self.keys.authenticate(key)
        except AuthError:
            self.stats["auth_refused"] += 1
            raise

    async def _http_principal(self, request: Request) -> Principal:
        """The request's principal, or 401 (no/unknown/revoked key) / 503 (the key store is unreachable)."""
        try:
            return await self._authenticate(key_from_request(request.headers, request.query_params))
        except AuthError as exc:
            metrics.inc("tracker_errors", code=P.UNAUTHORIZED)
            raise HTTPException(status_code=401, detail={"code": P.UNAUTHORIZED, "message": str(exc)},
                                headers={"WWW-Authenticate": "Bearer"}) from None
        except Exception as exc:  # Redis down longer than the retry window
            raise HTTPException(status_code=503, detail=f"key store unavailable: {type(exc).__name__}") from None

    async def _ws_accept(self, ws: WebSocket, route: str, max_open: int) -> Principal | None:
        """Accept a WebSocket and authenticate it; on refusal send the error, close, and return None.

        Browsers cannot set headers on a WebSocket, so a key may also come as the subprotocol
        ``bearer.<key>`` (offered with ``tracker.v1``, which the server then selects) or ``?token=``.
        """
        offered = list(ws.scope.get("subprotocols") or [])
        chosen = SUBPROTOCOL if SUBPROTOCOL in offered else None
        await ws.accept(subprotocol=chosen)
        try:
            principal = await self._authenticate(key_from_request(ws.headers, ws.query_params, offered))
        except AuthError as exc:
            await self._refuse(ws, P.UNAUTHORIZED, str(exc))
            return None
        except Exception as exc:
            await self._refuse(ws, P.CLOSE_OVERLOADED, f"key store unavailable: {type(exc).__name__}")
            return None
        slot = (route, principal.key_id)
        if self._open.get(slot, 0) >= max_open:
            self.stats["limit_refused"] += 1
            await self._refuse(ws, P.LIMIT_EXCEEDED, f"this API key already has {max_open} open {route} connections")
            return None
        self._open[slot] = self._open.get(slot, 0) + 1
        return principal

    def _release(self, route: str, principal: Principal) -> None:
        slot = (route, principal.key_id)
        self._open[slot] = self._open.get(slot, 1) - 1
        if self._open[slot] <= 0:
            del self._open[slot]

    @staticmethod
    async def _refuse(ws: WebSocket, code: int, message: str) -> None:
        metrics.inc("tracker_errors", code=code)
        try:
            await ws.send_json({"type": "error", "code": code, "message": message, "fatal": True})
            await ws.close(code=code, reason=message[:120])
        except Exception:
            pass

    @api.get("/", include_in_schema=False)
    async def dashboard(self) -> FileResponse:
        """The live dashboard (clients/dashboard, no build step)."""
        return FileResponse(DASHBOARD / "index.html")

    @api.get("/dashboard/{path:path}", include_in_schema=False)
    async def dashboard_file(self, path: str) -> FileResponse:
        target = (DASHBOARD / path).resolve()
        if DASHBOARD.resolve() not in target.parents or not target.is_file():
            raise HTTPException(status_code=404, detail="not found")
        return FileResponse(target)

    @api.get("/v1/dashboard/config")
    async def dashboard_config(self, request: Request) -> dict[str, Any]:
        """What the dashboard needs to draw: labels, which are negative, their valence, the alert rule."""
        from tracker.labels import LabelSet

        await self._http_principal(request)

        info = await self.model.info.remote()
        ls = LabelSet.from_dict(info["label_set_full"])
        rule = self.config.alerts
        alert = {**rule.as_rule(), "enabled": rule.enabled, "negative": sorted(rule.negative_labels(ls))}
        return {"labels": list(ls.labels), "negative": list(ls.negative),
                "valence": dict(zip(ls.labels, ls.values)), "alert": alert}

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """Liveness and readiness: the model is loaded and Redis answers."""
        info = await self.model.info.remote()
        redis_ok = await self.context.ping.remote()
        return {"status": "ok" if redis_ok else "degraded", "redis": redis_ok, "model": info["backbone"],
                "labels": info["label_set"], "open_streams": self.open_streams, "auth": self.keys is not None,
                **self.stats}

    @api.get("/v1/conversations")
    async def conversations(self, request: Request, limit: int = 50) -> dict[str, Any]:
        """The key's tenant's live and recent conversations, most recently updated first."""
        who = await self._http_principal(request)
        limit = max(1, min(int(limit), 500))
        return {"conversations": await self.context.list_conversations.remote(limit, tenant=who.tenant)}

    @api.get("/v1/conversations/{conversation_id}")
    async def conversation(self, conversation_id: str, request: Request) -> dict[str, Any]:
        """One conversation of the key's tenant: its utterances with labels, and each speaker's rolling state."""
        return await self._conversation_of(await self._http_principal(request), conversation_id)

    @api.get("/v1/conversations/{conversation_id}/export",
             responses={200: {"content": {m: {} for m in EXPORT_FORMATS.values()},
                              "description": "the conversation's final results as a file"}})
    async def export_conversation(self, conversation_id: str, request: Request, format: str = "jsonl") -> Response:
        """One conversation's final results as `jsonl` (the JSONL conversation format) or `csv` (a download)."""
        who = await self._http_principal(request)
        if format not in EXPORT_FORMATS:
            raise HTTPException(status_code=400, detail={"code": P.INVALID_FIELD,
                                                         "message": f"format must be jsonl or csv, got {format!r}"})
        conv = await self._conversation_of(who, conversation_id)
        labels = (await self.model.info.remote())["label_set"]
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in conversation_id)[:100] or "conversation"
        return Response(export_conversation(conv, format, labels), media_type=EXPORT_FORMATS[format],
                        headers={"Content-Disposition": f'attachment; filename="{name}.{format}"'})

    @api.delete("/v1/conversations/{conversation_id}")
    async def delete_conversation(self, conversation_id: str, request: Request) -> dict[str, Any]:
        """Delete one conversation of the key's tenant: its results, speaker state, alerts and model cache."""
        who = await self._http_principal(request)
        if not conversation_id or len(conversation_id) > P.MAX_ID_CHARS:
            raise HTTPException(status_code=404, detail="unknown conversation")
        if not await self.context.delete_conversation.remote(conversation_id, tenant=who.tenant):
            raise HTTPException(status_code=404, detail=f"unknown conversation {conversation_id!r}")
        try:  # the prefix KV cache (a later conversation under this id would only reuse a matching prefix)
            await self.model.forget.remote(conversation_id=f"{who.tenant}/{conversation_id}")
        except Exception:
            log.warning("conversation %s deleted; its model cache could not be dropped now", conversation_id)
        return {"conversation_id": conversation_id, "deleted": True}

    async def _conversation_of(self, who: Principal, conversation_id: str) -> dict[str, Any]:
        if not conversation_id or len(conversation_id) > P.MAX_ID_CHARS:
            raise HTTPException(status_code=404, detail="unknown conversation")
        conv = await self.context.get_conversation.remote(conversation_id, tenant=who.tenant)
        if conv is None:
            raise HTTPException(status_code=404, detail=f"unknown conversation {conversation_id!r}")
        return conv

    async def _linger_after_stop(self, ws: WebSocket, session: StreamSession) -> tuple[int | None, str]:
        """After `stop`, give the client a moment to close; anything it still sends is error 4006."""
        try:
            msg = await asyncio.wait_for(ws.receive(), timeout=1.0)
        except asyncio.TimeoutError:
            return P.CLOSE_NORMAL, "stopped"
        if msg["type"] == "websocket.disconnect":
            return None, ""
        if msg.get("bytes") is not None:
            await session.on_binary(msg["bytes"])
        else:
            await session.on_text(msg.get("text") or "")
        err = session.fatal
        return (err.code, err.message[:120]) if err else (P.CLOSE_NORMAL, "stopped")

    @api.websocket("/v1/watch")
    async def watch(self, ws: WebSocket, conversation_id: str, after: str = "0-0", alerts_after: str = "0-0") -> None:
        """Push a conversation's stored results and alert events to a dashboard: everything after
        `after` (results) and `alerts_after` (alerts), then live.

        Reads go to Redis in pages and only after the previous page was sent, so a slow consumer
        never makes the server buffer: it simply catches up from Redis. A dashboard that reconnects
        passes the last `entry_id` it saw of each kind and misses nothing.
        """
        who = await self._ws_accept(ws, "watch", self.config.limits.max_watches_per_key)
        if who is None:
            return
        try:
            await self._watch(ws, who, conversation_id, after, alerts_after)
        finally:
            self._release("watch", who)

    async def _watch(self, ws: WebSocket, who: Principal, conversation_id: str, after: str, alerts_after: str) -> None:
        if not conversation_id or len(conversation_id) > P.MAX_ID_CHARS:
            await ws.send_json({"type": "error", "code": P.INVALID_FIELD, "fatal": True,
                                "message": f"conversation_id must have 1 to {P.MAX_ID_CHARS} characters"})
            await ws.close(code=P.INVALID_FIELD)
            return
        gone = asyncio.Event()

        async def watch_disconnect() -> None:
            try:
                while (await ws.receive())["type"] != "websocket.disconnect":
                    pass
            except Exception:
                pass
            gone.set()

        listener = asyncio.create_task(watch_disconnect())
        last, last_alert = after or "0-0", alerts_after or "0-0"
        timeout = self.config.limits.watch_send_timeout_s
        try:
            while not gone.is_set():
                entries, alerts = await self.context.watch_since.remote(conversation_id, last, last_alert, 1000, 200,
                                                                        tenant=who.tenant)
                # results first: an alert's final is stored before it (same script), so it is in this read too
                messages = [("r", e["entry_id"], {"type": "utterance", "conversation_id": conversation_id, **e})
                            for e in entries] + [("a", a["entry_id"], P.alert_message(a)) for a in alerts]
                for kind, entry_id, message in messages:
                    try:  # a consumer too slow to take one message is closed; it catches up from Redis
                        await asyncio.wait_for(ws.send_json(message), timeout)
                    except asyncio.TimeoutError:
                        await self._refuse(ws, P.CLOSE_OVERLOADED,
                                           f"slow consumer: reconnect with after={last}&alerts_after={last_alert}")
                        return
                    if kind == "r":
                        last = entry_id
                    else:
                        last_alert = entry_id
        except ValueError as exc:
            cause = getattr(exc, "cause", None) or exc  # a RayTaskError carries the worker's exception
            await ws.send_json({"type": "error", "code": P.INVALID_FIELD, "message": str(cause)[:300], "fatal": True})
            await ws.close(code=P.INVALID_FIELD)
        except Exception:
            pass  # the dashboard went away
        finally:
            listener.cancel()

    def _over_limit(self, msg: dict[str, Any], bucket: TokenBucket) -> P.ProtocolError | None:
        """The connection-level limits, checked before a frame is parsed: rate and text frame size."""
        limits = self.config.limits
        if not bucket.take():
            return P.ProtocolError(P.LIMIT_EXCEEDED, f"more than {limits.max_messages_per_second:g} messages per second "
                                                     f"(burst {limits.message_burst}); slow down")
        text = msg.get("text")
        if text is not None and len(text) > limits.max_text_frame_chars:
            return P.ProtocolError(P.FRAME_TOO_LARGE, f"text frame of {len(text)} characters exceeds the limit of "
                                                      f"{limits.max_text_frame_chars}")
        return None

    @api.websocket("/v1/stream")
    async def stream(self, ws: WebSocket) -> None:
        who = await self._ws_accept(ws, "stream", self.config.limits.max_streams_per_key)
        if who is None:
            return
        try:
            await self._stream(ws, who)
        finally:
            self._release("stream", who)

    async def _stream(self, ws: WebSocket, who: Principal) -> None:
        self.open_streams += 1
        closed = False
        limits = self.config.limits
        bucket = TokenBucket(limits.max_messages_per_second, limits.message_burst)

        async def send(message: dict[str, Any]) -> None:
            if closed:
                return  # results are in Redis; the client catches up on resume
            try:
                await ws.send_json(message)
            except Exception:  # the peer went away mid-send
                pass

        session = StreamSession(await self._pipeline(who), send, self.config.vad, self.config.limits,
                                observer=self.session_metrics)
        code, reason = P.CLOSE_NORMAL, "stopped"
        try:
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    code = None
                    break
                refused = self._over_limit(msg, bucket)
                if refused is not None:
                    self.stats["limit_refused"] += 1
                    metrics.inc("tracker_errors", code=refused.code)
                    await send(refused.to_message())
                    code, reason = refused.code, refused.message[:120]
                    break
                if msg.get("bytes") is not None:
                    await session.on_binary(msg["bytes"])
                elif msg.get("text") is not None:
                    await session.on_text(msg["text"])
                if session.fatal is not None:
                    code, reason = session.fatal.code, session.fatal.message[:120]
                    break
                if session.stopped:
                    code, reason = await self._linger_after_stop(ws, session)
                    break
        except WebSocketDisconnect:
            code = None
        except Exception as exc:  # never crash the replica for one stream
            log.exception("stream failed")
            code, reason = P.CLOSE_INTERNAL, f"internal error: {type(exc).__name__}"
            metrics.inc("tracker_errors", code=P.CLOSE_INTERNAL)
            await send({"type": "error", "code": P.CLOSE_INTERNAL, "message": reason, "fatal": True})
        finally:
            await session.close()
            closed = True
            self.open_streams -= 1
            if code is not None:
                try:
                    await ws.close(code=code, reason=reason)
                except Exception:
                    pass
