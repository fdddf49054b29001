"""A bad checkpoint given to the service is refused before anything is deployed, with a clear error."""

from __future__ import annotations

import json

import pytest

from tracker.model.checkpoint import CheckpointError, verify_files


@pytest.fixture
def checkpoint(tmp_path, tiny_backbone):
    from tracker.model.adapter import AdapterConfig
    from tracker.model.recognizer import EmotionRecognizer, RecognizerConfig

    path = tmp_path / "ck"
    EmotionRecognizer(tiny_backbone, RecognizerConfig(backbone="tiny", dtype="fp32",
                                                      adapter=AdapterConfig(d_model=16, n_pseudo_tokens=2))).save_pretrained(path)
    return path


def test_build_app_refuses_truncated_corrupt_or_foreign_checkpoints(checkpoint, monkeypatch):
    from services.app import build_app

    monkeypatch.delenv("REDIS_URL", raising=False)
    assert verify_files(checkpoint)["format"] == "tracker.mse_adapter"
    weights = checkpoint / "model.safetensors"
    data = weights.read_bytes()
    cases = [
        (lambda: weights.write_bytes(data[: len(data) - 100]), "corrupt or truncated"),
        (lambda: weights.write_bytes(b"\xff" * 16 + data[16:]), "corrupt or truncated"),
        (lambda: weights.write_bytes(b""), "corrupt or truncated"),
        (lambda: (checkpoint / "config.json").write_text(json.dumps({"format": "pickle"})), "not a tracker adapter config"),
        (lambda: weights.unlink(), "model.safetensors is missing"),
    ]
    config = (checkpoint / "config.json").read_text()
    for damage, message in cases:
        damage()
        with pytest.raises(CheckpointError, match=message):
            build_app({"model": {"checkpoint": str(checkpoint)}, "redis_url": "redis://127.0.0.1:1/0"})
        weights.write_bytes(data)
        (checkpoint / "config.json").write_text(config)
