"""Cache paths and the inter-process lock, on the ground floor (no torch): converted backbones,
packaged Whisper models and per-clip feature caches all live under :func:`cache_dir`."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator


def cache_dir() -> Path:
    """Where converted models and caches live: $TRACKER_CACHE_DIR, else $XDG_CACHE_HOME/tracker, else ~/.cache/tracker."""
    explicit = os.environ.get("TRACKER_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "tracker"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock, so two replicas never convert the same model at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
