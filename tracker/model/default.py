"""The default adapter shipped inside the package (trained by configs/train/default.yaml)."""

from __future__ import annotations

from pathlib import Path

from tracker.model.checkpoint import CONFIG_NAME, CheckpointError

SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "model"


def default_checkpoint() -> Path:
    """The packaged default checkpoint directory; an error says what to do if it is absent."""
    if not (SHIPPED / CONFIG_NAME).exists():
        raise CheckpointError(
            f"no default model is shipped in {SHIPPED}; pass --checkpoint DIR (train one with "
            f"`tracker train --config configs/train/default.yaml`)"
        )
    return SHIPPED
