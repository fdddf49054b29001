"""Moved to :mod:`tracker.types` (the ground floor, so data, audio and context need not import the model)."""

from tracker.types import Turn, UtteranceInput

__all__ = ["Turn", "UtteranceInput"]
