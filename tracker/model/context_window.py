"""Moved to :mod:`tracker.context_window` (the ground floor, so data and context need not import the model)."""

from tracker.context_window import window_length, window_start, window_turns

__all__ = ["window_length", "window_start", "window_turns"]
