"""The RefinerModel deployment: window judgements and their merge for tracker.stream.refine.RefineStage."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from ray import serve

from services.config import load_app_config
from tracker.stream.refine import refiner_path

log = logging.getLogger(__name__)


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
        path = refiner_path(self.config.refine.checkpoint)
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

        from services.deployments import checkpoint_path

        trained_on = (json.loads((path / "config.json").read_text()).get("training") or {}).get("base_checkpoint_sha1")
        base = checkpoint_path(self.config)
        try:
            served = hashlib.sha1((base / "model.safetensors").read_bytes()).hexdigest()[:10]
        except OSError:
            return
        if trained_on and trained_on != served:
            log.warning("refiner %s was trained on base adapter %s, the service runs %s: retrain it with "
                        "`tracker train-refiner` for the figures in its model card", path, trained_on, served)

    def info(self) -> dict[str, Any]:
        from tracker.stream.pipeline import refine_info

        return {**refine_info(self.refiner), "windows": self.windows}

    def _judge(self, windows: list[list[dict[str, Any]]]) -> list[list[list[float]]]:
        from tracker.stream.pipeline import judge_windows

        self.windows += len(windows)
        return judge_windows(self.refiner, windows)

    async def judge(self, windows: list[list[dict[str, Any]]]) -> list[list[list[float]]]:
        """Logits (members, L) per window; each window is a list of {speaker, text, base_probs}."""
        return await asyncio.to_thread(self._judge, windows)

    def combine(self, judgements: list[dict[str, Any]], base_probs: list[float]) -> dict[str, Any]:
        from tracker.stream.pipeline import combine_judgements

        return combine_judgements(self.refiner, judgements, base_probs)
