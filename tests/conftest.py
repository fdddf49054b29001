"""Shared fixtures: a tiny random backbone (built once per session) and the data directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TRACKER_DATA_DIR", str(REPO.parent / "shared" / "data"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session")
def tiny_backbone():
    from tracker.model.backbone import load_backbone

    return load_backbone("tiny", dtype="fp32", seed=0)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ["TRACKER_DATA_DIR"])
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path}")
    return path
