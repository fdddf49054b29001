"""Progress bars only where someone watches: on a terminal. Redirected to a file, tqdm's carriage
returns would fill the log with half-drawn bars, so there the bar is off (``TRACKER_PROGRESS=1``
forces it on, ``0`` off)."""

from __future__ import annotations

import os
import sys
from typing import Any


def progress_enabled(stream: Any = None) -> bool:
    forced = os.environ.get("TRACKER_PROGRESS", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress_bar(iterable: Any = None, *, disable: bool = False, **kwargs: Any):
    """`tqdm(iterable, **kwargs)`, disabled unless stderr is a terminal (or `disable` is set)."""
    from tqdm import tqdm

    return tqdm(iterable, disable=disable or not progress_enabled(kwargs.get("file")), **kwargs)


__all__ = ["progress_bar", "progress_enabled"]
