"""Conversation-level refinement in the service: the RefinerModel deployment and a session's RefineStage.

With a refiner configured (``refine.checkpoint``), a StreamSession stores and sends each utterance's
base label at once as an interim result (``is_final: false``); the RefineStage adds it to the
conversation's receptive fields (tracker.model.live_refine), runs the windows that close (one LLM
forward each, on the RefinerModel deployment), and once an utterance has its t window judgements,
or the conversation ends, merges them into the final label, stores it (once: the store is
idempotent per (utterance_id, is_final)) and sends it (``is_final: true``).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Awaitable, Callable

from ray import serve

from services import protocol as P
from services.config import AppConfig, load_app_config

log = logging.getLogger(__name__)

SHIPPED_REFINER = Path(__file__).resolve().parents[1] / "tracker" / "assets" / "refiner"


def refiner_path(config: AppConfig) -> Path | None:
    """The refiner checkpoint the config names (``default`` = shipped), or None when refinement is off."""
    c = config.refine.checkpoint
    if not c:
        return None
    return SHIPPED_REFINER if c == "default" else Path(c).expanduser()


@serve.deployment
class RefinerModel:
    """Window judgements (one frozen-LLM forward per window) and the RFAttention merge."""

    def __init__(self, args: dict[str, Any]):
        import torch

        from tracker.model.backbone import load_backbone
        from tracker.model.refine import Refiner

        self.config = load_app_config(args)
        m = self.config.model
        if m.num_threads:
            torch.set_num_threads(m.num_threads)
        path = refiner_path(self.config)
        rconf, _, _ = Refiner.read_config(path)
        backbone = load_backbone(m.backbone or rconf.backbone, dtype=m.dtype, device=m.device)
        self.refiner = Refiner.from_pretrained(path, backbone=backbone)
        spec = self.refiner.spec
        r = self.config.refine
        if (r.window and r.window != spec.size) or (r.stride and r.stride != spec.stride):
            raise ValueError(f"refine: window/stride {r.window}/{r.stride} do not match the refiner's {spec.size}/{spec.stride} ({path})")
        self.windows = 0
        self._check_base(path)

    def _check_base(self, path: Path) -> None:
        """Warn when the refiner was trained on another base adapter than the one served (it still works)."""
        import hashlib
        import json

        from tracker.model.default import default_checkpoint

        trained_on = (json.loads((path / "config.json").read_text()).get("training") or {}).get("base_checkpoint_sha1")
        base = default_checkpoint() if self.config.model.checkpoint == "default" else Path(self.config.model.checkpoint)
        try:
            served = hashlib.sha1((base / "model.safetensors").read_bytes()).hexdigest()[:10]
        except OSError:
            return
        if trained_on and trained_on != served:
            log.warning("refiner %s was trained on base adapter %s, the service runs %s: retrain it with "
                        "`tracker train-refiner` for the figures in its model card", path, trained_on, served)

    def info(self) -> dict[str, Any]:
        s = self.refiner.spec
        return {"window": s.size, "stride": s.stride, "t": s.t, "labels": list(self.refiner.label_set.labels),
                "windows": self.windows}

    def _judge(self, windows: list[list[dict[str, Any]]]) -> list[list[list[float]]]:
        from tracker.model.refine import WindowItem

        items = [[WindowItem(str(it["speaker"]), str(it["text"]), [float(p) for p in it["base_probs"]]) for it in w]
                 for w in windows]
        self.windows += len(items)
        return [logits.tolist() for logits in self.refiner.judge(items)]

    async def judge(self, windows: list[list[dict[str, Any]]]) -> list[list[list[float]]]:
        """Logits (members, L) per window; each window is a list of {speaker, text, base_probs}."""
        return await asyncio.to_thread(self._judge, windows)

    def combine(self, judgements: list[dict[str, Any]], base_probs: list[float]) -> dict[str, Any]:
        import numpy as np

        from tracker.model.refine import Judgement

        js = [Judgement(np.asarray(j["logits"], dtype=np.float64), int(j["position"]), int(j["order"])) for j in judgements]
        probs = self.refiner.combine(js, base_probs)
        ls = self.refiner.label_set
        return {"label": ls.labels[int(probs.argmax())], "probabilities": dict(zip(ls.labels, map(float, probs))),
                "score": float(probs @ np.asarray(ls.values))}


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
        stored = await self.pipeline.store_record(self.conversation_id, record)
        u.final = True
        await self.send(P.result_message(stored))
