"""Replay: in-process figures equal `tracker eval`'s; through the service, the same labels as in-process."""

from __future__ import annotations

import json

import pytest

from clients.replay import replay_in_process, replay_through_service, report_for
from tracker_cli import main
from tracker.data import load_dataset
from tracker.model.recognizer import EmotionRecognizer

from tests.conftest import save_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tiny_backbone):
    path = tmp_path_factory.mktemp("replay") / "ckpt"
    save_tiny_checkpoint(tiny_backbone, path, seed=1)
    return path


def test_in_process_replay_gives_the_same_figures_as_eval(tiny_checkpoint, tmp_path, data_dir, capsys):
    preds, report_json, eval_json = tmp_path / "p.jsonl", tmp_path / "r.json", tmp_path / "e.json"
    assert main(["replay", "meld:dev", "--checkpoint", str(tiny_checkpoint), "--limit", "6", "--out", str(preds), "--report", str(report_json)]) == 0
    assert main(["eval", "--checkpoint", str(tiny_checkpoint), "--data", "meld:dev", "--limit", "6", "--json", str(eval_json)]) == 0
    replayed = json.loads(report_json.read_text())
    evaluated = json.loads(eval_json.read_text())["reports"]["meld:dev"]
    assert replayed == evaluated
    lines = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(lines) == replayed["n"] == sum(len(c) for c in load_dataset("meld:dev")[:6])
    assert {"conversation_id", "utterance_id", "speaker", "text", "gold", "label", "probabilities"} <= set(lines[0])


@pytest.mark.service
def test_replay_through_the_service_gives_the_same_labels_as_in_process(tiny_checkpoint, tiny_backbone, data_dir):
    from tests.conftest import start_test_service

    convs = load_dataset("meld:dev")[:3]
    rec = EmotionRecognizer.from_pretrained(tiny_checkpoint, backbone=tiny_backbone)
    local = replay_in_process(rec, convs)
    with start_test_service(tiny_checkpoint) as svc:
        remote = replay_through_service(svc.ws_url, convs, speed=0, concurrency=3, headers=svc.auth_headers)
    assert [r["utterance_id"] for r in remote] == [r["utterance_id"] for r in local]
    assert [r["label"] for r in remote] == [r["label"] for r in local]
    for a, b in zip(remote, local):
        for k in a["probabilities"]:
            assert a["probabilities"][k] == pytest.approx(b["probabilities"][k], abs=1e-4)
    assert report_for(remote, list(rec.label_set.labels)).weighted_f1 == pytest.approx(report_for(local, list(rec.label_set.labels)).weighted_f1)
