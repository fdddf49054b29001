"""Where command-line clients find the local service and its API key.

``tracker serve`` / ``tracker demo`` write ``local-service.json`` (mode 0600) into the cache
directory with the service's addresses, its Redis URL and the local key; ``tracker stream``,
``tracker replay --through`` and ``tracker keys`` read it when no key or URL is given.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def local_dir() -> Path:
    """$TRACKER_CACHE_DIR, else $XDG_CACHE_HOME/tracker, else ~/.cache/tracker."""
    explicit = os.environ.get("TRACKER_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "tracker"


def state_path() -> Path:
    """<local dir>/local-service.json: where the running local service is (removed when it stops)."""
    return local_dir() / "local-service.json"


def redis_data_dir() -> Path:
    """<local dir>/redis: the embedded Redis's data (append-only file) of `tracker serve` without --ephemeral."""
    return local_dir() / "redis"


def key_path() -> Path:
    """<local dir>/local-api-key: the local service's key, kept across restarts (mode 0600)."""
    return local_dir() / "local-api-key"


def read_state() -> dict[str, Any]:
    try:
        data = json.loads(state_path().read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def write_state(**state: Any) -> Path:
    path = state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds a key: owner only
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(state, fh, indent=2)
    return path


def remove_state() -> None:
    try:
        state_path().unlink()
    except OSError:
        pass


def resolve_api_key(explicit: str | None = None) -> str | None:
    """--key, else $TRACKER_API_KEY, else the running local service's key, else None."""
    return explicit or os.environ.get("TRACKER_API_KEY") or read_state().get("api_key") or None


def auth_headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}
