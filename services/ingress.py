"""The HTTP/WebSocket front door: FastAPI inside Ray Serve.

Routes: WebSocket ``/v1/stream`` (docs/protocol.md), ``GET /v1/conversations``,
``GET /v1/conversations/{id}``, ``GET /healthz``; OpenAPI docs at ``/docs``.
"""

# No `from __future__ import annotations` here: Serve's class-based FastAPI views read the
# annotations as written, and a string "WebSocket" makes the /v1/stream route reject every client.
import asyncio
import logging
from typing import Any

from pathlib import Path

from fastapi import FastAPI, HTTPException, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from services import protocol as P
from services.config import load_app_config
from services.session import StreamSession

log = logging.getLogger(__name__)

api = FastAPI(
    title="tracker",
    description="Streaming conversation emotion tracker: stream a call in, get each utterance's emotion back.",
    version="0.1.0",
)


DASHBOARD = Path(__file__).resolve().parents[1] / "clients" / "dashboard"
ALERT = {"k": 3, "m": 4, "clear": 1}  # escalation: >= k negative of a speaker's last m finals; clears at <= clear


class ServePipeline:
    """The StreamSession's pipeline, backed by the worker deployments' handles."""

    def __init__(self, features: DeploymentHandle, model: DeploymentHandle, context: DeploymentHandle, context_turns: int,
                 context_min_turns: int | None = None):
        self.features = features
        self.model = model
        self.context = context
        self.context_turns = context_turns
        self.context_min_turns = context_min_turns  # the window slides in blocks (tracker.model.context_window)

    async def label_utterance(self, conversation_id: str, job: dict[str, Any]) -> dict[str, Any]:
        existing = await self.context.final_record.remote(conversation_id, job["utterance_id"])
        if existing is not None:  # a retried utterance: answer with what is stored, label nothing again
            return existing
        async def features():
            return await self.features.extract.remote(job["pcm"], job["sample_rate"]) if job.get("pcm") else None

        async def context():
            if not self.context_turns:
                return []
            return await self.context.context_window.remote(conversation_id, self.context_turns, self.context_min_turns)

        feats, context = await asyncio.gather(features(), context())  # independent: one round trip, not two
        pred = await self.model.label.remote({"text": job["text"], "speaker": job["speaker"], "context": context,
                                              "audio_features": feats, "conversation_id": conversation_id})
        record = {
            "conversation_id": conversation_id, "utterance_id": job["utterance_id"], "speaker": job["speaker"],
            "start_ms": job.get("start_ms"), "end_ms": job.get("end_ms"), "text": job["text"],
            "label": pred["label"], "probabilities": pred["probabilities"], "score": pred["score"], "is_final": True,
            "modalities": (["text"] if job["text"].strip() else []) + (["audio"] if feats is not None else []),
        }
        return await self.context.record.remote(conversation_id, record)

    async def conversation_known(self, conversation_id: str) -> bool:
        return await self.context.known.remote(conversation_id)

    async def stored_finals(self, conversation_id: str) -> list[dict[str, Any]]:
        return await self.context.finals.remote(conversation_id)

    async def end_conversation(self, conversation_id: str) -> None:
        await self.context.end_conversation.remote(conversation_id)


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, features: DeploymentHandle, model: DeploymentHandle, context: DeploymentHandle,
                 args: dict[str, Any]):
        self.config = load_app_config(args)
        self.features, self.model, self.context = features, model, context
        self._context_turns: int | None = None
        self._context_min_turns: int | None = None
        self.open_streams = 0

    async def _pipeline(self) -> ServePipeline:
        if self._context_turns is None:
            info = await self.model.info.remote()
            self._context_turns = int(info["context_turns"])
            self._context_min_turns = info.get("context_min_turns")
        return ServePipeline(self.features, self.model, self.context, self._context_turns, self._context_min_turns)

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
    async def dashboard_config(self) -> dict[str, Any]:
        """What the dashboard needs to draw: labels, which are negative, their valence, the alert rule."""
        from tracker.labels import LabelSet

        info = await self.model.info.remote()
        ls = LabelSet.from_dict(info["label_set_full"])
        return {"labels": list(ls.labels), "negative": list(ls.negative),
                "valence": dict(zip(ls.labels, ls.values)), "alert": ALERT}

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """Liveness and readiness: the model is loaded and Redis answers."""
        info = await self.model.info.remote()
        redis_ok = await self.context.ping.remote()
        return {"status": "ok" if redis_ok else "degraded", "redis": redis_ok, "model": info["backbone"],
                "labels": info["label_set"], "open_streams": self.open_streams}

    @api.get("/v1/conversations")
    async def conversations(self, limit: int = 50) -> dict[str, Any]:
        """Live and recent conversations, most recently updated first."""
        limit = max(1, min(int(limit), 500))
        return {"conversations": await self.context.list_conversations.remote(limit)}

    @api.get("/v1/conversations/{conversation_id}")
    async def conversation(self, conversation_id: str) -> dict[str, Any]:
        """One conversation: its utterances with labels, and each speaker's rolling state."""
        conv = await self.context.get_conversation.remote(conversation_id)
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
    async def watch(self, ws: WebSocket, conversation_id: str, after: str = "0-0") -> None:
        """Push a conversation's stored results to a dashboard: everything after `after`, then live.

        Reads go to Redis in pages and only after the previous page was sent, so a slow consumer
        never makes the server buffer: it simply catches up from Redis. A dashboard that reconnects
        passes the last `entry_id` it saw as `after` and misses nothing.
        """
        await ws.accept()
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
        last = after or "0-0"
        try:
            while not gone.is_set():
                entries = await self.context.read_since.remote(conversation_id, last, 1000, 200)
                for entry in entries:
                    await ws.send_json({"type": "utterance", "conversation_id": conversation_id, **entry})
                    last = entry["entry_id"]
        except ValueError as exc:
            cause = getattr(exc, "cause", None) or exc  # a RayTaskError carries the worker's exception
            await ws.send_json({"type": "error", "code": P.INVALID_FIELD, "message": str(cause)[:300], "fatal": True})
            await ws.close(code=P.INVALID_FIELD)
        except Exception:
            pass  # the dashboard went away
        finally:
            listener.cancel()

    @api.websocket("/v1/stream")
    async def stream(self, ws: WebSocket) -> None:
        await ws.accept()
        self.open_streams += 1
        closed = False

        async def send(message: dict[str, Any]) -> None:
            if closed:
                return  # results are in Redis; the client catches up on resume
            try:
                await ws.send_json(message)
            except Exception:  # the peer went away mid-send
                pass

        session = StreamSession(await self._pipeline(), send, self.config.vad, self.config.limits)
        code, reason = P.CLOSE_NORMAL, "stopped"
        try:
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    code = None
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
