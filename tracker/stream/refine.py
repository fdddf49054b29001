"""Conversation-level refinement of a live conversation (the Lantern idea, served).

With a refiner configured (``refine.checkpoint``), a StreamSession stores and sends each utterance's
base label at once as an interim result (``is_final: false``); the RefineStage adds it to the
conversation's receptive fields (tracker.model.live_refine), runs the windows that close (one LLM
forward each, through the pipeline's ``judge_windows``), and once an utterance has its t window
judgements, or the conversation ends, merges them into the final label, stores it (once: the store is
idempotent per (utterance_id, is_final)) and sends it (``is_final: true``).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Awaitable, Callable

from tracker.stream import protocol as P

log = logging.getLogger(__name__)

SHIPPED_REFINER = Path(__file__).resolve().parents[1] / "assets" / "refiner"


def refiner_path(checkpoint: str) -> Path | None:
    """The refiner checkpoint a config names (``default`` = shipped), or None when refinement is off."""
    if not checkpoint:
        return None
    return SHIPPED_REFINER if checkpoint == "default" else Path(checkpoint).expanduser()


class RefineStage:
    """One conversation's refinement inside a StreamSession (one per connection)."""

    def __init__(self, pipeline: Any, conversation_id: str, info: dict[str, Any],
                 send: Callable[[dict[str, Any]], Awaitable[None]]):
        from tracker.model.live_refine import LiveRefinement
        from tracker.model.windows import WindowSpec

        self.pipeline = pipeline
        self.conversation_id = conversation_id
        self.labels = list(info["labels"])
        self.live = LiveRefinement(WindowSpec(int(info["window"]), int(info["stride"])))
        self.send = send
        self._lock = asyncio.Lock()

    async def restore(self) -> None:
        """A resumed conversation: rebuild the receptive fields from its stored records."""
        async with self._lock:
            due = self.live.restore(await self.pipeline.stored_records(self.conversation_id), self.labels)
            await self._run(due)

    async def on_interim(self, record: dict[str, Any]) -> None:
        """An utterance got (and sent) its interim label: judge the windows that close now."""
        async with self._lock:
            if record.get("is_final") or self.live.known(record["utterance_id"]):
                return  # a retry, or an utterance finalized before
            probs = [float((record.get("probabilities") or {}).get(lab, 0.0)) for lab in self.labels]
            windows = self.live.add(record["utterance_id"], record["speaker"], record.get("text", ""), probs, record)
            await self._run(windows)

    async def finish(self) -> None:
        """The conversation ended (or the connection went): close every window, finalize everything left."""
        async with self._lock:
            await self._run(self.live.end())
            for u in self.live.pending():
                await self._finalize(u)

    async def _run(self, windows: list) -> None:
        todo = [w for w in windows if self.live.needs_forward(w)]
        if not todo:
            return
        batch = [[{"speaker": u.speaker, "text": u.text, "base_probs": u.base_probs} for u in self.live.members(w)] for w in todo]
        try:
            logits = await self.pipeline.judge_windows(batch)
        except Exception:  # the final label falls back to fewer judgements (or the base label), never lost
            log.exception("refinement of %s: window forward failed", self.conversation_id)
            return
        done = []
        for w, lg in zip(todo, logits):
            done += self.live.add_judgements(w, lg)
        for u in sorted(done, key=lambda u: u.index):
            await self._finalize(u)

    async def _finalize(self, u) -> None:
        interim = u.record
        try:
            pred = await self.pipeline.combine_judgements(
                [{"logits": [float(x) for x in j.logits], "position": j.position, "order": j.order} for j in u.judgements],
                u.base_probs)
        except Exception:
            log.exception("refinement of %s: merge failed; the interim label becomes final", u.utterance_id)
            pred = {"label": interim["label"], "probabilities": interim.get("probabilities"), "score": interim.get("score")}
        record = {k: v for k, v in interim.items() if k not in ("seq", "entry_id", "created_at")}
        record.update(pred)
        record.update({"is_final": True, "refined": True, "interim_label": interim["label"],
                       "revised": pred["label"] != interim["label"], "judgements": len(u.judgements)})
        stored = await self.pipeline.commit(self.conversation_id, record)
        u.final = True
        await self.send(P.result_message(stored))
